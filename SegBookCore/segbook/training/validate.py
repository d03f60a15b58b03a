"""Validation on held-out cases with the real sliding-window predictor (`segbook.inference.Predictor`).

The network is copied without deep supervision into a fresh STU-Net carrying the model's config, so
prediction runs exactly as `segbook predict` would run on the saved model folder.
"""
from __future__ import annotations

import logging

import numpy as np

from ..config import ModelConfig
from ..dataset import Case, read_case_arrays
from ..metrics import evaluate_case, mean_defined
from ..network import STUNet

__all__ = ["inference_copy", "validate", "predict_cases", "summarise"]

log = logging.getLogger(__name__)


def inference_copy(state: dict, config: ModelConfig, device="cpu") -> STUNet:
    a = config.arch
    net = STUNet(a.input_channels, a.num_classes, a.dims, a.depth, a.pool_op_kernel_sizes, deep_supervision=False)
    net.load_state_dict(state)
    net.config = config
    return net.to(device).eval()


def validate(state: dict, config: ModelConfig, cases: list[Case], device="cpu", reporter=None,
             tta: bool = False, ignore_label: int | None = None) -> dict:
    """Mean and per-case Dice/NSD of each foreground class over `cases` (image files + label files).

    `tta`: the predictor's mirroring test-time augmentation (off during training, as nnU-Net's).
    `ignore_label`: the labels' value of unannotated voxels, scored nowhere (see segbook.metrics).
    Returns {"dice": {class_name: mean}, "nsd": {...}, "mean_dice": float, "cases": {name: {...}}}.
    """
    return summarise(predict_cases(state, config, cases, device, reporter, tta, ignore_label), config)


def predict_cases(state: dict, config: ModelConfig, cases: list[Case], device="cpu", reporter=None,
                  tta: bool = False, ignore_label: int | None = None) -> dict:
    """{case name: {class name: {"dice": d, "nsd": n}}} for `cases` (a rank's share under DDP)."""
    if not cases:
        return {}
    from ..inference import Predictor  # imported here so training works without the predictor loaded
    predictor = Predictor(inference_copy(state, config, device), device=device, tta=tta)
    classes = list(range(1, len(config.class_names)))
    per_case = {}
    for i, case in enumerate(cases):
        image, ref, spacing = read_case_arrays(case)
        pred = predictor.predict_array(image, spacing)
        scores = evaluate_case(np.asarray(pred), ref, classes, spacing, ignore_label=ignore_label)
        per_case[case.name] = {config.class_names[c]: v for c, v in scores.items()}
        if reporter is not None:
            reporter.progress("validate", i + 1, len(cases))
    return per_case


def summarise(per_case: dict, config: ModelConfig) -> dict:
    """validate()'s result from predict_cases() output (merged over ranks)."""
    names = config.class_names[1:]
    mean = {m: {n: mean_defined([per_case[k][n][m] for k in per_case]) for n in names} for m in ("dice", "nsd")}
    return {**mean, "mean_dice": float(np.mean(list(mean["dice"].values()))), "cases": per_case}

