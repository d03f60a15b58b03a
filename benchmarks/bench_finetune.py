"""Benchmark: training-step throughput and peak memory of `segbook finetune` vs nnU-Net v2's trainer machinery.

Same data (hippocampus cases preprocessed once by segbook's cache and written in nnU-Net's numpy dataset
layout for nnU-Net), same network (STU-Net, `--width` x STU-Net-S), patch, batch, pools, loss weights,
optimiser and CPU threads. Each side runs in its own subprocess:

- segbook: `BatchDataset` + `make_loader` (1 worker) + `trainer.train_step`, exactly what `segbook finetune`
  runs per iteration;
- nnU-Net: `nnUNetDataLoader` + `nnUNetTrainer.get_training_transforms` + `NonDetMultiThreadedAugmenter`
  (1 worker) + `DC_and_CE_loss` in `DeepSupervisionWrapper`, and the steps of `nnUNetTrainer.train_step`.

Iterations per second include data loading (the loop waits for its loader); after `--warmup` steps,
`--iterations` are timed. Peak memory is the maximum RSS of the process and of its loader workers
(getrusage). Sides alternate for `--rounds` rounds, the first side swapping each round (the machine is shared:
medians are reported).

    .venv/bin/python benchmarks/bench_finetune.py                   # ~3-4 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_finetune.py --device cuda     # on a GPU
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
POOLS = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _prepare(cache: Path, n_cases: int) -> list:
    """Cache n cases with segbook and mirror them in nnU-Net's numpy layout (same arrays)."""
    import numpy as np
    from segbook.config import Plan
    from segbook.dataset import read_dataset
    from segbook.training.cache import cache_dataset
    ds = read_dataset(DATA)
    cached = cache_dataset(ds, ds.cases[:n_cases], Plan([1.0, 1.0, 1.0], [40, 56, 40]), cache / "segbook")
    nn = cache / "nnunet"
    nn.mkdir(exist_ok=True)
    for c in cached:
        image, seg = c.load(mmap=False)
        np.save(nn / f"{c.name}.npy", image)
        np.save(nn / f"{c.name}_seg.npy", seg.astype(np.int8))
        # nnU-Net's class_locations hold (channel, z, y, x)
        locs = {k: np.concatenate([np.zeros((len(v), 1), np.int64), v], 1) for k, v in c.locations.items()}
        with open(nn / f"{c.name}.pkl", "wb") as f:
            pickle.dump({"class_locations": locs}, f)
    return [c.name for c in cached]


def _network(width: float, device):
    import torch
    from segbook.network import STUNET_SIZES, STUNet
    torch.manual_seed(0)
    dims = [int(round(d * width)) for d in STUNET_SIZES["S"]["dims"]]
    return STUNet(1, 3, dims, [1] * 6, POOLS).to(device)


def _segbook_side(args, cache: Path, names: list, device):
    import numpy as np
    from segbook.planning import deep_supervision_scales
    from segbook.training.cache import CachedCase
    from segbook.training.loss import DeepSupervisionLoss
    from segbook.training.sampling import BatchDataset, make_loader
    from segbook.training.trainer import make_optimizer, train_step
    seg = cache / "segbook"
    cases = []
    for n in names:
        loc = np.load(seg / f"{n}_loc.npz")
        cases.append(CachedCase(n, seg / f"{n}_image.npy", seg / f"{n}_seg.npy", {int(k): loc[k] for k in loc.files}))
    net = _network(args.width, device)
    opt, _ = make_optimizer(net, 1e-2, 1000)
    loss_fn = DeepSupervisionLoss(len(POOLS))
    dataset = BatchDataset(cases, args.patch, deep_supervision_scales(POOLS), args.batch_size, seed=0)
    loader = iter(make_loader(dataset, 0, args.warmup + args.iterations, num_workers=args.workers))
    scaler = __import__("torch").amp.GradScaler("cuda") if device.type == "cuda" else None

    def step():
        return train_step(net, next(loader), loss_fn, opt, scaler, device)
    # exhausting the iterator joins the workers, so that their peak RSS reaches RUSAGE_CHILDREN
    step.finish = lambda: [None for _ in loader]
    return step


def _nnunet_side(args, cache: Path, names: list, device):
    import numpy as np
    import torch
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = LabelManager({"background": 0, "anterior": 1, "posterior": 2}, regions_class_order=None)
    dataset = nnUNetDatasetNumpy(str(cache / "nnunet"), identifiers=list(names))
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    initial = get_patch_size(args.patch, rotation, rotation, rotation, (0.85, 1.25))
    # the trainer's scales: 1 / cumprod(pools) with nnU-Net's leading [1, 1, 1], one per network output
    ds_scales = [list(s) for s in 1 / np.cumprod(np.vstack([[1, 1, 1]] + POOLS), axis=0)][:len(POOLS)]
    transforms = nnUNetTrainer.get_training_transforms(args.patch, rotation, ds_scales, (0, 1, 2), False,
                                                       use_mask_for_norm=[False], is_cascaded=False,
                                                       foreground_labels=[1, 2], regions=None, ignore_label=None)
    dl = nnUNetDataLoader(dataset, args.batch_size, initial, args.patch, labels, oversample_foreground_percent=0.33,
                          sampling_probabilities=None, pad_sides=None, transforms=transforms)
    gen = (NonDetMultiThreadedAugmenter(dl, None, args.workers, max(6, args.workers // 2), None,
                                        pin_memory=device.type == "cuda", wait_time=0.002)
           if args.workers else SingleThreadedAugmenter(dl, None))
    net = _network(args.width, device)
    opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    weights = np.array([1 / 2 ** i for i in range(len(POOLS))])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1,
                                                 dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    def step():  # nnUNetTrainer.train_step
        batch = next(gen)
        data = batch["data"].to(device, non_blocking=True)
        target = [t.to(device, non_blocking=True) for t in batch["target"]]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = net(data)
            value = loss(out, target)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            value.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
        return value.item()
    step.finish = getattr(gen, "_finish", lambda: None)
    return step


def _child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = Path(args.cache)
    names = json.loads((cache / "names.json").read_text())
    step = (_segbook_side if args.side == "segbook" else _nnunet_side)(args, cache, names, device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if hasattr(step, "finish"):
        step.finish()
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"side": args.side, "it_per_s": args.iterations / seconds, "seconds": seconds,
                      "peak_rss_mb": self_kb / 1024, "peak_worker_rss_mb": child_kb / 1024,
                      "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--width", type=float, default=0.5, help="x STU-Net-S channels (0.5: the shipped demo model)")
    p.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["segbook", "nnunet"], help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        _child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        names = _prepare(Path(tmp), args.cases)
        (Path(tmp) / "names.json").write_text(json.dumps(names))
        passed = [a for a in (argv if argv is not None else sys.argv[1:])]
        results = {"segbook": [], "nnunet": []}
        for r in range(args.rounds):
            # alternate which side goes first: load from other users of the machine drifts over minutes
            for side in (("segbook", "nnunet") if r % 2 == 0 else ("nnunet", "segbook")):
                out = subprocess.run([sys.executable, __file__, *passed, "--side", side, "--cache", tmp],
                                     capture_output=True, text=True, check=False)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[side].append(res)
                print(f"round {r + 1} {side:8s} {res['it_per_s']:.3f} it/s  peak RSS {res['peak_rss_mb']:.0f} MB "
                      f"(+ worker {res['peak_worker_rss_mb']:.0f} MB)", flush=True)
    med = {s: statistics.median(x["it_per_s"] for x in v) for s, v in results.items()}
    mem = {s: max(x["peak_rss_mb"] + x["peak_worker_rss_mb"] for x in v) for s, v in results.items()}
    print(f"\nwidth {args.width} x STU-Net-S, patch {args.patch}, batch {args.batch_size}, {args.workers} loader "
          f"worker(s), {args.threads} thread(s), device {args.device}")
    print(f"segbook finetune : {med['segbook']:.3f} it/s (median of {args.rounds}), peak RSS {mem['segbook']:.0f} MB")
    print(f"nnU-Net v2       : {med['nnunet']:.3f} it/s (median of {args.rounds}), peak RSS {mem['nnunet']:.0f} MB")
    print(f"throughput ratio segbook / nnU-Net = {med['segbook'] / med['nnunet']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
