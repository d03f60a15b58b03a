"""Safe checkpoint loading: allowlisted unpickling, both numpy spellings, clear errors, prefixes."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

import segbook
from segbook.checkpoint import CheckpointError, check_state_dict, load_checkpoint
from conftest import DATA, fixture_config, write_released_checkpoint


def _tiny_net(name="tiny_totalseg_pools"):
    cfg = fixture_config(name)
    return segbook.STUNet(cfg["input_channels"], cfg["num_classes"], cfg["dims"], cfg["depth"],
                          cfg["pool_op_kernel_sizes"])


def test_released_fixture_is_refused_by_weights_only_but_loads_here():
    path = DATA / "tiny_totalseg_pools.model"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the numpy scalars in plot_stuff; as with the released files
    state = load_checkpoint(path)
    assert set(state) == set(_tiny_net().state_dict())


@pytest.mark.parametrize("spelling", ["numpy.core", "numpy._core"])
def test_both_numpy_module_spellings_load(tmp_path, spelling):
    net = _tiny_net()
    path = write_released_checkpoint(tmp_path / "x.model", net.state_dict(), numpy_module=spelling)
    state = load_checkpoint(path)
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.model"
    torch.save({"state_dict": _tiny_net().state_dict(), "plot_stuff": _RunsCommand(marker)}, evil)
    # sanity: an unrestricted load of this file really runs the command
    probe = tmp_path / "probe"
    torch.save({"x": _RunsCommand(probe)}, tmp_path / "probe.model")
    torch.load(tmp_path / "probe.model", weights_only=False)
    assert probe.exists()

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(evil)
    assert "refusing to load global" in str(err.value) and "system" in str(err.value)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_raw_pickle_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_RunsCommand(marker)))
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_download_names_file_and_suggests_redownload(tmp_path):
    good = (DATA / "tiny_totalseg_pools.model").read_bytes()
    broken = tmp_path / "small_ep4k.model"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="download it again") as err:
        load_checkpoint(broken)
    assert str(broken) in str(err.value)


def test_html_instead_of_checkpoint(tmp_path):
    """What the STU-Net tracker reports as `invalid load key '%'`: a text page saved under the name."""
    bad = tmp_path / "base_ep4k.model"
    bad.write_text("%PDF or <html> page from a failed download\n")
    with pytest.raises(CheckpointError, match="corrupt or truncated.*download it again"):
        load_checkpoint(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nothing.model")


def test_prefixes_are_stripped(tmp_path):
    net = _tiny_net()
    prefixed = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    torch.save(prefixed, tmp_path / "ddp.pth")
    assert set(load_checkpoint(tmp_path / "ddp.pth")) == set(net.state_dict())


def test_safetensors_round_trip(tmp_path):
    net = _tiny_net()
    segbook.checkpoint.save_weights(net.state_dict(), tmp_path / "w.safetensors")
    # the file read by hand, as the safetensors format describes it: an 8-byte little-endian header length,
    # a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensors
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    assert set(header) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert header[k]["dtype"] == {torch.float32: "F32", torch.int64: "I64"}[v.dtype] and \
            header[k]["shape"] == list(v.shape)
        a, b = header[k]["data_offsets"]
        stored = np.frombuffer(raw[8 + n + a:8 + n + b], {"F32": "<f4", "I64": "<i8"}[header[k]["dtype"]])
        assert np.array_equal(stored.reshape(v.shape), v.numpy()), k
    state = load_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_missing_and_misshapen_keys_are_named():
    net = _tiny_net()
    state = dict(net.state_dict())
    del state["seg_outputs.2.weight"]
    with pytest.raises(CheckpointError, match="missing key 'seg_outputs.2.weight'"):
        check_state_dict(net, state, "ckpt")
    state = dict(net.state_dict())
    state["conv_blocks_context.0.0.conv1.weight"] = torch.zeros(3, 1, 3, 3, 3)
    with pytest.raises(CheckpointError, match=r"'conv_blocks_context.0.0.conv1.weight' has shape \(3, 1, 3, 3, 3\)"):
        check_state_dict(net, state, "ckpt")


def test_broken_model_folder_is_a_clear_error(tmp_path):
    folder = segbook.zoo.save_model_folder(tmp_path / "m", segbook.get_config("stunet-s-totalseg"), {})
    (folder / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors.*download it again"):
        segbook.create_model(folder)


def test_submodules_are_attributes_of_a_bare_import():
    """`import segbook; segbook.zoo...` works without importing segbook.zoo first (the lazy package loads it),
    and a name that is neither a submodule nor exported is an AttributeError."""
    import subprocess
    import sys
    code = ("import segbook, sys; assert 'segbook.zoo' not in sys.modules; "
            "assert 'stunet-s-totalseg' in segbook.zoo.REGISTRY; "
            "assert not hasattr(segbook, 'no_such_thing'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
