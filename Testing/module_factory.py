"""An emulation of Slicer's scripted-module factory, run as a script: `python module_factory.py DIR [DIR ...]`.

What Slicer does at start-up with each module path (Application Settings > Modules > Additional module
paths, where the Extensions Manager also puts an extension's qt-scripted-modules folder), from its source
(Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx, qSlicerScriptedLoadableModule.cxx,
Base/QTCore/qSlicerScriptedUtils.cxx, qSlicerUtils.cxx; CTK's ctkAbstractFileBasedFactory):
- the folder is listed without recursion (QDirIterator(path)), symbolic links resolved;
- a candidate is a file ending in `.py` (any case) whose first line does not start with `#!` (that is a CLI
  script, left to the CLI factory), or a `.pyc` without its `.py`;
- load(): the module's folder is appended to sys.path;
- setPythonSource(): the module name is the file name up to its first dot; the file is executed as that
  module (importlib.util.spec_from_file_location, sys.modules[name] = module, exec_module); it must define a
  class of that name, which is instantiated with the C++ module as `parent`; a `<name>Widget` class gives it
  a panel. A failure prints an error at every start and the module is missing.

Prints one JSON line per candidate: {"file", "module", "ok", "error", "widget"}. Only what cannot run here
is stubbed: the Qt-based `slicer.ScriptedLoadableModule` base classes and `qt`/`ctk`; `slicer` is the real
slicer-core package.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import types
from pathlib import Path


def _stub_host() -> None:
    import slicer
    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, types.ModuleType(name))
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title, parent.categories, parent.dependencies, parent.contributors = "", [], [], []
            parent.helpText = parent.acknowledgementText = ""

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    import unittest
    slm.ScriptedLoadableModule, slm.ScriptedLoadableModuleWidget = ScriptedLoadableModule, ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleLogic, unittest.TestCase
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm

    class Application:
        """qSlicerApplication, as far as a module's constructor may use it: it exists before any module is
        instantiated, and modules connect to its signals (e.g. startupCompleted())."""

        def __init__(self):
            self.connections = []

        def connect(self, signal, slot):
            self.connections.append((signal, slot))

    if not hasattr(slicer, "app"):
        slicer.app = Application()


def candidates(folder: Path) -> list:
    found = []
    for entry in sorted(Path(folder).iterdir()):
        path = entry.resolve() if entry.is_symlink() else entry
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix == ".py":
            with open(path, encoding="utf-8", errors="replace") as f:
                if f.readline().startswith("#!"):
                    continue
            found.append(path)
        elif suffix == ".pyc" and not path.with_suffix(".py").exists():
            found.append(path)
    return found


def load(path: Path) -> dict:
    name = path.name.split(".")[0]
    result = {"file": str(path), "module": name, "ok": False, "error": None, "widget": False}
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, str(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        cls = getattr(module, name, None)
        if not isinstance(cls, type):
            raise RuntimeError(f"Failed to load scripted loadable module: class {name} was not found in file {path}")
        cls(types.SimpleNamespace(path=str(path)))
        result.update(ok=True, widget=hasattr(module, name + "Widget"))
    except Exception as e:
        result["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
    return result


if __name__ == "__main__":
    _stub_host()
    for folder in sys.argv[1:]:
        for candidate in candidates(Path(folder)):
            print(json.dumps(load(candidate)), flush=True)
