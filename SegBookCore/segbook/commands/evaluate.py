"""`segbook evaluate PREDICTIONS LABELS`: Dice and NSD per class and case, as a table and a CSV.

PREDICTIONS and LABELS are two label-map files, or two folders whose files are matched by name
(`case.nii.gz` in both; a `_seg`/`_pred` suffix on the prediction is ignored).

Partly annotated references (nnU-Net v2's "ignore" label): the voxels of `--ignore-label`, by default the
"ignore" value named in the dataset.json of the raw folder when LABELS is its `labelsTr`, count in no
metric; Dice is computed on the annotated voxels and NSD is not defined there (NaN).
"""
from __future__ import annotations

import csv
from pathlib import Path

HELP = "Dice and normalised surface Dice per class and case of predicted vs reference label maps"

_ENDINGS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def add_arguments(p) -> None:
    p.add_argument("predictions", help="label map file or folder of them")
    p.add_argument("labels", help="reference label map file or folder (matched by file name)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="label values to score (default: every non-zero value in the references)")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="reference value of unannotated voxels, scored nowhere (default: the 'ignore' of "
                        "LABELS/../dataset.json when LABELS is an nnU-Net labelsTr folder, else none)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--csv", default=None,
                   help="CSV to write (default: evaluation.csv in the predictions folder, or beside the file)")


def _stem(name: str) -> str:
    for e in _ENDINGS:
        if name.endswith(e):
            name = name[: -len(e)]
            break
    for suffix in ("_seg", "_pred", "_label"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pairs(pred: Path, ref: Path) -> list[tuple[str, Path, Path]]:
    from ..errors import InputError
    from ..io import check_exists
    for path in (pred, ref):
        check_exists(path)
    if pred.is_file() and ref.is_file():
        return [(_stem(ref.name), pred, ref)]
    if not (pred.is_dir() and ref.is_dir()):
        raise InputError(f"{pred} and {ref}: give two label files or two folders")
    refs = {_stem(p.name): p for p in sorted(ref.iterdir()) if p.name.endswith(_ENDINGS)}
    preds = {_stem(p.name): p for p in sorted(pred.iterdir()) if p.name.endswith(_ENDINGS)}
    common = sorted(set(refs) & set(preds))
    if not common:
        raise InputError(f"{pred}: no file matches a reference in {ref} by name")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise InputError(f"{pred}: no prediction for {len(missing)} reference case(s), e.g. {missing[0]}")
    return [(k, preds[k], refs[k]) for k in common]


def _dataset_ignore_label(ref: Path) -> int | None:
    """The "ignore" value of the nnU-Net raw folder whose labelsTr is LABELS, if it names one."""
    if not (ref.is_dir() and ref.name == "labelsTr" and (ref.parent / "dataset.json").is_file()):
        return None
    from ..dataset import read_dataset
    return read_dataset(ref.parent).ignore_label


def run(args) -> int:
    import numpy as np
    from ..errors import InputError
    from ..io import check_writable, read_labels
    from ..metrics import evaluate_case, mean_defined

    if not (np.isfinite(args.tolerance) and args.tolerance >= 0):     # NSD was 0 for any such value
        raise InputError(f"--tolerance must be a distance of 0 mm or more, got {args.tolerance}")
    pred_root, ref_root = Path(args.predictions), Path(args.labels)
    out = Path(args.csv) if args.csv else (pred_root if pred_root.is_dir() else pred_root.parent) / "evaluation.csv"
    check_writable(out)                     # before reading any label map
    ignore = args.ignore_label if args.ignore_label is not None else _dataset_ignore_label(ref_root)
    rows = []
    for case, p, r in _pairs(pred_root, ref_root):
        pred, pred_geo = read_labels(p)
        ref, ref_geo = read_labels(r)
        if pred.shape != ref.shape:
            raise InputError(f"case {case}: prediction shape {pred.shape[::-1]} differs from reference "
                             f"{ref.shape[::-1]} (x, y, z)")
        if not np.allclose(pred_geo.spacing, ref_geo.spacing, rtol=1e-4, atol=1e-4):
            raise InputError(f"case {case}: prediction spacing {pred_geo.spacing} differs from "
                             f"reference {ref_geo.spacing}")
        classes = args.classes or [int(v) for v in np.unique(ref) if v not in (0, ignore)]
        spacing = ref_geo.spacing_zyx
        for c, m in evaluate_case(pred, ref, classes, spacing, args.tolerance, ignore).items():
            rows.append({"case": case, "class": c, "dice": m["dice"], "nsd": m["nsd"]})
    classes = sorted({r["class"] for r in rows})
    width = max(len("mean"), *(len(r["case"]) for r in rows))
    header = f"{'case':<{width}}  " + "  ".join(f"{'Dice ' + str(c):>8} {'NSD ' + str(c):>8}" for c in classes)
    print(header)
    for case in dict.fromkeys(r["case"] for r in rows):
        by_class = {r["class"]: r for r in rows if r["case"] == case}
        cells = [f"{by_class[c]['dice']:8.4f} {by_class[c]['nsd']:8.4f}" if c in by_class else f"{'':8} {'':8}"
                 for c in classes]
        print(f"{case:<{width}}  " + "  ".join(cells))
    means = {c: (mean_defined([r["dice"] for r in rows if r["class"] == c]),
                 mean_defined([r["nsd"] for r in rows if r["class"] == c])) for c in classes}
    print(f"{'mean':<{width}}  " + "  ".join(f"{means[c][0]:8.4f} {means[c][1]:8.4f}" for c in classes))
    from ..atomic import atomic_write
    with atomic_write(out, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "dice", "nsd"])
        writer.writeheader()
        writer.writerows(rows)
        for c in classes:
            writer.writerow({"case": "mean", "class": c, "dice": means[c][0], "nsd": means[c][1]})
    print(f"written {out}")
    return 0
