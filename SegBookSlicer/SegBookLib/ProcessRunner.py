"""A child process that speaks the core's JSON-lines progress protocol, without Qt.

Both the long-lived prediction worker (`python -m segbook.worker`) and one-off fine-tuning runs
(`python -m segbook finetune ... --progress json`) are run through this class. Two reader threads turn
stdout into a queue of event dicts and keep the tail of stderr for error messages; the GUI drains the
queue from a QTimer (`poll()`), tests and the batch script block on `waitFor()`. Being plain Python, it
runs the same inside Slicer and in pytest on the slicer-core wheel.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

EXIT_EVENT = "exit"
_PERCENT = re.compile(r"(\d{1,3})%\|")


def pythonExecutable() -> str:
    """The interpreter to run the core with: PythonSlicer inside Slicer, else this interpreter."""
    try:
        import slicer
        if getattr(slicer, "app", None) is not None:
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


def coreEnvironment(extra: Optional[dict] = None) -> dict:
    """The environment of a child process, with the folder holding the `segbook` package on PYTHONPATH.

    Inside Slicer the core is shipped beside the module scripts, which are on the parent's sys.path but not
    on the child's PYTHONPATH.
    """
    import segbook
    root = str(Path(segbook.__file__).resolve().parent.parent)
    env = dict(os.environ)
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ProcessRunner:
    """Start a process, send it JSON lines, read its JSON events, kill it.

    Events are dicts as the core emits them; when the process ends the queue receives
    `{"event": "exit", "returncode": rc, "stderr": last lines}`. Lines on stdout that are not JSON events
    are logged and dropped.
    """

    def __init__(self, args: list, env: Optional[dict] = None, cwd: Optional[str] = None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._stderr = collections.deque(maxlen=40)
        self._threads: list = []
        self._writeLock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.isRunning():
            return
        log.info("starting %s", " ".join(self.args))
        self._events = queue.Queue()
        self._stderr.clear()
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        self.process = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1, env=self.env,
                                        cwd=self.cwd, creationflags=creationflags)
        process, events = self.process, self._events
        errThread = threading.Thread(target=self._readStderr, args=(process,), daemon=True)
        outThread = threading.Thread(target=self._readStdout, args=(process, events, errThread), daemon=True)
        self._threads = [errThread, outThread]
        for t in self._threads:
            t.start()

    def isRunning(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Stop the process now (Cancel / Stop); its exit event still arrives in the queue."""
        if self.isRunning():
            log.info("killing pid %s", self.process.pid)
            self.process.kill()
            self.process.wait()
        for t in self._threads:
            t.join(timeout=5)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM; a hard kill on Windows) without waiting.

        `segbook finetune` saves a checkpoint on SIGTERM, so a later --resume loses nothing.
        """
        if self.isRunning():
            log.info("terminating pid %s", self.process.pid)
            self.process.terminate()

    def send(self, message: dict) -> None:
        if not self.isRunning():
            raise RuntimeError("the SegBook worker is not running")
        with self._writeLock:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()

    def closeInput(self) -> None:
        if self.process is not None and self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def stderrTail(self) -> str:
        return "\n".join(self._stderr)

    def stderrPercent(self):
        """The last percentage a progress bar on stderr showed (huggingface_hub's tqdm: ` 42%|####  |`).

        tqdm redraws with carriage returns; text-mode pipes turn them into line ends, so every redraw
        is a line here. None until a bar has been drawn.
        """
        for line in reversed(self._stderr):
            match = _PERCENT.search(line)
            if match:
                return int(match.group(1))
        return None

    # -- events -----------------------------------------------------------------------------------
    def poll(self) -> list:
        """All events received so far, without blocking (for a QTimer in the GUI)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def waitFor(self, predicate: Callable[[dict], bool], timeout: Optional[float] = None,
                onEvent: Optional[Callable[[dict], None]] = None) -> dict:
        """Block until an event satisfies `predicate` (or the process exits); returns that event.

        Every event seen on the way is passed to `onEvent`. Raises TimeoutError after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"no answer from {self.args[0]} within {timeout} s") from None
            if onEvent is not None:
                onEvent(event)
            if predicate(event) or event.get("event") == EXIT_EVENT:
                return event

    # -- readers ----------------------------------------------------------------------------------
    def _readStdout(self, process, events: "queue.Queue[dict]", errThread: threading.Thread) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                events.put(event)
            else:
                log.info("worker: %s", line)
        returncode = process.wait()
        errThread.join(timeout=5)  # so that the exit event carries the whole message
        events.put({"event": EXIT_EVENT, "returncode": returncode, "stderr": self.stderrTail()})

    def _readStderr(self, process) -> None:
        for line in process.stderr:
            line = line.rstrip()
            if line:
                self._stderr.append(line)
                log.debug("worker stderr: %s", line)
