"""The OpenVINO CPU runner: the STU-Net converted once per model, patch shape and engine version.

Facts this code relies on (measured on 2 Zen 4 cores, STU-Net-S, 128^3 tile; see DESIGN.md "Engines"):
- OpenVINO's CPU plugin runs bf16 silently on CPUs with avx512_bf16 unless INFERENCE_PRECISION_HINT says
  f32, so the hint is always set, to the precision asked for (read back in the tests).
- `ov.save_model` compresses weights to fp16 by default: saved with compress_to_fp16=False.
- Tracing with a full-size example runs a full forward (~55 s at 128^3); a small example then a static
  `reshape` to the patch takes ~3 s. A static shape lets the plugin plan every layer; every tile is one patch.

The converted model is the network without its final 1x1x1 head: it returns the last decoder features (16
channels for STU-Net-S) and `runner.head` holds the head's weights, which the Predictor applies while it
accumulates, one z-slice of all classes at a time. The CPU plugin spends ~30 % of a 128^3 tile on the
head and on reordering its 105-channel output out of the blocked layout (1.4-1.5 s without vs 1.9-2.0 s with,
measured); the output buffer shrinks from 880 MB to 134 MB, and the logits are the same (the head's 16-term
sums round alike: equal to the last bit on the bench tile).

In fp32 the network's instance norms are converted as the decomposition `_ExactInstanceNorm`, not as the
plugin's MVN: on the blocked channel layout MVN keeps one running fp32 sum per channel over the whole
tile (2M voxels at 128^3), 2.8e-4 relative error after the first conv where PyTorch, which accumulates the
statistics in double, has 3e-7. Through the network that made the logits differ from PyTorch's by 1.4e-3
(PyTorch vs float64: 7e-6) and 0.04 % of a tile's labels. With short sums the logits are within 1.0e-5
of float64 and 99.9997 % of the labels equal PyTorch's, for ~0.06 s more per 128^3 tile (measured; the
convolutions were already as exact as PyTorch's). bf16 keeps MVN: its error is the bf16 convolutions',
and the decomposition costs 10 % of its tile.

The converted model lives under `cache_dir()/openvino/<key>/` beside the model folders; the key hashes the
weights, the architecture, the patch shape, the graph (fp32's norms or MVN) and the engine versions, so a
fine-tuned model or another OpenVINO gets its own conversion, and a second load only reads and compiles
(0.2-0.6 s). The cache holds derived data: an entry OpenVINO cannot read (a cut model.bin: "Incorrect weights
in bin file!", a garbled model.xml) is converted again with a warning, and a conversion that cannot be
written (a full disk) is used from memory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["OpenVINORunner", "ENGINE_VERSION", "cache_key", "network_head"]

log = logging.getLogger(__name__)

# Bump when the conversion below changes what is cached (2: the network body without its head; 3: fp32
# converts the instance norms as _ExactInstanceNorm; 4: its squares summed as row norms).
ENGINE_VERSION = 4
_HINT = {"fp32": "f32", "bf16": "bf16"}


def cache_key(net: nn.Module, patch, exact_norm: bool = True) -> str:
    """Hash of the weights, architecture, patch (z, y, x), graph (which norms) and engine versions."""
    import openvino as ov
    h = hashlib.sha256()
    cfg = net.config
    h.update(json.dumps({"arch": cfg.arch.__dict__, "patch": [int(p) for p in patch], "engine": ENGINE_VERSION,
                         "exact_norm": exact_norm,
                         "openvino": ov.__version__, "torch": torch.__version__.split("+")[0]},
                        sort_keys=True, default=str).encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _example_shape(net: nn.Module, patch) -> list[int]:
    """The smallest input every pooling stage can halve cleanly (twice over), capped at the patch."""
    pools = net.config.arch.pool_op_kernel_sizes
    prod = [math.prod(p[a] for p in pools) for a in range(3)]
    return [min(2 * f, int(s)) for f, s in zip(prod, patch)]


def _spatial_mean(t: torch.Tensor, squares: bool = False) -> torch.Tensor:
    """Mean over (z, y, x) of t (or of t squared) as three short sums: over x, then y, then z. The kinds
    alternate (sum, mean, sum) because OpenVINO merges reductions of one kind in a row (ReduceMerge) back
    into one long sum. Squares are summed over x as squared row L2 norms, a reduction that reads t itself
    (0.06 s per 128^3 tile less than writing t * t first)."""
    if squares:
        rows = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
        rows = rows * rows
    else:
        rows = t.sum(-1, keepdim=True)
    return rows.mean(-2, keepdim=True).sum(-3, keepdim=True) * (1.0 / (t.shape[-1] * t.shape[-3]))


class _ExactInstanceNorm(nn.Module):
    """nn.InstanceNorm3d written out for the converter (see the module docstring): two passes, the mean and
    then the mean square of the centred values, so that the variance is never a difference of large sums."""

    def __init__(self, norm: nn.InstanceNorm3d):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - _spatial_mean(x)
        scale = torch.rsqrt(_spatial_mean(xc, squares=True) + self.norm.eps) * self.norm.weight.view(1, -1, 1, 1, 1)
        return xc * scale + self.norm.bias.view(1, -1, 1, 1, 1)


def _graph_swaps(net: nn.Module, exact_norm: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, replacement) for what the converted graph computes otherwise: the final head is
    left out (applied while accumulating), and with exact_norm (fp32) STU-Net's instance norms (affine, batch
    statistics) use short sums."""
    swaps = [(net.seg_outputs, str(len(net.seg_outputs) - 1), nn.Identity())]
    if exact_norm:
        for parent in net.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.InstanceNorm3d) and child.affine and not child.track_running_stats:
                    swaps.append((parent, name, _ExactInstanceNorm(child)))
    return swaps


def _convert(net: nn.Module, patch, exact_norm: bool, folder: Path, reporter) -> Path:
    import openvino as ov
    message = f"converting {net.config.name} to OpenVINO for patch {list(patch)} (once per model; a few seconds)"
    log.info("%s into %s", message, folder)
    if reporter is not None:
        reporter.progress("convert", 0, 1, message=message)
    t0 = time.perf_counter()
    was_training, ds = net.training, getattr(net, "deep_supervision", None)
    swaps = _graph_swaps(net, exact_norm)
    originals = [(parent, name, getattr(parent, name)) for parent, name, _ in swaps]
    net.eval()
    if ds is not None:
        net.deep_supervision = False
    try:
        for parent, name, module in swaps:
            setattr(parent, name, module)
        c = net.config.arch.input_channels
        with torch.no_grad():
            model = ov.convert_model(net, example_input=torch.zeros(1, c, *_example_shape(net, patch)))
    finally:
        for parent, name, module in reversed(originals):
            setattr(parent, name, module)
        net.train(was_training)
        if ds is not None:
            net.deep_supervision = ds
    model.reshape([1, c, *[int(p) for p in patch]])
    if reporter is not None:
        reporter.progress("convert", 1, 1)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return model


def _save(model, folder: Path) -> bool:
    """Cache the converted model in `folder`, verified readable before it appears there; False (a warning)
    when it cannot be written: the cache only saves time, the run goes on with the model in memory."""
    import openvino as ov
    from .atomic import io_reason, fsync_path, short_write_reason
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        for name in ("model.xml", "model.bin"):
            fsync_path(tmp / name)
        try:    # the serializer may stop short without raising: read it back as a later run would
            ov.Core().read_model(str(tmp / "model.xml"))
        except RuntimeError as e:
            raise OSError(errno.EIO, short_write_reason(tmp / "model.bin", _last_line(e))) from None
        try:
            os.replace(tmp, folder)
        except OSError:          # another process converted it meanwhile: theirs is as good
            if not (folder / "model.xml").is_file():
                raise
        return True
    except OSError as e:
        log.warning("%s: cannot cache the converted model (%s); it is converted again next time", folder,
                    io_reason(e))
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _last_line(e: Exception) -> str:
    """OpenVINO's own words: the last non-empty line of its message that is not a source location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != ";"]
    return next((ln for ln in reversed(lines) if not ln.startswith(("Exception from", "Check "))),
                lines[-1] if lines else type(e).__name__)[:200]


def network_head(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The final 1x1x1 convolution's (weight (K, C), bias (K)), float32 copies."""
    conv = net.seg_outputs[-1]
    return (conv.weight.detach().float().reshape(conv.out_channels, conv.in_channels).clone(),
            conv.bias.detach().float().clone())


class OpenVINORunner:
    """A static-shape OpenVINO model of the network body for one patch, on the CPU, at fp32 or bf16; its
    output is the body's features, `head` turns them into logits (runners.py)."""

    name = "openvino"
    max_batch = 1
    device = torch.device("cpu")

    def __init__(self, net: nn.Module, *, precision: str = "fp32", threads: int | None = None, reporter=None,
                 cache_root: Path | None = None):
        if precision not in _HINT:
            raise ValueError(f"OpenVINO runner precision {precision} (fp32 or bf16)")
        self.network, self.precision, self.threads, self.reporter = net, precision, threads, reporter
        self.patch = tuple(int(p) for p in net.config.plan.patch_size)
        self.cache_root = cache_root
        self.folder = None         # the converted model's cache folder, once loaded
        self.converted = False     # whether loading had to convert (no cached conversion)
        self.compiled = self.request = self.head = None

    def load(self) -> None:
        """Convert (if not cached) and compile; done at the first tile, so that a bad input fails first."""
        import openvino as ov
        from .zoo import cache_dir
        if self.precision == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            # OpenVINO would quietly run fp32 anyway (AVX2-only CPUs, e.g. AMD before Zen 4): say so, and take
            # fp32's exact norms with it rather than bf16's MVN
            log.warning("--precision bf16: this CPU has no bf16 instructions; running fp32")
            self.precision = "fp32"
        exact_norm = self.precision == "fp32"      # bf16 keeps MVN (module docstring)
        key = cache_key(self.network, self.patch, exact_norm)
        self.folder = Path(self.cache_root or cache_dir()) / "openvino" / key
        self.head = network_head(self.network)     # taken with the key: the weights the conversion hashed
        xml = self.folder / "model.xml"
        config = {"INFERENCE_PRECISION_HINT": _HINT[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        t0 = time.perf_counter()
        self.converted, self.compiled = False, None
        if xml.is_file():
            try:
                with open(xml, "rb") as f:  # else OpenVINO tries its other frontends, which print to stderr
                    if not f.read(64).lstrip().startswith(b"<?xml"):
                        raise RuntimeError("model.xml is not XML")
                self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
            except (RuntimeError, OSError) as e:    # a cut model.bin, a garbled model.xml: derived data, made again
                log.warning("%s: the cached OpenVINO model is damaged (%s); converting it again", self.folder,
                            _last_line(e))
        elif self.folder.exists():
            log.warning("%s: the cached OpenVINO model is damaged (no model.xml); converting it again", self.folder)
        if self.compiled is None:
            shutil.rmtree(self.folder, ignore_errors=True)     # a damaged or partial entry would block the rename
            model = _convert(self.network, self.patch, exact_norm, self.folder, self.reporter)
            self.converted = True
            t0 = time.perf_counter()
            self.compiled = ov.Core().compile_model(str(xml) if _save(model, self.folder) else model, "CPU", config)
        log.info("OpenVINO %s model compiled in %.2f s (%s)", self.precision, time.perf_counter() - t0,
                 self.folder)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.patch or x.shape[0] != 1:
            raise ValueError(f"OpenVINO runner takes one {self.patch} tile, got {tuple(x.shape)}")
        if self.request is None:
            self.load()
        self.request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        # The request's own output buffer (no copy): valid until the next call, as the runner contract says.
        return torch.from_numpy(self.request.get_output_tensor(0).data)

    def synchronize(self) -> None:
        """infer() returns when the work is done."""
