"""The `adapt` preset's starting point: the model already in the output folder, when it is of the same task.

An annotate-train-correct loop runs one command per round, `segbook finetune CASES -o MODEL --preset adapt`:
the first round starts from `--base`; each later round from the model the round before wrote into MODEL
(same class names and input channels: its heads are kept), so a round costs a few hundred iterations
instead of a fine-tune from the base. That model is copied to MODEL/training/previous/ first, because the
new run replaces MODEL's own files; the old run's checkpoint and log make way for the new run's.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import ModelConfig
from ..zoo import WEIGHTS

__all__ = ["previous_model", "PREVIOUS"]

log = logging.getLogger(__name__)

PREVIOUS = "previous"           # under MODEL/training/
_OLD_RUN = ("checkpoint.pt", "log.jsonl", "curves.png", "split.json")


def previous_model(out: Path, class_names: list[str], channels: int) -> Path | None:
    """Copy MODEL's model of the same task to MODEL/training/previous and clear the old run's state;
    returns that folder, or None when MODEL holds no model or one of another task (left untouched)."""
    train_dir = out / "training"
    target = train_dir / PREVIOUS
    shutil.rmtree(target, ignore_errors=True)         # a stale copy of an older round is never used
    if not ((out / "model.json").is_file() and (out / WEIGHTS).is_file()):
        return None
    config = ModelConfig.load(out / "model.json")
    if list(config.class_names) != list(class_names) or config.arch.input_channels != channels:
        log.info("%s holds a model of another task (%s); not continuing from it", out, ", ".join(config.class_names))
        return None
    tmp = train_dir / (PREVIOUS + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.json", WEIGHTS):
        shutil.copy2(out / name, tmp / name)
    tmp.rename(target)
    for name in _OLD_RUN:
        (train_dir / name).unlink(missing_ok=True)
    log.info("continuing from the previous model in %s", out)
    return target
