"""Per-structure statistics against an independent computation: ITK's LabelStatisticsImageFilter."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from segbook import statistics
from segbook.statistics import COLUMNS, label_statistics
from test_predict_cli import CT, model_dir  # noqa: F401  (fixture: a tiny model with TotalSegmentator names)

HIPPO = Path(__file__).parent / "data" / "slicer"


def itk_statistics(labels: sitk.Image, image: sitk.Image) -> dict:
    f = sitk.LabelStatisticsImageFilter()
    f.Execute(sitk.Cast(image, sitk.sitkFloat64), sitk.Cast(labels, sitk.sitkUInt16))
    ml = float(np.prod(image.GetSpacing())) / 1000
    return {v: {"voxels": f.GetCount(v), "volume_ml": f.GetCount(v) * ml, "mean": f.GetMean(v),
                "std": f.GetSigma(v), "min": f.GetMinimum(v), "max": f.GetMaximum(v)}
            for v in f.GetLabels() if v != 0}


def assert_same(rows, reference):
    assert [r["label"] for r in rows] == sorted(reference)
    for row in rows:
        ref = reference[row["label"]]
        assert row["voxels"] == ref["voxels"]
        for key in ("volume_ml", "mean", "std", "min", "max"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-9), (row["label"], key)


def test_real_mri_and_its_manual_labels_match_itk():
    image = sitk.ReadImage(str(HIPPO / "hippocampus_001_image.nii.gz"))
    labels = sitk.ReadImage(str(HIPPO / "hippocampus_001_label.nii.gz"))
    rows = label_statistics(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(image), image.GetSpacing(),
                            [{"value": 1, "name": "anterior"}, {"value": 2, "name": "posterior"}])
    assert [r["name"] for r in rows] == ["anterior", "posterior"]
    assert_same(rows, itk_statistics(labels, image))


def test_real_ct_many_labels_several_slabs_match_itk(monkeypatch):
    """HU bands of a real CT as 6 labels, one absent, summed over slabs of a few slices."""
    image = sitk.ReadImage(str(CT))
    hu = sitk.GetArrayFromImage(image)
    labels = np.digitize(hu, [-900, -200, -20, 80, 300]).astype(np.uint8)   # 0 = air (background)
    labels[labels == 3] = 9                     # a gap in the values: labels 3..8 absent
    monkeypatch.setattr(statistics, "_SLAB_VOXELS", 7 * hu.shape[1] * hu.shape[2] + 5)  # 5 uneven slabs
    rows = label_statistics(labels, hu.astype(np.float32), image.GetSpacing(), [{"value": 9, "name": "muscle"}])
    assert [r["name"] for r in rows] == ["label_1", "label_2", "label_4", "label_5", "muscle"]
    reference = sitk.GetImageFromArray(labels)
    reference.CopyInformation(image)
    assert_same(rows, itk_statistics(reference, image))


def test_small_spread_on_a_large_offset_keeps_its_digits():
    rng = np.random.default_rng(0)
    image = (1e5 + rng.normal(0, 0.01, (20, 30, 40))).astype(np.float64)
    labels = rng.integers(0, 3, image.shape).astype(np.uint8)
    rows = label_statistics(labels, image, (1, 1, 1))
    for row in rows:
        assert row["std"] == pytest.approx(image[labels == row["label"]].std(ddof=1), rel=1e-6)


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.seg.nrrd"])
def test_predict_statistics_csv_and_sidecar(tmp_path, model_dir, name):  # noqa: F811
    r = run_cli("predict", CT, "-o", tmp_path / name, "--model", model_dir, "--progress", "none", "--statistics")
    assert r.returncode == 0, r.stderr
    header, rows = read_csv(tmp_path / "seg.statistics.csv")
    assert tuple(header) == COLUMNS
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert len(rows) == len(sidecar["statistics"]) >= 2
    # the numbers of the CSV and of the sidecar are ITK's, for the label map written and the input image
    labels = sitk.ReadImage(str(tmp_path / name))
    reference = itk_statistics(labels, sitk.ReadImage(str(CT)))
    assert_same(sidecar["statistics"], reference)
    names = {c["value"]: c["name"] for c in sidecar["labels"]}
    for row, entry in zip(rows, sidecar["statistics"]):
        values = dict(zip(header, row))
        assert int(values["label"]) == entry["label"] and values["name"] == names[entry["label"]]
        assert int(values["voxels"]) == entry["voxels"]
        for key in ("volume_ml", "mean", "std", "min", "max"):
            assert float(values[key]) == entry[key]


def test_no_statistics_unless_asked(tmp_path, model_dir):  # noqa: F811
    r = run_cli("predict", CT, "-o", tmp_path / "seg.nii.gz", "--model", model_dir, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.json", "seg.nii.gz"]
    assert "statistics" not in json.loads((tmp_path / "seg.json").read_text())
