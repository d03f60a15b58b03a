"""Preprocess each training case once and keep it on disk, memory-mapped by the loaders.

A cached case is `NAME_image.npy` (C, z, y, x) float32 and `NAME_seg.npy` (1, z, y, x) int16 at the plan
spacing (cropped to non-zero, normalised, resampled with `segbook.preprocess`, the same code the
predictor runs), plus `NAME_loc.npz`: up to 10,000 voxel coordinates (n, 3) zyx per foreground class, so
that foreground oversampling never scans a volume; for a dataset with an "ignore" label also those of the
annotated voxels (key ANNOTATED), around which the other patches are drawn. A key file holds the source files' sizes and mtimes
and the plan; a changed case is preprocessed again, and so is a damaged one (a file cut short, a garbled
archive: checked cheaply at each use), with a warning. Every file is written verified and atomically, the
key file last.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_write, short_write_reason, write_text
from ..config import Plan
from ..dataset import Case, Dataset, check_label_values, read_case_arrays
from ..errors import InputError
from ..preprocess import compute_new_shape, nearest_indices, preprocess, separate_axis

__all__ = ["CachedCase", "cache_dataset", "resample_seg", "class_locations", "ANNOTATED"]

log = logging.getLogger(__name__)

MAX_LOCATIONS = 10_000
ANNOTATED = -1      # locations key of the voxels that are not "ignore" (any class, background included)


@dataclass
class CachedCase:
    name: str
    image_path: Path
    seg_path: Path
    locations: dict[int, np.ndarray]      # class value -> (n, 3) zyx voxel coordinates

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        mode = "r" if mmap else None
        return np.load(self.image_path, mmap_mode=mode), np.load(self.seg_path, mmap_mode=mode)


def resample_seg(seg: np.ndarray, new_shape, axis: int | None) -> np.ndarray:
    """(z, y, x) label map -> new_shape, nnU-Net style: each label's mask resampled linearly and
    thresholded at 0.5, later labels overwriting earlier ones; nearest along a separate (coarse) axis."""
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape == new_shape:
        return seg
    out = np.zeros(new_shape, dtype=seg.dtype)
    if axis is not None:
        # nearest along the coarse axis first, then linear per label in-plane
        index = nearest_indices(seg.shape[axis], new_shape[axis])
        seg = np.take(seg, index, axis=axis)
    factors = [n / s for n, s in zip(new_shape, seg.shape)]
    for value in np.unique(seg):
        if value == 0:
            continue
        mask = ndimage.zoom((seg == value).astype(np.float32), factors, order=1, mode="nearest", grid_mode=True)
        out[mask >= 0.5] = value
    return out


def class_locations(seg: np.ndarray, values, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to MAX_LOCATIONS random (n, 3) zyx coordinates of each class value in a (z, y, x) map."""
    return {int(v): _some_coordinates(seg == v, rng) for v in values}


def _some_coordinates(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    coords = np.argwhere(mask)
    if len(coords) > MAX_LOCATIONS:
        coords = coords[rng.choice(len(coords), MAX_LOCATIONS, replace=False)]
    return coords.astype(np.int32)


def _key(case: Case, plan: Plan, ignore_label: int | None) -> str:
    spec = {"spacing": plan.spacing, "norm": plan.normalization, "ct": plan.ct_intensities,
            "crop": plan.crop_to_nonzero, "v": 1}
    if ignore_label is not None:   # the locations differ; caches of fully annotated data stay valid
        spec["ignore"] = ignore_label
    parts = [json.dumps(spec, sort_keys=True)]
    for p in [*case.images, case.label]:
        st = os.stat(p)
        parts.append(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save through a verified atomic write: the file read back (memory-mapped) has the array's shape."""
    def verify(tmp: Path) -> None:
        try:
            ok = np.load(tmp, mmap_mode="r").shape == array.shape
        except (ValueError, OSError) as e:     # numpy: "mmap length is greater than file size"
            raise OSError(errno.EIO, short_write_reason(tmp, f"incomplete array file ({e})")) from None
        if not ok:
            raise OSError(errno.EIO, "the array read back has another shape")
    with atomic_write(path, verify=verify, suffix=".npy") as tmp:
        np.save(tmp, array)


def _save_locations(path: Path, locations: dict) -> None:
    def verify(tmp: Path) -> None:
        if _read_locations(tmp) is None:
            raise OSError(errno.EIO, short_write_reason(tmp, "incomplete archive"))
    with atomic_write(path, verify=verify, suffix=".npz") as tmp:
        np.savez(tmp, **{str(k): v for k, v in locations.items()})


def _read_locations(path: Path) -> dict | None:
    """The class locations of a case, or None when the file is missing or damaged (every array is read,
    so zip's CRC checks them)."""
    try:
        with np.load(path) as loc:
            return {int(k): loc[k] for k in loc.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None


def _load_cached(folder: Path, name: str) -> CachedCase | None:
    """A case cached earlier, or None when one of its files is missing or damaged (checked cheaply: the
    arrays' headers against their file sizes, the locations read)."""
    cached = CachedCase(name, folder / f"{name}_image.npy", folder / f"{name}_seg.npy", {})
    try:
        image, seg = cached.load(mmap=True)
        if image.ndim != 4 or seg.ndim != 4 or image.shape[1:] != seg.shape[1:]:
            return None
    except (OSError, ValueError, EOFError):
        return None
    locations = _read_locations(folder / f"{name}_loc.npz")
    if locations is None:
        return None
    cached.locations = locations
    return cached


def _preprocess_case(case: Case, ds: Dataset, plan: Plan, folder: Path) -> CachedCase:
    image, seg, spacing = read_case_arrays(case)
    check_label_values(seg, ds, case.name)
    if not np.isfinite(image).all():
        raise InputError(f"case {case.name}: image holds NaN or infinite values")
    pre = preprocess(image, spacing, plan)
    seg = seg[tuple(slice(lo, hi) for lo, hi in pre.bbox)]
    new_shape = compute_new_shape(seg.shape, spacing, plan.spacing)
    seg = resample_seg(seg, new_shape, separate_axis(spacing, plan.spacing))
    rng = np.random.default_rng(int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16))
    locations = class_locations(seg, range(1, ds.num_classes), rng)
    if ds.ignore_label is not None:
        locations[ANNOTATED] = _some_coordinates(seg != ds.ignore_label, rng)
    cached = CachedCase(case.name, folder / f"{case.name}_image.npy", folder / f"{case.name}_seg.npy", locations)
    _atomic_save(cached.image_path, pre.data.astype(np.float32))
    _atomic_save(cached.seg_path, seg[None])
    _save_locations(folder / f"{case.name}_loc.npz", locations)
    return cached


def cache_dataset(ds: Dataset, cases: list[Case], plan: Plan, folder, reporter=None) -> list[CachedCase]:
    """Preprocess `cases` of `ds` into `folder` (skipping those cached with the same key)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, case in enumerate(cases):
        key_file = folder / f"{case.name}.key"
        key = _key(case, plan, ds.ignore_label)
        fresh = key_file.is_file() and key_file.read_text() == key
        cached = _load_cached(folder, case.name) if fresh else None
        if cached is None:
            if fresh:
                log.warning("%s: the cached case %s is damaged; preprocessing it again", folder, case.name)
            key_file.unlink(missing_ok=True)     # written again last, once the case's files are complete
            cached = _preprocess_case(case, ds, plan, folder)
            write_text(key_file, key)
        out.append(cached)
        if reporter is not None:
            reporter.progress("preprocess", i + 1, len(cases))
    return out
