"""What the tiles of one click request (or, for a model without prompt input, of one image) say."""
from __future__ import annotations

import numpy as np
import torch

from .export import first_argmax

__all__ = ["Tiles"]


# Runner outputs of a model without prompt input kept for scoring a class later (the first correcting click
# of a structure, whichever was scored before): a 128^3 tile of STU-Net features is 268 MB, so only the last
# few are kept; an older tile is run again when a click corrects it.
KEPT_OUTPUTS = 2


class Tiles:
    """What the tiles computed so far say on the network grid: for each voxel, what the tile whose Gaussian
    weight is highest there (the tile it lies most inside of) says: its labels, and for the class scored
    last its `lead` (NaN where not scored): for a prompted model the log-odds of the class against all the
    others together, for any other model its logit's lead over the best other class (> 0 where the labels
    give that class)."""

    def __init__(self, grid):
        self.grid = grid
        self.origins: list[tuple[int, int, int]] = []
        self.labels = np.zeros(grid, dtype=np.int16)
        self.weight = np.zeros(grid, dtype=np.float32)
        self.owner = np.full(grid, -1, dtype=np.int16)     # which tile (index into origins) each voxel is from
        self.lead = np.full(grid, np.nan, dtype=np.float32)
        self.lead_class = None
        self._scored: set[int] = set()    # the tiles whose lead is lead_class's
        self._kept: list = []       # (tile index, runner output, head), see add

    @property
    def known(self) -> np.ndarray:
        return self.weight > 0

    def window(self, margin: int = 0) -> tuple[slice, ...]:
        """The bounding box of the tiles computed so far, grown by `margin` voxels inside the grid."""
        lo = np.min(self.origins, axis=0) - margin
        hi = np.max(self.origins, axis=0) + np.asarray(self.patch) + margin
        return tuple(slice(int(max(a, 0)), int(min(b, g))) for a, b, g in zip(lo, hi, self.grid))

    def add(self, origin, out: torch.Tensor, head, gauss: np.ndarray, value=None, prompted=False) -> None:
        """A tile's runner output `out` (logits, or features with `head`). With the class `value` known it is
        scored in the same pass over the logits. `out` is kept for `score_class`: a prompted model's when
        not scored, until the end of the request; another's, the last KEPT_OUTPUTS, for whichever class a
        later click corrects."""
        self.patch = gauss.shape
        window = tuple(slice(o, o + s) for o, s in zip(origin, gauss.shape))
        better = gauss > self.weight[window]
        labels = np.empty(gauss.shape, dtype=np.int16)
        scored = None if value is None else self._scores(value)
        for voxels, logits, axis in _logit_chunks(out, head):
            chunk = labels.reshape(-1)[voxels] = _argmax(logits, axis)
            if scored is not None:
                scored.reshape(-1)[voxels] = _score(logits, axis, value, prompted, chunk)
        self.labels[window][better] = labels[better]
        self.weight[window][better] = gauss[better]
        self.owner[window][better] = len(self.origins)
        self.lead[window][better] = np.nan       # another tile's lead no longer holds there
        self.origins.append(tuple(origin))
        if scored is not None:
            self._put(len(self.origins) - 1, scored)
            # a prompted model's class cannot change within the request; another's would only push out itself
            if prompted or sum(i not in self._scored for i, _, _ in self._kept) >= KEPT_OUTPUTS:
                return
        # a copy: a runner may hand out its own buffer, which its next call overwrites (runners.py)
        self._kept.append((len(self.origins) - 1, out.clone(), head))
        while not prompted and len(self._kept) > KEPT_OUTPUTS:
            # the outputs not scored yet are the likelier to be needed: the oldest scored one goes first
            scored = [k for k, (i, _, _) in enumerate(self._kept) if i in self._scored]
            del self._kept[scored[0] if scored else 0]

    def rescore(self, index: int, out: torch.Tensor, head, value: int) -> None:
        """Tile `index` computed again (its output was not kept): its lead for class `value`, now."""
        self._score_tile(index, out, head, value, prompted=False)

    def unscored(self, value: int, window) -> list[int]:
        """The tiles neither kept nor scored for class `value` (lead) somewhere in `window` (grid slices)."""
        self._lead_of(value)
        owners = self.owner[window][np.isnan(self.lead[window])]
        return sorted(set(np.unique(owners[owners >= 0]).tolist()) - {i for i, _, _ in self._kept})

    def score_class(self, value: int, prompted: bool) -> None:
        """Score class `value` on the tiles kept (a prompted model's outputs then go): its log-odds against
        all other classes together (prompted) or its lead over the best other class."""
        self._lead_of(value)
        for index, out, head in self._kept:
            if index not in self._scored:
                self._score_tile(index, out, head, value, prompted)
        if prompted:
            self._kept = []

    def _score_tile(self, index: int, out: torch.Tensor, head, value: int, prompted: bool) -> None:
        scored = self._scores(value)
        for voxels, logits, axis in _logit_chunks(out, head):
            scored.reshape(-1)[voxels] = _score(logits, axis, value, prompted)
        self._put(index, scored)

    def _lead_of(self, value: int) -> None:
        """`lead` is to hold class `value`'s: another class's are forgotten (only one class's are kept)."""
        if value != self.lead_class:
            self.lead[:] = np.nan
            self.lead_class, self._scored = value, set()

    def _scores(self, value: int) -> np.ndarray:
        self._lead_of(value)
        return np.empty(self.patch, dtype=np.float32)

    def _put(self, index: int, scored: np.ndarray) -> None:
        window = tuple(slice(o, o + s) for o, s in zip(self.origins[index], self.patch))
        mine = self.owner[window] == index
        self.lead[window][mine] = scored[mine]
        self._scored.add(index)


def _logit_chunks(out: torch.Tensor, head, rows: int = 4096):
    """(flat voxel range, float32 logits, their class axis) for each few thousand voxels of a tile's runner
    output, in the order of its (z, y, x) voxels; a tile of 105-class logits (880 MB at 128^3) is never held.

    With `head`, `rows` voxels at a time, the product written voxel by voxel, (rows, K): the per-voxel max
    over the classes is then a contiguous, vectorised reduction over logits still in the core's cache (1.7
    MB for 4,096 voxels and 105 classes; a whole 128^2 z-slice, 7 MB, was 1.3-1.6x slower on a Zen 3).
    Without a head, the runner's own (K, z, y, x) logits, 8 z-slices at a time (one at a time was 3x slower)."""
    k = out.shape[0]
    flat = out.reshape(k, -1)
    step = rows if head is not None else 8 * out.shape[2] * out.shape[3]
    if head is not None:
        w, b = (t.to(out.device) for t in head)
    for start in range(0, flat.shape[1], step):
        voxels = slice(start, min(start + step, flat.shape[1]))
        if head is None:
            yield voxels, flat[:, voxels].float(), 0
        else:
            yield voxels, torch.addmm(b, flat[:, voxels].float().t(), w.t()), -1


def _argmax(logits: torch.Tensor, axis: int) -> np.ndarray:
    """The first largest class (the lowest index on ties, as the export's). For (rows, K) logits numpy's:
    its argmax over a voxel's K contiguous values is vectorised, 2-2.5x torch's (105 classes, Zen 3)."""
    return first_argmax(logits).numpy() if axis == 0 else logits.numpy().argmax(1)


def _others(logits: torch.Tensor, axis: int, value: int) -> torch.Tensor:
    k = logits.shape[axis]
    return torch.cat([logits.narrow(axis, 0, value), logits.narrow(axis, value + 1, k - value - 1)], axis)


def _log_odds(logits: torch.Tensor, axis: int, value: int) -> np.ndarray:
    """Class `value`'s logit minus the log-sum-exp of the others': > 0 where p(value) > 1/2."""
    return (logits.select(axis, value) - torch.logsumexp(_others(logits, axis, value), axis)).numpy()


def _score(logits: torch.Tensor, axis: int, value: int, prompted: bool, labels=None) -> np.ndarray:
    """`labels`: the chunk's argmax, when known."""
    return _log_odds(logits, axis, value) if prompted else _lead(logits, axis, value, labels)


def _lead(logits: torch.Tensor, axis: int, value: int, labels=None) -> np.ndarray:
    """Class `value`'s logit minus the largest other one (> 0: the argmax `labels` is `value`)."""
    if axis == 0:   # (K, ...): the classes below and above `value` reduced apart (no copy of the others)
        k = logits.shape[0]
        parts = [logits.narrow(0, a, n).amax(0) for a, n in ((0, value), (value + 1, k - value - 1)) if n]
        return (logits[value] - (torch.maximum(*parts) if len(parts) == 2 else parts[0])).numpy()
    # (rows, K): minus the voxel's largest logit where the argmax is another class, minus the largest of the
    # others only where it is `value` (2x faster than a reduction over the others everywhere, Zen 3)
    a = logits.numpy()
    labels = a.argmax(1) if labels is None else labels
    lead = a[:, value] - a[np.arange(len(a)), labels]
    mine = np.flatnonzero(labels == value)
    if mine.size:
        others = a[mine]
        others[:, value] = -np.inf
        lead[mine] = a[mine, value] - others.max(1)
    return lead
