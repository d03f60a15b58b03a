"""MRML nodes <-> the files and arrays the core reads, with exact geometry.

Slicer keeps volumes in RAS: a node holds a voxel array (k, j, i) = (z, y, x) and an IJK-to-RAS matrix.
The core (SimpleITK) works in LPS: array (z, y, x) plus origin/spacing/direction. Going from one to the
other flips the sign of the first two world axes; nothing is resampled or reoriented, so the voxels the
core sees are the node's voxels, in the same order.

Everything here takes the scene and nodes as arguments and uses only MRML/VTK/SimpleITK, so it runs on a
real MRML scene from the slicer-core wheel as well as inside the application.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# SegBook's own terminology contexts (Resources/Terminology/*.term.json, written by
# Utilities/generate_terminology.py from the core's SNOMED CT table and loaded at start-up): most of the
# table's codes (vertebrae, ribs, muscles...) are not in Slicer's DICOM master lists and would show as unknown.
TERMINOLOGY_CONTEXT = "Segmentation category and type - SegBook"
ANATOMIC_CONTEXT = "Anatomic codes - SegBook"


# -- geometry -----------------------------------------------------------------------------------------
def ijkToRasArray(volumeNode) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array (local coordinates, before parent transforms)."""
    import vtk
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def lpsGeometry(ijkToRas: np.ndarray):
    """(spacing xyz, origin LPS, direction LPS 3x3 whose columns are the i, j, k axes) of an IJK-to-RAS matrix."""
    linear = ijkToRas[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = RAS_TO_LPS @ (linear / spacing)
    origin = RAS_TO_LPS @ ijkToRas[:3, 3]
    return spacing, origin, direction


def ijkToRasFromImage(image) -> np.ndarray:
    """The IJK-to-RAS matrix of a SimpleITK image (LPS geometry)."""
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ direction * spacing
    m[:3, 3] = RAS_TO_LPS @ np.array(image.GetOrigin())
    return m


def setIjkToRas(volumeNode, matrix: np.ndarray) -> None:
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    volumeNode.SetIJKToRASMatrix(m)


def volumeToImage(volumeNode):
    """A SimpleITK image (LPS) holding exactly the node's voxels and local geometry."""
    import SimpleITK as sitk
    import slicer
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("the input volume has no image data")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has several components per voxel; "
                         f"SegBook models take one scalar volume")
    array = slicer.util.arrayFromVolume(volumeNode)           # (z, y, x)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, origin, direction = lpsGeometry(ijkToRasArray(volumeNode))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def writeVolume(volumeNode, path, compress: bool = True) -> Path:
    """Write the node to a file the core reads (NRRD or NIfTI by extension), no resampling. Atomic.

    Temporary hand-over files are written uncompressed (`compress=False`): gzip would cost seconds on a CT.
    """
    import SimpleITK as sitk
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(volumeToImage(volumeNode), str(tmp), useCompression=compress)
    os.replace(tmp, path)
    return path


def readLabelArray(path):
    """(labels (z, y, x) int array, IJK-to-RAS 4x4) of a label map file written by the core."""
    import SimpleITK as sitk
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), ijkToRasFromImage(image)


# -- ROI ----------------------------------------------------------------------------------------------
def _worldToLocal(volumeNode) -> np.ndarray:
    """4x4 world-to-local matrix of the volume's parent transform (identity without one)."""
    import vtk
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"volume '{volumeNode.GetName()}' is under a non-linear transform; harden it first")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def roiToLpsBox(roiNode, volumeNode) -> list:
    """[x0, y0, z0, x1, y1, z1] in LPS mm of the volume's local frame: the axis-aligned box of the ROI.

    The ROI's eight corners are taken in world RAS (its own rotation and transforms included), moved into
    the volume's frame, converted to LPS; the box around them is what the core predicts inside.
    """
    toWorld = roiNode.GetObjectToWorldMatrix()     # the object frame is centred on the ROI, axes along its sides
    objectToWorld = np.array([[toWorld.GetElement(r, c) for c in range(4)] for r in range(4)])
    size = np.array(roiNode.GetSize())
    corners = np.array([[sx, sy, sz, 1.0] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    corners[:, :3] *= size
    world = corners @ objectToWorld.T
    local = world @ _worldToLocal(volumeNode).T
    lps = local[:, :3] @ RAS_TO_LPS.T
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    return [float(v) for v in (*lo, *hi)]


DEFAULT_ROI_SIZE_MM = 100.0


def initializeRoi(roiNode, volumeNode=None) -> None:
    """Place a new ROI (the selector creates it with size 0) around the volume, in world RAS.

    The box is the volume's world bounds (its transforms included); without a volume, a 100 mm cube at the
    origin. An ROI that already has a size is left alone.
    """
    if min(roiNode.GetSize()) > 0:
        return
    lo, hi = -np.full(3, DEFAULT_ROI_SIZE_MM / 2), np.full(3, DEFAULT_ROI_SIZE_MM / 2)
    if volumeNode is not None and volumeNode.GetImageData() is not None:
        bounds = [0.0] * 6
        volumeNode.GetRASBounds(bounds)
        if all(bounds[2 * a + 1] > bounds[2 * a] for a in range(3)):
            lo, hi = np.array(bounds[0::2]), np.array(bounds[1::2])
    roiNode.SetCenter(*((lo + hi) / 2))
    roiNode.SetSize(*(hi - lo))


# -- segmentation -------------------------------------------------------------------------------------
def terminologyString(terminology: Optional[dict]) -> Optional[str]:
    """Slicer's terminology entry string for a class table entry's {"category", "type", ...} codes.

    Format (vtkSlicerTerminologiesModuleLogic): context~category~type~typeModifier~anatomicContext~region~
    regionModifier, each code as scheme^value^meaning. The same string as the core's
    `segbook.labels.terminology_entry` (this module must not import the core: it needs torch).
    """
    if not terminology or not terminology.get("category") or not terminology.get("type"):
        return None

    def code(key):
        value = terminology.get(key)
        return "^".join(value) if value else "^^"

    return "~".join([TERMINOLOGY_CONTEXT, code("category"), code("type"), code("type_modifier"),
                     ANATOMIC_CONTEXT, code("region"), code("region_modifier")])


def parseTerminology(entry: Optional[str]) -> Optional[dict]:
    """The codes of a Slicer terminology entry string (the format `terminologyString` writes, whatever the
    context names): {"category", "type", "type_modifier", "region", "region_modifier"} as
    (scheme, value, meaning) triples, absent ones left out; None when there is no category and type."""
    parts = (entry or "").split("~")
    keys = {1: "category", 2: "type", 3: "type_modifier", 5: "region", 6: "region_modifier"}
    codes = {}
    for index, key in keys.items():
        triple = parts[index].split("^") if index < len(parts) else []
        if len(triple) == 3 and triple[0] and triple[1]:
            codes[key] = tuple(triple)
    return codes if "category" in codes and "type" in codes else None


def loadTerminologyContexts(terminologiesLogic, folder) -> list:
    """Load SegBook's context files (every `*.term.json` of `folder`) into Slicer's terminologies logic.

    As SlicerTotalSegmentator does with its own context; `LoadContextFromFile` tells a category-and-type
    context from an anatomic one by the file's "@schema". Returns the files that failed to load.
    """
    failed = []
    for path in sorted(Path(folder).glob("*.term.json")):
        if not terminologiesLogic.LoadContextFromFile(str(path)):
            failed.append(str(path))
    if failed:
        log.warning("Slicer could not load the terminology context(s) %s; segments may show as unknown", failed)
    return failed


def setSegmentTerminology(segment, entry: str) -> None:
    if hasattr(segment, "SetTerminology"):          # Slicer >= 5.10
        segment.SetTerminology(entry)
    else:                                           # Slicer 5.8: the tag SetTerminology writes
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def segmentTerminology(segment) -> str:
    if hasattr(segment, "GetTerminology"):          # Slicer >= 5.10
        return segment.GetTerminology()
    # Slicer 5.8: GetTag(std::string, std::string&) fills its second argument, which VTK's Python wrapping
    # takes as a vtk.reference only (a str raises TypeError)
    import vtk
    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)


def labelsToSegmentation(scene, labels: np.ndarray, ijkToRas: np.ndarray, classes: list, segmentationNode,
                         referenceVolumeNode=None) -> list:
    """Fill `segmentationNode` (emptied first) with one segment per label value present in `labels`.

    `classes` is the sidecar's class table [{value, name, color (0-255), terminology}]. Values absent from the
    table get a generic name. Returns the segment ids, in label order. The reference geometry is taken from
    `referenceVolumeNode` so that DICOM SEG export and the Segment Editor use the input's grid.
    `ijkToRas` is in the segmentation node's own frame: a caller segmenting a transformed volume puts the
    segmentation under the volume's transform first, and the label map goes in that frame too.
    """
    import slicer
    byValue = {int(c["value"]): c for c in classes}
    present = [int(v) for v in np.unique(labels) if v != 0]
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SegBook temporary labels")
    try:
        setIjkToRas(labelmapNode, ijkToRas)
        parent = segmentationNode.GetParentTransformNode()
        labelmapNode.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
        slicer.util.updateVolumeFromArray(labelmapNode, np.ascontiguousarray(labels.astype(np.int16)))
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        if present and not logic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode):
            raise RuntimeError("importing the label map into the segmentation failed")
    finally:
        scene.RemoveNode(labelmapNode)
    ids = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        value = int(segment.GetLabelValue())
        entry = byValue.get(value, {"name": f"label_{value}", "color": None, "terminology": None})
        segment.SetName(entry["name"])
        if entry.get("color"):
            segment.SetColor(*[c / 255.0 for c in entry["color"]])
        term = terminologyString(entry.get("terminology"))
        if term:
            setSegmentTerminology(segment, term)
        ids.append((value, segmentId))
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    return [segmentId for _, segmentId in sorted(ids)]


def segmentMask(segmentationNode, segmentId: str, referenceVolumeNode) -> np.ndarray:
    """A segment's voxels on the reference volume's grid, (z, y, x) uint8 0/1."""
    return (_exportLabels(segmentationNode, [segmentId], referenceVolumeNode) > 0).astype(np.uint8)


def _exportLabels(segmentationNode, segmentIds: list, referenceVolumeNode) -> np.ndarray:
    """The segments on the reference volume's grid in one export: segment n of `segmentIds` has value n + 1,
    later ones overwrite earlier ones where they overlap (vtkSegmentation::GenerateMergedLabelmap). One call for
    all: exporting each segment separately resamples the full grid once per segment (104 times for a
    TotalSegmentator result), on the GUI thread.

    Works in the segmentation's own scene (slicer.util's helpers assume the application's scene).
    """
    import slicer
    import vtk
    scene = segmentationNode.GetScene()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SegBook temporary labels")
    try:
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmapNode, referenceVolumeNode):
            raise RuntimeError(f"cannot export the segments of '{segmentationNode.GetName()}'")
        return slicer.util.arrayFromVolume(labelmapNode).copy()
    finally:
        scene.RemoveNode(labelmapNode)


def _paintSegments(segmentationNode, referenceVolumeNode, valueOf, dtype) -> np.ndarray:
    """A (z, y, x) label array on the reference grid: segment n (in the node's order) painted with
    valueOf(n, segment) where that is not None; later segments overwrite earlier ones where they overlap."""
    import slicer
    segmentation = segmentationNode.GetSegmentation()
    chosen, values = [], [0]
    for index in range(segmentation.GetNumberOfSegments()):
        value = valueOf(index, segmentation.GetNthSegment(index))
        if value is not None:
            chosen.append(segmentation.GetNthSegmentID(index))
            values.append(value)
    if not chosen:
        return np.zeros(slicer.util.arrayFromVolume(referenceVolumeNode).shape, dtype=dtype)
    exported = _exportLabels(segmentationNode, chosen, referenceVolumeNode)
    return np.asarray(values, dtype=dtype)[exported]


def segmentationToLabels(segmentationNode, referenceVolumeNode, nameToValue: dict) -> np.ndarray:
    """A (z, y, x) label array on the reference volume's grid: each segment's voxels get its class value.

    `nameToValue` maps segment names to label values; segments not in it are ignored (the caller decides
    whether that is an error). Later segments overwrite earlier ones where they overlap.
    """
    dtype = np.uint8 if max(nameToValue.values(), default=0) < 256 else np.uint16
    return _paintSegments(segmentationNode, referenceVolumeNode,
                          lambda index, segment: nameToValue.get(segment.GetName()), dtype)


def segmentTable(segmentation) -> list:
    """The class table of a vtkSegmentation as the user sees it now: segment n (in its order) is value n + 1,
    with its name, colour (0-255) and terminology codes."""
    table = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        table.append({"value": index + 1, "name": segment.GetName(),
                      "color": [int(round(255 * c)) for c in segment.GetColor()],
                      "terminology": parseTerminology(segmentTerminology(segment))})
    return table


def segmentsToLabels(segmentationNode, referenceVolumeNode) -> tuple:
    """(labels (z, y, x) on the reference grid, class table): segment n (in the node's order) gets value n,
    with its name, colour (0-255) and terminology codes, as the user sees them now (corrections included).
    Where segments overlap, the later one wins: a label map holds one structure per voxel."""
    table = segmentTable(segmentationNode.GetSegmentation())
    labels = _paintSegments(segmentationNode, referenceVolumeNode, lambda index, segment: index + 1,
                            np.uint8 if len(table) < 256 else np.uint16)
    return labels, table


def writeLabels(labels: np.ndarray, referenceVolumeNode, path) -> Path:
    """Write a (z, y, x) label array with the reference volume's geometry (LPS file). Atomic."""
    import SimpleITK as sitk
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    spacing, origin, direction = lpsGeometry(ijkToRasArray(referenceVolumeNode))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction.ravel()])
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)
    return path
