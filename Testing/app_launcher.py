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
"""
from __future__ import annotations

import os
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
    """Live (not zombie) descendants of `pid`, from /proc (Linux)."""
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


if os.name == "nt":  # pragma: no cover - the emulation and /proc are POSIX/Linux
    raise ImportError("the AppLauncher emulation runs on Linux")
