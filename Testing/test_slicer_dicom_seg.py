"""DICOM SEG from the Slicer module: the segmentation as the user left it (corrections included) becomes a SEG
referencing the DICOM instances the volume was loaded from, through the real worker, on a real MRML scene
(slicer-core), checked with dciodvfy and dcmqi. The application's DICOM database is emulated by the one call
the logic makes of it, `fileForInstance(SOPInstanceUID) -> path` (ctkDICOMDatabase)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError:  # marked slicer: skips visibly without slicer-core
    slicer = None
try:
    import pydicom
except ImportError:  # marked dicom
    pydicom = None
pytestmark = [pytest.mark.slicer, pytest.mark.dicom]

from conftest import run_cli  # noqa: E402
from dicom_fixtures import run_tool, tool, write_ct_series  # noqa: E402
from slicer_fixtures import load_volume  # noqa: E402
from test_predict_cli import CT, model_dir  # noqa: E402,F401  (fixture: a tiny model with TotalSegmentator names)
from test_slicer_logic import logic, scene  # noqa: E402,F401  (fixtures: one worker for the module, a scene)
from test_slicer_static import gui_stubs  # noqa: E402,F401  (fixture: Qt and the application stubbed)
from SegBookLib import NodeIO  # noqa: E402
from SegBookLib.Parameters import SegmentParameters  # noqa: E402
from SegBookLib.SegmentationLogic import SegmentationError  # noqa: E402


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(folder, {SOPInstanceUID: file}, UIDs in slice order) of the CT written as a DICOM series."""
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    uids = write_ct_series(CT, folder)
    files = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: str(f) for f in folder.iterdir()}
    return folder, files, uids


def dicom_volume(scene, series):
    """The volume as Slicer's DICOM plugin leaves it: the voxels, and the instance UIDs of its slices."""
    volume = load_volume(scene, CT, "CT from DICOM")
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(series[2]))
    return volume


def test_corrected_segmentation_becomes_a_valid_seg_of_the_loaded_series(scene, logic, series, model_dir,  # noqa: F811
                                                                         tmp_path):
    volume = dicom_volume(scene, series)
    segmentation = logic.segment(scene, volume, SegmentParameters(model=str(model_dir), device="cpu"), timeout=180)
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() >= 2
    # the user's corrections: one structure deleted, one drawn by hand (no terminology of its own)
    removed = seg.GetNthSegment(0).GetName()
    seg.RemoveSegment(seg.GetNthSegmentID(0))
    hand = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    hand[5:9, 10:20, 12:30] = 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    NodeIO.setIjkToRas(labelmap, NodeIO.ijkToRasArray(volume))
    slicer.util.updateVolumeFromArray(labelmap, hand)
    assert slicer.vtkSlicerSegmentationsModuleLogic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
    seg.GetNthSegment(seg.GetNumberOfSegments() - 1).SetName("lesion (drawn)")
    scene.RemoveNode(labelmap)
    _, table = NodeIO.segmentsToLabels(segmentation, volume)        # the export's class table (names, codes)
    names = [c["name"] for c in table]
    assert removed not in names and names[-1] == "lesion (drawn)"
    # what the SEG must hold, built without the export's code: the model's labels of the same image (the CLI,
    # another process), the deleted structure removed, the hand-drawn box on top, numbered in segment order
    predicted = tmp_path / "predicted.nii.gz"
    r = run_cli("predict", CT, "-o", predicted, "--model", model_dir, "--device", "cpu", "--progress", "none")
    assert r.returncode == 0, r.stderr
    model_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted)))
    value_of = {c["name"]: c["value"] for c in json.loads(predicted.with_suffix("").with_suffix(".json").read_text())["labels"]}
    expected = np.zeros(model_labels.shape, np.uint8)
    for i, name in enumerate(names[:-1]):
        expected[model_labels == value_of[name]] = i + 1
    expected[hand > 0] = len(names)
    assert removed in value_of and (model_labels == value_of[removed]).any()    # the deletion removes something

    out = tmp_path / "out" / "seg.dcm"
    logic.startDicomSeg(volume, segmentation, out, "tiny-cli", fileForInstance=series[1].get)
    assert logic.wait(timeout=120)["event"] == "done"
    result = logic.finishDicomSeg()
    assert result["segments"] == len([v for v in np.unique(expected) if v])

    report = run_tool(tool("dciodvfy"), out)
    lines = (report.stdout + report.stderr).splitlines()
    assert report.returncode == 0 and lines and lines[0] == "Segmentation", lines   # validated as the SEG IOD
    assert not [line for line in lines if line.startswith("Error")], lines
    ds = pydicom.dcmread(str(out))
    source = pydicom.dcmread(next(iter(series[1].values())), stop_before_pixels=True)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == set(series[2])
    assert [s.SegmentLabel for s in ds.SegmentSequence] == names
    drawn = ds.SegmentSequence[-1]
    assert drawn.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"        # generic Tissue
    first = ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (first.CodingSchemeDesignator, first.CodeValue) == table[0]["terminology"]["type"][:2]
    # dcmqi (Slicer's DICOM SEG library) decodes exactly the corrected segmentation, on the volume's grid
    r = run_tool(tool("segimage2itkimage"), "--inputDICOM", out, "--outputDirectory", tmp_path, "-t", "nrrd",
                 "-p", "d")
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((tmp_path / "d-meta.json").read_text())
    decoded = np.zeros_like(expected)
    for s in (s for group in meta["segmentAttributes"] for s in group):
        image = sitk.ReadImage(str(tmp_path / f"d-{s['labelID']}.nrrd"))
        index = volume_index(volume, image)
        mask = sitk.GetArrayFromImage(image) > 0
        decoded[index][mask] = names.index(s["SegmentLabel"]) + 1
    assert np.array_equal(decoded, expected)


def volume_index(volume, image):
    """The slices of the volume's grid that dcmqi's (possibly cropped) output image covers."""
    spacing, origin, direction = NodeIO.lpsGeometry(NodeIO.ijkToRasArray(volume))
    start = np.rint(np.linalg.solve(direction * spacing, np.array(image.GetOrigin()) - origin)).astype(int)
    size = image.GetSize()
    return tuple(slice(start[a], start[a] + size[a]) for a in (2, 1, 0))


def test_export_is_refused_with_one_line_when_it_could_not_reference_its_images(scene, logic, series, model_dir,  # noqa: F811
                                                                                tmp_path):
    volume = load_volume(scene, CT, "CT from a NIfTI file")
    segmentation = logic.segment(scene, volume, SegmentParameters(model=str(model_dir), device="cpu"), timeout=180)
    with pytest.raises(SegmentationError, match="was not loaded from DICOM"):
        logic.startDicomSeg(volume, segmentation, tmp_path / "a.dcm", "m", fileForInstance=series[1].get)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(series[2]))
    gone = dict(series[1])
    gone.pop(series[2][3])
    with pytest.raises(SegmentationError, match="1 of the .* no longer in the DICOM database"):
        logic.startDicomSeg(volume, segmentation, tmp_path / "a.dcm", "m", fileForInstance=gone.get)
    with pytest.raises(SegmentationError, match="ends in .dcm"):
        logic.startDicomSeg(volume, segmentation, tmp_path / "a.nrrd", "m", fileForInstance=series[1].get)
    # a volume whose grid is not the series' (here: cropped) is refused by the worker, and nothing is written
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cropped")
    slicer.util.updateVolumeFromArray(other, slicer.util.arrayFromVolume(volume)[2:].copy())
    other.SetIJKToRASMatrix(_matrix(volume))     # the first two slices cut off: slice 0 is not instance 2
    other.SetAttribute("DICOM.instanceUIDs", " ".join(series[2][2:]))
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    logic.startDicomSeg(volume, segmentation, tmp_path / "b.dcm", "m", fileForInstance=series[1].get)
    assert logic.wait(timeout=60)["event"] == "error"
    with pytest.raises(SegmentationError, match="off the grid"):
        logic.finishDicomSeg()
    assert not (tmp_path / "b.dcm").exists()


def _matrix(volume):
    import vtk
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def test_export_button_writes_the_seg_through_the_timer(gui_stubs, series, model_dir, tmp_path,  # noqa: F811
                                                        monkeypatch):
    """The panel's "Export DICOM SEG..." with Qt stubbed: file dialog -> worker -> status line, the file written;
    Slicer's DICOM database is the one call the logic makes of it."""
    import sys
    import time
    import types
    from test_slicer_static import UI_FILE
    from SegBookLib.Widget import Widget

    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        scene = slicer.mrmlScene
        volume = dicom_volume(scene, series)
        node = panel.segmentation.segment(scene, volume, SegmentParameters(model=str(model_dir), device="cpu"),
                                          timeout=180)
        assert node.GetAttribute("SegBook.Model") == "tiny-cli"
        ui.inputVolumeSelector.currentNode.return_value = volume
        ui.outputSegmentationSelector.currentNode.return_value = node
        out = tmp_path / "from the panel.dcm"
        sys.modules["qt"].QFileDialog.getSaveFileName.return_value = str(out)
        monkeypatch.setattr(slicer, "dicomDatabase", types.SimpleNamespace(fileForInstance=series[1].get),
                            raising=False)
        panel.onExportDicomSeg()
        assert ui.segmentButton.text == "Cancel" and not ui.exportDicomSegButton.enabled

        def finish():
            deadline = time.monotonic() + 120
            while panel.segmentation.job is not None:
                assert time.monotonic() < deadline, "export did not finish"
                time.sleep(0.2)
                panel.onTimer()
        finish()
        assert gui_stubs["errors"] == []
        assert ui.segmentStatusLabel.text.startswith("DICOM SEG of") and str(out) in ui.segmentStatusLabel.text
        ds = pydicom.dcmread(str(out))
        assert ds.Modality == "SEG" and ds.ManufacturerModelName == "tiny-cli"
        assert ui.segmentButton.text == "Segment" and ui.exportDicomSegButton.enabled
        # the SEG references the volume the segmentation was made on (its reference geometry), whatever the
        # Input selector shows now
        plain = load_volume(scene, CT, "plain")
        ui.inputVolumeSelector.currentNode.return_value = plain
        other = tmp_path / "input changed since.dcm"
        sys.modules["qt"].QFileDialog.getSaveFileName.return_value = str(other)
        panel.onExportDicomSeg()
        finish()
        assert gui_stubs["errors"] == [], gui_stubs["errors"]
        ds = pydicom.dcmread(str(other))
        referenced = [i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
        assert sorted(referenced) == sorted(series[2])
        # a segmentation made on a volume that did not come from DICOM: one message, nothing written
        node.SetReferenceImageGeometryParameterFromVolumeNode(plain)
        ui.inputVolumeSelector.currentNode.return_value = volume
        sys.modules["qt"].QFileDialog.getSaveFileName.return_value = str(tmp_path / "no.dcm")
        with pytest.raises(SegmentationError):     # Slicer's tryWithErrorDisplay shows it, then re-raises
            panel.onExportDicomSeg()
        assert len(gui_stubs["errors"]) == 1 and "not loaded from DICOM" in gui_stubs["errors"][0]
        assert not (tmp_path / "no.dcm").exists()
    finally:
        panel.cleanup()
