"""Mixed-precision training steps whose loss is not finite: skipped with the loss scale lowered (GradScaler's
answer to an overflow, which nnU-Net's trainer relies on), and the run stopped only after several in a row.
fp16 runs on CUDA only; GradScaler's CPU form (torch >= 2.3) runs the same code here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from segbook.cli import main
from segbook.training import trainer

MINI = Path(__file__).parent / "data" / "hippocampus_mini"


class _OldTorchScaler:
    """torch < 2.3 has GradScaler for CUDA only: what the trainer calls of it, as GradScaler does it (skip the
    step when a gradient is not finite, halve the scale; or set the scale given)."""

    def __init__(self, init_scale):
        self.scale_value, self.found_inf = init_scale, False

    def scale(self, loss):
        return loss * self.scale_value

    def unscale_(self, opt):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for grad in grads:
            grad.div_(self.scale_value)
        self.found_inf = not all(torch.isfinite(grad).all() for grad in grads)

    def step(self, opt):
        if not self.found_inf:
            opt.step()

    def update(self, new_scale=None):
        self.scale_value = new_scale if new_scale is not None else self.scale_value / (2 if self.found_inf else 1)

    def get_scale(self):
        return self.scale_value

    def get_backoff_factor(self):
        return 0.5

    def state_dict(self):          # saved in the checkpoint
        return {"scale": self.scale_value}


def _scaler():
    init = 2.0 ** 10
    return torch.amp.GradScaler("cpu", init_scale=init) if hasattr(torch.amp, "GradScaler") else _OldTorchScaler(init)


def test_a_non_finite_loss_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = _scaler()
    batch = {"image": torch.randn(1, 1, 5, 5, 5), "target": [torch.zeros(1, 1, 3, 3, 3)]}
    before = [p.detach().clone() for p in net.parameters()]
    loss = trainer.train_step(net, batch, lambda o, t: o.mean() * float("nan"), opt, scaler, torch.device("cpu"))
    assert math.isnan(loss) and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    loss = trainer.train_step(net, batch, lambda o, t: o.square().mean(), opt, scaler, torch.device("cpu"))
    assert loss > 0 and not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def _run(tmp_path, monkeypatch, bad_steps: set, capsys, seen=None):
    """A real fine-tune with a CPU GradScaler whose loss is NaN at the given (0-based) steps; `seen` collects
    the scalers made and the losses of the good steps, as the loss function computed them."""
    real = trainer.DeepSupervisionLoss
    step = {"n": 0}
    seen = {"scalers": [], "good": []} if seen is None else seen

    class Loss(real):
        def forward(self, *args):
            out = super().forward(*args)
            step["n"] += 1
            if step["n"] - 1 in bad_steps:
                return out * float("nan")
            seen["good"].append(float(out.detach()))
            return out

    def scaler(device):
        seen["scalers"].append(_scaler())
        return seen["scalers"][-1]
    monkeypatch.setattr(trainer, "DeepSupervisionLoss", Loss)
    monkeypatch.setattr(trainer, "grad_scaler", scaler)
    code = main(["finetune", str(MINI), "-o", str(tmp_path / "ft"), "--scratch", "--width", "0.25", "--patch-size",
                 "16", "24", "16", "--val-fraction", "0", "--epochs", "1", "--iterations-per-epoch", "8",
                 "--num-workers", "0", "--threads", "1", "--progress", "none"])
    return code, capsys.readouterr().err


def test_a_few_non_finite_steps_are_skipped_and_training_goes_on(tmp_path, monkeypatch, capsys, caplog):
    seen = {"scalers": [], "good": []}
    code, err = _run(tmp_path, monkeypatch, {2, 3, 4, 5}, capsys, seen)
    assert code == 0, err
    assert (tmp_path / "ft" / "weights.safetensors").is_file()
    # 4 skipped steps halve the scale 4 times (2^10 -> 2^6; GradScaler grows it again only after 2000 good
    # steps), one warning each, iterations 3 to 6 (1-based)
    (scaler,) = seen["scalers"]
    assert scaler.get_scale() == 2.0 ** 6
    warned = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert [(line.split(" iteration ")[1].split(":")[0], line.split("lowered to ")[1]) for line in warned] == \
        [("3", "512"), ("4", "256"), ("5", "128"), ("6", "64")], warned
    # the epoch's logged loss is the mean of the 4 good steps' losses, the skipped ones left out
    (record,) = [json.loads(x) for x in (tmp_path / "ft" / "training" / "log.jsonl").read_text().splitlines()]
    assert len(seen["good"]) == 4 and record["train_loss"] == pytest.approx(sum(seen["good"]) / 4, rel=1e-12)


def test_several_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    seen = {"scalers": [], "good": []}
    code, err = _run(tmp_path, monkeypatch, set(range(2, 8)), capsys, seen)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"iteration {3 + trainer.MAX_SKIPPED_STEPS - 1} ({trainer.MAX_SKIPPED_STEPS} steps in a row)" in lines[0]
    # stopped at the MAX_SKIPPED_STEPS-th bad step, not later: GradScaler halved the scale that many times
    # (2^10 -> 2^5 for 5), and the first epoch never ended: no checkpoint to keep, no model written
    (scaler,) = seen["scalers"]
    assert scaler.get_scale() == 2.0 ** (10 - trainer.MAX_SKIPPED_STEPS) and len(seen["good"]) == 2
    assert "last good checkpoint kept: none yet" in lines[0]
    assert not (tmp_path / "ft" / "weights.safetensors").exists()
