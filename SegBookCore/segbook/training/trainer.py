"""The fine-tune loop: a short sequence of steps over small objects (data, loss, optimiser, checkpoint IO).

    finetune(config) -> result dict
      1. read and check the dataset; split off validation cases (kept out of training)
      2. plan (spacing, patch, pools) from the data; preprocess and cache every training case
      3. build the network from the base (heads re-initialised, channels adapted), optimiser, schedule
      4. resume from MODEL_DIR/training/checkpoint.pt if asked
      5. per iteration: a batch from the loader, forward, Dice+CE over the deep-supervision outputs,
         backward, clip, step; per epoch: LR step, checkpoint, curves, model folder, validation

Output: MODEL_DIR/weights.safetensors + model.json (a model folder `segbook predict` uses) and
MODEL_DIR/training/ (checkpoint.pt, config.json, split.json, commands.txt, log.jsonl, curves.png, cache/).
Steps 1-2 and the model folder's description are `run_setup`'s; this module runs the rest.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..dataset import read_dataset
from ..devices import autocast, grad_scaler
from ..events import Reporter
from ..planning import deep_supervision_scales
from ..zoo import get_config, save_model_folder
from ..atomic import write_json
from ..checkpoint import load_checkpoint
from ..lockfile import FolderLock
from .config import FinetuneConfig
from .curves import append_jsonl, plot_curves
from .distributed import Dist, setup, teardown
from .eta import Estimate
from .loss import DeepSupervisionLoss
from .model_init import build_network, fetch_base
from .prompting import PromptedLoss, PromptSimulator, boost_prompt_weights
from ..prompts import PromptSpec
from .run_setup import (TrainingError, split_cases, _adapt_start, _check_and_split, _model_config, _plan,
                        _prepare_config, _record_command)
from .sampling import BatchDataset, make_loader
from .state import load_training_state, save_training_state
from .stop import StopRequest

__all__ = ["finetune", "TrainingError", "train_step", "make_optimizer", "split_cases"]

log = logging.getLogger(__name__)


def make_optimizer(net, lr: float, epochs: int):
    """SGD (Nesterov, momentum 0.99, weight decay 3e-5) and poly decay lr * (1 - epoch/epochs)^0.9."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: max(1 - e / epochs, 0.0) ** 0.9)
    return opt, sched


# fp16 (CUDA, with a GradScaler): a step whose loss is not finite is skipped and the loss scale lowered, as
# GradScaler does for overflowing gradients and nnU-Net's trainer relies on; only this many in a row stop
# the run (a lower scale no longer helps: the weights or the data are the problem)
MAX_SKIPPED_STEPS = 5


def train_step(net, batch, loss_fn, opt, scaler, device, d: Dist = Dist()) -> float:
    """One optimisation step on a batch from BatchDataset; returns the loss. If the loss is not finite on
    any rank, no rank steps and this returns NaN (this rank's own value where it is the bad one): the
    caller decides. Without a scaler no rank runs backward (a rank alone in backward would wait forever
    for DDP's gradient all-reduce); with one every rank does, and the scaler skips the step and lowers its
    scale, as on an overflow."""
    image = batch["image"].to(device, non_blocking=True)
    targets = [t.to(device, non_blocking=True) for t in batch["target"]]
    extra = tuple(batch[k].to(device) for k in ("prompt_class", "prompt_focus") if k in batch)  # training.prompting
    opt.zero_grad(set_to_none=True)
    with autocast(device, enabled=device.type == "cuda"):
        outputs = net(image)
    loss = loss_fn(outputs, targets, *extra)
    value = float(loss.detach().item())
    finite = not d.broadcast_flag(not math.isfinite(value))
    if not finite and scaler is None:
        return value if not math.isfinite(value) else math.nan
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        if not finite:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            return value if not math.isfinite(value) else math.nan
        scaler.step(opt)       # skips the step itself when a gradient overflowed
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    return value


def finetune(cfg: FinetuneConfig, reporter: Reporter | None = None, command: str | None = None,
             stop_file: str | None = None) -> dict:
    """Run (or resume) a fine-tune; returns {"model_dir", "epochs_done", "stopped", "validation"}.

    `command`: the command line to record in the model's provenance (the CLI passes it). `stop_file`: stop
    as on SIGTERM (checkpoint saved, resumable) once this file exists. A second fine-tune into the same
    output folder is refused (FolderBusy naming the first one's pid) while the first runs; under torchrun
    rank 0 holds the lock for all."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _finetune(cfg, reporter, command, stop_file)
    with FolderLock(Path(cfg.output) / "training" / "lock", what="a fine-tune writes it"):
        return _finetune(cfg, reporter, command, stop_file)


def _finetune(cfg, reporter, command, stop_file) -> dict:
    reporter = reporter or Reporter()
    out = Path(cfg.output)
    train_dir = out / "training"
    cfg = _prepare_config(cfg, train_dir)
    d, device = setup(cfg.device)
    if not d.is_main:   # one rank reports: the Slicer panel reads one JSON stream, not N interleaved ones
        reporter = Reporter()
    if device.type == "cuda":
        # the patch shape is fixed: cuDNN's per-shape algorithm search runs once and pays off (nnU-Net
        # sets it too); torch caches the choice per input shape, so validation's fixed tiles gain as well
        torch.backends.cudnn.benchmark = True
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.enabled and device.type == "cpu":
        # ranks share the cores: oversubscribed OpenMP threads spin against each other (10x slower, measured)
        import os
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world_size))
    try:
        return _run(cfg, d, device, out, train_dir, reporter, command, stop_file)
    finally:
        teardown(d)


def _resume(ckpt: Path, net, opt, sched, scaler, its: int) -> tuple[int, int, list]:
    """(epoch, iteration within it, history) to continue from."""
    st = load_training_state(ckpt, network=net, optimizer=opt, scheduler=sched, scaler=scaler)
    epoch, it = st["epoch"], st["iteration"]
    if it >= its:  # saved at the end of an epoch
        epoch, it = epoch + 1, 0
    # the schedule's formula is not part of its state: with a longer --epochs the LR follows the new one
    for group, base_lr in zip(opt.param_groups, sched.base_lrs):
        group["lr"] = base_lr * sched.lr_lambdas[0](sched.last_epoch)
    log.info("resuming at epoch %d iteration %d", epoch + 1, it)
    return epoch, it, st["history"]


def _run(cfg, d, device, out, train_dir, reporter, command, stop_file=None) -> dict:
    # 1. data: read, check, split
    ds = read_dataset(cfg.dataset)
    if cfg.preset == "adapt" and not cfg.resume:
        _adapt_start(cfg, ds, out, d)
    base_config = get_config(cfg.base)
    split = _check_and_split(cfg, ds, base_config, train_dir)
    if d.is_main:
        train_dir.mkdir(parents=True, exist_ok=True)
    d.barrier()
    by_name = {c.name: c for c in ds.cases}
    train_cases, val_cases = [by_name[n] for n in split["train"]], [by_name[n] for n in split["validation"]]
    # 2. the base's weights (before the preprocessing, which can take minutes: an offline machine without
    # them is told at once), then plan and cache
    weights = None
    if cfg.checkpoint:     # read once: a file that is missing or not a checkpoint is said before any work
        weights = load_checkpoint(cfg.checkpoint)
    elif not cfg.scratch:
        fetch_base(cfg.base, d)
    plan, pools, cached = _plan(cfg, ds, train_cases, base_config, train_dir / "cache", reporter, d)
    # 3. network, optimiser, loss
    torch.manual_seed(cfg.seed)  # the fresh heads (or the whole network from scratch) start reproducibly
    net, base_config, init_info = build_network(cfg.base, ds.class_names, len(ds.cases[0].images), pools,
                                                scratch=cfg.scratch, width=cfg.width, prompts=cfg.prompts,
                                                checkpoint=cfg.checkpoint, weights=weights)
    del weights
    commands = _record_command(train_dir, command, cfg.resume) if d.is_main else {}
    model_config = _model_config(cfg, out, net, plan, base_config, init_info, ds, split, commands, d.world_size)
    net.to(device)
    epochs, its = cfg.total_epochs, cfg.iterations
    opt, sched = make_optimizer(net, cfg.initial_lr, epochs)
    scaler = grad_scaler(device)
    model = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else net
    loss_fn = DeepSupervisionLoss(len(pools), ignore_label=ds.ignore_label)
    prompter = None
    if net.prompts:     # clicks simulated on each batch, a binary loss for the prompted structure
        boost_prompt_weights(net, len(ds.cases[0].images))
        prompter = PromptSimulator(PromptSpec(**net.prompts), cfg.seed, ds.ignore_label)
        loss_fn = PromptedLoss(lambda ignore: DeepSupervisionLoss(len(pools), ignore_label=ignore),
                               ds.ignore_label)
    validator = _load_validator() if val_cases else None
    # 4. resume
    ckpt = train_dir / "checkpoint.pt"
    start_epoch, start_it, history = 0, 0, []
    if cfg.resume:
        start_epoch, start_it, history = _resume(ckpt, net, opt, sched, scaler, its)
    elif d.is_main:
        cfg.save(train_dir / "config.json")
        write_json(train_dir / "split.json", split)
    dataset = BatchDataset(cached, plan.patch_size, deep_supervision_scales(pools), cfg.batch_size,
                           seed=cfg.seed, rank=d.rank, mirror_axes=plan.mirror_axes, world_size=d.world_size)
    total = epochs * its
    loader = iter(make_loader(dataset, start_epoch * its + start_it, total, cfg.num_workers, device))
    eta = Estimate(total - start_epoch * its - start_it, str(device))
    last_val = next((h["validation"] for h in reversed(history) if h.get("validation")), None)

    def save_state(epoch, iteration):
        save_training_state(ckpt, network=net, optimizer=opt, scheduler=sched, scaler=scaler,
                            epoch=epoch, iteration=iteration, history=history)

    def save_model():
        if last_val is not None:
            model_config.provenance["validation"] = {k: v for k, v in last_val.items() if k != "cases"}
        model_config.provenance["epochs_done"] = len(history)
        save_model_folder(out, model_config, net.state_dict())

    # 5. the loop
    result = {"model_dir": str(out), "stopped": False}
    skipped = 0    # non-finite steps in a row
    with StopRequest(stop_file) as stop:
        for epoch in range(start_epoch, epochs):
            net.train()
            t0, losses = time.monotonic(), []
            if epoch == start_epoch and start_it and history and history[-1].get("partial"):
                losses = _partial_losses(history.pop()["losses"], d.rank)
            for it in range(start_it if epoch == start_epoch else 0, its):
                batch = next(loader)
                if prompter is not None:
                    batch = prompter(net, batch, epoch * its + it)
                loss = train_step(model, batch, loss_fn, opt, scaler, device, d)
                if math.isfinite(loss):
                    skipped = 0
                    losses.append(loss)
                else:
                    skipped += 1
                    if scaler is None or skipped >= MAX_SKIPPED_STEPS:
                        good = f"{ckpt} (after epoch {len(history)})" if ckpt.is_file() else "none yet"
                        raise TrainingError(
                            f"loss became {loss} at epoch {epoch + 1} iteration {it + 1}"
                            f"{f' ({skipped} steps in a row)' if skipped > 1 else ''}; training stopped; last "
                            f"good checkpoint kept: {good}. Lower --lr or check the data")
                    log.warning("loss %s at epoch %d iteration %d: step skipped, loss scale lowered to %g",
                                loss, epoch + 1, it + 1, scaler.get_scale())
                estimate = eta.step()
                if estimate is not None:   # how long this run takes here, said once early on
                    log.info("%s", estimate["message"])
                    reporter.emit({"event": "estimate", **estimate})
                reporter.progress("train", epoch * its + it + 1, total, epoch=epoch + 1)
                if d.broadcast_flag(stop.requested()):
                    every_rank = d.gather(losses)   # [rank 0's, rank 1's, ...]
                    if d.is_main:   # the partial epoch's losses travel in the checkpoint, not in the log
                        history.append({"epoch": epoch + 1, "partial": True, "losses": every_rank})
                        save_state(epoch, it + 1)
                        history.pop()
                    d.barrier()
                    log.warning("stopped by %s at epoch %d iteration %d; checkpoint saved",
                                stop.reason(), epoch + 1, it + 1)
                    result.update(stopped=True, signal=stop.signum or signal.SIGTERM, epoch=epoch + 1,
                                  iteration=it + 1, epochs_done=len(history))
                    return result
            if d.enabled:
                log.info("rank %d epoch %d train_loss %r", d.rank, epoch + 1, float(np.mean(losses)))
            record = {"epoch": epoch + 1, "train_loss": d.mean(float(np.mean(losses))), "lr": opt.param_groups[0]["lr"],
                      "seconds": round(time.monotonic() - t0, 2)}
            sched.step()
            if val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == epochs):
                last_val = _validate(validator, net, model_config, val_cases, device, reporter, d, ds.ignore_label)
                record["val_dice"] = last_val["dice"] if last_val else None
                record["validation"] = last_val
            history.append(record)
            if d.is_main:
                save_state(epoch, its)
                append_jsonl(train_dir / "log.jsonl", {k: v for k, v in record.items() if k != "validation"})
                plot_curves(history, train_dir / "curves.png")
                save_model()
            # flat numbers for the progress protocol (the Slicer chart plots the losses and the mean Dice)
            flat = {k: v for k, v in record.items() if k not in ("validation", "val_dice")}
            if record.get("val_dice"):
                flat["val_mean_dice"] = last_val["mean_dice"]
                flat.update({f"val_dice_{name}": v for name, v in record["val_dice"].items()})
            reporter.metric(**flat)
            d.barrier()
    result.update(epochs_done=len(history), validation=last_val)
    return result


def _partial_losses(saved: list, rank: int) -> list:
    """This rank's losses of a stopped epoch: saved per rank ([[...], [...]]; a flat list: one process)."""
    per_rank = saved if saved and isinstance(saved[0], list) else [saved]
    return list(per_rank[rank]) if rank < len(per_rank) else []


def _load_validator():
    """The validation module, imported once at the start so a long run uses the code it started with."""
    try:
        from . import validate
        return validate
    except ImportError as e:  # the predictor module is missing from this installation
        log.warning("no validation: %s", e)
        return None


def _validate(validator, net, model_config, val_cases, device, reporter, d: Dist, ignore_label=None):
    """Each rank predicts its share of the validation cases (nnU-Net shards validation too); every rank
    gets the merged result."""
    if validator is None:
        return None
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    mine = d.checked(lambda: validator.predict_cases(state, model_config, d.shard(val_cases), device=device,
                                                     reporter=reporter, ignore_label=ignore_label), "validation")
    merged = {k: v for part in d.gather(mine) for k, v in part.items()}
    return validator.summarise({c.name: merged[c.name] for c in val_cases}, model_config)
