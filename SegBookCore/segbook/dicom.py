"""DICOM series folders as they come from PACS exports: pick one series, check its slices form one grid.

A folder holding several series is refused with the list of them (UID, description, slice count, size) unless
one is chosen (`series=UID`). The slices of a series must form one regular grid: same size, pixel spacing and
orientation, one slice per position, equal steps. A missing slice (a step about twice the others), a duplicate
position, mixed sizes or orientations, or unequal steps are refused with the positions named (the tolerance is
Slicer's DICOMScalarVolumePlugin one: 0.01 mm). A slice file that cannot be read, or whose pixel data is cut
short (checked from the file's bytes: SimpleITK's GDCM before 2.5 reads such a file without an error), is named.

What is supported, as scanners write it:
- Rescale slope/intercept (HU): applied per slice by GDCM, the array is float32.
- Multi-frame: a series of one multi-frame file is read as GDCM reads it (3D, its own geometry).
- Gantry tilt (each slice shifted within its plane by the same step): segmented on the slices as acquired, on
  the grid ITK's series reader and Slicer's volume loading give it (origin of the first slice, orientation of
  the slices, slice spacing = distance between slice origins), so the label map overlays the volume Slicer
  loads; Slicer's optional acquisition-geometry regularisation is not applied. A warning says so.

The series' files are kept in the array's slice order (`DicomSeries.files`, `.instance_uids`, with `.uid` and
`.study_uid`): derived objects (DICOM SEG, statistics) reference the source instances through them;
`select_series(folder, uid)` gives them without reading any pixel.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["DicomSeries", "find_series", "select_series", "read_series"]

log = logging.getLogger(__name__)

_TOLERANCE_MM = 0.01            # Slicer's DICOMScalarVolumePlugin spacing epsilon
_NOT_DICOM = (".txt", ".xml", ".json", ".html", ".htm", ".pdf", ".jpg", ".jpeg", ".png", ".bmp", ".csv", ".md",
              ".ini", ".log", ".zip", ".exe", ".inf", ".nii", ".gz", ".nrrd", ".mha", ".mhd", ".raw")


@dataclass
class DicomSeries:
    uid: str                    # Series Instance UID (may be empty in anonymised exports)
    description: str
    files: list[Path]           # in the array's slice order (z ascending along the slice normal) once read
    size: tuple[int, int]       # columns, rows
    sop_class: str = ""         # Media Storage SOP Class UID (file meta)
    study_uid: str = ""
    instance_uids: list[str] = field(default_factory=list)    # SOP Instance UIDs, aligned with `files`

    def summary(self) -> str:
        uid = self.uid or "(no UID)"
        desc = f"'{self.description}', " if self.description else ""
        return f"{uid} ({desc}{len(self.files)} files, {self.size[0]}x{self.size[1]})"


@dataclass
class _Slice:
    path: Path
    size: tuple[int, int]
    spacing: tuple[float, float]
    origin: np.ndarray
    direction: np.ndarray       # 3x3, columns: row axis, column axis, normal
    frames: int
    instance_uid: str = ""
    pixel_bytes: int = 0        # what the header promises: rows x columns x frames x samples x bits / 8


def _file_meta(path: Path, head: bytes | None = None) -> dict[int, str] | None:
    """The file meta group's text elements by element number (2: Media Storage SOP Class UID, 0x10: Transfer
    Syntax UID); it precedes every dataset byte, so it survives truncation. None without a DICOM preamble."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
    if head[128:132] != b"DICM":
        return None
    meta, pos = {}, 132
    while pos + 8 <= len(head):
        group, element = struct.unpack("<HH", head[pos:pos + 4])
        if group != 2:
            break
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,), start = struct.unpack("<I", head[pos + 8:pos + 12]), pos + 12
        else:
            (length,), start = struct.unpack("<H", head[pos + 6:pos + 8]), pos + 8
        meta[element] = head[start:start + length].decode("ascii", "replace").strip("\x00 ")
        pos = start + length
    return meta


def _file_meta_sop_class(path: Path) -> str | None:
    """Media Storage SOP Class UID ("" unknown, None when the file has no DICOM preamble)."""
    meta = _file_meta(path)
    return None if meta is None else meta.get(2, "")


_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
# Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_TAGS = ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009))
_PIXEL_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")
_UNDEFINED = 0xFFFFFFFF


def _pixel_data_complete(path: Path, expected: int) -> bool:
    """Whether the file holds all of its pixel data: a Pixel Data element whose value (at least `expected`
    bytes, Rows x Columns x frames x samples x BitsAllocated / 8) lies inside the file, or, encapsulated
    (compressed), whose fragments run to the sequence delimiter. GDCM before SimpleITK 2.5 reads a slice file
    cut short without an error and fills the rest with zeros, so this is checked here, from the bytes. Any
    candidate that fits counts: the tag's bytes inside an earlier value must not make a whole file damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    preamble = data[128:132] == b"DICM"
    syntax = (_file_meta(path, data[:4096]) or {}).get(0x10, "") if preamble else _IMPLICIT_LE
    end = ">" if syntax == _EXPLICIT_BE else "<"
    for group, element in _PIXEL_TAGS:
        tag = struct.pack(end + "HH", group, element)
        p = data.find(tag, 132 if preamble else 0)
        while p >= 0:
            if syntax == _IMPLICIT_LE:
                start = p + 8
            elif data[p + 4:p + 6] in _PIXEL_VRS and data[p + 6:p + 8] == b"\0\0":
                start = p + 12
            else:
                start = None
            if start is not None and start <= len(data):
                (length,) = struct.unpack(end + "I", data[start - 4:start])
                if length == _UNDEFINED and _fragments_complete(data, start, end):
                    return True
                if expected <= length != _UNDEFINED and start + length <= len(data):
                    return True
            p = data.find(tag, p + 1)
    return False


def _fragments_complete(data: bytes, pos: int, end: str) -> bool:
    """Encapsulated pixel data: items (FFFE,E000) of stated lengths, then the delimiter (FFFE,E0DD)."""
    while pos + 8 <= len(data):
        group, element, length = struct.unpack(end + "HHI", data[pos:pos + 8])
        if (group, element) == (0xFFFE, 0xE0DD):
            return True
        if (group, element) != (0xFFFE, 0xE000) or pos + 8 + length > len(data):
            return False
        pos += 8 + length
    return False


def _header(path: Path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _tag(reader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR" and not p.name.lower().endswith(_NOT_DICOM))


def find_series(folder: Path) -> tuple[dict[str, DicomSeries], dict[str, _Slice], list[tuple[Path, str]]]:
    """The series of a folder (by UID, files unsorted), each readable file's slice header, and the files that
    could not be read with their SOP class from the file meta ("" unknown, None not DICOM at all)."""
    series, slices, unreadable = {}, {}, []
    for path in _candidates(folder):
        try:
            reader = _header(path)
        except RuntimeError:
            unreadable.append((path, _file_meta_sop_class(path)))
            continue
        uid = _tag(reader, "0020|000e")
        size = tuple(int(s) for s in reader.GetSize()[:2])
        frames = int(reader.GetSize()[2]) if reader.GetDimension() > 2 else 1
        direction = np.array(reader.GetDirection(), float).reshape(3, 3)
        bits = int(_tag(reader, "0028|0100") or 0) * int(_tag(reader, "0028|0002") or 1)
        slices[str(path)] = _Slice(path, size, tuple(float(s) for s in reader.GetSpacing()[:2]),
                                   np.array(reader.GetOrigin(), float), direction, frames,
                                   _tag(reader, "0008|0018"), -(-size[0] * size[1] * frames * bits // 8))
        entry = series.setdefault(uid, DicomSeries(uid, _tag(reader, "0008|103e"), [], size,
                                                   _file_meta_sop_class(path) or "", _tag(reader, "0020|000d")))
        entry.files.append(path)
    return series, slices, unreadable


def _choose(folder: Path, series: dict[str, DicomSeries], uid: str | None) -> DicomSeries:
    listing = "; ".join(s.summary() for s in sorted(series.values(), key=lambda s: -len(s.files)))
    if uid is not None:
        if uid not in series:
            raise InputError(f"{folder}: no DICOM series with UID {uid}; it holds: {listing}")
        return series[uid]
    if len(series) > 1:
        raise InputError(f"{folder}: {len(series)} DICOM series, choose one with --series UID: {listing}")
    return next(iter(series.values()))


def _fmt(p) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in p) + ")"


def _check_grid(folder: Path, chosen: list[_Slice], unreadable: list[Path]) -> tuple[list[_Slice], float]:
    """Sort slices along the normal and check they form one regular grid; returns them and the slice step."""
    first = chosen[0]
    for s in chosen[1:]:
        if s.size != first.size:
            raise InputError(f"{folder}: slices of different sizes: {s.size[0]}x{s.size[1]} at {_fmt(s.origin)} "
                             f"({s.path.name}) vs {first.size[0]}x{first.size[1]} at {_fmt(first.origin)}")
        if not np.allclose(s.direction[:, :2], first.direction[:, :2], atol=1e-4):
            raise InputError(f"{folder}: slices of different orientations at {_fmt(s.origin)} ({s.path.name}) "
                             f"and {_fmt(first.origin)} ({first.path.name}): export one orientation per series")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4, atol=1e-4):
            raise InputError(f"{folder}: slices of different pixel spacing {s.spacing} ({s.path.name}) vs "
                             f"{first.spacing}")
    normal = first.direction[:, 2]
    order = sorted(chosen, key=lambda s: float(s.origin @ normal))
    depth = np.array([s.origin @ normal for s in order])
    steps = np.diff(depth)
    hint = f" (unreadable file(s) in the folder: {', '.join(p.name for p in unreadable)})" if unreadable else ""
    for i in np.flatnonzero(steps < _TOLERANCE_MM):
        raise InputError(f"{folder}: two slices at the same position {_fmt(order[i].origin)} "
                         f"({order[i].path.name}, {order[i + 1].path.name}): keep one series of one acquisition")
    step = float(np.median(steps))
    for i in np.flatnonzero(np.abs(steps - step) > _TOLERANCE_MM):
        what = "missing slice(s)" if steps[i] > 1.5 * step else "unequal slice spacing"
        raise InputError(f"{folder}: {what} between {_fmt(order[i].origin)} and {_fmt(order[i + 1].origin)} "
                         f"({steps[i]:.3f} mm, the others {step:.3f} mm){hint}: re-export the complete series")
    shift = np.array([b.origin - a.origin for a, b in zip(order, order[1:])])
    lateral = shift - np.outer(shift @ normal, normal)
    if np.abs(lateral - lateral.mean(0)).max() > _TOLERANCE_MM:
        raise InputError(f"{folder}: slice positions do not lie on one line (e.g. {_fmt(order[1].origin)}): "
                         f"re-export the series")
    tilt = np.degrees(np.arctan2(np.linalg.norm(lateral.mean(0)), step))
    # as ITK's series reader and Slicer's archetype reader: slice spacing = distance between slice origins
    distance = float(np.median(np.linalg.norm(shift, axis=1)))
    if tilt > 0.01:
        log.warning("%s: gantry tilt of %.2f degrees: segmenting the slices as acquired on the grid ITK and "
                    "Slicer load (slice spacing %.3f mm = distance between slice origins, %.3f mm along the "
                    "normal; Slicer's acquisition-geometry regularisation is not applied)",
                    folder, tilt, distance, step)
    return order, distance


def select_series(folder: str | Path, uid: str | None = None) -> tuple[DicomSeries, list[_Slice], float]:
    """Choose and check one series of `folder` without reading its pixels: (DicomSeries with `files` in slice
    order, their slice headers in that order, the slice step in mm; 0 for one multi-frame file)."""
    folder = Path(folder)
    series, slices, unreadable = find_series(folder)
    if not series:
        raise InputError(f"{folder}: folder holds no image file and no DICOM series")
    chosen = _choose(folder, series, uid)
    # a file that does not read but is DICOM of this series' kind is a damaged slice of it, and so is a slice
    # whose pixel data is cut short
    damaged = [p for p, sop in unreadable if sop is None and p.suffix.lower() in (".dcm", ".dicom", ".ima")
               or sop and sop == chosen.sop_class]
    damaged += [p for p in chosen.files if not _pixel_data_complete(p, slices[str(p)].pixel_bytes)]
    if damaged:
        raise InputError(f"{folder}: {damaged[0].name} cannot be read (damaged or incomplete DICOM file"
                         f"{f', and {len(damaged) - 1} more' if len(damaged) > 1 else ''}): re-export the series")
    headers = [slices[str(p)] for p in chosen.files]
    chosen.instance_uids = [h.instance_uid for h in headers]
    if any(h.frames > 1 for h in headers):
        if len(headers) > 1:
            raise InputError(f"{folder}: series of {len(headers)} multi-frame files: export it as one file "
                             f"or as single-frame slices")
        return chosen, headers, 0.0
    if len(headers) == 1:
        return chosen, headers, float(_header(headers[0].path).GetSpacing()[2])
    order, step = _check_grid(folder, headers, [p for p, _ in unreadable])
    chosen.files = [s.path for s in order]
    chosen.instance_uids = [s.instance_uid for s in order]
    return chosen, order, step


def read_series(folder: str | Path, uid: str | None = None):
    """Read one DICOM series of `folder` -> (array (1, z, y, x) float32, (spacing, origin, direction) in
    SimpleITK order, DicomSeries with `files` in slice order). InputError naming the folder or file."""
    chosen, order, step = select_series(folder, uid)
    if order[0].frames > 1:
        image = _read_pixels(order[0].path)
        return (sitk.GetArrayFromImage(image)[None], (image.GetSpacing(), image.GetOrigin(), image.GetDirection()),
                chosen)
    array = np.empty((len(order), order[0].size[1], order[0].size[0]), np.float32)
    for k, s in enumerate(order):
        pixels = sitk.GetArrayFromImage(_read_pixels(s.path))
        if pixels.shape[-2:] != array.shape[1:]:
            raise InputError(f"{s.path}: pixel data of size {pixels.shape[-1]}x{pixels.shape[-2]}, its header "
                             f"says {s.size[0]}x{s.size[1]}: re-export the series")
        array[k] = pixels.reshape(array.shape[1:])
    first = order[0]
    geometry = ((first.spacing[0], first.spacing[1], step), tuple(float(v) for v in first.origin),
                tuple(float(v) for v in first.direction.ravel()))
    return array[None], geometry, chosen


def _read_pixels(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1][:150]
        raise InputError(f"{path}: cannot read its pixel data ({detail}): re-export the series") from None
