"""STU-Net, module for module as the official network (uni-medical/STU-Net, nnU-Net v1 code base).

Parameter names and shapes match the released checkpoints key for key, so their state dicts load
without renaming. Tensors are (batch, channel, z, y, x) in SimpleITK's array order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["STUNet", "STUNET_SIZES", "build_stunet"]

# The four released sizes (Huang et al., "STU-Net", 2023). Pools and kernels come from the plan.
STUNET_SIZES: dict[str, dict] = {
    "S": {"dims": [16, 32, 64, 128, 256, 256], "depth": [1, 1, 1, 1, 1, 1]},
    "B": {"dims": [32, 64, 128, 256, 512, 512], "depth": [1, 1, 1, 1, 1, 1]},
    "L": {"dims": [64, 128, 256, 512, 1024, 1024], "depth": [2, 2, 2, 2, 2, 2]},
    "H": {"dims": [96, 192, 384, 768, 1536, 1536], "depth": [3, 3, 3, 3, 3, 3]},
}

TOTALSEG_POOLS = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]]


class BasicResBlock(nn.Module):
    """conv-norm-act-conv-norm, plus a (1x1, strided) projection of the input, then act."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, padding, stride=1, use_1x1conv=False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return self.act2(y + x)


class UpsampleLayerNearest(nn.Module):
    """Nearest upsampling by the pool kernel, then a 1x1 conv (the official `Upsample_Layer_nearest`)."""

    def __init__(self, in_ch: int, out_ch: int, scale: Sequence[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(in_ch, out_ch, depth, kernel, stride=1):
    pad = [k // 2 for k in kernel]
    blocks = [BasicResBlock(in_ch, out_ch, kernel, pad, stride=stride, use_1x1conv=True)]
    blocks += [BasicResBlock(out_ch, out_ch, kernel, pad) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class STUNet(nn.Module):
    """The STU-Net encoder-decoder.

    forward(x: (B, C_in, z, y, x)) returns, with deep supervision on, a tuple of logits: full resolution
    first, then the deep-supervision heads from finer to coarser (as the official network); with it off,
    the full-resolution logits (B, num_classes, z, y, x) alone.
    """

    def __init__(self, input_channels: int, num_classes: int, dims: Sequence[int], depth: Sequence[int],
                 pool_op_kernel_sizes: Sequence[Sequence[int]], deep_supervision: bool = True,
                 conv_kernel_sizes: Sequence[Sequence[int]] | None = None):
        super().__init__()
        num_pool = len(pool_op_kernel_sizes)
        if len(dims) != num_pool + 1 or len(depth) != num_pool + 1:
            raise ValueError(f"STU-Net needs {num_pool + 1} dims and depths for {num_pool} pools, "
                             f"got dims={list(dims)} depth={list(depth)}")
        kernels = [list(k) for k in (conv_kernel_sizes or [[3, 3, 3]] * (num_pool + 1))]
        self.input_channels, self.num_classes = int(input_channels), int(num_classes)
        self.pool_op_kernel_sizes = [list(p) for p in pool_op_kernel_sizes]
        self.deep_supervision = deep_supervision

        self.conv_blocks_context = nn.ModuleList([_stage(input_channels, dims[0], depth[0], kernels[0])])
        for d in range(1, num_pool + 1):
            self.conv_blocks_context.append(
                _stage(dims[d - 1], dims[d], depth[d], kernels[d], stride=pool_op_kernel_sizes[d - 1]))
        self.upsample_layers = nn.ModuleList(
            UpsampleLayerNearest(dims[-1 - u], dims[-2 - u], pool_op_kernel_sizes[-1 - u]) for u in range(num_pool))
        self.conv_blocks_localization = nn.ModuleList(
            _stage(dims[-2 - u] * 2, dims[-2 - u], depth[-2 - u], kernels[-2 - u]) for u in range(num_pool))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(num_pool))

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        for u, (up, stage) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization)):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), dim=1))
            # Heads other than the last only matter for deep supervision: skip them at inference.
            if self.deep_supervision or u == len(self.seg_outputs) - 1:
                outputs.append(self.seg_outputs[u](x))
        if not self.deep_supervision:
            return outputs[-1]
        return tuple(outputs[::-1])


def build_stunet(size: str | None = None, *, input_channels: int = 1, num_classes: int = 105,
                 pool_op_kernel_sizes=None, dims=None, depth=None, deep_supervision: bool = True) -> STUNet:
    """A released size ("S", "B", "L", "H") or explicit dims/depth; pools default to TotalSegmentator's."""
    if size is not None:
        preset = STUNET_SIZES[size.upper()]
        dims, depth = dims or preset["dims"], depth or preset["depth"]
    if dims is None or depth is None:
        raise ValueError("give a size (S/B/L/H) or both dims and depth")
    return STUNet(input_channels, num_classes, dims, depth, pool_op_kernel_sizes or TOTALSEG_POOLS,
                  deep_supervision=deep_supervision)
