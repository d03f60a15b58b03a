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
    assert sorted(p.name for p in straight.iterdir()) == ["model.json", "training", "weights.safetensors"]
    split = tmp_path / "split"
    _torchrun(split, "--epochs", "1")
    _torchrun(split, "--epochs", "2", "--resume")
    a, b = load_checkpoint(straight / "weights.safetensors"), load_checkpoint(split / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
