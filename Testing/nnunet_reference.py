"""nnU-Net v2 set up to run a SegBook model exactly as SegBook's plan says: the reference of the fidelity
tests and of benchmarks/bench_predict.py.

STU-Net is not in dynamic_network_architectures, so the network is handed to `nnUNetPredictor` through
`manual_initialization`, with plans and dataset json written for the model's plan: its spacing and patch,
z-score without mask ("ZScoreNormalization", use_mask_for_norm False), nnU-Net's default resampling
(cubic, separate-z above 3x anisotropy; linear for the logits), SimpleITK IO, no transpose.
"""
from __future__ import annotations

import torch


def plans_and_dataset(config) -> tuple[dict, dict]:
    """nnU-Net v2 plans and dataset.json dicts for a segbook ModelConfig (3d_fullres only)."""
    plan = config.plan
    norm = "ZScoreNormalization" if plan.normalization == "zscore" else "CTNormalization"
    n_in = config.arch.input_channels
    intensities = {str(c): dict(plan.ct_intensities or {"mean": 0.0, "std": 1.0, "percentile_00_5": -1e9,
                                                         "percentile_99_5": 1e9, "median": 0.0,
                                                         "min": -1e9, "max": 1e9}) for c in range(n_in)}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": "segbook_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(plan.patch_size),
        "median_image_size_in_voxels": list(plan.patch_size), "spacing": list(plan.spacing),
        "normalization_schemes": [norm] * n_in, "use_mask_for_norm": [False] * n_in,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": {"network_class_name": "segbook.network.STUNet", "arch_kwargs": {},
                         "_kw_requires_import": []},
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset999_SegBook", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(plan.spacing),
        "original_median_shape_after_transp": list(plan.patch_size),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": intensities,
    }
    dataset = {"channel_names": {str(c): "CT" if norm == "CTNormalization" else "image" for c in range(n_in)},
               "labels": {name: i for i, name in enumerate(config.class_names)},
               "numTraining": 0, "file_ending": ".nii.gz"}
    return plans, dataset


def nnunet_predictor(network, *, tta: bool = False, step: float = 0.5, device="cpu"):
    """An nnUNetPredictor running `network` (an STUNet with `.config`, deep supervision off)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset = plans_and_dataset(network.config)
    manager = PlansManager(plans)
    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=torch.device(device).type == "cuda",
                                device=torch.device(device), verbose=False, verbose_preprocessing=False,
                                allow_tqdm=False)
    network.eval()
    predictor.manual_initialization(network, manager, manager.get_configuration("3d_fullres"),
                                    [network.state_dict()], dataset, "nnUNetTrainer",
                                    tuple(network.config.plan.mirror_axes))
    return predictor


def nnunet_segment(predictor, image, spacing_zyx):
    """nnU-Net's labels for an image (C, z, y, x) with spacing (z, y, x), in process (no workers)."""
    return predictor.predict_single_npy_array(image.astype("float32"), {"spacing": list(spacing_zyx)})
