"""An emulation of CTK's AppLauncher as Slicer uses it for `PythonSlicer` (the host, which cannot run here).

What it does, from commontk/AppLauncher Base/ctkAppLauncher.cpp (runProcess, applicationFinished,
reportError), with no splash screen (PythonSlicer has none):
- the real interpreter is started with QProcess in ForwardedChannels + ForwardedInputChannel mode: it
  inherits the launcher's stdin, stdout and stderr (the same pipes) and stays in the launcher's process
  group (QProcess forks without a new session);
- the launcher installs no signal handler and forwards nothing: SIGTERM or SIGKILL end the launcher only,
  the real interpreter goes on (and keeps the pipes open);
- it waits for the child; a normal exit becomes the launcher's exit code, a crash exit (killed by a
  signal) prints "error: [APP] exit abnormally - Report the problem." and exits with EXIT_FAILURE (1).

And the environment it builds (buildEnvironment; ctkAppLauncherEnvironment): the settings' variables set, path
variables prepended, every variable it started with saved as APPLAUNCHER_0_<name>, from which the application
rebuilds its start-up environment (`launcher_environment`, `saved_environment`, `startup_environment`).
"""
from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

_SCRIPT = '''#!{python}
import signal, subprocess, sys
REAL = {real!r}
signal.signal(signal.SIGINT, signal.SIG_DFL)    # a Qt application has no handler: the default action
child = subprocess.Popen([REAL] + sys.argv[1:])  # same stdin/stdout/stderr, same process group
code = child.wait()
if code < 0:
    sys.stderr.write("error: [%s] exit abnormally - Report the problem.\\n" % REAL)
    sys.exit(1)
sys.exit(code)
'''


def make_launcher(folder, real: str = sys.executable, name: str = "PythonSlicer") -> Path:
    """Write an executable launcher `folder/name` that runs `real` the way PythonSlicer runs python-real."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_SCRIPT.format(python=sys.executable, real=str(real)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def descendants(pid: int) -> list:
    """Live (not zombie) descendants of `pid`, from /proc (Linux; the process helpers here need it)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has ended; only its parent has not reaped it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interpreter_pid(launcher_pid: int) -> int:
    """The real interpreter's pid: the launcher's only child."""
    kids = [p for p in descendants(launcher_pid) if _parent(p) == launcher_pid]
    assert len(kids) == 1, f"launcher {launcher_pid} has children {kids}"
    return kids[0]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])



# -- the launcher's environment (ctkAppLauncher.cpp buildEnvironment, ctkAppLauncherEnvironment.cpp) --------------
_SAVED = re.compile(r"^APPLAUNCHER_(\d+)_")


def launcher_environment(system: dict, env_vars: dict, path_vars: dict) -> dict:
    """The environment the launcher gives the application: `env_vars` set, `path_vars` (name -> list of folders)
    put before what the variable held, APPLAUNCHER_LEVEL=1, and every variable of `system` saved as
    APPLAUNCHER_0_<name> so that the application can give its children the environment it was started with."""
    env = dict(system)
    env.update(env_vars)
    for name, paths in path_vars.items():
        env[name] = os.pathsep.join(list(paths) + ([system[name]] if system.get(name) else []))
    level = int(system.get("APPLAUNCHER_LEVEL", 0)) + 1
    env["APPLAUNCHER_LEVEL"] = str(level)
    for name, value in system.items():
        if not (_SAVED.match(name) or name == "APPLAUNCHER_LEVEL"):
            env[f"APPLAUNCHER_{level - 1}_{name}"] = value
    return env


def saved_environment(current: dict, level: int = 0) -> dict:
    """ctkAppLauncherEnvironment::environment(level): the environment of that launcher level, rebuilt from the
    saved APPLAUNCHER_<level>_ variables (what qSlicerCoreApplication::startupEnvironment() returns for 0)."""
    current_level = max(int(current.get("APPLAUNCHER_LEVEL", 0) or 0), 0)
    if level == current_level:
        return dict(current)
    if level > current_level or level < 0:
        return {}
    env, restored = dict(current), []
    for name, value in current.items():
        match = _SAVED.match(name)
        if match:
            del env[name]
            if int(match.group(1)) == level:
                env[name[match.end():]] = value
                restored.append(name[match.end():])
    env.pop("APPLAUNCHER_LEVEL", None)
    if level > 0:
        env["APPLAUNCHER_LEVEL"] = str(level)
    reserved = {n for n in current if _SAVED.match(n)} | {"APPLAUNCHER_LEVEL"}
    for name in set(current) - reserved - set(restored):
        env.pop(name, None)
    return env


class ProcessEnvironment:
    """The part of QProcessEnvironment that slicer.util.startupEnvironment() uses: keys() and value()."""

    def __init__(self, values: dict):
        self._values = dict(values)

    def keys(self) -> list:
        return list(self._values)

    def value(self, name, default=""):
        return self._values.get(name, default)


def startup_environment() -> ProcessEnvironment:
    """qSlicerCoreApplication::startupEnvironment(), from this process's environment."""
    return ProcessEnvironment(saved_environment(dict(os.environ), 0))


def slicer_python_environment(system: dict, home, site_packages) -> dict:
    """What Slicer's launcher sets for its Python (SuperBuild External_python.cmake, install tree): PYTHONHOME,
    PYTHONNOUSERSITE=1, and a PYTHONPATH of Slicer's standard library and site-packages."""
    home = Path(home)
    stdlib = home / "lib" / "python3.9"
    return launcher_environment(system, {"PYTHONHOME": str(home), "PYTHONNOUSERSITE": "1"},
                                {"PYTHONPATH": [str(stdlib), str(stdlib / "lib-dynload"), str(site_packages)]})
