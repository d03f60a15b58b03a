"""Build the network to fine-tune from a base model: transfer weights, new heads, more input channels.

- All base weights are loaded except the segmentation heads (`seg_outputs.*`), which are initialised
  afresh (He, as nnU-Net) for the dataset's classes; when the base already has exactly these classes
  (continuing from one's own fine-tuned model) its heads are kept.
- For a dataset with C > 1 input channels and a one-channel base, the first layer's weights (the 3x3x3
  conv and the 1x1 projection of the first block) are repeated over the C channels.
- Pools come from the data's plan: they set strides and upsampling factors, not parameter shapes, so the
  base's weights load under any plan.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..config import Arch, ModelConfig
from ..network import STUNet
from ..prompts import PromptSpec, extend_input
from ..zoo import WEIGHTS, fetch, get_config

__all__ = ["he_init", "build_network", "transfer_weights", "fetch_base", "FIRST_LAYER_KEYS"]

log = logging.getLogger(__name__)

FIRST_LAYER_KEYS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")
HEAD_PREFIX = "seg_outputs."


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He: Kaiming normal for convolutions (LeakyReLU slope 0.01), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def transfer_weights(net: STUNet, base_state: dict[str, torch.Tensor], keep_heads: bool) -> list[str]:
    """Load `base_state` into `net` (already He-initialised), adapting the first layer to the channel count.

    Returns the keys left at their fresh initialisation (the heads, unless kept).
    """
    own = net.state_dict()
    fresh = []
    new_state = {}
    for key, value in own.items():
        if key.startswith(HEAD_PREFIX) and not keep_heads:
            fresh.append(key)
            continue
        if key not in base_state:
            raise ValueError(f"base model has no weight '{key}' (another network size?)")
        theirs = base_state[key].to(value.dtype)
        if key in FIRST_LAYER_KEYS and theirs.shape[1] != value.shape[1]:
            if theirs.shape[1] != 1:
                raise ValueError(f"base model takes {theirs.shape[1]} channels; cannot adapt to {value.shape[1]}")
            theirs = theirs.repeat(1, value.shape[1], *[1] * (theirs.ndim - 2))
        if theirs.shape != value.shape:
            raise ValueError(f"base weight '{key}' has shape {tuple(theirs.shape)}, expected {tuple(value.shape)}")
        new_state[key] = theirs
    for key in fresh:
        new_state[key] = own[key]
    net.load_state_dict(new_state)
    return fresh


def fetch_base(base: str, d) -> None:
    """Download and convert a registry base into the shared cache once: rank 0 first, the other ranks
    after it succeeded (they then only read the folder), so no rank replaces the folder another loads."""
    d.main_first(lambda: fetch(str(base)), f"getting the base model {base}")


def build_network(base: str, class_names: list[str], input_channels: int, pools: list[list[int]], *,
                  scratch: bool = False, width: float = 1.0, prompts: bool = False, checkpoint=None,
                  weights: dict | None = None) -> tuple[STUNet, ModelConfig, dict]:
    """(network with deep supervision on, the base's ModelConfig, a provenance dict).

    `base`: a registry name or a model folder. `scratch`: random (He) init instead of the base's weights;
    `width` then scales the base's channel counts (an honest "narrower" preset, e.g. 0.5). `prompts`: the
    network takes prompt channels after the image's (segbook.prompts); a base without them gets them with
    zero weights, so that training starts from exactly what the base computes. A base that takes prompts
    keeps them. `checkpoint`: the base's weights from this file (released format ok) instead of its folder;
    `weights`: that file's state dict when the caller has read it already.
    `net.prompts` is the PromptSpec dict for model.json, or None.
    """
    base_config = get_config(base)
    spec = base_config.prompts if base_config.prompts and not scratch else (
        dataclasses.asdict(PromptSpec()) if prompts else None)
    extra = len(spec["channels"]) if spec else 0
    inherited = extra if base_config.prompts and not scratch else 0     # the base's weights have them
    dims = [max(1, int(round(d * width))) for d in base_config.arch.dims]
    arch = Arch(input_channels + inherited, len(class_names), dims, list(base_config.arch.depth),
                [list(p) for p in pools])
    net = STUNet(arch.input_channels, arch.num_classes, arch.dims, arch.depth, arch.pool_op_kernel_sizes,
                 deep_supervision=True)
    he_init(net)
    info = {"base": base_config.name, "base_size": base_config.size, "width": width,
            "initialisation": "scratch (He)" if scratch else "pretrained"}
    if not scratch:
        source = Path(checkpoint) if checkpoint else fetch(str(base)) / WEIGHTS
        state = weights if weights is not None else load_checkpoint(source)
        keep = list(base_config.class_names) == list(class_names)
        try:
            fresh = transfer_weights(net, state, keep_heads=keep)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if checkpoint:
            info["checkpoint"] = str(source)
        info["heads"] = "kept (same classes as the base)" if keep else "re-initialised"
        log.info("loaded %s; %d head tensors re-initialised", base, len(fresh))
    if extra and not inherited:
        extend_input(net, extra)
        info["prompt_channels"] = "added with zero weights" if not scratch else "trained from scratch"
        arch = Arch(net.input_channels, *list(dataclasses.astuple(arch))[1:])
    net.arch, net.prompts = arch, spec
    return net, base_config, info
