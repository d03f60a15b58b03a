"""Nothing lost when the disk fails: every output verified complete before it replaces anything.

Real failures, no mocks: the commands run in a child process under a file size limit (RLIMIT_FSIZE, with
SIGXFSZ ignored so that a write past the limit returns EFBIG, as a full disk returns ENOSPC), and shared
folders are used by real concurrent processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from segbook.cli import main
from test_predict_cli import CT, model_dir  # noqa: F401  (fixture: a tiny model with TotalSegmentator names)

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
TINY = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--batch-size", "2",
        "--val-fraction", "0.25", "--threads", "1", "--num-workers", "0", "--val-every", "100",
        "--iterations-per-epoch", "2"]

# the child: writes past `limit` bytes fail with EFBIG ("File too large") instead of killing the process
_LIMITED = ("import resource, runpy, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "limit = int(sys.argv[1])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
            "sys.argv = ['segbook'] + sys.argv[2:]\n"
            "runpy.run_module('segbook', run_name='__main__')\n")


def run_limited(limit: int, *args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m segbook ARGS` in a process that cannot write files larger than `limit` bytes."""
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ predict
@pytest.mark.parametrize("fmt", [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha",
                                 pytest.param(".dcm", marks=pytest.mark.dicom)])
def test_a_result_that_does_not_fit_is_one_line_and_the_previous_result_stays(tmp_path, model_dir, fmt):  # noqa: F811
    """Every format's label map is bigger than the limit, its sidecar is not: ITK's NIfTI and NRRD writers
    wrote a short file without raising, which was renamed into place with a sidecar beside it (exit 0)."""
    source = CT
    if fmt == ".dcm":
        from dicom_fixtures import write_ct_series
        source = tmp_path / "ct"
        write_ct_series(CT, source)
    out = tmp_path / "out"
    out.mkdir()
    target, sidecar = out / f"seg{fmt}", out / "seg.json"
    target.write_bytes(b"the previous result")
    sidecar.write_text('{"previous": true}')
    r = run_limited(6000, "predict", source, "-o", target, "--model", model_dir, "--progress", "none",
                    "--backend", "torch")
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) == (f"segbook predict: error: {target}: cannot write (File too large); nothing was "
                                  f"replaced")
    assert target.read_bytes() == b"the previous result" and sidecar.read_text() == '{"previous": true}'
    assert listing(out) == sorted(["seg.json", f"seg{fmt}"])       # no temporary file left
    # the same run with room enough writes it (so the limit, not the format, failed it above)
    r = run_cli("predict", source, "-o", target, "--model", model_dir, "--progress", "none", "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert target.stat().st_size > 6000 and json.loads(sidecar.read_text())["output"] == str(target)


def test_a_sidecar_that_does_not_fit_leaves_nothing(tmp_path, model_dir):  # noqa: F811
    """The sidecar (about 2.5 kB with statistics) is the first file of a result to fail under a 1.5 kB limit:
    one line naming it, and neither it, the statistics table nor the label map appears."""
    out = tmp_path / "seg.nii.gz"
    r = run_limited(1500, "predict", CT, "-o", out, "--model", model_dir, "--progress", "none", "--backend", "torch",
                    "--statistics")
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) == (f"segbook predict: error: {tmp_path / 'seg.json'}: cannot write (File too large); "
                                  f"nothing was replaced")
    assert listing(tmp_path) == []


def test_a_batch_stops_at_the_first_result_that_does_not_fit_and_resumes(tmp_path, model_dir):  # noqa: F811
    """A full disk stays full: a batch stops at the first failed write (one line) rather than computing every
    other case to fail it too; the cases written before stay, and --skip-existing goes on from there."""
    import SimpleITK as sitk
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sitk.ReadImage(str(CT))
    sitk.WriteImage(image[:8, :8, :8], str(inputs / "a_small.nii.gz"))
    sitk.WriteImage(image, str(inputs / "b_big.nii.gz"))
    sitk.WriteImage(image, str(inputs / "c_big.nii.gz"))
    out = tmp_path / "out"
    args = ["predict", inputs, "-o", out, "--model", model_dir, "--progress", "none", "--backend", "torch",
            "--format", ".nii"]
    r = run_limited(6000, *args)
    assert r.returncode == 2
    assert one_line(r.stderr) == (f"segbook predict: error: {out / 'b_big.nii'}: cannot write (File too large); "
                                  f"nothing was replaced")
    assert listing(out) == ["a_small.json", "a_small.nii"]
    r = run_cli(*args, "--skip-existing")
    assert r.returncode == 0, r.stderr
    assert listing(out) == ["a_small.json", "a_small.nii", "b_big.json", "b_big.nii", "c_big.json", "c_big.nii"]


# ------------------------------------------------------------------------------------- model folders
def test_a_converted_download_that_does_not_fit_leaves_no_model_folder(tmp_path, monkeypatch):
    """Converting a released checkpoint writes ~58 MB of weights: under a 1 MB limit, one line naming the
    weights file, no model in the cache; the next run with room converts it."""
    import segbook
    from conftest import write_released_checkpoint
    from test_zoo import lay_out_hub_cache
    import torch
    torch.manual_seed(0)
    net = segbook.build_stunet("S")
    ckpt = write_released_checkpoint(tmp_path / "small_ep4k.model", net.state_dict())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lay_out_hub_cache(tmp_path / "hf", "ziyanhuang/STU-Net", "small_ep4k.model", ckpt)
    folder = Path(os.environ["SEGBOOK_CACHE"]) / "models" / "stunet-s-totalseg"
    r = run_limited(1 << 20, "download", "stunet-s-totalseg")
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) == (f"segbook download: error: {folder / 'weights.safetensors'}: cannot write "
                                  f"(File too large); nothing was replaced")
    assert not folder.exists() or listing(folder) == []
    from segbook import zoo
    assert not zoo.is_cached("stunet-s-totalseg")
    r = run_cli("download", "stunet-s-totalseg")
    assert r.returncode == 0, r.stderr
    assert listing(folder) == ["model.json", "weights.safetensors"]


def test_a_model_folder_that_cannot_be_rewritten_keeps_the_previous_model(tmp_path, model_dir):  # noqa: F811
    """save_model_folder under a limit its new weights exceed: the previous weights and model.json stay."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = {name: (folder / name).read_bytes() for name in listing(folder)}
    code = ("import resource, signal, sys, torch\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))\n"
            "from segbook.atomic import WriteError\n"
            "from segbook.zoo import get_config, save_model_folder\n"
            f"folder = {str(folder)!r}\n"
            "config = get_config(folder)\n"
            "try:\n"
            "    save_model_folder(folder, config, {'big': torch.zeros(100000)})\n"
            "except WriteError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message = f"{folder / 'weights.safetensors'}: cannot write (File too large); nothing was replaced"
    assert r.stdout.strip() == message, r.stderr
    assert {name: (folder / name).read_bytes() for name in listing(folder)} == before


# ----------------------------------------------------------------------------------------- fine-tune
def _finetune_cmd(out, *extra):
    return [sys.executable, "-m", "segbook", "finetune", str(MINI), "-o", str(out), *TINY, *extra]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_good_one_and_resumes(tmp_path):
    out = tmp_path / "ft"
    # a lock left by a fine-tune that died: taken over
    (out / "training").mkdir(parents=True)
    (out / "training" / "lock").write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    assert main(["finetune", str(MINI), "-o", str(out), *TINY, "--epochs", "1", "--progress", "none"]) == 0
    ckpt = out / "training" / "checkpoint.pt"
    good = ckpt.read_bytes()
    assert len(good) > 5_000_000 > (out / "weights.safetensors").stat().st_size
    model_before = (out / "model.json").read_bytes()

    r = run_limited(5_000_000, "finetune", MINI, "-o", out, *TINY, "--epochs", "2", "--progress", "none", "--resume")
    assert r.returncode == 2, r.stderr
    assert one_line(r.stderr) == (f"segbook finetune: error: {ckpt}: cannot write (File too large); nothing was "
                                  f"replaced; the previous checkpoint is kept: free space, then continue with --resume")
    assert ckpt.read_bytes() == good and (out / "model.json").read_bytes() == model_before
    assert not [p for p in (out / "training").rglob("*") if ".part" in p.name]

    # a damaged checkpoint (here: cut short by hand) is refused in one line naming it
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / "training" / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    r = run_cli("finetune", MINI, "-o", cut, *TINY, "--epochs", "2", "--progress", "none", "--resume")
    assert r.returncode == 2
    assert one_line(r.stderr).startswith(f"segbook finetune: error: {cut / 'training' / 'checkpoint.pt'}: damaged "
                                         f"training checkpoint")

    assert main(["finetune", str(MINI), "-o", str(out), *TINY, "--epochs", "2", "--progress", "none", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert json.loads((out / "model.json").read_text())["provenance"]["epochs_done"] == 2


def test_readers_and_a_second_fine_tune_while_a_fine_tune_writes_the_folder(tmp_path):
    """Two processes load the model folder again and again while a fine-tune (a resumed one) rewrites it each
    epoch: every load succeeds. A second `--resume` of the same run, which was accepted and trained into the
    same folder at the same time, is refused in one line naming the first one's pid."""
    out, stop, done = tmp_path / "ft", tmp_path / "stop", tmp_path / "done"
    assert main(["finetune", str(MINI), "-o", str(out), *TINY, "--epochs", "1", "--progress", "none"]) == 0
    writer = subprocess.Popen(_finetune_cmd(out, "--epochs", "40", "--progress", "json", "--stop-file", stop,
                                            "--resume"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    reader_code = ("import sys\nfrom pathlib import Path\nfrom segbook.zoo import create_model\n"
                   "out, done = Path(sys.argv[1]), Path(sys.argv[2])\nloads, errors = 0, []\n"
                   "while not done.exists():\n"
                   "    try:\n        create_model(out); loads += 1\n"
                   "    except Exception as e:\n        errors.append(repr(e))\n"
                   "print(loads, errors)\n")
    readers, second = [], None
    try:
        assert json.loads(writer.stdout.readline())["event"] == "started"
        second = subprocess.Popen(_finetune_cmd(out, "--epochs", "2", "--progress", "none", "--resume"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        readers = [subprocess.Popen([sys.executable, "-c", reader_code, str(out), str(done)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(2)]
        refused = second.communicate(timeout=300)[1]
        assert second.returncode == 2, refused
        assert one_line(refused) == (
            f"segbook finetune: error: {out / 'training'}: process {writer.pid} on {os.uname().nodename} is using "
            f"it (a fine-tune writes it); wait for it to finish or choose another folder")
        epochs = 0
        for line in writer.stdout:      # let the readers meet several rewrites of the folder
            if json.loads(line)["event"] == "metric":
                epochs += 1
                if epochs == 4:
                    stop.touch()
        writer.wait(timeout=300)
    finally:
        done.touch()
        for proc in (writer, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert writer.returncode == 128 + signal.SIGTERM, writer.stderr.read()
    for reader in readers:
        text, err = reader.communicate(timeout=120)
        loads, errors = text.split(" ", 1)
        assert errors.strip() == "[]" and int(loads) >= 1, (text, err)
    assert not (out / "training" / "lock").exists()
    # the lock went with the first run: a resume of it may start
    assert main(["finetune", str(MINI), "-o", str(out), *TINY, "--epochs", str(epochs + 2), "--progress", "none",
                 "--resume"]) == 0


# ------------------------------------------------------------------------------------ parsed files
@pytest.mark.parametrize("content", ['{"name": "tiny-cli", "arch": {"input_channels": 1, "num_cl', "", "[1, 2]",
                                     '{"name": "x"}', '{"name": "x", "arch": 5, "plan": {}, "class_names": []}',
                                     b"\xff\xfe\x00garbage"], ids=["cut", "empty", "list", "incomplete", "wrong types",
                                                                  "binary"])
def test_a_damaged_model_json_is_one_line_naming_it(tmp_path, model_dir, content, capsys):  # noqa: F811
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    path = folder / "model.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["predict", str(CT), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(folder),
                 "--progress", "none"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"segbook predict: error: {path}: not a valid model.json (") and "Traceback" not in line
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("content", ['{"labels": 5}', '{"labels": ["background", "a"]}',
                                     '{"labels": {"background": 0, "a": 1}, "file_ending": 5}',
                                     '{"labels": {"background": 0, "a": 1}, "channel_names": 3}'])
def test_a_dataset_json_of_the_wrong_shape_is_one_line_naming_it(tmp_path, content, capsys):
    data = tmp_path / "raw"
    shutil.copytree(MINI, data)
    (data / "dataset.json").write_text(content)
    assert main(["finetune", str(data), "-o", str(tmp_path / "out"), *TINY, "--epochs", "1", "--progress", "none"]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"segbook finetune: error: {data / 'dataset.json'}: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"class_names": ["background", "a"], "cases": 5}',
                                     '{"class_names": ["background", "a"], "cases": [{"image": 5, "label": "x"}]}'])
def test_a_case_list_of_the_wrong_shape_is_one_line_naming_it(tmp_path, content, capsys):
    path = tmp_path / "cases.json"
    path.write_text(content)
    assert main(["finetune", str(path), "-o", str(tmp_path / "out"), *TINY, "--epochs", "1", "--progress", "none"]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"segbook finetune: error: {path}: ")


def test_a_damaged_saved_fine_tune_configuration_is_one_line_naming_it(tmp_path, capsys):
    train = tmp_path / "out" / "training"
    train.mkdir(parents=True)
    (train / "checkpoint.pt").write_bytes(b"")
    (train / "config.json").write_text('{"dataset": "x", "output": ')
    assert main(["finetune", str(MINI), "-o", str(tmp_path / "out"), *TINY, "--resume", "--progress", "none"]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"segbook finetune: error: {train / 'config.json'}: not a fine-tune configuration (")


# ---------------------------------------------------------------------------- the Slicer training store
_ADD_CASES = """
import sys
from pathlib import Path
sys.path.insert(0, {testing!r})
import slicer
from slicer_fixtures import IMAGE, LABEL, load_label_segmentation, load_volume
from SegBookLib.FineTuneLogic import FineTuneLogic
scene = slicer.vtkMRMLScene()
volume = load_volume(scene, IMAGE, "v")
segmentation = load_label_segmentation(scene, LABEL, volume, {{1: "anterior", 2: "posterior"}})
store = FineTuneLogic({store!r}, {store!r} + "-models")
Path({ready!r}).touch()
while not Path({go!r}).exists():
    pass
for i in range({n}):
    store.addCase(volume, segmentation, name=f"{{sys.argv[1]}}_{{i}}")
"""


@pytest.mark.slicer
def test_two_slicer_windows_adding_cases_to_one_store_lose_none(tmp_path):
    """Two processes (as two Slicer windows) add four cases each to one training folder at the same moment:
    all eight are listed, with their files. Reading, changing and writing the case list raced before."""
    store, go = tmp_path / "training", tmp_path / "go"
    procs = []
    for who in ("a", "b"):
        ready = tmp_path / f"ready-{who}"
        code = _ADD_CASES.format(testing=str(Path(__file__).parent), store=str(store), ready=str(ready),
                                 go=str(go), n=4)
        procs.append((subprocess.Popen([sys.executable, "-c", code, who], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), ready))
    deadline = time.monotonic() + 120
    while not all(ready.exists() for _, ready in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    for proc, _ in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    dataset = json.loads((store / "dataset.json").read_text())
    assert sorted(c["name"] for c in dataset["cases"]) == sorted(f"{w}_{i}" for w in "ab" for i in range(4))
    assert dataset["class_names"] == ["background", "anterior", "posterior"]
    for case in dataset["cases"]:
        assert (store / case["image"]).is_file() and (store / case["label"]).is_file()
    assert not [p for p in store.rglob("*") if ".part" in p.name or p.name.endswith(".tmp")]


def test_a_log_line_that_does_not_fit_is_not_added_at_all(tmp_path):
    """Training logs grow by appending: a line that cannot be written whole is cut back, never left half."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n')
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))\n"
            "from segbook.atomic import WriteError\n"
            "from segbook.training.curves import append_jsonl\n"
            "try:\n"
            f"    append_jsonl({str(log)!r}, {{'epoch': 2, 'train_loss': 0.123456789}})\n"
            "except WriteError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == f"{log}: cannot write (File too large); nothing was added", r.stderr
    assert log.read_text() == '{"epoch": 1}\n'


@pytest.mark.parametrize("content", ['{"name": "segbook-training", "class_names": ["background", "a"], "cas', "[]",
                                     '{"class_names": "a", "cases": {}}'])
def test_a_damaged_training_store_list_is_one_line_naming_it_and_is_not_overwritten(tmp_path, content):
    """The Slicer panel's case list: refused in one line (it was a JSON traceback), and kept as it is for the
    user to restore, not replaced by an empty list when the next case is added."""
    import slicer_fixtures  # noqa: F401  (puts the Slicer module on sys.path; no Slicer needed here)
    from SegBookLib.FineTuneLogic import FineTuneLogic, TrainingSetError
    store = tmp_path / "training"
    store.mkdir()
    (store / "dataset.json").write_text(content)
    logic = FineTuneLogic(store, tmp_path / "models")
    for action in (logic.cases, lambda: logic.setClasses(["a"]), lambda: logic.removeCase("x")):
        with pytest.raises(TrainingSetError) as err:
            action()
        assert str(err.value).startswith(f"{store / 'dataset.json'}: ") and "\n" not in str(err.value)
    assert (store / "dataset.json").read_text() == content
