"""The simulated user of the interactive-segmentation literature (for training with prompts and for
benchmarks).

The first click is positive, at the voxel of the target farthest from its boundary. Each next click goes in
the larger of the false-negative and false-positive regions, in its largest connected part, at the voxel of
that part farthest from the part's boundary (distances in mm): positive for a miss, negative for an excess.
Arrays are (z, y, x); the image border counts as boundary.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["next_click", "dice"]


def _deepest(region: np.ndarray, spacing) -> tuple[int, int, int]:
    """The voxel of the largest connected part of `region` farthest from that part's boundary (the first
    such voxel in array order on ties)."""
    parts, n = ndimage.label(region)
    if n > 1:
        sizes = np.bincount(parts.ravel())[1:]
        region = parts == int(np.argmax(sizes)) + 1
    lo = [int(np.nonzero(region.any(axis=tuple(b for b in range(3) if b != a)))[0][0]) for a in range(3)]
    hi = [int(np.nonzero(region.any(axis=tuple(b for b in range(3) if b != a)))[0][-1]) + 1 for a in range(3)]
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    # padded with background so that the image border is boundary too
    dist = ndimage.distance_transform_edt(np.pad(region[window], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    at = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(a + l) for a, l in zip(at, lo))


def next_click(target: np.ndarray, prediction: np.ndarray | None, spacing=(1.0, 1.0, 1.0)):
    """The next click for `target` given the current `prediction` (boolean arrays, or None before the first
    click): ((z, y, x), positive) or None when the prediction is exact."""
    target = np.asarray(target, dtype=bool)
    if not target.any():
        raise ValueError("the target is empty: nothing to click")
    prediction = np.zeros_like(target) if prediction is None else np.asarray(prediction, dtype=bool)
    missed, excess = target & ~prediction, prediction & ~target
    n_missed, n_excess = int(missed.sum()), int(excess.sum())
    if n_missed == n_excess == 0:
        return None
    if n_missed >= n_excess:
        return _deepest(missed, spacing), True
    return _deepest(excess, spacing), False


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays; 1 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
