"""Fine-tuning: loss against reference formulas and nnU-Net, weight transfer, a real short fine-tune,
exact resume (end of epoch and after SIGTERM mid-epoch, with a different worker count), NaN handling."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segbook.checkpoint import load_checkpoint
from segbook.cli import main
from segbook.config import Arch, ModelConfig, Plan
from segbook.network import STUNet
from segbook.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from segbook.training.model_init import FIRST_LAYER_KEYS, build_network
from segbook.zoo import create_model, save_model_folder

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
TINY = ["--scratch", "--width", "0.25", "--patch-size", "16", "24", "16", "--batch-size", "2",
        "--val-fraction", "0.25", "--progress", "none", "--threads", "1"]


def _ref_dice_ce(logits: np.ndarray, target: np.ndarray) -> float:
    """Plain-numpy reference: mean CE + (-mean over foreground classes of the batch soft Dice)."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    k = logits.shape[1]
    g = np.stack([(target[:, 0] == c) for c in range(k)], 1).astype(np.float64)
    ce = -np.mean(np.log(np.take_along_axis(p, target.astype(np.int64), 1)))
    dices = [(2 * (p[:, c] * g[:, c]).sum() + 1e-5) / max(p[:, c].sum() + g[:, c].sum() + 1e-5, 1e-8)
             for c in range(1, k)]
    return ce - np.mean(dices)


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 10, 6, generator=g, dtype=torch.float64)
    return logits, torch.randint(0, 3, (2, 1, 8, 10, 6), generator=g)


def test_loss_matches_formula():
    logits, target = _loss_inputs()
    ours = DiceCELoss()(logits, target).item()
    assert ours == pytest.approx(_ref_dice_ce(logits.numpy(), target.numpy()), rel=1e-5)


@pytest.mark.nnunet
def test_loss_matches_nnunet():
    from nnunetv2.training.loss import compound_losses as nnunet_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    logits, target = _loss_inputs()
    ours = DiceCELoss()(logits, target).item()
    ref = nnunet_loss.DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                     weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    assert ours == pytest.approx(ref(logits.float(), target.float()).item(), rel=1e-4)


def _one_hot_dice_ce(logits, target):
    """The former formulation (float copies, a float32 one-hot): the reference for values and gradients."""
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
    axes = [0, *range(2, logits.ndim)]
    inter, den = (probs[:, 1:] * onehot[:, 1:]).sum(axes), probs[:, 1:].sum(axes) + onehot[:, 1:].sum(axes)
    dice = (2 * inter + 1e-5) / torch.clamp(den + 1e-5, min=1e-8)
    return torch.nn.functional.cross_entropy(logits.float(), target[:, 0].long()) - dice.mean()


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args) and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_without_one_hot_equals_the_one_hot_formulation_and_saves_less(dtype):
    g = torch.Generator().manual_seed(2)
    k, shape = 9, (2, 9, 12, 10, 8)
    logits = (3 * torch.randn(shape, generator=g)).to(dtype)
    target = torch.randint(0, k, (2, 1, *shape[2:]), generator=g)
    target[:, :, :4] = 0                       # a background-heavy target, as in real patches
    ours_in, ref_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, saved = _saved_bytes(DiceCELoss(), ours_in, target)
    ref, ref_saved = _saved_bytes(_one_hot_dice_ce, ref_in, target)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=1e-3 if dtype == torch.float16
                               else 1e-5, atol=1e-7)
    # kept for backward: one float32 copy of the logits' size for CE and one for the softmax, no one-hot
    # (at 105 classes x 2 x 128^3 voxels each such tensor is 1.8 GB of GPU memory)
    full = 4 * logits.numel()
    assert saved <= 2 * full + 16 * target.numel(), (saved, full)
    assert ref_saved >= 3 * full


def _deep_supervision_inputs():
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(1, 3, 8 // s, 8 // s, 8 // s, generator=g) for s in (1, 2, 4)]
    return outs, [torch.randint(0, 3, (1, 1, 8 // s, 8 // s, 8 // s), generator=g) for s in (1, 2, 4)]


def test_deep_supervision_weights_and_sum():
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])
    outs, tgts = _deep_supervision_inputs()
    single = DiceCELoss()
    expected = 2 / 3 * single(outs[0], tgts[0]) + 1 / 3 * single(outs[1], tgts[1])
    assert DeepSupervisionLoss(3)(outs, tgts).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.nnunet
def test_deep_supervision_matches_nnunet():
    from nnunetv2.training.loss import deep_supervision as nn_ds
    outs, tgts = _deep_supervision_inputs()
    ref = nn_ds.DeepSupervisionWrapper(DiceCELoss(), [2 / 3, 1 / 3, 0.0])
    assert DeepSupervisionLoss(3)(outs, tgts).item() == pytest.approx(ref(outs, tgts).item(), rel=1e-6)


def _base_folder(tmp_path, classes, channels=1) -> Path:
    dims = [4, 8, 16, 32, 64, 64]
    cfg = ModelConfig(name="tiny-base", arch=Arch(channels, len(classes), dims, [1] * 6, [[2, 2, 2]] * 5),
                      plan=Plan([1.5] * 3, [64, 64, 64]), class_names=classes)
    torch.manual_seed(3)
    net = STUNet(channels, len(classes), dims, [1] * 6, [[2, 2, 2]] * 5)
    return save_model_folder(tmp_path / "base", cfg, net.state_dict())


def test_heads_reinitialised_rest_transferred_and_channels_repeated(tmp_path):
    base = _base_folder(tmp_path, ["background", "liver", "spleen", "kidney", "lung"])
    state = load_checkpoint(base / "weights.safetensors")
    pools = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2
    torch.manual_seed(0)
    net, _, info = build_network(str(base), ["background", "a", "b"], 2, pools)
    assert info["heads"] == "re-initialised"
    own = net.state_dict()
    for k, v in own.items():
        if k.startswith("seg_outputs."):
            assert v.shape[0] == 3 and v.shape != state[k].shape
        elif k in FIRST_LAYER_KEYS:
            assert v.shape[1] == 2
            assert torch.equal(v[:, 0:1], state[k]) and torch.equal(v[:, 1:2], state[k])
        else:
            assert torch.equal(v, state[k]), k
    assert all(torch.count_nonzero(own[k]) == 0 for k in own if k.startswith("seg_outputs.") and k.endswith("bias"))


def test_same_classes_keep_heads(tmp_path):
    classes = ["background", "anterior", "posterior"]
    base = _base_folder(tmp_path, classes)
    state = load_checkpoint(base / "weights.safetensors")
    net, _, info = build_network(str(base), classes, 1, [[2, 2, 2]] * 5)
    assert info["heads"].startswith("kept")
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def _weights(folder: Path) -> dict:
    return load_checkpoint(Path(folder) / "weights.safetensors")


def _ft(out, *extra) -> int:
    return main(["finetune", str(MINI), "-o", str(out), *TINY, *extra])


def test_short_finetune_writes_a_usable_model_folder(tmp_path):
    out = tmp_path / "hippo"
    assert _ft(out, "--epochs", "2", "--iterations-per-epoch", "4", "--val-every", "1", "--num-workers", "1") == 0
    cfg = json.loads((out / "model.json").read_text())
    assert cfg["class_names"] == ["background", "anterior", "posterior"]
    assert cfg["plan"]["patch_size"] == [16, 24, 16] and cfg["arch"]["dims"] == [4, 8, 16, 32, 64, 64]
    prov = cfg["provenance"]
    assert prov["recipe"]["lr"] is None and prov["initialisation"] == "scratch (He)"
    # the command as a user retypes it, whoever called main(); one process, no resumes
    assert prov["command"] == f"segbook finetune {MINI} -o {out} {' '.join(TINY)} --epochs 2 " \
                              "--iterations-per-epoch 4 --val-every 1 --num-workers 1"
    assert prov["processes"] == 1 and "resumed" not in prov
    assert prov["data"]["validation_cases"] == json.loads((out / "training" / "split.json").read_text())["validation"]
    assert set(prov["validation"]["dice"]) == {"anterior", "posterior"}
    lines = [json.loads(x) for x in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and lines[0]["lr"] == 1e-2
    assert lines[1]["lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert (out / "training" / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "training", "weights.safetensors"]
    # the folder is a model: segbook predict can use it directly
    from segbook.inference import Predictor
    net = create_model(out)
    image = np.random.default_rng(0).normal(size=(1, 20, 30, 20)).astype(np.float32)
    assert Predictor(out, device="cpu").predict_array(image, (1.0, 1.0, 1.0)).shape == (20, 30, 20)
    assert net.config.name == "hippo"
    # an existing run is not overwritten by accident
    assert _ft(out, "--epochs", "1", "--iterations-per-epoch", "1") == 2


def _renamed_copy(tmp_path) -> Path:
    """The mini dataset with other class names: a base with these names' heads does not exist, so the
    fine-tune starts with fresh heads on the shipped model's trained encoder."""
    import shutil
    data = Path(shutil.copytree(MINI, tmp_path / "data"))
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "front": 1, "back": 2}
    (data / "dataset.json").write_text(json.dumps(spec))
    return data


def test_a_short_finetune_measurably_improves_dice_from_a_fixed_start(tmp_path):
    """20 steps (~20 s on one thread) on 3 real cases raise the held-out case's Dice from the start's
    (the same seed and builder as the run) by far more than noise; a step that does not update the
    weights leaves it where it was (checked by hand: replacing SGD.step with a no-op fails this test)."""
    from segbook.dataset import read_dataset
    from segbook.training.validate import validate
    data, out = _renamed_copy(tmp_path), tmp_path / "out"
    assert main(["finetune", str(data), "-o", str(out), "--base", "hippocampus-demo", "--plan", "base",
                 "--epochs", "1", "--iterations-per-epoch", "20", "--val-every", "1", "--val-fraction", "0.25",
                 "--threads", "1", "--num-workers", "0", "--progress", "none"]) == 0
    config = ModelConfig.load(out / "model.json")
    assert config.provenance["heads"] == "re-initialised"
    torch.manual_seed(0)             # the run's start: trainer seeds with --seed (0) before building
    start, _, _ = build_network("hippocampus-demo", config.class_names, 1, config.arch.pool_op_kernel_sizes)
    cases = [c for c in read_dataset(data).cases if c.name in config.provenance["data"]["validation_cases"]]
    before = validate(start.state_dict(), config, cases)["mean_dice"]
    after = config.provenance["validation"]["mean_dice"]
    assert after > before + 0.3 and after > 0.6, (before, after)


def test_finetune_from_a_base_folder_keeps_its_plan_and_weights(tmp_path):
    base = _base_folder(tmp_path, ["background", "liver", "spleen", "kidney", "lung"])
    out = tmp_path / "ft"
    assert main(["finetune", str(MINI), "-o", str(out), "--base", str(base), "--plan", "base", "--epochs", "1",
                 "--iterations-per-epoch", "1", "--lr", "1e-12", "--val-fraction", "0.25", "--progress", "none",
                 "--threads", "1", "--num-workers", "0"]) == 0
    cfg = json.loads((out / "model.json").read_text())
    assert cfg["plan"]["spacing"] == [1.5, 1.5, 1.5] and cfg["plan"]["patch_size"] == [64, 64, 64]
    assert cfg["arch"]["pool_op_kernel_sizes"] == [[2, 2, 2]] * 5 and cfg["provenance"]["heads"] == "re-initialised"
    assert "fine-tuned from tiny-base" in cfg["description"]
    # one step at a negligible learning rate: every non-head weight is still the base's
    a, b = _weights(base), _weights(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if not k.startswith("seg_outputs."))
    assert b["seg_outputs.0.weight"].shape[0] == 3


def test_resume_at_epoch_end_is_exact(tmp_path):
    args = ["--iterations-per-epoch", "3", "--val-every", "100"]
    assert _ft(tmp_path / "straight", "--epochs", "2", *args, "--num-workers", "0") == 0
    assert _ft(tmp_path / "split", "--epochs", "1", *args, "--num-workers", "0") == 0
    # a longer schedule on resume: the second epoch runs as in the 2-epoch run; another worker count
    assert _ft(tmp_path / "split", "--epochs", "2", *args, "--num-workers", "1", "--resume") == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "straight" / "training" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "split" / "training" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["train_loss"] for x in la] == [json.loads(x)["train_loss"] for x in lb]
    prov = json.loads((tmp_path / "split" / "model.json").read_text())["provenance"]
    assert "--epochs 1" in prov["command"] and "--resume" not in prov["command"]
    assert len(prov["resumed"]) == 1 and "--epochs 2" in prov["resumed"][0] and "--resume" in prov["resumed"][0]


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    args = ["--epochs", "2", "--iterations-per-epoch", "30", "--val-every", "100", "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segbook", "finetune", str(MINI), "-o", str(tmp_path / "stopped"), *TINY, *args]
    cmd[cmd.index("none")] = "json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("stage") == "train" and event["done"] >= 35:   # in the second epoch
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved; continue with --resume" in err and "Traceback" not in err
    state = torch.load(tmp_path / "stopped" / "training" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and 5 <= state["iteration"] < 30
    assert not list((tmp_path / "stopped" / "training").glob("*.tmp"))
    assert _ft(tmp_path / "stopped", *args, "--resume") == 0
    prov = json.loads((tmp_path / "stopped" / "model.json").read_text())["provenance"]
    # run as `python -m segbook` (argv[0] is a path): recorded as `segbook finetune`, the resume after it
    assert prov["command"].startswith("segbook finetune ") and "--progress json" in prov["command"]
    assert [c.endswith("--resume") for c in prov["resumed"]] == [True]
    assert _ft(tmp_path / "straight", *args) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_stops_with_a_checkpoint_too(tmp_path, sig):
    """Ctrl-C, SLURM's scancel or `kill -TERM -PGID` signal the loader workers as well as the trainer: the
    trainer still saves at the next step and says so; no worker dies under it (a traceback, the epoch lost)."""
    args = ["--epochs", "2", "--iterations-per-epoch", "30", "--val-every", "100", "--num-workers", "2"]
    cmd = [sys.executable, "-m", "segbook", "finetune", str(MINI), "-o", str(tmp_path / "run"), *TINY, *args]
    cmd[cmd.index("none")] = "json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("stage") == "train" and event["done"] >= 35:
            os.killpg(proc.pid, sig)                       # the trainer and its two loader processes
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "checkpoint saved; continue with --resume" in err and "Traceback" not in err
    state = torch.load(tmp_path / "run" / "training" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and 5 <= state["iteration"] < 30


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["--iterations-per-epoch", "2", "--val-every", "100", "--num-workers", "0"]
    assert _ft(out, "--epochs", "1", *args) == 0
    ckpt = out / "training" / "checkpoint.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for f in (out / "training" / "cache").glob("*_image.npy"):   # corrupt every preprocessed case
        a = np.load(f)
        a[:] = np.nan
        np.save(f, a)
    capsys.readouterr()
    assert _ft(out, "--epochs", "3", *args, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became nan at epoch 2 iteration 1" in err[0]
    assert f"last good checkpoint kept: {ckpt} (after epoch 1)" in err[0]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
