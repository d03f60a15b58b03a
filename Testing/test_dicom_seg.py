"""DICOM SEG output of `segbook predict` for a DICOM series, checked with tools made by others: the
standard's validator (dciodvfy, dicom3tools) and dcmqi's decoder (what 3D Slicer uses for DICOM SEG)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from dicom_fixtures import run_tool, tool, write_ct_series
from test_predict_cli import CT, model_dir  # noqa: F401  (fixture: a tiny model with TotalSegmentator names)

try:
    import highdicom as hd
    import pydicom
except ImportError:  # every test here is marked dicom: they skip visibly without the DICOM SEG tools
    hd = pydicom = None
pytestmark = pytest.mark.dicom


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    return folder, write_ct_series(CT, folder)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, series, model_dir):  # noqa: F811
    """One DICOM SEG and one NIfTI label map of the same series by the same model."""
    out = tmp_path_factory.mktemp("out")
    for name in ("seg.dcm", "seg.nii.gz"):
        r = run_cli("predict", series[0], "-o", out / name, "--model", model_dir, "--progress", "none",
                    "--statistics")
        assert r.returncode == 0, r.stderr
    return out


def _dicom_cielab(rgb) -> np.ndarray:
    """sRGB (0..255) -> CIE L*a*b* (D65) in DICOM's 0..65535 encoding (PS3.3 C.10.7.1.1), from the CIE and
    sRGB (IEC 61966-2-1) definitions."""
    c = np.asarray(rgb, float) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    return np.round([lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255])


def test_seg_is_valid_dicom(outputs):
    r = run_tool(tool("dciodvfy"), outputs / "seg.dcm")
    report = r.stdout + r.stderr
    assert "Segmentation" in report, report                 # it did validate against the SEG IOD
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report


def test_dcmqi_decodes_the_label_map_written_as_nifti(outputs, tmp_path):
    r = run_tool(tool("segimage2itkimage"), "--inputDICOM", outputs / "seg.dcm", "--outputDirectory", tmp_path,
                 "-t", "nrrd", "-p", "seg")
    assert r.returncode == 0, r.stdout + r.stderr
    reference = sitk.ReadImage(str(outputs / "seg.nii.gz"))
    expected = sitk.GetArrayFromImage(reference)
    meta = json.loads((tmp_path / "seg-meta.json").read_text())
    segments = [s for group in meta["segmentAttributes"] for s in group]
    table = {c["name"]: c for c in json.loads((outputs / "seg.json").read_text())["labels"]}
    decoded = np.zeros_like(expected)
    for s in segments:
        image = sitk.ReadImage(str(tmp_path / f"seg-{s['labelID']}.nrrd"))
        assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
        mask = sitk.GetArrayFromImage(image) > 0
        assert not decoded[mask].any(), "segments of one label map do not overlap"
        entry = table[s["SegmentLabel"]]
        decoded[mask] = entry["value"]
        assert s["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == entry["terminology"]["type"][1]
        assert s["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == entry["terminology"]["category"][1]
        if entry["terminology"].get("type_modifier"):
            assert s["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == \
                entry["terminology"]["type_modifier"][1]
        assert np.abs(np.array(s["recommendedDisplayRGBValue"]) - entry["color"]).max() <= 2
    assert len(segments) >= 2
    assert np.array_equal(decoded, expected)


def test_seg_references_the_series_study_and_frame_of_reference(outputs, series):
    folder, uids = series
    seg = pydicom.dcmread(str(outputs / "seg.dcm"))
    source = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"          # Segmentation Storage
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.PatientID == source.PatientID
    [ref] = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence] == uids
    # every frame is derived from the source slice it lies on
    for frame in seg.PerFrameFunctionalGroupsSequence:
        [item] = frame.DerivationImageSequence[0].SourceImageSequence
        k = uids.index(item.ReferencedSOPInstanceUID)
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(position, np.array(sitk.ReadImage(str(CT)).TransformIndexToPhysicalPoint((0, 0, k))))
    # algorithm identification, names, colours in CIELab
    labels = json.loads((outputs / "seg.json").read_text())["labels"]
    for segment in seg.SegmentSequence:
        [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "tiny-cli"
        assert "segbook" in algorithm.AlgorithmVersion
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        entry = next(c for c in labels if c["name"] == segment.SegmentLabel)
        # highdicom >= 0.23 converts too; before (Slicer 5.8's 0.22) the CIE formulas below stand in
        from_rgb = getattr(hd.color.CIELabColor, "from_rgb", None)
        theirs = from_rgb(*entry["color"]).value if from_rgb else _dicom_cielab(entry["color"])
        # DICOM scales L*a*b* to 0..65535: within 0.1 % of the range (rounding of the constants)
        assert np.abs(np.array(segment.RecommendedDisplayCIELabValue) - theirs).max() <= 65
    # the statistics sidecar and CSV come with the SEG as with a label map
    assert (outputs / "seg.statistics.csv").read_text() == (outputs / "seg.nii.gz").parent.joinpath(
        "seg.statistics.csv").read_text()


def test_anonymised_series_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "anon"
    write_ct_series(CT, folder, anonymised=True)
    # a model that does not exist: the refusal must come first, so it never gets to the model
    r = run_cli("predict", folder, "-o", tmp_path / "out" / "seg.dcm", "--model", tmp_path / "no-model",
                "--progress", "none")
    assert r.returncode != 0
    assert "cannot reference this series" in r.stderr and "SOPInstanceUID" in r.stderr
    assert "StudyInstanceUID" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_non_dicom_input_is_refused_for_seg_output(tmp_path):
    r = run_cli("predict", CT, "-o", tmp_path / "seg.dcm", "--model", tmp_path / "no-model", "--progress", "none")
    assert r.returncode != 0
    assert "needs a DICOM series folder" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_worker_writes_a_seg_and_refuses_a_file_input(tmp_path, series, model_dir):  # noqa: F811
    import io
    from segbook.worker import Worker
    stream = io.StringIO()
    worker = Worker(stream)
    worker.handle({"id": "bad", "command": "predict", "input": str(CT), "output": str(tmp_path / "a.dcm"),
                   "model": str(tmp_path / "no-model")})
    worker.handle({"id": "good", "command": "predict", "input": str(series[0]), "output": str(tmp_path / "b.dcm"),
                   "model": str(model_dir), "device": "cpu", "statistics": True})
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    bad = next(e for e in events if e.get("request") == "bad" and e["event"] == "error")
    assert "needs a DICOM series folder" in bad["message"]
    good = next(e for e in events if e.get("request") == "good" and e["event"] in ("done", "error"))
    assert good["event"] == "done", good
    assert good["result"]["statistics"] and (tmp_path / "b.statistics.csv").exists()
    seg = pydicom.dcmread(str(tmp_path / "b.dcm"))
    assert len(seg.SegmentSequence) == len(good["result"]["statistics"])


def test_label_values_with_gaps_become_segments_1_to_n(tmp_path, series):
    """Segment numbers must run 1..n: values 3 and 7 become segments 1 and 2, decoded back by dcmqi."""
    from segbook import dicom_seg
    from segbook.errors import InputError
    from segbook.labels import class_table
    sources = dicom_seg.read_source_series(series[0])
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))
    labels = np.where(hu > 150, 7, np.where((hu > 20) & (hu < 80), 3, 0)).astype(np.uint8)
    table = [c for c in class_table(["background", "a", "b", "liver", "d", "e", "f", "spleen"]) if c["value"] in (3, 7)]
    dicom_seg.write_seg(labels, sources, table, tmp_path / "gaps.dcm", model="m", version="1")
    seg = pydicom.dcmread(str(tmp_path / "gaps.dcm"))
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "spleen")]
    r = run_tool(tool("segimage2itkimage"), "--inputDICOM", tmp_path / "gaps.dcm", "--outputDirectory", tmp_path,
                 "-t", "nrrd", "-p", "d")
    assert r.returncode == 0, r.stdout + r.stderr
    for number, value in ((1, 3), (2, 7)):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"d-{number}.nrrd"))) > 0
        assert np.array_equal(mask, labels == value)
    with pytest.raises(InputError, match="nothing was segmented"):
        dicom_seg.write_seg(np.zeros_like(labels), sources, table, tmp_path / "empty.dcm", model="m", version="1")
    assert not (tmp_path / "empty.dcm").exists()
