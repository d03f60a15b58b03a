"""The Predictor: load a model once, segment many arrays or files (nnU-Net-faithful, bounded memory).

    p = Predictor("stunet-s-totalseg", device="auto", tta=False)
    labels = p.predict_array(image, spacing)          # image (C, z, y, x) or (z, y, x), spacing (z, y, x) mm
    sidecar = p.predict_file("ct.nii.gz", "ct_seg.nii.gz")

Pipeline: `preprocess` (crop, normalise, resample to the plan), zero-pad to the patch, sliding window
(`sliding_window`: nnU-Net's tiles, Gaussian weights, optional mirror TTA), accumulation of weighted logits
in float16 (as nnU-Net) in a window of one patch depth along z, and `export.SlabExporter` turning each
finished z-slab into labels on the original grid. Peak memory is one patch-deep slab of class logits
instead of the whole volume at full resolution.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .devices import resolve_device, use_device
from .errors import InputError
from .events import Reporter
from .export import SlabExporter
from . import dicom_seg
from .io import DICOM_SEG_SUFFIX, atomic_path, check_writable, output_format, read_image, sidecar_path, write_labels
from .labels import class_table
from .statistics import csv_path, label_statistics, write_csv
from .preprocess import preprocess, separate_axis
from .runners import is_out_of_memory, make_runner, release_memory
from .sliding_window import (accumulate, compute_steps, gaussian_weights, mirror_axes_sets, padding_for_patch,
                             shift_left)

__all__ = ["Predictor", "resolve_device", "ROI_CONTEXT"]

log = logging.getLogger(__name__)

# An ROI is grown by this fraction of the patch (in mm, at the plan spacing) on each side, clipped to the
# image, so that the network sees context around the box; labels are kept inside the box only.
ROI_CONTEXT = 0.25
# Logits values (classes x voxels) divided and handed to the exporter at once: 32 M floats = 128 MB.
_FINALIZE_VALUES = 2 ** 25


def _cpu_count() -> int:
    """This process's share of the cores: under torchrun, the ranks on one machine split them."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@contextlib.contextmanager
def _inference_state(net: nn.Module, threads: int | None):
    """eval mode, deep supervision off and (on the CPU) all cores, restored afterwards so that a training
    network handed in for validation comes back as it was."""
    was_training, ds = net.training, getattr(net, "deep_supervision", None)
    old_threads = torch.get_num_threads()
    net.eval()
    if ds is not None:
        net.deep_supervision = False
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(old_threads)
        net.train(was_training)
        if ds is not None:
            net.deep_supervision = ds


class Predictor:
    """Segments with one model. `model`: a registry name, a model folder, or an STU-Net module with a
    `.config` (ModelConfig) attached; `checkpoint`: weights file for a named model (released format ok).
    A module handed in is used as is (its device is kept unless `device` says otherwise)."""

    def __init__(self, model, *, checkpoint=None, device="auto", tta: bool = False, step: float = 0.5,
                 reporter: Reporter | None = None, backend: str = "auto", precision: str = "auto"):
        if not 0 < step <= 1:
            raise InputError(f"step must be in (0, 1], got {step}")
        if isinstance(model, nn.Module):
            if not hasattr(model, "config"):
                raise ValueError("a network handed to Predictor needs its ModelConfig attached as `.config`")
            net, self.owns_network = model, False
            params = next(model.parameters(), None)
            if str(device) == "auto" and params is not None:
                device = params.device      # never move a caller's (training) network behind its back
        else:
            from .zoo import create_model
            net = create_model(model, pretrained=checkpoint is None, checkpoint=checkpoint)
            self.owns_network = True
        self.network, self.config = net, net.config
        self.device = resolve_device(device)
        use_device(self.device)
        if self.device.type == "cuda":
            # every tile has the patch's shape: cuDNN's benchmark picks each layer's fastest algorithm once
            # per input shape and reuses it (as nnU-Net's predictor does)
            torch.backends.cudnn.benchmark = True
        self.network.to(self.device)
        self.tta, self.step = bool(tta), float(step)
        self.reporter = reporter or Reporter()
        self.checkpoint = str(checkpoint) if checkpoint else None
        # What computes a tile's logits (runners.py); a network handed in (training) stays on torch, as is.
        self.runner = make_runner(net, self.device, backend=backend, precision=precision,
                                  owned=self.owns_network, threads=_cpu_count(), reporter=self.reporter)
        self._batch = self.runner.max_batch      # tiles per runner call; halved when CUDA runs out of memory

    # ---------------------------------------------------------------- arrays
    def label_values(self, classes) -> np.ndarray:
        names = list(self.config.class_names)
        keep = range(len(names)) if not classes else [self._class_index(c) for c in classes]
        table = np.zeros(len(names), dtype=np.int64)
        for i in keep:
            table[i] = i
        return table

    def _class_index(self, name: str) -> int:
        if name not in self.config.class_names[1:]:
            close = [n for n in self.config.class_names[1:] if name.lower() in n.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"class '{name}' is not an output of model {self.config.name}{hint}")
        return self.config.class_names.index(name)

    def _label_dtype(self):
        return np.uint8 if len(self.config.class_names) <= 256 else np.uint16

    def predict_array(self, image, spacing, *, roi=None, classes=None) -> np.ndarray:
        """Segment `image` (C, z, y, x) or (z, y, x), voxel spacing (z, y, x) in mm.

        roi: voxel box (z0, y0, x0, z1, y1, x1), end exclusive, or None; only that box is predicted (with
        context around it) and everything outside is background. classes: names to keep, others -> 0.
        Returns a (z, y, x) uint8 (uint16 above 255 classes) label map on the input grid.
        """
        image, spacing = self.check_image(image, spacing)
        self._batch = self.runner.max_batch     # a batch halved for an earlier image's out-of-memory may fit now
        label_of_channel = self.label_values(classes)
        shape = image.shape[1:]
        out = np.zeros(shape, dtype=self._label_dtype())
        if roi is None:
            self._segment(image, spacing, label_of_channel, out)
            return out
        box = self._check_roi(roi, shape)
        margin = [math.ceil(ROI_CONTEXT * p * t / s) for p, t, s in
                  zip(self.config.plan.patch_size, self.config.plan.spacing, spacing)]
        ctx = [(max(box[a] - margin[a], 0), min(box[a + 3] + margin[a], shape[a])) for a in range(3)]
        crop = tuple(slice(a, b) for a, b in ctx)
        part = np.zeros(tuple(b - a for a, b in ctx), dtype=out.dtype)
        # only the box's slices are exported (along z, where that is exact): the rest is context
        self._segment(image[(slice(None), *crop)], spacing, label_of_channel, part,
                      keep_z=(box[0] - ctx[0][0], box[3] - ctx[0][0]))
        inner = tuple(slice(box[a] - ctx[a][0], box[a + 3] - ctx[a][0]) for a in range(3))
        out[tuple(slice(box[a], box[a + 3]) for a in range(3))] = part[inner]
        return out

    def check_image(self, image, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
        """(C, z, y, x) or (z, y, x) image and (z, y, x) spacing -> (C, z, y, x) array and float spacing, or
        InputError saying what is wrong with them."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise InputError(f"image of shape {image.shape}: need (C, z, y, x) or (z, y, x)")
        if image.shape[0] != self.config.image_channels:
            raise InputError(f"image has {image.shape[0]} channel(s), model {self.config.name} takes "
                             f"{self.config.image_channels}")
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0 or not all(map(math.isfinite, spacing)):
            raise InputError(f"invalid spacing {spacing}")
        lo, hi = float(image.min()), float(image.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError("image holds NaN or infinite values")
        if lo == hi:
            raise InputError(f"image is constant (every voxel {lo:g}): nothing to segment")
        return image, spacing

    @staticmethod
    def _check_roi(roi, shape) -> list[int]:
        if len(roi) != 6:
            raise InputError(f"ROI needs 6 numbers (z0, y0, x0, z1, y1, x1), got {list(roi)}")
        box = [int(v) for v in roi]
        lo = [max(box[a], 0) for a in range(3)]
        hi = [min(box[a + 3], shape[a]) for a in range(3)]
        if any(h <= l for l, h in zip(lo, hi)):
            raise InputError(f"ROI {box} (voxels z, y, x) lies outside the image {tuple(shape)}")
        return lo + hi

    def _segment(self, image: np.ndarray, spacing, label_of_channel, out: np.ndarray, keep_z=None) -> None:
        """Fill `out` (z, y, x) with the labels of `image` (C, z, y, x); only slices keep_z = (start, stop)
        of it if given."""
        plan = self.config.plan
        threads = _cpu_count()     # on a GPU too: preprocessing and export run on the CPU (torchrun: 1 thread)
        self.reporter.progress("preprocess", 0, 1)
        with _inference_state(self.network, threads):
            t0 = time.perf_counter()
            pre = preprocess(image, spacing, plan)
            log.info("preprocess %.1f s", time.perf_counter() - t0)
            self.reporter.progress("preprocess", 1, 1)
            axis = separate_axis(plan.spacing, spacing)   # export: nnU-Net checks the plan spacing first
            modes = ["nearest" if a == axis else "linear" for a in range(3)]
            view = out[tuple(slice(lo, hi) for lo, hi in pre.bbox)]
            if keep_z is not None:     # in the view's slices (the crop to the non-zero box moved them)
                start = pre.bbox[0][0]
                keep_z = (max(keep_z[0] - start, 0), min(keep_z[1] - start, view.shape[0]))
                if keep_z[0] >= keep_z[1]:
                    return             # the box lies outside the image's non-zero region: background
            try:
                self._sliding_window(pre.data, view, modes, label_of_channel, self.runner.device, keep_z)
                return
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
            # Retried here, outside the except block: while it runs, the traceback pins the failed attempt's
            # frames (accumulators, activations), and empty_cache() can only return blocks nothing references.
            log.warning("out of GPU memory for the logits; accumulating them in CPU memory instead")
            release_memory()
            self._sliding_window(pre.data, view, modes, label_of_channel, torch.device("cpu"), keep_z)

    def _sliding_window(self, data: np.ndarray, out: np.ndarray, modes, label_of_channel,
                        results_device: torch.device, keep_z=None) -> None:
        """Tiles over `data` (C, z, y, x) at the plan spacing; labels into `out` (cropped original grid)."""
        patch = tuple(int(p) for p in self.config.plan.patch_size)
        pads = padding_for_patch(data.shape[1:], patch)
        if any(sum(p) for p in pads):
            data = np.pad(data, [(0, 0)] + pads)
        padded = data.shape[1:]
        steps = compute_steps(padded, patch, self.step)
        total = len(steps[0]) * len(steps[1]) * len(steps[2])
        k = self.config.arch.num_classes
        inner = [slice(lo, s - hi) for (lo, hi), s in zip(pads, padded)]
        exporter = SlabExporter([s.stop - s.start for s in inner], out, modes, label_of_channel, keep_z=keep_z)
        gauss = torch.from_numpy(gaussian_weights(patch)).to(results_device)
        # The logits window spans one patch along z; slices before the next tile row are final.
        acc = torch.zeros((k, patch[0], *padded[1:]), dtype=torch.float16, device=results_device)
        weight = torch.zeros((patch[0], *padded[1:]), dtype=torch.float16, device=results_device)
        source = torch.from_numpy(data)
        if results_device.type == "cuda":   # the volume on the GPU once, tiles cut there (as nnU-Net)
            source = source.to(results_device)
        # Only what is exported is accumulated: not the padding, nor an ROI's context slices (four fifths of an
        # ROI click's tile); the network still sees whole tiles.
        lo, hi = exporter.source_range
        needed = [(inner[0].start + lo, inner[0].start + hi)] + [(s.start, s.stop) for s in inner[1:]]
        done, clock = 0, {"network": 0.0, "accumulate": 0.0, "export": 0.0}
        # the clock synchronises (asynchronous) CUDA to time work, not launches; a stall each, so only when logged
        sync = self.runner.synchronize if log.isEnabledFor(logging.INFO) else (lambda: None)
        self.reporter.progress("predict", 0, total)
        for zi, z in enumerate(steps[0]):
            for y in steps[1]:
                for x in steps[2]:
                    t0 = time.perf_counter()
                    tile = source[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]]
                    pred = self._predict_tile(tile).to(results_device)
                    sync()
                    t1 = time.perf_counter()
                    part = tuple(slice(max(a - t, 0), min(b - t, p))
                                 for (a, b), t, p in zip(needed, (z, y, x), patch))
                    window = (part[0], slice(y + part[1].start, y + part[1].stop),
                              slice(x + part[2].start, x + part[2].stop))
                    accumulate(acc[(slice(None), *window)], pred[(slice(None), *part)], gauss[part],
                               self.runner.head)
                    weight[window] += gauss[part]
                    del pred
                    sync()
                    clock["network"] += t1 - t0
                    clock["accumulate"] += time.perf_counter() - t1
                    done += 1
                    self.reporter.progress("predict", done, total)
            t0 = time.perf_counter()
            final = steps[0][zi + 1] - z if zi + 1 < len(steps[0]) else patch[0]
            self._finalize(acc, weight, z, final, inner, exporter)
            if final < patch[0]:
                shift_left(acc, final)
                shift_left(weight, final)
            sync()
            clock["export"] += time.perf_counter() - t0
        if not exporter.complete:
            raise RuntimeError("export did not cover the whole output (internal error)")
        log.info("%d tiles of %s: %s", total, patch, ", ".join(f"{k} {v:.1f} s" for k, v in clock.items()))

    @staticmethod
    def _finalize(acc, weight, z, n, inner, exporter) -> None:
        """Pass window slices [0, n) (global z .. z+n) inside the unpadded region to the exporter."""
        lo, hi = exporter.source_range
        a, b = max(z, inner[0].start + lo), min(z + n, inner[0].start + hi)
        if a >= b:
            return
        k, plane = acc.shape[0], acc.shape[-2] * acc.shape[-1]
        step = max(1, _FINALIZE_VALUES // (k * plane))     # a few slices at a time bounds the float copies
        for c in range(a, b, step):
            region = (slice(c - z, min(c + step, b) - z), inner[1], inner[2])
            logits = torch.div(acc[(slice(None), *region)], weight[region])   # float16, as nnU-Net
            # nnU-Net's overflow check; one min/max pass instead of a boolean tensor the size of the logits
            if not all(torch.isfinite(v).item() for v in torch.aminmax(logits)):
                raise RuntimeError("float16 overflow in the accumulated logits")
            exporter.feed(c - inner[0].start, logits.float())

    def _predict_tile(self, tile: torch.Tensor) -> torch.Tensor:
        """(C, pz, py, px) -> (K, pz, py, px) float32 logits (or the runner's features, runners.py) on the
        runner's device, averaged over the mirror flips when TTA is on. Flips share a runner call up to
        `self._batch`, halved on CUDA out-of-memory."""
        x = tile[None].to(self.runner.device)      # flips where the network runs: no copies through the host
        missing = self.config.arch.input_channels - x.shape[1]
        if missing:     # a prompt-taking model segmenting on its own: its prompt channels are empty
            x = torch.cat([x, x.new_zeros((1, missing, *x.shape[2:]))], dim=1)
        flips = mirror_axes_sets([a + 2 for a in self.config.plan.mirror_axes]) if self.tta else [()]
        pred, i = None, 0
        while i < len(flips):
            group = flips[i:i + self._batch]
            try:
                out = self.runner(torch.cat([torch.flip(x, f) if f else x for f in group]))
            except RuntimeError as e:
                if self._batch == 1 or not is_out_of_memory(e):
                    raise
                out = None
            if out is None:             # retried outside the except block, as in _segment
                self._batch //= 2
                log.warning("out of GPU memory for %d mirror flips at once; now %d", len(group), self._batch)
                release_memory()
                continue
            for j, f in enumerate(group):
                y = out[j:j + 1].float()        # one flip at a time: no float32 copy of the whole batch
                if f:
                    y = torch.flip(y, f)
                elif len(flips) > 1:
                    y = y.clone()               # the runner may reuse its output buffer on the next call
                pred = y if pred is None else pred.add_(y)
            del out
            i += len(group)
        if len(flips) > 1:
            pred /= len(flips)
        return pred[0]

    # ---------------------------------------------------------------- files
    def predict_file(self, input_path, output_path, *, roi_lps=None, classes=None, statistics=False,
                     series=None) -> dict:
        """Segment an image file or DICOM folder into `output_path` (label map with the input's geometry,
        or a DICOM SEG of the input series for `.dcm`) plus a sidecar JSON (classes, colours, terminology,
        settings) beside it; returns the sidecar dict.

        roi_lps: physical box (x0, y0, z0, x1, y1, z1) in LPS mm, as ITK. statistics: per-structure
        volume and intensities (of the first channel) in the sidecar and in `<name>.statistics.csv`.
        series: the Series Instance UID when `input_path` is a DICOM folder of several series.
        All files appear only complete.
        """
        t0 = time.perf_counter()
        fmt = output_format(output_path)          # an unknown or unwritable output fails before any work
        check_writable(output_path)
        if Path(output_path).resolve() == Path(input_path).resolve():
            raise InputError(f"{output_path}: the output would overwrite the input: choose another name")
        # a series a SEG cannot reference is refused before any work too
        sources = dicom_seg.read_source_series(input_path, series) if fmt == DICOM_SEG_SUFFIX else None
        image, geometry = read_image(input_path, series=series)
        if sources is not None:
            dicom_seg.check_alignment(sources, geometry, input_path)
        roi = geometry.physical_box_to_voxels(roi_lps) if roi_lps is not None else None
        try:
            labels = self.predict_array(image, geometry.spacing_zyx, roi=roi, classes=classes)
        except InputError as e:
            raise InputError(f"{input_path}: {e}") from None
        keep = set(int(v) for v in self.label_values(classes) if v)
        table = [c for c in class_table(self.config.class_names, self.config.colors) if c["value"] in keep]
        sidecar = {
            "input": str(input_path), "output": str(output_path),
            "model": self.config.name, "checkpoint": self.checkpoint,
            "labels": table,
            "settings": {"device": str(self.device), "backend": self.runner.name,
                         "precision": self.runner.precision, "tta": self.tta, "step": self.step,
                         "classes": list(classes) if classes else None,
                         "roi_lps": [float(v) for v in roi_lps] if roi_lps is not None else None,
                         "roi_voxels_zyx": list(roi) if roi else None,
                         "plan": {"spacing": list(self.config.plan.spacing),
                                  "patch_size": list(self.config.plan.patch_size),
                                  "normalization": self.config.plan.normalization}},
            "geometry": {"size": list(geometry.size), "spacing": list(geometry.spacing)},
        }
        if statistics:
            sidecar["statistics"] = label_statistics(labels, image[0], geometry.spacing, table)
        self.reporter.progress("write", 0, 1)
        sidecar["elapsed_s"] = round(time.perf_counter() - t0, 3)
        with contextlib.ExitStack() as outputs:     # each file renamed into place only if all are written
            outputs.enter_context(atomic_path(sidecar_path(output_path))).write_text(json.dumps(sidecar, indent=1))
            if statistics:
                write_csv(sidecar["statistics"], outputs.enter_context(atomic_path(csv_path(output_path, fmt))))
            if sources is not None:
                dicom_seg.write_seg(labels, sources, table, output_path, model=self.config.name,
                                    version=dicom_seg.model_version(self.config, self.checkpoint),
                                    parameters={"tta": self.tta, "step": self.step})
            else:
                write_labels(labels, geometry, output_path, table)
        self.reporter.progress("write", 1, 1)
        log.info("%s -> %s in %.1f s", input_path, output_path, time.perf_counter() - t0)
        return sidecar
