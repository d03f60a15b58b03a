"""The fine-tuning recipe pinned to nnU-Net v2's own trainer (nnUNetTrainer of the installed nnunetv2, not
numbers copied from it): its optimiser, poly schedule, gradient clipping and train step, and the weights of
its deep-supervision loss, against `make_optimizer`, `train_step` and `DeepSupervisionLoss`."""
from __future__ import annotations

import copy

import pytest
import torch

from segbook.config import Arch, ModelConfig, Plan
from segbook.network import STUNet
from segbook.training.loss import DeepSupervisionLoss, deep_supervision_weights
from segbook.training.trainer import make_optimizer, train_step

pytestmark = pytest.mark.nnunet

POOLS = [[2, 2, 2], [2, 2, 2], [2, 2, 1]]
CLASSES = ["background", "a", "b"]


def _net() -> STUNet:
    torch.manual_seed(0)
    return STUNet(1, 3, [4, 8, 16, 16], [1] * 4, POOLS, deep_supervision=True).double()


@pytest.fixture(autouse=True)
def _nnunet_results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))    # where nnUNetTrainer writes its log file


def _nnunet_trainer(epochs: int = 1000):
    """A real nnUNetTrainer (CPU) for a plan with these pools and SegBook's batch Dice, nothing trained."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_reference import plans_and_dataset
    config = ModelConfig(name="recipe", arch=Arch(1, 3, [4, 8, 16, 16], [1] * 4, POOLS),
                         plan=Plan([1.0] * 3, [32, 32, 16]), class_names=CLASSES)
    plans, dataset = plans_and_dataset(config)
    conf = plans["configurations"]["3d_fullres"]
    conf["architecture"]["arch_kwargs"] = {"strides": [[1, 1, 1]] + POOLS}   # what nnU-Net's plans hold
    conf["batch_dice"] = True               # nnU-Net's 3d_fullres plans and SegBook's loss
    plans["continue_training"] = False
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))
    trainer.num_epochs = epochs
    return trainer


def test_sgd_settings_are_nnunets():
    trainer = _nnunet_trainer()
    trainer.network = _net()
    theirs, _ = trainer.configure_optimizers()
    ours, _ = make_optimizer(_net(), trainer.initial_lr, 1000)
    keys = ("lr", "momentum", "nesterov", "weight_decay", "dampening")
    assert {k: ours.defaults[k] for k in keys} == {k: theirs.defaults[k] for k in keys}
    assert type(ours) is type(theirs)


def test_poly_schedule_is_nnunets_epoch_by_epoch():
    """nnU-Net sets lr = initial * (1 - epoch / epochs)^0.9 at the start of each epoch; SegBook's schedule
    steps after each epoch: the learning rate each epoch trains with must be the same."""
    epochs = 7
    trainer = _nnunet_trainer(epochs)
    trainer.network = _net()
    their_opt, their_sched = trainer.configure_optimizers()
    our_opt, our_sched = make_optimizer(_net(), trainer.initial_lr, epochs)
    theirs, ours = [], []
    for epoch in range(epochs):
        their_sched.step(epoch)                 # nnUNetTrainer.on_train_epoch_start
        theirs.append(their_opt.param_groups[0]["lr"])
        ours.append(our_opt.param_groups[0]["lr"])
        our_sched.step()                        # SegBook's trainer, after the epoch
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[0] > ours[-1] > 0


def test_deep_supervision_weights_are_nnunets():
    trainer = _nnunet_trainer()
    weights = trainer._build_loss().weight_factors    # single process (DDP: 1e-6 for the last, see loss.py)
    assert deep_supervision_weights(len(POOLS)) == pytest.approx(list(weights), abs=1e-15)
    assert DeepSupervisionLoss(len(POOLS)).weights == pytest.approx(list(weights), abs=1e-15)


def test_train_steps_end_with_nnunets_weights():
    """nnU-Net's own train_step (SGD, clip to norm 12, zero_grad) against SegBook's, both on nnU-Net's loss
    (SegBook's loss is pinned to it in test_training.py), in float64: the first steps' gradients exceed the
    clip (an image scaled x100), the later ones not, so a different clip norm, momentum, Nesterov or weight
    decay changes the weights."""
    trainer = _nnunet_trainer()
    trainer.network = _net()
    trainer.optimizer, _ = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.grad_scaler = None
    net = _net()
    opt, _ = make_optimizer(net, trainer.initial_lr, 1000)
    g = torch.Generator().manual_seed(3)
    norms = []
    for _ in range(4):
        image = 100 * torch.randn(2, 1, 32, 32, 16, generator=g, dtype=torch.float64)
        target = torch.randint(0, 3, (2, 1, 32, 32, 16), generator=g)
        targets = [target[:, :, ::s, ::s, ::t] for s, t in ((1, 1), (2, 2), (4, 4))]
        trainer.train_step({"data": image, "target": copy.deepcopy(targets)})
        probe = copy.deepcopy(net)
        trainer.loss(probe(image), targets).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(probe.parameters(), float("inf"))))
        train_step(net, {"image": image, "target": targets}, trainer.loss, opt, None, torch.device("cpu"))
    assert min(norms) < 12 < max(norms), norms       # clipped and unclipped steps
    theirs = trainer.network.state_dict()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-10, atol=1e-13, msg=k)
    start = _net().state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in net.state_dict().items())
