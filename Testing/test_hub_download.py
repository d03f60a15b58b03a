"""`segbook download` against a Hugging Face hub served on 127.0.0.1 (Testing/local_hub.py): the real
huggingface_hub client downloads, retries and fails; SegBook converts, or says in one line why not and
keeps no model folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import segbook
from conftest import run_cli, write_released_checkpoint
from local_hub import LocalHub

REPO, FILE = "ziyanhuang/STU-Net", "small_ep4k.model"


@pytest.fixture(scope="module")
def released_s(tmp_path_factory) -> tuple[bytes, dict]:
    """STU-Net-S weights in the released checkpoint format: (file bytes, state dict)."""
    torch.manual_seed(0)
    state = segbook.build_stunet("S").state_dict()
    path = write_released_checkpoint(tmp_path_factory.mktemp("hub") / FILE, {f"module.{k}": v for k, v in state.items()})
    return path.read_bytes(), state


def _download(hub: LocalHub, timeout=300):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "30",
           "HF_HUB_DOWNLOAD_TIMEOUT": "30"}
    return run_cli("download", "stunet-s-totalseg", env=env, timeout=timeout)


def _converted() -> Path:
    import os
    return Path(os.environ["SEGBOOK_CACHE"]) / "models" / "stunet-s-totalseg"


def _snapshot() -> Path:
    import os
    return Path(os.environ["HF_HOME"]) / "hub" / "models--ziyanhuang--STU-Net" / "snapshots"


def test_download_from_the_hub_converts_the_served_weights(released_s):
    data, state = released_s
    with LocalHub({f"{REPO}/{FILE}": data}) as hub:
        result = _download(hub)
        assert result.returncode == 0, result.stderr
        assert ("GET", f"/{REPO}/resolve/main/{FILE}") in hub.requests     # it came from this hub
        served = len(hub.requests)
        again = _download(hub)                   # converted once: the second call asks the hub nothing
        assert again.returncode == 0 and len(hub.requests) == served, hub.requests[served:]
    folder = Path(result.stdout.split(": ", 1)[1].strip())
    assert folder == _converted()
    assert json.loads((folder / "model.json").read_text())["name"] == "stunet-s-totalseg"
    got = segbook.load_checkpoint(folder / "weights.safetensors")
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert [p.read_bytes() == data for p in _snapshot().rglob(FILE)] == [True]


def test_download_of_a_file_the_hub_does_not_have_is_one_line(released_s):
    with LocalHub({f"{REPO}/other.model": released_s[0]}) as hub:
        result = _download(hub)
        assert any(path.endswith(FILE) for _, path in hub.requests)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segbook download: error: stunet-s-totalseg: ") and "Traceback" not in result.stderr, lines
    assert "EntryNotFound" in lines[0] or "404" in lines[0], lines
    assert not _converted().exists()


def test_download_broken_mid_file_keeps_no_model_and_no_cut_file(released_s):
    """The hub closes every connection half way through the file: huggingface_hub (1.x: after resuming
    from where it broke, with Range requests) fails, and nothing cut short is converted or named as the file."""
    data, _ = released_s
    with LocalHub({f"{REPO}/{FILE}": data}, mode="break") as hub:
        result = _download(hub)
        gets = [p for m, p in hub.requests if m == "GET"]
        assert hub.half_sent.is_set() and gets, hub.requests    # it did get bytes (huggingface_hub 1.x retries)
    assert result.returncode == 2, result.stderr
    # the client's own retry warnings, then SegBook's one line naming the model and the cause
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("segbook download: error: stunet-s-totalseg: download of") and \
        "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not _converted().exists()
    assert not list(_snapshot().rglob(FILE))
