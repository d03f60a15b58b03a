"""Device selection and the CUDA/MPS code paths that can be checked without the hardware.

What cannot run here (a GPU, Apple's MPS, an old torch) is replaced by patching the one torch query that
reports it (`torch.cuda.is_available`, `device_count`, `torch.backends.mps.is_available`); the code under
test runs for real up to that boundary.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from segbook.cli import main
from segbook.devices import autocast, resolve_device
from segbook.errors import InputError
from segbook.training import state as training_state
from segbook.training import distributed  # not `import setup`: pytest < 8 runs a module-level setup() as nose-style set-up
from segbook.training.sampling import make_loader

MINI = Path(__file__).parent / "data" / "hippocampus_mini"


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has n CUDA devices; returns the list torch.cuda.set_device was called with."""
    calls = []

    def have(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
        return calls
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return have


def test_a_gpu_index_this_machine_lacks_is_one_line(gpus):
    gpus(1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match=r"'cuda:7' requested but this machine has 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:7")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_finetune_on_a_missing_gpu_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["finetune", str(MINI), "-o", str(tmp_path / "m"), "--device", "cuda:7", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda:7" in err[0] and "not available" in err[0], err
    assert not (tmp_path / "m").exists()


def test_single_process_cuda_n_makes_it_the_current_device(gpus):
    calls = gpus(2)
    d, dev = distributed.setup("cuda:1")
    assert not d.enabled and dev == torch.device("cuda:1")
    assert calls == [torch.device("cuda:1")]


def test_auto_picks_cuda_then_mps_then_cpu(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="MPS"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    gpus(1)
    assert resolve_device("auto") == torch.device("cuda:0")


def test_bare_cuda_is_a_definite_device_whatever_was_current(gpus, monkeypatch):
    """After a cuda:1 request made GPU 1 the current device, "cuda" and "auto" still mean cuda:0 (what the
    result's sidecar then says); under torchrun they mean this process's GPU, LOCAL_RANK."""
    calls = gpus(2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    distributed.setup("cuda:1")
    assert calls == [torch.device("cuda:1")]
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda:0")
    distributed.setup("cuda")
    assert calls[-1] == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")      # an explicit index is kept


def test_predict_device_cuda_under_torchrun_uses_the_local_rank(gpus, monkeypatch):
    """`torchrun ... predict --device cuda`: rank r of a node runs on GPU LOCAL_RANK, not every rank on GPU 0."""
    from segbook.commands.predict import _shard
    gpus(2)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        _, _, device = _shard(["a", "b"], ["x", "y"], "cuda")
        assert resolve_device(device) == torch.device(f"cuda:{rank}")


def test_fp32_on_cuda_runs_without_tf32(gpus):
    gpus(1)
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True   # cuDNN's default
        distributed.setup("cpu")
        assert torch.backends.cudnn.allow_tf32                            # the CPU leaves them alone
        distributed.setup("cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


def test_mixed_precision_on_mps_needs_torch_2_5(monkeypatch):
    """`--precision bf16 --device mps` on torch < 2.5 is one line before any work, not autocast's error."""
    from segbook.devices import mps_autocast_available
    from segbook.runners import resolve_precision
    for version, ok in (("2.2.2", False), ("2.4.1+cpu", False), ("2.5.0", True), ("2.13.0+cpu", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert mps_autocast_available() is ok, version
        if ok:
            assert resolve_precision("bf16", torch.device("mps")) == "bf16"
        else:
            with pytest.raises(InputError, match="bf16 on Apple's MPS needs torch >= 2.5"):
                resolve_precision("bf16", torch.device("mps"))
        assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_a_disabled_autocast_is_never_constructed(monkeypatch):
    """torch < 2.5 raises for torch.autocast("mps", enabled=False); the training step must not build one."""
    from segbook.training.trainer import train_step

    def old_torch_autocast(device_type, *a, **k):
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")
    monkeypatch.setattr(torch, "autocast", old_torch_autocast)
    assert isinstance(autocast(torch.device("mps"), enabled=False), contextlib.nullcontext)
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batch = {"image": torch.randn(1, 1, 5, 5, 5), "target": [torch.zeros(1, 1, 3, 3, 3)]}
    loss = train_step(net, batch, lambda o, t: o.square().mean(), opt, None, torch.device("cpu"))
    assert loss > 0


def test_batches_are_pinned_only_for_cuda(gpus):
    gpus(1)
    assert make_loader(list(range(4)), 0, 2, 0, torch.device("cpu")).pin_memory is False
    assert make_loader(list(range(4)), 0, 2, 0, torch.device("cuda:0")).pin_memory is True


def test_resume_on_fewer_gpus_restores_the_generators_that_exist(gpus, monkeypatch):
    """A checkpoint from a 4-GPU machine resumed on a 1-GPU machine, and on the CPU alone."""
    restored = []

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= torch.cuda.device_count():     # as torch does: no such device
            raise IndexError(f"no CUDA device {index}")
        restored.append(index)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.get_rng_state()] * 4)
    gpus(4)
    saved = training_state.rng_states()
    assert len(saved["cuda"]) == 4
    expected = torch.rand(3)
    torch.set_rng_state(saved["torch"])
    gpus(1)
    torch.manual_seed(123)
    training_state.set_rng_states(saved)
    assert restored == [0]
    assert torch.equal(torch.rand(3), expected)         # the CPU generator is back where it was saved
    gpus(0)
    restored.clear()
    training_state.set_rng_states(saved)
    assert restored == []


def test_grad_scaler_only_for_cuda_and_on_torch_before_2_3(monkeypatch):
    import warnings
    from segbook.devices import grad_scaler
    assert grad_scaler(torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "CUDA is not available": this machine has no GPU
        assert isinstance(grad_scaler(torch.device("cuda")), getattr(torch.amp, "GradScaler", torch.cuda.amp.GradScaler))
        monkeypatch.delattr(torch.amp, "GradScaler", raising=False)   # torch 2.2 has only torch.cuda.amp.GradScaler
        assert type(grad_scaler(torch.device("cuda"))).__name__ == "GradScaler"


def test_loader_workers_are_sized_by_device_and_ranks(monkeypatch):
    """nnU-Net gives a GPU up to 12 augmentation processes; the ranks on one machine share its cores."""
    from segbook.training.sampling import default_workers
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    for cores, ranks, on_gpu, on_cpu in ((32, 1, 12, 4), (32, 4, 7, 4), (16, 2, 7, 4), (2, 1, 1, 1), (4, 4, 0, 0)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr("os.cpu_count", lambda: cores)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert (default_workers(cuda), default_workers(cpu)) == (on_gpu, on_cpu), (cores, ranks)
        assert make_loader(list(range(4)), 0, 2, None, cuda).num_workers == on_gpu


def test_batches_made_in_the_training_process_leave_the_cuda_generators_alone(tmp_path, monkeypatch):
    """0 loader workers: each batch seeds the CPU generators it draws from, not every CUDA generator."""
    from segbook.config import Plan
    from segbook.dataset import read_dataset
    from segbook.planning import deep_supervision_scales, pools_for_patch
    from segbook.training.cache import cache_dataset
    from segbook.training.sampling import BatchDataset
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    ds = read_dataset(MINI)
    cached = cache_dataset(ds, ds.cases[:2], Plan([1.0] * 3, [16, 24, 16]), tmp_path / "cache")
    data = BatchDataset(cached, [16, 24, 16], deep_supervision_scales(pools_for_patch([16, 24, 16], [1] * 3)), 2)
    reseeded.clear()
    batches = [b["image"] for b in make_loader(data, 0, 3, 0, torch.device("cpu"))]
    assert reseeded == []
    again = [b["image"] for b in make_loader(data, 0, 3, 0, torch.device("cpu"))]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))   # still one stream per (seed, rank, k)
