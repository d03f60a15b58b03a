"""Where the module's files sit, as Slicer's start-up meets them (emulated: module_factory.py,
python_script_host.py): the installed extension built from the CMake lists, and a clone added to
Application Settings > Modules > Additional module paths."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slicer_fixtures import IMAGE, ROOT, SLICER_MODULE
from test_slicer_static import CORE, MODULE_CMAKE, cmake_list, existing_files

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer
HERE = Path(__file__).resolve().parent
BATCH = Path("Resources") / "Scripts" / "SegBookBatch.py"


def clean_env() -> dict:
    """No PYTHONPATH: the module must find its core the way it would inside Slicer."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def factory(*folders) -> list:
    out = subprocess.run([sys.executable, str(HERE / "module_factory.py"), *map(str, folders)], capture_output=True,
                         text=True, timeout=120, env=clean_env(), cwd=str(folders[0]))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def installed_tree(dest: Path) -> Path:
    """qt-scripted-modules as the CMake lists build it: module scripts and resources, the core beside them."""
    text = MODULE_CMAKE.read_text()
    files = [(SLICER_MODULE, s.replace("${MODULE_NAME}", "SegBook"))
             for v in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES") for s in cmake_list(text, v)]
    files += [(CORE, s) for v in ("SEGBOOK_CORE_PYTHON_SCRIPTS", "SEGBOOK_CORE_PYTHON_RESOURCES")
              for s in cmake_list(text, v)]
    files += [(CORE, s) for s in re.findall(r"install\(FILES \$\{SEGBOOK_CORE_DIR\}/(\S+)", text)]
    for source, relative in files:
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, dest / relative)
    return dest


def clone(dest: Path) -> Path:
    """The repository's own files (git-tracked ones in a checkout), as a user's clone has them."""
    for folder in (SLICER_MODULE, CORE):
        for path in existing_files(folder):
            target = dest / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return dest


def check_every_top_level_file_is_a_module(results, folder: Path):
    top = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".py", ".pyc"))
    assert sorted(Path(r["file"]).name for r in results) == top, "every top-level .py is loaded as a module"
    failed = {r["module"]: r["error"] for r in results if not r["ok"]}
    assert not failed, f"Slicer would print these errors at every start: {failed}"
    assert {r["module"]: r["widget"] for r in results} == {"SegBook": True}


def test_installed_extension_loads_and_ships_the_batch_script_outside_the_factorys_way(tmp_path):
    tree = installed_tree(tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules")
    check_every_top_level_file_is_a_module(factory(tree), tree)
    assert (tree / BATCH).is_file() and (tree / "segbook" / "worker.py").is_file()
    # setup reads the version floors from the pyproject.toml installed beside the core
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from SegBookLib.InstallLogic import coreRequirements, "
            "pyprojectPath; print(json.dumps([str(pyprojectPath()), coreRequirements()]))")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True, timeout=60,
                         env=clean_env())
    assert out.returncode == 0, out.stderr
    path, requirements = json.loads(out.stdout)
    assert Path(path) == tree / "pyproject.toml" and any(r.startswith("torch") for r in requirements["core"])


def test_a_clone_in_additional_module_paths_loads_and_finds_its_core(tmp_path):
    repo = clone(tmp_path / "SlicerSegBook")
    module = repo / "SegBookSlicer"
    check_every_top_level_file_is_a_module(factory(module), module)
    # the module and its worker import the clone's core, with no PYTHONPATH and nothing installed for it
    code = ("import sys, json, subprocess; sys.path.append(sys.argv[1]); "
            "from SegBookLib.ProcessRunner import corePackageRoot, coreEnvironment; "
            "child = subprocess.run([sys.executable, '-c', 'import segbook.worker, sys; print(segbook.worker.__file__)'], "
            "env=coreEnvironment(), capture_output=True, text=True, check=True); "
            "print(json.dumps([corePackageRoot(), child.stdout.strip()]))")
    out = subprocess.run([sys.executable, "-c", code, str(module)], capture_output=True, text=True, timeout=120,
                         env=clean_env(), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    root, worker = json.loads(out.stdout)
    assert Path(root) == repo / "SegBookCore"
    assert Path(worker) == repo / "SegBookCore" / "segbook" / "worker.py"
    # the documented batch command runs from the clone's module folder too
    proc = host(module / BATCH, "--input", tmp_path / "missing.nii.gz", "--output", tmp_path / "o.seg.nrrd",
                "--model", "hippocampus-demo")
    assert proc.returncode == 2 and "missing.nii.gz" in proc.stderr, proc.stderr


def host(script, *args, inject=None, timeout=180):
    extra = ["--raise-in", inject] if inject else []
    return subprocess.run([sys.executable, str(HERE / "python_script_host.py"), *extra, str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=clean_env())


def test_batch_script_exits_slicer_on_any_error(tmp_path):
    """Under `Slicer --python-script`: bad arguments, an unexpected exception, and success all end the app."""
    script = SLICER_MODULE / BATCH
    proc = host(script, "--output", tmp_path / "o")
    assert proc.returncode == 2 and "--input" in proc.stderr
    proc = host(script, "--input", IMAGE, "--output", tmp_path / "o.seg.nrrd", "--model", "hippocampus-demo",
                "--device", "cpu", inject="SegBookLib.SegmentationLogic:SegmentationLogic.shutdown")
    assert proc.returncode == 1, proc.stderr
    assert "injected failure" in proc.stderr and "Traceback" not in proc.stderr
    proc = host(script, "--input", IMAGE, "--output", tmp_path / "ok.seg.nrrd", "--model", "hippocampus-demo",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ok.seg.nrrd").is_file()
