"""Device selection and per-device settings, shared by prediction and training.

`resolve_device` turns a user's `--device` (auto, cpu, cuda, cuda:N, mps) into a torch.device or a
one-line InputError; `autocast` is mixed precision where it helps and a plain no-op context elsewhere.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import InputError

__all__ = ["resolve_device", "autocast", "grad_scaler", "mps_available", "mps_autocast_available", "use_device",
           "local_rank"]


def mps_available() -> bool:
    """Apple's Metal backend (torch.backends.mps exists in every torch >= 1.12)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def local_rank() -> int:
    """This process's GPU under a launcher that starts one process per GPU (torchrun's LOCAL_RANK), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> a CUDA device, else Apple's MPS, else the CPU; "cpu", "cuda", "cuda:N", "mps" as given,
    checked against what this machine has (InputError, one line, otherwise).

    "auto" and a bare "cuda" become a definite device: cuda:LOCAL_RANK (torchrun: one GPU per process),
    cuda:0 otherwise. Never the current device: `use_device` sets that process-wide, so after a cuda:1
    request a later bare "cuda" would run on GPU 1 while the result says "cuda"."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        else:
            return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device '{device}' (auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' requested but CUDA is not available")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank())
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device '{device}' requested but this machine has {count} CUDA device"
                             f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif dev.type == "mps" and not mps_available():
        raise InputError(f"device '{device}' requested but Apple's MPS backend is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device '{device}' (auto, cpu, cuda, cuda:N or mps)")
    return dev


def use_device(dev: torch.device) -> None:
    """Make a CUDA device the current one: without it, `cuda:1` still gets a context on GPU 0, and
    pinned host buffers, `.cuda()` calls and NCCL pick GPU 0 (torch.cuda.current_device()).

    fp32 on CUDA is fp32: cuDNN runs float32 convolutions in TF32 (10-bit mantissa) by default on Ampere
    and later. Reduced precision runs under autocast (float16/bfloat16 convolutions), which this leaves as
    it was; only the float32 ones (`--precision fp32`) lose TF32."""
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        if dev.index is not None:
            torch.cuda.set_device(dev)


def mps_autocast_available() -> bool:
    """torch.autocast("mps") exists from torch 2.5 on; earlier versions raise for the device type."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def autocast(dev: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    """torch.autocast when enabled; a no-op context when not. `torch.autocast("mps", enabled=False)` raises
    on torch < 2.5 (MPS autocast did not exist yet), so a disabled autocast is never constructed."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.autocast(dev.type)


def grad_scaler(dev: torch.device):
    """The float16 loss scaler for CUDA training, None elsewhere (torch.amp.GradScaler is torch >= 2.3;
    torch 2.2 has it as torch.cuda.amp.GradScaler)."""
    if dev.type != "cuda":
        return None
    scaler = getattr(torch.amp, "GradScaler", None)
    return scaler("cuda") if scaler is not None else torch.cuda.amp.GradScaler()
