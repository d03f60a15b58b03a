"""Dice + cross-entropy with deep supervision, as nnU-Net v2 trains (and STU-Net's fine-tune recipe).

For logits x (B, K, z, y, x) and a target map t (B, 1, z, y, x) of values 0..K-1:

    CE   = mean over voxels of -log softmax(x)[t]
    Dice = -mean over foreground classes k of (2 * sum(p_k * g_k) + s) / max(sum(p_k) + sum(g_k) + s, 1e-8)

with p = softmax(x), g = one-hot(t) (never materialised), s = 1e-5, sums over the batch and all voxels ("batch Dice", nnU-Net's
3d_fullres default), background excluded. Loss = CE + Dice per output. Deep-supervision output i (full
resolution first) weighs 1/2^i, the lowest-resolution output 0, weights normalised to sum 1.

Sparse annotation (nnU-Net v2's "ignore" label): voxels whose target is `ignore_label` are masked out of
both terms. CE is the mean over the annotated voxels only (0 when a batch holds none); in the Dice their
probabilities enter neither the intersection nor the predicted volume and they count in no class's volume.
So the loss and its gradients do not depend on the logits at ignored voxels (the gradient there is 0).

Under DistributedDataParallel the batch is the union of all ranks' patches: the Dice sums are added up
over ranks (an all-reduce that passes gradients), as nnU-Net's DDP trainer does, so 2 ranks x batch 1
train the same loss as 1 process x batch 2.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["soft_dice_loss", "DiceCELoss", "deep_supervision_weights", "DeepSupervisionLoss"]

SMOOTH = 1e-5


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool = True,
                   ignore_label: int | None = None) -> torch.Tensor:
    """logits (B, K, *spatial), target (B, 1, *spatial) int64 -> scalar: minus the mean foreground soft Dice.

    No one-hot is built: sum(p_k * g_k) is the sum of p_t over the voxels of class k (a gather of the
    true class's probability, added up per class), sum(g_k) a count of the target's values. Sums are in
    the logits' dtype (DiceCELoss hands float32). Voxels of `ignore_label` count nowhere (module docstring)."""
    probs = torch.softmax(logits, dim=1)
    b, k = probs.shape[:2]
    index = target.long().reshape(b, -1)                                            # (B, N)
    probs = probs.reshape(b, k, -1)
    if ignore_label is None:
        offsets = torch.arange(b, device=index.device)[:, None] * k
        gt = torch.bincount((index + offsets).reshape(-1), minlength=b * k).reshape(b, k).to(probs.dtype)
    else:
        annotated = index != ignore_label                                          # (B, N)
        index = torch.where(annotated, index, torch.zeros_like(index))
        # where(), not a product: the ignored voxels' probabilities are replaced, so nothing of them (not
        # even an inf or NaN) reaches the sums, and their gradient is exactly 0
        probs = torch.where(annotated[:, None], probs, torch.zeros_like(probs))
        gt = probs.new_zeros(b, k).scatter_add_(1, index, annotated.to(probs.dtype))
    picked = probs.gather(1, index[:, None]).squeeze(1)                           # (B, N): p of the true class
    intersect = probs.new_zeros(b, k).scatter_add_(1, index, picked)
    pred = probs.sum(2)
    if batch_dice:
        intersect, pred, gt = intersect.sum(0), pred.sum(0), gt.sum(0)
    # background (channel 0) does not enter the Dice: it would dominate and say nothing about the structures
    intersect, denominator = intersect[..., 1:], pred[..., 1:] + gt[..., 1:]
    if batch_dice and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # the backward all-reduces the gradients too: each rank gets W x dLoss/d(its patches), and DDP's
        # 1/W averaging turns that into the gradient of the global batch Dice
        from torch.distributed.nn.functional import all_reduce   # here: builds without distributed lack it
        intersect, denominator = all_reduce(torch.stack([intersect, denominator])).unbind(0)
    dice = (2 * intersect + SMOOTH) / torch.clamp(denominator + SMOOTH, min=1e-8)
    return -dice.mean()


class DiceCELoss(nn.Module):
    """CE (on the target's indices) + soft Dice. float16 logits (autocast) are cast to float32 once: the
    softmax and the log-softmax of CE need the range, and both read that one copy."""

    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True,
                 ignore_label: int | None = None):
        super().__init__()
        self.weight_ce, self.weight_dice, self.batch_dice = weight_ce, weight_dice, batch_dice
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        labels = target[:, 0].long()
        if self.ignore_label is None:
            ce = nn.functional.cross_entropy(logits, labels)
        else:
            # the mean over annotated voxels; a patch without any is 0 (cross_entropy's mean would be 0/0)
            ce = nn.functional.cross_entropy(logits, labels, ignore_index=self.ignore_label, reduction="sum")
            ce = ce / (labels != self.ignore_label).sum().clamp(min=1)
        dice = soft_dice_loss(logits, target, self.batch_dice, self.ignore_label)
        return self.weight_ce * ce + self.weight_dice * dice


def deep_supervision_weights(n: int) -> list[float]:
    """1/2^i for output i, the last (coarsest) 0, normalised: n=5 -> [8/15, 4/15, 2/15, 1/15, 0]."""
    w = [1 / 2 ** i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of DiceCELoss over (outputs, targets), full resolution first.

    The zero-weighted output still enters the graph (times 0) so that DistributedDataParallel sees a
    gradient for every parameter and needs no unused-parameter search.
    """

    def __init__(self, n_outputs: int, batch_dice: bool = True, ignore_label: int | None = None):
        super().__init__()
        self.weights = deep_supervision_weights(n_outputs)
        self.loss = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)

    def forward(self, outputs, targets) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):  # deep supervision off: the full-resolution output alone
            return self.loss(outputs, targets[0] if isinstance(targets, (list, tuple)) else targets)
        return sum(w * self.loss(o, t) for w, o, t in zip(self.weights, outputs, targets))
