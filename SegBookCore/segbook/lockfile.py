"""One writer per folder: a lock file holding its owner's pid, locked by the operating system.

The lock is the operating system's (flock on POSIX, a locked byte on Windows), held by an open file: it is
released when the owner exits in any way, so the lock of a process that died is simply taken over, and a pid
reused by an unrelated process cannot keep a folder locked. The pid and host written into the file are only
for the message that names who holds it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import SegBookError

__all__ = ["FolderBusy", "FolderLock"]

_WINDOWS_BYTE = 1 << 20     # Windows locks a byte range: one far from the owner record, which stays readable


class FolderBusy(SegBookError):
    """Another process holds the folder's lock; the message names it and what to do."""


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)


class FolderLock:
    """Context manager: hold `path` (a lock file) exclusively. With `wait` (seconds) a busy lock is retried
    until then (short critical sections); without, FolderBusy at once, saying `what` holds it."""

    def __init__(self, path: str | os.PathLike, what: str = "another process", wait: float = 0.0):
        self.path, self.what, self.wait = Path(path), what, wait
        self.fd: int | None = None

    def owner(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "FolderLock":
        self.created = [p for p in self.path.parents if not p.exists()]   # removed again if left empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if _try_lock(fd):
                try:
                    if os.name == "nt" or os.path.samestat(os.fstat(fd), os.stat(self.path)):
                        break
                except FileNotFoundError:
                    pass
                # the owner we waited for removed this file as we locked it: lock the current one instead
                _unlock(fd)
                os.close(fd)
                continue
            os.close(fd)
            if time.monotonic() >= deadline:
                owner = self.owner()
                who = f"process {owner['pid']} on {owner.get('host', '?')}" if "pid" in owner else "another process"
                raise FolderBusy(f"{self.path.parent}: {who} is using it ({self.what}); wait for it to finish "
                                 f"or choose another folder")
            time.sleep(0.05)
        # ours now; a previous owner that died left its record, overwritten here
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record.encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        fd, self.fd = self.fd, None
        if fd is None:
            return False
        try:
            if os.name != "nt":     # removed while still locked, so no one can lock a file about to vanish
                os.unlink(self.path)
            for folder in self.created:     # innermost first
                os.rmdir(folder)
        except OSError:
            pass                    # a folder the job filled stays
        finally:
            _unlock(fd)
            os.close(fd)
        return False
