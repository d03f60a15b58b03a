"""Render the catalog images in this folder from real SegBook results (matplotlib; not the Slicer GUI).

    PYTHONPATH=SegBookCore python Screenshots/render.py

segment.png: the shipped `hippocampus-demo` model (segbook predict, CPU) on the held-out shipped case
hippocampus_001, three orthogonal slices, prediction filled, reference label as lines.
heldout.png: the same for all three shipped held-out cases, one row each.
Data: Medical Segmentation Decathlon Task04 Hippocampus, CC-BY-SA 4.0 (Antonelli et al., Nat. Commun. 2022);
the images are derived from it and carry the same licence (THIRD_PARTY_NOTICES.md).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTE = "rendered with matplotlib from SegBook's output; not a screenshot of the Slicer application"


def main() -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from segbook import demo
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in demo.demo_cases():
            result = demo.run_demo(Path(tmp) / case, case, device="cpu")
            rows.append(plt.imread(result["overlay"]))
            if case == demo.DEFAULT_CASE:
                # re-render the first case with the model's name and the note in its title
                from segbook.io import read_image, read_labels
                from segbook.zoo import get_config
                config = get_config(demo.MODEL)
                labels, _ = read_labels(result["segmentation"])
                reference, _ = read_labels(demo.cases_dir() / f"{case}_label.nii.gz")
                image = read_image(demo.cases_dir() / f"{case}_image.nii.gz")[0][0]
                scores = ", ".join(f"{k} Dice {v:.3f}" for k, v in result["dice"].items())
                demo.save_overlay(image.astype(np.float32), labels.astype(np.int64), reference.astype(np.int64),
                                  config.colors, HERE / "segment.png",
                                  f"SegBook '{demo.MODEL}' model on held-out MRI {case}: {scores}\n({NOTE})")
    stacked = np.concatenate(rows, axis=0)
    tmp_path = HERE / ".heldout.tmp.png"
    plt.imsave(tmp_path, stacked)
    os.replace(tmp_path, HERE / "heldout.png")
    print(f"wrote {HERE / 'segment.png'} and {HERE / 'heldout.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
