"""DICOM Segmentation (SEG) output for a DICOM series input, written with highdicom.

One BINARY segment per structure present, named, coded (SNOMED CT category/type/modifier and anatomic
region from the terminology table), coloured (CIELab, as DICOM stores it), with the model as the
algorithm identification; the SEG references the source series and each source instance, and lives in
the source's study and frame of reference. Empty frames are omitted.

The label map is handed to highdicom as one (z, y, x) array of segment numbers (highdicom's "label map
style" input), so no per-structure dense mask is ever built; highdicom compares one plane at a time.

A series that cannot be referenced (UIDs emptied by anonymisation, missing geometry) is refused by
`read_source_series` before any compute. highdicom and pydicom are the optional `dicom` extra.
"""
from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np

from .atomic import short_write_reason
from .errors import InputError
from .io import DICOM_SEG_SUFFIX, Geometry, atomic_path

__all__ = ["SUFFIX", "is_seg_output", "read_source_series", "read_source_files", "check_alignment", "write_seg",
           "write_seg_of_label_file", "model_version", "rgb_to_cielab"]

log = logging.getLogger(__name__)

SUFFIX = DICOM_SEG_SUFFIX
_INSTALL = 'DICOM SEG output needs highdicom: pip install "segbook[dicom]"'
# What a SEG must copy or reference from every source instance (highdicom reads the geometry from them).
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
# For classes without a terminology entry: the generic code Slicer and dcmqi use.
_TISSUE = ("SCT", "85756007", "Tissue")


def is_seg_output(path) -> bool:
    return str(path).lower().endswith(SUFFIX)


def _version() -> str:
    from . import __version__
    return __version__


def _libraries():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise InputError(_INSTALL) from None
    return highdicom, pydicom


def read_source_series(folder, series_uid: str | None = None) -> list:
    """Headers (no pixel data) of the DICOM series in `folder` that the label map will lie on, in the
    label map's z order: the series `segbook.dicom` reads (the only one, or the one with `series_uid`).
    InputError, naming the folder and why, when a SEG could not reference it.
    """
    from .dicom import select_series
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: DICOM SEG output (.dcm) needs a DICOM series folder as input; "
                         f"write a label map (.nii.gz, .seg.nrrd) for this file")
    files = [str(f) for f in select_series(folder, series_uid)[0].files]
    return _referenceable(_headers(files, folder), folder)


def read_source_files(files, where) -> list:
    """Headers of the source instances `files` (e.g. the ones Slicer loaded a volume from, in any order);
    InputError when a SEG could not reference them."""
    if not files:
        raise InputError(f"{where}: no source DICOM instances to reference")
    return _referenceable(_headers([str(f) for f in files], where), where)


def _headers(files: list, where) -> list:
    _, pydicom = _libraries()
    try:
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as e:  # pydicom raises several types for broken or missing files
        raise InputError(f"{where}: cannot read the DICOM headers ({type(e).__name__}: {e})") from None


def _referenceable(datasets: list, where) -> list:
    problems = []
    for key in _UIDS + _GEOMETRY:
        lacking = sum(1 for ds in datasets if ds.get(key) in (None, "") or str(ds.get(key)).strip() == "")
        if lacking:
            problems.append(f"{key} empty or missing in {lacking} of {len(datasets)} files")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(key, "")) for ds in datasets}) > 1:
            problems.append(f"{key} differs between the files")
    if len({str(ds.get("SOPInstanceUID", "")) for ds in datasets}) < len(datasets) and not problems:
        problems.append("SOPInstanceUID repeats")
    if problems:
        raise InputError(f"{where}: a DICOM SEG cannot reference this series ({'; '.join(problems)}; "
                         f"anonymised?); write a label map (.nii.gz, .seg.nrrd) instead")
    return datasets


def check_alignment(sources: list, geometry: Geometry, where) -> None:
    """InputError unless slice k of the (z, y, x) grid of `geometry` is source instance k."""
    nx, ny, nz = geometry.size
    if len(sources) != nz or any(int(ds.Rows) != ny or int(ds.Columns) != nx for ds in sources):
        raise InputError(f"{where}: the image read ({nx}x{ny}x{nz}) is not the series of {len(sources)} "
                         f"slices a DICOM SEG would reference")
    direction = np.array(geometry.direction).reshape(3, 3)
    expected = np.array(geometry.origin) + np.outer(np.arange(nz) * geometry.spacing[2], direction[:, 2])
    found = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    worst = float(np.abs(found - expected).max())
    if worst > 0.05 * geometry.spacing[2] + 1e-3:
        raise InputError(f"{where}: the slices of the series are {worst:.3g} mm off the grid of the image "
                         f"read; cannot map the label map onto its source instances")


def model_version(config, checkpoint=None) -> str:
    """What identifies the weights: the checkpoint file given, the hub file and revision, or the folder's
    model name with the SegBook version (a model folder carries no version of its own)."""
    if checkpoint:
        return Path(str(checkpoint)).name
    if config.hub_repo:
        return f"{config.hub_repo}/{config.hub_filename}@{config.hub_revision or 'main'}"
    return f"{config.name} (segbook {_version()})"


def rgb_to_cielab(rgb) -> tuple[float, float, float]:
    """sRGB 0-255 -> CIE L*a*b* (D65 white), the space of DICOM's Recommended Display CIELab Value."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))


def _segment_description(hd, number: int, entry: dict, algorithm):
    def code(triple):
        scheme, value, meaning = triple
        return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)

    term = entry.get("terminology") or {}
    if not (term.get("category") and term.get("type")):
        term = {"category": _TISSUE, "type": _TISSUE}
    region = [code(term["region"])] if term.get("region") else None
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=str(entry["name"])[:64],
        segmented_property_category=code(term["category"]), segmented_property_type=code(term["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=region)
    if term.get("type_modifier"):           # laterality etc.; highdicom has no argument for it
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
            [code(term["type_modifier"])]
    if entry.get("color"):
        # set directly: highdicom < 0.23 (the last for Python 3.9) has no display_color argument
        desc.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor(*rgb_to_cielab(entry["color"])).value)
    return desc


def write_seg(labels: np.ndarray, sources: list, class_table: list, path, *, model: str, version: str,
              parameters: dict | None = None) -> Path:
    """Write `labels` (z, y, x; slice k on source instance k) as a DICOM SEG at `path`, atomically.

    class_table: [{"value", "name", "color", "terminology"}]; a structure present in `labels` becomes a
    segment (numbered 1.. in label order). model/version: the algorithm identification.
    """
    hd, _ = _libraries()
    from pydicom.sr.codedict import codes
    path = Path(path)
    # Slab by slab: bincount and fancy indexing would otherwise make whole-volume intp (8-byte) copies.
    slabs = [slice(z, z + 16) for z in range(0, labels.shape[0], 16)]
    counts = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
    for s in slabs:
        counts += np.bincount(labels[s].ravel(), minlength=len(counts))
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    if not present:
        raise InputError(f"{path}: nothing was segmented, and a DICOM SEG needs at least one segment")
    lut = np.zeros(len(counts), np.uint8 if len(present) < 256 else np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    numbers = labels                      # segment numbers must run 1..n: renumber if there are gaps
    if present != list(range(1, len(present) + 1)) or labels.dtype != lut.dtype:
        numbers = np.empty(labels.shape, lut.dtype)
        for s in slabs:
            numbers[s] = lut[labels[s]]
    by_value = {int(c["value"]): c for c in class_table}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model[:64], family=codes.cid7162.ArtificialIntelligence, version=version[:64],
        parameters={k: str(v)[:64] for k, v in (parameters or {}).items()} or None)
    descriptions = [_segment_description(hd, i + 1, by_value.get(v, {"name": f"label_{v}"}), algorithm)
                    for i, v in enumerate(present)]
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=numbers, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber") or 0) + 1000, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="SegBook", manufacturer_model_name=model[:64], software_versions=f"segbook {_version()}",
        device_serial_number="none", content_label="SEGBOOK", content_description=f"{model} segmentation"[:64],
        series_description=f"SegBook {model}"[:64], omit_empty_frames=True)
    with atomic_path(path, verify=lambda tmp: _verify_seg(tmp, seg)) as tmp:
        seg.save_as(str(tmp))
    log.info("%s: DICOM SEG, %d segments, %d frames", path, len(present), int(seg.NumberOfFrames))
    return path


def _verify_seg(tmp: Path, seg) -> None:
    """The file read back holds the SEG's frames, every pixel byte of them."""
    import pydicom
    try:
        back = pydicom.dcmread(str(tmp))
        ok = (back.SOPInstanceUID == seg.SOPInstanceUID and int(back.NumberOfFrames) == int(seg.NumberOfFrames)
              and len(back.PixelData) == len(seg.PixelData))
    except Exception as e:  # noqa: BLE001  pydicom raises many kinds on a file cut short
        ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        detail = "the file read back lacks frames or pixel data"
    if not ok:
        raise OSError(errno.EIO, short_write_reason(tmp, detail[:200]))


def write_seg_of_label_file(labels_path, source_files, class_table: list, path, *, model: str,
                            version: str) -> dict:
    """A DICOM SEG of an existing label map (e.g. a segmentation corrected in Slicer) on the grid of the
    source instances `source_files`: checked to lie slice for slice on them, then written as `write_seg` does.
    Returns {"output", "segments"}."""
    from .io import check_writable, read_labels
    check_writable(path)
    sources = read_source_files(source_files, labels_path)
    labels, geometry = read_labels(labels_path)
    k_axis = np.array(geometry.direction).reshape(3, 3)[:, 2]       # slice k of the label map is the k-th along it
    sources.sort(key=lambda ds: float(np.array([float(v) for v in ds.ImagePositionPatient]) @ k_axis))
    check_alignment(sources, geometry, labels_path)
    write_seg(labels, sources, class_table, path, model=model, version=version)
    present = {int(v) for v in np.unique(labels) if v}
    return {"output": str(path), "segments": len(present)}
