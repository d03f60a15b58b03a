"""Setup (SegBookLib.InstallLogic): versions, not presence, read from the core's pyproject.toml; torch alone
through light-the-torch with the application's failures handled; and the engine in another Python.

Only the application's installers are emulated (slicer.util.pip_install and slicer.util._executePythonModule
raise CalledProcessError on failure, as Slicer's logProcessOutput does); version checks run for real."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slicer_fixtures import ROOT  # noqa: F401  (puts the module on sys.path)
from test_slicer_static import gui_stubs  # noqa: F401,E402  (the Qt stubs)
from SegBookLib.InstallLogic import (InstallError, InstallLogic, coreRequirements, installedVersions,  # noqa: E402
                                     parseRequirement, pythonSetting, setPythonSetting)

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer
PYPROJECT = ROOT / "SegBookCore" / "pyproject.toml"


def floors():
    """{name: (requirement, a version just below its floor)} from pyproject.toml."""
    out = {}
    for req in coreRequirements()["core"] + coreRequirements()["train"]:
        name, bounds = parseRequirement(req)
        low = [v for op, v in bounds if op in (">=", ">")]
        if low:
            below = list(low[0])
            i = max(i for i, x in enumerate(below) if x > 0) if any(below) else 0
            below[i] -= 1
            out[name] = (req, ".".join(map(str, below)))
    return out


def ready_versions(training=True):
    """Versions that meet every requirement: what is installed here (the test environment meets them)."""
    names = [parseRequirement(r)[0] for r in coreRequirements()["core"] + coreRequirements()["train"]]
    return dict(installedVersions(names))


class Host:
    """The application's installers, recording calls; `fail` makes one raise as Slicer's does."""

    def __init__(self, monkeypatch, versions, fail=None):
        self.calls, self.versions, self.fail = [], versions, fail
        monkeypatch.setattr(slicer.util, "pip_install", self.pip, raising=False)
        monkeypatch.setattr(slicer.util, "_executePythonModule", self.module, raising=False)
        monkeypatch.setattr(slicer.util, "executePythonModule", self.module, raising=False)

    def pip(self, arguments, **kwargs):
        """slicer.util.pip_install(list): each item one `pip install` argument; `-c FILE` is pip's constraints."""
        arguments = [arguments] if isinstance(arguments, str) else list(arguments)
        self.constraints = None
        if arguments[:1] == ["-c"]:
            self.constraints = Path(arguments[1]).read_text().split()
            arguments = arguments[2:]
        self.calls.append(("pip", arguments))
        if self.fail == "pip":
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"], None, None)
        for req in arguments:
            name, bounds = parseRequirement(req)
            if name in self.versions:
                self.versions[name] = installedVersions([name])[name]

    def module(self, module, args, *rest, **kwargs):
        self.calls.append((module, list(args)))
        if self.fail == "ltt":
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", module, *args], None, None)
        self.versions["torch"] = ready_versions()["torch"]

    def logic(self):
        return InstallLogic(versions=lambda names: {n: self.versions.get(n) for n in names})


def test_floors_come_from_the_cores_pyproject():
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the same parser as the tomli package ([test] extra)
        import tomli as tomllib
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert coreRequirements() == {"core": project["dependencies"], "train": project["optional-dependencies"]["train"],
                                  "dicom": project["optional-dependencies"]["dicom"]}
    assert coreRequirements(PYPROJECT) == coreRequirements()


def test_an_old_torch_from_another_extension_does_not_count_as_ready(monkeypatch):
    req, old = floors()["torch"]
    host = Host(monkeypatch, dict(ready_versions(), torch=old))
    logic = host.logic()
    assert not logic.isReady() and logic.missing() == ["torch"]
    assert f"{req} ({old} installed)" in logic.statusText()
    question = []
    assert logic.install(lambda q: question.append(q) or True)
    assert f"replacing {old}" in question[0] and req in question[0]
    assert logic.isReady()


def test_torch_alone_through_light_the_torch_then_pip(monkeypatch):
    versions = dict(ready_versions(), torch=None, scipy=None, safetensors=None)
    host = Host(monkeypatch, versions)
    logic = host.logic()
    assert logic.missing() == ["torch", "safetensors", "scipy"]
    assert logic.install(lambda q: True)
    torch_req = floors()["torch"][0]
    assert host.calls[0] == ("pip", ["light-the-torch>=0.5"])
    assert host.calls[1] == ("light_the_torch", ["install", torch_req]), "torch alone: no torchvision"
    assert not any("torchvision" in str(c) for c in host.calls)
    assert host.calls[2][0] == "pip" and {parseRequirement(r)[0] for r in host.calls[2][1]} == {"safetensors", "scipy"}
    assert logic.install(lambda q: pytest.fail("asked although ready"))


@pytest.mark.parametrize("fail", ["ltt", "pip"])
def test_a_failed_install_is_a_clear_error(monkeypatch, fail):
    """The installers raise (PyTorchUtils' path does too): that is the error path, one line, what to do."""
    host = Host(monkeypatch, dict(ready_versions(), torch=None, scipy=None), fail=fail)
    with pytest.raises(InstallError, match="failed.*try again") as info:
        host.logic().install(lambda q: True)
    assert "\n" not in str(info.value)


def test_nothing_is_installed_when_declined_and_training_packages_wait_for_fine_tuning(monkeypatch):
    host = Host(monkeypatch, dict(ready_versions(), torch=None))
    assert host.logic().install(lambda q: False) is False and host.calls == []
    train = [parseRequirement(r)[0] for r in coreRequirements()["train"]]
    host = Host(monkeypatch, dict(ready_versions(), **{n: None for n in train}))
    logic = host.logic()
    assert logic.isReady() and not logic.isReady(training=True)
    assert logic.install(lambda q: True, training=True)
    assert [c[0] for c in host.calls] == ["pip"] and sorted(host.calls[0][1]) == sorted(coreRequirements()["train"])


def test_numpy_and_simpleitk_that_slicer_ships_are_never_replaced(monkeypatch):
    req, old = floors()["numpy"]
    host = Host(monkeypatch, dict(ready_versions(), numpy=old))
    with pytest.raises(InstallError, match="ship with Slicer"):
        host.logic().install(lambda q: True)
    assert host.calls == []


# -- the engine in another Python --------------------------------------------------------------------------
def test_another_python_is_checked_there(tmp_path):
    """The venv's python named explicitly: ready (checked in that interpreter); a bare venv: everything missing,
    and its failing pip is a clear error."""
    assert InstallLogic(python=sys.executable).isReady(training=True)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    python = str(bare / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
    logic = InstallLogic(python=python)
    from SegBookLib.InstallLogic import applies
    names = [parseRequirement(r)[0] for r in coreRequirements()["core"] if applies(r)]
    assert sorted(logic.missing()) == sorted(names) and logic.missing()[0] == "torch"
    assert python in logic.statusText()
    with pytest.raises(InstallError, match="failed"):
        logic.install(lambda q: True)


def test_the_python_setting_is_kept_and_checked(tmp_path):
    assert pythonSetting(tmp_path) is None
    setPythonSetting(tmp_path, sys.executable)
    assert pythonSetting(tmp_path) == sys.executable
    with pytest.raises(InstallError, match="cannot be run"):
        setPythonSetting(tmp_path, str(tmp_path / "no-such-python"))
    assert pythonSetting(tmp_path) == sys.executable
    setPythonSetting(tmp_path, None)
    assert pythonSetting(tmp_path) is None


def test_the_panel_runs_the_engine_in_the_chosen_python_with_no_torch_in_slicer(gui_stubs, tmp_path, monkeypatch):
    """Setting -> setup status, model list, Segment and Cancel through a launcher-started interpreter, while
    this (Slicer's) process cannot import torch."""
    import os
    import time

    from app_launcher import alive, descendants, make_launcher
    from slicer_fixtures import IMAGE, load_volume, make_tiny_model
    from test_slicer_static import UI_FILE

    launcher = str(make_launcher(tmp_path / "env" / "bin", name="python"))
    model = make_tiny_model(tmp_path / "tiny")
    setPythonSetting(os.environ["SEGBOOK_HOME"], launcher)
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in ("segbook.zoo", "segbook.dataset", "segbook.inference"):
        monkeypatch.setitem(sys.modules, name, None)
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        assert panel.python == launcher and panel.segmentation.python == launcher
        assert ui.installStatusLabel.text == f"Ready in {launcher}."
        labels = [c.args[0] for c in ui.modelComboBox.addItem.call_args_list]
        assert any(label.startswith("hippocampus-demo") for label in labels), labels
        volume = load_volume(slicer.mrmlScene, IMAGE, "MRI")
        ui.inputVolumeSelector.currentNode.return_value = volume
        ui.outputSegmentationSelector.currentNode.return_value = None
        ui.roiSelector.currentNode.return_value = None
        ui.modelComboBox.currentData = str(model)
        ui.deviceComboBox.currentText = "cpu"
        ui.ttaCheckBox.checked = True
        panel.onSegmentOrCancel()
        deadline = time.monotonic() + 180
        while panel.segmentation.lastEvent is None or panel.segmentation.lastEvent.get("stage") != "predict":
            assert time.monotonic() < deadline and panel.segmentation.isBusy(), panel.segmentation.job
            time.sleep(0.1)
            panel.onTimer()
        pids = [panel.segmentation.worker.process.pid] + descendants(panel.segmentation.worker.process.pid)
        assert len(pids) == 2
        panel.onSegmentOrCancel()            # Cancel
        assert ui.segmentButton.text == "Segment" and gui_stubs["errors"] == []
        time.sleep(0.5)
        assert not any(alive(p) for p in pids)
    finally:
        panel.cleanup()


def test_a_requirement_for_another_platform_does_not_apply_here(monkeypatch):
    """pyproject.toml caps numpy below 2 on Intel Macs only (torch 2.2 there); on Linux numpy 2 is ready."""
    import platform
    from SegBookLib.InstallLogic import applies
    mac_only = "numpy<2; platform_system == 'Darwin' and platform_machine == 'x86_64'"
    assert mac_only in coreRequirements()["core"]
    here = platform.system() == "Darwin" and platform.machine() == "x86_64"
    assert applies(mac_only) is here
    versions = dict(ready_versions(), numpy="2.1.0")
    logic = InstallLogic(versions=lambda names: {n: versions.get(n) for n in names})
    assert ("numpy" in [parseRequirement(r)[0] for r, _ in logic.problems()]) is here


@pytest.mark.parametrize("text", ['{"python": "/usr/bin/pyth', "", "[1, 2]", '{"python": 3}', "\x00\x01"])
def test_a_damaged_settings_file_is_named_in_one_line_and_slicers_python_is_used(tmp_path, caplog, text):
    (tmp_path / "settings.json").write_text(text)
    with caplog.at_level("WARNING"):
        assert pythonSetting(tmp_path) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(tmp_path / "settings.json") in lines[0] and "\n" not in lines[0]


def test_a_settings_file_that_cannot_be_written_keeps_the_previous_one(tmp_path):
    setPythonSetting(tmp_path, sys.executable)
    (tmp_path / ".settings.json.tmp").mkdir()       # the temporary name is taken: the write fails
    with pytest.raises(InstallError, match="settings.json: cannot write"):
        setPythonSetting(tmp_path, None)
    assert pythonSetting(tmp_path) == sys.executable
