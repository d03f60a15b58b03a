"""Every place an image enters (predict, the worker, evaluate, fine-tune datasets, the Slicer batch script):
damaged inputs and bad output paths end in one line, exit non-zero, nothing written; legitimate ones work."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from dicom_fixtures import expected_volume, write_series
from test_predict_cli import model_dir  # noqa: F401  (the tiny CLI model fixture)

DATA = Path(__file__).parent / "data"
CT = DATA / "abdomen_ct_3mm_crop.nii.gz"
MINI = DATA / "hippocampus_mini"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _cut(path: Path, frac: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])
    return path


def _ct(tmp: Path, name: str, compress=True) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(path), useCompression=compress)
    return path


def _ct_series(folder: Path, positions=None, **kw) -> list[Path]:
    """A DICOM series of 16 slices of the real CT crop (so that the tiny model has something to segment)."""
    img = sitk.ReadImage(str(CT))
    arr = sitk.GetArrayFromImage(img)
    positions = positions or [(0.0, 0.0, 3.0 * k) for k in range(16)]
    files = write_series(folder, positions, size=(arr.shape[2], arr.shape[1]), spacing=(3.0, 3.0), thickness=3.0,
                         **kw)
    for k, f in enumerate(files):      # put the real CT values into the slices (keeping their headers)
        sl = sitk.ReadImage(str(f))
        real = sitk.GetImageFromArray(arr[k % arr.shape[0]][None].astype(np.int16))
        real.CopyInformation(sl)
        for key in sl.GetMetaDataKeys():
            real.SetMetaData(key, sl.GetMetaData(key))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(f))
        writer.Execute(real)
    return files


def _bad(tmp: Path, kind: str) -> tuple[Path, list, str]:
    if kind == "nii.gz truncated":
        return _cut(_ct(tmp, "ct.nii.gz"), 0.4), [], "truncated"
    if kind in ("nii.gz corrupt", "mha zlib corrupt"):
        path = _ct(tmp, "ct.nii.gz" if kind.startswith("nii") else "ct.mha")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
        return path, [], "damaged compressed data"
    if kind == "nii truncated":
        return _cut(_ct(tmp, "ct.nii", False), 0.7), [], "truncated"
    if kind == "negative size":         # ITK's NIfTI library would print its own error line to stderr
        path = _ct(tmp, "ct.nii", False)
        data = bytearray(path.read_bytes())
        struct.pack_into("<h", data, 44, -3)
        path.write_bytes(bytes(data))
        return path, [], "damaged header (size -3 along axis 2)"
    if kind == "zero spacing":
        path = _ct(tmp, "ct.nii", False)
        data = bytearray(path.read_bytes())
        data[80:84] = struct.pack("<f", 0.0)
        path.write_bytes(bytes(data))
        return path, [], "voxel size 0"
    if kind == "two series":
        _ct_series(tmp / "dicom", uid="1.2.3.1", name="a")
        _ct_series(tmp / "dicom", uid="1.2.3.2", name="b")
        return tmp / "dicom", [], "2 DICOM series, choose one with --series UID: 1.2.3."
    if kind == "missing slice":
        _ct_series(tmp / "dicom", [(0.0, 0.0, 3.0 * k) for k in range(16) if k != 7])
        return tmp / "dicom", [], "missing slice(s) between (0.00, 0.00, 18.00) and (0.00, 0.00, 24.00)"
    if kind == "corrupt slice":
        files = _ct_series(tmp / "dicom")
        _cut(files[5], 0.5)
        return tmp / "dicom", [], f"{files[5].name} cannot be read"
    if kind == "unknown series":
        _ct_series(tmp / "dicom", uid="1.2.3.1")
        return tmp / "dicom", ["--series", "7.7.7"], "no DICOM series with UID 7.7.7"
    raise KeyError(kind)


BAD = ["nii.gz truncated", "nii.gz corrupt", "mha zlib corrupt", "nii truncated", "negative size", "zero spacing", "two series", "missing slice", "corrupt slice",
       "unknown series"]


@pytest.mark.parametrize("kind", BAD)
def test_predict_refuses_a_damaged_or_ambiguous_input(tmp_path, model_dir, kind):  # noqa: F811
    path, extra, message = _bad(tmp_path / "in", kind)
    out = tmp_path / "out"
    r = run_cli("predict", path, "-o", out / "seg.nii.gz", "--model", model_dir, "--progress", "none", *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0] and str(path) in lines[0] and "Traceback" not in r.stderr
    assert _files(out) == []


def test_predict_series_choice_spaces_non_ascii_and_a_new_folder(tmp_path, model_dir):  # noqa: F811
    folder = tmp_path / "PACS export ü"
    chosen = _ct_series(folder, uid="1.2.3.2", name="b", description="Abdomen")
    _ct_series(folder, [(0.0, 0.0, 5.0 * k) for k in range(4)], uid="1.2.3.9", name="a", description="Scout")
    out = tmp_path / "new folder" / "résultats" / "seg 1.nii.gz"
    r = run_cli("predict", folder, "-o", out, "--model", model_dir, "--progress", "none", "--series", "1.2.3.2")
    assert r.returncode == 0, r.stderr
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == (56, 48, 16)
    np.testing.assert_allclose(seg.GetSpacing(), (3.0, 3.0, 3.0), rtol=1e-5)
    # the chosen series was segmented, not the scout: its labels are those of that series' voxels
    from segbook.inference import Predictor
    volume = expected_volume(chosen).astype(np.float32)[None]
    labels = Predictor(str(model_dir), device="cpu").predict_array(volume, (3.0, 3.0, 3.0))
    assert len(np.unique(labels)) >= 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), labels)
    assert _files(out.parent) == ["seg 1.json", "seg 1.nii.gz"]


@pytest.mark.parametrize("kind", ["below a file", "folder as file", "file as folder"])
def test_a_bad_output_fails_before_any_image_is_read(tmp_path, model_dir, kind):  # noqa: F811
    # the input is damaged and the model unknown: if either were looked at first, the message would say so
    bad_input = _cut(_ct(tmp_path, "in/ct.nii.gz"), 0.5)
    (tmp_path / "afile").write_text("x")
    if kind == "below a file":
        inputs, out, message = [bad_input], tmp_path / "afile" / "sub" / "seg.nii.gz", "afile is a file"
    elif kind == "folder as file":
        (tmp_path / "adir.nii.gz").mkdir()
        inputs, out, message = [bad_input], tmp_path / "adir.nii.gz", "is a folder"
    else:
        inputs, out, message = [bad_input, bad_input.parent], tmp_path / "afile", "is a file"
    r = run_cli("predict", *inputs, "-o", out, "--model", "no-such-model", "--progress", "none")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_read_only_output_folder_fails_first(tmp_path):
    """A folder the user cannot write in: a chmod 555 one, except for root (who writes there anyway), for
    whom /proc is one (no regular file can be created in it, whoever asks)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.name == "posix" and os.geteuid() == 0:
        ro = Path("/proc")
    else:
        ro.chmod(0o555)
    try:
        r = run_cli("predict", CT, "-o", ro / "new folder" / "seg.nii.gz", "--model", "no-such-model",
                    "--progress", "none")
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert r.returncode == 2 and "cannot write in" in r.stderr, r.stderr
    assert not (ro / "new folder").exists()


def test_paths_that_would_lose_work_are_refused(tmp_path, model_dir):  # noqa: F811
    inputs = tmp_path / "in"
    a = _ct(inputs, "a.nii.gz")
    _ct(inputs, "a.nrrd")
    r = run_cli("predict", inputs, "-o", tmp_path / "out", "--model", model_dir, "--progress", "none")
    assert r.returncode == 2 and "would be written there: rename one input" in r.stderr, r.stderr
    assert _files(tmp_path / "out") == []
    before = a.read_bytes()
    r = run_cli("predict", a, "-o", a, "--model", model_dir, "--progress", "none")
    assert r.returncode == 2 and "overwrite the input" in r.stderr, r.stderr
    assert a.read_bytes() == before


def test_skip_existing_resumes_a_batch_without_redoing_finished_cases(tmp_path, model_dir):  # noqa: F811
    inputs, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        _ct(inputs, f"{name}.nii.gz")
    r = run_cli("predict", inputs / "a.nii.gz", inputs / "b.nii.gz", "-o", out, "--model", model_dir,
                "--progress", "none")
    assert r.returncode == 0, r.stderr
    (out / "b.json").unlink()               # b was interrupted between its two renames: not finished
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.05)
    r = run_cli("predict", inputs, "-o", out, "--model", model_dir, "--progress", "json", "--skip-existing")
    assert r.returncode == 0, r.stderr
    cases = [json.loads(line)["input"] for line in r.stdout.splitlines() if json.loads(line)["event"] == "case"]
    assert [Path(c).name for c in cases] == ["b.nii.gz", "c.nii.gz"]
    assert _files(out) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz", "c.json", "c.nii.gz"]
    assert all(out.joinpath(n).stat().st_mtime_ns == stamp[out / n] for n in ("a.json", "a.nii.gz"))
    r = run_cli("predict", inputs, "-o", out, "--model", model_dir, "--progress", "none", "--skip-existing")
    assert r.returncode == 0 and "skipping 3 of 3" in r.stderr


def _worker(requests, timeout=120):
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    proc = subprocess.run([sys.executable, "-m", "segbook.worker"], input=lines, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_worker_refuses_damaged_input_and_bad_output_before_loading(tmp_path, model_dir):  # noqa: F811
    bad = _cut(_ct(tmp_path, "in/ct.nii.gz"), 0.5)
    (tmp_path / "afile").write_text("x")
    two = _bad(tmp_path / "d", "two series")[0]
    events = _worker([
        {"id": "out", "command": "predict", "input": str(CT), "output": str(tmp_path / "afile" / "s.nrrd"),
         "model": str(model_dir), "device": "cpu"},
        {"id": "trunc", "command": "predict", "input": str(bad), "output": str(tmp_path / "o" / "s.nrrd"),
         "model": str(model_dir), "device": "cpu"},
        {"id": "series", "command": "predict", "input": str(two), "output": str(tmp_path / "o" / "t.nrrd"),
         "model": str(model_dir), "device": "cpu", "series": "1.2.3.2"},
        {"command": "shutdown"}])
    errors = {e["request"]: e["message"] for e in events if e["event"] == "error"}
    assert "afile is a file" in errors["out"]
    assert [e["request"] for e in events if e["event"] == "loaded"] == ["trunc"], "no model load for a bad output"
    assert str(bad) in errors["trunc"] and "truncated" in errors["trunc"]
    assert "series" not in errors and _files(tmp_path / "o") == ["t.json", "t.nrrd"]


def test_evaluate_refuses_a_truncated_label_map_and_a_bad_csv_path(tmp_path):
    labels = tmp_path / "ref.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(MINI / "labelsTr" / "hippocampus_149.nii.gz")), str(labels))
    pred = tmp_path / "pred.nii.gz"
    shutil.copy(labels, pred)
    _cut(pred, 0.5)
    r = run_cli("evaluate", pred, labels)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pred.nii.gz: truncated" in lines[0], r.stderr
    assert not (tmp_path / "evaluation.csv").exists()
    (tmp_path / "afile").write_text("x")
    r = run_cli("evaluate", pred, labels, "--csv", tmp_path / "afile" / "e.csv")
    assert r.returncode == 2 and "afile is a file" in r.stderr, r.stderr


def test_finetune_dataset_check_refuses_a_truncated_image(tmp_path):
    from segbook.dataset import check_dataset, read_dataset
    from segbook.errors import InputError
    mini = tmp_path / "mini ø"
    shutil.copytree(MINI, mini)
    for p in mini.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    check_dataset(read_dataset(mini))        # as shipped: fine, from a path with a space and non-ASCII
    _cut(mini / "imagesTr" / "hippocampus_221.nii.gz", 0.6)
    with pytest.raises(InputError, match=r"case hippocampus_221: image .*hippocampus_221.nii.gz: truncated"):
        check_dataset(read_dataset(mini))


def _batch(*args):
    from slicer_fixtures import SLICER_MODULE
    return subprocess.run([sys.executable, str(SLICER_MODULE / "Resources" / "Scripts" / "SegBookBatch.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slicer
def test_slicer_batch_series_choice_damaged_input_and_bad_output(tmp_path, model_dir):  # noqa: F811
    folder = tmp_path / "dicom"
    _ct_series(folder, uid="1.2.3.1", name="a")
    _ct_series(folder, [(0.0, 0.0, 5.0 * k) for k in range(4)], uid="1.2.3.2", name="b")
    out = tmp_path / "seg.seg.nrrd"
    r = _batch("--input", folder, "--output", out, "--model", model_dir, "--device", "cpu")
    assert r.returncode == 1 and "2 DICOM series, choose one with --series UID" in r.stderr, r.stderr
    assert not out.exists()
    r = _batch("--input", folder, "--output", out, "--model", model_dir, "--device", "cpu", "--series", "1.2.3.1")
    assert r.returncode == 0, r.stderr
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize()[:2] == (56, 48) and _files(tmp_path) == ["dicom", "seg.seg.nrrd"]
    bad = _cut(_ct(tmp_path, "in/ct.nii.gz"), 0.5)
    r = _batch("--input", bad, "--output", tmp_path / "o.seg.nrrd", "--model", model_dir, "--device", "cpu")
    assert r.returncode == 1 and "ct.nii.gz: truncated" in r.stderr and not (tmp_path / "o.seg.nrrd").exists()
    (tmp_path / "afile").write_text("x")
    r = _batch("--input", CT, "--output", tmp_path / "afile" / "x.seg.nrrd", "--model", model_dir)
    assert r.returncode == 2 and "afile is a file" in r.stderr, r.stderr
    r = _batch("--input", CT, "--output", tmp_path / "c.seg.nrrd", "--model", model_dir, "--classes", "liver,")
    assert r.returncode == 2 and "none of them empty" in r.stderr and not (tmp_path / "c.seg.nrrd").exists()
