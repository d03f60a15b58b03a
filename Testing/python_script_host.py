"""An emulation of `Slicer --no-main-window --python-script SCRIPT ARGS...`, run as a script:
`python python_script_host.py [--raise-in MODULE:ATTR] [--without MODULE] SCRIPT ARGS...`.

What the application does (Slicer's qSlicerCoreApplication and slicer.util.exit): it runs SCRIPT as
`__main__` with sys.argv = [SCRIPT, ARGS...] and then enters its event loop. `slicer.util.exit(status)` asks
the application to exit with that status once the script has returned; `sys.exit` ends it at once; any
other exception is printed and the application keeps running: with no main window, a process that never
ends. This host reports that as exit status 99 ("would keep running") instead of hanging.

`--raise-in MODULE:ATTR` replaces that function (e.g. `SegBookLib.SegmentationLogic:SegmentationLogic.shutdown`)
by one raising RuntimeError, to reach the script's handling of an unexpected error. `--without MODULE` makes a
module unimportable in this process only (e.g. torch: Slicer's Python without PyTorch, the engine running in
another interpreter). Only the application object is stubbed; `slicer` is the real slicer-core package.
"""
from __future__ import annotations

import importlib
import runpy
import sys
import traceback
import types

KEEPS_RUNNING = 99


class _App:
    def __init__(self):
        self.status = None
        self.options = types.SimpleNamespace(runPythonAndExit=False)

    def exit(self, status=0):
        self.status = status

    def commandOptions(self):
        return self.options

    def startupEnvironment(self):
        from app_launcher import startup_environment
        return startup_environment()


def _inject(spec: str) -> None:
    module_name, attr = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {spec}")
    setattr(owner, name, fail)


def main(argv) -> int:
    import slicer
    app = slicer.app = _App()
    inject = []
    while argv[0] in ("--raise-in", "--without"):
        if argv[0] == "--without":
            sys.modules[argv[1]] = None     # `import` raises ImportError, as where it is not installed
        else:
            inject.append(argv[1])
        argv = argv[2:]
    if inject:
        sys.path.insert(0, str(__import__("pathlib").Path(argv[0]).resolve().parents[2]))
    for spec in inject:
        _inject(spec)
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    if app.status is None:
        sys.stderr.write("python_script_host: the script neither exited nor called slicer.util.exit(): "
                         "Slicer would keep running\n")
        return KEEPS_RUNNING
    return app.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
