"""A child process tree that speaks the core's JSON-lines progress protocol, without Qt.

Both the long-lived prediction worker (`python -m segbook.worker`) and one-off runs (`python -m segbook
finetune ... --progress json`, `segbook download`) are run through this class. Two reader threads turn
stdout into a queue of event dicts and keep the tail of stderr for error messages; the GUI drains the
queue from a QTimer (`poll()`), tests and the batch script block on `waitFor()`. Being plain Python, it
runs the same inside Slicer and in pytest on the slicer-core wheel.

Inside Slicer the interpreter is `PythonSlicer`, CTK's AppLauncher: it starts the real interpreter as a
child with the same pipes and forwards no signals, so signalling the process we started reaches only the
launcher. Hence the child is started in its own process group (POSIX) and kill() ends every process of
the tree at once (SIGKILL to the group; `taskkill /T /F` on Windows). terminate() sends SIGTERM to the
real interpreter, whose pid the child announces in its first event (`{"event": "ready"|"started", "pid"}`;
not to the group: data-loading workers must not die before the trainer saves) and, on every OS, creates
the stop file the child was told to poll (`segbook finetune --stop-file`). The run counts as running until
every process of the tree has let go of its output pipe, so a Stop still saving a checkpoint keeps Start
disabled.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

EXIT_EVENT = "exit"
_WINDOWS = os.name == "nt"


def pythonExecutable(python: Optional[str] = None) -> str:
    """The interpreter to run the core with: `python` when the user chose one (any Python environment with
    the core's dependencies), else PythonSlicer inside Slicer, else this interpreter."""
    if python:
        return str(python)
    try:
        import slicer
        if getattr(slicer, "app", None) is not None:
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


def corePackageRoot() -> str:
    """The folder holding the `segbook` package, found without importing it (importing loads torch, which
    Slicer's own Python may not have when the worker runs in another interpreter)."""
    spec = importlib.util.find_spec("segbook")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SegBook core (package `segbook`) is not importable; reinstall the extension")
    return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)


def baseEnvironment(python: Optional[str] = None) -> dict:
    """The environment a child running `python` starts from.

    Inside Slicer `os.environ` is the launcher's: PYTHONHOME, PYTHONNOUSERSITE=1 and a PYTHONPATH of Slicer's
    own standard library and site-packages (Slicer's SuperBuild External_python.cmake), and on Windows a PATH of
    Slicer's DLL folders. Slicer's own Python needs them; another interpreter (the Engine Python) dies at start
    with them, or imports Slicer's packages instead of its own, so its children start from the environment
    Slicer was started with (`slicer.util.startupEnvironment()`). Outside the application there is no launcher.
    """
    if python:
        try:
            import slicer
            if getattr(slicer, "app", None) is not None:
                return dict(slicer.util.startupEnvironment())
        except ImportError:
            pass
    return dict(os.environ)


def noWindow() -> dict:
    """Popen/run keywords that open no console window on Windows (a window flashes for each child otherwise)."""
    return {"creationflags": subprocess.CREATE_NO_WINDOW} if _WINDOWS else {}


def coreEnvironment(extra: Optional[dict] = None, python: Optional[str] = None) -> dict:
    """The environment of a child process running `python` (None: Slicer's own, see `baseEnvironment`), with
    the folder holding the `segbook` package on PYTHONPATH.

    Inside Slicer the core is shipped beside the module scripts, which are on the parent's sys.path but not
    on the child's PYTHONPATH. The child writes UTF-8 whatever the locale (Windows pipes default to the
    ANSI code page), replacing what it cannot encode.
    """
    root = corePackageRoot()
    env = baseEnvironment(python)
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8:replace"
    env.update(extra or {})
    return env


def callInCore(python: Optional[str], function: str, *args, timeout: float = 600):
    """`module:function(*args)` run in the engine's interpreter; returns its JSON-able result.

    For what Slicer's own Python cannot do when the engine runs in another one (it may have no torch, which
    every `segbook` import loads). The module folder (holding SegBookLib) and the core are on its path.
    Raises RuntimeError with the child's last words.
    """
    code = ("import importlib, json, sys; name, attr = sys.argv[1].split(':'); "
            "result = getattr(importlib.import_module(name), attr)(*json.loads(sys.argv[2])); "
            "sys.stdout.write('\\n' + json.dumps(result) + '\\n')")
    env = coreEnvironment(python=python)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env["PYTHONPATH"]])
    out = subprocess.run([pythonExecutable(python), "-c", code, function, json.dumps(list(args))],
                         capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=timeout,
                         stdin=subprocess.DEVNULL, **noWindow())
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise RuntimeError(f"{pythonExecutable(python)}: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class ProcessRunner:
    """Start a process tree, send it JSON lines, read its JSON events, stop or kill all of it.

    Events are dicts as the core emits them; when the process ends the queue receives
    `{"event": "exit", "returncode": rc, "stderr": last lines}`. Lines on stdout that are not JSON events
    are logged and dropped. `stopFile`, when given, is created by terminate(): the child polls it.
    """

    def __init__(self, args: list, env: Optional[dict] = None, cwd: Optional[str] = None,
                 stopFile: Optional[str] = None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.stopFile = Path(stopFile) if stopFile else None
        self.process: Optional[subprocess.Popen] = None
        self.killed = False
        self.interpreterPid: Optional[int] = None   # the real interpreter, from its first event with a pid
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._stderr = collections.deque(maxlen=40)
        self._finished = threading.Event()
        self._writeLock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.isRunning():
            return
        log.info("starting %s", " ".join(self.args))
        self._events, self._finished, self.killed = queue.Queue(), threading.Event(), False
        self.interpreterPid = None
        self._stderr.clear()
        if self.stopFile is not None:
            self.stopFile.unlink(missing_ok=True)
        # Windows: no console window, and taskkill /T finds the tree through the launcher; POSIX: own session
        # and process group, so that signals reach the launcher's child too
        group = noWindow() if _WINDOWS else {"start_new_session": True}
        # the child ends when this process dies (segbook.parentwatch): through the launcher, its parent
        # would be PythonSlicer, which outlives a crashed Slicer
        env = dict(os.environ if self.env is None else self.env, SEGBOOK_PARENT_PID=str(os.getpid()))
        self.process = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, encoding="utf-8", errors="replace", bufsize=1,
                                        env=env, cwd=self.cwd, **group)
        process, events, finished = self.process, self._events, self._finished
        errThread = threading.Thread(target=self._readStderr, args=(process,), daemon=True)
        outThread = threading.Thread(target=self._readStdout, args=(process, events, errThread, finished),
                                     daemon=True)
        errThread.start()
        outThread.start()

    def isRunning(self) -> bool:
        """True from start() until every process of the tree has exited (its output pipe is closed)."""
        return self.process is not None and not self._finished.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the whole tree has exited; False after `timeout` seconds."""
        return self.process is None or self._finished.wait(timeout)

    def kill(self) -> None:
        """Cancel: end the whole process tree now; returns within a second, the exit event still arrives."""
        if not self.isRunning():
            return
        self.killed = True
        pid = self.process.pid
        log.info("killing the process tree of pid %s", pid)
        try:
            if _WINDOWS:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, timeout=5,
                               creationflags=subprocess.CREATE_NO_WINDOW)
            else:
                os.killpg(pid, signal.SIGKILL)      # the group outlives its leader: pid is its id
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("kill %s: %s", pid, e)
        if self.process.poll() is None:
            self.process.kill()                     # taskkill failed, or the group could not be signalled
        # a short, bounded wait so that isRunning() is False on return; never a join on the readers
        self._finished.wait(0.5)

    def terminate(self) -> None:
        """Stop: ask the tree to end by itself without waiting (`segbook finetune` saves a checkpoint).

        Creates the stop file (every OS, through any launcher) and, on POSIX, sends SIGTERM to the real
        interpreter (the process we started until it has told its pid). On Windows a child without a stop
        file is killed: there is no SIGTERM to send.
        """
        if not self.isRunning():
            return
        log.info("asking the process tree of pid %s to stop", self.process.pid)
        if self.stopFile is not None:
            self.stopFile.parent.mkdir(parents=True, exist_ok=True)
            self.stopFile.touch()
        if not _WINDOWS:
            pid = self.interpreterPid or self.process.pid
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError as e:
                log.debug("SIGTERM %s: %s", pid, e)
        elif self.stopFile is None:
            self.kill()

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
    def _readStdout(self, process, events: "queue.Queue[dict]", errThread: threading.Thread,
                    finished: threading.Event) -> None:
        try:
            for line in process.stdout:     # ends when the last process holding the pipe has exited
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict) and "event" in event:
                    if self.interpreterPid is None and isinstance(event.get("pid"), int):
                        self.interpreterPid = event["pid"]
                    events.put(event)
                else:
                    log.info("worker: %s", line)
        except (OSError, ValueError) as e:
            log.warning("reading the output of %s: %s", self.args[0], e)
        returncode = process.wait()
        errThread.join(timeout=5)  # so that the exit event carries the whole message
        events.put({"event": EXIT_EVENT, "returncode": returncode, "stderr": self.stderrTail()})
        finished.set()

    def _readStderr(self, process) -> None:
        try:
            for line in process.stderr:
                line = line.rstrip()
                if line:
                    self._stderr.append(line)
                    log.debug("worker stderr: %s", line)
        except (OSError, ValueError) as e:
            log.warning("reading the errors of %s: %s", self.args[0], e)
