"""Network runners: what computes a tile's logits for the Predictor's window loop.

A runner is called with a batch of tiles (N, C, pz, py, px) float32 on the CPU and returns their logits
(N, K, pz, py, px) on `runner.device`, in float32 or (reduced precision) float16/bfloat16; or, when
`runner.head` is a (weight (K, F), bias (K)) pair, the F features the network's final 1x1x1 convolution
turns into those logits (the Predictor applies the head as it accumulates: it is linear and per voxel, so
mirror flips and their average commute with it). `tile_logits` gives the logits either way. The returned
tensor is only valid until the next call (the OpenVINO runner hands out its output buffer). `max_batch` is
how many tiles one call may take; `synchronize()` waits for queued device work (for honest stage timings).

- `TorchRunner`: the PyTorch network (training, CUDA, and the CPU fallback); on the CPU a network the
  Predictor owns runs the channels-last layers of `cpu_fast`.
- `segbook.openvino_engine.OpenVINORunner`: the CPU engine, about 2x torch per tile (benchmarks/RESULTS.md).

`make_runner` picks the backend ("auto": OpenVINO on the CPU when it is installed, else torch) and the
precision ("auto": fp32 on the CPU, where equal output to nnU-Net is the contract; fp16 autocast on CUDA, as
nnU-Net). bf16 on the CPU is an explicit choice (its measured fidelity is in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .devices import mps_autocast_available, mps_available
from .errors import InputError
from .sliding_window import apply_head

__all__ = ["BACKENDS", "PRECISIONS", "TorchRunner", "make_runner", "resolve_backend", "resolve_precision",
           "openvino_available", "release_memory", "tile_logits", "is_out_of_memory"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:    # not installed, or no wheel for this platform: torch is the fallback
        return False
    return True


def release_memory() -> None:
    """Hand cached CUDA blocks back to the driver (the worker between requests: Slicer renders on the same GPU;
    the out-of-memory retries). PyTorch's caching allocator keeps freed blocks reserved for the process until
    empty_cache(), which can only return blocks no tensor references: callers drop their references first
    (outside any except block whose traceback pins them); gc.collect() breaks reference cycles that would."""
    import gc
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    elif mps_available():          # Apple's allocator caches freed blocks the same way
        torch.mps.empty_cache()


# What CUDA libraries raise when they cannot allocate: PyTorch's allocator raises OutOfMemoryError, cuBLAS and
# cuDNN a RuntimeError naming their status (nnU-Net's predictor catches RuntimeError for the same reason).
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the GPU ran out of memory (and a smaller batch or the CPU may succeed)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> fp16 on CUDA, fp32 elsewhere; fp16 is refused on the CPU (no fast CPU kernels for it)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("precision fp16 needs a CUDA device; on the CPU use fp32 (default) or bf16")
    if precision == "bf16" and device.type == "mps" and not mps_autocast_available():
        raise InputError(f"precision bf16 on Apple's MPS needs torch >= 2.5 (this is {torch.__version__}); "
                         f"use fp32")
    return precision


def resolve_backend(backend: str, device: torch.device, owned: bool = True) -> str:
    """"auto" -> openvino on the CPU for a network the Predictor owns when openvino imports, else torch.
    A network handed in (training validation) changes between calls, so auto keeps it on torch."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' ({', '.join(BACKENDS)})")
    if backend == "auto":
        return "openvino" if device.type == "cpu" and owned and openvino_available() else "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise InputError(f"backend openvino runs on the CPU, not on device '{device}' (use --backend torch)")
        if not openvino_available():
            raise InputError("backend openvino is not installed (pip install openvino), or use --backend torch")
    return backend


class TorchRunner:
    """The PyTorch network as a runner. `fast_cpu` swaps in the channels-last CPU layers (in place: only for
    a network the Predictor owns). Reduced precision runs under autocast, as nnU-Net does on CUDA."""

    name = "torch"
    head = None        # returns logits

    def __init__(self, net: nn.Module, device: torch.device, precision: str, fast_cpu: bool = False):
        self.device, self.precision = device, precision
        self.channels_last = fast_cpu and device.type == "cpu"
        if self.channels_last:
            from .cpu_fast import optimize_for_cpu
            net = optimize_for_cpu(net, inplace=True)
        self.network = net
        # The CPU gains nothing from batching tiles; on CUDA the mirror flips of a tile share a batch, which
        # the Predictor halves when the GPU runs out of memory.
        self.max_batch = 8 if device.type == "cuda" else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        dtype = _AUTOCAST.get(self.precision)
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with amp:
            return self.network(x)

    def synchronize(self) -> None:
        # PyTorch queues CUDA kernels and returns before they run (CUDA semantics: asynchronous execution), so
        # a host clock read after a forward measures the launches; synchronize() blocks until the queue drains.
        # GPU-only: not testable here. The cost is one pipeline stall per tile, small beside a tile's forward.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":    # Metal queues its kernels too
            torch.mps.synchronize()


def tile_logits(runner, x: torch.Tensor) -> torch.Tensor:
    """The logits of tiles `x` (N, C, pz, py, px) from `runner`, its head applied if it has one."""
    out = runner(x)
    return out if runner.head is None else torch.stack([apply_head(o, runner.head) for o in out])


def make_runner(net: nn.Module, device: torch.device, *, backend: str = "auto", precision: str = "auto",
                owned: bool = True, threads: int | None = None, reporter=None):
    """The runner for `net` (eval mode, deep supervision off while it runs) on `device`."""
    precision = resolve_precision(precision, device)
    backend = resolve_backend(backend, device, owned)
    if backend == "openvino":
        from .openvino_engine import OpenVINORunner
        return OpenVINORunner(net, precision=precision, threads=threads, reporter=reporter)
    return TorchRunner(net, device, precision, fast_cpu=owned)
