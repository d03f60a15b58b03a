"""No silent skips: tests that need something optional say so with a marker, and CI accepts only those skips.

A test that needs nnU-Net v2 (the reference), slicer-core or a CUDA GPU carries `@pytest.mark.nnunet`,
`@pytest.mark.slicer` or `@pytest.mark.cuda`; when that is absent the test is skipped with the reason
below, and the run ends with one line per kind saying how many tests did not run and how to get them.
Nothing else may skip a whole module for a missing package (the tests that do not need it would vanish).

With SEGBOOK_NO_SKIPS=1 (set by `make test`) every skip is a failure, except the kinds named in
SEGBOOK_ALLOW_SKIPS (comma-separated keys of OPTIONAL, e.g. "cuda" on a CPU machine, or
"cuda,nnunet,slicer" for the oldest-versions run). Loaded by conftest.py; usable alone with `-p skip_policy`.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

# kind -> (modules it needs, what it is and why it may be absent, how to get it)
OPTIONAL = {
    "nnunet": (("nnunetv2", "acvl_utils"),
               "nnU-Net v2, the reference (not in the [test] extra: its timm -> torchvision chain would replace "
               "torch; it needs Python >= 3.10)",
               "make test, or: pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 "
               "acvl-utils==0.2.6"),
    "slicer": (("slicer",), "slicer-core, Slicer's libraries as a wheel (none for Python 3.9)",
               "pip install slicer-core"),
    "cuda": ((), "a CUDA GPU", "run on a machine with an NVIDIA GPU and a CUDA build of torch"),
    "dicom": (("highdicom", "pydicom"),
              "the DICOM SEG writer (highdicom, pydicom) and the checkers made by others (dciodvfy from Debian's "
              "dicom3tools, dcmqi's segimage2itkimage)",
              "make test, or: pip install -e 'SegBookCore[test]' && apt-get install dicom3tools"),
}
# kind -> command-line tools it needs besides its modules (looked up on PATH and beside the interpreter,
# where pip puts a wheel's executables)
TOOLS = {"dicom": ("dciodvfy", "segimage2itkimage")}
_KIND = "segbook_skip_kind"


def _absent(kind: str) -> bool:
    if kind == "cuda":
        import torch
        return not torch.cuda.is_available()
    if any(find_tool(tool) is None for tool in TOOLS.get(kind, ())):
        return True
    for module in OPTIONAL[kind][0]:
        try:
            if importlib.util.find_spec(module) is None:
                return True
        except (ImportError, ValueError):
            return True
    return False


def find_tool(name: str) -> str | None:
    import shutil
    import sys
    from pathlib import Path
    found = shutil.which(name)
    if found is None and (Path(sys.executable).parent / name).exists():
        found = str(Path(sys.executable).parent / name)
    return found


def _allowed() -> set[str] | None:
    """None: skips are fine (a user's run); else the kinds that may skip."""
    if os.environ.get("SEGBOOK_NO_SKIPS", "") in ("", "0"):
        return None
    kinds = {k.strip() for k in os.environ.get("SEGBOOK_ALLOW_SKIPS", "").split(",") if k.strip()}
    unknown = kinds - set(OPTIONAL)
    if unknown:
        raise pytest.UsageError(f"SEGBOOK_ALLOW_SKIPS: unknown kind(s) {sorted(unknown)}; known: {sorted(OPTIONAL)}")
    return kinds


def pytest_configure(config):
    for kind, (_, what, _) in OPTIONAL.items():
        config.addinivalue_line("markers", f"{kind}: needs {what}; skipped visibly without it")
    config._segbook_allowed = _allowed()
    config._segbook_skipped = {}


def pytest_runtest_setup(item):
    for kind, (_, what, _) in OPTIONAL.items():
        if item.get_closest_marker(kind) is not None and _absent(kind):
            setattr(item, _KIND, kind)
            pytest.skip(f"needs {what}")


def _skip_reason(rep) -> str:
    longrepr = rep.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    allowed = item.config._segbook_allowed
    if not rep.skipped or hasattr(rep, "wasxfail"):
        return
    kind = getattr(item, _KIND, None)
    if allowed is None or kind in allowed:
        if kind is not None:
            item.config._segbook_skipped[kind] = item.config._segbook_skipped.get(kind, 0) + 1
    else:
        rep.outcome = "failed"
        rep.longrepr = (f"unexpected skip under SEGBOOK_NO_SKIPS=1 ({_skip_reason(rep)}); a test that needs "
                        f"something optional carries one of the markers {sorted(OPTIONAL)}, and only "
                        f"SEGBOOK_ALLOW_SKIPS={','.join(sorted(allowed)) or '(none)'} may skip here")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if collector.config._segbook_allowed is not None and rep.skipped:
        rep.outcome = "failed"
        rep.longrepr = (f"{collector.nodeid}: the whole module skipped under SEGBOOK_NO_SKIPS=1 "
                        f"({_skip_reason(rep)}); mark the tests that need it instead")


def pytest_terminal_summary(terminalreporter, config):
    for kind, count in sorted(getattr(config, "_segbook_skipped", {}).items()):
        _, what, how = OPTIONAL[kind]
        terminalreporter.write_line(f"{count} test(s) did not run: they need {what}. To run them: {how}",
                                    yellow=True)
