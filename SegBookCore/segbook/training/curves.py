"""Training curves: one JSON line per epoch (`log.jsonl`) and a PNG of losses and validation Dice."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from ..atomic import append_text, atomic_write, short_write_reason

__all__ = ["append_jsonl", "plot_curves"]

log = logging.getLogger(__name__)


def append_jsonl(path, record: dict) -> None:
    """One line, whole or not at all (atomic.append_text)."""
    append_text(path, json.dumps(record, default=float) + "\n")


def plot_curves(history: list[dict], path) -> None:
    """history: per-epoch dicts with "epoch", "train_loss", "lr" and, when validated, "val_dice"
    ({class: Dice}). Written atomically; skipped with a log line when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no curves PNG")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (Dice+CE)", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    val = [h for h in history if h.get("val_dice")]
    for name in (val[0]["val_dice"] if val else {}):
        ax2.plot([h["epoch"] for h in val], [h["val_dice"][name] for h in val], marker="o", label=f"val Dice {name}")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
    fig.tight_layout()
    try:
        with atomic_write(path, verify=_verify_png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)


def _verify_png(tmp: Path) -> None:
    with open(tmp, "rb") as f:
        f.seek(max(os.path.getsize(tmp) - 12, 0))
        if b"IEND" not in f.read():     # the PNG's last chunk
            raise OSError(errno.EIO, short_write_reason(tmp, "incomplete PNG"))
