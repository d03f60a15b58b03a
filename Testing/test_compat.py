"""The oldest supported versions and the no-silent-skips rule of `make test`.

- the floors in pyproject.toml are exactly the versions `make test-oldest` installs (so each is tested);
- the torch fallbacks the oldest versions need;
- skip_policy.py: marked tests skip visibly; under SEGBOOK_NO_SKIPS=1 any other skip fails the run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OLDEST = ROOT / "Testing" / "oldest"


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the same parser as the tomli package ([test] extra)
        import tomli as tomllib
    return tomllib.loads(path.read_text())


def _pins() -> dict:
    pins = {}
    for name in ("requirements.txt", "no-deps.txt"):
        for line in (OLDEST / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                pkg, version = line.split("==")
                pins[pkg.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_floor_is_the_version_the_oldest_run_installs():
    from packaging.requirements import Requirement
    from packaging.version import Version
    project = _toml(ROOT / "SegBookCore" / "pyproject.toml")["project"]
    assert project["requires-python"] == ">=3.9"
    pins = _pins()
    for text in project["dependencies"] + project["optional-dependencies"]["train"]:
        req = Requirement(text)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        name = req.name.lower().replace("_", "-")
        if not floors:   # a platform's upper bound, e.g. numpy<2 where torch stops at 2.2
            assert req.marker is not None and all(s.operator == "<" for s in req.specifier), text
            continue
        assert len(floors) == 1, f"{text}: one >= floor expected"
        assert name in pins, f"{name} is not pinned in Testing/oldest/: its floor is untested"
        assert Version(pins[name]) == Version(floors[0]), f"{name}: floor {floors[0]}, oldest run has {pins[name]}"


def test_the_oldest_run_is_python_3_9_and_part_of_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"PYTHON_OLDEST \?= .*python3\.9", makefile)
    test_recipe = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "test-oldest" in test_recipe and "SEGBOOK_NO_SKIPS=1" in test_recipe


def test_amp_scaler_exists_on_every_supported_torch():
    """torch.amp.GradScaler is torch >= 2.3; on 2.2 the CUDA training path needs torch.cuda.amp's."""
    from segbook.devices import grad_scaler as amp_scaler
    assert amp_scaler(torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "CUDA is not available, disabling" on a CPU machine
        scaler = amp_scaler(torch.device("cuda"))
    assert type(scaler).__name__ == "GradScaler" and isinstance(scaler.state_dict(), dict)
    if not torch.cuda.is_available():
        assert not scaler.is_enabled() and float(scaler.scale(torch.tensor(2.0))) == 2.0


# --- the skip policy, run on small test files in a fresh pytest process -----------------------------------

TESTS = '''
import pytest

def test_plain():
    pass

@pytest.mark.nnunet
def test_needs_nnunet():
    pass

def test_skips_by_itself():
    pytest.importorskip("no_such_module_segbook")
'''
# nnunetv2 made unimportable whatever this machine has
CONFTEST = 'import sys\nsys.modules["nnunetv2"] = None\n'
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_segbook")\n\ndef test_never_collected():\n    pass\n'


def _pytest(tmp_path, files: dict, **env) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEGBOOK_")}
    full_env.update(env, PYTHONPATH=os.pathsep.join([str(ROOT / "Testing"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], capture_output=True, text=True, env=full_env, cwd=tmp_path, timeout=120)


def test_marked_tests_skip_visibly_for_a_user(tmp_path):
    out = _pytest(tmp_path, {"conftest.py": CONFTEST, "test_a.py": TESTS})
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"1 passed, 2 skipped", out.stdout), out.stdout
    assert "1 test(s) did not run: they need nnU-Net v2" in out.stdout and "pip install --no-deps nnunetv2" in out.stdout


def test_under_no_skips_only_the_allowed_kinds_skip(tmp_path):
    out = _pytest(tmp_path, {"conftest.py": CONFTEST, "test_a.py": TESTS},
                  SEGBOOK_NO_SKIPS="1", SEGBOOK_ALLOW_SKIPS="cuda,nnunet")
    assert out.returncode == 1, out.stdout
    assert re.search(r"1 failed, 1 passed, 1 skipped", out.stdout), out.stdout
    assert re.search(r"FAILED .*test_skips_by_itself", out.stdout) and "unexpected skip" in out.stdout
    assert re.search(r"SKIPPED .*needs nnU-Net v2", out.stdout), out.stdout


def test_under_no_skips_a_kind_not_allowed_fails(tmp_path):
    out = _pytest(tmp_path, {"conftest.py": CONFTEST, "test_a.py": TESTS}, SEGBOOK_NO_SKIPS="1",
                  SEGBOOK_ALLOW_SKIPS="cuda")
    # the marker's skip happens at setup, so pytest reports its failure as an error
    assert out.returncode == 1 and re.search(r"1 failed, 1 passed, 1 error", out.stdout), out.stdout
    assert re.search(r"ERROR at setup of test_needs_nnunet _+\nunexpected skip", out.stdout), out.stdout
    assert "did not run" not in out.stdout


def test_under_no_skips_a_module_level_skip_fails(tmp_path):
    out = _pytest(tmp_path, {"test_b.py": MODULE_SKIP}, SEGBOOK_NO_SKIPS="1", SEGBOOK_ALLOW_SKIPS="cuda")
    assert out.returncode != 0 and "whole module skipped" in out.stdout + out.stderr, out.stdout
    out = _pytest(tmp_path, {"test_b.py": MODULE_SKIP})
    assert out.returncode == 5 and "1 skipped" in out.stdout, out.stdout   # 5: no test collected, not a failure


def test_an_unknown_allowed_kind_is_a_usage_error(tmp_path):
    out = _pytest(tmp_path, {"test_c.py": "def test_x():\n    pass\n"}, SEGBOOK_NO_SKIPS="1",
                  SEGBOOK_ALLOW_SKIPS="nnunt")
    assert out.returncode != 0 and "unknown kind" in out.stdout + out.stderr
