"""Segment a volume node with the core, in a long-lived worker process, into a segmentation node.

A Segment click: the volume node is written to a temporary NRRD (exact voxels and geometry, LPS), the
worker (`python -m segbook.worker`) runs `Predictor.predict_file` on it, and the label map + class table it
writes become a segmentation node: one segment per structure found, named, coloured, terminology-coded,
with the input volume as reference geometry, and (statistics on) a table node of per-structure volumes and
intensities. The worker stays alive between clicks with the model loaded.

DICOM SEG: `startDicomSeg` sends the segmentation as it is now (corrections included) to the worker, which
writes a SEG referencing the DICOM instances the volume was loaded from (Slicer's DICOM database knows their
files); `segbook predict -o seg.dcm` does it headlessly. Slicer's own DICOM export (with QuantitativeReporting)
works on the same node too: reference geometry = the volume, terminology-coded segments.

The scene is only touched when a result is applied, so Cancel (which kills the worker) leaves it as it
was. The logic takes the scene and nodes as arguments and has no Qt: the widget drains events from a
QTimer with `poll()`, the batch script and the tests block with `wait()`.
"""
from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from . import NodeIO
from .Parameters import SegmentParameters
from .ProcessRunner import EXIT_EVENT, ProcessRunner, coreEnvironment, pythonExecutable
from .StatisticsTable import updateStatisticsTable

log = logging.getLogger(__name__)


class SegmentationError(RuntimeError):
    """A failed segmentation; the message is the worker's one-line error."""


def defaultWorker(python: Optional[str] = None) -> ProcessRunner:
    """The worker process; `python` is the interpreter to run it with (default: Slicer's own)."""
    return ProcessRunner([pythonExecutable(python), "-m", "segbook.worker"], env=coreEnvironment(python=python))


def referenceVolume(segmentationNode):
    """The volume whose grid the segmentation was made on (its reference image geometry node), if still in
    the scene."""
    role = segmentationNode.GetReferenceImageGeometryReferenceRole()
    node = segmentationNode.GetNodeReference(role)
    return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None


class SegmentationLogic:
    _ids = itertools.count(1)

    def __init__(self, workerFactory: Optional[Callable[[], ProcessRunner]] = None, python: Optional[str] = None):
        self.python = python or None     # the engine's interpreter, for the next worker started
        self._workerFactory = workerFactory or (lambda: defaultWorker(self.python))
        self.worker: Optional[ProcessRunner] = None
        self.job: Optional[dict] = None
        self.lastEvent: Optional[dict] = None    # last progress event of the running job (stage, done, total)

    # -- state ------------------------------------------------------------------------------------
    def isBusy(self) -> bool:
        return self.job is not None and self.job.get("final") is None

    def workerPid(self) -> Optional[int]:
        return self.worker.process.pid if self.worker is not None and self.worker.isRunning() else None

    # -- run --------------------------------------------------------------------------------------
    def start(self, volumeNode, params: SegmentParameters, roiNode=None, segmentationNode=None) -> str:
        """Export the volume and send a predict request; returns the request id. Does not touch the scene.

        The job holds the volume and output nodes themselves (`job["volume"]`, `job["segmentation"]`), not
        their IDs: Close Scene resets the ID counter, so the next volume loaded gets the closed one's ID."""
        if self.isBusy():
            raise SegmentationError("a segmentation is already running")
        if volumeNode is None:
            raise SegmentationError("select an input volume")
        if not params.model:
            raise SegmentationError("select a model")
        roi = NodeIO.roiToLpsBox(roiNode, volumeNode) if roiNode is not None else None
        tmp = Path(tempfile.mkdtemp(prefix="segbook-"))
        try:
            inputPath = NodeIO.writeVolume(volumeNode, tmp / "input.nrrd", compress=False)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        requestId = f"seg{next(self._ids)}"
        self._send(requestId, params.request(requestId, inputPath, tmp / "labels.nrrd", roi), tmp, volumeNode,
                   kind="segment", output=tmp / "labels.nrrd")
        self.job["segmentation"] = segmentationNode
        log.info("request %s sent (%s, roi %s)", requestId, params.model, roi)
        return requestId

    def startDicomSeg(self, volumeNode, segmentationNode, outputPath, model: str, version: str = "",
                      fileForInstance: Optional[Callable[[str], str]] = None) -> str:
        """Send the segmentation, as it is now, to be written as a DICOM SEG at `outputPath` referencing the
        DICOM instances of the volume it was made on: its reference geometry volume, as Slicer's own DICOM SEG
        export takes it (`volumeNode`, the panel's input, only when it has none). The volume's
        "DICOM.instanceUIDs" are resolved to files by `fileForInstance` (default: Slicer's DICOM database).
        Returns the request id; `finishDicomSeg` ends it."""
        if self.isBusy():
            raise SegmentationError("a segmentation is already running")
        if segmentationNode is not None:
            volumeNode = referenceVolume(segmentationNode) or volumeNode
        if volumeNode is None or segmentationNode is None:
            raise SegmentationError("select the input volume and the segmentation to export")
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids:
            raise SegmentationError(f"volume '{volumeNode.GetName()}' was not loaded from DICOM: a DICOM SEG must "
                                    f"reference the images it lies on (load the series with the DICOM module)")
        if not str(outputPath).lower().endswith(".dcm"):
            raise SegmentationError(f"{outputPath}: a DICOM SEG file name ends in .dcm")
        if fileForInstance is None:
            import slicer
            fileForInstance = slicer.dicomDatabase.fileForInstance
        files = [fileForInstance(uid) for uid in uids]
        if not all(files):
            raise SegmentationError(f"{files.count('') + files.count(None)} of the {len(uids)} DICOM instances of "
                                    f"'{volumeNode.GetName()}' are no longer in the DICOM database")
        labels, table = NodeIO.segmentsToLabels(segmentationNode, volumeNode)
        if not labels.any():
            raise SegmentationError(f"'{segmentationNode.GetName()}' is empty: nothing to export")
        tmp = Path(tempfile.mkdtemp(prefix="segbook-"))
        try:
            labelsPath = NodeIO.writeLabels(labels, volumeNode, tmp / "labels.nrrd")
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        requestId = f"dicomseg{next(self._ids)}"
        request = {"id": requestId, "command": "dicom_seg", "labels": str(labelsPath), "sources": files,
                   "output": str(outputPath), "classes": table, "model": model, "version": version or model}
        self._send(requestId, request, tmp, volumeNode, kind="dicom_seg", output=Path(outputPath))
        return requestId

    def finishDicomSeg(self) -> dict:
        """The finished DICOM SEG job's result ({"output", "segments"}); SegmentationError if it failed."""
        if self.job is None or self.job["final"] is None or self.job["kind"] != "dicom_seg":
            raise SegmentationError("no finished DICOM SEG export")
        final = self.job["final"]
        self._forgetJob()
        if final.get("event") != "done":
            raise SegmentationError(final.get("message", "DICOM SEG export failed"))
        return final.get("result") or {}

    def _send(self, requestId: str, request: dict, tmp: Path, volumeNode, kind: str, output: Path) -> None:
        if self.worker is not None and self.worker.killed and not self.worker.wait(2.0):
            shutil.rmtree(tmp, ignore_errors=True)    # never two workers (and two models in GPU memory)
            raise SegmentationError("the cancelled segmentation is still stopping; try again in a moment")
        if self.worker is None or not self.worker.isRunning():
            self.worker = self._workerFactory()
            self.worker.start()
        self.job = {"id": requestId, "kind": kind, "tmp": tmp, "output": output, "t0": time.monotonic(),
                    "volume": volumeNode, "segmentation": None, "final": None}
        self.lastEvent = None
        try:
            self.worker.send(request)
        except (RuntimeError, OSError) as e:
            # the worker died on start-up; its exit event (with its last words) ends the job
            log.warning("could not send request %s: %s", requestId, e)

    def _accept(self, event: dict) -> bool:
        """Keep the events of the running job; record its final event."""
        if self.job is None:
            return False
        if event.get("event") == EXIT_EVENT:
            if self.job["final"] is None:
                stderr = (event.get("stderr") or "").strip().splitlines()
                self.job["final"] = {"event": "error", "message": "the SegBook worker stopped (exit code "
                                     f"{event.get('returncode')})" + (f": {stderr[-1]}" if stderr else "")}
            return True
        if event.get("request") != self.job["id"]:
            return False
        if event.get("event") == "progress":
            self.lastEvent = event
        if event.get("event") in ("done", "error") and self.job["final"] is None:
            self.job["final"] = dict(event, elapsed=round(time.monotonic() - self.job["t0"], 3))
        return True

    def poll(self) -> list:
        """Events of the running job received so far (non-blocking)."""
        if self.worker is None:
            return []
        return [e for e in self.worker.poll() if self._accept(e)]

    def wait(self, timeout: Optional[float] = None, onEvent: Optional[Callable[[dict], None]] = None) -> dict:
        """Block until the running job ends; returns its final event (done or error)."""
        if self.job is None:
            raise SegmentationError("nothing is running")
        if self.job["final"] is None:
            def seen(event):
                if self._accept(event) and onEvent is not None:
                    onEvent(event)
            self.worker.waitFor(lambda e: self.job["final"] is not None, timeout=timeout, onEvent=seen)
        return self.job["final"]

    def cancel(self) -> None:
        """Kill the worker (the only way to stop a prediction at once); the scene is left as it was."""
        if self.worker is not None:
            self.worker.kill()
            self.worker.poll()
        self._forgetJob()

    def _forgetJob(self) -> None:
        if self.job is not None:
            shutil.rmtree(self.job["tmp"], ignore_errors=True)
        self.job = None
        self.lastEvent = None

    def shutdown(self) -> None:
        """Ask the worker to exit (at module cleanup); kill it if it does not."""
        if self.worker is not None and self.worker.isRunning():
            try:
                self.worker.send({"command": "shutdown"})
                self.worker.closeInput()
                if not self.worker.wait(5):
                    self.worker.kill()
            except Exception:  # a stuck or dead worker: make sure it is gone
                self.worker.kill()
        self._forgetJob()

    # -- result -----------------------------------------------------------------------------------
    def applyResult(self, scene, volumeNode, segmentationNode=None, name: Optional[str] = None):
        """Turn the finished job's label map into a segmentation node (created if not given).

        Raises SegmentationError with the worker's message if the job failed, or when the input volume left
        the scene while the job ran (deleted, or the scene closed): nothing is added then. An output node
        that left the scene is replaced by a new one. The temporary files are removed either way.
        """
        if self.job is None or self.job["final"] is None or self.job["kind"] != "segment":
            raise SegmentationError("no finished segmentation to apply")
        final = self.job["final"]
        try:
            if final.get("event") != "done":
                raise SegmentationError(final.get("message", "segmentation failed"))
            if volumeNode is None or not scene.IsNodePresent(volumeNode):     # the same node, not its ID
                raise SegmentationError("the input volume was removed from the scene (deleted, or the scene "
                                        "closed) while it was being segmented; nothing was added")
            if segmentationNode is not None and not scene.IsNodePresent(segmentationNode):
                segmentationNode = None
            labels, ijkToRas = NodeIO.readLabelArray(self.job["output"])
            result = final.get("result") or {}
            classes = result.get("labels") or result.get("classes") or []
            if segmentationNode is None:
                segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                           name or f"{volumeNode.GetName()} segmentation")
            # under the volume's transform first: the label map is in the volume's local frame, and the
            # reference geometry taken from the volume is expressed in the segmentation's frame (set after,
            # the volume's transform would be baked into it and then applied a second time)
            parent = volumeNode.GetParentTransformNode()
            segmentationNode.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
            NodeIO.labelsToSegmentation(scene, labels, ijkToRas, classes, segmentationNode, volumeNode)
            if result.get("statistics") is not None:
                updateStatisticsTable(scene, segmentationNode, result["statistics"])
            segmentationNode.SetAttribute("SegBook.Elapsed", str(final.get("elapsed")))
            segmentationNode.SetAttribute("SegBook.Model", str(result.get("model") or ""))   # for a DICOM SEG
            return segmentationNode
        finally:
            self._forgetJob()

    def segment(self, scene, volumeNode, params: SegmentParameters, segmentationNode=None, roiNode=None,
                timeout: Optional[float] = None, onEvent=None):
        """Blocking: start, wait, apply. Used by the batch script and the self-test."""
        self.start(volumeNode, params, roiNode)
        try:
            self.wait(timeout=timeout, onEvent=onEvent)
        except BaseException:
            self.cancel()
            raise
        return self.applyResult(scene, volumeNode, segmentationNode)
