"""Sliding-window maths as small functions, placed, weighted and accumulated exactly as nnU-Net v2 does.

Shapes and positions are per spatial axis in array order (z, y, x).
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

__all__ = ["compute_steps", "tile_starts", "gaussian_weights", "padding_for_patch", "mirror_axes_sets", "accumulate",
           "apply_head", "shift_left"]


def compute_steps(image_size, patch_size, step: float) -> list[list[int]]:
    """Start index of the tiles along each axis (nnU-Net's `compute_steps_for_sliding_window`).

    The step is at most `step * patch` voxels but shrinks so that the first tile starts at 0 and the last
    one ends at the image border; `image_size` must be >= `patch_size` on every axis (pad first).
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if any(i < p for i, p in zip(image_size, patch_size)):
        raise ValueError(f"image {tuple(image_size)} smaller than the patch {tuple(patch_size)}: pad it first")
    steps = []
    for size, patch in zip(image_size, patch_size):
        n = int(np.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def tile_starts(image_size, patch_size, step: float) -> list[tuple[int, int, int]]:
    """Every tile's (z, y, x) start, in nnU-Net's order (z outermost, x innermost)."""
    return list(itertools.product(*compute_steps(image_size, patch_size, step)))


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


@lru_cache(maxsize=4)
def _gaussian64(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    impulse = np.zeros(patch_size)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    return gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)


def gaussian_weights(patch_size, sigma_scale: float = 1 / 8, value_scaling_factor: float = 10,
                     dtype=np.float16) -> np.ndarray:
    """Tile weights (nnU-Net's `compute_gaussian`): a Gaussian of sigma = patch * sigma_scale, peak
    `value_scaling_factor`, cast to `dtype`; zeros (underflow at the corners) become the smallest non-zero
    value so that no voxel ends with weight 0. nnU-Net accumulates in float16 with peak 10: the default."""
    g = _gaussian64(tuple(int(p) for p in patch_size), float(sigma_scale))
    # Cast through torch as nnU-Net does: its float64 -> float16 rounding differs from numpy's in a few voxels.
    g = torch.from_numpy(g / (g.max() / value_scaling_factor)).to(_TORCH_DTYPES[np.dtype(dtype)]).numpy()
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    return g


def padding_for_patch(shape, patch_size) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis that makes `shape` at least `patch_size`, centred as nnU-Net's
    `pad_nd_image` (the odd voxel goes after)."""
    pads = []
    for s, p in zip(shape, patch_size):
        diff = max(int(p) - int(s), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def mirror_axes_sets(axes) -> list[tuple[int, ...]]:
    """The flips of mirror TTA: the identity first, then every non-empty combination of `axes`
    (2**len(axes) in all, nnU-Net's order)."""
    axes = list(axes)
    return [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def apply_head(features: torch.Tensor, head) -> torch.Tensor:
    """(F, z, y, x) features -> (K, z, y, x) float32 logits through a 1x1x1 head (weight (K, F), bias (K))."""
    w, b = (t.to(features.device) for t in head)
    return torch.addmm(b[:, None], w, features.float().reshape(features.shape[0], -1)).view(-1, *features.shape[1:])


def accumulate(acc: torch.Tensor, pred: torch.Tensor, gauss: torch.Tensor, head=None, slices: int = 8) -> None:
    """acc (float16) += logits (float32) * gauss (float32), rounded as nnU-Net's `pred *= gauss; acc += pred`
    (float32 product, float32 sum, one rounding to float16 per element), but several times faster on
    the CPU: PyTorch's mixed-dtype in-place add is not vectorised (nnU-Net loses seconds per 128^3 tile with
    105 classes there), and a few z-slices of one class at a time (512 KB at 128^2) stay in the cache
    instead of streaming three tile-sized float32 temporaries through memory. The logits are `pred`, or
    with `head` (runners.py) the head applied to the features `pred`, one z-slice of all classes at a time
    (7 MB at 128^2 and 105 classes), so that no tile of logits is ever held."""
    if acc.device.type != "cpu":     # one kernel each on a GPU; 1,700 small ones would cost more in launches
        acc += (pred if head is None else apply_head(pred, head)) * gauss
        return
    if head is not None:
        w, b = head
        plane = pred.shape[-2:]
        logits = torch.empty((w.shape[0], plane.numel()), dtype=torch.float32)
        total = torch.empty_like(logits)
        for z in range(pred.shape[1]):
            torch.addmm(b[:, None], w, pred[:, z].reshape(pred.shape[0], -1), out=logits)
            logits.mul_(gauss[z].reshape(1, -1))
            part, t = acc[:, z], total.view(-1, *plane)
            t.copy_(part)
            part.copy_(t.add_(logits.view(-1, *plane)))
        return
    k, depth = pred.shape[:2]
    product = torch.empty((1, slices, *pred.shape[2:]), dtype=torch.float32, device=pred.device)
    total = torch.empty_like(product)
    for z in range(0, depth, slices):
        g = gauss[z:z + slices]
        n = g.shape[0]
        for c in range(k):
            part = acc[c:c + 1, z:z + n]
            p = torch.mul(pred[c:c + 1, z:z + n], g, out=product[:, :n])
            t = total[:, :n]
            t.copy_(part)
            part.copy_(t.add_(p))


def shift_left(t: torch.Tensor, n: int) -> None:
    """Move the window along z by n slices in place (z is dim -3) and zero the freed tail, copying in
    blocks of n so that no block reads what an earlier one wrote."""
    depth = t.shape[-3]
    for a in range(0, depth - n, n):
        b = min(a + n, depth - n)
        t[..., a:b, :, :] = t[..., a + n:b + n, :, :]
    t[..., depth - n:, :, :] = 0
