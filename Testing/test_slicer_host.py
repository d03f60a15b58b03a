"""The Slicer module against what the host really does (issue: the second pass against the real host).

Each test emulates one fact of Slicer's, CTK's or VTK's source (see app_launcher.py, python_script_host.py and
the docstrings below); nothing of SegBook's own behaviour is replaced.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slicer_fixtures import IMAGE, ROOT, SLICER_MODULE, load_volume, make_tiny_model  # noqa: F401

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

HERE = Path(__file__).resolve().parent
CORE = ROOT / "SegBookCore"
BATCH = SLICER_MODULE / "Resources" / "Scripts" / "SegBookBatch.py"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def recording_python(folder: Path, log: Path) -> Path:
    """An interpreter that writes each command line it is started with to `log`, then runs this Python."""
    path = folder / "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\nexec '{sys.executable}' \"$@\"\n")
    path.chmod(0o755)
    return path


# -- 5: the core's top-level import needs no torch; the batch script uses the Engine Python ----------------------
def test_importing_the_core_and_the_modules_slicer_loads_does_not_import_torch():
    """What Slicer's own Python imports when the engine runs elsewhere: never torch (it may have none)."""
    code = ("import sys, segbook, segbook.errors, segbook.io, segbook.imagefile, segbook.dicom, segbook.labels, "
            "segbook.events, segbook.config; "
            "import SegBookLib.SegmentationLogic, SegBookLib.InstallLogic, SegBookLib.ModelCatalog, "
            "SegBookLib.FineTuneLogic, SegBookLib.NodeIO, SegBookLib.Parameters; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SLICER_MODULE), str(CORE)]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # the names of the package are still there, loaded on first use
    out = subprocess.run([sys.executable, "-c", "import segbook, sys; segbook.STUNet; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "True", out.stderr


def test_batch_script_runs_the_worker_in_the_engine_python_without_torch_in_slicer(tmp_path, tiny_model):
    """`Slicer --python-script SegBookBatch.py` where Slicer's Python has no torch and the panel's Engine Python is
    set: it segments, and the worker ran in that interpreter."""
    home = tmp_path / "home"
    log = tmp_path / "engine.log"
    engine = recording_python(tmp_path / "env" / "bin", log)
    from SegBookLib.InstallLogic import setPythonSetting
    setPythonSetting(home, str(engine))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(SEGBOOK_HOME=str(home), OMP_NUM_THREADS="1")
    out = tmp_path / "out.seg.nrrd"
    proc = subprocess.run([sys.executable, str(HERE / "python_script_host.py"), "--without", "torch", str(BATCH),
                           "--input", IMAGE, "--output", out, "--model", tiny_model, "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "-m segbook.worker" in log.read_text()


# -- 1: children of the Engine Python start from Slicer's start-up environment ------------------------------------
@pytest.fixture
def inside_slicer(tmp_path, monkeypatch):
    """This process's environment as Slicer's launcher leaves it (PYTHONHOME and PYTHONPATH of a Slicer whose
    Python is another version than the Engine Python's: its standard library is not this Python's), and the
    application object answering startupEnvironment() from the launcher's saved variables."""
    from unittest import mock

    from app_launcher import slicer_python_environment, startup_environment
    slicer_home = tmp_path / "Slicer" / "lib" / "Python"
    site = slicer_home / "lib" / "python3.9" / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise ImportError(\"Slicer's site-packages\")\n")
    system = dict(os.environ)
    launched = slicer_python_environment(system, slicer_home, site)
    for name in set(system) - set(launched):
        monkeypatch.delenv(name)
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    app = mock.MagicMock(name="app")
    app.startupEnvironment.side_effect = startup_environment
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)      # no PythonSlicer on PATH: this interpreter
    return {"system": system, "home": str(slicer_home), "site": str(site)}


def test_the_launcher_emulation_gives_back_the_environment_slicer_started_with(inside_slicer):
    from app_launcher import saved_environment
    assert os.environ["PYTHONHOME"] == inside_slicer["home"] and os.environ["PYTHONNOUSERSITE"] == "1"
    assert inside_slicer["site"] in os.environ["PYTHONPATH"].split(os.pathsep)
    assert slicer.util.startupEnvironment() == inside_slicer["system"]
    assert saved_environment(inside_slicer["system"]) == inside_slicer["system"], "no launcher: unchanged"
    # and the emulated launcher environment really breaks another interpreter started with it
    out = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


def test_engine_python_children_start_from_the_startup_environment(inside_slicer, tmp_path):
    """Every child of the Engine Python (setting check, version check, pip, worker, fine-tune, download) gets
    neither PYTHONHOME nor PYTHONNOUSERSITE nor Slicer's PYTHONPATH; Slicer's own Python keeps them."""
    from SegBookLib.FineTuneLogic import FineTuneLogic
    from SegBookLib.InstallLogic import InstallLogic, pythonSetting, setPythonSetting
    from SegBookLib.ProcessRunner import callInCore, coreEnvironment
    from SegBookLib.SegmentationLogic import defaultWorker
    engine = sys.executable
    setPythonSetting(tmp_path, engine)                      # runs the interpreter: it must start
    assert pythonSetting(tmp_path) == engine
    assert InstallLogic(python=engine).isReady()            # the versions, asked in the engine
    seen = callInCore(engine, "os:getenv", "PYTHONHOME"), callInCore(engine, "os:getenv", "PYTHONNOUSERSITE")
    assert seen == (None, None)
    path = callInCore(engine, "os:getenv", "PYTHONPATH").split(os.pathsep)
    assert inside_slicer["site"] not in path and str(CORE) in path
    runners = [defaultWorker(engine), FineTuneLogic(tmp_path / "t", tmp_path / "m", python=engine)._runnerFactory([])]
    for runner in runners:
        assert "PYTHONHOME" not in runner.env and inside_slicer["site"] not in runner.env["PYTHONPATH"]
    own = coreEnvironment()
    assert own["PYTHONHOME"] == inside_slicer["home"] and own["PYTHONNOUSERSITE"] == "1"
    assert inside_slicer["site"] in own["PYTHONPATH"].split(os.pathsep)
    assert defaultWorker(None).env["PYTHONHOME"] == inside_slicer["home"]


def test_a_pip_install_in_the_engine_python_runs_there(inside_slicer, tmp_path):
    """pip of the Engine Python, not Slicer's folders: a bare venv's pip fails on its own terms (no pip there),
    not on Slicer's PYTHONHOME."""
    from SegBookLib.InstallLogic import InstallError, InstallLogic
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120,
                   env=inside_slicer["system"])
    logic = InstallLogic(python=str(bare / "bin" / "python"))
    assert "torch" in logic.missing()
    with pytest.raises(InstallError, match="No module named pip"):
        logic.install(lambda question: True)
