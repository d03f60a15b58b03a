"""Undo of a segment changed outside the Segment Editor's effects (a click's answer): the Segment Editor's own
history, so that its Undo button and Ctrl+Z step back click by click."""
from __future__ import annotations


class EditorUndo:
    """The Segment Editor's undo history for one segmentation.

    In the application: the Segment Editor module's own widget (its Undo button and Ctrl+Z), pointed at the
    segmentation; `saveStateForUndo` is the slot its effects call before they modify a segment. Without the
    application (slicer-core): a vtkSlicerSegmentEditorLogic, the class that widget delegates undo to since
    Slicer 5.10 (SaveStateForUndo -> vtkSegmentationHistory::SaveState), on a segment editor node of the scene.
    """

    def __init__(self, scene):
        self.scene = scene
        self.widget = None      # found at the first attach: the Segment Editor's widget is built on demand
        self.logic = None
        self.node = None

    @staticmethod
    def _applicationEditor():
        import slicer
        try:
            return slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:      # no application (or no Segment Editor module)
            return None

    def attach(self, segmentationNode, volumeNode) -> None:
        if self.widget is None and self.logic is None:
            self.widget = self._applicationEditor()
        if self.widget is not None:
            if self.widget.segmentationNode() is not segmentationNode:
                self.widget.setSegmentationNode(segmentationNode)
            if hasattr(self.widget, "setSourceVolumeNode"):
                self.widget.setSourceVolumeNode(volumeNode)
            return
        import slicer
        if self.logic is None:
            self.node = slicer.vtkMRMLSegmentEditorNode()
            self.node.SetName("SegBook segment editor")
            self.node.SetHideFromEditors(True)
            self.scene.AddNode(self.node)
            self.logic = slicer.vtkSlicerSegmentEditorLogic()
            self.logic.SetMRMLScene(self.scene)
            self.logic.SetSegmentEditorNode(self.node)
        if self.node.GetSegmentationNode() is not segmentationNode:
            self.node.SetAndObserveSegmentationNode(segmentationNode)
            self.logic.ClearUndoState()
        self.node.SetAndObserveSourceVolumeNode(volumeNode)

    def save(self) -> None:
        if self.widget is not None:
            self.widget.saveStateForUndo()
        elif self.logic is not None:
            self.logic.SaveStateForUndo()

    def undo(self) -> None:
        if self.widget is not None:
            self.widget.undo()
        elif self.logic is not None:
            self.logic.Undo()

    def redo(self) -> None:
        if self.widget is not None:
            self.widget.redo()
        elif self.logic is not None:
            self.logic.Redo()

    def release(self) -> None:
        if self.node is not None and self.scene.IsNodePresent(self.node):
            self.scene.RemoveNode(self.node)
        self.logic, self.node = None, None
