"""DICOM SEG and statistics on the oldest stack SegBook supports (Python 3.9, numpy 1.26, highdicom 0.22,
pydicom 2.4: what Slicer 5.8's Python gets), without torch: the label map is HU bands of the test CT.

Writes the test CT as a DICOM series, a SEG of its bands with segbook.dicom_seg, validates it with dciodvfy
and decodes it with dcmqi's segimage2itkimage (from any environment: pass its path), and checks the decoded
segments equal the label map. Exit 0 when all hold.

    python3.9 benchmarks/compat_dicom_seg.py --dcmqi /path/to/segimage2itkimage
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dcmqi", default="segimage2itkimage", help="segimage2itkimage executable")
    args = p.parse_args()
    from bench_dicom_seg import _core
    from dicom_fixtures import write_ct_series
    dicom_seg, labels_mod, statistics = _core()
    from segbook.io import read_image
    import highdicom
    import pydicom

    work = Path(tempfile.mkdtemp())
    ct = ROOT / "Testing" / "data" / "abdomen_ct_3mm_crop.nii.gz"
    write_ct_series(ct, work / "ct")
    sources = dicom_seg.read_source_series(work / "ct")
    image, geometry = read_image(work / "ct")
    dicom_seg.check_alignment(sources, geometry, work / "ct")
    labels = np.digitize(image[0], [-200, -20, 80, 300]).astype(np.uint8)     # 4 bands + background
    table = labels_mod.class_table(["background", "liver", "spleen", "kidney_left", "kidney_right"])
    rows = statistics.label_statistics(labels, image[0], geometry.spacing, table)
    dicom_seg.write_seg(labels, sources, table, work / "seg.dcm", model="bands", version="1")
    report = subprocess.run(["dciodvfy", str(work / "seg.dcm")], capture_output=True, text=True)
    text = report.stdout + report.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    if "Segmentation" not in text:          # it must have validated against the SEG IOD
        errors.append(f"dciodvfy did not validate a Segmentation: {text[:200]}")
    subprocess.run([args.dcmqi, "--inputDICOM", str(work / "seg.dcm"), "--outputDirectory", str(work),
                    "-t", "nrrd", "-p", "dec"], check=True, capture_output=True)
    meta = json.loads((work / "dec-meta.json").read_text())
    decoded = np.zeros_like(labels)
    names = {c["name"]: c["value"] for c in table}
    for segment in (s for group in meta["segmentAttributes"] for s in group):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"dec-{segment['labelID']}.nrrd"))) > 0
        decoded[mask] = names[segment["SegmentLabel"]]
    same = bool(np.array_equal(decoded, labels))
    print(json.dumps({"python": sys.version.split()[0], "numpy": np.__version__, "highdicom": highdicom.__version__,
                      "pydicom": pydicom.__version__, "segments": len(rows), "dciodvfy_errors": errors,
                      "dcmqi_equal": same}))
    return 0 if same and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
