"""DICOM SEG writing and per-structure statistics at CT scale: time and peak memory.

Case: a 512x512xZ CT series (headers of Z single-frame CT instances, valid UIDs, in memory) and a label map
with S structures, each a 40x40-pixel column spanning `--extent` slices (6000 non-empty frames for the
defaults 100 x 60), so the SEG has S segments and S x extent frames.

    ours  segbook.dicom_seg.write_seg: the (z, y, x) label map handed to highdicom as segment numbers
    peer  the same SEG from what a per-structure writer holds: S dense binary masks stacked as a
          (z, y, x, S) array, the other input highdicom takes (run at a smaller size: at 512x512x300x100
          the masks alone are 7.9 GB)
    stats segbook.statistics.label_statistics over a float32 image on the same grid

Each measurement runs in its own process; peak RSS (ru_maxrss) minus the RSS once the inputs are built is
what the step itself added. The core modules are loaded without running the package's __init__ (torch), so
the script also runs where only numpy/SimpleITK/highdicom are (e.g. Python 3.9 with highdicom 0.22).

    python benchmarks/bench_dicom_seg.py [--size 512 --slices 300 --structures 100 --extent 60]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _core():
    """segbook's submodules without running segbook/__init__.py (which imports torch)."""
    if "segbook" not in sys.modules:
        path = ROOT / "SegBookCore" / "segbook"
        spec = importlib.util.spec_from_file_location("segbook", path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        package = importlib.util.module_from_spec(spec)
        package.__version__ = "bench"
        sys.modules["segbook"] = package
    from segbook import dicom_seg, labels, statistics
    import highdicom  # noqa: F401  (imported before the baseline is taken)
    return dicom_seg, labels, statistics


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sources(size: int, slices: int):
    import pydicom
    from pydicom.uid import generate_uid
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20260101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "bench"
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-200.0, -200.0, -300.0 + 1.5 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 1.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def _labels(size: int, slices: int, structures: int, extent: int):
    import numpy as np
    labels = np.zeros((slices, size, size), np.uint8 if structures < 256 else np.uint16)
    side = int(np.ceil(np.sqrt(structures)))
    cell = min(40, size // side)
    for s in range(structures):
        y, x = divmod(s, side)
        z0 = (s * 7) % max(1, slices - extent)
        labels[z0:z0 + extent, y * cell:(y + 1) * cell - 2, x * cell:(x + 1) * cell - 2] = s + 1
    return labels


def measure(kind: str, size: int, slices: int, structures: int, extent: int) -> dict:
    import numpy as np
    dicom_seg, labels_mod, statistics = _core()
    labels = _labels(size, slices, structures, extent)
    names = labels_mod.totalseg_class_names()          # real names, SNOMED CT codes and colours
    table = labels_mod.class_table([names[i % len(names)] for i in range(structures + 1)])
    if kind == "stats":
        image = np.random.default_rng(0).standard_normal(labels.shape, dtype=np.float32)   # no float64 copy
        image *= 200
        image += 40
        base, t0 = _rss_mb(), time.perf_counter()
        rows = statistics.label_statistics(labels, image, (0.78, 0.78, 1.5), table)
        return {"kind": kind, "seconds": round(time.perf_counter() - t0, 2), "rows": len(rows),
                "baseline_mb": round(base), "peak_mb": round(_peak_mb()), "added_mb": round(_peak_mb() - base)}
    sources = _sources(size, slices)
    out = Path(tempfile.mkdtemp()) / "seg.dcm"
    if kind == "peer":
        import highdicom as hd
        from pydicom.sr.codedict import codes
        masks = np.stack([labels == s + 1 for s in range(structures)], axis=-1)     # (z, y, x, S)
        del labels
        algorithm = hd.AlgorithmIdentificationSequence(name="bench", family=codes.cid7162.ArtificialIntelligence,
                                                       version="1")
        descriptions = [dicom_seg._segment_description(hd, i + 1, e, algorithm) for i, e in enumerate(table)]
        base, t0 = _rss_mb(), time.perf_counter()
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="bench", manufacturer_model_name="bench",
            software_versions="1", device_serial_number="1")
        seg.save_as(str(out))
    else:
        base, t0 = _rss_mb(), time.perf_counter()
        dicom_seg.write_seg(labels, sources, table, out, model="bench", version="1")
    seconds = time.perf_counter() - t0
    import pydicom
    frames = int(pydicom.dcmread(str(out), stop_before_pixels=True).NumberOfFrames)
    import highdicom
    return {"kind": kind, "seconds": round(seconds, 2), "frames": frames, "file_mb": round(out.stat().st_size / 2 ** 20),
            "baseline_mb": round(base), "peak_mb": round(_peak_mb()), "added_mb": round(_peak_mb() - base),
            "highdicom": highdicom.__version__, "python": sys.version.split()[0], "numpy": np.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--structures", type=int, default=100)
    p.add_argument("--extent", type=int, default=60)
    p.add_argument("--peer-slices", type=int, default=60, help="slices of the (smaller) case run by both")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--one", nargs=5, metavar=("KIND", "SIZE", "SLICES", "STRUCTURES", "EXTENT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        kind, *numbers = args.one
        print(json.dumps(measure(kind, *map(int, numbers))))
        return 0
    runs = [("ours", args.slices), ("stats", args.slices), ("ours", args.peer_slices), ("peer", args.peer_slices)]
    results = []
    for kind, slices in runs:
        extent = min(args.extent, slices)
        cmd = [sys.executable, __file__, "--one", kind, str(args.size), str(slices), str(args.structures), str(extent)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        result = dict(json.loads(r.stdout.strip().splitlines()[-1]), grid=f"{args.size}x{args.size}x{slices}",
                      structures=args.structures, extent=extent)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
