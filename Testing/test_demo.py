"""The shipped model `hippocampus-demo` and `python -m segbook.demo` (what `make demo` runs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segbook import demo
from segbook.checkpoint import load_checkpoint
from segbook.zoo import fetch, get_config, list_models

DATA = Path(__file__).parent / "data"


def test_demo_model_is_bundled_small_and_documented():
    assert "hippocampus-demo" in list_models()
    folder = fetch("hippocampus-demo")          # bundled: no download, no cache
    assert folder.parent.name == "models" and folder.parent.parent.name == "data"
    assert (folder / "weights.safetensors").stat().st_size < 10 * 2 ** 20
    cfg = get_config("hippocampus-demo")
    assert cfg.class_names == ["background", "anterior", "posterior"]
    assert "half" in cfg.description.lower() and cfg.size is None      # honest about its width
    prov = cfg.provenance
    assert prov["command"].startswith("segbook finetune ")
    # the held-out figures benchmarks/RESULTS.md documents (reproduced by benchmarks/bench_demo_dice.py)
    assert prov["validation"]["dice"] == pytest.approx({"anterior": 0.8862, "posterior": 0.8676}, abs=1e-4)
    assert prov["validation"]["mean_dice"] == pytest.approx(0.8769, abs=1e-4)
    # the shipped cases were held out of training
    assert set(demo.demo_cases()) <= set(prov["data"]["validation_cases"])
    assert len(demo.demo_cases()) == 3
    state = load_checkpoint(folder / "weights.safetensors")
    assert all(v.dtype.is_floating_point for v in state.values())
    # "STU-Net-S shape at half width, weights stored as fp16", held to the official STU-Net-S manifest and the
    # file's own bytes: the safetensors header read by hand, every tensor F16, and the file exactly the header
    # plus 2 bytes per value; each shape the official S shape with its channels (16..256) halved and the 105
    # TotalSegmentator outputs replaced by the 3 classes
    manifest = json.loads((DATA / "stunet_state_dict_manifest.json").read_text())
    official = dict(manifest["sizes"]["S"]["keys"])
    assert cfg.arch.dims == [d // 2 for d in manifest["sizes"]["S"]["dims"]] and "half" in cfg.description
    raw = (folder / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    assert "weights stored as fp16" in cfg.description
    assert {v["dtype"] for v in header.values()} == {"F16"} and header.keys() == official.keys()
    assert len(raw) == 8 + n + 2 * sum(int(np.prod(v["shape"])) for v in header.values())
    halved = {k: [3 if x == manifest["num_classes"] else x // 2 if x >= 16 else x for x in shape]
              for k, shape in official.items()}
    assert {k: v["shape"] for k, v in header.items()} == halved


def test_make_demo_segments_a_shipped_case(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Dice anterior" in out and "Dice posterior" in out and "CC-BY-SA 4.0" in out
    seg_path = tmp_path / f"{demo.DEFAULT_CASE}_seg.nii.gz"
    seg = sitk.ReadImage(str(seg_path))
    ref = sitk.ReadImage(str(demo.cases_dir() / f"{demo.DEFAULT_CASE}_label.nii.gz"))
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    pred, lab = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(ref)
    dices = [2 * ((pred == c) & (lab == c)).sum() / ((pred == c).sum() + (lab == c).sum()) for c in (1, 2)]
    # RESULTS.md: hippocampus_001 anterior 0.9099, posterior 0.8625; float rounding on another CPU or torch
    # may flip a few border voxels (one voxel moves a Dice by < 0.001 on these 1300- and 1600-voxel structures)
    assert dices == pytest.approx([0.9099, 0.8625], abs=0.005)
    printed = float(next(l for l in out.splitlines() if "mean Dice" in l).split()[-1])
    assert printed == pytest.approx(np.mean(dices), abs=1e-4)
    png = tmp_path / f"{demo.DEFAULT_CASE}_overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_demo_unknown_case_is_one_line(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--case", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shipped demo case 'nope'" in err[0]
