"""nnU-Net's training augmentations, built from batchgeneratorsv2 (nnU-Net's own library).

The set and probabilities are nnU-Net v2's defaults: rotation (p 0.2) and scaling (p 0.2, 0.7-1.4),
Gaussian noise, Gaussian blur, brightness, contrast, low-resolution simulation, gamma (inverted and
plain), mirroring, then -1 (outside the image) -> background and the deep-supervision targets.
One deliberate difference: segmentation maps are resampled with nearest neighbour (`mode_seg="nearest"`)
instead of the library's bilinear one-hot default, which costs ~20x per sample for the same targets
within a voxel at label borders.

A sample is a dict {"image": (C, z, y, x) float32 tensor, "segmentation": (1, z', y', x') int16 tensor}
cut larger than the patch (see `enlarged_patch_size`); the spatial transform takes the centred patch.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["training_transforms", "enlarged_patch_size", "ROTATION", "SCALING"]

ROTATION = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)   # nnU-Net's 3D rotation range, radians
SCALING = (0.7, 1.4)


def enlarged_patch_size(patch_size, rotation=ROTATION, min_scale: float = 0.85) -> list[int]:
    """The box a patch may sweep under rotation about every axis and down-scaling (nnU-Net samples this
    larger region so that rotated patches do not see padding). patch_size zyx -> zyx."""
    size = np.array(patch_size, dtype=float)
    angle = min(max(abs(rotation[0]), abs(rotation[1])), math.pi / 2)
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    out = size.copy()
    for axis in range(3):
        # rotating about `axis` mixes the other two axes: |R| @ extents bounds the rotated box
        a, b = [i for i in range(3) if i != axis]
        out[a] = max(out[a], c * size[a] + s * size[b])
        out[b] = max(out[b], s * size[a] + c * size[b])
    return [int(v) for v in np.ceil(out / min_scale)]


def training_transforms(patch_size, ds_scales, mirror_axes=(0, 1, 2)):
    """The per-sample batchgeneratorsv2 pipeline; `ds_scales` from planning.deep_supervision_scales.

    Returns a callable: transform(image=..., segmentation=...) -> dict with "image" (C, *patch) float32 and
    "segmentation" a list of (1, *patch * scale) tensors, full resolution first.
    """
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    t = [
        SpatialTransform(list(patch_size), patch_center_dist_from_border=0, random_crop=False,
                         p_elastic_deform=0, p_rotation=0.2, rotation=ROTATION, p_scaling=0.2, scaling=SCALING,
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                         mode_seg="nearest", border_mode_seg="constant", padding_value_seg=-1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ]
    if mirror_axes:
        t.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    t.append(RemoveLabelTansform(-1, 0))
    t.append(DownsampleSegForDSTransform(ds_scales=[list(s) for s in ds_scales]))
    return ComposeTransforms(t)
