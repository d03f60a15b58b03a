"""Per-tile microbenchmark of the network runners, in one process: torch (plain and cpu_fast) vs OpenVINO
(fp32, bf16) on the same tile, interleaved round by round so that a contended machine slows all alike.

    .venv/bin/python benchmarks/bench_tile.py                          # STU-Net-S, random weights, 128^3
    .venv/bin/python benchmarks/bench_tile.py --model hippocampus-demo # a trained network, its own patch

Prints seconds per tile (median over rounds), the ratio to torch cpu_fast, and the argmax agreement and
largest logit difference against torch fp32. Random weights put 105 logits in near-ties: judge reduced
precision on a trained network (bench_precision.py), not on these agreement figures.

For how near each path is to what the CPU can do, it also prints the tile's convolution work (GFLOP, the
head included) and the rate each path reaches, against this CPU's best float32 matrix product (torch's
sgemm, 2048^2, timed in every round beside the tiles).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SegBookCore"))


def conv_gflop(net: nn.Module, shape) -> float:
    """Multiply-adds x 2 of every convolution of one forward at `shape`, counted on a meta-device copy."""
    import copy
    flops = []

    def count(conv, _, out):
        flops.append(2 * out.numel() * conv.in_channels // conv.groups * math.prod(conv.kernel_size))

    meta = copy.deepcopy(net).to("meta")
    for m in meta.modules():
        if isinstance(m, nn.Conv3d):
            m.register_forward_hook(count)
    with torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    return sum(flops) / 1e9


def sgemm_rate(n: int = 2048, repeats: int = 3) -> float:
    """The best GFLOP/s of torch's float32 n x n matrix product over `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stunet-s-totalseg", help="registry name (random weights) or bundled")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="torch,cpu_fast,openvino-fp32,openvino-bf16")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from segbook.cpu_fast import optimize_for_cpu
    from segbook.inference import _cpu_count
    from segbook.openvino_engine import OpenVINORunner
    from segbook.runners import tile_logits
    from segbook.zoo import create_model, get_config
    threads = args.threads or _cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pretrained = get_config(args.model).hub_repo is None       # bundled: its trained weights
    net = create_model(args.model, pretrained=pretrained).eval()
    patch = [int(p) for p in net.config.plan.patch_size]
    x = torch.randn(1, net.config.arch.input_channels, *patch)
    cache = Path(tempfile.mkdtemp(prefix="bench_tile_"))
    runners = {}
    for path in args.paths.split(","):
        t0 = time.perf_counter()
        if path == "torch":
            runners[path] = net
        elif path == "cpu_fast":
            fast = optimize_for_cpu(net)
            runners[path] = lambda t, f=fast: f(t.contiguous(memory_format=torch.channels_last_3d))
        elif path.startswith("openvino-"):
            r = OpenVINORunner(net, precision=path.split("-")[1], threads=threads, cache_root=cache)
            r.load()
            runners[path] = r
        print(f"{path:>14}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    times = {p: [] for p in runners}
    outs, sgemm = {}, []
    with torch.inference_mode():
        for _ in range(args.rounds):
            sgemm.append(sgemm_rate())
            for p, run in runners.items():
                t0 = time.perf_counter()
                y = tile_logits(run, x) if isinstance(run, OpenVINORunner) else run(x)
                times[p].append(time.perf_counter() - t0)
                outs[p] = y.float().numpy().copy()
                del y
    ref_name = "torch" if "torch" in outs else next(iter(outs))
    ref = outs[ref_name]
    base = statistics.median(times["cpu_fast"]) if "cpu_fast" in times else None
    gflop, peak = conv_gflop(net, x.shape), max(sgemm)
    print(f"model {args.model}, patch {patch}, {threads} threads, {args.rounds} rounds, torch {torch.__version__}")
    print(f"convolutions {gflop:.1f} GFLOP a tile; sgemm {', '.join(f'{r:.0f}' for r in sgemm)} GFLOP/s by round "
          f"(a tile at the best: {gflop / peak:.2f} s)")
    print(f"{'path':>14} {'s/tile':>8} {'vs cpu_fast':>11} {'GFLOP/s':>8} {'of sgemm':>9} {'argmax = ' + ref_name:>16} "
          f"{'max |dlogit|':>13}")
    for p, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{base / med:.2f}x" if base else "-"
        same = (outs[p].argmax(1) == ref.argmax(1)).mean()
        print(f"{p:>14} {med:8.2f} {ratio:>11} {gflop / med:8.0f} {100 * gflop / med / peak:8.0f}% "
              f"{100 * same:15.4f}% {np.abs(outs[p] - ref).max():13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
