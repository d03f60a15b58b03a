"""`torchrun -m segbook predict`: the inputs are sharded over the ranks (2 CPU processes here), each rank
writes its own share, and the outputs equal a single process's."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from conftest import run_cli
from slicer_fixtures import IMAGE, IMAGE2, make_tiny_model


def test_torchrun_shards_the_inputs_over_two_cpu_ranks(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, src in [("a.nii.gz", IMAGE), ("b.nii.gz", IMAGE2), ("c.nii.gz", IMAGE)]:
        shutil.copy(src, inputs / name)
    single = run_cli("predict", inputs, "-o", tmp_path / "single", "--model", model, "--device", "cpu",
                     "--progress", "none")
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segbook", "-v", "predict", str(inputs), "-o", str(tmp_path / "ranks"), "--model", str(model),
           "--device", "cpu", "--progress", "none"]
    # both ranks start from an empty conversion cache: they convert at once, and either result is kept
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: 2 of 3 inputs on cpu" in proc.stderr and "rank 1 of 2: 1 of 3 inputs on cpu" in proc.stderr
    for name in ("a", "b", "c"):
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ranks" / f"{name}.nii.gz")))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "single" / f"{name}.nii.gz")))
        np.testing.assert_array_equal(ours, ref)
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())
