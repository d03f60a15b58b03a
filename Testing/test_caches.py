"""Caches hold derived data: a damaged entry is found when used and made again, with a warning, and the run
gives the same result. Real damage: files cut short, garbled, removed; no mocks except the hub's network."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import segbook
from conftest import run_cli, write_released_checkpoint
from segbook import zoo
from segbook.config import Plan
from segbook.dataset import read_dataset
from segbook.training.cache import cache_dataset
from test_predict_cli import CT, model_dir  # noqa: F401  (fixture: a tiny model with TotalSegmentator names)
from test_runners import needs_openvino
from test_zoo import lay_out_hub_cache

MINI = Path(__file__).parent / "data" / "hippocampus_mini"


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\x17" * 64
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ OpenVINO conversions
DAMAGE = {"cut model.bin": ("model.bin", cut),
          "garbled model.xml": ("model.xml", lambda p: p.write_text("not a model")),
          "cut model.xml": ("model.xml", cut), "no model.xml": ("model.xml", Path.unlink)}


@needs_openvino
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_openvino_conversion_is_converted_again(tmp_path, model_dir, damage):  # noqa: F811
    """It was a traceback on every run ("Incorrect weights in bin file!", "Unable to read the model") until the
    user found and deleted the hidden folder."""
    args = [CT, "--model", model_dir, "--backend", "openvino", "--progress", "none"]
    first = run_cli("predict", *args[:1], "-o", tmp_path / "first.nii.gz", *args[1:])
    assert first.returncode == 0, first.stderr
    (entry,) = (Path(segbook.zoo.cache_dir()) / "openvino").iterdir()
    name, how = DAMAGE[damage]
    how(entry / name)
    again = run_cli("predict", *args[:1], "-o", tmp_path / "again.nii.gz", *args[1:])
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"WARNING segbook.openvino_engine: {entry}: the cached OpenVINO "
                                                   f"model is damaged (") and "converting it again" in lines[0]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f))) for f in ("first.nii.gz", "again.nii.gz")]
    assert np.array_equal(*labels)
    if damage == "cut model.bin":   # the entry is whole again: the next run says nothing
        third = run_cli("predict", *args[:1], "-o", tmp_path / "third.nii.gz", *args[1:])
        assert third.returncode == 0 and third.stderr.strip() == ""


# -------------------------------------------------------------------------------- converted downloads
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """STU-Net-S's keys and shapes in the released format, in the hub's cache, offline (test_zoo's layout)."""
    import huggingface_hub.constants as hub_constants
    torch.manual_seed(0)
    net = segbook.build_stunet("S")
    ckpt = write_released_checkpoint(tmp_path / "small_ep4k.model", net.state_dict())
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    snapshot = lay_out_hub_cache(tmp_path / "hf", "ziyanhuang/STU-Net", "small_ep4k.model", ckpt)
    return net, snapshot, ckpt


@pytest.mark.parametrize("damage", ["cut weights", "garbled weights header", "no weights", "cut model.json",
                                    "no model.json"])
def test_a_damaged_converted_download_is_converted_again(hub, caplog, damage):
    net, _, _ = hub
    folder = zoo.fetch("stunet-s-totalseg")
    if damage == "cut weights":
        cut(folder / "weights.safetensors")
    elif damage == "garbled weights header":
        data = bytearray((folder / "weights.safetensors").read_bytes())
        data[8:40] = b"\x00" * 32
        (folder / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "no weights":
        (folder / "weights.safetensors").unlink()
    elif damage == "cut model.json":
        cut(folder / "model.json")
    else:
        (folder / "model.json").unlink()
    with caplog.at_level(logging.WARNING, logger="segbook.zoo"):
        model = segbook.create_model("stunet-s-totalseg")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{folder}: the converted model is damaged (")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    assert zoo.is_cached("stunet-s-totalseg")


def test_a_damaged_download_is_refused_offline_saying_what_to_do(hub):
    _, snapshot, _ = hub
    cut(snapshot.resolve())
    with pytest.raises(segbook.CheckpointError) as err:
        segbook.create_model("stunet-s-totalseg")
    message = str(err.value)
    assert message.startswith(f"{snapshot}: the downloaded checkpoint is damaged (") and "\n" not in message
    assert message.endswith("delete it and run `segbook download stunet-s-totalseg` with a connection")
    assert not zoo.is_cached("stunet-s-totalseg")


def test_a_damaged_download_is_downloaded_again_online(hub, monkeypatch, caplog):
    """The hub's network is the one thing replaced: its download puts the good file back, as the hub would."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants
    net, snapshot, ckpt = hub
    cut(snapshot.resolve())
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    calls = []

    def download(repo, filename, revision=None, force_download=False, **kw):
        calls.append(force_download)
        if force_download:
            shutil.copyfile(ckpt, snapshot.resolve())
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with caplog.at_level(logging.WARNING, logger="segbook.zoo"):
        model = segbook.create_model("stunet-s-totalseg")
    assert calls == [False, True]
    assert any("the downloaded checkpoint is damaged" in r.getMessage() and "downloading it again" in r.getMessage()
               for r in caplog.records)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------- fine-tune preprocessing cache
@pytest.mark.parametrize("damage", ["cut image", "cut seg", "garbled locations", "cut locations", "no seg"])
def test_a_damaged_preprocessed_case_is_preprocessed_again(tmp_path, caplog, damage):
    ds = read_dataset(MINI)
    plan = Plan(spacing=[1.0, 1.0, 1.0], patch_size=[16, 24, 16])
    folder = tmp_path / "cache"
    first = cache_dataset(ds, ds.cases, plan, folder)
    name = first[0].name
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    path = {"cut image": f"{name}_image.npy", "cut seg": f"{name}_seg.npy", "garbled locations": f"{name}_loc.npz",
            "cut locations": f"{name}_loc.npz", "no seg": f"{name}_seg.npy"}[damage]
    {"cut": cut, "garbled": garble, "no": Path.unlink}[damage.split()[0]](folder / path)
    with caplog.at_level(logging.WARNING, logger="segbook.training.cache"):
        again = cache_dataset(ds, ds.cases, plan, folder)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{folder}: the cached case {name} is damaged; preprocessing it again"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == expected
    for a, b in zip(first, again):
        for x, y in zip(a.load(mmap=False), b.load(mmap=False)):
            assert np.array_equal(x, y)
        assert a.locations.keys() == b.locations.keys()
        assert all(np.array_equal(a.locations[k], b.locations[k]) for k in a.locations)
