"""`python -m segbook.demo --out demo_output`: segment a shipped hippocampus case with the shipped model.

The bundled model `hippocampus-demo` (segbook/data/models/) was trained by `segbook finetune` on the
Medical Segmentation Decathlon hippocampus task; the shipped cases (segbook/data/demo_cases/) were held
out of its training. The demo predicts one case through the same Predictor as `segbook predict`, prints
the Dice of each class against the case's label, and writes the segmentation (NIfTI + sidecar JSON) and a
PNG overlay of three orthogonal slices into the output folder.

Data: Medical Segmentation Decathlon Task04 Hippocampus, CC-BY-SA 4.0 (Antonelli et al., "The Medical
Segmentation Decathlon", Nature Communications 2022).
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

import numpy as np

MODEL = "hippocampus-demo"
DEFAULT_CASE = "hippocampus_001"
ATTRIBUTION = ("data: Medical Segmentation Decathlon Task04 Hippocampus, CC-BY-SA 4.0 "
               "(Antonelli et al., Nat. Commun. 2022)")


def cases_dir() -> Path:
    return Path(str(resources.files("segbook") / "data" / "demo_cases"))


def demo_cases() -> list[str]:
    return sorted(p.name[: -len("_image.nii.gz")] for p in cases_dir().glob("*_image.nii.gz"))


def save_overlay(image: np.ndarray, labels: np.ndarray, reference: np.ndarray, colors, path: Path,
                 title: str = "") -> Path:
    """PNG of three orthogonal slices through the labels' centre: image, prediction, reference contours.

    image, labels, reference: (z, y, x) arrays on the same grid; colors: RGB 0-255 per label value.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = np.argwhere(reference > 0) if reference.any() else np.argwhere(labels > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(image.shape) // 2
    lut = np.array([[*c, 0] if i == 0 else [*c, 255] for i, c in enumerate(colors)], dtype=float) / 255
    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    for ax, axis, name in zip(axes, range(3), ("axial (z)", "coronal (y)", "sagittal (x)")):
        take = lambda a: np.take(a, centre[axis], axis=axis)  # noqa: E731
        ax.imshow(take(image), cmap="gray", origin="lower")
        ax.imshow(lut[np.clip(take(labels), 0, len(lut) - 1)], alpha=0.45, origin="lower")
        ref = take(reference)
        for v in np.unique(ref[ref > 0]):
            ax.contour(ref == v, levels=[0.5], colors=[lut[v][:3]], linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title + "\nfill: SegBook prediction, lines: reference label", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_demo(out, case: str = DEFAULT_CASE, device: str = "auto") -> dict:
    """Segment `case`; returns {"dice": {class: value}, "segmentation": path, "overlay": path}."""
    from .inference import Predictor
    from .io import read_image, read_labels
    from .metrics import dice

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_path = cases_dir() / f"{case}_image.nii.gz"
    label_path = cases_dir() / f"{case}_label.nii.gz"
    if not image_path.is_file():
        from .errors import InputError
        raise InputError(f"no shipped demo case '{case}' (shipped: {', '.join(demo_cases())})")
    predictor = Predictor(MODEL, device=device)
    seg_path = out / f"{case}_seg.nii.gz"
    predictor.predict_file(image_path, seg_path)
    labels, _ = read_labels(seg_path)
    reference, _ = read_labels(label_path)
    image = read_image(image_path)[0][0]
    names = predictor.config.class_names
    scores = {names[c]: dice(labels == c, reference == c) for c in range(1, len(names))}
    title = f"{case}: " + ", ".join(f"{k} Dice {v:.3f}" for k, v in scores.items())
    overlay = save_overlay(image.astype(np.float32), labels.astype(np.int64), reference.astype(np.int64),
                           predictor.config.colors or [[0, 0, 0]] + [[255, 0, 0]] * (len(names) - 1),
                           out / f"{case}_overlay.png", title)
    return {"case": case, "dice": scores, "mean_dice": float(np.mean(list(scores.values()))),
            "segmentation": str(seg_path), "overlay": str(overlay)}


def main(argv=None) -> int:
    from .errors import SegBookError
    p = argparse.ArgumentParser(prog="python -m segbook.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--case", default=DEFAULT_CASE, help=f"shipped case (default {DEFAULT_CASE})")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        result = run_demo(args.out, args.case, args.device)
    except SegBookError as e:
        print(f"segbook demo: error: {e}", file=sys.stderr)
        return 2
    print(f"segmented {result['case']} with the shipped model '{MODEL}' ({ATTRIBUTION})")
    for name, value in result["dice"].items():
        print(f"  Dice {name:<10} {value:.4f}")
    print(f"  mean Dice    {result['mean_dice']:.4f}")
    print(f"wrote {result['segmentation']} and {result['overlay']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
