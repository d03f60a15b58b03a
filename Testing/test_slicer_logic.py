"""The Slicer module's logic on a real MRML scene (slicer-core wheel), through the real worker process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

from slicer_fixtures import IMAGE, IMAGE2, LABEL, LABEL2, load_label_segmentation, load_volume, make_tiny_model  # noqa: E402
from SegBookLib import NodeIO  # noqa: E402
from SegBookLib.FineTuneLogic import FineTuneLogic, TrainingSetError  # noqa: E402
from SegBookLib.ModelCatalog import ModelCatalog  # noqa: E402
from SegBookLib.Parameters import FineTuneParameters, SegmentParameters  # noqa: E402
from SegBookLib.SegmentationLogic import SegmentationError, SegmentationLogic  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def logic():
    """One logic (one worker process) for the module: it is meant to stay alive between clicks."""
    lg = SegmentationLogic()
    yield lg
    lg.shutdown()


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def ijk_to_ras(node):
    return NodeIO.ijkToRasArray(node)


def scene_snapshot(scene):
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(n.GetID(), n.GetClassName(), n.GetName(), n.GetMTime()) for n in nodes]


def segment_masks(segmentation_node, reference):
    seg = segmentation_node.GetSegmentation()
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        out[sid] = NodeIO.segmentMask(segmentation_node, sid, reference)
    return out


# -- geometry -------------------------------------------------------------------------------------------
def test_volume_node_holds_what_the_core_reads(scene, tmp_path):
    """Slicer's reader -> node (RAS) -> our export (LPS) -> the core's reader: same voxels, same place."""
    from segbook.io import read_image
    node = load_volume(scene, IMAGE)
    reference = sitk.ReadImage(str(IMAGE))
    # the node's IJK-to-RAS is the file's LPS geometry with x and y negated
    expected = np.eye(4)
    expected[:3, :3] = FLIP @ np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    expected[:3, 3] = FLIP @ np.array(reference.GetOrigin())
    assert np.allclose(ijk_to_ras(node), expected)
    assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(reference))

    array, geometry = read_image(NodeIO.writeVolume(node, tmp_path / "input.nrrd"))
    assert np.array_equal(array[0], sitk.GetArrayFromImage(reference).astype(np.float32))
    assert geometry.size == reference.GetSize()
    assert np.allclose(geometry.origin, reference.GetOrigin())
    assert np.allclose(geometry.direction, reference.GetDirection())
    assert np.allclose(geometry.spacing, reference.GetSpacing())


def test_oblique_geometry_matches_slicers_own_writer(scene, tmp_path):
    node = load_volume(scene, IMAGE)
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    m[:3, 3] = [10.0, -20.0, 5.0]
    NodeIO.setIjkToRas(node, m)

    ours = sitk.ReadImage(str(NodeIO.writeVolume(node, tmp_path / "ours.nrrd")))
    assert np.allclose(ours.GetSpacing(), [0.8, 1.2, 2.5])
    assert np.allclose(ours.GetOrigin(), [-10.0, 20.0, 5.0])
    assert np.allclose(np.array(ours.GetDirection()).reshape(3, 3), FLIP @ rot)
    # Slicer's NRRD writer puts the node in the same place
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(node)
    theirs = sitk.ReadImage(str(tmp_path / "slicer.nrrd"))
    assert np.allclose(ours.GetOrigin(), theirs.GetOrigin())
    assert np.allclose(ours.GetDirection(), theirs.GetDirection())
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    # and back: the file's geometry gives the node's matrix
    assert np.allclose(NodeIO.ijkToRasFromImage(ours), m)


def test_roi_box_is_lps_in_the_volume_frame(scene):
    node = load_volume(scene, IMAGE)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(4.0, 6.0, 8.0)
    assert NodeIO.roiToLpsBox(roi, node) == pytest.approx([-3.0, -5.0, -1.0, 1.0, 1.0, 7.0])
    # a volume moved by a linear transform: the box is given in the volume's own frame
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert NodeIO.roiToLpsBox(roi, node) == pytest.approx([7.0, -5.0, -1.0, 11.0, 1.0, 7.0])


def test_label_values_become_segments_replacing_what_was_there(scene):
    volume = load_volume(scene, IMAGE)
    target = load_label_segmentation(scene, LABEL, volume, {1: "old a", 2: "old b"})
    labels = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    labels[5:9, 10:20, 10:15] = 3
    labels[20:22, 30:33, 20:25] = 7                       # a value the class table does not name
    table = [{"value": 3, "name": "spleen", "color": [10, 20, 30], "terminology": None}]
    ids = NodeIO.labelsToSegmentation(scene, labels, ijk_to_ras(volume), table, target, volume)
    seg = target.GetSegmentation()
    assert [seg.GetSegment(i).GetName() for i in ids] == ["spleen", "label_7"]
    assert np.allclose(seg.GetSegment(ids[0]).GetColor(), [10 / 255, 20 / 255, 30 / 255])
    assert np.array_equal(NodeIO.segmentMask(target, ids[0], volume), (labels == 3).astype(np.uint8))
    # nothing found: the node is emptied, not left with stale segments
    NodeIO.labelsToSegmentation(scene, np.zeros_like(labels), ijk_to_ras(volume), table, target, volume)
    assert seg.GetNumberOfSegments() == 0


# -- Segment ------------------------------------------------------------------------------------------
def test_segment_builds_named_coded_segments_on_the_input_grid(scene, logic, tiny_model):
    volume = load_volume(scene, IMAGE, "MRI")
    events = []
    params = SegmentParameters(model=str(tiny_model), device="cpu")
    segmentation = logic.segment(scene, volume, params, timeout=120, onEvent=events.append)

    assert any(e["event"] == "progress" and e["stage"] == "predict" for e in events)
    seg = segmentation.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert sorted(names) == ["liver", "spleen"]
    # each segment is exactly the voxels the core labelled with its value, on the input's grid: the core's
    # labels for the same file, computed here in-process
    from segbook.inference import Predictor
    from segbook.io import read_image
    array, geometry = read_image(IMAGE)
    core = Predictor(str(tiny_model), device="cpu").predict_array(array, geometry.spacing_zyx)
    masks = segment_masks(segmentation, volume)
    shape = slicer.util.arrayFromVolume(volume).shape
    assert core.shape == shape
    for sid, mask in masks.items():
        segment = seg.GetSegment(sid)
        value = {"liver": 1, "spleen": 2}[segment.GetName()]
        assert segment.GetLabelValue() == value
        assert mask.any() and np.array_equal(mask > 0, core == value), segment.GetName()
    assert sorted(np.unique(core)[1:]) == [1, 2]    # no labelled value is missing a segment
    # colours and SNOMED CT codes from the mapping table
    liver = seg.GetSegment(seg.GetSegmentIdBySegmentName("liver"))
    from segbook.labels import default_color
    assert np.allclose(liver.GetColor(), np.array(default_color("liver", 1)) / 255.0)
    term = NodeIO.segmentTerminology(liver)
    assert term.startswith(NodeIO.TERMINOLOGY_CONTEXT + "~SCT^123037004^")
    assert "SCT^10200004^Liver" in term
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(term, entry)
    assert entry.GetTypeObject().GetCodeValue() == "10200004"
    # reference geometry = the input volume, so DICOM SEG export uses its grid
    ref = segmentation.GetNodeReferenceID("referenceImageGeometryRef")
    assert ref == volume.GetID()
    assert float(segmentation.GetAttribute("SegBook.Elapsed")) > 0
    assert scene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode") is None, "no temporary node left behind"


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def segment_world_points(segmentation_node, sid) -> set:
    """World RAS (rounded to 1e-3 mm) of a segment's voxels: its labelmap's lattice, then its node's transforms."""
    import vtk
    from vtk.util import numpy_support
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(sid, image)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    extent = image.GetExtent()
    k, j, i = np.nonzero(values)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    imageToNode = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(imageToNode)
    nodeToWorld = vtk.vtkMatrix4x4()
    if segmentation_node.GetParentTransformNode() is not None:
        segmentation_node.GetParentTransformNode().GetMatrixTransformToWorld(nodeToWorld)
    world = (_matrix(nodeToWorld) @ _matrix(imageToNode) @ ijk)[:3].T
    return set(map(tuple, np.round(world, 3)))


def test_a_transformed_volume_gets_its_segments_in_place_once(scene, logic, tiny_model):
    """Segment voxels and the Segment Editor's grid (reference geometry) coincide with the volume's in world."""
    import vtk
    volume = load_volume(scene, IMAGE, "MRI")
    params = SegmentParameters(model=str(tiny_model), device="cpu")
    untransformed = logic.segment(scene, volume, params, timeout=120)
    plain = {untransformed.GetSegmentation().GetSegment(sid).GetName(): mask
             for sid, mask in segment_masks(untransformed, volume).items()}
    angle = np.deg2rad(25)
    toParent = np.array([[np.cos(angle), -np.sin(angle), 0, 30.0], [np.sin(angle), np.cos(angle), 0, -12.0],
                         [0, 0, 1, 7.0], [0, 0, 0, 1]])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, toParent[r, c])
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    segmentation = logic.segment(scene, volume, params, timeout=120)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    seg = segmentation.GetSegmentation()
    # the reference geometry, in the segmentation's frame, is the volume's local grid: once transformed,
    # the Segment Editor edits on the volume's voxels
    geometry = [float(v) for v in seg.GetConversionParameter("Reference image geometry").split(";") if v]
    assert np.allclose(np.array(geometry[:16]).reshape(4, 4), ijk_to_ras(volume), atol=1e-6)
    shape = slicer.util.arrayFromVolume(volume).shape
    assert [int(v) for v in geometry[16:22]] == [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]
    # each segment's voxels, in world coordinates, are the volume's voxels the core labelled
    masks = segment_masks(segmentation, volume)
    assert masks and sorted(seg.GetSegment(sid).GetName() for sid in masks) == sorted(plain)
    ijk = ijk_to_ras(volume)
    for sid, mask in masks.items():
        # the same voxels as the untransformed run: the transform moves the result, it does not change it
        assert np.array_equal(mask, plain[seg.GetSegment(sid).GetName()])
        k, j, i = np.nonzero(mask)
        expected = (toParent @ ijk @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
        assert segment_world_points(segmentation, sid) == set(map(tuple, np.round(expected, 3)))


def test_second_click_reuses_the_worker_and_the_model(scene, logic, tiny_model):
    volume = load_volume(scene, IMAGE)
    params = SegmentParameters(model=str(tiny_model), device="cpu")
    logic.segment(scene, volume, params, timeout=120)
    pid = logic.workerPid()
    events = []
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    out = logic.segment(scene, volume, params, segmentationNode=target, timeout=120, onEvent=events.append)
    assert out is target
    assert logic.workerPid() == pid
    assert not any(e["event"] == "loaded" for e in events)
    assert [e for e in events if e["event"] == "done"][0]["reused"] is True


def test_roi_restricts_the_result(scene, logic, tiny_model):
    volume = load_volume(scene, IMAGE)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    ijk = ijk_to_ras(volume)
    shape = slicer.util.arrayFromVolume(volume).shape          # (k, j, i)
    centre = ijk @ np.array([shape[2] / 2, shape[1] / 2, shape[0] / 2, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(12.0, 14.0, 10.0)
    segmentation = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu"),
                                 roiNode=roi, timeout=120)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    k, j, i = np.indices(shape)
    ras = np.einsum("rc,c...->r...", ijk, np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3]
    inside = np.ones(shape, bool)
    for axis in range(3):
        inside &= (ras[axis] >= bounds[2 * axis] - 1e-3) & (ras[axis] <= bounds[2 * axis + 1] + 1e-3)
    masks = segment_masks(segmentation, volume)
    assert masks, "something is segmented inside the ROI"
    for mask in masks.values():
        assert not (mask[~inside] > 0).any(), "voxels outside the ROI are labelled"
        assert (mask[inside] > 0).any()


def test_cancel_kills_the_worker_and_leaves_the_scene_unchanged(scene, logic, tiny_model):
    volume = load_volume(scene, IMAGE)
    existing = load_label_segmentation(scene, LABEL, volume, {1: "anterior", 2: "posterior"}, "keep me")
    masks_before = segment_masks(existing, volume)
    before = scene_snapshot(scene)
    logic.start(volume, SegmentParameters(model=str(tiny_model), device="cpu", tta=True))
    pid = logic.workerPid()
    logic.worker.waitFor(lambda e: e.get("event") == "progress" and e.get("stage") == "predict", timeout=60)
    logic.cancel()
    assert not logic.isBusy() and logic.workerPid() is None
    import os
    with pytest.raises(OSError):
        os.kill(pid, 0)
    assert scene_snapshot(scene) == before
    masks_after = segment_masks(existing, volume)
    assert masks_after.keys() == masks_before.keys()
    assert all(np.array_equal(masks_after[k], masks_before[k]) for k in masks_before)
    # the next click starts a fresh worker
    out = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu"), timeout=120)
    assert out.GetSegmentation().GetNumberOfSegments() == 2 and logic.workerPid() != pid


def test_worker_error_is_one_line_and_changes_nothing(scene, logic, tiny_model):
    volume = load_volume(scene, IMAGE)
    before = scene_snapshot(scene)
    with pytest.raises(SegmentationError, match="kidney_left"):
        logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu",
                                                       classes=["kidney_left"]), timeout=120)
    assert scene_snapshot(scene) == before
    # a subset that exists gives only that structure
    out = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu", classes=["spleen"]),
                        timeout=120)
    seg = out.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["spleen"]


def test_a_worker_that_dies_reports_its_last_words(scene, tmp_path):
    import sys
    from SegBookLib.ProcessRunner import ProcessRunner
    volume = load_volume(scene, IMAGE)
    before = scene_snapshot(scene)
    dying = SegmentationLogic(workerFactory=lambda: ProcessRunner(
        [sys.executable, "-c", "import sys; sys.stderr.write('ModuleNotFoundError: No module named torch\\n'); "
                               "sys.exit(1)"]))
    with pytest.raises(SegmentationError, match="No module named torch"):
        dying.segment(scene, volume, SegmentParameters(model="stunet-s-totalseg"), timeout=60)
    assert scene_snapshot(scene) == before and not dying.isBusy()


@pytest.mark.parametrize("how", ["volume deleted", "scene closed"])
def test_input_volume_gone_during_the_job_is_a_clear_message(scene, logic, tiny_model, how):
    """The volume deleted, or the scene closed, while the worker runs: a one-line error, nothing added, the
    worker still serves the next job."""
    volume = load_volume(scene, IMAGE)
    volumeID = volume.GetID()
    logic.start(volume, SegmentParameters(model=str(tiny_model), device="cpu"))
    tmp = logic.job["tmp"]
    if how == "volume deleted":
        scene.RemoveNode(volume)
    else:
        scene.Clear(0)
    del volume
    logic.wait(timeout=120)
    before = scene_snapshot(scene)
    with pytest.raises(SegmentationError, match="removed from the scene") as info:
        logic.applyResult(scene, scene.GetNodeByID(volumeID))
    assert "\n" not in str(info.value) and scene_snapshot(scene) == before and not tmp.exists()
    again = load_volume(scene, IMAGE)
    out = logic.segment(scene, again, SegmentParameters(model=str(tiny_model), device="cpu"), timeout=120)
    assert out.GetSegmentation().GetNumberOfSegments() == 2


# -- Fine-tune export -----------------------------------------------------------------------------------
def test_fine_tune_export_writes_the_label_mapping(scene, tmp_path):
    from segbook.dataset import check_dataset, read_dataset
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    v1 = load_volume(scene, IMAGE, "case one")
    s1 = load_label_segmentation(scene, LABEL, v1, {1: "anterior", 2: "posterior"})
    v2 = load_volume(scene, IMAGE2, "case two")
    # the second case has its segments in the other order and names them the same: values follow names
    s2 = load_label_segmentation(scene, LABEL2, v2, {1: "anterior", 2: "posterior"})
    seg2 = s2.GetSegmentation()
    seg2.SetSegmentIndex(seg2.GetSegmentIdBySegmentName("posterior"), 0)
    ft.setClasses(["posterior", "anterior"])            # e.g. the base model's order

    ft.addCase(v1, s1)
    ft.addCase(v2, s2)
    dataset = json.loads((tmp_path / "training" / "dataset.json").read_text())
    assert dataset["class_names"] == ["background", "posterior", "anterior"]
    assert [c["name"] for c in dataset["cases"]] == ["case_one", "case_two"]
    for case, label_file in zip(dataset["cases"], (LABEL, LABEL2)):
        written = sitk.ReadImage(str(tmp_path / "training" / case["label"]))
        original = sitk.ReadImage(str(label_file))
        a, b = sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original)
        assert np.array_equal(a == 1, b == 2) and np.array_equal(a == 2, b == 1) and np.array_equal(a == 0, b == 0)
        assert np.allclose(written.GetOrigin(), original.GetOrigin())
        assert np.allclose(written.GetDirection(), original.GetDirection())
        image = sitk.ReadImage(str(tmp_path / "training" / case["image"]))
        assert np.array_equal(sitk.GetArrayFromImage(image),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(IMAGE if case is dataset["cases"][0]
                                                                        else IMAGE2))))
    # the core reads and accepts the set as written
    ds = read_dataset(tmp_path / "training" / "dataset.json")
    assert ds.class_names == ["background", "posterior", "anterior"] and len(ds.cases) == 2
    check_dataset(ds, expected_channels=1)
    # the set persists: a new session sees the same cases
    assert [c["name"] for c in FineTuneLogic(tmp_path / "training", tmp_path / "models").cases()] == \
        ["case_one", "case_two"]


def test_fine_tune_keeps_the_base_class_order_only_for_the_same_classes(scene, tmp_path):
    volume = load_volume(scene, IMAGE, "one")
    segmentation = load_label_segmentation(scene, LABEL, volume, {1: "anterior", 2: "posterior"})
    same = FineTuneLogic(tmp_path / "a", tmp_path / "models")
    same.addCase(volume, segmentation, baseClasses=["background", "posterior", "anterior"])
    assert same.classNames() == ["background", "posterior", "anterior"]
    other = FineTuneLogic(tmp_path / "b", tmp_path / "models")
    other.addCase(volume, segmentation, baseClasses=["background", "liver", "spleen", "anterior"])
    assert other.classNames() == ["background", "anterior", "posterior"]     # the case's own order


def test_fine_tune_refuses_inconsistent_cases(scene, tmp_path):
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    v1 = load_volume(scene, IMAGE, "one")
    ft.addCase(v1, load_label_segmentation(scene, LABEL, v1, {1: "anterior", 2: "posterior"}))
    v2 = load_volume(scene, IMAGE2, "two")
    partial = load_label_segmentation(scene, LABEL2, v2, {1: "anterior", 2: "posterior"})
    partial.GetSegmentation().RemoveSegment(partial.GetSegmentation().GetSegmentIdBySegmentName("posterior"))
    with pytest.raises(TrainingSetError, match="posterior"):
        ft.addCase(v2, partial)
    entry = ft.addCase(v2, partial, missingAsBackground=True)
    assert entry["missing_as_background"] is True
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "training" / entry["label"])))
    assert set(np.unique(label).tolist()) == {0, 1}
    renamed = load_label_segmentation(scene, LABEL2, v2, {1: "front", 2: "posterior"})
    with pytest.raises(TrainingSetError, match="front"):
        ft.addCase(v2, renamed, allowNewClasses=False)
    ft.removeCase("two")
    assert [c["name"] for c in ft.cases()] == ["one"]
    assert not (tmp_path / "training" / entry["label"]).exists()


def test_fine_tune_takes_a_dataset_folder_in_its_own_class_order(tmp_path):
    from slicer_fixtures import ROOT
    folder = ROOT / "Testing" / "data" / "hippocampus_mini"     # an nnU-Net raw folder
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models")
    ft.setClasses(["posterior", "anterior"])
    added = ft.addDatasetFolder(folder)
    assert len(added) == len(list((folder / "labelsTr").glob("*.nii.gz")))
    for case in added:
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case['name']}.nii.gz")))
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "training" / case["label"])))
        assert np.array_equal(written == 1, original == 2) and np.array_equal(written == 2, original == 1)
    assert ft.classNames() == ["background", "posterior", "anterior"]


def test_catalog_lists_fine_tuned_models(tmp_path, tiny_model):
    catalog = ModelCatalog(tmp_path / "home")
    released = {e.name for e in catalog.entries()}
    assert "stunet-b-totalseg" in released
    make_tiny_model(catalog.modelsDirectory / "my-liver", name="my-liver")
    mine = [e for e in catalog.entries() if e.fineTuned]
    assert [e.label for e in mine] == ["my-liver (yours)"] and mine[0].downloaded
    catalog.addModelFolder(tiny_model)
    assert str(tiny_model.resolve()) in {e.name for e in ModelCatalog(tmp_path / "home").entries()}
    with pytest.raises(ValueError, match="not-a-model"):
        catalog.addModelFolder(tmp_path / "not-a-model")


def test_fine_tune_arguments_map_onto_the_cli(tmp_path):
    args = FineTuneParameters(base="hippocampus-demo", outputName="mine", preset="quick", epochs=2,
                              iterationsPerEpoch=3).arguments("d.json", tmp_path / "m", resume=True)
    assert args[:5] == ["finetune", "d.json", "-o", str(tmp_path / "m"), "--base"]
    for flag, value in (("--preset", "quick"), ("--epochs", "2"), ("--iterations-per-epoch", "3"),
                        ("--progress", "json")):
        assert args[args.index(flag) + 1] == value
    assert "--resume" in args


# -- batch, chart, parameters ---------------------------------------------------------------------------
def run_batch(*args, timeout=180):
    import os
    import subprocess
    import sys
    from slicer_fixtures import SLICER_MODULE
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SLICER_MODULE / "Resources" / "Scripts" / "SegBookBatch.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_segmentation_file(path):
    node = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node.GetSegmentation()


def test_batch_script_segments_a_folder_and_fails_with_a_non_zero_status(tmp_path, tiny_model):
    """One run: a good file becomes a Slicer segmentation file, a broken one makes the exit status 1."""
    import shutil
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(IMAGE, inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    proc = run_batch("--input", inputs, "--output", tmp_path / "out", "--model", tiny_model, "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    assert "broken.nii.gz" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.seg.nrrd"]
    seg = read_segmentation_file(tmp_path / "out" / "good.seg.nrrd")
    names = sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments()))
    assert names == ["liver", "spleen"]
    liver = seg.GetSegment(seg.GetSegmentIdBySegmentName("liver"))
    assert "SCT^10200004^Liver" in NodeIO.segmentTerminology(liver), "terminology survives the file"
    proc = run_batch("--input", tmp_path / "missing.nii.gz", "--output", tmp_path / "o.seg.nrrd", "--model", tiny_model)
    assert proc.returncode == 2 and "missing.nii.gz" in proc.stderr


def test_training_chart_follows_metric_events(scene):
    from SegBookLib.TrainingChart import TrainingChart
    chart = TrainingChart(scene)
    chart.add({"event": "metric", "epoch": 0, "train_loss": 1.2, "val_dice": 0.1})
    chart.add({"event": "metric", "epoch": 1, "train_loss": 0.9, "val_dice": 0.3, "lr": 0.01})
    table = chart.table.GetTable()
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == \
        ["epoch", "train_loss", "val_dice", "lr"]
    assert chart.column("val_dice") == [0.1, 0.3]
    series = [chart.chart.GetNthPlotSeriesNode(i) for i in range(chart.chart.GetNumberOfPlotSeriesNodes())]
    assert sorted(s.GetYColumnName() for s in series) == ["train_loss", "val_dice"]   # not lr
    assert all(s.GetXColumnName() == "epoch" for s in series)
    assert chart.view.GetPlotChartNodeID() == chart.chart.GetID()


def test_parameters_are_saved_with_the_scene(scene, tmp_path):
    """Through a real .mrml file: slicer-core writes the scene and reads it into another one; the attribute's
    JSON is read there by hand, and the parameters come back from it."""
    import xml.etree.ElementTree as ET
    from SegBookLib.Parameters import loadFromNode, saveToNode
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    params = SegmentParameters(model="C:\\models\\liver;v2 (50%)", device="cpu", tta=True, classes=["liver"])
    saveToNode(params, node, "Segment")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    written = next(e for e in ET.parse(tmp_path / "scene.mrml").iter("ScriptedModule"))
    assert "SegBook.Segment:" in written.get("attributes")
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Connect()
    again = reloaded.GetFirstNodeByClass("vtkMRMLScriptedModuleNode")
    stored = json.loads(again.GetAttribute("SegBook.Segment"))
    assert {k: stored[k] for k in ("model", "device", "tta", "classes")} == {
        "model": "C:\\models\\liver;v2 (50%)", "device": "cpu", "tta": True, "classes": ["liver"]}
    assert loadFromNode(SegmentParameters, again, "Segment") == params
    assert loadFromNode(FineTuneParameters, again, "FineTune") == FineTuneParameters()
    with pytest.raises(ValueError):
        SegmentParameters(device="tpu")


# -- Fine-tune run --------------------------------------------------------------------------------------
FAST = ["--patch-size", "32", "32", "32", "--batch-size", "1", "--num-workers", "0", "--threads", "1",
        "--val-every", "1"]


def test_fine_tune_runs_in_a_worker_and_the_model_reaches_the_selector(scene, tmp_path):
    catalog = ModelCatalog(tmp_path / "home")
    base = make_tiny_model(tmp_path / "base", classes=["background", "anterior", "posterior"], name="base",
                           stages=6)
    ft = FineTuneLogic(catalog.trainingDirectory, catalog.modelsDirectory)
    for image, label, name in ((IMAGE, LABEL, "one"), (IMAGE2, LABEL2, "two")):
        volume = load_volume(scene, image, name)
        ft.addCase(volume, load_label_segmentation(scene, label, volume, {1: "anterior", 2: "posterior"}))

    # a run stopped after its first epoch saves a checkpoint; Resume finishes it
    params = FineTuneParameters(base=str(base), outputName="my hippocampus", preset="quick", device="cpu",
                                epochs=3, iterationsPerEpoch=2, extraArguments=FAST)
    ft.start(params)
    ft.waitFor(lambda e: e.get("event") == "metric", timeout=240)
    ft.stop(wait=120)
    assert ft.final["stopped"] and not ft.isRunning()
    first = list(ft.history)
    assert first and first[0]["epoch"] == 1

    events = []
    ft.start(params, resume=True)
    final = ft.wait(timeout=300, onEvent=events.append)
    assert final["ok"], final
    stages = {e.get("stage") for e in events if e.get("event") == "progress"}
    assert "train" in stages
    epochs = [m["epoch"] for m in ft.history]
    assert epochs[-1] == 3 and 1 not in epochs, "resume continues after the saved epoch"
    assert all("train_loss" in m for m in ft.history)

    folder = Path(final["model"])
    assert folder == catalog.modelsDirectory / "my_hippocampus"
    config = json.loads((folder / "model.json").read_text())
    assert config["class_names"] == ["background", "anterior", "posterior"]
    mine = [e for e in catalog.entries() if e.fineTuned]
    assert [e.name for e in mine] == [str(folder)]


# -- process runner -------------------------------------------------------------------------------------
def test_process_runner_reads_events_progress_bars_and_exit(tmp_path):
    import sys
    from SegBookLib.ProcessRunner import ProcessRunner
    script = tmp_path / "child.py"
    script.write_text(
        "import sys, json, time\n"
        "print('library chatter')\n"
        "print(json.dumps({'event': 'progress', 'stage': 'x', 'done': 1, 'total': 2}), flush=True)\n"
        "for p in (10, 55):\n"
        "    sys.stderr.write(f'\\rmodel.bin: {p:3d}%|####      | 5/10'); sys.stderr.flush()\n"
        "sys.stderr.write('\\nboom: the last words\\n')\n"
        "line = sys.stdin.readline()\n"
        "print(json.dumps({'event': 'done', 'echo': json.loads(line)}), flush=True)\n"
        "sys.exit(3)\n")
    runner = ProcessRunner([sys.executable, str(script)])
    runner.start()
    first = runner.waitFor(lambda e: e["event"] == "progress", timeout=30)
    assert first == {"event": "progress", "stage": "x", "done": 1, "total": 2}
    runner.send({"hello": 1})
    done = runner.waitFor(lambda e: e["event"] == "done", timeout=30)
    assert done["echo"] == {"hello": 1}
    end = runner.waitFor(lambda e: False, timeout=30)
    assert end["event"] == "exit" and end["returncode"] == 3 and "boom: the last words" in end["stderr"]


def test_process_runner_kill_and_terminate(tmp_path):
    import sys
    from SegBookLib.ProcessRunner import ProcessRunner
    runner = ProcessRunner([sys.executable, "-c", "import time; time.sleep(60)"])
    runner.start()
    assert runner.isRunning()
    runner.terminate()
    end = runner.waitFor(lambda e: False, timeout=30)
    assert end["event"] == "exit" and end["returncode"] != 0 and not runner.isRunning()
    runner.start()
    runner.kill()
    assert not runner.isRunning()
    with pytest.raises(RuntimeError):
        runner.send({"x": 1})


def test_bundled_demo_model_segments_a_held_out_case_well(scene, logic):
    """The real thing: the bundled hippocampus-demo model, through the worker, on a case held out of its
    training (hippocampus_001, in its validation split): both structures found with a good overlap."""
    volume = load_volume(scene, IMAGE, "hippocampus 001")
    segmentation = logic.segment(scene, volume, SegmentParameters(model="hippocampus-demo", device="cpu"),
                                 timeout=300)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(LABEL)))
    seg = segmentation.GetSegmentation()
    dice = {}
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        name = seg.GetSegment(sid).GetName()
        mask = NodeIO.segmentMask(segmentation, sid, volume) > 0
        expected = truth == {"anterior": 1, "posterior": 2}[name]
        dice[name] = 2 * (mask & expected).sum() / (mask.sum() + expected.sum())
    assert set(dice) == {"anterior", "posterior"}
    assert min(dice.values()) > 0.7, dice
