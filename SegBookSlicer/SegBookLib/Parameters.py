"""The settings of one Segment run and one Fine-tune run, as plain dataclasses.

They map one-to-one onto the worker request and the `segbook finetune` flags, and are stored on the
module's parameter node (a vtkMRMLScriptedModuleNode) so that they are saved with the scene.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")   # segbook.runners: auto = fp32 on the CPU, fp16 on CUDA
PRESETS = ("quick", "standard", "segbook", "adapt")


@dataclass
class SegmentParameters:
    model: str = "stunet-s-totalseg"        # registered/bundled name or a model folder
    checkpoint: Optional[str] = None        # a checkpoint file downloaded by hand (offline use)
    device: str = "auto"
    tta: bool = False
    classes: list = field(default_factory=list)   # structure subset by name; empty = all
    statistics: bool = True                 # per-structure volume/intensity table after Segment
    precision: str = "auto"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not '{self.device}'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")

    def request(self, requestId: str, inputPath: str, outputPath: str, roiLps=None) -> dict:
        """The worker's predict request (see segbook.worker)."""
        return {"id": requestId, "command": "predict", "input": str(inputPath), "output": str(outputPath),
                "model": self.model, "checkpoint": self.checkpoint, "device": self.device, "tta": self.tta,
                "classes": list(self.classes) or None, "roi_lps": roiLps, "statistics": bool(self.statistics),
                "precision": self.precision}


@dataclass
class FineTuneParameters:
    base: str = "stunet-s-totalseg"
    outputName: str = "my-model"
    preset: str = "quick"
    device: str = "auto"
    epochs: Optional[int] = None
    iterationsPerEpoch: Optional[int] = None
    valFraction: float = 0.2
    extraArguments: list = field(default_factory=list)  # further `segbook finetune` flags, passed as given

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not '{self.preset}'")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not '{self.device}'")

    def arguments(self, datasetPath: str, modelDir: str, resume: bool = False) -> list:
        """`segbook finetune` arguments, after the program name."""
        args = ["finetune", str(datasetPath), "-o", str(modelDir), "--base", self.base, "--preset", self.preset,
                "--device", self.device, "--val-fraction", str(self.valFraction), "--progress", "json"]
        if self.epochs:
            args += ["--epochs", str(int(self.epochs))]
        if self.iterationsPerEpoch:
            args += ["--iterations-per-epoch", str(int(self.iterationsPerEpoch))]
        if resume:
            args.append("--resume")
        return args + [str(a) for a in self.extraArguments]


def saveToNode(params, node, prefix: str) -> None:
    """Store a parameters dataclass on a MRML node as one JSON attribute (saved with the scene)."""
    node.SetAttribute(f"SegBook.{prefix}", json.dumps(dataclasses.asdict(params)))


def loadFromNode(cls, node, prefix: str):
    """The parameters stored by saveToNode, or the defaults; unknown keys are ignored."""
    text = node.GetAttribute(f"SegBook.{prefix}") if node is not None else None
    if not text:
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})
    except (ValueError, TypeError):
        return cls()
