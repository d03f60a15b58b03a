"""DistributedDataParallel under torchrun: process group setup, rank helpers.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them training runs as a single process. CUDA
uses NCCL with one GPU per local rank, CPU uses gloo.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "teardown"]

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

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


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; returns (Dist, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return Dist(), torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # validation on rank 0 may take minutes while the others wait at a barrier
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return Dist(rank, world, local), dev


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
