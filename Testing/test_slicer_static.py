"""Checks of what cannot run here (no Slicer application, no Qt): the extension's layout and the GUI code.

- every `self.ui.<name>` the Python code uses is a widget of SegBook.ui, and the panel's constructor runs
  against a stub of Qt whose UI object knows only the names in the .ui file;
- the CMake lists every module file and every file of the `segbook` core (so a new core file that is not
  shipped fails here), and nothing that does not exist;
- the extension metadata, the catalog entry and the icon are what the Extensions Index expects;
- nothing is installed at import (setup itself: test_slicer_setup.py).
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

import pytest

from slicer_fixtures import ROOT, SLICER_MODULE

UI_FILE = SLICER_MODULE / "Resources" / "UI" / "SegBook.ui"
MODULE_CMAKE = SLICER_MODULE / "CMakeLists.txt"
CORE = ROOT / "SegBookCore"


def ui_widgets() -> dict:
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def python_sources() -> list:
    return sorted(SLICER_MODULE.glob("*.py")) + sorted((SLICER_MODULE / "SegBookLib").glob("*.py"))


def cmake_list(text: str, variable: str) -> list:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"(.*?)"\)', text, re.S)
    assert match, f"{variable} not set"
    return match.group(1)


def existing_files(folder: Path) -> set:
    """Files of a folder that belong to the project: tracked by git when in a checkout, else on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "--", str(folder)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        files = {ROOT / p for p in out if (ROOT / p).is_file()}
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    return {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and not p.name.endswith(".pyc")}


# -- the .ui file and the code that uses it --------------------------------------------------------------
def test_every_ui_name_used_in_code_exists_in_the_ui_file():
    widgets = ui_widgets()
    used = set()
    for source in python_sources():
        used |= set(re.findall(r"self\.ui\.(\w+)", source.read_text()))
    assert used, "the widget code uses the .ui file"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in code but not in SegBook.ui: {missing}"


def test_ui_file_declares_its_custom_widgets_and_scene_connections():
    tree = ET.parse(UI_FILE)
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used = {w.get("class") for w in tree.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"custom widget classes without a declaration: {custom - declared}"
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in tree.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLPlotWidget")}
    assert mrml <= receivers, f"MRML widgets that never get the scene: {mrml - receivers}"
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "widget names are unique"


# What Python can reach on each widget class of SegBook.ui, generated from real sources by
# Testing/data/slicer/make_widget_members.py (PyQt5 5.15 for Qt classes; the CTK and Slicer headers'
# meta-object members for ctk*/qMRML* widgets, which is all PythonQt exposes of them). What this cannot know:
# argument counts and types (names only); members PyQt5 has but PythonQt's Qt wrappers lack (rare, e.g.
# PyQt-specific helpers); members reached through another variable than `self.ui.<name>.<member>`.
WIDGET_MEMBERS = json.loads((ROOT / "Testing" / "data" / "slicer" / "widget_members.json").read_text())["members"]


def test_every_widget_class_of_the_ui_file_has_its_members_listed():
    classes = set(ui_widgets().values()) - {"QGridLayout", "QHBoxLayout", "QVBoxLayout", "QFormLayout"}
    missing = sorted(classes - set(WIDGET_MEMBERS))
    assert not missing, f"regenerate Testing/data/slicer/widget_members.json (see its script) for {missing}"


def test_every_widget_member_used_exists_on_its_class():
    widgets = ui_widgets()
    unknown = []
    for source in python_sources():
        for name, member in re.findall(r"self\.ui\.(\w+)\.(\w+)", source.read_text()):
            cls = widgets.get(name)
            if member not in WIDGET_MEMBERS.get(cls, ()):
                unknown.append(f"{source.name}: {name}.{member} ({cls})")
    assert not unknown, unknown


class _QWidget:
    def __init__(self, parent=None):
        self.parent = parent


class _UiStub:
    """What slicer.util.childWidgetVariables returns, restricted to the widgets of SegBook.ui."""

    def __init__(self, classes: dict):
        self._classes = classes
        self._names = set(classes)
        self._widgets = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._names:
            raise AttributeError(f"SegBook.ui has no widget '{name}'")
        if name not in self._widgets:
            # only the members of the widget's real class (WIDGET_MEMBERS) exist on the stub
            w = mock.MagicMock(name=name, spec=sorted(WIDGET_MEMBERS[self._classes[name]]))
            defaults = {"currentText": "auto" if "evice" in name or "recision" in name else "quick", "currentData": None,
                        "checked": False, "text": "", "value": 0, "count": 0, "currentPath": ""}
            for member, value in defaults.items():
                if member in WIDGET_MEMBERS[self._classes[name]]:
                    setattr(w, member, value)
            self._widgets[name] = w
        return self._widgets[name]


@pytest.fixture
def gui_stubs(monkeypatch, tmp_path):
    """Qt, ctk and the Slicer application replaced by stubs; the real slicer-core `slicer` otherwise."""
    import slicer
    qt = types.ModuleType("qt")
    qt.QWidget = _QWidget
    for name in ("QVBoxLayout", "QTimer", "QListWidgetItem", "Qt", "QFileDialog", "QMessageBox",
                 # the widgets the interactive section builds in code (SegBookLib/InteractivePanel.py)
                 "QFormLayout", "QHBoxLayout", "QComboBox", "QPushButton", "QLabel", "QShortcut", "QKeySequence"):
        setattr(qt, name, mock.MagicMock(name=name))
    monkeypatch.setitem(sys.modules, "qt", qt)
    ctk = types.ModuleType("ctk")
    ctk.ctkCollapsibleButton = mock.MagicMock(name="ctkCollapsibleButton")
    monkeypatch.setitem(sys.modules, "ctk", ctk)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = mock.MagicMock()

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(SLICER_MODULE / "Resources" / relative)

    class ScriptedLoadableModuleLogic:
        def __init__(self):
            pass

    import unittest
    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = unittest.TestCase
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)

    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    app = mock.MagicMock(name="app")
    app.testingEnabled.return_value = False
    from app_launcher import startup_environment
    app.startupEnvironment.side_effect = startup_environment    # the launcher's saved environment
    monkeypatch.setattr(slicer, "app", app, raising=False)
    loaded = {"errors": []}
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: loaded["errors"].append(text))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **kw: True)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda *a, **kw: True)

    def loadUI(path):
        assert Path(path) == UI_FILE, path
        loaded["ui"] = _UiStub(ui_widgets())
        return mock.MagicMock(name="uiWidget")

    monkeypatch.setattr(slicer.util, "loadUI", loadUI)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: loaded["ui"])
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    for name in [m for m in sys.modules if m == "SegBook" or m.startswith(("SegBookLib.Widget", "SegBookLib.InteractivePanel"))]:
        monkeypatch.delitem(sys.modules, name)
    return loaded


@pytest.mark.slicer
def test_module_imports_and_the_panel_builds_with_qt_stubbed(gui_stubs):
    import SegBook
    parent = types.SimpleNamespace()
    SegBook.SegBook(parent)
    assert parent.title == "SegBook" and parent.categories == ["Segmentation"]
    widget = SegBook.SegBookWidget()
    widget.setup()                      # builds the panel: every ui name it touches must exist
    try:
        ui = gui_stubs["ui"]
        assert widget.widget.ui is ui
        # the model selector was filled from the catalog (released models, sizes, download state)
        labels = [c.args[0] for c in ui.modelComboBox.addItem.call_args_list]
        assert any(label.startswith("stunet-b-totalseg") and "parameters" in label for label in labels)
        devices = [c.args[0] for c in ui.deviceComboBox.addItem.call_args_list]
        assert devices == ["auto", "cuda", "cpu"]
        params = widget.widget.segmentParameters()
        assert params.device == "auto" and params.classes == []
        assert widget.widget.fineTuneParameters().preset == "quick"
        ui.segmentButton.clicked.connect.assert_called_once()
    finally:
        widget.cleanup()


@pytest.mark.slicer
def test_batch_script_and_self_test_are_importable(gui_stubs, monkeypatch):
    import SegBook
    monkeypatch.syspath_prepend(str(SLICER_MODULE / "Resources" / "Scripts"))
    import SegBookBatch
    assert issubclass(SegBook.SegBookTest, __import__("unittest").TestCase)
    args = SegBookBatch.parseArguments(["--input", "a.nii.gz", "--output", "o", "--model", "m", "--tta"])
    assert args.tta and args.device == "auto"
    image = Path(__file__).parent / "data" / "slicer" / "hippocampus_001_image.nii.gz"
    assert SegBookBatch.outputFor(image, Path("out.seg.nrrd"), image) == Path("out.seg.nrrd")
    assert SegBookBatch.outputFor(image, Path("out"), image) == Path("out/hippocampus_001_image.seg.nrrd")
    assert SegBookBatch.outputFor(image.parent, Path("o.seg.nrrd"), image) == \
        Path("o.seg.nrrd/hippocampus_001_image.seg.nrrd")


# -- CMake, catalog, icon -------------------------------------------------------------------------------
def test_module_cmake_lists_every_module_file():
    text = MODULE_CMAKE.read_text()
    listed = {s.replace("${MODULE_NAME}", "SegBook") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    listed |= {s.replace("${MODULE_NAME}", "SegBook") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {str(p.relative_to(SLICER_MODULE)) for p in SLICER_MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    assert sorted(on_disk - listed) == [], "module files missing from SegBookSlicer/CMakeLists.txt"
    assert sorted(listed - on_disk) == [], "CMake lists module files that do not exist"
    assert "slicerMacroBuildScriptedModule" in text
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)
    assert "SegBookTest" in (SLICER_MODULE / "SegBook.py").read_text()


def test_module_cmake_ships_every_core_file():
    text = MODULE_CMAKE.read_text()
    listed = set(cmake_list(text, "SEGBOOK_CORE_PYTHON_SCRIPTS")) | set(cmake_list(text, "SEGBOOK_CORE_PYTHON_RESOURCES"))
    package = CORE / "segbook"
    files = {str(p.relative_to(CORE)) for p in existing_files(package)
             if "__pycache__" not in p.parts and not p.name.endswith(".pyc")}
    missing, stale = sorted(files - listed), sorted(listed - files)
    assert not missing, (f"add to SegBookSlicer/CMakeLists.txt (SEGBOOK_CORE_*): {missing}; "
                         f"`python Testing/test_slicer_static.py --update-cmake` rewrites both lists")
    assert not stale, f"SegBookSlicer/CMakeLists.txt lists core files that do not exist: {stale}"
    assert all(s.endswith(".py") for s in cmake_list(text, "SEGBOOK_CORE_PYTHON_SCRIPTS"))
    assert "worker.py" in " ".join(listed)


def test_top_level_cmake_is_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"project\(SegBook\)", text)
    assert cmake_value(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_value(text, "EXTENSION_DEPENDS").split()      # "NA" or extensions (test_slicer_host.py decides)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_CONTRIBUTORS", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert cmake_value(text, key).strip(), key
    assert cmake_value(text, "EXTENSION_ICONURL").endswith("SegBookSlicer/Resources/Icons/SegBook.png")
    assert "add_subdirectory(SegBookSlicer)" in text
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


def test_icon_is_a_128px_png():
    data = (SLICER_MODULE / "Resources" / "Icons" / "SegBook.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


# -- first-run setup (the rest: test_slicer_setup.py) ------------------------------------------------------
@pytest.mark.slicer
def test_nothing_is_installed_at_import():
    code = ("import sys; sys.path.insert(0, %r); import unittest.mock as m; import slicer; "
            "slicer.util.pip_install = m.Mock(side_effect=AssertionError('pip at import')); "
            "import SegBookLib.InstallLogic, SegBookLib.SegmentationLogic, SegBookLib.FineTuneLogic, "
            "SegBookLib.ModelCatalog, SegBookLib.NodeIO; print('ok')" % str(SLICER_MODULE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slicer
def test_panel_segment_and_add_case_clicks_drive_the_real_logic(gui_stubs, tmp_path):
    """The Segment button through the timer to a segmentation node, and "Add this case", with Qt stubbed."""
    import time

    import slicer
    from slicer_fixtures import IMAGE, LABEL, load_label_segmentation, load_volume, make_tiny_model
    from SegBookLib.Widget import Widget

    model = make_tiny_model(tmp_path / "tiny")
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        scene = slicer.mrmlScene
        volume = load_volume(scene, IMAGE, "MRI")
        ui.inputVolumeSelector.currentNode.return_value = volume
        ui.outputSegmentationSelector.currentNode.return_value = None
        ui.roiSelector.currentNode.return_value = None
        ui.modelComboBox.currentData = str(model)
        ui.deviceComboBox.currentText = "cpu"
        panel.onSegmentOrCancel()
        assert ui.segmentButton.text == "Cancel" and panel.timer.start.called
        deadline = time.monotonic() + 120
        while panel.segmentation.isBusy() or panel.segmentation.job is not None:
            assert time.monotonic() < deadline, "segmentation did not finish"
            time.sleep(0.2)
            panel.onTimer()
        assert gui_stubs["errors"] == []
        assert ui.segmentButton.text == "Segment" and ui.segmentProgressBar.value == 100
        node = ui.outputSegmentationSelector.setCurrentNode.call_args.args[0]
        assert node.GetSegmentation().GetNumberOfSegments() == 2
        assert ui.elapsedLabel.text.endswith(" s")

        ui.trainVolumeSelector.currentNode.return_value = volume
        ui.trainSegmentationSelector.currentNode.return_value = load_label_segmentation(
            scene, LABEL, volume, {1: "anterior", 2: "posterior"})
        ui.baseModelComboBox.currentData = None
        panel.onAddCase()
        assert gui_stubs["errors"] == []
        assert [c["name"] for c in panel.fineTune.cases()] == ["MRI"]
        assert "anterior" in ui.classesLabel.text
    finally:
        panel.cleanup()


def update_core_lists() -> None:
    """Rewrite the SEGBOOK_CORE_* lists of SegBookSlicer/CMakeLists.txt from the core's files."""
    package = CORE / "segbook"
    files = sorted(str(p.relative_to(CORE)) for p in existing_files(package)
                   if "__pycache__" not in p.parts and not p.name.endswith(".pyc"))
    text = MODULE_CMAKE.read_text()
    for variable, items in (("SEGBOOK_CORE_PYTHON_SCRIPTS", [f for f in files if f.endswith(".py")]),
                            ("SEGBOOK_CORE_PYTHON_RESOURCES", [f for f in files if not f.endswith(".py")])):
        body = "".join(f"  {item}\n" for item in items)
        text = re.sub(rf"set\({variable}\n.*?\n  \)", lambda m: f"set({variable}\n{body}  )", text, flags=re.S)
    MODULE_CMAKE.write_text(text)


if __name__ == "__main__" and "--update-cmake" in sys.argv:
    update_core_lists()


@pytest.mark.slicer
def test_slicer_api_names_used_exist_in_slicer():
    """slicer.util functions and MRML/VTK classes the module calls exist in the real `slicer` package."""
    import slicer
    missing = []
    for source in python_sources():
        text = source.read_text()
        for name in set(re.findall(r"slicer\.util\.(\w+)", text)):
            if not hasattr(slicer.util, name):
                missing.append(f"{source.name}: slicer.util.{name}")
        for name in set(re.findall(r"\bslicer\.(vtk\w+)", text)):
            if not hasattr(slicer, name):
                missing.append(f"{source.name}: slicer.{name}")
        for name in set(re.findall(r"AddNewNodeByClass\(\s*\"(\w+)\"", text)):
            if not hasattr(slicer, name):
                missing.append(f"{source.name}: node class {name}")
    assert not missing, missing


@pytest.mark.slicer
def test_panel_fine_tune_start_chart_and_stop(gui_stubs, tmp_path, monkeypatch):
    """Start -> progress and the live chart from metric events -> Stop, through the panel with Qt stubbed."""
    import time

    import slicer
    from slicer_fixtures import IMAGE, IMAGE2, LABEL, LABEL2, load_label_segmentation, load_volume, make_tiny_model
    from SegBookLib.Parameters import FineTuneParameters
    from SegBookLib.Widget import Widget

    base = make_tiny_model(tmp_path / "base", classes=["background", "anterior", "posterior"], stages=6)
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        scene = slicer.mrmlScene
        for image, label, name in ((IMAGE, LABEL, "one"), (IMAGE2, LABEL2, "two")):
            volume = load_volume(scene, image, name)
            ui.trainVolumeSelector.currentNode.return_value = volume
            ui.trainSegmentationSelector.currentNode.return_value = load_label_segmentation(
                scene, label, volume, {1: "anterior", 2: "posterior"})
            panel.onAddCase()
        fast = FineTuneParameters(base=str(base), outputName="mine", device="cpu", epochs=50, iterationsPerEpoch=2,
                                  extraArguments=["--patch-size", "32", "32", "32", "--batch-size", "1",
                                                  "--num-workers", "0", "--threads", "1", "--val-every", "1"])
        monkeypatch.setattr(panel, "fineTuneParameters", lambda: fast)
        panel.onStartFineTune(resume=False)
        assert gui_stubs["errors"] == [] and ui.stopButton.enabled and not ui.startButton.enabled
        deadline = time.monotonic() + 180
        while not panel.chart.rows:
            assert time.monotonic() < deadline and panel.fineTune.final is None, panel.fineTune.final
            time.sleep(0.2)
            panel.onTimer()
        ui.plotWidget.setMRMLPlotViewNode.assert_called_once_with(panel.chart.view)
        assert panel.chart.column("train_loss")[0] > 0
        panel.onStopFineTune()
        while panel.fineTune.final is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
            panel.onTimer()
        assert panel.fineTune.final.get("stopped") and ui.fineTuneStatusLabel.text.startswith("Stopped")
        assert ui.startButton.enabled and ui.resumeButton.enabled
    finally:
        panel.cleanup()
