"""The panel on real MRML nodes with Qt stubbed: input selectors, the new ROI, the fine-tuning chart.

Selectors: what they offer (read from SegBook.ui) and the ROI that "Create new" makes.

A qMRMLNodeComboBox lists a node when qMRMLSortFilterProxyModel::filterAcceptsNode accepts it: the node
IsA() one of `nodeTypes`; with `showChildNodeTypes` false only that exact class; else not IsA() any of
`hideChildNodeTypes`; hidden nodes only with `showHidden`. `offered` re-implements that rule over the
properties the .ui sets, applied to real MRML nodes of the slicer-core wheel. Label maps, vector, diffusion
and streaming volumes are all vtkMRMLScalarVolumeNode subclasses, so `nodeTypes` alone offers them.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from slicer_fixtures import IMAGE, load_volume
from test_slicer_static import UI_FILE, gui_stubs  # noqa: F401  (the fixture)

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

from SegBookLib import NodeIO  # noqa: E402

VOLUME_CLASSES = ["vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode",
                  "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                  "vtkMRMLStreamingVolumeNode"]


def selector_properties(name: str) -> dict:
    """The Qt properties SegBook.ui sets on a widget, with qMRMLNodeComboBox's defaults."""
    widget = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == name)
    props = {"nodeTypes": [], "showChildNodeTypes": True, "hideChildNodeTypes": [], "showHidden": False}
    for prop in widget.findall("property"):
        value = prop[0]
        if value.tag == "stringlist":
            props[prop.get("name")] = [s.text for s in value.findall("string")]
        elif value.tag == "bool":
            props[prop.get("name")] = value.text == "true"
    return props


def offered(props: dict, node) -> bool:
    """qMRMLSortFilterProxyModel::filterAcceptsNode for the properties above (no attribute filters)."""
    if not props["showHidden"] and node.GetHideFromEditors():
        return False
    if not props["nodeTypes"]:
        return True
    for nodeType in props["nodeTypes"]:
        if not node.IsA(nodeType):
            continue
        if not props["showChildNodeTypes"] and nodeType != node.GetClassName():
            continue
        if props["showChildNodeTypes"] and any(node.IsA(t) for t in props["hideChildNodeTypes"]):
            return False
        return True
    return False


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.mark.parametrize("selector", ["inputVolumeSelector", "trainVolumeSelector"])
def test_volume_selectors_offer_scalar_volumes_only(scene, selector):
    props = selector_properties(selector)
    nodes = [scene.AddNewNodeByClass(cls, cls) for cls in VOLUME_CLASSES]
    assert all(n.IsA("vtkMRMLScalarVolumeNode") for n in nodes)     # why nodeTypes alone is not enough
    assert [n.GetClassName() for n in nodes if offered(props, n)] == ["vtkMRMLScalarVolumeNode"]
    # the emulation is not vacuous: without the .ui's restriction every subclass is offered
    assert all(offered(dict(props, showChildNodeTypes=True, hideChildNodeTypes=[]), n) for n in nodes)


def test_a_new_roi_covers_the_input_volume(scene):
    import vtk
    volume = load_volume(scene, IMAGE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 15.0)
    shift.SetElement(2, 3, -4.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")       # what the selector's "Create new" adds
    assert roi.GetSize() == (0.0, 0.0, 0.0)
    NodeIO.initializeRoi(roi, volume)
    bounds, roiBounds = [0.0] * 6, [0.0] * 6
    volume.GetRASBounds(bounds)
    roi.GetRASBounds(roiBounds)
    assert roiBounds == pytest.approx(bounds)
    # every voxel centre of the volume is inside the box the core is asked to predict in (volume frame, LPS)
    box = NodeIO.roiToLpsBox(roi, volume)
    k, j, i = np.nonzero(np.ones(slicer.util.arrayFromVolume(volume).shape, bool))
    ras = (NodeIO.ijkToRasArray(volume) @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3]
    lps = np.diag([-1.0, -1.0, 1.0]) @ ras
    assert (lps.min(axis=1) >= np.array(box[:3]) - 1e-6).all() and (lps.max(axis=1) <= np.array(box[3:]) + 1e-6).all()
    # and no more than the volume: the box is exactly the hull of the voxels' corners (centres +- half a voxel)
    shape = np.array(slicer.util.arrayFromVolume(volume).shape[::-1])            # i, j, k
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    corners_lps = np.diag([-1.0, -1.0, 1.0]) @ (NodeIO.ijkToRasArray(volume) @ np.vstack([corners, np.ones(8)]))[:3]
    assert box == pytest.approx([*corners_lps.min(axis=1), *corners_lps.max(axis=1)], abs=1e-4)
    # a box the user already sized is left alone; without a volume, a 100 mm cube at the origin
    roi.SetSize(5.0, 6.0, 7.0)
    NodeIO.initializeRoi(roi, volume)
    assert roi.GetSize() == (5.0, 6.0, 7.0)
    other = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    NodeIO.initializeRoi(other, None)
    assert other.GetSize() == pytest.approx((100.0, 100.0, 100.0))
    centre = [1.0] * 3
    other.GetCenter(centre)
    assert centre == pytest.approx([0.0, 0.0, 0.0])


def test_the_panel_sizes_the_roi_its_selector_creates(gui_stubs):  # noqa: F811
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    try:
        ui = gui_stubs["ui"]
        volume = load_volume(slicer.mrmlScene, IMAGE)
        ui.inputVolumeSelector.currentNode.return_value = volume
        (slot,), _ = ui.roiSelector.nodeAddedByUser.connect.call_args
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        slot(roi)                                           # the combo box emits nodeAddedByUser(node)
        bounds, roiBounds = [0.0] * 6, [0.0] * 6
        volume.GetRASBounds(bounds)
        roi.GetRASBounds(roiBounds)
        assert roiBounds == pytest.approx(bounds) and min(roi.GetSize()) > 0
    finally:
        panel.cleanup()



def metric(epoch):
    return {"event": "metric", "epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_dice": 0.1 * epoch}


def count(scene, cls):
    return scene.GetNumberOfNodesByClass(cls)


def test_one_chart_for_every_fine_tune_run(scene):
    from SegBookLib.TrainingChart import TrainingChart
    chart = TrainingChart.reuse(None, scene)
    for epoch in range(3):
        chart.add(metric(epoch))
    again = TrainingChart.reuse(chart, scene)
    assert again is chart and chart.rows == [] and chart.chart.GetNumberOfPlotSeriesNodes() == 0
    again.add(metric(0))
    for cls in ("vtkMRMLPlotViewNode", "vtkMRMLPlotChartNode", "vtkMRMLTableNode"):
        assert count(scene, cls) == 1, cls
    assert count(scene, "vtkMRMLPlotSeriesNode") == 2 == again.chart.GetNumberOfPlotSeriesNodes()
    assert again.table.GetTable().GetNumberOfRows() == 1 and again.column("val_dice") == [0.0]
    # the scene was closed: the old nodes are gone, a new chart is made in the new scene
    scene.Clear(0)
    fresh = TrainingChart.reuse(again, scene)
    assert fresh is not again and count(scene, "vtkMRMLPlotViewNode") == 1


def test_the_panel_reuses_its_plot_view_across_runs(gui_stubs, monkeypatch):  # noqa: F811
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    try:
        ui = gui_stubs["ui"]
        scene = slicer.mrmlScene
        monkeypatch.setattr(panel, "ensureInstalled", lambda training=False: True)
        runs = []
        # the worker process is not what is under test here: a start that records the request
        monkeypatch.setattr(panel.fineTune, "start", lambda params, resume=False: runs.append(resume))
        for resume in (False, True):
            panel.onStartFineTune(resume=resume)
            panel.onFineTuneEvents([metric(0), metric(1)])
        assert runs == [False, True] and gui_stubs["errors"] == []
        assert count(scene, "vtkMRMLPlotViewNode") == 1 and count(scene, "vtkMRMLPlotChartNode") == 1
        views = {c.args[0] for c in ui.plotWidget.setMRMLPlotViewNode.call_args_list}
        assert views == {panel.chart.view} and len(panel.chart.rows) == 2
    finally:
        panel.cleanup()


# -- where user models and cases live ---------------------------------------------------------------------
ROAMING = "C:\\Users\\ada\\AppData\\Roaming"
LOCAL = "C:\\Users\\ada\\AppData\\Local"


@pytest.mark.parametrize("platform, env, expected", [
    ("win32", {"LOCALAPPDATA": LOCAL, "APPDATA": ROAMING}, LOCAL),
    ("darwin", {}, "{home}/Library/Application Support"),
    ("linux", {}, "{home}/.local/share"),
    ("linux", {"XDG_DATA_HOME": "/data/ada"}, "/data/ada"),
])
def test_user_models_and_cases_live_in_the_local_data_folder(monkeypatch, tmp_path, platform, env, expected):
    """Not beside Slicer.ini (%APPDATA%, roaming on Windows), whether or not the application is running."""
    from unittest import mock

    from SegBookLib import ModelCatalog
    for name in ("SEGBOOK_HOME", "LOCALAPPDATA", "APPDATA", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ModelCatalog.Path, "home", classmethod(lambda cls: tmp_path))
    monkeypatch.setattr(ModelCatalog.sys, "platform", platform)
    # inside Slicer on Windows, the settings file is in the roaming folder
    app = mock.MagicMock(slicerUserSettingsFilePath=ROAMING + "\\slicer.org\\Slicer.ini")
    monkeypatch.setattr(slicer, "app", app, raising=False)
    folder = str(ModelCatalog.userDirectory())
    base = expected.format(home=tmp_path)
    assert folder.replace("\\", "/") == f"{base}/slicer.org/SegBook".replace("\\", "/")
    assert "Roaming" not in folder
    catalog = ModelCatalog.ModelCatalog()
    assert str(catalog.modelsDirectory).startswith(folder) and str(catalog.trainingDirectory).startswith(folder)
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "mine"))
    assert ModelCatalog.userDirectory() == tmp_path / "mine"


# -- the in-application self-test ------------------------------------------------------------------------
def _self_test_module(monkeypatch):
    """SegBook imported with a ScriptedLoadableModuleTest that records delayDisplay, and packages missing."""
    import sys
    import unittest

    messages = []

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            messages.append(message)

    monkeypatch.setattr(sys.modules["slicer.ScriptedLoadableModule"], "ScriptedLoadableModuleTest",
                        ScriptedLoadableModuleTest)
    from SegBookLib.InstallLogic import InstallLogic
    monkeypatch.setattr(InstallLogic, "isReady", lambda self, training=False: False)
    import SegBook
    return SegBook, messages


def test_reload_and_test_reports_the_self_tests_skip_as_a_skip(gui_stubs, monkeypatch):  # noqa: F811
    SegBook, messages = _self_test_module(monkeypatch)
    # Slicer 5.8's ScriptedLoadableModule.runTest, which Reload and Test calls inside tryWithErrorDisplay
    # (any exception is shown as "Reload and Test failed."): the test case's runTest, called directly
    testCase = getattr(SegBook, "SegBookTest")()
    testCase.messageDelay = 100
    try:
        testCase.runTest()
    except Exception as e:                               # unittest.SkipTest included
        pytest.fail(f"Reload and Test would show a failure: {type(e).__name__}: {e}")
    assert any("skipped" in m and "not installed" in m for m in messages), messages


def test_ctest_still_reports_the_self_test_as_skipped(gui_stubs, monkeypatch):  # noqa: F811
    import io
    import unittest
    SegBook, _ = _self_test_module(monkeypatch)
    # slicer.testing.runUnitTest, what slicer_add_python_unittest(SCRIPT SegBook.py) runs
    suite = unittest.TestLoader().loadTestsFromModule(SegBook)
    result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
    assert result.wasSuccessful() and result.testsRun == 1 and len(result.skipped) == 1
