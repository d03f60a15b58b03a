"""Benchmark: `segbook.io.read_image` on a large real CT, this tree against a baseline tree (e.g. main).

The checked reading (gzip read to its CRC, byte counts, geometry) must not slow the normal path: both trees
read the same file in alternating fresh subprocesses (so neither profits from the other's warm imports),
`--repeat` times each; the median wall time of the read itself and its CPU time (all threads) are reported,
and the arrays are compared.

    .venv/bin/python benchmarks/bench_read.py --baseline ../main/SegBookCore
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT.parent / "shared" / "data" / "ct" / "chest_ct_512x512x139.nii.gz"

CHILD = r"""
import hashlib, json, sys, time
from segbook.io import read_image
t, c = time.perf_counter(), time.process_time()
array, geometry = read_image(sys.argv[1])
seconds, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": seconds, "cpu": cpu, "shape": list(array.shape), "sha": hashlib.sha1(array.tobytes()).hexdigest(),
                  "spacing": list(geometry.spacing)}))
"""


def read_once(core: Path, image: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(core), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(image)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="SegBookCore folder of the baseline tree")
    parser.add_argument("--image", type=Path, default=CASE)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": (ROOT / "SegBookCore").resolve()}
    runs = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, core in trees.items():
            runs[name].append(read_once(core, args.image))
    same = len({r["sha"] for rs in runs.values() for r in rs}) == 1
    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu"] for r in rs) for name, rs in runs.items()}
    print(f"image {args.image.name} {runs['this'][0]['shape']}, {args.repeat} reads per tree, alternating")
    for name in trees:
        times = sorted(r["seconds"] for r in runs[name])
        print(f"  {name:8s} median {med[name]:.3f} s  (min {times[0]:.3f}, max {times[-1]:.3f}), CPU {cpu[name]:.3f} s"
              f"  [{trees[name]}]")
    print(f"  ratio this/baseline {med['this'] / med['baseline']:.2f}; identical arrays: {same}")


if __name__ == "__main__":
    main()
