"""Prompts as network input: how a model trained with clicks sees them.

A prompt-taking model has `len(CHANNELS)` input channels after the image's: positive points, negative
points (each a ball of `radius` voxels at the plan spacing, value 1), the box (1 inside), and the previous
segmentation of the prompted structure (1 inside). With no prompt every extra channel is 0, and because a
model's new input weights start at zero (`extend_input`), a base model extended this way computes exactly
what it computed before. All arrays are in the network's (z, y, x) grid; points are (z, y, x) voxel
coordinates in that grid (floats allowed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["CHANNELS", "PromptSpec", "Prompts", "balls", "encode", "extend_input"]

CHANNELS = ("positive", "negative", "box", "previous")


@dataclass
class PromptSpec:
    """What `model.json` records under "prompts" for a model that takes them."""
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    radius: float = 2.0          # ball radius of a point, in voxels of the plan spacing

    def __post_init__(self):
        if list(self.channels) != list(CHANNELS):
            raise ValueError(f"prompt channels {self.channels}: this version encodes {list(CHANNELS)}")


@dataclass
class Prompts:
    """One request's prompts for one structure, in some (z, y, x) voxel grid.

    points / negative_points: lists of (z, y, x); box: (z0, y0, x0, z1, y1, x1), end exclusive, or None;
    previous: a boolean (z, y, x) array of the structure as it is now, or None.
    """
    points: list = field(default_factory=list)
    negative_points: list = field(default_factory=list)
    box: tuple | None = None
    previous: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.points and not self.negative_points and self.box is None and self.previous is None


def balls(out: np.ndarray, origin, points, radius: float) -> None:
    """Set to 1 the voxels of `out` (a window whose first voxel is at `origin`) within `radius` of a point."""
    r = int(np.ceil(radius))
    for p in points:
        c = np.asarray(p, dtype=float) - origin
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, out.shape)
        if np.any(hi <= lo):
            continue
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        d2 = sum((g - ci) ** 2 for g, ci in zip(grid, c))
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] |= d2 <= radius ** 2


def encode(prompts: Prompts, origin, shape, radius: float) -> np.ndarray:
    """(len(CHANNELS), *shape) float32 prompt channels of the window `shape` starting at `origin` (z, y, x)
    of the grid the prompts are in; `prompts.previous`, if any, covers that whole grid."""
    origin = np.asarray(origin, dtype=int)
    out = np.zeros((len(CHANNELS), *shape), dtype=bool)
    balls(out[0], origin, prompts.points, radius)
    balls(out[1], origin, prompts.negative_points, radius)
    if prompts.box is not None:
        lo = np.clip(np.asarray(prompts.box[:3]) - origin, 0, shape)
        hi = np.clip(np.asarray(prompts.box[3:]) - origin, 0, shape)
        out[2][tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = True
    if prompts.previous is not None:
        window = tuple(slice(int(o), int(o) + s) for o, s in zip(origin, shape))
        part = prompts.previous[window]
        out[3][tuple(slice(0, s) for s in part.shape)] = part
    return out.astype(np.float32)


def extend_input(net: nn.Module, extra: int) -> None:
    """Give STU-Net `extra` more input channels, their weights zero: the output is unchanged while they are 0.

    The stem block reads the input in two places (its 3x3x3 convolution and its 1x1x1 shortcut); both grow.
    """
    block = net.conv_blocks_context[0][0]
    for name in ("conv1", "conv3"):
        old = getattr(block, name)
        new = nn.Conv3d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :old.in_channels] = old.weight
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(block, name, new)
    net.input_channels += extra
