"""Stop when the program that started us dies (Slicer crashed or was killed), not at the next line written.

The Slicer module starts the worker, fine-tuning and downloads with SEGBOOK_PARENT_PID set to Slicer's own pid.
Not os.getppid(): through PythonSlicer (CTK's AppLauncher) the parent is the launcher, which outlives Slicer. A
dead parent closes our pipes, but that is only noticed at the next write (a download, model loading or a
validation pass writes nothing for minutes) while the GPU memory stays held. A thread checks the pid every
second; when it is gone, stdout and stderr are pointed at the null device (nothing to read them: a write would
raise), `gone` is set and, unless fine-tuning has said it will stop by itself (`stop_on_death`: it saves a
checkpoint at its next iteration), the process exits at once. A progress event that finds the pipe closed
first counts the same (`output_lost`, from segbook.events): no write fails on the way to that checkpoint.
"""
from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["ENV", "gone", "watch", "stop_on_death", "output_lost"]

ENV = "SEGBOOK_PARENT_PID"
INTERVAL_S = 1.0
GRACE_S = 300.0         # how long a fine-tune that stops by itself may take to save its checkpoint

gone = threading.Event()
_stops_by_itself = threading.Event()
_watching = threading.Event()
log = logging.getLogger(__name__)


def stop_on_death(enabled: bool = True) -> None:
    """Fine-tuning's loop polls `gone` (segbook.training.stop): let it save a checkpoint before exiting."""
    (_stops_by_itself.set if enabled else _stops_by_itself.clear)()


class _Process:
    """Whether a pid still runs. Windows: a handle opened now (a later process reusing the pid is not taken for
    it); os.kill there would terminate the process instead of probing it."""

    def __init__(self, pid: int):
        self.pid, self._handle = pid, None
        if os.name == "nt":
            import ctypes
            self._kernel = ctypes.windll.kernel32
            self._handle = self._kernel.OpenProcess(0x00100000, False, pid)   # SYNCHRONIZE

    def alive(self) -> bool:
        if os.name == "nt":
            return bool(self._handle) and self._kernel.WaitForSingleObject(self._handle, 0) != 0  # WAIT_OBJECT_0
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:     # exists, owned by another user
            return True
        return True


def _silence() -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            os.dup2(null, fd)
        except OSError:
            pass


def output_lost() -> bool:
    """A write to our output pipe failed (its reader is gone): when the parent is watched, that is its death,
    seen before the next check. The output goes to the null device from now on and `gone` is set (the watch
    thread then ends the process as it would have); True. Not watched: False, the caller raises."""
    if not _watching.is_set():
        return False
    _silence()
    gone.set()
    return True


def _watch(process: _Process) -> None:
    while process.alive() and not gone.is_set():
        time.sleep(INTERVAL_S)
    while process.alive():      # the pipe broke first: the parent is going; wait for it as for any death
        time.sleep(INTERVAL_S)
    _silence()
    gone.set()
    if _stops_by_itself.is_set():
        time.sleep(GRACE_S)
    os._exit(1)


def watch() -> bool:
    """Start watching the parent named by SEGBOOK_PARENT_PID; False (nothing watched) when it is not set, as
    for a command typed in a terminal."""
    try:
        pid = int(os.environ.get(ENV) or 0)
    except ValueError:
        pid = 0
    if pid <= 0:
        return False
    process = _Process(pid)
    if not process.alive():
        _silence()
        os._exit(1)
    _watching.set()
    threading.Thread(target=_watch, args=(process,), daemon=True, name="parent-watch").start()
    return True
