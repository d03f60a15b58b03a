"""Clicks in Slicer: positive/negative points and a box, each placement one request to the warm worker.

The prompts live in markups nodes (two point lists, one ROI) that the user places in any view; every
placement (or the end of a drag) sends all prompts so far, with the segment's current voxels as "previous",
to the worker that Segment uses (`SegmentationLogic`: one worker, one model in memory). The answer, one
structure on the input volume's grid, replaces that segment's voxels in place; a new segment takes the
model's class name, colour and terminology. An undo state is saved before each update, as Segment Editor
effects do, so that the Segment Editor's Undo steps back click by click.

A click while another is in flight is not sent at once: only the latest prompts matter, so the answer in
flight is dropped when it arrives and the newest prompts go out instead. The input volume is written once
per image (the worker keeps the image prepared for the next click while its file is unchanged).

Coordinates: markups give world RAS; the worker takes LPS mm in the volume's own frame (its parent
transforms undone, as for the ROI of Segment), i.e. x and y negated. No Qt here: the panel drains answers
with `poll()` from a QTimer, tests block with `wait()`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import NodeIO
from .EditorUndo import EditorUndo
from .SegmentationLogic import SegmentationError

log = logging.getLogger(__name__)

KIND = "click"      # SegmentationLogic job kind of a click request


# -- coordinates ----------------------------------------------------------------------------------------
def worldRasToLps(points, volumeNode) -> list:
    """World RAS points -> LPS mm in the volume's local frame (parent transforms undone), as the worker takes."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    local = np.c_[points, np.ones(len(points))] @ NodeIO._worldToLocal(volumeNode).T
    return [[float(v) for v in p] for p in local[:, :3] @ NodeIO.RAS_TO_LPS.T]


def definedPointsWorld(pointListNode) -> list:
    """The world RAS positions of a point list's placed points (not those still being placed)."""
    if pointListNode is None:
        return []
    out = []
    for i in range(pointListNode.GetNumberOfControlPoints()):
        if pointListNode.GetNthControlPointPositionStatus(i) == pointListNode.PositionDefined:
            p = [0.0, 0.0, 0.0]
            pointListNode.GetNthControlPointPositionWorld(i, p)
            out.append(p)
    return out


def volumeToSegmentationMatrix(volumeNode, segmentationNode) -> np.ndarray:
    """4x4 from the volume's local frame to the segmentation's (identity when both share a parent)."""
    import slicer
    import vtk
    m = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode(), m):
        raise SegmentationError("the volume and the segmentation are under a non-linear transform; harden it first")
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# -- the segment --------------------------------------------------------------------------------------------
def setSegmentMask(segmentationNode, segmentId: str, mask: np.ndarray, ijkToRas: np.ndarray) -> None:
    """Replace a segment's voxels with `mask` ((z, y, x) 0/1 on the grid `ijkToRas`, in the segmentation's
    frame): the call Segment Editor effects make (SetBinaryLabelmapToSegment, replace mode, the whole grid's
    extent, so voxels outside the new mask are cleared too)."""
    import slicer
    import vtk
    from vtk.util import numpy_support
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().DeepCopy(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True))
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijkToRas[r, c]))
    image.SetImageToWorldMatrix(matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE,
                                            image.GetExtent()):
        raise SegmentationError(f"could not update segment '{segmentId}' of '{segmentationNode.GetName()}'")


class InteractiveLogic:
    """One segment edited by clicks. See the module docstring.

    `begin` chooses the volume, segmentation, segment (None: a new one, made from the first answer), the
    Segment parameters and the model's class names; `observe` connects the markups nodes; each placement
    calls `click`. `poll` returns the outcomes of the answers received ({"ok", "message", "segmentId",
    "class", "voxels", "seconds", "tiles": network runs})."""

    def __init__(self, segmentationLogic, scene, undo: Optional[EditorUndo] = None):
        self.segmentation = segmentationLogic
        self.scene = scene
        self.undo = undo or EditorUndo(scene)
        self.volume = self.segmentationNode = self.segmentId = self.params = None
        self.classNames: list = []
        self.pending: Optional[dict] = None     # the newest prompts, waiting for the answer in flight
        self.active: Optional[str] = None       # the request id in flight
        self.sent: Optional[dict] = None        # its prompts
        self._ids = 0
        self._input = None                      # (key of the exported volume, its file)
        self._inputDir: Optional[Path] = None
        self._observed: list = []
        self._nodes = (None, None, None)
        self.messages: list = []                # outcomes of placements that sent nothing

    # -- target ---------------------------------------------------------------------------------------
    def begin(self, volumeNode, segmentationNode, segmentId: Optional[str], params, classNames=()) -> None:
        if volumeNode is None:
            raise SegmentationError("select an input volume")
        if segmentationNode is None:
            raise SegmentationError("select or create the output segmentation")
        if not params.model:
            raise SegmentationError("select a model")
        self.volume, self.segmentationNode, self.segmentId, self.params = volumeNode, segmentationNode, \
            segmentId or None, params
        self.classNames = list(classNames)
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            # a new segmentation: on the input's grid, under its transform (as Segment makes it)
            parent = volumeNode.GetParentTransformNode()
            segmentationNode.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        self.undo.attach(segmentationNode, volumeNode)

    def finishSegment(self) -> None:
        """The next click starts a new segment."""
        self.segmentId = None

    def className(self) -> Optional[str]:
        """The class to ask for: the segment's name when the model has a class of that name."""
        if self.segmentId is None:
            return None
        segment = self.segmentationNode.GetSegmentation().GetSegment(self.segmentId)
        name = segment.GetName() if segment is not None else None
        return name if name in self.classNames[1:] else None

    # -- markups ------------------------------------------------------------------------------------
    def observe(self, positiveNode, negativeNode, roiNode=None) -> None:
        """Send a request whenever a point is placed, or a point or the box has been dragged."""
        self.unobserve()
        self._nodes = (positiveNode, negativeNode, roiNode)
        for node in self._nodes:
            if node is None:
                continue
            for event in (node.PointPositionDefinedEvent, node.PointEndInteractionEvent):
                self._observed.append((node, node.AddObserver(event, self.onPlaced)))

    def unobserve(self) -> None:
        for node, tag in self._observed:
            node.RemoveObserver(tag)
        self._observed = []

    def onPlaced(self, caller, event) -> None:
        try:
            self.clickFromNodes()
        except SegmentationError as e:          # a message for the panel: nothing is sent
            self.messages.append({"ok": False, "message": str(e)})

    def clickFromNodes(self) -> Optional[str]:
        positive, negative, roi = self._nodes
        box = roi if roi is not None and min(roi.GetSize()) > 0 and roi.GetNumberOfDefinedControlPoints() else None
        return self.click(definedPointsWorld(positive), definedPointsWorld(negative), box)

    # -- requests -----------------------------------------------------------------------------------
    def click(self, positiveRas, negativeRas=(), roiNode=None) -> Optional[str]:
        """Send all prompts so far (world RAS points, a markups ROI); returns the request id, or None when
        they wait for the answer in flight."""
        if self.volume is None:
            raise SegmentationError("choose the segment to edit first")
        if not len(positiveRas) and roiNode is None:
            raise SegmentationError("place a positive point or a box first")
        prompts = {"points": worldRasToLps(positiveRas, self.volume) if len(positiveRas) else [],
                   "negative_points": worldRasToLps(negativeRas, self.volume) if len(negativeRas) else [],
                   "box_lps": NodeIO.roiToLpsBox(roiNode, self.volume) if roiNode is not None else None}
        if self.active is not None and self._mine():
            # one placement can raise several events (defined, end of interaction): the same prompts go once
            self.pending = None if prompts == self.sent else prompts
            return None
        return self._send(prompts)

    def _send(self, prompts: dict) -> str:
        lg = self.segmentation
        if lg.isBusy() or (lg.job is not None and lg.job["kind"] != KIND):    # running, or its result not yet in
            raise SegmentationError("a segmentation is running; click again when it has finished")
        lg._forgetJob()     # a click's answer nobody collected (its temporary folder goes)
        inputPath = self._inputFile()
        tmp = Path(tempfile.mkdtemp(prefix="segbook-click-"))
        try:
            previous = self._writePrevious(tmp / "previous.nrrd")
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._ids += 1
        requestId = f"click{self._ids}"
        name = self.className()
        request = self.params.request(requestId, inputPath, tmp / "click.nrrd")
        request.update(prompts, statistics=False, roi_lps=None, classes=[name] if name else None,
                       previous=str(previous) if previous else None)
        lg._send(requestId, request, tmp, self.volume, kind=KIND, output=tmp / "click.nrrd")
        lg.job["segmentation"] = self.segmentationNode
        self.active, self.sent, self.pending = requestId, prompts, None
        log.info("click %s sent: %s", requestId, prompts)
        return requestId

    def _inputFile(self) -> Path:
        """The volume as a file, written again only when its voxels or geometry changed (the worker keeps a
        prepared image per file)."""
        image = self.volume.GetImageData()
        key = (self.volume.GetID(), id(self.volume), image.GetMTime() if image is not None else None,
               NodeIO.ijkToRasArray(self.volume).tobytes())
        if self._input is None or self._input[0] != key:
            if self._inputDir is None:
                self._inputDir = Path(tempfile.mkdtemp(prefix="segbook-clicks-"))
            self._input = None
            path = NodeIO.writeVolume(self.volume, self._inputDir / "input.nrrd", compress=False)
            self._input = (key, path)
        return self._input[1]

    def _writePrevious(self, path: Path) -> Optional[Path]:
        """The segment's voxels on the input's grid, or None when it has none yet."""
        if self.segmentId is None or self.segmentationNode.GetSegmentation().GetSegment(self.segmentId) is None:
            self.segmentId = None
            return None
        mask = NodeIO.segmentMask(self.segmentationNode, self.segmentId, self.volume)
        return NodeIO.writeLabels(mask, self.volume, path) if mask.any() else None

    # -- answers ------------------------------------------------------------------------------------
    def isBusy(self) -> bool:
        return self.active is not None

    def poll(self) -> list:
        """Outcomes of the answers received since the last call (non-blocking)."""
        if self.active is not None and self._mine():
            self.segmentation.poll()
        return self._collect()

    def wait(self, timeout: float = 120) -> list:
        """Block until no click is in flight or waiting; returns the outcomes."""
        deadline = time.monotonic() + timeout
        out = []
        while self.active is not None and self._mine():
            self.segmentation.wait(timeout=max(deadline - time.monotonic(), 0.01))
            out += self._collect()
        return out + self._collect()

    def _mine(self) -> bool:
        job = self.segmentation.job
        if job is None or job["id"] != self.active:
            # cancelled (the worker killed) or replaced: the click and what waited for it are gone
            self.active = self.pending = None
            return False
        return True

    def _collect(self) -> list:
        out, self.messages = list(self.messages), []
        job = self.segmentation.job
        if self.active is None or job is None or job["id"] != self.active or job["final"] is None:
            return out
        final = job["final"]
        self.active = None
        if self.pending is not None:        # newer prompts came in: this answer is out of date
            self.segmentation._forgetJob()
            try:
                self._send(self.pending)
            except SegmentationError as e:
                self.pending = None
                out.append({"ok": False, "message": str(e)})
            return out
        try:
            out.append(self._apply(final, job["output"]))
        finally:
            self.segmentation._forgetJob()
        return out

    def _apply(self, final: dict, output: Path) -> dict:
        if final.get("event") != "done":
            return {"ok": False, "message": final.get("message", "the click failed")}
        node = self.segmentationNode
        if not self.scene.IsNodePresent(self.volume) or not self.scene.IsNodePresent(node):
            return {"ok": False, "message": "the volume or the segmentation left the scene; nothing was changed"}
        sidecar = final.get("result") or {}
        info = sidecar.get("result") or {}
        labels, ijkToRas = NodeIO.readLabelArray(output)
        mask = (labels == int(info.get("value", 0))) & (labels != 0)
        self.undo.save()
        segmentation = node.GetSegmentation()
        if self.segmentId is None or segmentation.GetSegment(self.segmentId) is None:
            self.segmentId = self._newSegment(segmentation, info, sidecar.get("labels") or [])
        setSegmentMask(node, self.segmentId, mask.astype(np.uint8),
                       volumeToSegmentationMatrix(self.volume, node) @ ijkToRas)
        warnings = info.get("warnings") or []
        message = (f"{segmentation.GetSegment(self.segmentId).GetName()}: {int(mask.sum())} voxels "
                   f"({info.get('class')}, {final.get('seconds', final.get('elapsed'))} s)")
        return {"ok": True, "message": "; ".join([message] + warnings), "segmentId": self.segmentId,
                "class": info.get("class"), "voxels": int(mask.sum()), "seconds": final.get("seconds"),
                "tiles": info.get("tiles"),
                "warnings": warnings}

    @staticmethod
    def _newSegment(segmentation, info: dict, table: list) -> str:
        """A segment named, coloured and coded after the model's class."""
        entry = next((c for c in table if int(c.get("value", -1)) == int(info.get("value", 0))), {})
        name = info.get("class") or entry.get("name") or "segment"
        segmentId = segmentation.AddEmptySegment("", name)
        segment = segmentation.GetSegment(segmentId)
        if entry.get("color"):
            segment.SetColor(*[c / 255.0 for c in entry["color"]])
        term = NodeIO.terminologyString(entry.get("terminology"))
        if term:
            NodeIO.setSegmentTerminology(segment, term)
        return segmentId

    # -- end ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Forget the clicks (the worker stays: it is Segment's) and remove the temporary files."""
        self.unobserve()
        self.undo.release()
        if self._inputDir is not None:
            shutil.rmtree(self._inputDir, ignore_errors=True)
        self._inputDir, self._input, self.active, self.pending = None, None, None, None
