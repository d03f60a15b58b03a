"""A faster CPU layout of an STU-Net for inference: channels-last 3D with layers that stay channels-last.

PyTorch's CPU InstanceNorm3d turns a channels-last tensor back into a contiguous one (two full copies per
norm) and 1x1x1 convolutions fall to a slow generic kernel; on a 128^3 tile of STU-Net-S those cost about
as much as all the 3x3x3 convolutions. In channels-last memory a (1, C, z, y, x) tensor is a (z*y*x, C)
matrix, so both become plain matrix operations there. The results equal the original layers up to float
rounding (the tests pin the network's logits). Only used on networks the Predictor owns; training code
never sees these modules.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["optimize_for_cpu", "ChannelsLastInstanceNorm3d", "PointwiseConv3d"]

log = logging.getLogger(__name__)


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """The (z*y*x, C) matrix view of a channels-last (1, C, z, y, x) tensor, or None if it is not one."""
    if x.dim() != 5 or x.shape[0] != 1 or not x.is_contiguous(memory_format=torch.channels_last_3d):
        return None
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


class ChannelsLastInstanceNorm3d(nn.Module):
    """InstanceNorm3d(affine=True) (biased variance, eps inside the sqrt) computed in channels-last memory."""

    def __init__(self, norm: nn.InstanceNorm3d):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.fallback = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows is None:
            return self.fallback(x)
        var, mean = torch.var_mean(rows, dim=0, correction=0)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        out = torch.addcmul(shift, rows, scale)             # rows * scale + shift, one pass
        return out.view(1, *x.shape[2:], x.shape[1]).permute(0, 4, 1, 2, 3)


class PointwiseConv3d(nn.Module):
    """A 1x1x1 Conv3d (any stride) as a matrix product over the channels-last rows."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.stride = tuple(conv.stride)
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels).clone(),
                                   requires_grad=False)
        self.bias = conv.bias
        self.fallback = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.stride):
            x = x[:, :, ::self.stride[0], ::self.stride[1], ::self.stride[2]]
            x = x.contiguous(memory_format=torch.channels_last_3d)
        rows = _rows(x)
        if rows is None:
            return self.fallback(x)
        out = F.linear(rows, self.weight, self.bias)
        return out.view(1, *x.shape[2:], out.shape[1]).permute(0, 4, 1, 2, 3)


def optimize_for_cpu(net: nn.Module, inplace: bool = False) -> nn.Module:
    """The network in channels-last layout with the layers above swapped in (a copy unless `inplace`)."""
    if not inplace:
        net = copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.InstanceNorm3d) and child.affine and not child.track_running_stats:
                setattr(parent, name, ChannelsLastInstanceNorm3d(child))
            elif (isinstance(child, nn.Conv3d) and tuple(child.kernel_size) == (1, 1, 1) and child.groups == 1
                  and tuple(child.padding) == (0, 0, 0) and tuple(child.dilation) == (1, 1, 1)):
                setattr(parent, name, PointwiseConv3d(child))
    return net.to(memory_format=torch.channels_last_3d)
