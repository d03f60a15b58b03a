"""The long-lived prediction worker (`python -m segbook.worker`) as the Slicer module drives it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fixtures import IMAGE, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def run_worker(requests, timeout=120):
    """Feed request lines to a fresh worker; returns (parsed stdout events, raw stdout, stderr, rc)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
    proc = subprocess.run([sys.executable, "-m", "segbook.worker"], input=lines, capture_output=True,
                          text=True, timeout=timeout, env=env)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return events, proc.stdout, proc.stderr, proc.returncode


def predict(rid, output, model, **extra):
    return {"id": rid, "command": "predict", "input": str(IMAGE), "output": str(output), "model": str(model),
            "device": "cpu", **extra}


def test_worker_keeps_the_model_loaded_and_tags_events(tiny_model, tmp_path):
    events, stdout, stderr, rc = run_worker([
        predict("a", tmp_path / "a.nrrd", tiny_model),
        predict("b", tmp_path / "b.nrrd", tiny_model, tta=True, roi_lps=[-12, -12, 5, -2, -2, 15]),
        {"command": "shutdown"}])
    assert rc == 0, stderr
    assert events[0]["event"] == "ready"
    # stdout holds nothing but JSON events; every event after `ready` names its request
    assert all(e.get("request") in ("a", "b") for e in events[1:])
    loaded = [e for e in events if e["event"] == "loaded"]
    assert [e["request"] for e in loaded] == ["a"], "the second request on the same model must not reload"
    done = {e["request"]: e for e in events if e["event"] == "done"}
    assert done["a"]["reused"] is False and done["b"]["reused"] is True
    stages = {e["stage"] for e in events if e["event"] == "progress" and e["request"] == "a"}
    assert "predict" in stages
    # the result is the core's sidecar; the label map has the input's grid
    sidecar = done["a"]["result"]
    assert [c["name"] for c in sidecar["labels"]] == ["liver", "spleen"]
    assert sidecar["settings"]["tta"] is False and done["b"]["result"]["settings"]["tta"] is True
    assert done["b"]["result"]["settings"]["roi_lps"] == [-12, -12, 5, -2, -2, 15]
    image, labels = sitk.ReadImage(str(IMAGE)), sitk.ReadImage(str(tmp_path / "a.nrrd"))
    assert labels.GetSize() == image.GetSize()
    assert np.allclose(labels.GetOrigin(), image.GetOrigin()) and np.allclose(labels.GetDirection(),
                                                                               image.GetDirection())
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values <= {0, 1, 2} and len(values) > 1


def test_worker_answers_errors_and_keeps_serving(tiny_model, tmp_path):
    events, _, stderr, rc = run_worker([
        predict("missing", tmp_path / "x.nrrd", tiny_model, input=str(tmp_path / "nope.nii.gz")),
        # a field of the wrong type is named, before any model is loaded ("false" as text would be true)
        predict("tta", tmp_path / "t.nrrd", tiny_model, tta="false"),
        predict("one", tmp_path / "o.nrrd", tiny_model, classes="liver"),
        predict("num", tmp_path / "n.nrrd", tiny_model, input=7),
        predict("badclass", tmp_path / "y.nrrd", tiny_model, classes=["kidney_left"]),
        {"id": "nomodel", "command": "predict", "input": str(IMAGE), "output": str(tmp_path / "z.nrrd")},
        "this is not json",
        {"id": "what", "command": "explode"},
        {"id": "alive", "command": "ping"},
        {"command": "shutdown"}])
    assert rc == 0, stderr
    errors = {e["request"]: e["message"] for e in events if e["event"] == "error"}
    assert "nope.nii.gz" in errors["missing"]
    assert "kidney_left" in errors["badclass"]
    assert "model" in errors["nomodel"]
    assert None in errors and "explode" in errors["what"]
    assert errors["tta"] == "predict request field 'tta': true or false is needed, got 'false'"
    assert errors["one"] == "predict request field 'classes': a list of class names is needed, got 'liver'"
    assert errors["num"] == "predict request field 'input': text is needed, got 7"
    assert [e["request"] for e in events if e["event"] == "loaded"] == ["badclass"]
    assert all("\n" not in m for m in errors.values()), "errors are one line"
    assert any(e["event"] == "done" and e["request"] == "alive" for e in events)
    assert not (tmp_path / "x.nrrd").exists() and not (tmp_path / "y.nrrd").exists()


def test_worker_exits_at_end_of_input(tiny_model):
    events, _, stderr, rc = run_worker([{"id": "p", "command": "ping"}])
    assert rc == 0, stderr
    assert [e["event"] for e in events] == ["ready", "done"]


def test_worker_survives_bytes_that_are_not_utf8():
    """A request line with undecodable bytes (a path in another code page) gets an answer, and the worker goes
    on serving; its output is UTF-8 whatever the locale says."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="ascii")
    lines = b'{"id": "caf\xe9", "command": "ping"}\n\xff\xfe\n' + json.dumps({"id": "ok", "command": "ping"}).encode() \
        + b"\n"
    proc = subprocess.run([sys.executable, "-m", "segbook.worker"], input=lines, capture_output=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    events = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    done = [e["request"] for e in events if e["event"] == "done"]
    assert done == ["caf\ufffd", "ok"]
    assert any(e["event"] == "error" and e["request"] is None for e in events), "the garbage line is answered"
