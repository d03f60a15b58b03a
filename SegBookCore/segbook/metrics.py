"""Segmentation metrics per class: Dice and normalised surface Dice (NSD).

Label maps are (z, y, x) integer arrays on the same grid; spacing is (z, y, x) mm.

- Dice = 2 |P & G| / (|P| + |G|); NaN when the class is absent from both (nnU-Net reports it as NaN too,
  and means skip it).
- NSD at tolerance tau mm (Nikolov et al. 2021, the Decathlon's second metric), voxel form: the border
  voxels of each mask (the mask minus its 6-connected erosion) are counted; NSD = (border voxels of P
  within tau of G's border + border voxels of G within tau of P's border) / (all border voxels of P and G).
  Distances are Euclidean in mm between voxel centres. 1 when both are empty, 0 when one is.

A reference with unannotated voxels (nnU-Net v2's "ignore" label, `ignore_label`): Dice counts only the
annotated voxels, as nnU-Net's evaluation does (prediction and reference both masked). NSD is NaN there: a
structure's surface is unknown where its neighbourhood is not annotated.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dice", "surface_dice", "evaluate_case", "mean_defined"]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN if both are empty."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    total = p.sum() + r.sum()
    if total == 0:
        return float("nan")
    return float(2.0 * np.logical_and(p, r).sum() / total)


def _border(mask: np.ndarray) -> np.ndarray:
    # erosion with zero padding: voxels at the array edge count as border
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float = 1.0) -> float:
    """Normalised surface Dice of two boolean (z, y, x) masks at `tolerance_mm`."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    if not p.any() and not r.any():
        return 1.0
    if not p.any() or not r.any():
        return 0.0
    bp, br = _border(p), _border(r)
    # distance of every voxel to the nearest border voxel of the other mask
    dist_to_r = ndimage.distance_transform_edt(~br, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=spacing)
    close = (dist_to_r[bp] <= tolerance_mm).sum() + (dist_to_p[br] <= tolerance_mm).sum()
    return float(close / (bp.sum() + br.sum()))


def evaluate_case(pred: np.ndarray, ref: np.ndarray, classes, spacing=(1.0, 1.0, 1.0),
                  tolerance_mm: float = 1.0, ignore_label: int | None = None) -> dict[int, dict[str, float]]:
    """{class value: {"dice": ..., "nsd": ...}} for each value in `classes`; voxels of `ignore_label` in
    `ref` count in neither (module docstring)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    annotated = None if ignore_label is None else ref != ignore_label
    if annotated is not None and annotated.all():
        annotated = None                      # fully annotated after all: every metric is defined
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
        if annotated is None:
            out[int(c)] = {"dice": dice(p, r), "nsd": surface_dice(p, r, spacing, tolerance_mm)}
        else:
            out[int(c)] = {"dice": dice(p & annotated, r), "nsd": float("nan")}
    return out


def mean_defined(values) -> float:
    """Mean of the values that are not NaN; NaN, without numpy's warning, when none is."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
