"""Fidelity of the engines and precisions on a trained network: the shipped `hippocampus-demo` model on real
hippocampus MRI cases (../shared/data/hippocampus), each path against torch fp32.

    .venv/bin/python benchmarks/bench_precision.py           # the 42 held-out cases of its fine-tuning

Per path: identical voxels to torch fp32 (mean and minimum over the cases) and the mean Dice of labels 1 and
2 against the reference labels. Random weights exaggerate reduced precision (near-ties of the logits
everywhere), which is why this uses the trained model.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SegBookCore"))
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    s = x.sum() + y.sum()
    return 1.0 if s == 0 else 2.0 * (x & y).sum() / s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=42, help="how many of the 42 held-out cases")
    parser.add_argument("--data", default=str(DATA), help="the hippocampus dataset (imagesTr/, labelsTr/)")
    parser.add_argument("--paths", default="torch:fp32,openvino:fp32,openvino:bf16,torch:bf16")
    args = parser.parse_args()
    from segbook.inference import Predictor
    from segbook.io import read_image, read_labels
    from segbook.zoo import get_config
    data = get_config("hippocampus-demo").provenance["data"]
    data = ast.literal_eval(data) if isinstance(data, str) else data
    # the cases held out from the demo model's fine-tuning
    root = Path(args.data)
    images = [root / "imagesTr" / f"{c}.nii.gz" for c in data["validation_cases"][:args.cases]]
    paths = [tuple(p.split(":")) for p in args.paths.split(",")]
    predictors = {p: Predictor("hippocampus-demo", device="cpu", backend=p[0], precision=p[1]) for p in paths}
    rows = {p: {"same": [], "dice": [], "s": 0.0} for p in paths}
    for img in images:
        image, geometry = read_image(img)
        truth, _ = read_labels(root / "labelsTr" / img.name)
        labels = {}
        for p, predictor in predictors.items():
            t0 = time.perf_counter()
            labels[p] = predictor.predict_array(image, geometry.spacing_zyx)
            rows[p]["s"] += time.perf_counter() - t0
        ref = labels[paths[0]]
        for p in paths:
            rows[p]["same"].append(float((labels[p] == ref).mean()))
            rows[p]["dice"].append(np.mean([dice(labels[p], truth, k) for k in (1, 2)]))
        print(img.name, " ".join(f"{':'.join(p)} {100 * rows[p]['same'][-1]:.3f}%" for p in paths), flush=True)
    print(f"hippocampus-demo, {len(images)} cases ({images[0].name} .. {images[-1].name}), vs {':'.join(paths[0])}")
    print(f"{'path':>14} {'identical mean':>15} {'min':>9} {'mean Dice':>10} {'seconds':>8}")
    for p in paths:
        r = rows[p]
        print(f"{':'.join(p):>14} {100 * np.mean(r['same']):14.4f}% {100 * min(r['same']):8.4f}% "
              f"{np.mean(r['dice']):10.4f} {r['s']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
