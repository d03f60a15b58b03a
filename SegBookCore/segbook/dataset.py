"""Training datasets: find the cases of a dataset folder or list, and check them before any training.

Two layouts are read:

1. An nnU-Net v2 / Medical Segmentation Decathlon raw folder::

       DATASET/dataset.json   {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                               "file_ending": ".nii.gz"}        (nnU-Net v2)
                           or {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a"},
                               "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}
                                                                (Decathlon)
                           "labels" may also name an "ignore" label (nnU-Net v2's sparse annotation:
                           {"background": 0, "a": 1, "ignore": 2}); it must be the highest value
       DATASET/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz ...  (one file per channel), or CASE.nii.gz
       DATASET/labelsTr/CASE.nii.gz

2. A JSON list of image/label pairs with class names (what the Slicer panel writes)::

       {"class_names": ["background", "liver", "tumor"],      # index = label value, 0 is background
        "channel_names": ["CT"],                               # optional; default from the first case
        "ignore": 3,                                           # optional: unannotated voxels (= len(class_names))
        "cases": [{"name": "case1",                            # optional; default: label file stem
                   "image": "case1.nrrd",                      # or a list of files, one per channel
                   "label": "case1_seg.nrrd"}, ...]}

   Relative paths are relative to the JSON file.

Label values must be 0..N-1 (index into the class names), plus the ignore value N where one is named:
voxels holding it are not annotated and count in no loss and no metric (the network has N outputs, no
"ignore" class). `check_dataset` reads every header and label
and raises InputError with one line naming the case and the problem.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["Case", "Dataset", "read_dataset", "check_dataset", "read_case_arrays", "check_label_values"]

log = logging.getLogger(__name__)

_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".nhdr")


@dataclass
class Case:
    name: str
    images: list[Path]          # one file per input channel, in channel order
    label: Path


@dataclass
class Dataset:
    name: str
    class_names: list[str]      # index = label value
    channel_names: list[str]
    cases: list[Case]
    source: str = ""
    extra: dict = field(default_factory=dict)
    ignore_label: int | None = None     # value of unannotated voxels (== num_classes), None: all annotated

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _strip_ending(name: str) -> str:
    for e in sorted(_ENDINGS, key=len, reverse=True):
        if name.endswith(e):
            return name[: -len(e)]
    return Path(name).stem


def _class_names_from_labels(labels: dict, where: str) -> tuple[list[str], int | None]:
    """nnU-Net v2 `{name: value}` or Decathlon `{"value": name}` -> (names indexed by value, ignore value).

    An entry named "ignore" is not a class: its value must be an integer one above the highest class
    value, as nnU-Net's LabelManager requires."""
    decathlon = all(str(k).lstrip("-").isdigit() for k in labels)
    pairs = [(v, k) for k, v in labels.items()] if decathlon else list(labels.items())   # (name, value)
    ignore = [v for n, v in pairs if str(n) == "ignore"]
    try:
        by_value = {int(v): str(n) for n, v in pairs if str(n) != "ignore"}
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'labels' must map names to integer values (regions are not supported)") from None
    if sorted(by_value) != list(range(len(by_value))):
        raise InputError(f"{where}: label values must be 0..{len(by_value) - 1}, got {sorted(by_value)}")
    if decathlon and ignore:
        ignore = [int(ignore[0])]
    return [by_value[i] for i in range(len(by_value))], _ignore_value(ignore[0] if ignore else None,
                                                                      len(by_value), where)


def _ignore_value(value, num_classes: int, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: 'ignore' must be an integer label value, got {value!r}")
    if value != num_classes:
        raise InputError(f"{where}: the 'ignore' label must be the highest value, {num_classes} (one above the "
                         f"classes 0..{num_classes - 1}), got {value}")
    return value


def _read_raw_folder(folder: Path) -> Dataset:
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{meta_path}: cannot read ({e})") from None
    if "labels" not in meta:
        raise InputError(f"{meta_path}: no 'labels'")
    class_names, ignore = _class_names_from_labels(meta["labels"], str(meta_path))
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "image"}
    channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not labels_dir.is_dir():
        raise InputError(f"{folder}: no labelsTr folder")
    ending = meta.get("file_ending")
    if ending is None:
        ending = next((e for e in _ENDINGS if any(labels_dir.glob("*" + e))), ".nii.gz")
    cases = []
    for label in sorted(labels_dir.glob("*" + ending)):
        if label.name.startswith("."):
            continue  # macOS resource forks in Decathlon archives
        name = label.name[: -len(ending)]
        suffixed = [images_dir / f"{name}_{c:04d}{ending}" for c in range(len(channel_names))]
        plain = images_dir / f"{name}{ending}"
        if all(p.is_file() for p in suffixed):
            images = suffixed
        elif len(channel_names) == 1 and plain.is_file():
            images = [plain]
        else:
            missing = next((p for p in suffixed if not p.is_file()), suffixed[0])
            raise InputError(f"case {name}: label {label.name} has no image ({missing.name} or {plain.name} "
                             f"not found in {images_dir})")
        cases.append(Case(name, images, label))
    return Dataset(str(meta.get("name", folder.name)), class_names, channel_names, cases, source=str(folder),
                   ignore_label=ignore)


def _read_list(path: Path) -> Dataset:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict) or "cases" not in meta or "class_names" not in meta:
        raise InputError(f"{path}: expected {{\"class_names\": [...], \"cases\": [{{\"image\", \"label\"}}...]}}")
    class_names = [str(c) for c in meta["class_names"]]
    ignore = _ignore_value(meta.get("ignore"), len(class_names), str(path))
    cases = []
    for i, entry in enumerate(meta["cases"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(f"{path}: case {i} needs 'image' and 'label'")
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [(path.parent / p) for p in images]
        label = path.parent / entry["label"]
        name = str(entry.get("name") or _strip_ending(label.name))
        cases.append(Case(name, images, label))
    n_channels = len(cases[0].images) if cases else 1
    channel_names = [str(c) for c in meta.get("channel_names", [f"channel {i}" for i in range(n_channels)])]
    return Dataset(str(meta.get("name", path.stem)), class_names, channel_names, cases, source=str(path),
                   ignore_label=ignore)


def read_dataset(path) -> Dataset:
    """The cases of a raw folder or a JSON list (see module docstring); no image is read yet."""
    path = Path(path)
    meta = path / "dataset.json" if path.is_dir() else path
    try:
        if path.is_dir():
            if not (path / "dataset.json").is_file():
                raise InputError(f"{path}: no dataset.json (expected an nnU-Net/Decathlon raw folder)")
            ds = _read_raw_folder(path)
        elif path.is_file() and path.suffix == ".json":
            ds = _read_list(path)
        else:
            raise InputError(f"{path}: not a dataset folder or a .json case list")
    except InputError:
        raise
    except (TypeError, AttributeError, KeyError, ValueError) as e:   # a field of the wrong kind
        raise InputError(f"{meta}: unexpected content ({type(e).__name__}: {e}); see the formats in "
                         f"`segbook finetune --help`") from None
    if len(ds.class_names) < 2:
        raise InputError(f"{path}: needs background and at least one class, got {ds.class_names}")
    names = [c.name for c in ds.cases]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InputError(f"{path}: case name '{dup}' appears twice")
    return ds


def _header(path: Path, case: str, what: str) -> sitk.ImageFileReader:
    if not path.is_file():
        raise InputError(f"case {case}: {what} {path} not found")
    from .imagefile import check_file
    try:
        reader = check_file(path)           # truncated or damaged files, invalid geometry: refused here
    except InputError as e:
        raise InputError(f"case {case}: {what} {e}") from None
    except RuntimeError as e:
        raise InputError(f"case {case}: cannot read {what} {path} ({str(e).strip().splitlines()[-1]})") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise InputError(f"case {case}: {what} {path.name} is not a 3D scalar image "
                         f"({reader.GetDimension()}D, {reader.GetNumberOfComponents()} components)")
    return reader


def _same_geometry(a: sitk.ImageFileReader, b: sitk.ImageFileReader) -> str | None:
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} vs image {a.GetSize()}"
    for what, x, y, tol in (("spacing", a.GetSpacing(), b.GetSpacing(), 1e-3),
                            ("origin", a.GetOrigin(), b.GetOrigin(), 1e-2),
                            ("direction", a.GetDirection(), b.GetDirection(), 1e-3)):
        if not np.allclose(x, y, atol=tol, rtol=1e-4):
            return f"{what} {tuple(round(v, 4) for v in y)} vs image {tuple(round(v, 4) for v in x)}"
    return None


def check_dataset(ds: Dataset, expected_channels: int | None = None, min_cases: int = 2,
                  read_labels: bool = True) -> None:
    """Raise InputError (one line naming the case) on the first problem; reads headers and label maps.

    Problems: fewer than `min_cases` cases, a missing or unreadable image, a channel count that differs
    from `expected_channels` (the base model's), a label whose geometry differs from its image, label
    values outside 0..num_classes-1 (and the ignore value), a label with every voxel "ignore", an empty
    (all background) label.
    """
    if len(ds.cases) < min_cases:
        raise InputError(f"{ds.source}: {len(ds.cases)} case(s); fine-tuning needs at least {min_cases}")
    for case in ds.cases:
        if expected_channels is not None and len(case.images) != expected_channels:
            raise InputError(f"case {case.name}: {len(case.images)} image channel(s), the base model takes "
                             f"{expected_channels}")
        label = _header(case.label, case.name, "label")
        for image_path in case.images:
            problem = _same_geometry(_header(image_path, case.name, "image"), label)
            if problem:
                raise InputError(f"case {case.name}: label geometry differs from image {image_path.name} ({problem})")
        if read_labels:
            # GetArrayFromImage, not the view: a view of a temporary image reads freed memory
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
            check_label_values(seg, ds, case.name)


def check_label_values(seg: np.ndarray, ds: Dataset, case: str) -> None:
    if not np.issubdtype(seg.dtype, np.integer):
        if not np.all(np.mod(seg, 1) == 0):
            raise InputError(f"case {case}: label map has non-integer values")
    values = np.unique(seg)
    allowed = ds.num_classes + (ds.ignore_label is not None)
    bad = [int(v) for v in values if v < 0 or v >= allowed]
    if bad:
        names = ", ".join(ds.class_names + (["ignore"] if ds.ignore_label is not None else []))
        raise InputError(f"case {case}: label values {bad} not in the class list (0..{allowed - 1}: {names})")
    if ds.ignore_label is not None:
        if values.tolist() == [ds.ignore_label]:
            raise InputError(f"case {case}: every voxel is 'ignore' (value {ds.ignore_label}): nothing is annotated")
        values = values[values != ds.ignore_label]
    if values.max(initial=0) == 0:
        raise InputError(f"case {case}: empty label map (background only)")


def read_case_arrays(case: Case) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """image (C, z, y, x) float32, label (z, y, x) int16, spacing (z, y, x) mm, as stored on disk."""
    from .io import read_image, read_labels
    try:
        channels = [read_image(p)[0] for p in case.images]
        label, geometry = read_labels(case.label)
    except InputError as e:
        raise InputError(f"case {case.name}: {e}") from None
    return np.concatenate(channels), label.astype(np.int16), geometry.spacing_zyx


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
