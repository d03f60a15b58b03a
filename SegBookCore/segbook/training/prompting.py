"""Training with simulated prompts (`segbook finetune --prompts`).

Each batch from the loader gets the prompt channels (segbook.prompts) after its image channels. A batch
position is prompted with probability PROMPTED (else its prompt channels stay 0 and it trains the automatic
segmentation, so one model does both). A prompted sample picks one structure c present in its patch and
trains a binary target for it: the probability of c against all other classes together (the softmax of c's
logit vs the log-sum-exp of the others: what `segbook.interactive` thresholds at one half), with Dice + CE
over the deep-supervision outputs as the rest of the recipe, plus a cross-entropy over the voxels near its
clicks (FOCUS_RADIUS, weight FOCUS_WEIGHT). Its prompts, as the interactive literature
simulates a user (segbook.clicks):

- it starts either from nothing, with a positive click at a random voxel of c deep inside it (at least half
  as far from c's boundary as its deepest voxel), or from the model's own automatic segmentation of c as the
  previous result, with a click on its largest error (a user correcting a Segment result);
- a box around c (jittered by a few voxels) is given with probability BOX;
- then 0 to MAX_ROUNDS rounds with the model in the loop: the model predicts c from the prompts so far, that
  prediction becomes the previous result and the simulated user clicks its largest error.

Voxels of the "ignore" label are neither target nor error for a click. Which positions are prompted and how
many rounds run is drawn from (seed, iteration) alone, the same on every rank: the losses' collective sums
(batch Dice under DDP) then run in the same order everywhere.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..clicks import next_click
from ..prompts import CHANNELS, PromptSpec, Prompts, balls, encode

__all__ = ["PROMPTED", "BOX", "MAX_ROUNDS", "PROMPT_LR_FACTOR", "FOCUS_RADIUS", "FOCUS_WEIGHT", "PromptSimulator",
           "PromptedLoss", "class_vs_rest", "boost_prompt_weights"]

PROMPTED = 0.5       # share of batch positions with prompts; the rest train the automatic segmentation
FROM_AUTOMATIC = 0.5  # of those, the share that starts from the model's automatic result
BOX = 0.2
MAX_ROUNDS = 2


# The prompt channels' input weights start at zero beside weights trained for years of GPU time: at the
# recipe's learning rate they stayed ~300x smaller than the image's after 400 steps and the clicks changed
# nothing (measured on hippocampus-demo). Their gradient is scaled by this factor (a learning rate of their
# own, as new layers get in fine-tuning); the rest of the network trains as before.
PROMPT_LR_FACTOR = 50.0

# What a click asks is local: the error part it lies in is ~100 voxels of a ~90,000-voxel patch (hippocampus),
# so whether the network followed it is a small share of the patch's Dice + CE. Trained on that alone, the
# network's own gain from 5 clicks stopped growing at +0.005 (hippocampus-demo, 5,500 -> 9,500 steps).
# A prompted sample's loss also gets the cross-entropy over the voxels within FOCUS_RADIUS (voxels) of its
# clicks, their mean, times FOCUS_WEIGHT: what the click says there, weighed as much as the whole patch.
# With it the same 5,500 steps gave +0.0097 after 5 clicks against +0.0064 (benchmarks/RESULTS.md).
FOCUS_RADIUS = 6.0
FOCUS_WEIGHT = 1.0


def boost_prompt_weights(net: nn.Module, image_channels: int, factor: float = PROMPT_LR_FACTOR) -> None:
    """Scale the gradient of the stem's prompt-channel weights (input channels from `image_channels` on)."""
    block = net.conv_blocks_context[0][0]
    scale = torch.ones(block.conv1.in_channels)
    scale[image_channels:] = factor
    for conv in (block.conv1, block.conv3):
        s = scale.to(conv.weight.device)[None, :, None, None, None]
        conv.weight.register_hook(lambda g, s=s: g * s.to(g.dtype))


def class_vs_rest(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) logits and (B,) classes -> (B, 2, ...) logits [log-sum-exp of the other classes, class]."""
    k = logits.shape[1]
    onehot = nn.functional.one_hot(classes, k).bool()[(..., *[None] * (logits.ndim - 2))]   # (B, K, 1, ...)
    own = (logits * onehot).sum(1, keepdim=True)
    rest = torch.logsumexp(logits.masked_fill(onehot, float("-inf")), dim=1, keepdim=True)
    return torch.cat([rest, own], dim=1)


def _binary_target(target: torch.Tensor, classes: torch.Tensor, ignore_label: int | None) -> torch.Tensor:
    """(B, 1, ...) labels -> 1 on the class, 0 elsewhere, 2 where the label is "ignore"."""
    out = (target == classes[(..., *[None] * (target.ndim - 1))]).long()
    if ignore_label is not None:
        out[target == ignore_label] = 2
    return out


def _focused_ce(two: torch.Tensor, binary: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of (P, 2, ...) logits against (P, ...) targets (2: ignored) over the focus
    voxels; 0 when there are none."""
    ce = nn.functional.cross_entropy(two.float(), binary.clamp(max=1), reduction="none")
    weight = (focus & (binary != 2)).to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp(min=1)


class PromptedLoss(nn.Module):
    """The recipe's deep-supervision loss on the automatic positions and on the prompted ones (class vs rest),
    weighted by their share of the batch; with `focus` (B, *patch) boolean, the prompted positions' share
    also gets FOCUS_WEIGHT x the full-resolution cross-entropy (class vs rest) over their focus voxels."""

    def __init__(self, make_loss, ignore_label: int | None):
        super().__init__()
        self.automatic, self.binary = make_loss(ignore_label), make_loss(2)
        self.ignore_label = ignore_label

    def forward(self, outputs, targets, classes: torch.Tensor, focus: torch.Tensor | None = None) -> torch.Tensor:
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        prompted = classes > 0
        n, total = len(classes), 0.0
        if (~prompted).any():
            a = ~prompted
            total = total + int(a.sum()) / n * self.automatic([o[a] for o in outputs], [t[a] for t in targets])
        if prompted.any():
            c = classes[prompted]
            two = [class_vs_rest(o[prompted], c) for o in outputs]
            binary = [_binary_target(t[prompted], c, self.ignore_label) for t in targets]
            loss = self.binary(two, binary)
            if focus is not None:
                loss = loss + FOCUS_WEIGHT * _focused_ce(two[0], binary[0][:, 0], focus[prompted])
            total = total + int(prompted.sum()) / n * loss
        return total


class PromptSimulator:
    """Adds prompt channels and the prompted class to loader batches; `spec` is the model's PromptSpec."""

    def __init__(self, spec: PromptSpec, seed: int, ignore_label: int | None = None):
        self.spec, self.seed, self.ignore_label = spec, seed, ignore_label

    def __call__(self, net: nn.Module, batch: dict, iteration: int) -> dict:
        """batch {"image": (B, C, *patch), "target": [(B, 1, ...), ...]} -> the same with (B, C + 4, *patch)
        images, "prompt_class" (B,) (0: not prompted) and "prompt_focus" (B, *patch), the voxels within
        FOCUS_RADIUS of a sample's clicks. `net` (not DDP-wrapped) runs without gradients for the rounds in
        the loop."""
        rng = np.random.default_rng([self.seed, int(iteration)])
        image, full = batch["image"], batch["target"][0][:, 0].numpy()
        b, shape = image.shape[0], tuple(image.shape[2:])
        prompted = rng.random(b) < PROMPTED
        starts_auto = rng.random(b) < FROM_AUTOMATIC
        boxed = rng.random(b) < BOX
        rounds = int(rng.integers(0, MAX_ROUNDS + 1))
        classes = np.zeros(b, dtype=np.int64)
        state = {}
        for i in np.nonzero(prompted)[0]:
            present = [int(v) for v in np.unique(full[i]) if v > 0 and v != self.ignore_label]
            classes[i] = present[rng.integers(len(present))] if present else 1 + rng.integers(self._classes(net) - 1)
            if present:
                state[i] = Prompts()
        channels = torch.zeros((b, len(CHANNELS), *shape), dtype=image.dtype)
        if state:
            auto = [i for i in state if starts_auto[i]]
            if auto:
                preds = self._predict(net, image, channels, auto, classes)
                for i, p in zip(auto, preds):
                    state[i].previous = p
            for i, p in state.items():
                target, known = self._target(full[i], classes[i])
                if p.previous is None:
                    p.points.append(self._deep_voxel(target, rng))
                else:
                    self._click(p, target, known)
                if boxed[i]:
                    lo = np.argwhere(target).min(0) - rng.integers(0, 4, 3)
                    hi = np.argwhere(target).max(0) + 1 + rng.integers(0, 4, 3)
                    p.box = tuple(np.clip(lo, 0, shape)) + tuple(np.clip(hi, 0, shape))
            for _ in range(rounds):
                self._encode(channels, state)
                ids = list(state)
                for i, pred in zip(ids, self._predict(net, image, channels, ids, classes)):
                    state[i].previous = pred
                    self._click(state[i], *self._target(full[i], classes[i]))
            self._encode(channels, state)
        focus = np.zeros((b, *shape), dtype=bool)
        for i, p in state.items():
            balls(focus[i], (0, 0, 0), p.points + p.negative_points, FOCUS_RADIUS)
        return {**batch, "image": torch.cat([image, channels], dim=1),
                "prompt_class": torch.from_numpy(classes), "prompt_focus": torch.from_numpy(focus)}

    @staticmethod
    def _classes(net) -> int:
        return int(getattr(net, "num_classes", 2))

    def _target(self, labels: np.ndarray, c: int):
        """(c's voxels, the annotated voxels)."""
        known = labels != self.ignore_label if self.ignore_label is not None else np.ones_like(labels, bool)
        return labels == c, known

    @staticmethod
    def _click(p: Prompts, target: np.ndarray, known: np.ndarray) -> None:
        prediction = np.where(known, p.previous, target)     # no error where nothing is known
        click = next_click(target, prediction)
        if click is not None:
            (p.points if click[1] else p.negative_points).append(click[0])

    @staticmethod
    def _deep_voxel(target: np.ndarray, rng) -> tuple[int, int, int]:
        dist = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1, 1:-1]
        deep = np.argwhere(dist >= 0.5 * dist.max())
        return tuple(int(v) for v in deep[rng.integers(len(deep))])

    def _encode(self, channels: torch.Tensor, state: dict) -> None:
        shape = tuple(channels.shape[2:])
        for i, p in state.items():
            channels[i] = torch.from_numpy(encode(p, (0, 0, 0), shape, self.spec.radius))

    @staticmethod
    @torch.no_grad()
    def _predict(net, image, channels, ids, classes) -> list[np.ndarray]:
        """The model's mask of each sample's class (p > 1/2 against the rest) from its current prompts."""
        device = next(net.parameters()).device
        x = torch.cat([image[ids], channels[ids]], dim=1).to(device)
        out = net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        two = class_vs_rest(out.float(), torch.as_tensor(classes[ids], device=device))
        return list((two[:, 1] > two[:, 0]).cpu().numpy())
