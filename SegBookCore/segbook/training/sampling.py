"""Training batches: patch sampling with foreground oversampling, augmentation, multi-worker loading.

Batch k of a run is a pure function of (seed, rank, k): its cases, patch positions and augmentation draw
from generators seeded with those three numbers. So the stream does not depend on the number of loader
workers, ranks sample different batches, and `--resume` at iteration k sees exactly the batches an
uninterrupted run would have seen.

Foreground oversampling follows nnU-Net: of a global batch of B patches (all ranks' together) the last
ones, from index round(B * (1 - 1/3)) on, are centred on a random voxel of a random foreground class present in the case.
In a partly annotated case ("ignore" label) the other patches are centred on a random annotated voxel
(nnU-Net v2 does the same), so that a patch is not wasted on voxels that count in no loss.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal

import numpy as np
import torch

from .augment import enlarged_patch_size, training_transforms
from .cache import ANNOTATED, CachedCase

__all__ = ["BatchDataset", "make_loader", "crop_patch", "FOREGROUND_FRACTION"]

log = logging.getLogger(__name__)

FOREGROUND_FRACTION = 1 / 3


def crop_patch(image: np.ndarray, seg: np.ndarray, lower, size) -> tuple[np.ndarray, np.ndarray]:
    """Cut image (C, z, y, x) and seg (1, z, y, x) at `lower` (zyx, may be negative) with extent `size`;
    outside the volume the image is 0 and the segmentation -1 (removed to background after augmentation)."""
    shape = image.shape[1:]
    src = tuple(slice(max(lo, 0), min(lo + s, n)) for lo, s, n in zip(lower, size, shape))
    dst = tuple(slice(sl.start - lo, sl.stop - lo) for sl, lo in zip(src, lower))
    out_img = np.zeros((image.shape[0], *size), dtype=np.float32)
    out_seg = np.full((1, *size), -1, dtype=np.int16)
    out_img[(slice(None), *dst)] = image[(slice(None), *src)]
    out_seg[(slice(None), *dst)] = seg[(slice(None), *src)]
    return out_img, out_seg


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed numpy's, Python's and torch's global generators (batchgeneratorsv2 draws from them) for one
    batch, and put the caller's states back afterwards (matters when loading runs in the main process)."""
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    # the CPU generator alone: torch.manual_seed would also reseed every CUDA generator, each batch, when
    # the batches are made in the training process (0 workers)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


class BatchDataset(torch.utils.data.Dataset):
    """Item k = batch k: {"image": (B, C, *patch) float32, "target": [(B, 1, *patch * scale) int64, ...]}."""

    def __init__(self, cases: list[CachedCase], patch_size, ds_scales, batch_size: int, seed: int = 0,
                 rank: int = 0, mirror_axes=(0, 1, 2), length: int = 10 ** 9, world_size: int = 1):
        self.cases, self.patch_size = cases, [int(p) for p in patch_size]
        self.batch_size, self.seed, self.rank, self.length = batch_size, seed, rank, length
        # Foreground patches are the last of the global batch (world_size ranks x batch_size), as nnU-Net's
        # DDP trainer spreads them: decided per rank, 1 patch per rank would never be one.
        first = int(round(batch_size * world_size * (1 - FOREGROUND_FRACTION)))
        self.forced = [rank * batch_size + b >= first for b in range(batch_size)]
        self.sample_size = [max(e, p) for e, p in zip(enlarged_patch_size(self.patch_size), self.patch_size)]
        self.transform = training_transforms(self.patch_size, ds_scales, mirror_axes)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def _arrays_of(self, case: CachedCase):
        if case.name not in self._arrays:
            self._arrays[case.name] = case.load(mmap=True)
        return self._arrays[case.name]

    def _lower_corner(self, case: CachedCase, shape, force_fg: bool, rng: np.random.Generator) -> list[int]:
        size = self.sample_size
        # the sample may stick out of the volume by half the difference to the patch (nnU-Net's need_to_pad)
        pad = [max(p - s, 0) for p, s in zip(self.patch_size, shape)]
        lo = [-(p // 2) for p in pad]
        hi = [s + p // 2 + p % 2 - ps for s, p, ps in zip(shape, pad, self.patch_size)]
        foreground = [k for k, v in case.locations.items() if len(v) and k != ANNOTATED]
        if force_fg and foreground:
            around = case.locations[foreground[rng.integers(len(foreground))]]
        elif not force_fg and len(case.locations.get(ANNOTATED, ())):
            around = case.locations[ANNOTATED]
        else:
            around = None
        if around is not None:
            voxel = around[rng.integers(len(around))]
            centre_lower = [int(v) - p // 2 for v, p in zip(voxel, self.patch_size)]
            patch_lower = [min(max(c, a), b) for c, a, b in zip(centre_lower, lo, hi)]
        else:
            patch_lower = [int(rng.integers(a, max(a, b) + 1)) for a, b in zip(lo, hi)]
        # the larger sample is centred on the patch
        return [p - (s - ps) // 2 for p, s, ps in zip(patch_lower, size, self.patch_size)]

    def __getitem__(self, k: int) -> dict:
        seed = int(np.random.SeedSequence([self.seed, self.rank, int(k)]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        images, targets = [], None
        with _seeded(seed), torch.no_grad():
            for b in range(self.batch_size):
                case = self.cases[rng.integers(len(self.cases))]
                image, seg = self._arrays_of(case)
                lower = self._lower_corner(case, image.shape[1:], self.forced[b], rng)
                img, sg = crop_patch(image, seg, lower, self.sample_size)
                out = self.transform(image=torch.from_numpy(img), segmentation=torch.from_numpy(sg))
                images.append(out["image"])
                segs = out["segmentation"]
                targets = [[t] for t in segs] if targets is None else [a + [t] for a, t in zip(targets, segs)]
        return {"image": torch.stack(images).float(),
                "target": [torch.stack(t).long() for t in targets]}


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C, and the SIGTERM of a batch system (SLURM's scancel) or of a process-group kill, reach every
    # process of the run: the main process saves a checkpoint at the next step and stops the workers, which
    # must not die first (the trainer would fail on a dead worker and lose the epoch's steps). SIGINT is
    # ignored; so is the first SIGTERM, while a second one ends a worker as usual (the DataLoader's last
    # resort for a worker that does not stop, and multiprocessing's at exit, are SIGTERMs).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_once)
    torch.set_num_threads(1)


def _ignore_once(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_DFL)


def default_workers(device: torch.device | None = None) -> int:
    """Loader processes of one training process: up to 12 for a GPU (nnU-Net's default: augmentation must
    keep up with it), 4 on the CPU (where the network needs the cores itself); at most this process's share
    of the cores (LOCAL_WORLD_SIZE ranks on this machine), less the one it trains on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 1
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(12 if device is not None and device.type == "cuda" else 4, share - 1))


def make_loader(dataset: BatchDataset, start: int, stop: int, num_workers: int | None = None,
                device: torch.device | None = None):
    """Iterate batches start..stop-1 with `num_workers` processes (0: in this process) for `device`."""
    workers = default_workers(device) if num_workers is None else num_workers
    # pinned (page-locked) batches only serve copies to a CUDA device; for the CPU they cost a copy each
    kwargs = dict(num_workers=workers, worker_init_fn=_worker_init if workers else None,
                  persistent_workers=False, pin_memory=device is not None and device.type == "cuda")
    if workers:
        kwargs["prefetch_factor"] = 4
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop), **kwargs)
