"""How wide and how high a correcting click's bump should be (segbook.interactive BUMP_SIGMA, BUMP_MARGIN).

The simulated user of bench_interactive.py (segbook.clicks) clicks 10 times on each structure of
`hippocampus-demo`'s *training* cases (the held-out ones are left for the benchmark), in one process through
`InteractiveSession` with the class named, for each width and margin asked; prints the mean Dice after
clicks 1-10 for each.

    .venv/bin/python benchmarks/tune_click_bump.py --cases 40 --sigma 2 3 4 5 --margin 0.5 1 2 4
    .venv/bin/python benchmarks/tune_click_bump.py --model /path/to/prompt-trained-folder   # same split

Every click carries the result of the click before as `previous`, as the worker's requests do (only a
prompt-taking model reads it).

`--oracle --held-out`: what no local correction can beat, on the held-out cases: from the automatic
result, each click flips the whole largest connected part of the larger error (the part the simulated user
clicks in), for clicks 2-10 (click 1 takes the automatic result).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
MODEL = ROOT / "SegBookCore" / "segbook" / "data" / "models" / "hippocampus-demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40, help="the first N training cases")
    ap.add_argument("--sigma", type=float, nargs="+", default=[3.0])
    ap.add_argument("--margin", type=float, nargs="+", default=[1.0])
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--held-out", action="store_true", help="the held-out cases instead of training ones")
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--tta", action="store_true", help="mirroring TTA on the clicks' tiles (the module's TTA box)")
    ap.add_argument("--model", type=Path, default=MODEL, help="a model folder of the same split (default: the "
                    "shipped hippocampus-demo)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "SegBookCore"))
    from segbook import interactive
    from segbook.clicks import dice, next_click
    from segbook.inference import Predictor
    held_out = set(json.loads((MODEL / "model.json").read_text())["provenance"]["data"]["validation_cases"])
    names = sorted(p.name[:-7] for p in (DATA / "labelsTr").glob("*.nii.gz"))
    cases = [c for c in names if (c in held_out) == args.held_out][:args.cases]
    predictor = Predictor(str(args.model), device="cpu")
    predictor.tta = args.tta
    images = []
    for case in cases:
        image = sitk.ReadImage(str(DATA / "imagesTr" / f"{case}.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labelsTr" / f"{case}.nii.gz")))
        images.append((sitk.GetArrayFromImage(image)[None].astype(np.float32), image.GetSpacing()[::-1], truth))
    classes = predictor.config.class_names
    if args.oracle:
        from scipy import ndimage
        curves = []
        for array, spacing, truth in images:
            labels = predictor.predict_array(array, spacing)
            for value in range(1, len(classes)):
                target = truth == value
                pred = labels == value
                row = [dice(pred, target)]
                for _ in range(args.clicks - 1):
                    missed, excess = target & ~pred, pred & ~target
                    region = missed if missed.sum() >= excess.sum() else excess
                    if region.any():
                        parts, _ = ndimage.label(region)
                        pred = pred ^ (parts == np.bincount(parts.ravel())[1:].argmax() + 1)
                    row.append(dice(pred, target))
                curves.append(row)
        print("oracle: " + " ".join(f"{v:.4f}" for v in np.mean(curves, axis=0)))
        return
    for sigma, margin in itertools.product(args.sigma, args.margin):
        interactive.BUMP_SIGMA, interactive.BUMP_MARGIN = sigma, margin
        interactive.BUMP_REACH = int(np.ceil(4 * sigma))
        curves = []
        for array, spacing, truth in images:
            session = interactive.InteractiveSession(predictor, array, spacing)
            for value in range(1, len(classes)):
                target, pred, pos, neg, row = truth == value, None, [], [], []
                for _ in range(args.clicks):
                    click = next_click(target, pred, spacing)
                    if click is None:
                        row.append(1.0)
                        continue
                    (pos if click[1] else neg).append(click[0])
                    pred, _ = session.segment(points=pos, negative_points=neg, previous=pred,
                                              class_name=classes[value])
                    row.append(dice(pred, target))
                curves.append(row)
        mean = np.mean(curves, axis=0)
        print(f"sigma {sigma:g} margin {margin:g}{' tta' if args.tta else ''}: " + " ".join(f"{v:.4f}" for v in mean), flush=True)


if __name__ == "__main__":
    main()
