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
from test_slicer_static import gui_stubs  # noqa: F401  (the fixture: Qt and the application stubbed)

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


# -- 3: DICOM SEG export on Slicer 5.8's vtkSegment ---------------------------------------------------------------
class Slicer58Segment:
    """A real vtkSegment as Slicer 5.8 wraps it (Libs/vtkSegmentationCore/vtkSegment.h at v5.8.1): no
    Get/Set/HasTerminology (added in 5.10); GetTag(std::string, std::string&) takes a vtk.reference for its value,
    as the real wrapping here does."""
    _NEW_IN_5_10 = ("GetTerminology", "SetTerminology", "HasTerminology")

    def __init__(self, segment):
        self._segment = segment

    def __getattr__(self, name):
        if name in self._NEW_IN_5_10:
            raise AttributeError(f"'vtkSegment' object has no attribute '{name}'")
        return getattr(self._segment, name)


class Slicer58Segmentation:
    """A vtkSegmentation whose segments are Slicer 5.8's."""

    def __init__(self, segmentation):
        self._segmentation = segmentation

    def GetNthSegment(self, index):
        return Slicer58Segment(self._segmentation.GetNthSegment(index))

    def GetSegment(self, segmentId):
        return Slicer58Segment(self._segmentation.GetSegment(segmentId))

    def __getattr__(self, name):
        return getattr(self._segmentation, name)


def test_the_terminology_of_a_segment_reads_and_writes_on_slicer_5_8():
    from SegBookLib import NodeIO
    entry = NodeIO.terminologyString({"category": ("SCT", "123037004", "Anatomical Structure"),
                                      "type": ("SCT", "10200004", "Liver")})
    real = slicer.vtkSegment()
    old = Slicer58Segment(real)
    assert not hasattr(old, "GetTerminology")
    with pytest.raises(TypeError, match="reference"):       # what a str for the value does there
        old.GetTag(old.GetTerminologyEntryTagName(), "")
    NodeIO.setSegmentTerminology(old, entry)
    assert real.GetTerminology() == entry, "the tag 5.10's GetTerminology reads"
    assert NodeIO.segmentTerminology(old) == entry
    fresh = slicer.vtkSegment()
    assert NodeIO.segmentTerminology(Slicer58Segment(fresh)) == fresh.GetTerminology()


BOXES = [(slice(2, 20), slice(5, 30), slice(4, 20)), (slice(10, 25), slice(20, 40), slice(10, 30)),
         (slice(0, 5), slice(0, 5), slice(0, 5))]


def segmentation_of_boxes(scene, volume, boxes):
    """A segmentation node on the volume's grid, segment n (named sn) filling boxes[n]; they may overlap."""
    import numpy as np

    from SegBookLib import NodeIO
    shape = slicer.util.arrayFromVolume(volume).shape
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for index, box in enumerate(boxes):
        mask = np.zeros(shape, np.uint8)
        mask[box] = 1
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        NodeIO.setIjkToRas(labelmap, NodeIO.ijkToRasArray(volume))
        slicer.util.updateVolumeFromArray(labelmap, mask)
        assert slicer.vtkSlicerSegmentationsModuleLogic().ImportLabelmapToSegmentationNode(labelmap, node)
        node.GetSegmentation().GetNthSegment(index).SetName(f"s{index}")
        scene.RemoveNode(labelmap)
    return node


def test_the_dicom_seg_class_table_is_built_on_slicer_5_8(tmp_path):
    from SegBookLib import NodeIO
    scene = slicer.vtkMRMLScene()
    volume = load_volume(scene, IMAGE)
    node = segmentation_of_boxes(scene, volume, BOXES[:2])
    liver = {"category": ("SCT", "123037004", "Anatomical Structure"), "type": ("SCT", "10200004", "Liver")}
    segmentation = node.GetSegmentation()
    segmentation.GetNthSegment(0).SetName("liver")
    segmentation.GetNthSegment(1).SetName("drawn")
    NodeIO.setSegmentTerminology(Slicer58Segment(segmentation.GetNthSegment(0)), NodeIO.terminologyString(liver))
    table = NodeIO.segmentTable(Slicer58Segmentation(segmentation))
    assert [(c["value"], c["name"]) for c in table] == [(1, "liver"), (2, "drawn")]
    assert table[0]["terminology"] == liver
    assert table[1]["terminology"] == NodeIO.parseTerminology(segmentation.GetNthSegment(1).GetTerminology())


# -- 12: one export for all segments -------------------------------------------------------------------------------
def test_all_segments_are_exported_to_a_label_map_in_one_call(monkeypatch):
    """segmentsToLabels exports once (each export resamples the full grid on the GUI thread), with the same
    labels as painting each segment's own mask in order (the later segment wins where they overlap)."""
    import numpy as np

    from SegBookLib import NodeIO
    scene = slicer.vtkMRMLScene()
    volume = load_volume(scene, IMAGE)
    shape = slicer.util.arrayFromVolume(volume).shape
    boxes = BOXES
    node = segmentation_of_boxes(scene, volume, boxes)
    expected = np.zeros(shape, np.uint8)
    for index, box in enumerate(boxes):
        expected[box] = index + 1

    real = slicer.vtkSlicerSegmentationsModuleLogic
    calls = []

    class Counting:
        def ExportSegmentsToLabelmapNode(self, *args):
            calls.append(args[1].GetNumberOfValues())
            return real().ExportSegmentsToLabelmapNode(*args)

        def __getattr__(self, name):
            return getattr(real(), name)
    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Counting)
    labels, table = NodeIO.segmentsToLabels(node, volume)
    assert calls == [3]
    assert np.array_equal(labels, expected) and [c["name"] for c in table] == ["s0", "s1", "s2"]
    calls.clear()
    values = NodeIO.segmentationToLabels(node, volume, {"s2": 7, "s0": 4})
    assert calls == [2]
    want = np.zeros(shape, np.uint8)
    want[boxes[0]] = 4
    want[boxes[2]] = 7
    assert np.array_equal(values, want)


# -- 9: Close Scene, then another patient's volume, while the job runs ---------------------------------------------
def run_timer(panel, until, timeout=180):
    import time
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the panel's timer never got there"
        time.sleep(0.1)
        panel.onTimer()


def test_a_result_never_lands_on_the_volume_loaded_after_close_scene(gui_stubs, tiny_model):  # noqa: F811
    """vtkMRMLScene::Clear resets the ID counter: the next volume gets the closed one's ID. The panel's result
    is refused with one line, and the new volume gets no segmentation."""
    from test_slicer_static import UI_FILE
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    scene = slicer.mrmlScene
    try:
        first = load_volume(scene, IMAGE, "patient A")
        output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "A segmentation")
        ui.inputVolumeSelector.currentNode.return_value = first
        ui.outputSegmentationSelector.currentNode.return_value = output
        ui.roiSelector.currentNode.return_value = None
        ui.modelComboBox.currentData = str(tiny_model)
        ui.deviceComboBox.currentText = "cpu"
        panel.onSegmentOrCancel()
        assert panel.segmentation.isBusy()
        oldVolumeID, oldOutputID = first.GetID(), output.GetID()
        scene.Clear(0)                                          # File > Close Scene
        second = load_volume(scene, IMAGE, "patient B")
        other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "B segmentation")
        assert (second.GetID(), other.GetID()) == (oldVolumeID, oldOutputID), "the emulation: IDs are reused"
        ui.inputVolumeSelector.currentNode.return_value = second
        ui.outputSegmentationSelector.currentNode.return_value = other
        run_timer(panel, lambda: panel.segmentation.job is None)
        assert len(gui_stubs["errors"]) == 1 and "removed from the scene" in gui_stubs["errors"][0]
        assert other.GetSegmentation().GetNumberOfSegments() == 0
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
        # the worker serves the next Segment, on the new volume
        panel.onSegmentOrCancel()
        run_timer(panel, lambda: panel.segmentation.job is None)
        assert other.GetSegmentation().GetNumberOfSegments() == 2
        assert other.GetNodeReference("referenceImageGeometryRef") is second
    finally:
        panel.cleanup()


# -- 7: Segment while a model downloads ---------------------------------------------------------------------------
@pytest.fixture
def silent_hub(monkeypatch):
    """A Hugging Face endpoint that accepts connections and never answers: a download that goes on."""
    import socket
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(4)
    hub.settimeout(120)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "600")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "600")
    yield hub
    hub.close()


def test_segment_during_a_download_does_not_cancel_it(gui_stubs, silent_hub):  # noqa: F811
    from test_slicer_static import UI_FILE
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        ui.inputVolumeSelector.currentNode.return_value = load_volume(slicer.mrmlScene, IMAGE)
        ui.outputSegmentationSelector.currentNode.return_value = None
        ui.roiSelector.currentNode.return_value = None
        ui.modelComboBox.currentData = "stunet-s-totalseg"
        panel.onDownload()
        connection, _ = silent_hub.accept()         # the download is under way
        assert panel.download.isRunning()
        assert not ui.segmentButton.enabled and not ui.modelComboBox.enabled, "what cannot run meanwhile"
        panel.onSegmentOrCancel()                   # a click that reaches the handler all the same
        assert panel.download is not None and panel.download.isRunning(), "the download was cancelled"
        assert ui.downloadButton.text == "Cancel download" and gui_stubs["errors"] == []
        panel.onDownload()                          # the user's Cancel still cancels
        assert panel.download is None and ui.segmentButton.enabled and ui.modelComboBox.enabled
        # Segment of a model not downloaded yet asks, downloads, and keeps the download going
        panel.onSegmentOrCancel()
        assert panel.segmentAfterDownload and panel.download.isRunning()
        panel.onSegmentOrCancel()
        assert panel.segmentAfterDownload and panel.download.isRunning()
        connection.close()
    finally:
        panel.cleanup()


# -- 6: download progress through the core's events ----------------------------------------------------------------
HUB_FILE_SIZE = 40_000_000     # huggingface_hub writes in chunks of 10 MB


@pytest.fixture
def slow_hub(monkeypatch):
    """A local Hugging Face endpoint serving any file as HUB_FILE_SIZE bytes in 40 paced chunks (about 4 s), with
    the headers hf_hub_download needs (commit, ETag, size). The bytes are no checkpoint: after downloading,
    the conversion fails, which is not what is under test here."""
    import http.server
    import threading
    import time

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self):
            self.send_response(200)
            self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
            self.send_header("ETag", '"segbook-test-etag"')
            self.send_header("Content-Length", str(HUB_FILE_SIZE))
            self.end_headers()

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            self._headers()
            chunk = HUB_FILE_SIZE // 40
            try:
                for _ in range(40):
                    self.wfile.write(b"\0" * chunk)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.shutdown()


def test_download_progress_arrives_as_events_on_a_pipe(slow_hub):
    """`segbook download --progress json` with stderr a pipe (where huggingface_hub's tqdm is off): the bytes
    come as progress events, rising to the size the hub announced."""
    proc = subprocess.run([sys.executable, "-m", "segbook", "download", "stunet-s-totalseg", "--progress", "json"],
                          capture_output=True, text=True, timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    download = [e for e in events if e.get("stage") == "download"]
    assert download, (proc.stdout, proc.stderr)
    assert {e["total"] for e in download} == {HUB_FILE_SIZE}
    done = [e["done"] for e in download]
    assert any(0 < d < HUB_FILE_SIZE for d in done), done
    assert done.count(HUB_FILE_SIZE) >= 1 and max(done) == HUB_FILE_SIZE
    # the conversion of what is no checkpoint fails after downloading again: one line, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("segbook download: error: ")


def test_the_panel_shows_the_download_progress(gui_stubs, slow_hub):  # noqa: F811
    from test_slicer_static import UI_FILE
    from SegBookLib.Widget import Widget
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        ui.modelComboBox.currentData = "stunet-s-totalseg"
        for combo in (ui.modelComboBox, ui.baseModelComboBox):     # QComboBox::findData, for the refresh after
            combo.findData.return_value = 0
        panel.onDownload()
        run_timer(panel, lambda: " of 40.0 MB" in str(ui.segmentStatusLabel.text), timeout=120)
        assert 0 <= ui.segmentProgressBar.value <= 100
        ui.segmentProgressBar.setRange.assert_called_with(0, 100)
        run_timer(panel, lambda: panel.download is None, timeout=300)
        assert ui.segmentStatusLabel.text.startswith("Download failed: segbook download: error:")
    finally:
        panel.cleanup()


# -- 13: the worker, fine-tuning and downloads end with the program that started them -----------------------------
_PARENT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from SegBookLib.ProcessRunner import ProcessRunner, coreEnvironment
args, request = json.loads(sys.argv[2]), json.loads(sys.argv[3])
runner = ProcessRunner(args, env=coreEnvironment())
runner.start()
if request:
    runner.send(request)
if len(sys.argv) > 4:
    runner.waitFor(lambda e: e.get("event") == sys.argv[4], timeout=600)
print(runner.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("what", ["worker", "finetune", "download"])
def test_children_end_when_the_program_that_started_them_is_killed(tmp_path, silent_hub, what):
    """A real parent (Slicer's part: ProcessRunner through the PythonSlicer emulation) starts the child, which
    waits on a hub that never answers (a phase that writes nothing, so a closed pipe goes unnoticed); the parent
    is killed: the launcher and the real interpreter are gone within seconds."""
    import signal
    import time

    from app_launcher import alive, descendants, make_launcher
    launcher = str(make_launcher(tmp_path / "bin"))
    request = None
    if what == "worker":
        args = [launcher, "-m", "segbook.worker"]
        request = {"id": "r1", "command": "predict", "input": str(IMAGE), "output": str(tmp_path / "o.nrrd"),
                   "model": "stunet-s-totalseg", "device": "cpu"}
    elif what == "finetune":
        from slicer_fixtures import IMAGE2, LABEL, LABEL2
        dataset = tmp_path / "dataset.json"
        cases = [{"name": n, "image": str(i), "label": str(lb)} for n, i, lb in (("one", IMAGE, LABEL),
                                                                                  ("two", IMAGE2, LABEL2))]
        dataset.write_text(json.dumps({"name": "d", "class_names": ["background", "anterior", "posterior"],
                                       "channel_names": ["image"], "cases": cases}))
        args = [launcher, "-m", "segbook", "finetune", str(dataset), "-o", str(tmp_path / "m"), "--base",
                "stunet-s-totalseg", "--progress", "json"]
    else:
        args = [launcher, "-m", "segbook", "download", "stunet-s-totalseg", "--progress", "json"]
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(SLICER_MODULE), json.dumps(args),
                               json.dumps(request)], stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(parent.stdout.readline())
        connection, _ = silent_hub.accept()      # the child is waiting on the hub, writing nothing
        pids = [launcher_pid] + descendants(launcher_pid)
        assert len(pids) == 2 and all(alive(p) for p in pids)
        parent.kill()
        parent.wait()                            # reaped, as Slicer's own parent does
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, f"still running after the parent died: {[p for p in pids if alive(p)]}"
            time.sleep(0.1)
        connection.close()
    finally:
        parent.kill()
        for pid in descendants(parent.pid) if alive(parent.pid) else []:
            os.kill(pid, signal.SIGKILL)


# -- 4, 10, 8: what Slicer ships is kept; the DICOM SEG writer installed after asking --------------------------------
SLICER_5_8 = {"pydicom": "2.4.4", "highdicom": None}      # SuperBuild python-dicom-requirements at v5.8.1


def test_dicom_seg_export_asks_then_installs_highdicom_keeping_slicers_pydicom(monkeypatch, gui_stubs):  # noqa: F811
    from test_slicer_setup import Host, ready_versions
    versions = dict(ready_versions(), **SLICER_5_8)
    host = Host(monkeypatch, versions)
    logic = host.logic()
    assert logic.isReady() and not logic.isReady(dicom=True) and logic.missing(dicom=True) == ["highdicom"]
    # the panel's Export DICOM SEG asks first; declined: nothing installed, nothing exported
    from test_slicer_static import UI_FILE
    from SegBookLib.Widget import Widget
    questions = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: questions.append(text) or False)
    panel = Widget(str(UI_FILE), installLogic=logic)
    try:
        ui = gui_stubs["ui"]
        ui.outputSegmentationSelector.currentNode.return_value = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode")
        sys.modules["qt"].QFileDialog.getSaveFileName.return_value = "/tmp/x.dcm"
        panel.onExportDicomSeg()
        assert panel.segmentation.job is None and host.calls == []
    finally:
        panel.cleanup()
    assert len(questions) == 1 and "highdicom>=0.22.0" in questions[0] and "DICOM SEG" in questions[0]
    assert "pydicom 2.4.4" in questions[0], "the question says what is kept"
    # accepted: highdicom alone, with Slicer's pydicom, numpy, SimpleITK pinned for pip's resolver
    assert logic.install(lambda q: True, dicom=True)
    assert host.calls == [("pip", ["highdicom>=0.22.0"])]
    assert {"pydicom==2.4.4", f"numpy=={versions['numpy']}", f"SimpleITK=={versions['SimpleITK']}"} <= \
        set(host.constraints)
    assert logic.isReady(dicom=True)


def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A pure-Python wheel with nothing but its metadata (pip installs it like any other)."""
    import base64
    import hashlib
    import zipfile
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
                 name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = ""
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(text.encode())}\n"
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return path


def test_pip_cannot_replace_a_shipped_package_through_a_dependency(tmp_path, monkeypatch):
    """Real pip, in a venv holding numpy 99.0 (a stand-in wheel): a requirement whose dependency wants numpy<99
    would downgrade it (the post-install check passes: numpy is no requirement of its own). With the constraints
    the install fails, saying so, and numpy is still 99.0."""
    from SegBookLib.InstallLogic import InstallError, InstallLogic
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("98.0", "99.0"):
        _wheel(wheels, "numpy", version)
    _wheel(wheels, "needsold", "1.0", ["numpy<99"])
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = str(env / "bin" / "python")
    for name, value in (("PIP_NO_INDEX", "1"), ("PIP_FIND_LINKS", str(wheels)),
                        ("PIP_DISABLE_PIP_VERSION_CHECK", "1")):
        monkeypatch.setenv(name, value)
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy==99.0"], check=True, timeout=300)
    logic = InstallLogic(python=python, requirements={"core": ["needsold"], "train": [], "dicom": []})
    assert logic.missing() == ["needsold"]
    with pytest.raises(InstallError, match="needsold failed") as info:
        logic.install(lambda question: True)
    assert "\n" not in str(info.value)
    version = subprocess.run([python, "-c", "from importlib import metadata; print(metadata.version('numpy'))"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == "99.0"


def test_the_intel_mac_numpy_message_says_what_works():
    """Slicer >= 5.10 ships numpy 2 where the core caps numpy below 2 (torch 2.2, the last for Intel Macs): the
    message names Slicer 5.8 and an Engine Python, not "5.8 or later"."""
    from SegBookLib.InstallLogic import InstallError, InstallLogic, installedVersions
    have = dict(installedVersions(["torch", "SimpleITK"]), numpy="2.0.2")   # Slicer 5.10's numpy
    logic = InstallLogic(versions=lambda names: {n: have.get(n) for n in names},
                         requirements={"core": ["torch>=2.2", "numpy>=1.26", "numpy<2"], "train": [], "dicom": []})
    with pytest.raises(InstallError) as info:
        logic.install(lambda question: pytest.fail("asked although it cannot work"))
    message = str(info.value)
    assert "numpy 2.0.2 is too new" in message and "use Slicer 5.8" in message and "Engine Python" in message
    assert "or later" not in message


# -- 2: the Engine Python box ---------------------------------------------------------------------------------------
class PathLineEditEmulation:
    """ctkPathLineEdit as CTK implements it (Libs/Widgets/ctkPathLineEdit.cpp: its line edit's textChanged runs
    updateHasValidInput, which emits currentPathChanged whenever the text has acceptable input for the validator,
    a non-empty name by default): one currentPathChanged per keystroke of a non-empty text, none for an empty
    one; the line edit's editingFinished on Enter or leaving the box. Drives the slots the panel connected to
    the stub's signals."""

    def __init__(self, widget):
        self.widget = widget

    def _slots(self, signal):
        return [c.args[0] for c in signal.connect.call_args_list]

    def type(self, text: str) -> None:
        for end in range(1, len(text) + 1):
            self.widget.currentPath = text[:end]
            for slot in self._slots(self.widget.currentPathChanged):
                slot(text[:end])

    def clear(self) -> None:
        self.widget.currentPath = ""            # "" does not match `.+`: no currentPathChanged

    def finish(self) -> None:
        for slot in self._slots(self.widget.comboBox().lineEdit().editingFinished):
            slot()


def test_the_engine_python_box_applies_once_when_editing_is_finished(gui_stubs, tmp_path):  # noqa: F811
    from test_slicer_static import UI_FILE
    from SegBookLib.InstallLogic import pythonSetting
    from SegBookLib.Widget import Widget
    log = tmp_path / "python.log"
    engine = recording_python(tmp_path / "env" / "bin", log)
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    box = PathLineEditEmulation(ui.pythonPathLineEdit)
    home = os.environ["SEGBOOK_HOME"]
    try:
        box.type(str(engine))
        assert gui_stubs["errors"] == [] and pythonSetting(home) is None, "nothing happens while typing"
        assert not log.exists()
        box.finish()
        assert pythonSetting(home) == str(engine) and panel.python == str(engine)
        assert panel.segmentation.python == panel.fineTune.python == panel.catalog.python == str(engine)
        checks = [line for line in log.read_text().splitlines() if "sys.version_info" in line]
        assert len(checks) == 1, "validated once"
        # emptied: back to Slicer's own Python, although the box emits nothing for an empty text
        box.clear()
        (ui.pythonApplyButton.clicked.connect.call_args.args[0])()
        assert pythonSetting(home) is None and panel.python is None and panel.segmentation.python is None
        # a path that cannot run: one message when applied, the setting unchanged
        box.type(str(tmp_path / "no-such-python"))
        assert gui_stubs["errors"] == []
        with pytest.raises(Exception, match="cannot be run"):
            box.finish()
        assert len(gui_stubs["errors"]) == 1 and pythonSetting(home) is None
    finally:
        panel.cleanup()


# -- 12: no blocking child process at every refresh and click with an Engine Python ---------------------------------
def test_the_engine_python_is_not_asked_again_at_every_refresh_and_click(gui_stubs, tmp_path):  # noqa: F811
    from test_slicer_static import UI_FILE
    from SegBookLib.InstallLogic import setPythonSetting
    from SegBookLib.Widget import Widget
    log = tmp_path / "python.log"
    engine = recording_python(tmp_path / "env" / "bin", log)
    setPythonSetting(os.environ["SEGBOOK_HOME"], str(engine))
    panel = Widget(str(UI_FILE))
    try:
        def children(what):
            return sum(what in line for line in log.read_text().splitlines())
        assert children("_entryDicts") == 1 and children("installedVersions") == 1
        for _ in range(3):                      # Segment, Download, Export clicks; the Setup status; refreshes
            assert panel.ensureInstalled()
            panel.refreshInstallStatus()
            panel.refreshModels()
        assert children("_entryDicts") == 1 and children("installedVersions") == 1
        # what changes the list is seen: a model folder of one's own appears; a download finished
        from slicer_fixtures import make_tiny_model
        make_tiny_model(panel.catalog.modelsDirectory / "mine", name="mine")
        panel.refreshModels()
        assert children("_entryDicts") == 2 and any(e.name.endswith("mine") for e in panel.entries)
        panel.catalog.invalidate()
        panel.refreshModels()
        assert children("_entryDicts") == 3
        # what is missing is asked again at the next click (it may have been installed meanwhile)
        from SegBookLib.InstallLogic import InstallLogic
        lacking = InstallLogic(python=str(engine), requirements={"core": ["segbook-absent-package"], "train": [],
                                                                 "dicom": []})
        before = children("installedVersions")
        assert not any([lacking.isReady(), lacking.isReady(), lacking.isReady()])
        assert children("installedVersions") == before + 3
    finally:
        panel.cleanup()


# -- smaller: Reload, the extension's dependencies, console windows ---------------------------------------------------
def test_reload_reloads_every_library_module_after_what_it_imports():
    """SegBookWidget.onReload reloads LIB_MODULES in order (Slicer's default reload re-reads SegBook.py only): a
    module missing there stays stale after Reload; one reloaded before a module it imports binds the old one."""
    import ast
    import re
    tree = ast.parse((SLICER_MODULE / "SegBook.py").read_text())
    order = next(ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "LIB_MODULES")
    library = SLICER_MODULE / "SegBookLib"
    modules = {p.stem for p in library.glob("*.py") if p.stem != "__init__"}
    assert sorted(order) == sorted(modules)
    for name in modules:
        text = (library / f"{name}.py").read_text()
        imported = set(re.findall(r"from \.(\w+) import", text)) | set(re.findall(r"from \. import (\w+)", text))
        for dependency in imported & modules:
            assert order.index(dependency) < order.index(name), f"{name} is reloaded before {dependency}"


def test_the_extension_depends_on_the_pytorch_extension_only_if_it_uses_it():
    """Setup installs torch itself (light-the-torch) and may need none in Slicer (an Engine Python): the
    PyTorch extension's PyTorchUtils is never called, so the extension does not depend on it."""
    import re
    cmake = (ROOT / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS\s+"([^"]*)"\)', cmake).group(1).split()
    uses = any("PyTorchUtils" in re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", p.read_text())
               for p in SLICER_MODULE.rglob("*.py"))
    assert ("PyTorch" in depends) == uses
    assert json.loads((ROOT / "SegBook.json").read_text()).get("build_dependencies", []) == \
        [d for d in depends if d != "NA"]


def test_every_child_process_opens_no_console_window_on_windows():
    """Each subprocess.run / Popen of the module passes CREATE_NO_WINDOW (noWindow() or creationflags)."""
    import ast
    calls = []
    for path in SLICER_MODULE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("run", "Popen") and getattr(node.func.value, "id", "") == "subprocess":
                flags = any(k.arg == "creationflags" or (k.arg is None and "noWindow" in ast.dump(k.value))
                            for k in node.keywords)
                group = any(k.arg is None and ast.unparse(k.value) == "group" for k in node.keywords) and \
                    "group = noWindow() if _WINDOWS" in path.read_text()
                calls.append((f"{path.name}:{node.lineno}", flags or group))
    assert calls and all(ok for _, ok in calls), [c for c, ok in calls if not ok]


def test_the_fine_tune_chart_draws_the_losses_and_the_mean_dice_not_one_series_per_class():
    from SegBookLib.TrainingChart import TrainingChart
    scene = slicer.vtkMRMLScene()
    chart = TrainingChart(scene)
    classes = [f"structure{i}" for i in range(104)]
    for epoch in (1, 2):        # the metric event of segbook.training.trainer with a TotalSegmentator base
        chart.add({"event": "metric", "epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch,
                   "val_mean_dice": 0.3 * epoch, "lr": 0.01, **{f"val_dice_{c}": 0.1 for c in classes}})
    series = sorted(chart.chart.GetNthPlotSeriesNode(i).GetYColumnName()
                    for i in range(chart.chart.GetNumberOfPlotSeriesNodes()))
    assert series == ["train_loss", "val_loss", "val_mean_dice"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 3
    assert chart.column("val_dice_structure7") == [0.1, 0.1], "the per-class Dice stays in the table"


def test_the_batch_script_leaves_no_volume_behind_when_an_input_fails(tmp_path, monkeypatch):
    """`run` in this process on a scene standing for Slicer's: every input read and then failed (an unknown
    model) is removed again, so a long folder does not pile up volumes in memory."""
    import importlib.util
    import shutil
    spec = importlib.util.spec_from_file_location("SegBookBatch", BATCH)
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(IMAGE, inputs / name)
    status = batch.run(["--input", str(inputs), "--output", str(tmp_path / "out"), "--model", "no-such-model",
                        "--device", "cpu"])
    assert status == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_the_statistics_button_refreshes_the_table_after_edits_and_shows_it(gui_stubs, monkeypatch):  # noqa: F811
    """The application's parts the button uses are the real slicer-core classes where they exist
    (vtkMRMLApplicationLogic propagating the table to the table view node, vtkSlicerTablesLogic choosing the
    layout); the layout manager is a stub recording the layout set."""
    import types

    import numpy as np
    from test_slicer_static import UI_FILE
    from SegBookLib.StatisticsTable import REFERENCE_ROLE
    from SegBookLib.Widget import Widget
    scene = slicer.mrmlScene
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    slicer.app.applicationLogic.return_value = applicationLogic
    slicer.app.layoutManager.return_value.layout = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        tables=types.SimpleNamespace(logic=slicer.vtkSlicerTablesLogic)), raising=False)
    view = scene.AddNewNodeByClass("vtkMRMLTableViewNode")
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    try:
        volume = load_volume(scene, IMAGE)
        node = segmentation_of_boxes(scene, volume, BOXES)
        ui.outputSegmentationSelector.currentNode.return_value = node
        ui.inputVolumeSelector.currentNode.return_value = None      # the segmentation's own volume is used
        click = ui.statisticsButton.clicked.connect.call_args.args[0]
        click()
        assert gui_stubs["errors"] == []
        table = node.GetNodeReference(REFERENCE_ROLE)
        assert view.GetTableNodeID() == table.GetID(), "shown in the table view"
        layout = slicer.app.layoutManager.return_value.setLayout.call_args.args[0]
        four_up = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
        assert layout == slicer.vtkSlicerTablesLogic().GetLayoutWithTable(four_up) != four_up
        expected = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        for index, box in enumerate(BOXES):
            expected[box] = index + 1
        voxels = [int(table.GetTable().GetValueByName(r, "Voxels").ToInt()) for r in range(3)]
        assert voxels == [int((expected == v).sum()) for v in (1, 2, 3)]
        # an edit in the Segment Editor, then Statistics again: the same table, the segments as they are now
        node.GetSegmentation().RemoveSegment(node.GetSegmentation().GetNthSegmentID(0))
        click()
        assert node.GetNodeReference(REFERENCE_ROLE) is table and table.GetNumberOfRows() == 2
        names = [table.GetTable().GetValueByName(r, "Structure").ToString() for r in range(2)]
        assert names == ["s1", "s2"]
    finally:
        panel.cleanup()


def test_a_fine_tune_whose_parent_dies_saves_its_checkpoint_and_ends(tmp_path):
    """Killed while training (the parent died after the first epoch's metric): the trainer notices within a
    second, saves a checkpoint at its next iteration (its output now goes nowhere, so no write fails), ends."""
    import time

    from app_launcher import alive, descendants, make_launcher
    from slicer_fixtures import IMAGE2, LABEL, LABEL2
    launcher = str(make_launcher(tmp_path / "bin"))
    base = make_tiny_model(tmp_path / "base", classes=["background", "anterior", "posterior"], name="base", stages=6)
    cases = [{"name": n, "image": str(i), "label": str(lb)} for n, i, lb in (("one", IMAGE, LABEL),
                                                                              ("two", IMAGE2, LABEL2))]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"name": "d", "class_names": ["background", "anterior", "posterior"],
                                   "channel_names": ["image"], "cases": cases}))
    out = tmp_path / "m"
    args = [launcher, "-m", "segbook", "finetune", str(dataset), "-o", str(out), "--base", str(base),
            "--epochs", "50", "--iterations-per-epoch", "4", "--patch-size", "32", "32", "32", "--batch-size", "1",
            "--threads", "1", "--num-workers", "0", "--val-every", "1", "--progress", "json"]
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(SLICER_MODULE), json.dumps(args), "null",
                               "metric"], stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(parent.stdout.readline())
        pids = [launcher_pid] + descendants(launcher_pid)
        checkpoint = out / "training" / "checkpoint.pt"
        killed = time.time()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 120
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "the fine-tune went on after its parent died"
            time.sleep(0.2)
        assert checkpoint.is_file() and checkpoint.stat().st_mtime >= killed, "a checkpoint saved on the way out"
    finally:
        parent.kill()

