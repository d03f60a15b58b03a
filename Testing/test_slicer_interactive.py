"""Clicks in the Slicer module: markups on a real MRML scene (slicer-core), the real worker and the shipped
`hippocampus-demo` model on a real MRI; the Segment Editor's undo through the real vtkSlicerSegmentEditorLogic."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

from slicer_fixtures import IMAGE, LABEL, load_volume  # noqa: E402
from test_slicer_static import UI_FILE, gui_stubs  # noqa: E402,F401  (the fixture)
from SegBookLib import NodeIO  # noqa: E402
from SegBookLib.InteractiveLogic import InteractiveLogic, worldRasToLps  # noqa: E402
from SegBookLib.Parameters import SegmentParameters  # noqa: E402
from SegBookLib.SegmentationLogic import SegmentationError, SegmentationLogic  # noqa: E402

CLASSES = ["background", "anterior", "posterior"]
PARAMS = SegmentParameters(model="hippocampus-demo", device="cpu")


@pytest.fixture(scope="module")
def worker():
    """One SegmentationLogic (one worker) for the module, as the panel keeps one for Segment and clicks."""
    lg = SegmentationLogic()
    yield lg
    lg.shutdown()


@pytest.fixture
def scene():
    """A scene as the application sets it up: the Segmentations module's logic on it (RegisterNodes: the
    segment editor node class and the representation converters that AddEmptySegment needs)."""
    s = slicer.vtkMRMLScene()
    module = slicer.vtkSlicerSegmentationsModuleLogic()
    module.SetMRMLScene(s)
    yield s
    s.Clear(1)


@pytest.fixture
def label():
    return sitk.GetArrayFromImage(sitk.ReadImage(str(LABEL)))


def deepest(mask):
    return tuple(int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape))


def world_ras(volume, zyx):
    """The world RAS position of voxel (z, y, x) of the volume (its parent transforms included)."""
    ras = NodeIO.ijkToRasArray(volume) @ np.array([zyx[2], zyx[1], zyx[0], 1.0])
    parent = volume.GetParentTransformNode()
    if parent is not None:
        import vtk
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(m)
        ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ras
    return [float(v) for v in ras[:3]]


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def mask_of(node, segment_id, volume):
    return NodeIO.segmentMask(node, segment_id, volume).astype(bool)


def start(scene, worker, volume=None):
    volume = volume or load_volume(scene, IMAGE)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clicks")
    logic = InteractiveLogic(worker, scene)
    logic.begin(volume, node, None, PARAMS, CLASSES)
    return logic, volume, node


def one(outcomes):
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


def test_a_click_segments_the_structure_a_negative_point_changes_it_and_undo_steps_back(scene, worker, label):
    logic, volume, node = start(scene, worker)
    seg = node.GetSegmentation()
    point = deepest(label == 1)
    assert logic.click([world_ras(volume, point)]) is not None
    first = one(logic.wait())
    assert first["ok"] and first["class"] == "anterior", first
    sid = first["segmentId"]
    assert seg.GetNumberOfSegments() == 1 and seg.GetSegment(sid).GetName() == "anterior"
    after1 = mask_of(node, sid, volume)
    assert dice(after1, label == 1) > 0.7
    assert after1[point]
    pid = worker.workerPid()

    # a negative point inside the structure, far from the positive one: it takes away the voxels around it
    inside = np.argwhere(after1)
    far = tuple(inside[np.argmax(((inside - np.array(point)) ** 2).sum(axis=1))])
    logic.click([world_ras(volume, point)], [world_ras(volume, far)])
    second = one(logic.wait())
    assert second["ok"] and second["segmentId"] == sid and worker.workerPid() == pid     # the same worker
    # the volume was not written again: the worker kept the image and its tile (no network run)
    assert first["tiles"] == 1 and second["tiles"] == 0
    after2 = mask_of(node, sid, volume)
    assert not after2[far] and after2[point] and 0 < after2.sum() < after1.sum()
    assert seg.GetSegment(sid).GetName() == "anterior" and seg.GetNumberOfSegments() == 1

    # the Segment Editor's undo, click by click: back to the first answer, then to no segment at all
    logic.undo.undo()
    assert np.array_equal(mask_of(node, sid, volume), after1)
    logic.undo.undo()
    assert seg.GetNumberOfSegments() == 0
    logic.undo.redo()
    logic.undo.redo()
    assert np.array_equal(mask_of(node, sid, volume), after2)


def test_the_segment_name_is_the_class_asked_for_and_its_voxels_are_the_previous(scene, worker, label, monkeypatch):
    """An existing segment named after a model class asks for that class; its voxels go as "previous"."""
    logic, volume, node = start(scene, worker)
    sid = node.GetSegmentation().AddEmptySegment("", "posterior")
    logic.begin(volume, node, sid, PARAMS, CLASSES)
    sent = []
    original = worker._send
    monkeypatch.setattr(worker, "_send", lambda rid, request, *a, **k: (sent.append(dict(request)),
                                                                        original(rid, request, *a, **k)))
    # the point lies on the anterior part: named "posterior", the click takes the posterior part nearest to it
    logic.click([world_ras(volume, deepest(label == 1))])
    out = one(logic.wait())
    assert out["ok"] and out["class"] == "posterior" and any("nearest" in w for w in out["warnings"])
    assert sent[-1]["classes"] == ["posterior"] and sent[-1]["previous"] is None     # empty: nothing to send
    assert dice(mask_of(node, sid, volume), label == 2) > 0.7
    logic.click([world_ras(volume, deepest(label == 2))])
    assert one(logic.wait())["ok"]
    previous = sent[-1]["previous"]
    assert previous and sent[-1]["statistics"] is False and sent[-1]["roi_lps"] is None
    # a segment not named after a class asks for none
    logic.segmentId = node.GetSegmentation().AddEmptySegment("", "my lesion")
    assert logic.className() is None


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory):
    """`hippocampus-demo` taking prompt channels, their weights at zero: a prompt-taking model (its prompts go
    in as input, its answer is the class against all others) that computes what the base computes."""
    import dataclasses

    from segbook.training.model_init import build_network
    from segbook.zoo import get_config, save_model_folder
    base = get_config("hippocampus-demo")
    net, _, _ = build_network("hippocampus-demo", base.class_names, 1, base.arch.pool_op_kernel_sizes, prompts=True)
    config = dataclasses.replace(base, name="hippocampus-prompted", arch=net.arch, prompts=net.prompts)
    return save_model_folder(tmp_path_factory.mktemp("models") / "prompted", config, net.state_dict())


def test_a_prompt_taking_model_answers_through_the_same_clicks(scene, worker, label, prompted_model):
    logic, volume, node = start(scene, worker)
    logic.begin(volume, node, None, SegmentParameters(model=str(prompted_model), device="cpu"), CLASSES)
    point = deepest(label == 2)
    logic.click([world_ras(volume, point)])
    first = one(logic.wait())
    assert first["ok"] and first["class"] == "posterior", first
    sid = first["segmentId"]
    before = mask_of(node, sid, volume)
    assert before[point] and dice(before, label == 2) > 0.7
    # the second click carries the segment as "previous" (on the input's grid, or the worker refuses it)
    inside = np.argwhere(before)
    far = tuple(inside[np.argmax(((inside - np.array(point)) ** 2).sum(axis=1))])
    logic.click([world_ras(volume, point)], [world_ras(volume, far)])
    second = one(logic.wait())
    assert second["ok"] and second["segmentId"] == sid, second
    assert mask_of(node, sid, volume)[point]
    assert second["tiles"] >= 1         # prompts are its input: each click runs the network


def test_ras_points_reach_the_voxel_they_lie_on_under_a_parent_transform(scene, worker, label):
    import vtk
    volume = load_volume(scene, IMAGE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkTransform()
    m.Translate(20.0, -7.0, 4.0)
    m.RotateZ(30)
    transform.SetMatrixTransformToParent(m.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())
    reference = sitk.ReadImage(str(IMAGE))
    for zyx in [(3, 5, 7), deepest(label == 2), (0, 0, 0)]:
        lps = worldRasToLps([world_ras(volume, zyx)], volume)[0]
        index = reference.TransformPhysicalPointToContinuousIndex(lps)
        assert np.allclose(index[::-1], zyx, atol=1e-6)          # the file's (x, y, z) index is the voxel
    # through the worker: the segmentation is made in the volume's frame and the segment lies in place
    logic, _, node = start(scene, worker, volume)
    assert node.GetParentTransformNode() is transform
    point = deepest(label == 2)
    logic.click([world_ras(volume, point)])
    out = one(logic.wait())
    assert out["ok"] and out["class"] == "posterior"
    got = mask_of(node, out["segmentId"], volume)
    assert got[point] and dice(got, label == 2) > 0.7
    # a segmentation that already holds segments, outside the volume's transform: the answer is moved into
    # its frame (the segment still lies on the voxels clicked)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    other.GetSegmentation().AddEmptySegment("", "kept")
    logic.begin(volume, other, None, PARAMS, CLASSES)
    assert other.GetParentTransformNode() is None
    logic.click([world_ras(volume, point)])
    out = one(logic.wait())
    got = mask_of(other, out["segmentId"], volume)
    assert got[point] and dice(got, label == 2) > 0.7


def test_a_click_on_background_is_one_line_and_changes_nothing(scene, worker, label):
    logic, volume, node = start(scene, worker)
    logic.click([world_ras(volume, deepest(label == 1))])
    sid = one(logic.wait())["segmentId"]
    before = mask_of(node, sid, volume)
    seg = node.GetSegmentation()
    custom = seg.AddEmptySegment("", "my lesion")
    for target in (None, custom):       # a new segment, and a segment that is no class of the model
        logic.segmentId = target
        logic.click([world_ras(volume, (0, 0, 0))])
        out = one(logic.wait())
        assert not out["ok"] and "background" in out["message"] and "\n" not in out["message"]
        assert "Traceback" not in out["message"]
        assert seg.GetNumberOfSegments() == 2 and np.array_equal(mask_of(node, sid, volume), before)
        assert not mask_of(node, custom, volume).any()
    # a negative point alone sends nothing
    with pytest.raises(SegmentationError, match="positive point or a box"):
        logic.click([], [world_ras(volume, (0, 0, 0))])


def test_a_click_while_segment_runs_is_refused_in_one_line(scene, worker, label):
    logic, volume, node = start(scene, worker)
    worker.start(volume, SegmentParameters(model="hippocampus-demo", device="cpu", statistics=False))
    with pytest.raises(SegmentationError, match="segmentation is running"):
        logic.click([world_ras(volume, deepest(label == 1))])
    assert not logic.isBusy()
    worker.wait(timeout=300)
    with pytest.raises(SegmentationError, match="segmentation is running"):    # finished, not yet applied
        logic.click([world_ras(volume, deepest(label == 1))])
    result = worker.applyResult(scene, volume)       # Segment's answer is Segment's
    assert result.GetSegmentation().GetNumberOfSegments() == 2
    assert node.GetSegmentation().GetNumberOfSegments() == 0


def test_clicks_while_one_runs_are_coalesced_to_the_latest(scene, worker, label):
    logic, volume, node = start(scene, worker)
    first = logic.click([world_ras(volume, deepest(label == 1))])
    assert first is not None and logic.isBusy()
    assert logic.click([world_ras(volume, deepest(label == 1))], [world_ras(volume, (0, 0, 0))]) is None
    assert logic.click([world_ras(volume, deepest(label == 2))]) is None      # replaces the one waiting
    out = one(logic.wait())
    assert out["ok"] and out["class"] == "posterior"                 # only the latest prompts were applied
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    assert worker.job is None and not logic.isBusy()


def test_markups_placements_send_requests_and_a_box_alone_selects(scene, worker, label):
    logic, volume, node = start(scene, worker)
    import vtk
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    logic.observe(positive, negative, None)
    negative.AddControlPointWorld(vtk.vtkVector3d(*world_ras(volume, (0, 0, 0))))
    assert not logic.isBusy()
    assert "positive point" in one(logic.poll())["message"]
    negative.RemoveAllControlPoints()
    positive.AddControlPointWorld(vtk.vtkVector3d(*world_ras(volume, deepest(label == 1))))
    assert logic.isBusy()                                   # the placement sent the request
    positive.InvokeEvent(positive.PointEndInteractionEvent)     # the same prompts again: not sent twice
    assert logic.pending is None
    out = one(logic.wait())
    assert out["ok"] and out["class"] == "anterior"
    logic.unobserve()

    # a box around the posterior part, no point: the class most present in it
    logic.finishSegment()
    logic.observe(None, None, roi)
    zyx = np.argwhere(label == 2)
    corners = [world_ras(volume, zyx.min(axis=0)), world_ras(volume, zyx.max(axis=0))]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    roi.SetCenter(*((lo + hi) / 2))
    roi.SetSize(*(hi - lo + 2.0))
    roi.InvokeEvent(roi.PointEndInteractionEvent)           # what the end of a drag of its handles sends
    out = one(logic.wait())
    assert out["ok"] and out["class"] == "posterior", out
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    logic.shutdown()


# -- the panel (Qt stubbed; the scene, markups, worker and model real) ---------------------------------------
class _Combo:
    """The segment QComboBox: items (text, data), the current one."""

    def __init__(self):
        self.items, self.index = [], -1
        self.activated = mock.MagicMock()

    def clear(self):
        self.items, self.index = [], -1

    def addItem(self, text, data):
        self.items.append((text, data))
        self.index = max(self.index, 0)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index):
        self.index = index

    @property
    def currentData(self):
        return self.items[self.index][1] if self.index >= 0 else None


def test_the_panel_places_points_toggles_and_finishes(gui_stubs, label):  # noqa: F811
    import vtk
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    try:
        ui = gui_stubs["ui"]
        ui.modelComboBox.currentData = "hippocampus-demo"
        ui.deviceComboBox.currentText = "cpu"
        assert panel.currentEntry().classNames == CLASSES
        module = slicer.vtkSlicerSegmentationsModuleLogic()     # as the application sets up its scene
        module.SetMRMLScene(slicer.mrmlScene)
        volume = load_volume(slicer.mrmlScene, IMAGE)
        ui.inputVolumeSelector.currentNode.return_value = volume
        ui.outputSegmentationSelector.currentNode.return_value = None
        ui.outputSegmentationSelector.setCurrentNode.side_effect = \
            lambda node: setattr(ui.outputSegmentationSelector.currentNode, "return_value", node)
        clicks = panel.interactive
        clicks.segmentComboBox = _Combo()
        # the section was added to the Segment tab's grid, below what is there
        (section, row, column, rows, columns), _ = ui.segmentTab.layout().addWidget.call_args
        assert section is clicks.section and (column, rows, columns) == (0, 1, 2)

        clicks.onPlace("positive")
        output = ui.outputSegmentationSelector.currentNode()
        assert output is not None and clicks.placing is clicks.positive
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode.assert_called_with(interaction.Place)
        assert all(s.enabled for s in clicks.shortcuts)
        point = deepest(label == 1)
        clicks.positive.AddControlPointWorld(vtk.vtkVector3d(*world_ras(volume, point)))
        assert clicks.logic.isBusy()
        panel.segmentation.wait(timeout=300)
        panel.onTimer()         # Segment's timer (running for a fine-tune, say) leaves the click's answer alone
        assert gui_stubs["errors"] == [] and panel.segmentation.job["kind"] == "click"
        while clicks.logic.isBusy():
            clicks.onTimer()
        seg = output.GetSegmentation()
        assert seg.GetNumberOfSegments() == 1 and "anterior" in clicks.statusLabel.text
        sid = seg.GetNthSegmentID(0)
        assert clicks.segmentComboBox.currentData == sid
        before = mask_of(output, sid, volume)
        assert dice(before, label == 1) > 0.7

        clicks.onToggle()                               # T: negative points now
        assert clicks.placing is clicks.negative
        inside = np.argwhere(before)
        far = tuple(inside[np.argmax(((inside - np.array(point)) ** 2).sum(axis=1))])
        clicks.negative.AddControlPointWorld(vtk.vtkVector3d(*world_ras(volume, far)))
        while clicks.logic.isBusy():
            clicks.onTimer()
        after = mask_of(output, sid, volume)
        assert not after[far] and after.sum() < before.sum()
        clicks.onToggle()
        assert clicks.placing is clicks.positive

        clicks.onFinish()                               # N: prompts cleared, the next click a new segment
        assert clicks.positive.GetNumberOfControlPoints() == 0 == clicks.negative.GetNumberOfControlPoints()
        assert clicks.logic.segmentId is None and clicks.segmentComboBox.currentData == ""
        clicks.positive.AddControlPointWorld(vtk.vtkVector3d(*world_ras(volume, deepest(label == 2))))
        while clicks.logic.isBusy():
            clicks.onTimer()
        assert seg.GetNumberOfSegments() == 2 and "posterior" in clicks.statusLabel.text
        # undo through the panel: the new segment goes, the first one stays as the negative point left it
        clicks.logic.undo.undo()
        assert seg.GetNumberOfSegments() == 1 and np.array_equal(mask_of(output, sid, volume), after)

        # a box: placed once (no persistent place mode), sent when its placement ends
        clicks.onFinish()
        clicks.onPlace("box")
        interaction.SetPlaceModePersistence.assert_called_with(False)
        zyx = np.argwhere(label == 2)
        corners = [world_ras(volume, zyx.min(axis=0)), world_ras(volume, zyx.max(axis=0))]
        lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
        clicks.box.SetCenter(*((lo + hi) / 2))
        clicks.box.SetSize(*(hi - lo + 2.0))
        clicks.onPlacementEnded()           # what the interaction node's EndPlacementEvent calls
        assert clicks.placing is None
        while clicks.logic.isBusy():
            clicks.onTimer()
        assert seg.GetNumberOfSegments() == 2 and "posterior" in clicks.statusLabel.text
    finally:
        panel.cleanup()
    assert panel.segmentation.worker is None or not panel.segmentation.worker.isRunning()
