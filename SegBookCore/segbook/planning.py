"""Plan a fine-tune from the data: target spacing, patch size and STU-Net pools (nnU-Net's rules).

All per-axis values are in SimpleITK array order (z, y, x). STU-Net keeps its six stages (five pools);
where an axis is too short to be halved five times its later pools are 1 along that axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DataPlan", "plan_from_data", "pools_for_patch", "deep_supervision_scales"]

NUM_POOLS = 5
MIN_FEATURE = 4          # nnU-Net: never pool an axis below 4 voxels
ANISOTROPY = 3.0         # nnU-Net: an axis this much coarser than the finest is "low resolution"


@dataclass
class DataPlan:
    spacing: list[float]
    patch_size: list[int]
    pool_op_kernel_sizes: list[list[int]]
    median_shape: list[int]


def target_spacing(spacings: np.ndarray) -> list[float]:
    """Median spacing; a much coarser axis takes the 10th percentile instead (nnU-Net's rule).

    spacings: (n_cases, 3) zyx mm.
    """
    spacings = np.asarray(spacings, dtype=float)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > ANISOTROPY * max(target[others]):
        # a coarse axis: a finer target keeps more of the data's detail (nnU-Net uses the 10th percentile,
        # but not finer than 3x the in-plane resolution)
        target[worst] = max(np.percentile(spacings[:, worst], 10), max(target[others]) * ANISOTROPY * 0.999)
    return [float(s) for s in target]


def pools_for_patch(patch: list[int], spacing: list[float], num_pools: int = NUM_POOLS) -> list[list[int]]:
    """Per stage, pool by 2 along an axis while it stays >= MIN_FEATURE voxels and is not much coarser
    than the finest axis (nnU-Net: anisotropic axes are pooled only once the others caught up)."""
    size, sp, pools = [float(p) for p in patch], [float(s) for s in spacing], []
    for _ in range(num_pools):
        finest = min(sp)
        pool = [2 if size[a] / 2 >= MIN_FEATURE and sp[a] <= 2 * finest else 1 for a in range(3)]
        pools.append(pool)
        size = [s / p for s, p in zip(size, pool)]
        sp = [s * p for s, p in zip(sp, pool)]
    return pools


def _round_to_pools(patch: list[int], spacing: list[float]) -> tuple[list[int], list[list[int]]]:
    pools = pools_for_patch(patch, spacing)
    divisor = np.prod(np.array(pools), axis=0)
    return [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor)], pools


def plan_from_data(spacings, shapes, max_voxels: int = 128 ** 3) -> DataPlan:
    """Fit patch and pools to the median shape at the target spacing within a voxel budget.

    spacings, shapes: (n_cases, 3) zyx, shapes after cropping to non-zero. `max_voxels` is the memory
    budget per patch (the released STU-Nets train 128^3). The patch starts at the median shape and the
    axis that is largest relative to the median shape shrinks until the budget holds; then each axis is
    rounded up to a multiple of its pooling product.
    """
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    target = target_spacing(spacings)
    resampled = shapes * spacings / np.array(target)
    median = np.median(resampled, axis=0)
    patch = [max(int(round(m)), 8) for m in median]
    rounded, pools = _round_to_pools(patch, target)
    while np.prod(rounded) > max_voxels:
        # shrink the axis with the largest extent in mm, as nnU-Net shrinks towards an isotropic patch
        axis = int(np.argmax(np.array(rounded) * np.array(target)))
        divisor = int(np.prod([p[axis] for p in pools]))
        patch[axis] = max(rounded[axis] - divisor, 8)
        rounded, pools = _round_to_pools(patch, target)
    return DataPlan(target, rounded, pools, [int(round(m)) for m in median])


def deep_supervision_scales(pools: list[list[int]]) -> list[list[float]]:
    """The relative resolution of each deep-supervision output, full resolution first (zyx).

    Output k of STU-Net sits at the resolution of encoder stage k, i.e. 1 / prod(pools[:k]).
    """
    scales, current = [], np.ones(3)
    for k in range(len(pools)):
        scales.append([float(1 / c) for c in current])
        current = current * np.array(pools[k])
    return scales
