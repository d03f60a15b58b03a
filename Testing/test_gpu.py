"""The GPU paths: each test body runs on the CPU on every machine (so that what it checks is itself checked
here) and on CUDA where there is a GPU (the `cuda` parameter, marked `cuda`, skipped visibly elsewhere).

- Prediction with the device's default settings (CUDA: torch with fp16 autocast, the 8 mirror flips of TTA
  in one batch, logits accumulated on the GPU; CPU: OpenVINO fp32) against torch fp32 on the CPU, with the
  trained hippocampus-demo on real cases, where reduced precision shows as it would for a user.
- A short fine-tune on the device (CUDA: autocast and the gradient scaler) that writes a model folder which
  predicts.
- The worker hands the GPU's cached blocks back after a request (Slicer renders on the same GPU).
- Clicks (the click path of the worker and the Slicer module) with the device's defaults against torch fp32
  on the CPU: the same simulated user's clicks give the same structures.

Not covered: NCCL across ranks (DDP needs one GPU per rank; the one-GPU test machine cannot host two).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from segbook import runners
from segbook.cli import main
from segbook.inference import Predictor
from segbook.io import read_image, read_labels

MINI = Path(__file__).parent / "data" / "hippocampus_mini"
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
CASES = sorted((MINI / "imagesTr").glob("*.nii.gz"))[:2]


@pytest.fixture(scope="module")
def reference():
    """torch fp32 on the CPU, with and without TTA: the labels every device is held to."""
    out = {}
    for tta in (False, True):
        p = Predictor("hippocampus-demo", device="cpu", backend="torch", precision="fp32", tta=tta)
        out[tta] = [p.predict_array(*_image(case)) for case in CASES]
    return out


def _image(case):
    image, geometry = read_image(case)
    return image, geometry.spacing_zyx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tta", [False, True], ids=["no-tta", "tta"])
def test_prediction_with_the_devices_defaults_agrees_with_cpu_fp32(device, tta, reference):
    p = Predictor("hippocampus-demo", device=device, tta=tta)
    cpu_engine = "openvino" if runners.openvino_available() else "torch"      # the GPU machine has no OpenVINO
    expected = {"cuda": ("torch", "fp16"), "cpu": (cpu_engine, "fp32")}[device]
    assert (p.runner.name, p.runner.precision) == expected and p.device.type == device
    same, foreground = [], []
    for case, ref in zip(CASES, reference[tta]):
        labels = p.predict_array(*_image(case))
        assert labels.shape == ref.shape and labels.dtype == np.uint8
        same.append((labels == ref).mean())
        foreground.append((labels > 0).mean())
    # fp16 on a trained network: a few voxels of the boundary at most (bf16, coarser still, gave >= 99.98 %)
    assert min(same) >= 0.999, same
    assert min(foreground) > 0.01       # a real segmentation, not an empty one that trivially agrees
    if device == "cuda":
        assert p._batch == 8            # the flips shared one batch; no out-of-memory halving


@pytest.mark.parametrize("device", DEVICES)
def test_a_short_finetune_on_the_device_writes_a_model_that_predicts(device, tmp_path):
    out = tmp_path / "model"
    assert main(["finetune", str(MINI), "-o", str(out), "--scratch", "--width", "0.25", "--patch-size", "16", "24",
                 "16", "--batch-size", "2", "--epochs", "1", "--iterations-per-epoch", "4", "--val-every", "1",
                 "--val-fraction", "0.25", "--num-workers", "0", "--device", device, "--progress", "none"]) == 0
    log = [json.loads(x) for x in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["train_loss"] > 0
    case = CASES[0]
    labels = Predictor(out, device=device).predict_array(*_image(case))
    assert labels.shape == read_labels(MINI / "labelsTr" / case.name)[0].shape
    # the folder is a model for `segbook predict` in another process (the CPU's default engine): its label map,
    # read with SimpleITK, lies on the input's grid and holds the labels of that engine in this process
    if device != "cpu":
        labels = Predictor(out, device="cpu").predict_array(*_image(case))
    seg = tmp_path / "seg.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "segbook", "predict", str(case), "-o", str(seg), "--model", str(out),
                           "--device", "cpu", "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written, source = sitk.ReadImage(str(seg)), sitk.ReadImage(str(case))
    assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetSpacing(), source.GetSpacing()) and np.allclose(written.GetDirection(),
                                                                                 source.GetDirection())
    assert (sitk.GetArrayFromImage(written) == labels).mean() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_the_worker_returns_the_gpus_cached_memory_after_a_request(device, tmp_path):
    import io
    from segbook.worker import Worker
    stream = io.StringIO()
    worker = Worker(stream)
    request = {"id": "r1", "command": "predict", "input": str(CASES[0]), "output": str(tmp_path / "seg.nii.gz"),
               "model": "hippocampus-demo", "device": device}
    assert worker.handle(request)
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    done = [e for e in events if e["event"] == "done"]
    assert done and done[0]["result"]["settings"]["device"].startswith(device), events[-3:]
    # the worker's file, read with SimpleITK: the input's grid, and the labels of the same model and settings
    # predicted in this process
    written, source = sitk.ReadImage(str(tmp_path / "seg.nii.gz")), sitk.ReadImage(str(CASES[0]))
    assert written.GetSize() == source.GetSize() and np.allclose(written.GetOrigin(), source.GetOrigin())
    expected = Predictor("hippocampus-demo", device=device).predict_array(*_image(CASES[0]))
    assert (expected > 0).mean() > 0.01
    assert (sitk.GetArrayFromImage(written) == expected).mean() >= 0.999
    if device == "cuda":
        assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 64 * 2 ** 20


@pytest.fixture(scope="module")
def clicks_on_cpu_fp32():
    """The simulated user's first 4 clicks on each structure of the cases, with torch fp32 on the CPU: per case
    and structure the clicks ((z, y, x), positive) and the mask after each."""
    from segbook.clicks import next_click
    from segbook.interactive import InteractiveSession
    p = Predictor("hippocampus-demo", device="cpu", backend="torch", precision="fp32")
    out = {}
    for case in CASES:
        image, spacing = _image(case)
        truth = read_labels(MINI / "labelsTr" / case.name)[0]
        session = InteractiveSession(p, image, spacing)
        for value in (1, 2):
            clicks, masks, mask = [], [], None
            for _ in range(4):
                click = next_click(truth == value, mask, spacing)
                if click is None:
                    break
                clicks.append(click)
                mask, _ = session.segment(points=[c for c, s in clicks if s],
                                          negative_points=[c for c, s in clicks if not s],
                                          class_name=p.config.class_names[value])
                masks.append(mask)
            out[case.name, value] = clicks, masks
        out[case.name, "tiles"] = session.tiles_run
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_clicks_with_the_devices_defaults_agree_with_cpu_fp32(device, clicks_on_cpu_fp32):
    """The click path (`InteractiveSession`: the tile's logits, the structure's lead, the corrections around
    each click) with the device's defaults (CUDA: torch with fp16 autocast) gives, for the same clicks, the
    structures torch fp32 on the CPU gives, and runs the network as often (a click inside a tile already
    computed runs none)."""
    from segbook.interactive import InteractiveSession
    p = Predictor("hippocampus-demo", device=device)
    for case in CASES:
        session = InteractiveSession(p, *_image(case))
        for value in (1, 2):
            clicks, expected = clicks_on_cpu_fp32[case.name, value]
            assert len(clicks) >= 2             # a correction, not only the first click's selection
            for k, reference in enumerate(expected):
                mask, info = session.segment(points=[c for c, s in clicks[:k + 1] if s],
                                             negative_points=[c for c, s in clicks[:k + 1] if not s],
                                             class_name=p.config.class_names[value])
                assert info["value"] == value and reference.sum() > 100
                # reduced precision moves a few voxels of the boundary at most
                assert (mask != reference).sum() <= 0.01 * reference.sum(), (case.name, value, k)
        assert session.tiles_run == clicks_on_cpu_fp32[case.name, "tiles"]
