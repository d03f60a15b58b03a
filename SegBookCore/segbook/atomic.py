"""Verified atomic writes: a file appears under its name only once it is known to be complete.

A write goes to a temporary name in the target's folder, is flushed and fsynced (a network share may report
a failed write only then), is checked complete by `verify` (writers such as ITK's NIfTI and NRRD writers
can stop short without raising), and only then renamed over the target. On any failure the temporary file
is removed, the previous file (if any) stays as it was, and a WriteError says in one line which file could
not be written and why ("No space left on device", "File too large" under a file size limit, ...).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import SegBookError

__all__ = ["WriteError", "atomic_write", "write_bytes", "write_text", "write_json", "append_text", "fsync_path",
           "usual_permissions", "io_reason", "short_write_reason"]

log = logging.getLogger(__name__)


class WriteError(SegBookError):
    """An output that could not be written completely; nothing was replaced."""


def io_reason(e: OSError) -> str:
    """The operating system's words for a failed read or write (e.g. 'No space left on device')."""
    return e.strerror or (os.strerror(e.errno) if e.errno else str(e) or type(e).__name__)


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the mode the user's umask gives new files,
    so that outputs and model folders are readable by whoever may read the user's files."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or, best effort, a folder's) data to the disk; a deferred write error surfaces here."""
    if os.path.isdir(path):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return                      # Windows cannot open folders: renames are durable there anyway
        try:
            os.fsync(fd)
        except OSError:
            pass                        # some filesystems refuse fsync on folders; the files themselves are synced
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR)      # Windows flushes only a handle open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def short_write_reason(tmp: Path, detail: str) -> str:
    """Why a writer left `tmp` incomplete: try to add a MiB to it ourselves, so that the operating system names
    the cause (a full disk, a quota, a file size limit) that the writer kept to itself; else `detail`."""
    try:
        with open(tmp, "ab") as f:
            for _ in range(16):
                f.write(b"\0" * (1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return io_reason(e)
    return detail


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, verify: Optional[Callable[[Path], None]] = None,
                 suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, fsync it, run `verify(tmp)`
    (raises WriteError, or any SegBookError/OSError, when the file is incomplete), then rename it onto `path`.

    `suffix` ends the temporary name (writers that pick the format by extension need it). Any error removes the
    temporary file and leaves `path` untouched; OSErrors become a WriteError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        usual_permissions(tmp)
        yield tmp
        fsync_path(tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_path(path.parent)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({io_reason(e)}); nothing was replaced") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _same_bytes(data: bytes) -> Callable[[Path], None]:
    def verify(tmp: Path) -> None:
        size = os.path.getsize(tmp)
        if size != len(data):
            raise OSError(errno.EIO, short_write_reason(tmp, f"{size} of {len(data)} bytes on disk"))
        with open(tmp, "rb") as f:      # small files (sidecars, tables, lists): read back entirely
            if f.read() != data:
                raise OSError(errno.EIO, "the file read back differs from what was written")
    return verify


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, read back and compared before it replaces anything."""
    with atomic_write(path, verify=_same_bytes(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a log-like file whole or not at all: a failed append (a full disk) is cut back to where
    the file ended, so a reader never meets half a line; WriteError naming the file."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as f:     # unbuffered: nothing pending to fail again on close
            start = f.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except OSError:
                os.ftruncate(f.fileno(), start)
                raise
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({io_reason(e)}); nothing was added") from None
