"""The model zoo through the real huggingface_hub code path, offline, from a laid-out hub cache."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import segbook
from segbook import zoo
from conftest import DATA, fixture_config, run_cli, write_released_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hf_home: Path, repo: str, filename: str, source: Path) -> Path:
    """Put `source` where huggingface_hub's cache keeps `repo/filename` at revision main (blob + symlink)."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    data = source.read_bytes()
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snap = repo_dir / "snapshots" / COMMIT / filename
    snap.parent.mkdir(parents=True)
    snap.symlink_to(blob)
    return snap


@pytest.fixture
def stunet_s_in_hub_cache(tmp_path, monkeypatch):
    """A checkpoint with STU-Net-S's exact keys and shapes, in the released format, in an offline hub cache."""
    torch.manual_seed(0)
    net = segbook.build_stunet("S")
    ckpt = write_released_checkpoint(tmp_path / "small_ep4k.model",
                                     {f"module.{k}": v for k, v in net.state_dict().items()})
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    lay_out_hub_cache(hf_home, "ziyanhuang/STU-Net", "small_ep4k.model", ckpt)
    return net, hf_home


def test_download_converts_once_offline_then_loads_from_model_folder(stunet_s_in_hub_cache, tmp_path):
    net, hf_home = stunet_s_in_hub_cache
    result = run_cli("download", "stunet-s-totalseg")
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.split(": ", 1)[1].strip())
    assert (folder / "weights.safetensors").is_file() and (folder / "model.json").is_file()
    saved = json.loads((folder / "model.json").read_text())
    assert saved["name"] == "stunet-s-totalseg" and saved["class_names"][1] == "adrenal_gland_left"

    listing = run_cli("models").stdout
    assert any(line.startswith("stunet-s-totalseg") and " yes " in line for line in listing.splitlines())

    # Later loads read only the model folder: remove the hub cache and load again, in this process.
    import shutil
    shutil.rmtree(hf_home)
    model = segbook.create_model("stunet-s-totalseg")
    assert model.config.name == "stunet-s-totalseg" and model.deep_supervision is False
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_create_model_downloads_through_hub_cache_in_process(stunet_s_in_hub_cache, monkeypatch):
    import huggingface_hub.constants as hub_constants
    net, hf_home = stunet_s_in_hub_cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = segbook.create_model("stunet-s-totalseg", deep_supervision=True)
    assert model.deep_supervision and zoo.is_cached("stunet-s-totalseg")
    assert torch.equal(model.seg_outputs[0].weight, net.seg_outputs[0].weight)


def test_offline_and_not_cached_is_one_clear_line():
    result = run_cli("download", "stunet-b-totalseg")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not cached" in lines[0] and "--checkpoint" in lines[0]
    with pytest.raises(segbook.ModelNotFound, match="not cached"):
        segbook.create_model("stunet-b-totalseg")


def test_checkpoint_downloaded_by_hand(tmp_path):
    """An offline user with base_ep4k.model-style file: the named model's config, the file's weights."""
    cfg = fixture_config("tiny_totalseg_pools")
    folder = zoo.save_model_folder(tmp_path / "tiny", segbook.ModelConfig(
        name="tiny", arch=segbook.Arch(1, 7, cfg["dims"], cfg["depth"], cfg["pool_op_kernel_sizes"]),
        plan=segbook.Plan([1.5] * 3, [32, 32, 64]), class_names=[f"c{i}" for i in range(7)]), {})
    model = segbook.create_model(folder, checkpoint=DATA / "tiny_totalseg_pools.model")
    ref = segbook.load_checkpoint(DATA / "tiny_totalseg_pools.model")
    assert torch.equal(model.seg_outputs[-1].weight, ref["seg_outputs.4.weight"])
    with pytest.raises(segbook.CheckpointError, match="conv1.weight. has shape .4, 1, 3, 3, 3."):
        segbook.create_model("stunet-s-totalseg", checkpoint=DATA / "tiny_totalseg_pools.model")


def test_unknown_name_lists_known_models():
    with pytest.raises(segbook.ModelNotFound, match="unknown model 'nope'.*stunet-s-totalseg"):
        segbook.create_model("nope")
    result = run_cli("download", "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_registry_records_are_complete(tmp_path):
    """Each released STU-Net's record, written as a model folder, read back with plain json and held to the
    official plan files and network manifest (Testing/data, copied from uni-medical/STU-Net)."""
    official = json.loads((DATA / "stunet_official_plans.json").read_text())["models"]
    manifest = json.loads((DATA / "stunet_state_dict_manifest.json").read_text())["sizes"]
    for size, name in zip("SBLH", ["stunet-s-totalseg", "stunet-b-totalseg", "stunet-l-totalseg", "stunet-h-totalseg"]):
        cfg = zoo.REGISTRY[name]
        assert cfg.hub_repo == "ziyanhuang/STU-Net" and cfg.hub_filename.endswith("_ep4k.model")
        assert cfg.arch.input_channels == 1 and cfg.plan.normalization == "zscore"
        assert cfg.plan.mirror_axes == [0, 1, 2] and len(cfg.colors) == 105
        # STU-Net's label_orders.json: background, then TotalSegmentator's 104 classes in alphabetical order
        assert cfg.class_names[0] == "background" and cfg.class_names[1:] == sorted(cfg.class_names[1:])
        assert len(set(cfg.class_names)) == 105 and {"liver", "spleen", "aorta", "rib_left_10"} <= set(cfg.class_names)
        folder = zoo.save_model_folder(tmp_path / name, cfg, {})
        saved = json.loads((folder / "model.json").read_text())
        plan = official[cfg.hub_filename]
        assert saved["name"] == name and saved["class_names"] == cfg.class_names
        assert saved["plan"]["spacing"] == plan["current_spacing"] and saved["plan"]["patch_size"] == plan["patch_size"]
        assert saved["arch"]["pool_op_kernel_sizes"] == plan["pool_op_kernel_sizes"]
        assert saved["arch"]["num_classes"] == plan["num_classes"] + 1
        assert saved["arch"]["dims"] == manifest[size]["dims"]
        # and the folder gives back the same record
        assert segbook.get_config(folder) == cfg
    brats = zoo.REGISTRY["brats21-stunet-b"]
    assert brats.arch.input_channels == 4 and brats.arch.pool_op_kernel_sizes == [[2, 2, 2]] * 5


def test_saved_model_folder_has_the_umask_permissions(tmp_path):
    """mkdtemp makes 0700 and safetensors 0600: a model folder shared in a lab must still be readable."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        folder = zoo.save_model_folder(tmp_path / "m", segbook.ModelConfig(
            name="m", arch=segbook.Arch(1, 2, [2, 4], [1, 1], [[2, 2, 2]]), plan=segbook.Plan([1.0] * 3, [8] * 3),
            class_names=["background", "a"]), {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (folder, *folder.iterdir())}
    assert modes == {"m": 0o755, "weights.safetensors": 0o644, "model.json": 0o644}
