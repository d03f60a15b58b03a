"""`segbook predict` as a user runs it: outputs, sidecars, folders, bad input, Ctrl-C."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cli, write_released_checkpoint
from segbook.config import Arch, ModelConfig, Plan
from segbook.zoo import _network, save_model_folder

DATA = Path(__file__).parent / "data"
CT = DATA / "abdomen_ct_3mm_crop.nii.gz"
CLASSES = ["background", "liver", "spleen", "kidney_left", "aorta"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = ModelConfig(name="tiny-cli", arch=Arch(1, 5, [4, 8, 8, 16], [1, 1, 1, 1],
                                                    [[2, 2, 2], [2, 2, 2], [1, 2, 2]]),
                         plan=Plan(spacing=[3.0, 3.0, 3.0], patch_size=[16, 32, 32]), class_names=CLASSES)
    torch.manual_seed(0)
    net = _network(config, False)
    with torch.no_grad():
        net.seg_outputs[-1].weight.mul_(20)
        net.seg_outputs[-1].bias.zero_()
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-cli", config, net.state_dict())


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def test_predict_file_writes_labels_and_sidecar(tmp_path, model_dir):
    out = tmp_path / "seg.nii.gz"
    r = run_cli("predict", CT, "-o", out, "--model", model_dir, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path) == ["seg.json", "seg.nii.gz"]
    src, seg = sitk.ReadImage(str(CT)), sitk.ReadImage(str(out))
    assert seg.GetSize() == src.GetSize() and seg.GetSpacing() == src.GetSpacing()
    assert seg.GetOrigin() == src.GetOrigin() and seg.GetDirection() == src.GetDirection()
    assert seg.GetPixelID() == sitk.sitkUInt8
    side = json.loads((tmp_path / "seg.json").read_text())
    assert [c["name"] for c in side["labels"]] == CLASSES[1:]
    assert side["labels"][0]["terminology"]["type"][2] == "Liver"
    assert side["settings"]["tta"] is False and side["settings"]["step"] == 0.5
    assert len(np.unique(sitk.GetArrayFromImage(seg))) >= 2


def test_folder_of_inputs_classes_roi_and_json_progress(tmp_path, model_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = sitk.ReadImage(str(CT))
    sitk.WriteImage(img, str(inputs / "a.nii.gz"))
    sitk.WriteImage(img[:, :, :20], str(inputs / "b.nrrd"))
    out = tmp_path / "out"
    lo, hi = img.TransformIndexToPhysicalPoint((5, 5, 3)), img.TransformIndexToPhysicalPoint((40, 30, 15))
    roi = ",".join(f"{v:.3f}" for v in (*lo, *hi))
    r = run_cli("predict", inputs, "-o", out, "--model", model_dir, "--classes", "liver,kidney_left",
                "--roi", roi, "--format", ".seg.nrrd", "--progress", "json")
    assert r.returncode == 0, r.stderr
    assert _files(out) == ["a.json", "a.seg.nrrd", "b.json", "b.seg.nrrd"]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert {"progress", "done", "case"} <= {e["event"] for e in events}
    assert any(e["event"] == "progress" and e["stage"] == "predict" for e in events)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.seg.nrrd")))
    assert set(np.unique(seg)) <= {0, 1, 3}
    inside = np.zeros(seg.shape, bool)
    inside[3:16, 5:31, 5:41] = True
    assert seg[~inside].max() == 0
    side = json.loads((out / "a.json").read_text())
    assert [c["name"] for c in side["labels"]] == ["liver", "kidney_left"]
    assert side["settings"]["roi_voxels_zyx"] == [3, 5, 5, 16, 31, 41]


def test_released_checkpoint_with_model_plan(tmp_path, model_dir):
    from segbook.checkpoint import load_checkpoint
    ckpt = write_released_checkpoint(tmp_path / "base_ep4k.model", load_checkpoint(model_dir / "weights.safetensors"),
                                     numpy_module="numpy.core")
    r1 = run_cli("predict", CT, "-o", tmp_path / "a.nii.gz", "--model", model_dir, "--checkpoint", ckpt,
                 "--progress", "none")
    r2 = run_cli("predict", CT, "-o", tmp_path / "b.nii.gz", "--model", model_dir, "--progress", "none")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("a.nii.gz", "b.nii.gz"))
    np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "a.json").read_text())["checkpoint"] == str(ckpt)


def _bad_inputs(tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([30, 40], sitk.sitkInt16), str(flat))
    const = tmp_path / "const.nii.gz"
    sitk.WriteImage(sitk.Image([30, 40, 20], sitk.sitkInt16) + 5, str(const))
    two = tmp_path / "two.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(CT))] * 2), str(two))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x00" * 100)
    return {"missing": (tmp_path / "missing.nii.gz", [], "no such file"),
            "junk": (junk, [], "cannot read"),
            "2d": (flat, [], "2D image"),
            "constant": (const, [], "constant"),
            "channels": (two, [], "2 channel"),
            "class": (CT, ["--classes", "liver,brain"], "class 'brain'"),
            "class_empty": (CT, ["--classes", "liver,,spleen"], "none of them empty"),    # was: all classes
            "roi": (CT, ["--roi", "9000,9000,9000,9100,9100,9100"], "outside the image"),
            "roi_format": (CT, ["--roi", "1,2,3"], "six numbers"),
            "model": (CT, ["--model", "no-such-model"], "unknown model 'no-such-model'"),
            "suffix": (CT, ["-o", tmp_path / "out" / "seg.png"], "unknown output format")}


@pytest.mark.parametrize("case", ["missing", "junk", "2d", "constant", "channels", "class", "class_empty", "roi",
                                  "roi_format", "model", "suffix"])
def test_bad_input_one_line_no_output(tmp_path, model_dir, case):
    path, extra, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    args = ["predict", path, "-o", out / "seg.nii.gz", "--model", model_dir, "--progress", "none", *extra]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or _files(out) == []
    if case in ("missing", "junk", "2d", "constant", "channels"):
        assert str(path) in lines[0]          # names the input


def test_a_bad_case_in_a_batch_is_reported_and_the_rest_are_written(tmp_path, model_dir):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(inputs / "a.nii.gz"))
    (inputs / "b.nii.gz").write_bytes(b"\x00" * 100)
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(inputs / "c.nii.gz"))
    r = run_cli("predict", inputs, "-o", out, "--model", model_dir, "--progress", "none")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "b.nii.gz" in lines[0] and "1 of 3 inputs failed" in lines[1], r.stderr
    assert _files(out) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]


def test_ctrl_c_leaves_no_partial_output(tmp_path, model_dir):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segbook", "predict", CT, "-o", out / "seg.nii.gz",
                             "--model", model_dir, "--progress", "json", "--step", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as at a terminal: a shell's background job (a CI script's `cmd &`) starts
                            # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["stage"] == "predict" and event["done"] >= 1:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() or _files(out) == []
