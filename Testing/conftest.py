"""Shared fixtures: the repo's own test data (never ../shared), small model folders, a clean cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# markers nnunet/slicer/cuda and the no-silent-skips rule of `make test` (SEGBOOK_NO_SKIPS): see skip_policy.py
from skip_policy import (pytest_configure, pytest_make_collect_report, pytest_runtest_makereport,  # noqa: F401
                         pytest_runtest_setup, pytest_terminal_summary)

DATA = Path(__file__).parent / "data"

# Tests share two cores with whatever else runs; one intra-op thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own SegBook and Hugging Face caches, offline: nothing leaks from ~/.cache."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("SEGBOOK_CACHE", str(root / "segbook"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def fixture_config(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m segbook ...` as a user would, with the test's environment."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "segbook", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def write_released_checkpoint(path, state_dict, numpy_module: str | None = None) -> Path:
    """Save a state dict in the layout of the released `*_ep4k.model` files (nnU-Net v1 trainer dict).

    `numpy_module` rewrites the pickled numpy scalar global to that spelling ("numpy.core" as numpy 1.x
    wrote it, or "numpy._core"), to check that both load.
    """
    import io
    import zipfile

    import numpy as np
    path = Path(path)
    ckpt = {
        "epoch": 4000,
        "state_dict": state_dict,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": np.float64(1e-2), "momentum": 0.99}]},
        "plot_stuff": ([np.float64(0.5)] * 3, [np.float64(0.4)] * 3, [np.float64(0.3)] * 3, [np.float64(0.8)] * 3),
        "best_stuff": (np.int64(12), np.float64(0.7), np.float64(0.6), 1),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
    }
    torch.save(ckpt, path)
    if numpy_module:
        buf = io.BytesIO()
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item)
                if item.filename.endswith("data.pkl"):
                    for spelling in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
                        data = data.replace(b"c" + spelling + b"\nscalar", b"c" + numpy_module.encode()
                                            + b".multiarray\nscalar")
                    assert numpy_module.encode() + b".multiarray\nscalar" in data
                zout.writestr(item, data)
        path.write_bytes(buf.getvalue())
    return path
