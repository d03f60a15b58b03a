"""A long-lived prediction worker: `python -m segbook.worker`, driven by JSON lines on stdin.

The Slicer module starts one worker and keeps it alive between clicks, so the second Segment click on the
same model pays no start-up (imports, weight loading). Requests, one JSON object per line on stdin:

    {"id": "r1", "command": "predict", "input": "in.nrrd", "output": "out.nrrd", "model": "NAME|DIR",
     "checkpoint": null, "device": "auto", "tta": false, "classes": ["liver"], "roi_lps": [x0,y0,z0,x1,y1,z1],
     "statistics": false, "series": null, "backend": "auto", "precision": "auto"}
                                               (statistics: per-structure statistics in the result and a CSV;
                                                series: the DICOM Series Instance UID, for a folder of several;
                                                an output ending .dcm: a DICOM SEG of a DICOM series input)
    {"id": "c1", "command": "predict", "input": ..., "output": "click.nrrd", "model": ..., "classes": ["NAME"],
     "points": [[x, y, z], ...], "negative_points": [...], "box_lps": [x0,y0,z0,x1,y1,z1],
     "previous": "labels file"}             (clicks, LPS mm: one structure, its label value, on the input's
                                                grid; the image stays prepared for the next click on it)
    {"id": "r2", "command": "dicom_seg", "labels": "labels.nrrd", "sources": ["1.dcm", ...],
     "output": "seg.dcm", "classes": [{"value", "name", "color", "terminology"}], "model": "...",
     "version": "..."}                         (a DICOM SEG of an existing label map, e.g. one corrected in
                                                Slicer, referencing the instances it lies on; no model loaded)
    {"id": "r3", "command": "ping"}
    {"command": "shutdown"}

Events, one JSON object per line on stdout (the core's progress protocol, see `segbook.events`), each
tagged with the request id it belongs to:

    {"event": "ready", "pid": 123}                                   once, at start
    {"event": "progress", "request": "r1", "stage": "predict", "done": 3, "total": 27}
    {"event": "loaded", "request": "r1", "model": "...", "reused": true, "seconds": 0.0}
    {"event": "done", "request": "r1", "result": {...sidecar...}, "seconds": 4.2, "reused": true}
    {"event": "error", "request": "r1", "message": "one line"}

A failed request answers with an error event and the worker goes on serving. Cancelling is done by the
client killing the process: predict_file writes its outputs atomically, so nothing half-written is left.
Anything else printed to stdout by libraries is redirected to stderr so the event stream stays clean.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from . import dicom_seg, parentwatch
from .errors import SegBookError
from .events import JsonReporter

__all__ = ["Worker", "main"]

# the fields of a predict request that make it a click (segbook.interactive)
_PROMPTS = ("points", "negative_points", "box_lps", "previous")
# the predict request's fields of one type (a request's JSON may hold anything; "false" would be true)
_TEXT = ("input", "output", "model", "checkpoint", "series", "device", "backend", "precision", "previous")
_FLAGS = ("tta", "statistics")

log = logging.getLogger(__name__)


class _TaggedReporter(JsonReporter):
    """JSON events tagged with the current request id.

    The worker emits the terminal `done`/`error` of each request itself (with the sidecar and timings);
    terminal events raised inside the core are passed on under the name `stage-done` so that a client
    waiting for `done` never sees two.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self.request = None

    def emit(self, event: dict) -> None:
        event = dict(event)
        if self.request is not None and "request" not in event:
            event["request"] = self.request
        super().emit(event)

    def done(self, **values) -> None:
        self.emit({"event": "stage-done", **values})

    def error(self, message: str) -> None:
        self.emit({"event": "warning", "message": message})

    def send(self, event: dict) -> None:
        """A terminal event of the worker itself."""
        super().emit(event)


class Worker:
    """Serves requests, keeping the last Predictor loaded: the same model again pays no start-up."""

    def __init__(self, out_stream):
        self.reporter = _TaggedReporter(out_stream)
        self._key = None                # (model, checkpoint, device, backend, precision) of the loaded Predictor
        self._predictor_obj = None
        self._session = None            # the last prompted image's FileSession (segbook.click_file)

    # -- requests -------------------------------------------------------------------------------------
    def handle(self, request: dict) -> bool:
        """Serve one request; False when the worker should stop."""
        command = request.get("command")
        rid = request.get("id")
        self.reporter.request = rid
        t0 = time.monotonic()
        try:
            if command == "shutdown":
                return False
            if command == "ping":
                self.reporter.send({"event": "done", "request": rid, "result": {"pid": os.getpid()},
                                    "seconds": 0.0})
            elif command == "dicom_seg":
                result = self._dicom_seg(request)
                self.reporter.send({"event": "done", "request": rid, "result": result,
                                    "seconds": round(time.monotonic() - t0, 3)})
            elif command == "predict":
                result, reused = self._predict(request)
                self.reporter.send({"event": "done", "request": rid, "result": result, "reused": reused,
                                    "seconds": round(time.monotonic() - t0, 3)})
            else:
                raise SegBookError(f"unknown command '{command}' (predict, dicom_seg, ping or shutdown)")
        except SegBookError as e:
            self.reporter.send({"event": "error", "request": rid, "message": str(e)})
        except Exception as e:  # a bug or an unexpected library error: report it, keep serving
            log.exception("request %s failed", rid)
            first = str(e).splitlines()[0] if str(e) else ""
            self.reporter.send({"event": "error", "request": rid, "message": f"{type(e).__name__}: {first}"})
        finally:
            self.reporter.request = None
            if "torch" in sys.modules:      # torch is imported with the first model, not for a ping
                # Slicer renders on the same GPU: hand the request's cached blocks back (the model stays).
                from .runners import release_memory
                release_memory()
        return True

    def _predictor(self, request: dict):
        """The Predictor for (model, checkpoint, device, backend, precision), loaded once; TTA is a per-request
        setting."""
        from .inference import Predictor

        model, checkpoint = str(request["model"]), request.get("checkpoint") or None
        key = (model, checkpoint, request.get("device") or "auto", request.get("backend") or "auto",
               request.get("precision") or "auto")
        reused = self._key == key
        if not reused:
            self._predictor_obj, self._key, self._session = None, None, None    # one model in memory at a time
            t0 = time.monotonic()
            self._predictor_obj = Predictor(model, checkpoint=checkpoint, device=key[2], reporter=self.reporter,
                                            backend=key[3], precision=key[4])
            self._key = key
            self.reporter.emit({"event": "loaded", "model": model, "reused": False,
                                "device": str(self._predictor_obj.device),
                                "seconds": round(time.monotonic() - t0, 3)})
        self._predictor_obj.tta = bool(request.get("tta", False))
        return self._predictor_obj, reused

    def _predict(self, request: dict):
        for field in ("input", "output", "model"):
            if not request.get(field):
                raise SegBookError(f"predict request without '{field}'")
        _check_types(request)
        from .io import check_exists, check_writable
        check_exists(request["input"])      # both before loading a model or reading the image
        check_writable(request["output"])
        if dicom_seg.is_seg_output(request["output"]):
            dicom_seg.read_source_series(request["input"], request.get("series") or None)    # refused before a model is loaded
        predictor, reused = self._predictor(request)
        classes = request.get("classes") or None
        if any(request.get(k) for k in _PROMPTS):
            return self._prompted(predictor, request, classes), reused
        roi = request.get("roi_lps") or None
        result = predictor.predict_file(request["input"], request["output"], roi_lps=roi, classes=classes,
                                        statistics=bool(request.get("statistics", False)),
                                        series=request.get("series") or None)
        return result, reused

    def _prompted(self, predictor, request: dict, classes) -> dict:
        """One structure from clicks; the image's session (preprocessing, tiles) is kept for the next click."""
        from .click_file import FileSession
        if request.get("roi_lps"):
            raise SegBookError("a predict request with prompts takes no roi_lps (use box_lps)")
        if classes and len(classes) > 1:
            raise SegBookError("a predict request with prompts names one class")
        series = request.get("series") or None
        if self._session is None or not self._session.matches(predictor, request["input"], series):
            self._session = None
            self._session = FileSession(predictor, request["input"], series=series)
        return self._session.segment(request["output"], points_lps=request.get("points") or [],
                                     negative_points_lps=request.get("negative_points") or [],
                                     box_lps=request.get("box_lps") or None, previous=request.get("previous"),
                                     class_name=classes[0] if classes else None)

    @staticmethod
    def _dicom_seg(request: dict) -> dict:
        for field in ("labels", "sources", "output", "classes", "model"):
            if not request.get(field):
                raise SegBookError(f"dicom_seg request without '{field}'")
        if not dicom_seg.is_seg_output(request["output"]):
            raise SegBookError(f"{request['output']}: a DICOM SEG file name ends in {dicom_seg.SUFFIX}")
        return dicom_seg.write_seg_of_label_file(request["labels"], request["sources"], request["classes"],
                                                 request["output"], model=str(request["model"]),
                                                 version=str(request.get("version") or request["model"]))

    # -- loop -----------------------------------------------------------------------------------------
    def serve(self, in_stream) -> None:
        self.reporter.send({"event": "ready", "pid": os.getpid()})
        for line in in_stream:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self.reporter.send({"event": "error", "request": None, "message": f"bad request line ({e})"})
                continue
            if not self.handle(request):
                break


def _check_types(request: dict) -> None:
    """SegBookError naming the first field of a predict request of the wrong type (points and boxes are
    checked where they are read)."""
    def wrong(field, needed):
        return SegBookError(f"predict request field '{field}': {needed} is needed, got {request[field]!r}")
    for field in _TEXT:
        if request.get(field) is not None and not isinstance(request[field], str):
            raise wrong(field, "text")
    for field in _FLAGS:
        if request.get(field) is not None and not isinstance(request[field], bool):
            raise wrong(field, "true or false")
    classes = request.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise wrong("classes", "a list of class names")


def main(argv=None) -> int:
    # UTF-8 both ways whatever the locale (Windows pipes default to the ANSI code page); a byte that does
    # not decode becomes U+FFFD instead of killing the loop, a character that does not encode becomes "?"
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    logging.basicConfig(level=logging.INFO if os.environ.get("SEGBOOK_WORKER_VERBOSE") else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    parentwatch.watch()         # started by the Slicer module: end with it, even in the middle of a request
    out = sys.stdout
    sys.stdout = sys.stderr     # stray prints of libraries must not corrupt the event stream
    Worker(out).serve(sys.stdin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
