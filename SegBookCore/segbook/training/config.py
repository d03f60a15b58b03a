"""The fine-tune configuration: one dataclass, saved as JSON beside every checkpoint.

Every field is one `segbook finetune` flag (`iterations_per_epoch` <-> `--iterations-per-epoch`).
`None` means "from the preset" (epochs, iterations) or "from the recipe" (lr: 1e-3 fine-tune, 1e-2
from scratch).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FinetuneConfig", "PRESETS"]

# epochs x iterations: `segbook` is the released recipe (1000 x 250); the others fit a workstation session.
# `adapt` is the short step of an annotate-train-correct loop: a few hundred iterations that continue from
# the model already in the output folder when it is of the same task (else from the base).
PRESETS = {
    "adapt": {"epochs": 5, "iterations_per_epoch": 50},
    "quick": {"epochs": 20, "iterations_per_epoch": 250},
    "standard": {"epochs": 150, "iterations_per_epoch": 250},
    "segbook": {"epochs": 1000, "iterations_per_epoch": 250},
}


@dataclass
class FinetuneConfig:
    dataset: str
    output: str
    base: str = "stunet-s-totalseg"
    preset: str = "standard"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_fraction: float = 0.2
    device: str = "auto"
    resume: bool = False
    progress: str = "bar"
    batch_size: int = 2
    num_workers: int | None = None        # data-loading processes; None: cores - 1, at most 4
    threads: int | None = None            # torch CPU threads of each training process; None: torch's default
    lr: float | None = None
    checkpoint: str | None = None         # the base's weights from this file instead of the download
    scratch: bool = False                 # random initialisation instead of the base's weights
    width: float = 1.0                    # channel multiplier on the base's dims (only with --scratch)
    plan: str = "data"                    # "data": spacing/patch/pools from the data; "base": the base's plan
    patch_size: list[int] | None = None   # zyx; None: planned from the data
    max_patch_voxels: int = 128 ** 3
    val_every: int = 5                    # epochs between validations (and always after the last)
    seed: int = 0
    name: str | None = None               # model name in model.json; default: the output folder's name
    prompts: bool = False                 # train with simulated clicks as extra input (training.prompting)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset '{self.preset}' ({', '.join(PRESETS)})")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("--val-fraction must be in [0, 1)")
        if self.plan not in ("data", "base"):
            raise ValueError(f"unknown plan '{self.plan}' (data or base)")
        if self.width != 1.0 and not self.scratch:
            raise ValueError("--width changes the network's shape: it needs --scratch")
        if self.checkpoint and self.scratch:
            raise ValueError("--checkpoint gives the base's weights, --scratch none: choose one")
        # numbers checked before any work: 0 epochs wrote an untrained model, --val-every 0 failed after the
        # first epoch, --batch-size 0 never produced a batch
        least = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 1, "num_workers": 0, "threads": 0,
                 "val_every": 1, "max_patch_voxels": 1}
        for field, lowest in least.items():
            value = getattr(self, field)
            if value is not None and value < lowest:
                raise ValueError(f"--{field.replace('_', '-')} must be at least {lowest}, got {value}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ValueError(f"--patch-size needs three sizes of at least 1 voxel, got {self.patch_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):     # 0: frozen, a probe
            raise ValueError(f"--lr must be a number of 0 or more, got {self.lr}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"--width must be a positive number, got {self.width}")

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.epochs is not None else PRESETS[self.preset]["epochs"]

    @property
    def iterations(self) -> int:
        its = self.iterations_per_epoch
        return its if its is not None else PRESETS[self.preset]["iterations_per_epoch"]

    @property
    def initial_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.scratch else 1e-3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        from ..atomic import write_json
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "FinetuneConfig":
        """InputError (one line naming the file) when it cannot be read or is not a saved configuration."""
        from ..errors import InputError
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, TypeError, AttributeError) as e:
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{path}: not a fine-tune configuration ({what}); start the fine-tune anew in "
                             f"another folder") from None
