"""The record that travels with every set of weights: architecture, plan, classes, provenance.

Saved as `model.json` beside `weights.safetensors` (a model folder, see DESIGN.md). Axis order of every
per-axis list is SimpleITK's array order (z, y, x).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

__all__ = ["Arch", "Plan", "ModelConfig"]


@dataclass
class Arch:
    input_channels: int
    num_classes: int
    dims: list[int]
    depth: list[int]
    pool_op_kernel_sizes: list[list[int]]


@dataclass
class Plan:
    spacing: list[float]                    # target spacing (z, y, x) in mm
    patch_size: list[int]                   # (z, y, x) voxels
    normalization: str = "zscore"           # "zscore" (nnU-Net "nonCT") or "ct"
    # for "ct": clip to [p005, p995] of the training foreground, then (x - mean) / std
    ct_intensities: dict | None = None
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    crop_to_nonzero: bool = True

    def __post_init__(self):
        if self.normalization not in ("zscore", "ct"):
            raise ValueError(f"unknown normalization '{self.normalization}' (zscore or ct)")
        if self.normalization == "ct" and not self.ct_intensities:
            raise ValueError("ct normalization needs ct_intensities (mean, std, percentile_00_5, percentile_99_5)")


@dataclass
class ModelConfig:
    """Everything needed to rebuild, preprocess for, and name the outputs of one set of weights."""
    name: str
    arch: Arch
    plan: Plan
    class_names: list[str]                  # index = label value; 0 is background
    colors: list[list[int]] | None = None   # RGB 0-255 per class, background included
    description: str = ""
    hub_repo: str | None = None
    hub_filename: str | None = None
    hub_revision: str | None = None
    license: str | None = None
    size: str | None = None                 # "S", "B", "L", "H" or None for a custom width
    provenance: dict = field(default_factory=dict)
    # a model trained with prompts: segbook.prompts.PromptSpec as a dict ({"channels": [...], "radius": r});
    # its prompt channels follow the image's in arch.input_channels
    prompts: dict | None = None

    def __post_init__(self):
        if isinstance(self.arch, dict):
            self.arch = Arch(**self.arch)
        if isinstance(self.plan, dict):
            self.plan = Plan(**self.plan)
        if len(self.class_names) != self.arch.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                             f"{self.arch.num_classes} network outputs")

    @property
    def image_channels(self) -> int:
        """Input channels of the image itself (the network's minus the prompt channels)."""
        return self.arch.input_channels - (len(self.prompts["channels"]) if self.prompts else 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Atomically, read back before it replaces the previous file (atomic.WriteError when it cannot)."""
        from .atomic import write_json
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        """InputError (one line naming the file) for a missing, cut, garbled or incomplete model.json."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict):
                raise ValueError(f"holds a {type(d).__name__}, not an object")
            return cls.from_dict(d)
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"{path}: not a valid model.json ({what}); copy the model folder again, "
                             f"or fine-tune or download it again") from None
