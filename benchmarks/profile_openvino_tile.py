"""Where an OpenVINO tile's time goes: the network body as the CPU runner converts it (without its head), one
tile at a time with OpenVINO's per-layer counters, grouped by layer kind, beside this CPU's best float32
matrix product (bench_tile.sgemm_rate) for what the convolutions could reach.

    .venv/bin/python benchmarks/profile_openvino_tile.py                    # STU-Net-S, random weights, 128^3
    .venv/bin/python benchmarks/profile_openvino_tile.py --model hippocampus-demo --rounds 5
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SegBookCore"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stunet-s-totalseg", help="registry name (random weights) or bundled")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="how many single layers to list")
    args = parser.parse_args()

    import openvino as ov
    import torch
    from bench_tile import sgemm_rate
    from segbook.inference import _cpu_count
    from segbook.openvino_engine import OpenVINORunner
    from segbook.zoo import create_model, get_config
    threads = _cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = create_model(args.model, pretrained=get_config(args.model).hub_repo is None).eval()
    runner = OpenVINORunner(net, threads=threads, cache_root=Path(tempfile.mkdtemp(prefix="profile_ov_")))
    runner.load()
    core = ov.Core()
    model = core.read_model(str(runner.folder / "model.xml"))
    gflop = 0.0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            out = op.get_output_partial_shape(0).to_shape()
            weight = op.input_value(1).get_partial_shape().to_shape()
            gflop += 2 * np.prod(list(out)) * np.prod(list(weight)[1:]) / 1e9
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES",
              "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).standard_normal(list(request.model_inputs[0].shape)).astype(np.float32)
    best, kinds, layers = None, None, None
    for _ in range(args.rounds):
        rate = sgemm_rate()
        t0 = time.perf_counter()
        request.infer({0: x})
        seconds = time.perf_counter() - t0
        print(f"tile {seconds:.2f} s, sgemm {rate:.0f} GFLOP/s", flush=True)
        if best is None or seconds < best[0]:
            kinds, layers = collections.Counter(), []
            for p in request.profiling_info:
                s = p.real_time.total_seconds()
                kinds[(p.node_type, p.exec_type)] += s
                layers.append((s, p.node_type, p.node_name))
            best = (seconds, rate)
    seconds, rate = best
    total = sum(kinds.values())
    conv = sum(v for (kind, _), v in kinds.items() if kind == "Convolution")
    print(f"model {args.model}, patch {list(runner.patch)}, {threads} threads, OpenVINO {ov.__version__}")
    print(f"body without the head: {gflop:.1f} GFLOP of convolutions; fastest tile {seconds:.2f} s "
          f"(its layers add up to {total:.2f} s)")
    print(f"convolutions {conv:.2f} s = {gflop / conv:.0f} GFLOP/s, {100 * gflop / conv / rate:.0f} % of this "
          f"round's sgemm ({rate:.0f} GFLOP/s); the rest {total - conv:.2f} s")
    for (kind, impl), s in kinds.most_common():
        if s >= 0.001:
            print(f"  {s:7.3f} s {100 * s / total:5.1f} %  {kind} ({impl})")
    for s, kind, name in sorted(layers, reverse=True)[:args.top]:
        print(f"  {s:7.3f} s  {kind}  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
