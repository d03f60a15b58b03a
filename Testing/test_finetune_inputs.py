"""`segbook finetune` on what users get wrong (resume without a run, resume with other flags, a patch the
pools do not divide, cases with different channel counts, NaN in an image, the training extras missing),
each one line naming the problem and nothing trained; and the Dice a model.json reports, recomputed from
the saved model's predictions of its validation cases."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segbook.cli import main

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
FAST = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--batch-size", "2", "--val-fraction",
        "0.25", "--epochs", "1", "--iterations-per-epoch", "1", "--num-workers", "0", "--threads", "1",
        "--progress", "none"]


def _finetune(capsys, data, out, *args) -> tuple[int, list[str]]:
    code = main(["finetune", str(data), "-o", str(out), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def _one_line(code, err, *fragments):
    assert code == 2 and len(err) == 1, err
    assert all(f in err[0] for f in fragments), err[0]


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    code, err = _finetune(capsys, MINI, tmp_path / "none", *FAST, "--resume")
    _one_line(code, err, "no checkpoint.pt to resume from", str(tmp_path / "none" / "training"))
    assert not (tmp_path / "none").exists()


def test_resume_with_other_recipe_flags_is_refused_naming_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(capsys, MINI, out, *FAST)[0] == 0
    before = (out / "weights.safetensors").read_bytes()
    changed = [a if a != "2" else "1" for a in FAST]            # --batch-size 1
    code, err = _finetune(capsys, MINI, out, *changed, "--lr", "0.5", "--resume")
    _one_line(code, err, "--batch-size 1 (the run has 2), --lr 0.5 (the run has its default)", "--resume")
    assert (out / "weights.safetensors").read_bytes() == before
    # what may change between runs (where and how long it runs) is accepted, and flags left out are the run's
    code, err = _finetune(capsys, MINI, out, "--epochs", "2", "--threads", "2", "--num-workers", "0",
                          "--progress", "none", "--resume")
    assert code == 0, err
    assert json.loads((out / "model.json").read_text())["provenance"]["epochs_done"] == 2


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "--epochs must be at least 1, got 0"),      # wrote an untrained model
    ("--iterations-per-epoch", "-1", "--iterations-per-epoch must be at least 1, got -1"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),              # never made a batch
    ("--val-every", "0", "--val-every must be at least 1, got 0"),               # failed after epoch 1
    ("--num-workers", "-1", "--num-workers must be at least 0, got -1"),
    ("--lr", "nan", "--lr must be a number of 0 or more, got nan"),               # failed at iteration 2
    ("--lr", "-0.01", "--lr must be a number of 0 or more, got -0.01"),
    ("--width", "0", "--width must be a positive number, got 0.0"),              # made a 1-channel network
    ("--patch-size", "0", "--patch-size needs three sizes of at least 1 voxel, got [0, 24, 16]"),
])
def test_numbers_out_of_range_are_one_line_before_any_work(tmp_path, capsys, flag, value, message):
    args = list(FAST)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    code, err = _finetune(capsys, MINI, tmp_path / "out", *args)
    _one_line(code, err, message)
    assert not (tmp_path / "out").exists()


def test_the_base_is_fetched_before_the_cases_are_preprocessed(tmp_path, capsys, monkeypatch):
    """Offline without the base's weights, a fine-tune says so at once: nothing is preprocessed first."""
    monkeypatch.setenv("SEGBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    args = FAST[3:]                                       # no --scratch --width 0.25: the base's weights
    assert FAST[:3] == ["--scratch", "--width", "0.25"]
    code, err = _finetune(capsys, MINI, tmp_path / "out", *args)
    _one_line(code, err, "stunet-s-totalseg", "is not cached")
    assert not (tmp_path / "out" / "training" / "cache").exists()


def test_a_patch_the_pools_do_not_divide_is_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    assert _finetune(capsys, MINI, base, *FAST)[0] == 0      # a model folder whose pools are fixed
    pools = np.prod(json.loads((base / "model.json").read_text())["arch"]["pool_op_kernel_sizes"], axis=0)
    odd = [int(p) * 2 + 1 for p in pools]                   # not divisible along any axis
    args = FAST[3:]                                          # without --scratch --width 0.25
    assert FAST[:3] == ["--scratch", "--width", "0.25"]
    i = args.index("--patch-size")
    args[i + 1:i + 4] = map(str, odd)
    code, err = _finetune(capsys, MINI, tmp_path / "ft", *args, "--base", str(base), "--plan", "base")
    _one_line(code, err, f"--patch-size {odd} must be divisible by the pooling")
    assert not (tmp_path / "ft" / "weights.safetensors").exists()


def _case_list(tmp_path, channels: list[int]) -> Path:
    """A JSON case list over the mini dataset's cases with the given channel counts (channel files copied)."""
    cases = []
    for n, image in zip(channels, sorted((MINI / "imagesTr").iterdir())):
        files = []
        for c in range(n):
            files.append(str(shutil.copy(image, tmp_path / f"{image.name[:-7]}_{c:04d}.nii.gz")))
        cases.append({"name": image.name[:-7], "image": files, "label": str(MINI / "labelsTr" / image.name)})
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"class_names": ["background", "anterior", "posterior"], "cases": cases}))
    return path


def test_cases_with_different_channel_counts_are_one_line(tmp_path, capsys):
    data = _case_list(tmp_path, [1, 1, 2, 1])
    code, err = _finetune(capsys, data, tmp_path / "ft", *FAST)
    _one_line(code, err, "case hippocampus_221: 2 channels, the first case has 1")
    assert not (tmp_path / "ft" / "training" / "checkpoint.pt").exists()


def test_nan_in_a_training_image_is_one_line_naming_the_file(tmp_path, capsys):
    data = _case_list(tmp_path, [1, 1, 1, 1])
    spec = json.loads(data.read_text())
    img = sitk.ReadImage(spec["cases"][1]["image"][0], sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3, 4] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    path = tmp_path / "with_nan.nrrd"            # (SimpleITK's NIfTI writer turns NaN into 0; NRRD keeps it)
    sitk.WriteImage(bad, str(path))
    spec["cases"][1]["image"] = [str(path)]
    data.write_text(json.dumps(spec))
    code, err = _finetune(capsys, data, tmp_path / "ft", *FAST, "--val-fraction", "0")
    _one_line(code, err, str(path), "NaN")
    assert not (tmp_path / "ft" / "training" / "checkpoint.pt").exists()


def _finetune_without(module, out) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"      # as if not installed: importing it fails
            "from segbook.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "finetune", str(MINI), "-o", str(out), *FAST],
                          capture_output=True, text=True, timeout=300)


def test_missing_training_extras_are_one_line(tmp_path):
    proc = _finetune_without("batchgeneratorsv2", tmp_path / "ft")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "pip install 'segbook[train]'" in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "ft").exists()
    # without matplotlib (the curves' plot) the run trains all the same and says what it left out
    proc = _finetune_without("matplotlib", tmp_path / "ft2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ft2" / "weights.safetensors").is_file() and (tmp_path / "ft2" / "training" / "log.jsonl").is_file()
    assert not (tmp_path / "ft2" / "training" / "curves.png").exists()


def _dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    a, b = pred == c, ref == c
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_model_json_dice_is_the_dice_of_the_saved_model(tmp_path, capsys):
    """The validation Dice the trainer writes into model.json, recomputed here with numpy from `segbook
    predict` on the saved folder (another process, the default engine) against the label files."""
    out = tmp_path / "ft"
    args = ["--base", "hippocampus-demo", "--plan", "base", *FAST[7:]]   # the shipped model's plan, 1 step
    assert FAST[3:7] == ["--patch-size", "16", "24", "16"]
    assert _finetune(capsys, MINI, out, *args)[0] == 0
    prov = json.loads((out / "model.json").read_text())["provenance"]
    names = prov["data"]["validation_cases"]
    assert names and prov["epochs_done"] == 1
    per_class = {1: [], 2: []}
    for name in names:
        seg = tmp_path / f"{name}_seg.nii.gz"
        proc = subprocess.run([sys.executable, "-m", "segbook", "predict", str(MINI / "imagesTr" / f"{name}.nii.gz"),
                               "-o", str(seg), "--model", str(out), "--device", "cpu", "--progress", "none"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(MINI / "labelsTr" / f"{name}.nii.gz")))
        for c in per_class:
            per_class[c].append(_dice(pred, ref, c))
    expected = {"anterior": np.mean(per_class[1]), "posterior": np.mean(per_class[2])}
    assert min(expected.values()) > 0.5, expected             # the model segments: not 0 == 0
    assert prov["validation"]["dice"] == pytest.approx(expected, abs=2e-3)
    assert prov["validation"]["mean_dice"] == pytest.approx(np.mean(list(expected.values())), abs=2e-3)


def test_a_base_from_a_checkpoint_file(tmp_path, capsys, monkeypatch):
    """`--checkpoint FILE`: the base's weights from a file downloaded by hand (released format: a pickle
    holding "network_weights"), not from the base's folder, read once (STU-Net-H's is 5.6 GB); a bad file is
    one line and nothing is written."""
    import torch
    from safetensors.torch import load_file
    from segbook import checkpoint
    from segbook.zoo import fetch
    reads = []
    real = checkpoint._load_pickle
    monkeypatch.setattr(checkpoint, "_load_pickle", lambda path: reads.append(Path(path).name) or real(path))
    demo = load_file(str(fetch("hippocampus-demo") / "weights.safetensors"))
    half = {k: (v.float() * 0.5) for k, v in demo.items()}     # not the folder's weights
    torch.save({"network_weights": half}, tmp_path / "half.model")
    out = tmp_path / "ft"
    args = ["--base", "hippocampus-demo", "--plan", "base", *FAST[7:], "--lr", "1e-12"]   # one step, no change
    assert _finetune(capsys, MINI, out, *args, "--checkpoint", str(tmp_path / "half.model"))[0] == 0
    assert reads.count("half.model") == 1, reads
    got = load_file(str(out / "weights.safetensors"))
    for k, v in half.items():
        assert torch.allclose(got[k].float(), v, atol=1e-4), k
    assert not torch.allclose(got["conv_blocks_context.0.0.conv1.weight"].float(),
                              demo["conv_blocks_context.0.0.conv1.weight"].float(), atol=1e-4)
    prov = json.loads((out / "model.json").read_text())["provenance"]
    assert str(tmp_path / "half.model") in json.dumps(prov)
    # a missing file, a file of another network, --scratch with it: one line, nothing written
    del half["conv_blocks_context.0.0.conv1.weight"]
    torch.save({"network_weights": half}, tmp_path / "other.model")
    for extra, message in [(["--checkpoint", str(tmp_path / "nope.model")], "nope.model: no such file"),
                           (["--checkpoint", str(tmp_path / "other.model")],
                            "base model has no weight 'conv_blocks_context.0.0.conv1.weight'"),
                           (["--checkpoint", str(tmp_path / "half.model"), "--scratch"], "choose one")]:
        code, err = _finetune(capsys, MINI, tmp_path / "bad", *args, *extra)
        _one_line(code, err, message)
        assert not (tmp_path / "bad" / "weights.safetensors").exists()
