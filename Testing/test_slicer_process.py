"""Cancel, Stop and the worker's pipes through an emulation of PythonSlicer (CTK's AppLauncher, see
app_launcher.py): what the module meets inside the real application, where the interpreter we start is a
launcher that forwards no signal to the real one."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer
if os.name == "nt" or not Path("/proc/self/stat").exists():
    pytest.skip("the launcher emulation and the process checks use /proc (Linux)", allow_module_level=True)

from app_launcher import alive, descendants, interpreter_pid, make_launcher  # noqa: E402
from slicer_fixtures import IMAGE, IMAGE2, LABEL, LABEL2, load_label_segmentation, load_volume, make_tiny_model  # noqa: E402
from SegBookLib.FineTuneLogic import FineTuneLogic  # noqa: E402
from SegBookLib.Parameters import FineTuneParameters, SegmentParameters  # noqa: E402
from SegBookLib.ProcessRunner import ProcessRunner, coreEnvironment  # noqa: E402
from SegBookLib.SegmentationLogic import SegmentationError, SegmentationLogic  # noqa: E402
from test_slicer_static import gui_stubs  # noqa: E402,F401  (the Qt stubs)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    return make_launcher(tmp_path_factory.mktemp("slicer") / "bin")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def tree(runner) -> list:
    """The launcher and every process below it."""
    return [runner.process.pid] + descendants(runner.process.pid)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_emulated_launcher_behaves_as_ctk_documents(launcher, tmp_path):
    """Same pipes, exit code passed on, a crash exit becomes 1, and a signal to it does not reach the child."""
    import subprocess
    out = subprocess.run([str(launcher), "-c", "import sys; print(input()[::-1]); sys.exit(7)"], input="abc\n",
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (7, "cba\n")
    out = subprocess.run([str(launcher), "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "exit abnormally - Report the problem." in out.stderr
    proc = subprocess.Popen([str(launcher), "-c", "import time; time.sleep(30)"])
    try:
        wait_until(lambda: descendants(proc.pid), 30, "the real interpreter did not start")
        real = interpreter_pid(proc.pid)
        proc.kill()
        proc.wait()
        time.sleep(0.3)
        assert alive(real), "killing the launcher leaves the real interpreter running (as PythonSlicer does)"
    finally:
        os.kill(real, signal.SIGKILL)


def test_kill_ends_the_whole_tree_at_once(launcher):
    """Cancel: the launcher, the real interpreter and its own child all end within a second, no orphan."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('{\"event\": \"ready\"}', flush=True); time.sleep(60)")
    runner = ProcessRunner([launcher, "-c", code])
    runner.start()
    runner.waitFor(lambda e: e["event"] == "ready", timeout=60)
    wait_until(lambda: len(tree(runner)) == 3, 30, "launcher -> interpreter -> grandchild")
    pids = tree(runner)
    t0 = time.monotonic()
    runner.kill()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"kill() blocked {elapsed:.1f} s"
    assert not runner.isRunning()
    wait_until(lambda: not any(alive(p) for p in pids), 1.0, f"survivors: {[p for p in pids if alive(p)]}")
    end = runner.waitFor(lambda e: False, timeout=5)
    assert end["event"] == "exit"
    with pytest.raises(RuntimeError):
        runner.send({"x": 1})


def test_cancel_stops_the_real_worker_and_the_next_segment_starts_one_worker(scene, launcher, tiny_model):
    logic = SegmentationLogic(python=str(launcher))
    try:
        volume = load_volume(scene, IMAGE)
        logic.start(volume, SegmentParameters(model=str(tiny_model), device="cpu", tta=True))
        logic.worker.waitFor(lambda e: e.get("event") == "progress" and e.get("stage") == "predict", timeout=120)
        pids = tree(logic.worker)
        assert len(pids) >= 2, "launcher and real worker"
        t0 = time.monotonic()
        logic.cancel()
        assert time.monotonic() - t0 < 1.0 and not logic.isBusy()
        wait_until(lambda: not any(alive(p) for p in pids), 1.0, "the real worker survived Cancel")
        out = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu"), timeout=180)
        assert out.GetSegmentation().GetNumberOfSegments() == 2
        assert len(tree(logic.worker)) == 2, "one launcher, one worker"
    finally:
        logic.shutdown()


def test_a_cancelled_worker_that_lingers_is_not_doubled(scene, tiny_model, tmp_path):
    """While a killed worker's tree has not ended, the next Segment refuses instead of starting a second one."""
    volume = load_volume(scene, IMAGE)
    # a grandchild in its own session escapes the group kill and keeps the pipes open
    code = ("import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(8)'], "
            "start_new_session=True); print('{\"event\": \"ready\"}', flush=True); time.sleep(60)")
    started = []

    def factory():
        started.append(ProcessRunner([sys.executable, "-c", code]))
        return started[-1]

    logic = SegmentationLogic(workerFactory=factory)
    logic.start(volume, SegmentParameters(model=str(tiny_model), device="cpu"))
    started[0].waitFor(lambda e: e["event"] == "ready", timeout=60)
    logic.cancel()
    with pytest.raises(SegmentationError, match="still stopping"):
        logic.start(volume, SegmentParameters(model=str(tiny_model), device="cpu"))
    assert len(started) == 1
    started[0].wait(20)


def test_undecodable_worker_output_neither_kills_the_reader_nor_hangs_the_worker(tmp_path):
    """Bytes that are not UTF-8 on both pipes, then more than a pipe buffer: every event still arrives."""
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "out, err = sys.stdout.buffer, sys.stderr.buffer\n"
        "out.write(b'caf\\xe9 \\xff\\xfe chatter\\n'); err.write(b'\\x81\\x8d warning in cp1252\\n')\n"
        "out.flush(); err.flush()\n"
        "for i in range(3000):\n"
        "    out.write(b'\\xff' * 100 + b'\\n'); err.write(b'\\xfe' * 100 + b'\\n')\n"
        "out.write((json.dumps({'event': 'done', 'n': 3000}) + '\\n').encode()); out.flush()\n")
    runner = ProcessRunner([sys.executable, str(script)])
    runner.start()
    done = runner.waitFor(lambda e: e["event"] == "done", timeout=60)
    assert done == {"event": "done", "n": 3000}
    end = runner.waitFor(lambda e: False, timeout=60)
    assert end["event"] == "exit" and end["returncode"] == 0 and "\ufffd" in end["stderr"]


# -- Stop of a real fine-tune through the launcher -----------------------------------------------------------
FAST = ["--patch-size", "32", "32", "32", "--batch-size", "1", "--threads", "1", "--val-every", "1"]


def _drop_sigterm(monkeypatch):
    """An OS without SIGTERM (Windows): only the stop file can reach the trainer."""
    real = os.kill

    def kill(pid, sig):
        if sig != signal.SIGTERM:
            real(pid, sig)
    monkeypatch.setattr(os, "kill", kill)


def test_stop_saves_a_checkpoint_through_the_launcher_and_resume_continues(scene, tmp_path, launcher, monkeypatch):
    """SIGTERM to the real interpreter (POSIX), then the stop file alone (Windows' route): each Stop ends the run
    at once with a checkpoint, and Resume goes on from it; with a data-loading worker process, as in the panel."""
    base = make_tiny_model(tmp_path / "base", classes=["background", "anterior", "posterior"], name="base", stages=6)
    ft = FineTuneLogic(tmp_path / "training", tmp_path / "models", python=str(launcher))
    for image, label, name in ((IMAGE, LABEL, "one"), (IMAGE2, LABEL2, "two")):
        volume = load_volume(scene, image, name)
        ft.addCase(volume, load_label_segmentation(scene, label, volume, {1: "anterior", 2: "posterior"}))
    params = FineTuneParameters(base=str(base), outputName="mine", device="cpu", epochs=4, iterationsPerEpoch=2,
                                extraArguments=FAST + ["--num-workers", "1"])
    checkpoint = tmp_path / "models" / "mine" / "training" / "checkpoint.pt"

    ft.start(params)
    ft.waitFor(lambda e: e.get("event") == "metric", timeout=300)
    pids = tree(ft.runner)
    assert len(pids) >= 3, "launcher, trainer, data-loading worker"
    with pytest.raises(Exception, match="already running"):
        ft.start(params)
    ft.runner.stopFile = None           # SIGTERM only
    ft.stop()
    ft.wait(timeout=120)
    assert [m["epoch"] for m in ft.history] in ([1], [1, 2]), "stopped before the last epoch"
    assert ft.final.get("stopped") and not ft.isRunning() and checkpoint.is_file()
    assert ft.runner.process.returncode == 128 + signal.SIGTERM, "the trainer's own exit, passed on by the launcher"
    assert not any(alive(p) for p in pids)
    first = ft.history[-1]["epoch"]

    ft.start(params, resume=True)
    ft.waitFor(lambda e: e.get("event") == "metric", timeout=300)
    _drop_sigterm(monkeypatch)          # the stop file only
    ft.stop()
    ft.wait(timeout=120)
    monkeypatch.undo()
    assert ft.final.get("stopped"), ft.final
    second = [m["epoch"] for m in ft.history]
    assert second and second[0] == first + 1 and second[-1] < 4, second

    final = ft.start(params, resume=True) and ft.wait(timeout=300)
    assert final["ok"], final
    assert [m["epoch"] for m in ft.history][0] == second[-1] + 1 and ft.history[-1]["epoch"] == 4


def test_download_cancel_ends_the_download_through_the_launcher(gui_stubs, tmp_path, monkeypatch, launcher):
    """The panel's Download -> Cancel while `segbook download` is half way through the file: a local hub
    (Testing/local_hub.py) sends the first half of the checkpoint, then nothing more."""
    import torch

    import segbook
    from conftest import write_released_checkpoint
    from local_hub import LocalHub
    from test_slicer_static import UI_FILE
    from SegBookLib.InstallLogic import setPythonSetting
    from SegBookLib.Widget import Widget

    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in segbook.build_stunet("S").state_dict().items()}
    data = write_released_checkpoint(tmp_path / "small_ep4k.model", state).read_bytes()
    hub = LocalHub({"ziyanhuang/STU-Net/small_ep4k.model": data}, mode="stall").__enter__()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "600")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "600")
    setPythonSetting(os.environ["SEGBOOK_HOME"], str(launcher))
    panel = Widget(str(UI_FILE))
    ui = gui_stubs["ui"]
    hub_cache = Path(os.environ["HF_HOME"]) / "hub"
    try:
        ui.modelComboBox.currentData = "stunet-s-totalseg"
        panel.onDownload()
        assert ui.downloadButton.text == "Cancel download" and panel.download.isRunning()
        assert hub.half_sent.wait(120), "the download never asked the hub"
        # half the file has arrived: it is on disk, unfinished, in huggingface_hub's cache
        wait_until(lambda: sum(p.stat().st_size for p in hub_cache.rglob("*.incomplete")) > 0, 60.0,
                   "no bytes of the download reached the disk")
        pids = tree(panel.download)
        assert len(pids) == 2, "launcher and real interpreter"
        t0 = time.monotonic()
        panel.onDownload()                      # Cancel
        assert time.monotonic() - t0 < 1.0 and ui.downloadButton.text == "Download"
        wait_until(lambda: not any(alive(p) for p in pids), 1.0, "the download survived Cancel")
        # nothing half-downloaded is kept as a model or as the file: no model folder, no snapshot entry
        assert not any(Path(os.environ["SEGBOOK_CACHE"]).rglob("model.json"))
        assert not list(hub_cache.rglob("small_ep4k.model"))
    finally:
        panel.cleanup()
        hub.__exit__(None, None, None)
