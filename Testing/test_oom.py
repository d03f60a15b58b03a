"""Out-of-memory handling of the Predictor (GPU-only in reality: the allocator's failures are raised here by a
runner standing in for a full GPU; the Predictor's handling around it is the real code)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segbook.inference import Predictor
from segbook.io import read_image
from segbook.runners import is_out_of_memory
from slicer_fixtures import IMAGE, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


class FullGpu:
    """Wraps the real runner; raises `error` when asked for more than `fits` tiles at once."""

    def __init__(self, runner, fits: int, error: RuntimeError):
        self.runner, self.fits, self.error, self.calls = runner, fits, error, []
        self.name, self.precision, self.head, self.device = runner.name, runner.precision, runner.head, runner.device
        self.max_batch = 8

    def __call__(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise self.error
        return torch.cat([self.runner(t[None]) for t in x])

    def synchronize(self):
        pass


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_tta_batch_halves_on_any_allocation_failure_and_is_restored_for_the_next_image(error, tiny):
    p = Predictor(tiny, device="cpu", tta=True, backend="torch")
    reference = p.predict_array(*_case())
    p.runner = FullGpu(p.runner, fits=2, error=error)
    labels = p.predict_array(*_case())
    assert np.array_equal(labels, reference)
    assert p.runner.calls[:3] == [8, 4, 2] and p._batch == 2
    p.runner.fits = 8                        # the next image fits whole batches again
    p.runner.calls.clear()
    p.predict_array(*_case())
    assert set(p.runner.calls) == {8}


def test_other_runtime_errors_are_not_taken_for_memory(tiny):
    p = Predictor(tiny, device="cpu", tta=True, backend="torch")
    p.runner = FullGpu(p.runner, fits=2, error=RuntimeError("Expected all tensors to be on the same device"))
    with pytest.raises(RuntimeError, match="same device"):
        p.predict_array(*_case())
    assert not is_out_of_memory(ValueError("out of memory")) and is_out_of_memory(RuntimeError("out of memory"))


def _case():
    image, g = read_image(IMAGE)
    return image, g.spacing_zyx


def test_a_gpu_ranks_preprocessing_gets_the_ranks_cores_not_torchruns_one_thread(tiny, monkeypatch):
    """torchrun starts every rank with OMP_NUM_THREADS=1; on a GPU the preprocessing and the export still run on
    the CPU, so a CUDA rank takes its share of the machine's cores for them, as a CPU rank does."""
    import segbook.inference as inference
    p = Predictor(tiny, device="cpu", backend="torch")
    p.device = torch.device("cuda")        # what a CUDA rank's Predictor holds; its runner stays this machine's
    seen, real = [], inference.preprocess
    monkeypatch.setattr(inference, "preprocess", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    monkeypatch.setattr(inference, "_cpu_count", lambda: 3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p.predict_array(*_case())
        assert torch.get_num_threads() == 1            # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert seen == [3]
