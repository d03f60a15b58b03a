"""Network runners (segbook.runners, segbook.openvino_engine): logits pinned to the official network, the
conversion cache, backend and precision selection, the fallback to torch, and the CUDA out-of-memory
retries exercised on the CPU with an injected error."""
from __future__ import annotations

import copy
import gc
import io
import json
import platform
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import segbook
from conftest import DATA, fixture_config, run_cli
from segbook import inference, openvino_engine, runners
from segbook.config import Arch, ModelConfig, Plan
from segbook.errors import InputError
from segbook.inference import Predictor
from segbook.runners import TorchRunner, make_runner, resolve_backend, resolve_precision, tile_logits
from segbook.zoo import save_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from slicer_fixtures import IMAGE, make_tiny_model  # noqa: E402

# pyproject.toml installs openvino on these machines: there a missing openvino is a failure, not a skip.
needs_openvino = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"),
                                    reason=f"no openvino wheel for {platform.machine()}")


def fixture_net(name: str):
    """The official-layout tiny fixture with its weights, as a Predictor-ready network (patch = its input)."""
    cfg = fixture_config(name)
    net = segbook.STUNet(cfg["input_channels"], cfg["num_classes"], cfg["dims"], cfg["depth"],
                         cfg["pool_op_kernel_sizes"], deep_supervision=False)
    net.load_state_dict(segbook.load_checkpoint(DATA / f"{name}.model"))
    arch = Arch(cfg["input_channels"], cfg["num_classes"], cfg["dims"], cfg["depth"], cfg["pool_op_kernel_sizes"])
    net.config = ModelConfig(name=name, arch=arch, plan=Plan(spacing=[1.5] * 3, patch_size=cfg["input_shape"][2:]),
                             class_names=[f"c{i}" for i in range(cfg["num_classes"])])
    io_ = np.load(DATA / f"{name}_io.npz")
    return net.eval(), torch.from_numpy(io_["input"]), io_["output_0"]


# ------------------------------------------------------------------ OpenVINO against the official network
@needs_openvino
@pytest.mark.parametrize("name", ["tiny_totalseg_pools", "tiny_deep_multichannel"])
def test_openvino_logits_equal_the_official_network_in_fp32(name, tmp_path):
    net, x, official = fixture_net(name)
    runner = openvino_engine.OpenVINORunner(net, precision="fp32", cache_root=tmp_path)
    out = tile_logits(runner, x).numpy()
    # the engine runs the body; its features are the final head's input and the head is the network's own
    features = runner(x)
    assert features.shape == (1, net.seg_outputs[-1].in_channels, *x.shape[2:])
    assert torch.equal(runner.head[0], net.seg_outputs[-1].weight.reshape(runner.head[0].shape))
    with torch.no_grad():
        ours = net(x).numpy()
    # fp32 throughout: only the order of the sums differs (oneDNN's kernels vs PyTorch's), so the logits agree
    # to float rounding accumulated over the layers. Seen: 0.25e-5 and 1.1e-5 of the logits' range (PyTorch
    # itself: 0.19e-5, 0.64e-5; with the plugin's MVN for the norms: 0.7e-5, 2.8e-5); bf16 moves them by ~1e-2.
    scale = float(np.abs(official).max())
    assert np.abs(out - official).max() <= 3e-5 * scale, np.abs(out - official).max() / scale
    assert np.abs(out - ours).max() <= 3e-5 * scale
    # The same labels wherever the decision is not a tie within that error (random weights make a few voxels
    # whose two best classes differ by ~1e-6: one of 166k here).
    top2 = np.sort(official, 1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 6e-5 * scale
    assert decided.mean() > 0.99
    assert (out.argmax(1) == official.argmax(1))[decided].all()
    # the precision asked for is what the compiled model runs (the CPU plugin defaults to bf16 on avx512_bf16)
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


@needs_openvino
def test_openvino_fp32_instance_norm_is_as_exact_as_pytorchs_at_tile_size(tmp_path):
    # The plugin's own MVN keeps one fp32 running sum per channel over a whole tile: at 96^3 with the channel
    # means offset as in a trained network, 8.9e-5 of the logits' range from float64 (PyTorch: 8.2e-7); the
    # engine's short sums: 8.5e-7. The bound, 1e-5, sits between.
    torch.manual_seed(0)
    patch, pools = [96, 96, 96], [[2, 2, 2]]
    net = segbook.STUNet(1, 3, [8, 16], [1, 1], pools, deep_supervision=False).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.bias.add_(0.5)
    net.config = ModelConfig(name="offset", arch=Arch(1, 3, [8, 16], [1, 1], pools),
                             plan=Plan(spacing=[1.5] * 3, patch_size=patch), class_names=["a", "b", "c"])
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        exact = copy.deepcopy(net).double()(x.double()).numpy()
        ours = net(x).numpy()
    out = tile_logits(openvino_engine.OpenVINORunner(net, precision="fp32", cache_root=tmp_path), x).numpy()
    scale = float(np.abs(exact).max())
    assert np.abs(ours - exact).max() <= 1e-5 * scale          # the reference itself
    assert np.abs(out - exact).max() <= 1e-5 * scale, np.abs(out - exact).max() / scale
    # the conversion swapped nothing in the network itself
    assert all(type(m) is not openvino_engine._ExactInstanceNorm for m in net.modules())
    assert isinstance(net.seg_outputs[-1], torch.nn.Conv3d)


@needs_openvino
def test_bf16_hint_reaches_the_compiled_model(tmp_path, caplog):
    """On a CPU with bf16 instructions (OpenVINO's own list of them decides) the compiled model runs bf16; on
    one without, OpenVINO would run fp32 silently: the runner says so and takes the exact fp32 path."""
    import openvino as ov
    net, x, official = fixture_net("tiny_totalseg_pools")
    runner = openvino_engine.OpenVINORunner(net, precision="bf16", cache_root=tmp_path)
    with caplog.at_level("WARNING", logger="segbook.openvino_engine"):
        out = tile_logits(runner, x).numpy()
    hint = str(runner.compiled.get_property("INFERENCE_PRECISION_HINT"))
    scale = float(np.abs(official).max())
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert hint in ("<Type: 'bfloat16'>", "bf16") and runner.precision == "bf16" and not caplog.records
        # bf16 keeps 8 bits of mantissa: the logits move visibly (which is why fp32 is the default) but stay close
        assert 1e-4 * scale < np.abs(out - official).max() < 0.1 * scale
    else:
        assert hint in ("<Type: 'float32'>", "f32") and runner.precision == "fp32"
        assert "no bf16 instructions; running fp32" in caplog.text
        assert np.abs(out - official).max() <= 3e-5 * scale       # the fp32 bound of the fixture-logit test


@needs_openvino
def test_conversion_is_cached_per_weights_patch_and_engine_version(tmp_path):
    # In its own process: after this check ran inside the pytest process, a later in-process conversion
    # (test_training's model-folder test) crashed that process with SIGSEGV and no Python traceback; not
    # reproduced in plain scripts that convert, reload from the cache and convert another network
    # (noted in issue 11). The check itself is unchanged.
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_runners; " \
           f"test_runners._check_conversion_cache({str(tmp_path)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _check_conversion_cache(tmp):
    import openvino as ov
    tmp_path = Path(tmp)
    net, x, _ = fixture_net("tiny_totalseg_pools")
    first = openvino_engine.OpenVINORunner(net, cache_root=tmp_path)
    ref = first(x).numpy().copy()
    assert first.converted and (first.folder / "model.xml").is_file() and (first.folder / "model.bin").is_file()
    # the weights are saved as fp32 (4 bytes each; save_model would halve them to fp16 by default); the
    # heads (deep supervision, unused at inference, and the final one, applied while accumulating) are not
    # in the graph
    n_params = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.seg_outputs.parameters())
    assert (first.folder / "model.bin").stat().st_size > 3.9 * n_params

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the conversion is cached")
    convert, ov.convert_model = ov.convert_model, no_conversion
    second = openvino_engine.OpenVINORunner(net, cache_root=tmp_path)
    np.testing.assert_array_equal(second(x).numpy(), ref)
    assert not second.converted and second.folder == first.folder
    ov.convert_model = convert

    key = openvino_engine.cache_key(net, net.config.plan.patch_size)
    assert openvino_engine.cache_key(net, [32, 32, 32]) != key                 # another patch shape
    assert openvino_engine.cache_key(net, net.config.plan.patch_size, exact_norm=False) != key  # bf16: MVN
    openvino_engine.ENGINE_VERSION += 1
    assert openvino_engine.cache_key(net, net.config.plan.patch_size) != key   # another engine version
    openvino_engine.ENGINE_VERSION -= 1
    version, ov.__version__ = ov.__version__, "0.0.0"
    assert openvino_engine.cache_key(net, net.config.plan.patch_size) != key   # another OpenVINO
    ov.__version__ = version
    with torch.no_grad():
        net.seg_outputs[-1].bias.add_(1)
    assert openvino_engine.cache_key(net, net.config.plan.patch_size) != key   # other weights (fine-tuned)


# ------------------------------------------------------------------ selection and fallback
def test_backend_and_precision_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    assert resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("auto", cpu, owned=False) == "torch"       # a training network stays on torch
    assert resolve_backend("auto", cpu) == ("openvino" if runners.openvino_available() else "torch")
    with pytest.raises(InputError, match="runs on the CPU"):
        resolve_backend("openvino", cuda)
    # openvino that cannot be imported (no wheel for the platform): auto falls back, explicit says what to do
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert not runners.openvino_available()
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(InputError, match="pip install openvino"):
        resolve_backend("openvino", cpu)


def test_precision_reaches_the_torch_runner():
    net, x, official = fixture_net("tiny_totalseg_pools")
    with torch.inference_mode():
        assert make_runner(net, torch.device("cpu"), backend="torch", owned=False)(x).dtype == torch.float32
        out = make_runner(net, torch.device("cpu"), backend="torch", precision="bf16", owned=False)(x)
    assert out.dtype == torch.bfloat16
    assert np.abs(out.float().numpy() - official).max() < 0.1 * np.abs(official).max()


@needs_openvino
def test_cli_default_is_openvino_and_falls_back_to_torch_without_it(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    outs = {}
    for case, env in [("default", {}), ("no_openvino", None)]:
        if env is None:      # an `openvino` that fails to import, as on a platform without a wheel
            stub = tmp_path / "stub" / "openvino"
            stub.mkdir(parents=True)
            (stub / "__init__.py").write_text("raise ImportError('no openvino here')\n")
            env = {"PYTHONPATH": f"{stub.parent}:{Path(segbook.__file__).parent.parent}"}
        out = tmp_path / case / "seg.nii.gz"
        r = run_cli("predict", IMAGE, "-o", out, "--model", model, "--device", "cpu", "--progress", "json", env=env)
        assert r.returncode == 0, r.stderr
        sidecar = json.loads(out.with_name("seg.json").read_text())
        outs[case] = (sidecar["settings"], [json.loads(line) for line in r.stdout.splitlines()])
    settings, events = outs["default"]
    assert settings["backend"] == "openvino" and settings["precision"] == "fp32"
    # the first run says that it converts
    convert = [e for e in events if e.get("stage") == "convert"]
    assert convert and "converting" in convert[0]["message"]
    settings, events = outs["no_openvino"]
    assert settings["backend"] == "torch" and not [e for e in events if e.get("stage") == "convert"]


# ------------------------------------------------------------------ CUDA out-of-memory retries, on the CPU
class OutOfMemoryAt:
    """A runner that raises CUDA's out-of-memory error on chosen calls (or on batches above a size), as a
    GPU would, and otherwise runs the wrapped runner. Remembers a weak reference to each input."""

    def __init__(self, inner, fail_calls=(), max_ok_batch=None, max_batch=1):
        self.inner, self.fail_calls, self.max_ok_batch = inner, set(fail_calls), max_ok_batch
        self.name, self.precision, self.device, self.max_batch = "oom", inner.precision, inner.device, max_batch
        self.head = inner.head
        self.calls, self.inputs, self.batches = 0, [], []

    def __call__(self, x):
        self.calls += 1
        self.inputs.append(weakref.ref(x))
        self.batches.append(x.shape[0])
        if self.calls in self.fail_calls or (self.max_ok_batch and x.shape[0] > self.max_ok_batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)

    def synchronize(self):
        pass


def _spy_release(monkeypatch, runner):
    """Record, at each release_memory call, what of the failed attempt is still alive: the accumulators (the
    only float16 tensors of a CPU run) and the input of the call that failed."""
    seen = []
    real = runners.release_memory

    def half_tensors():
        return {id(o): o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.float16}
    before = half_tensors()     # float16 tensors of earlier tests (a failed test's traceback...), held so that
                                # their ids are not reused

    def spy():
        real()
        alive = [tuple(t.shape) for i, t in half_tensors().items() if i not in before]
        seen.append((alive, runner.inputs[-1]() is not None))
    monkeypatch.setattr(inference, "release_memory", spy)
    return seen


def _four_tile_image():
    from test_predict import ct_crop
    image, _ = ct_crop()
    return image[:, :20, :24, :40]        # 40 x 48 x 80 at the plan's 1.5 mm: 2 x 1 x 2 tiles of (32, 48, 48)


def test_out_of_memory_retry_runs_after_the_failed_attempt_is_freed(monkeypatch):
    from test_predict import tiny_net
    image = _four_tile_image()
    net = tiny_net()
    ref = Predictor(net, device="cpu").predict_array(image, (3, 3, 3))
    p = Predictor(net, device="cpu")
    p.runner = OutOfMemoryAt(p.runner, fail_calls={3})      # fails mid-volume, with accumulators filled
    seen = _spy_release(monkeypatch, p.runner)
    labels = p.predict_array(image, (3, 3, 3))
    np.testing.assert_array_equal(labels, ref)              # the retry completes with the same output
    assert p.runner.calls > 3
    assert seen == [([], False)], f"alive at empty_cache (accumulators, failed input): {seen}"


def test_mirror_flips_batch_halves_on_out_of_memory_until_it_fits(monkeypatch):
    from test_predict import tiny_net
    image = _four_tile_image()
    net = tiny_net()
    ref = Predictor(net, device="cpu", tta=True).predict_array(image, (3, 3, 3))
    p = Predictor(net, device="cpu", tta=True)
    # a GPU where 8 flips at once do not fit, 2 do
    p.runner = OutOfMemoryAt(p.runner, max_ok_batch=2, max_batch=8)
    p._batch = 8
    seen = _spy_release(monkeypatch, p.runner)
    labels = p.predict_array(image, (3, 3, 3))
    np.testing.assert_array_equal(labels, ref)
    assert p._batch == 2 and p.runner.batches[:3] == [8, 4, 2]
    assert set(p.runner.batches[3:]) == {2}                  # later tiles keep the size that fit
    # the accumulators of the running volume stay (that retry is per tile); the failed batch is gone
    assert len(seen) == 2 and all(not failed_alive for _, failed_alive in seen), seen


def test_worker_releases_cached_gpu_memory_after_each_request(monkeypatch):
    # No GPU here: count empty_cache calls with CUDA reported as initialised (what a GPU machine has after
    # the first request); empty_cache itself is PyTorch's and cannot run without a GPU.
    from segbook.worker import Worker
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    w = Worker(io.StringIO())
    w.handle({"id": "a", "command": "ping"})
    w.handle({"id": "b", "command": "predict", "input": "missing.nrrd"})     # a failed request too
    assert len(calls) == 2
