"""DistributedDataParallel under torchrun with 2 CPU processes (gloo): each rank samples its own batches,
rank 0 alone writes, and a resumed DDP run ends with exactly the weights of an uninterrupted one."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segbook.checkpoint import load_checkpoint
from segbook.config import Plan
from segbook.dataset import read_dataset
from segbook.planning import deep_supervision_scales, pools_for_patch
from segbook.training.cache import cache_dataset
from segbook.training.loss import DeepSupervisionLoss
from segbook.training.sampling import BatchDataset
from segbook.training.trainer import make_optimizer, train_step

DATA = Path(__file__).parent / "data"
MINI = DATA / "hippocampus_mini"
ARGS = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--batch-size", "1",
        "--val-fraction", "0.25", "--iterations-per-epoch", "3", "--val-every", "100", "--num-workers", "0",
        "--threads", "1", "--device", "cpu", "--progress", "none"]


def _torchrun(out, *extra, verbose=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segbook", *(["-v"] if verbose else []), "finetune", str(MINI), "-o", str(out), *ARGS, *extra]
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
    # reproducible in another process (as a resumed run or another rank's loader worker makes them), whatever
    # that process drew from the global generators before, and whatever batch it made first
    code = ("import sys, torch, numpy, random\n"
            "from segbook.dataset import read_dataset\nfrom segbook.config import Plan\n"
            "from segbook.planning import deep_supervision_scales, pools_for_patch\n"
            "from segbook.training.cache import cache_dataset\nfrom segbook.training.sampling import BatchDataset\n"
            "torch.manual_seed(123); numpy.random.seed(7); random.seed(9); torch.rand(5); numpy.random.rand(3)\n"
            "ds = read_dataset(sys.argv[1])\n"
            "cached = cache_dataset(ds, ds.cases, Plan([1.0] * 3, [16, 24, 16]), sys.argv[2])\n"
            "scales = deep_supervision_scales(pools_for_patch([16, 24, 16], [1, 1, 1]))\n"
            "r1 = BatchDataset(cached, [16, 24, 16], scales, 2, seed=0, rank=1)\n"
            "r0 = BatchDataset(cached, [16, 24, 16], scales, 2, seed=0, rank=0)\n"
            "r0[2]\n"
            "torch.save({'r1': r1[5], 'r0': r0[5]}, sys.argv[3])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(MINI), str(tmp_path / "cache"), str(tmp_path / "b.pt")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = torch.load(tmp_path / "b.pt")
    for mine, theirs in ((b0, other["r0"]), (b1, other["r1"])):
        assert torch.equal(mine["image"], theirs["image"])
        assert all(torch.equal(a, b) for a, b in zip(mine["target"], theirs["target"]))


# which patches of the global batch (rank after rank) are centred on foreground, worked out by hand from nnU-Net's
# rule (patch i is when i >= round(B x (1 - 0.33)), B = world x batch): B = 2 -> from 1, B = 4 -> from 3
# (round(2.68)), B = 6 -> from 4 (round(4.02))
@pytest.mark.parametrize("world,batch,forced", [
    (2, 1, [False, True]), (1, 2, [False, True]), (4, 1, [False, False, False, True]),
    (2, 3, [False, False, False, False, True, True]), (3, 2, [False, False, False, False, True, True])])
def test_foreground_patches_are_the_last_of_the_global_batch(tmp_path, monkeypatch, world, batch, forced):
    """nnU-Net's DDP trainer: of the global batch (world x batch patches, rank after rank) the patches from
    index round(B x (1 - 0.33)) on are centred on foreground; with 1 patch per rank some ranks' patches
    are, and not none of them as when each rank decided for its own batch alone."""
    ds = read_dataset(MINI)
    cached = cache_dataset(ds, ds.cases, Plan([1.0] * 3, [16, 24, 16]), tmp_path / "cache")
    scales = deep_supervision_scales(pools_for_patch([16, 24, 16], [1, 1, 1]))
    seen = []
    real = BatchDataset._lower_corner
    monkeypatch.setattr(BatchDataset, "_lower_corner", lambda self, c, s, force, rng: seen.append(force)
                        or real(self, c, s, force, rng))
    for rank in range(world):
        BatchDataset(cached, [16, 24, 16], scales, batch, seed=0, rank=rank, world_size=world)[3]
    assert seen == forced


def test_torchrun_two_cpu_processes_train_and_resume_exactly(tmp_path):
    straight = tmp_path / "straight"
    proc = _torchrun(straight, "--epochs", "2", "--progress", "json", verbose=True)
    log = [json.loads(x) for x in (straight / "training" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2]      # rank 0 alone writes: one line per epoch
    # rank 0 alone reports: one event stream on stdout (what the Slicer panel reads), nothing twice
    events = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [e["done"] for e in events if e.get("stage") == "train"] == list(range(1, 7))
    assert [e["epoch"] for e in events if e["event"] == "metric"] == [1, 2]
    assert [e["event"] for e in events].count("done") == 1
    # the logged loss is the mean over the ranks, each rank's own mean in its INFO line
    own = {}
    for line in proc.stderr.splitlines():
        if " train_loss " in line and line.split("segbook.training.trainer: rank ")[1:]:
            rank, _, epoch, _, value = line.split("segbook.training.trainer: rank ")[1].split()
            own[int(rank), int(epoch)] = float(value)
    assert sorted(own) == [(0, 1), (0, 2), (1, 1), (1, 2)], proc.stderr[-2000:]
    for x, m in zip(log, [e for e in events if e["event"] == "metric"]):
        mean = (own[0, x["epoch"]] + own[1, x["epoch"]]) / 2
        assert x["train_loss"] == pytest.approx(mean, rel=1e-12) and m["train_loss"] == x["train_loss"]
        assert own[0, x["epoch"]] != own[1, x["epoch"]]
    prov = json.loads((straight / "model.json").read_text())["provenance"]
    assert prov["processes"] == 2 and prov["command"].startswith("segbook -v finetune ")
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


def _steps_on_rank(rank, batches, out):
    """3 DDP steps of the real training step on this rank's half of each batch."""
    from segbook.training.distributed import Dist
    net = _small_net()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt, _ = make_optimizer(net, 1e-2, 10)
    loss_fn = DeepSupervisionLoss(3)
    for b in batches:
        mine = {"image": b["image"][rank:rank + 1], "target": [t[rank:rank + 1] for t in b["target"]]}
        train_step(model, mine, loss_fn, opt, None, torch.device("cpu"), Dist(rank, 2, rank))
    torch.save(net.state_dict(), out / f"rank{rank}.pt")


def _small_net():
    """A 3-stage STU-Net in float64 (see the tolerance below), seeded."""
    from segbook.network import STUNet
    torch.manual_seed(0)
    return STUNet(1, 3, [4, 8, 16], [1, 1, 1], [[2, 2, 2]] * 2, deep_supervision=True).double()


def test_ddp_ranks_end_with_the_weights_of_one_process_on_the_combined_batch(tmp_path):
    """2 ranks x 1 patch == 1 process x 2 patches: DDP's gradient averaging, the batch Dice summed over
    ranks, clipping and SGD momentum together (instance norm: no statistic crosses the batch)."""
    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(2, 1, 16, 16, 16, generator=g, dtype=torch.float64),
                "target": [torch.randint(0, 3, (2, 1, 16 // s, 16 // s, 16 // s), generator=g) for s in (1, 2, 4)]}
               for _ in range(3)]
    _spawn_two(_steps_on_rank, batches, tmp_path)
    net = _small_net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    opt, _ = make_optimizer(net, 1e-2, 10)
    for b in batches:
        train_step(net, b, DeepSupervisionLoss(3), opt, None, torch.device("cpu"))
    single = net.state_dict()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)           # DDP keeps the replicas identical
    for k in single:
        # float64: the sums run in another order (per rank, then all-reduced); in float32 the instance
        # norms' mean subtraction amplifies that rounding to ~1% of a step at random init, in float64 to 1e-13
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-12, msg=k)
    assert any(not torch.allclose(start[k], single[k]) for k in single)   # the steps did move the weights


def _tiny_hub_entry():
    from segbook import zoo
    from segbook.config import Arch, ModelConfig, Plan
    spec = json.loads((DATA / "tiny_totalseg_pools.json").read_text())
    names = ["background"] + [f"class_{i}" for i in range(1, spec["num_classes"])]
    zoo.REGISTRY["tiny-hub"] = ModelConfig(
        name="tiny-hub", arch=Arch(1, spec["num_classes"], spec["dims"], spec["depth"], spec["pool_op_kernel_sizes"]),
        plan=Plan([1.5] * 3, [32, 32, 64]), class_names=names, hub_repo="test/tiny", hub_filename="tiny.model")
    zoo.REGISTRY["tiny-missing"] = dataclasses.replace(zoo.REGISTRY["tiny-hub"], name="tiny-missing",
                                                        hub_repo="test/missing")


def _fetch_on_rank(rank, out):
    from segbook import zoo
    from segbook.errors import SegBookError
    from segbook.training.distributed import Dist
    from segbook.training.model_init import fetch_base
    _tiny_hub_entry()
    real_save = zoo.save_model_folder

    def counted_save(folder, *a, **k):
        (out / f"converted_by_{rank}").touch()
        return real_save(folder, *a, **k)
    zoo.save_model_folder = counted_save
    d = Dist(rank, 2, rank)
    try:                      # not downloadable: rank 0 says why, rank 1 stops too instead of waiting
        fetch_base("tiny-missing", d)
        result = "no error"
    except SegBookError as e:
        result = f"{type(e).__name__}: {e}"
    fetch_base("tiny-hub", d)
    loaded = zoo.create_model("tiny-hub").config.name
    (out / f"rank{rank}.json").write_text(json.dumps({"missing": result, "loaded": loaded}))


def test_one_rank_downloads_and_converts_the_base_the_other_waits(tmp_path, monkeypatch):
    from test_zoo import lay_out_hub_cache
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))     # the spawned ranks inherit it
    lay_out_hub_cache(hf_home, "test/tiny", "tiny.model", DATA / "tiny_totalseg_pools.model")
    _spawn_two(_fetch_on_rank, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("converted_by_*")) == ["converted_by_0"]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["loaded"] for g in got] == ["tiny-hub", "tiny-hub"]
    assert got[0]["missing"].startswith("ModelNotFound: tiny-missing: test/missing/tiny.model is not cached")
    assert got[1]["missing"] == "SegBookError: rank 1: getting the base model tiny-missing failed on another " \
                                "rank (its message says why)"


def _validation_config():
    from segbook.config import Arch, ModelConfig
    return ModelConfig(name="v", arch=Arch(1, 3, [4, 8, 16], [1, 1, 1], [[2, 2, 2]] * 2),
                       plan=Plan([1.0] * 3, [32, 48, 32]), class_names=["background", "anterior", "posterior"])


def _validate_on_rank(rank, cases, out):
    from segbook.events import Reporter
    from segbook.training import validate
    from segbook.training.distributed import Dist
    from segbook.training.trainer import _validate

    class Seen(Reporter):
        def __init__(self):
            super().__init__()
            self.events = []

        def emit(self, event):
            self.events.append(event)
    seen = Seen()
    result = _validate(validate, _small_net(), _validation_config(), cases, torch.device("cpu"), seen,
                       Dist(rank, 2, rank))
    torch.save({"result": result, "events": seen.events}, out / f"rank{rank}.pt")


def test_validation_is_sharded_over_ranks_and_merged(tmp_path):
    from segbook.training.validate import validate
    cases = read_dataset(MINI).cases[:3]
    _spawn_two(_validate_on_rank, cases, tmp_path)
    net = _small_net()
    net.deep_supervision = False
    state = {k: v for k, v in net.state_dict().items()}
    expected = validate(state, _validation_config(), cases)
    for r, share in ((0, 2), (1, 1)):       # cases 0 and 2 on rank 0, case 1 on rank 1
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["result"] == expected
        assert [e["total"] for e in got["events"] if e.get("stage") == "validate"] == [share] * share


# `segbook finetune` in float64 (the network and the batches; all else as shipped), the rounding of float32
# would hide a small difference: its instance norms amplify the reduction order's rounding to ~2 % of the
# distance 3 steps move at random init. "combined": one process on the union of both ranks' batches; rank r's
# batch k is BatchDataset(rank=r)[k] (a pure function of seed, rank and k), so that is their concatenation.
FLOAT64_RUN = """
import sys, torch
from segbook.training import sampling, trainer

class Batches:
    def __init__(self, cases, patch, scales, batch_size, *, rank=0, **kw):
        ranks = [rank] if MODE == "ranks" else [0, 1]
        kw["world_size"] = 2       # the batches of 2 ranks (foreground patches are spread over both)
        self.parts = [sampling.BatchDataset(cases, patch, scales, 1, rank=r, **kw) for r in ranks]

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, k):
        got = [p[k] for p in self.parts]
        return {"image": torch.cat([g["image"] for g in got]).double(),
                "target": [torch.cat(t) for t in zip(*(g["target"] for g in got))]}

def build_network(*args, **kwargs):
    net, base, info = build(*args, **kwargs)
    return net.double(), base, info

MODE, build = sys.argv.pop(1), trainer.build_network
trainer.BatchDataset, trainer.build_network = Batches, build_network
from segbook.cli import main
sys.exit(main(sys.argv[1:]))
"""

THREE_STEPS = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--val-fraction", "0",
               "--epochs", "1", "--iterations-per-epoch", "3", "--num-workers", "0", "--threads", "1",
               "--device", "cpu", "--progress", "none"]


def test_finetune_on_two_ranks_trains_the_weights_of_one_process_on_the_combined_batch(tmp_path):
    """The real `segbook finetune` under torchrun (2 ranks x 1 patch) ends with the weights of one process
    run on both ranks' patches as one batch of 2: the trainer's DDP wrapping averages the gradients.
    Without it each rank steps on its own patch and rank 0 writes weights trained on half the data."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks, single = tmp_path / "ranks", tmp_path / "single"
    script = tmp_path / "float64_finetune.py"
    script.write_text(FLOAT64_RUN)
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                 "ranks", "finetune", str(MINI), "-o", str(ranks), "--batch-size", "1", *THREE_STEPS],
                [sys.executable, str(script), "combined", "finetune", str(MINI), "-o", str(single),
                 "--batch-size", "2", *THREE_STEPS]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_checkpoint(ranks / "weights.safetensors"), load_checkpoint(single / "weights.safetensors")
    assert json.loads((ranks / "model.json").read_text())["provenance"]["processes"] == 2
    torch.manual_seed(0)   # the start: the trainer seeds the scratch network with --seed (0)
    from segbook.training.model_init import build_network
    pools = json.loads((single / "model.json").read_text())["arch"]["pool_op_kernel_sizes"]
    start = build_network("stunet-s-totalseg", read_dataset(MINI).class_names, 1, pools, scratch=True,
                          width=0.25)[0].double().state_dict()
    assert want.keys() == start.keys() and all(v.dtype == torch.float64 for v in want.values())
    moved = sum(float((want[k] - start[k]).norm() ** 2) for k in want) ** 0.5
    off = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
    # measured: moved 0.51, off 2e-15 (the reduction order); without the trainer's DDP wrapping off 0.26
    assert moved > 0.1 and off < 1e-9 * moved, (off, moved)


def test_torchrun_with_one_process_joins_a_process_group_and_trains_as_a_plain_run(tmp_path):
    """`torchrun --nproc_per_node 1 ... finetune`: the process group is set up and the network DDP-wrapped
    (on a GPU these are the NCCL paths a larger run takes), and the weights equal a plain run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, plain = tmp_path / "one", tmp_path / "plain"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "segbook", "-v", "finetune", str(MINI), "-o", str(one), "--batch-size", "2",
                           *THREE_STEPS], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/1 on cpu (gloo)" in proc.stderr and "rank 0 epoch 1 train_loss" in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "segbook", "finetune", str(MINI), "-o", str(plain), "--batch-size",
                           "2", *THREE_STEPS], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(one / "weights.safetensors"), load_checkpoint(plain / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
