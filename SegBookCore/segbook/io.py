"""Reading images and writing label maps with their exact geometry (SimpleITK conventions).

Arrays are in SimpleITK's array order: an image is (C, z, y, x), a label map (z, y, x). Geometry keeps
SimpleITK's own order (x, y, z) for spacing/origin/size and a row-major 3x3 direction, physical points
in LPS millimetres as ITK. Nothing is reoriented: the released models were trained on images as stored.
Every file written goes to a temporary name in the target folder first and is renamed once it is verified
complete (`atomic`), so a full disk, readers or a Ctrl-C never leave a half-written output.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write, short_write_reason
from .dicom import read_series as read_dicom
from .errors import InputError
from .labels import terminology_entry
from .imagefile import check_geometry, check_written, inspect_file, read_beside

__all__ = ["Geometry", "lps_numbers", "read_image", "read_labels", "write_labels", "output_format", "sidecar_path",
           "atomic_path", "check_exists", "check_writable", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

# Suffixes we read and write; ".seg.nrrd" must be tested before ".nrrd".
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# A DICOM Segmentation object (segbook.dicom_seg), an output only: DICOM inputs are series folders.
DICOM_SEG_SUFFIX = ".dcm"


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) array lies in space; every tuple in SimpleITK order (x, y, z)."""
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(reversed(self.size))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def physical_box_to_voxels(self, box_lps) -> tuple[int, int, int, int, int, int]:
        """A physical box (x0, y0, z0, x1, y1, z1) in LPS mm -> voxel box (z0, y0, x0, z1, y1, x1), end exclusive.

        The voxel box is the smallest one holding every voxel centre inside the box (all 8 corners are
        mapped, so oblique directions work). Raises InputError when it holds no voxel of the image.
        """
        box_lps = lps_numbers(box_lps, 6, "a box needs six finite numbers X0,Y0,Z0,X1,Y1,Z1 (LPS mm)")
        lo, hi = np.minimum(box_lps[:3], box_lps[3:]), np.maximum(box_lps[:3], box_lps[3:])
        ref = self.apply_to(sitk.Image([1, 1, 1], sitk.sitkUInt8))
        corners = np.array([ref.TransformPhysicalPointToContinuousIndex(
            (float(x), float(y), float(z))) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
            for z in (lo[2], hi[2])])
        # A tolerance of 1/100 voxel: a corner typed in mm with a few decimals still holds its voxel centre.
        start = np.maximum(np.ceil(corners.min(0) - 1e-2), 0).astype(int)
        stop = np.minimum(np.floor(corners.max(0) + 1e-2) + 1, self.size).astype(int)
        if np.any(stop <= start):
            raise InputError(f"ROI {list(map(float, box_lps))} (LPS mm) lies outside the image")
        (x0, y0, z0), (x1, y1, z1) = start, stop
        return int(z0), int(y0), int(x0), int(z1), int(y1), int(x1)


def lps_numbers(values, count: int, what: str) -> list[float]:
    """`values` (a point or a box of a request or a call) as `count` finite floats, else InputError saying
    `what` is needed: a request's JSON may hold anything."""
    try:
        numbers = None if isinstance(values, (str, bytes)) else [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or len(numbers) != count or not all(np.isfinite(numbers)):
        raise InputError(f"{what}, got {values!r}")
    return numbers


def _geometry(image: sitk.Image) -> Geometry:
    dim = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(dim, dim)[:3, :3]
    return Geometry(tuple(int(s) for s in image.GetSize()[:3]), tuple(float(s) for s in image.GetSpacing()[:3]),
                    tuple(float(s) for s in image.GetOrigin()[:3]), tuple(float(d) for d in direction.ravel()))


def check_exists(path: str | os.PathLike) -> Path:
    """`path` as a Path; InputError unless it exists."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return path


def read_image(path: str | os.PathLike, series: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder (`series`: its Series Instance UID, needed when
    the folder holds several).

    Returns (array (C, z, y, x) float32, Geometry). A 4D image or a vector image becomes C channels.
    Raises InputError (message names the path and what to do) for missing, damaged, truncated or 2D images,
    invalid geometry, DICOM slices that do not form one grid (see `imagefile`, `dicom`).
    """
    path = check_exists(path)
    if path.is_dir():
        array, (spacing, origin, direction), _ = read_dicom(path, series)
        check_geometry(path, spacing, origin, direction)
        if not np.isfinite(array).all():
            raise InputError(f"{path}: image holds NaN or infinite values")
        return array, Geometry(tuple(int(s) for s in array.shape[:0:-1]), tuple(float(s) for s in spacing),
                               tuple(float(s) for s in origin), tuple(float(d) for d in direction))
    try:
        reader, deep = inspect_file(path)
        dim = reader.GetDimension()
        if dim < 3 or (dim == 3 and reader.GetSize()[2] == 1):
            raise InputError(f"{path}: a {dim}D image ({'x'.join(map(str, reader.GetSize()))}); "
                             f"a 3D volume is needed")
        if dim > 4:
            raise InputError(f"{path}: a {dim}D image; a 3D volume (or 4D channels) is needed")
        image = read_beside(reader, deep)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        # ITK's own words (a "sitk::ERROR: ..." or "Unable to ..." line) over the source location it starts with
        detail = next((m for key in ("ERROR", "Unable", "Exception") for m in msg if key in m), msg[-1] if msg else "")
        raise InputError(f"{path}: cannot read as an image ({detail.strip()[:200]})") from None
    geometry = _geometry(image)
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        if dim != 3:
            raise InputError(f"{path}: a 4D image of vectors is not supported")
        array = np.moveaxis(array, -1, 0)       # (z, y, x, c) -> (c, z, y, x)
    elif dim == 3:
        array = array[None]
    # Always copy: the view's memory belongs to `image`, which is freed when this function returns.
    array = np.array(array, dtype=np.float32, copy=True, order="C")
    if not np.isfinite(array).all():
        raise InputError(f"{path}: image holds NaN or infinite values")
    return array, geometry


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A label map as (z, y, x) int32 (values rounded) and its Geometry; InputError naming the path."""
    array, geometry = read_image(path)
    if array.shape[0] != 1:
        raise InputError(f"{path}: a label map has one component, this image has {array.shape[0]}")
    return np.rint(array[0]).astype(np.int32), geometry


def output_format(path: str | os.PathLike) -> str:
    """The suffix that picks the writer, e.g. ".nii.gz", ".seg.nrrd", ".dcm"; InputError if none is known."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES + (DICOM_SEG_SUFFIX,):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"{path}: unknown output format (use one of {', '.join(IMAGE_SUFFIXES)}, "
                     f"or {DICOM_SEG_SUFFIX} for a DICOM SEG of a DICOM series)")


def sidecar_path(output: str | os.PathLike) -> Path:
    """out.nii.gz -> out.json (the sidecar JSON written next to a label map)."""
    output = Path(output)
    return output.with_name(output.name[: -len(output_format(output))] + ".json")


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """InputError unless `path` (an output file, or a folder with `folder`) can be written: not a folder (a
    file), its nearest existing ancestor a folder where a file can be created. Creates nothing, so a bad
    output path fails before any image is read or any model loaded."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{path}: is a folder; give an output file name (e.g. seg.nii.gz)")
    if path.exists() and folder and not path.is_dir():
        raise InputError(f"{path}: is a file; an output folder is needed")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{path}: cannot create an output there, {probe} is a file: choose another output")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write in {probe} ({e.strerror}): choose another output") from None


def atomic_path(path: str | os.PathLike, verify=None):
    """`atomic.atomic_write` with a temporary name that keeps `path`'s image suffix (writers pick the format by
    it): renamed onto `path` once written, fsynced and verified; removed on any error or interrupt."""
    name = Path(path).name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), Path(path).suffix)
    return atomic_write(path, verify=verify, suffix=suffix)


@contextlib.contextmanager
def _stderr_held():
    """Hold what C code prints to stderr meanwhile (ITK's writers print their failures, e.g. NIfTI's
    "** ERROR: NWAD: wrote only ..."): replayed when the block succeeds, logged (debug) when it fails, so that
    a failed write is reported once, as our own line."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:         # no stderr at all (a GUI process): nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            if ok and text:
                os.write(2, text)
            elif text:
                log.debug("writer said: %s", text.decode("utf-8", "replace").strip())


def _verify_image(tmp: Path) -> None:
    """The written file holds every byte its header promises (gzip streams to their end)."""
    try:
        check_written(tmp)
    except (InputError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise OSError(errno.EIO, short_write_reason(tmp, f"incomplete file: {detail[:200]}")) from None


def _seg_nrrd_metadata(image: sitk.Image, labels: np.ndarray, class_table: list[dict]) -> None:
    """Slicer's segmentation NRRD fields (one layer, a segment per class present in the table)."""
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    extent = " ".join(f"0 {s - 1}" for s in reversed(labels.shape))
    for i, entry in enumerate(class_table):
        key = f"Segment{i}_"
        color = " ".join(f"{c / 255:.6g}" for c in entry["color"])
        image.SetMetaData(key + "ID", f"Segment_{entry['value']}")
        image.SetMetaData(key + "Name", entry["name"])
        image.SetMetaData(key + "NameAutoGenerated", "0")
        image.SetMetaData(key + "Color", color)
        image.SetMetaData(key + "ColorAutoGenerated", "0")
        image.SetMetaData(key + "LabelValue", str(entry["value"]))
        image.SetMetaData(key + "Layer", "0")
        image.SetMetaData(key + "Extent", extent)
        tag = terminology_entry(entry.get("terminology"))
        if tag:
            image.SetMetaData(key + "Tags", f"TerminologyEntry:{tag}|")


def write_labels(labels: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                 class_table: list[dict] | None = None) -> Path:
    """Write a (z, y, x) label map with `geometry`, atomically; `.seg.nrrd` adds Slicer segment metadata."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == DICOM_SEG_SUFFIX:
        raise InputError(f"{path}: a DICOM SEG is written by segbook.dicom_seg, from a DICOM series input")
    if tuple(labels.shape) != geometry.shape_zyx:
        raise ValueError(f"label map shape {labels.shape} does not match the geometry {geometry.shape_zyx}")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(labels)))
    if fmt == ".seg.nrrd":
        _seg_nrrd_metadata(image, labels, class_table or [])
    with _stderr_held(), atomic_path(path, verify=_verify_image) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as e:
            # ITK's exception text names the temporary file; the OS says why when asked directly
            detail = str(e).strip().splitlines()[-1][:200]
            raise OSError(errno.EIO, short_write_reason(tmp, detail)) from None
    return path
