"""The progress protocol of long work (DESIGN.md): events as dicts, rendered by the face that runs it.

    {"event": "progress", "stage": "predict", "done": 3, "total": 27}
    {"event": "metric", "epoch": 4, "train_loss": 0.41, ...}
    {"event": "estimate", "seconds": 240.0, "message": "training will take about 4 min more on cpu ..."}
    {"event": "done", ...}
    {"event": "error", "message": "..."}

Library code calls a Reporter; the CLI picks how events are shown (`--progress bar|json|none`) and the
Slicer worker reads the json form one line at a time from stdout.
"""
from __future__ import annotations

import json
import sys
import threading
import time

from . import parentwatch
from .errors import Cancelled

__all__ = ["Reporter", "JsonReporter", "BarReporter", "make_reporter"]


class Reporter:
    """Silent reporter; subclasses render. `cancel()` asks the running work to stop at the next check."""

    def __init__(self):
        self._cancel = threading.Event()

    def emit(self, event: dict) -> None:
        pass

    def progress(self, stage: str, done: int, total: int, **extra) -> None:
        self.check_cancelled()
        self.emit({"event": "progress", "stage": stage, "done": int(done), "total": int(total), **extra})

    def metric(self, **values) -> None:
        self.emit({"event": "metric", **values})

    def done(self, **values) -> None:
        self.emit({"event": "done", **values})

    def error(self, message: str) -> None:
        self.emit({"event": "error", "message": message})

    def cancel(self) -> None:
        self._cancel.set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled")


class JsonReporter(Reporter):
    """One JSON object per line on a stream (stdout by default), flushed at once."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stdout

    def emit(self, event: dict) -> None:
        try:
            self.stream.write(json.dumps(event, default=float) + "\n")
            self.stream.flush()
        except BrokenPipeError:     # the Slicer module that reads us died: stop as it asks (segbook.parentwatch)
            if not parentwatch.output_lost():
                raise


class BarReporter(Reporter):
    """A one-line text progress bar per stage on stderr; metrics and errors as plain lines."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self._stage, self._t0 = None, time.monotonic()

    def emit(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress":
            if event["stage"] != self._stage:
                self._stage, self._t0 = event["stage"], time.monotonic()
            total = max(event["total"], 1)
            frac = min(event["done"] / total, 1.0)
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{event['stage']:>12} [{bar:<30}] {event['done']}/{event['total']} "
                              f"{time.monotonic() - self._t0:6.1f}s")
            if event["done"] >= event["total"]:
                self.stream.write("\n")
        elif kind == "estimate":
            self.stream.write(event["message"] + "\n")
        elif kind == "metric":
            self.stream.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in event.items() if k != "event") + "\n")
        self.stream.flush()


def make_reporter(mode: str) -> Reporter:
    """`bar`, `json` or `none`, as the CLI's --progress flag."""
    return {"bar": BarReporter, "json": JsonReporter, "none": Reporter}[mode]()
