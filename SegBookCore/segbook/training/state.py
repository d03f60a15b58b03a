"""Training state on disk: everything `--resume` needs to continue exactly where a run stopped.

`MODEL_DIR/training/checkpoint.pt` holds the network weights, optimiser, LR scheduler, AMP scaler, the
RNG states (Python, numpy, torch CPU and CUDA), the epoch and iteration reached and the metric history.
It is written to a temporary name, verified complete and renamed, so a crash, a second Ctrl-C or a full disk
never leaves a broken checkpoint: the previous one stays until the new one is complete, and a run that cannot
write its checkpoint stops with one line, resumable from the last good one. The file is our own and is read with
`weights_only=True` (no code can run from it).
"""
from __future__ import annotations

import errno
import logging
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import WriteError, atomic_write, short_write_reason
from ..checkpoint import CheckpointError

__all__ = ["save_training_state", "load_training_state", "rng_states", "set_rng_states"]

log = logging.getLogger(__name__)


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    import ast
    py = ast.literal_eval(states["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    saved = states.get("cuda") or []
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # one state per GPU seen at save time; torch.cuda.set_rng_state_all would index GPUs this machine
    # lacks (a resume on fewer GPUs, or on the CPU): restore those that exist, the others start afresh
    for index, state in enumerate(saved[:here]):
        torch.cuda.set_rng_state(state, index)
    if len(saved) > here:
        log.info("resume: %d CUDA generator states saved, %d GPUs here; the rest are not restored",
                 len(saved), here)


def save_training_state(path, *, network: torch.nn.Module, optimizer, scheduler, scaler, epoch: int,
                        iteration: int, history: list, extra: dict | None = None) -> Path:
    """Atomically write the state reached after `iteration` iterations of `epoch` (0-based)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_states(),
        "epoch": int(epoch),
        "iteration": int(iteration),
        "history": history,
        "extra": extra or {},
    }
    try:
        with atomic_write(path, verify=_verify_checkpoint, suffix=".pt") as tmp:
            with open(tmp, "wb") as f:
                try:
                    torch.save(state, f)
                except RuntimeError as e:   # torch's zip writer reports a failed write as "unexpected pos ..."
                    raise OSError(errno.EIO, short_write_reason(tmp, str(e).strip().splitlines()[-1][:200])) from None
    except WriteError as e:
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was saved"
        raise WriteError(f"{e}; {kept}: free space, then continue with --resume") from None
    return path


def _verify_checkpoint(tmp: Path) -> None:
    """torch.save writes a zip: its central directory, the last thing written, must be there and list the
    records (a cut file has none); the data is not read back."""
    try:
        with zipfile.ZipFile(tmp) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError) as e:
        raise OSError(errno.EIO, short_write_reason(tmp, f"incomplete checkpoint ({e})")) from None


def load_training_state(path, *, network, optimizer, scheduler, scaler, map_location="cpu") -> dict:
    """Restore everything saved by save_training_state; returns the dict (epoch, iteration, history).
    CheckpointError (one line naming the file) when it is damaged."""
    try:
        state = torch.load(Path(path), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: damaged training checkpoint ({what}); start the fine-tune anew in another "
                              f"folder") from None
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state
