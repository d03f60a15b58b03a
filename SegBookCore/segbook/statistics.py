"""Per-structure statistics of a label map over the image it was predicted from.

For each label value present: voxel count, volume (ml) and the image's mean, standard deviation, min and
max inside it, on the label map's own grid (the input image's grid; nothing is resampled). The work is one
vectorised pass over all voxels for every label at once (np.bincount with weights, ufunc.at for min/max),
in z-slabs so that float64 temporaries stay small; never one mask per class.

The standard deviation is the sample one (n - 1 in the denominator, as ITK's LabelStatisticsImageFilter
and VTK's vtkImageAccumulate, which Slicer's Segment Statistics uses); 0 for a single voxel.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "label_statistics", "write_csv", "csv_path"]

COLUMNS = ("label", "name", "voxels", "volume_ml", "mean", "std", "min", "max")
# Voxels per slab: the float64 temporaries (values, centred squares) stay near 150 MB in all.
_SLAB_VOXELS = 2 ** 22


def _slabs(shape):
    plane = int(np.prod(shape[1:])) or 1
    step = max(1, _SLAB_VOXELS // plane)
    return [slice(z, min(z + step, shape[0])) for z in range(0, shape[0], step)]


def label_statistics(labels: np.ndarray, image: np.ndarray, spacing, class_table=()) -> list[dict]:
    """Statistics of `image` inside each label of `labels`, one row (dict of COLUMNS) per label present.

    labels: (z, y, x) non-negative integers; image: (z, y, x) intensities on the same grid; spacing: voxel
    size in mm (any axis order, only the product is used); class_table: [{"value", "name"}, ...] for the
    names (a value it lacks is named `label_<value>`). Rows in increasing label order, background excluded.
    """
    labels, image = np.asarray(labels), np.asarray(image)
    if labels.shape != image.shape:
        raise ValueError(f"label map {labels.shape} and image {image.shape} differ in shape")
    if labels.size and labels.min() < 0:
        raise ValueError("label values must be non-negative")
    n = int(labels.max()) + 1 if labels.size else 1
    count = np.zeros(n, np.int64)
    total = np.zeros(n, np.float64)
    low = np.full(n, np.inf)
    high = np.full(n, -np.inf)
    slabs = _slabs(labels.shape)
    for s in slabs:
        lab, img = labels[s].ravel(), image[s].ravel().astype(np.float64)
        count += np.bincount(lab, minlength=n)
        total += np.bincount(lab, weights=img, minlength=n)
        np.minimum.at(low, lab, img)
        np.maximum.at(high, lab, img)
    mean = total / np.maximum(count, 1)
    # Second pass on centred values: sum(x^2) - n*mean^2 loses all digits when the spread is small
    # against the mean (e.g. MR intensities in the thousands).
    squares = np.zeros(n, np.float64)
    for s in slabs:
        lab = labels[s].ravel()
        squares += np.bincount(lab, weights=(image[s].ravel() - mean[lab]) ** 2, minlength=n)
    std = np.sqrt(squares / np.maximum(count - 1, 1))
    voxel_ml = float(np.prod([float(v) for v in spacing])) / 1000.0
    names = {int(c["value"]): c["name"] for c in class_table}
    return [{"label": v, "name": names.get(v, f"label_{v}"), "voxels": int(count[v]),
             "volume_ml": float(count[v] * voxel_ml), "mean": float(mean[v]), "std": float(std[v]),
             "min": float(low[v]), "max": float(high[v])}
            for v in range(1, n) if count[v]]


def csv_path(output: str | Path, suffix: str) -> Path:
    """seg.nii.gz (suffix ".nii.gz") -> seg.statistics.csv beside it."""
    output = Path(output)
    return output.with_name(output.name[: len(output.name) - len(suffix)] + ".statistics.csv")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One row per structure, columns COLUMNS; floats with enough digits to round-trip."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([repr(row[c]) if isinstance(row[c], float) and math.isfinite(row[c]) else row[c]
                             for c in COLUMNS])
