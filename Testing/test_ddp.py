"""DistributedDataParallel under torchrun with 2 CPU processes (gloo): each rank samples its own batches,
rank 0 alone writes, and a resumed DDP run ends with exactly the weights of an uninterrupted one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from segbook.checkpoint import load_checkpoint
from segbook.config import Plan
from segbook.dataset import read_dataset
from segbook.planning import deep_supervision_scales, pools_for_patch
from segbook.training.cache import cache_dataset
from segbook.training.sampling import BatchDataset

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
ARGS = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--batch-size", "1",
        "--val-fraction", "0.25", "--iterations-per-epoch", "3", "--val-every", "100", "--num-workers", "0",
        "--threads", "1", "--device", "cpu", "--progress", "none"]


def _torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segbook", "finetune", str(MINI), "-o", str(out), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ranks_sample_their_own_reproducible_batches(tmp_path):
    ds = read_dataset(MINI)
    cached = cache_dataset(ds, ds.cases, Plan([1.0] * 3, [16, 24, 16]), tmp_path / "cache")
    scales = deep_supervision_scales(pools_for_patch([16, 24, 16], [1, 1, 1]))
    r0, r0_again, r1 = (BatchDataset(cached, [16, 24, 16], scales, 2, seed=0, rank=r) for r in (0, 0, 1))
    b0, b0_again, b1 = r0[5], r0_again[5], r1[5]
    assert b0["image"].shape == (2, 1, 16, 24, 16) and [t.shape[2:] for t in b0["target"]][:3] == \
        [(16, 24, 16), (8, 12, 8), (4, 6, 4)]
    assert torch.equal(b0["image"], b0_again["image"])
    assert not torch.equal(b0["image"], b1["image"])
    # nnU-Net's oversampling: the last of 2 patches is centred on foreground
    assert all(b0["target"][0][1].max() > 0 for b0 in (r0[k] for k in range(6)))


def test_torchrun_two_cpu_processes_train_and_resume_exactly(tmp_path):
    straight = tmp_path / "straight"
    _torchrun(straight, "--epochs", "2")
    log = [json.loads(x) for x in (straight / "training" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2]      # rank 0 alone writes: one line per epoch
    prov = json.loads((straight / "model.json").read_text())["provenance"]
    assert prov["processes"] == 2 and prov["command"].startswith("segbook finetune ")
    assert sorted(p.name for p in straight.iterdir()) == ["model.json", "training", "weights.safetensors"]
    split = tmp_path / "split"
    _torchrun(split, "--epochs", "1")
    _torchrun(split, "--epochs", "2", "--resume")
    a, b = load_checkpoint(straight / "weights.safetensors"), load_checkpoint(split / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rank_main(rank, port, fn, args):
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    fn(rank, *args)
    # skip interpreter teardown: freeing a DDP Reducer / gloo group there can deadlock (its worker thread
    # waits for the GIL while the main thread joins it); the results are already on disk
    os._exit(0)


def _spawn_two(fn, *args):
    """fn(rank, *args) in 2 fresh processes that form a gloo group on a free local port."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, fn, args), nprocs=2)


def _dice_on_rank(rank, logits, target, out):
    from segbook.training.loss import soft_dice_loss
    mine = logits[rank:rank + 1].clone().requires_grad_(True)
    loss = soft_dice_loss(mine, target[rank:rank + 1])
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad}, out / f"rank{rank}.pt")


def test_batch_dice_is_the_global_batch_across_ranks(tmp_path):
    """2 ranks x 1 patch train the loss of 1 process x 2 patches, as nnU-Net's DDP batch Dice does."""
    from segbook.training.loss import soft_dice_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, 5, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 7, 5), generator=g)
    target[1] = 0           # rank 1 alone has no foreground: its local Dice would differ most from the global one
    _spawn_two(_dice_on_rank, logits, target, tmp_path)
    whole = logits.clone().requires_grad_(True)
    expected = soft_dice_loss(whole, target)
    expected.backward()
    local = soft_dice_loss(logits[1:2], target[1:2])
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(got["loss"], expected, atol=1e-6)
        assert not torch.allclose(local, expected)
        # each rank holds 2 x the global gradient of its patch; DDP's averaging over 2 ranks halves it
        assert torch.allclose(got["grad"] / 2, whole.grad[r:r + 1], atol=1e-7)


def _nan_step_on_rank(rank, out):
    from segbook.training.distributed import Dist
    from segbook.training.trainer import train_step
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv3d(1, 2, 3))
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bad = float("nan") if rank == 1 else 1.0          # only rank 1's loss is NaN
    batch = {"image": torch.randn(1, 1, 5, 5, 5), "target": [torch.zeros(1, 1, 3, 3, 3)]}
    loss = train_step(net, batch, lambda o, t: o.mean() * bad, opt, None, torch.device("cpu"), Dist(rank, 2, rank))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    torch.save({"loss": loss, "unchanged": unchanged}, out / f"rank{rank}.pt")


def test_a_nan_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    import math
    _spawn_two(_nan_step_on_rank, tmp_path)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert math.isnan(got["loss"]) and got["unchanged"], (r, got)
