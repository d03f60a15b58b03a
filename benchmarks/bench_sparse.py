"""Benchmark: fine-tuning on partly annotated cases (nnU-Net v2's "ignore" label) vs full annotation.

On the Medical Segmentation Decathlon hippocampus data (`../shared/data/hippocampus`), the same training
cases and the same short recipe are trained with

- full labels;
- 1, 3 and 5 annotated axial slices per case (whole slices: structures and background), the rest "ignore".
  The slices are spread evenly over the structures' axial extent, as a user would pick them;
- simulated scribbles: the 3D skeleton of each structure plus a thin band of background around the
  structures (voxels 2-3 mm outside them), the rest "ignore".

Each variant is its own `segbook finetune` run (a subprocess, the real CLI), scored on held-out cases with
their full labels (Dice per structure, the real sliding-window predictor). Drawing effort: annotated voxels
(share of all voxels) and annotated slices per case.

    .venv/bin/python benchmarks/bench_sparse.py --out /work/runs/bench_sparse      # one thread, ~40 min

Figures and the exact command go to benchmarks/RESULTS.md ("Sparse annotation").
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
IGNORE = 3


def slice_label(seg: np.ndarray, n: int) -> np.ndarray:
    """Keep n whole axial slices (array axis 0) spread over the structures' extent; the rest IGNORE."""
    z = np.flatnonzero(seg.reshape(seg.shape[0], -1).any(1))
    picks = {int(round(z[0] + (z[-1] - z[0]) * (i + 1) / (n + 1))) for i in range(n)}
    keep = np.zeros(seg.shape[0], bool)
    keep[sorted(picks)] = True
    return np.where(keep[:, None, None], seg, IGNORE).astype(seg.dtype)


def scribble_label(seg: np.ndarray, spacing_zyx) -> np.ndarray:
    """Skeleton of each structure (its class) and a background band 2-3 mm outside all structures."""
    from scipy import ndimage
    from skimage.morphology import skeletonize
    out = np.full(seg.shape, IGNORE, seg.dtype)
    outside = ndimage.distance_transform_edt(seg == 0, sampling=spacing_zyx)
    out[(outside > 2) & (outside <= 3)] = 0
    for c in np.unique(seg):
        if c:
            out[skeletonize(seg == c) > 0] = c
    return out


def effort(sparse: np.ndarray) -> tuple[int, int, int]:
    """(annotated voxels, all voxels, axial slices holding any annotation)."""
    annotated = sparse != IGNORE
    return int(annotated.sum()), int(annotated.size), int(annotated.reshape(sparse.shape[0], -1).any(1).sum())


def make_variant(folder: Path, cases: list, kind: str) -> dict:
    """A raw nnU-Net folder for `kind` ("full", "slices1", "scribbles"...); images are symlinked."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    labels = {"background": 0, "anterior": 1, "posterior": 2}
    if kind != "full":
        labels["ignore"] = IGNORE
    (folder / "dataset.json").write_text(json.dumps({"name": f"hippocampus-{kind}", "channel_names": {"0": "MRI"},
                                                     "labels": labels, "file_ending": ".nii.gz"}))
    voxels = total = slices = 0
    for case in cases:
        link = folder / "imagesTr" / case.images[0].name
        if not link.exists():
            link.symlink_to(case.images[0])
        img = sitk.ReadImage(str(case.label))
        seg = sitk.GetArrayFromImage(img)
        if kind == "full":
            sparse = seg
            v, t, s = int(seg.size), int(seg.size), seg.shape[0]
        else:
            sparse = slice_label(seg, int(kind[6:])) if kind.startswith("slices") else \
                scribble_label(seg, img.GetSpacing()[::-1])
            v, t, s = effort(sparse)
        out = sitk.GetImageFromArray(sparse)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(folder / "labelsTr" / case.label.name))
        voxels, total, slices = voxels + v, total + t, slices + s
    return {"annotated_voxel_share": voxels / total, "annotated_slices_per_case": slices / len(cases)}


def score(model_dir: Path, cases: list) -> dict:
    from segbook.checkpoint import load_checkpoint
    from segbook.config import ModelConfig
    from segbook.training.validate import validate
    config = ModelConfig.load(model_dir / "model.json")
    val = validate(load_checkpoint(model_dir / "weights.safetensors"), config, cases)
    return {"dice": val["dice"], "mean_dice": val["mean_dice"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (variants, models, results.json)")
    ap.add_argument("--train-cases", type=int, default=20)
    ap.add_argument("--test-cases", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=["full", "slices1", "slices3", "slices5", "scribbles"])
    ap.add_argument("--recipe", default="--scratch --width 0.5 --epochs 4 --iterations-per-epoch 100 "
                                        "--patch-size 40 56 40 --batch-size 2",
                    help="segbook finetune flags shared by every variant")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "SegBookCore"))
    import torch
    from segbook.dataset import natural_key, read_dataset
    torch.set_num_threads(args.threads)
    ds = read_dataset(DATA)
    order = sorted(ds.cases, key=lambda c: natural_key(c.name))
    np.random.default_rng(0).shuffle(order)
    train, test = order[:args.train_cases], order[args.train_cases:args.train_cases + args.test_cases]
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["setup"] = {"train": [c.name for c in train], "test": [c.name for c in test], "recipe": args.recipe,
                        "threads": args.threads}
    for kind in args.variants:
        if kind in results and "mean_dice" in results[kind]:
            continue                          # a rerun continues where a stopped one left off
        folder, model = args.out / "data" / kind, args.out / "models" / kind
        info = make_variant(folder, train, kind)
        cmd = [sys.executable, "-m", "segbook", "finetune", str(folder), "-o", str(model), *args.recipe.split(),
               "--val-fraction", "0", "--threads", str(args.threads), "--num-workers", "1", "--progress", "none"]
        shutil.rmtree(model, ignore_errors=True)      # a run stopped half-way starts again
        t0 = time.monotonic()
        subprocess.run(cmd, check=True)
        info["train_seconds"] = round(time.monotonic() - t0, 1)
        info.update(score(model, test))
        results[kind] = info
        results_file.write_text(json.dumps(results, indent=1))
        print(kind, json.dumps(info), flush=True)
    full = results.get("full", {}).get("mean_dice")
    print(f"{'variant':<10} {'Dice ant':>9} {'Dice post':>9} {'mean':>7} {'of full':>8} {'voxels %':>9} "
          f"{'slices':>7} {'train s':>8}")
    for kind in args.variants:
        r = results[kind]
        rel = f"{r['mean_dice'] / full:8.3f}" if full else f"{'':8}"
        print(f"{kind:<10} {r['dice']['anterior']:9.4f} {r['dice']['posterior']:9.4f} {r['mean_dice']:7.4f} {rel} "
              f"{100 * r['annotated_voxel_share']:9.2f} {r['annotated_slices_per_case']:7.1f} "
              f"{r['train_seconds']:8.0f}")


if __name__ == "__main__":
    main()
