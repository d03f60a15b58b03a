"""DistributedDataParallel under torchrun: process group setup, rank helpers.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them training runs as a
plain single process. Under torchrun the process group is set up whatever the world size: CUDA uses NCCL
with one GPU per local rank, CPU uses gloo.

Work that writes a shared folder (the converted base download, the preprocessed cache) runs on rank 0
first (`main_first`); work that is the same per item (preprocessing, validation cases) is split over the
ranks (`shard`) and gathered, so no rank waits at a barrier for the whole of it.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import resolve_device, use_device
from ..errors import SegBookError

__all__ = ["Dist", "setup", "teardown"]

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False      # started by torchrun: in a process group even when it is alone in it

    @property
    def enabled(self) -> bool:
        """In a process group: the collectives and DDP run (with one rank too, so that `torchrun
        --nproc_per_node 1` on one GPU exercises the NCCL paths a larger run takes)."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank if it is true on any (used for stop requests and NaN losses)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (each rank's own value when single-process)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def shard(self, items: list) -> list:
        """This rank's share of `items`: every world_size-th, from its rank on (nnU-Net splits validation so)."""
        return list(items[self.rank::self.world_size])

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def checked(self, fn, what: str, run: bool = True):
        """fn() on this rank (if `run`), then every rank learns whether it failed anywhere: the failing rank
        raises its own error, the others a one-line pointer to it (instead of waiting at the next
        collective until the timeout). Returns fn()'s result."""
        result, error = None, None
        if run:
            try:
                result = fn()
            except BaseException as e:  # noqa: B036 (re-raised below, after the other ranks know)
                error = e
        if self.broadcast_flag(error is not None):
            if error is not None:
                raise error
            raise SegBookError(f"rank {self.rank}: {what} failed on another rank (its message says why)")
        return result

    def main_first(self, fn, what: str):
        """fn() on rank 0, then, once it succeeded, on the other ranks (which then find its output ready)."""
        if not self.enabled:
            return fn()
        first = self.checked(fn, what, run=self.is_main)
        return first if self.is_main else fn()


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// rendezvous variables it sets)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group whenever launched by torchrun, with one process too; returns
    (Dist, this rank's device)."""
    dev = resolve_device(device)
    if not launched():
        use_device(dev)
        return Dist(), dev
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":     # one GPU per local rank, whatever index was asked for
        dev, backend = resolve_device(f"cuda:{local}"), "nccl"
        use_device(dev)
    else:
        dev, backend = torch.device(dev.type), "gloo"
    if not dist.is_initialized():
        # preprocessing and validation are sharded over the ranks (no rank waits for all of it); the
        # longest remaining wait is rank 0 downloading a registry base once (STU-Net-H: 11.7 GB)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return Dist(rank, world, local, launched=True), dev


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
