"""The "Interactive (clicks)" section of the Segment tab: Qt only, the decisions are InteractiveLogic's.

Choose the segment (or "new segment"), then place positive points (green), negative points (red) or a box in
any view: each placement is one request to the worker that Segment uses, and the answer replaces the segment's
voxels (Segment Editor undo steps back click by click). Keys, while placing: T toggles positive/negative,
N finishes the segment (the prompts are cleared, the next click starts a new segment).
"""
from __future__ import annotations

import ctk
import qt
import slicer

from .InteractiveLogic import InteractiveLogic
from .SegmentationLogic import SegmentationError

POLL_MS = 100
NEW_SEGMENT = "(new segment)"
TOGGLE_KEY = "T"
FINISH_KEY = "N"
POSITIVE_COLOR = (0.2, 0.85, 0.2)
NEGATIVE_COLOR = (0.95, 0.2, 0.2)


class InteractivePanel:
    """Built by the Widget into its Segment tab; uses its ui (input, output segmentation), model selection,
    Segment parameters and SegmentationLogic (the one worker)."""

    def __init__(self, widget):
        self.widget = widget
        self.logic = InteractiveLogic(widget.segmentation, slicer.mrmlScene)
        self.positive = self.negative = self.box = None
        self.placing = None                 # the markups node being placed, or None
        self.interaction = None             # the interaction node observed for the end of a box placement
        self.interactionTag = None

        self.section = ctk.ctkCollapsibleButton()
        self.section.text = "Interactive (clicks)"
        self.section.collapsed = True
        form = qt.QFormLayout(self.section)
        self.segmentComboBox = qt.QComboBox()
        self.segmentComboBox.toolTip = ("The segment of the output segmentation that the clicks edit; a new one "
                                        "is named after the model's class at the first click")
        form.addRow("Segment:", self.segmentComboBox)
        row = qt.QHBoxLayout()
        self.positiveButton = self._button(row, "Positive point", f"Place points on the structure ({TOGGLE_KEY}: "
                                           "toggle positive/negative)", checkable=True)
        self.negativeButton = self._button(row, "Negative point", "Place points on what must not be in it",
                                           checkable=True)
        self.boxButton = self._button(row, "Box", "Draw a box: the structure is kept inside it", checkable=True)
        form.addRow(row)
        row = qt.QHBoxLayout()
        self.clearButton = self._button(row, "Clear prompts", "Remove the points and the box; the segment stays")
        self.finishButton = self._button(row, "Finish segment", f"Clear the prompts; the next click starts a new "
                                          f"segment ({FINISH_KEY})")
        self.undoButton = self._button(row, "Undo", "The Segment Editor's undo: the segment before the last click")
        self.redoButton = self._button(row, "Redo", "")
        form.addRow(row)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)

        self.positiveButton.clicked.connect(lambda: self.onPlace("positive"))
        self.negativeButton.clicked.connect(lambda: self.onPlace("negative"))
        self.boxButton.clicked.connect(lambda: self.onPlace("box"))
        self.clearButton.clicked.connect(self.onClear)
        self.finishButton.clicked.connect(self.onFinish)
        self.undoButton.clicked.connect(lambda: self.logic.undo.undo())
        self.redoButton.clicked.connect(lambda: self.logic.undo.redo())
        self.segmentComboBox.activated.connect(self.onSegmentChosen)
        self.section.contentsCollapsed.connect(self.onCollapsed)
        widget.ui.outputSegmentationSelector.currentNodeChanged.connect(lambda *_: self.refreshSegments())

        # keys anywhere in the application (slice and 3D views included), enabled only while placing
        self.shortcuts = []
        for key, slot in ((TOGGLE_KEY, self.onToggle), (FINISH_KEY, self.onFinish)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setContext(qt.Qt.ApplicationShortcut)
            shortcut.enabled = False
            shortcut.activated.connect(slot)
            self.shortcuts.append(shortcut)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onTimer)

    @staticmethod
    def _button(layout, text, tip, checkable=False):
        button = qt.QPushButton(text)
        button.toolTip = tip
        button.checkable = checkable
        layout.addWidget(button)
        return button

    # -- target ---------------------------------------------------------------------------------------
    def outputSegmentation(self):
        """The output segmentation, created (named after the input) when none is selected."""
        ui = self.widget.ui
        node = ui.outputSegmentationSelector.currentNode()
        if node is None:
            volume = ui.inputVolumeSelector.currentNode()
            name = f"{volume.GetName()} segmentation" if volume is not None else "Segmentation"
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            ui.outputSegmentationSelector.setCurrentNode(node)
        return node

    def refreshSegments(self, select=None) -> None:
        node = self.widget.ui.outputSegmentationSelector.currentNode()
        current = select if select is not None else self.segmentComboBox.currentData
        self.segmentComboBox.clear()
        self.segmentComboBox.addItem(NEW_SEGMENT, "")
        if node is not None:
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                self.segmentComboBox.addItem(segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegmentID(i))
        self.segmentComboBox.setCurrentIndex(max(self.segmentComboBox.findData(current or ""), 0))

    def begin(self) -> None:
        """Point the logic at the chosen volume, segmentation and segment, with the model of the Segment tab."""
        ui = self.widget.ui
        volume = ui.inputVolumeSelector.currentNode()
        if volume is None:
            raise SegmentationError("select an input volume")
        entry = self.widget.currentEntry()
        segmentation = self.outputSegmentation()
        segmentId = self.segmentComboBox.currentData or None
        self.logic.begin(volume, segmentation, segmentId, self.widget.segmentParameters(),
                         entry.classNames if entry is not None else ())

    def onSegmentChosen(self, *_) -> None:
        if self.logic.volume is not None:
            self.logic.segmentId = self.segmentComboBox.currentData or None

    # -- placing -------------------------------------------------------------------------------------
    def _pointList(self, name, color):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        node.SetMarkupLabelFormat("")
        return node

    def ensureMarkups(self) -> None:
        scene = slicer.mrmlScene
        if self.positive is None or not scene.IsNodePresent(self.positive):
            self.positive = self._pointList("SegBook positive", POSITIVE_COLOR)
        if self.negative is None or not scene.IsNodePresent(self.negative):
            self.negative = self._pointList("SegBook negative", NEGATIVE_COLOR)
        if self.box is None or not scene.IsNodePresent(self.box):
            self.box = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SegBook box")
            self.box.CreateDefaultDisplayNodes()
        self.logic.observe(self.positive, self.negative, self.box)
        self.timer.start()      # a point dragged later sends a request too

    def onPlace(self, which: str) -> None:
        """Start placing positive points, negative points or the box in the views (persistent place mode)."""
        try:
            self.begin()
        except SegmentationError as e:
            self.show(str(e))
            self.stopPlacing()
            return
        self.ensureMarkups()
        node = {"positive": self.positive, "negative": self.negative, "box": self.box}[which]
        if which == "box":
            self.box.RemoveAllControlPoints()      # a new box replaces the old one
        self.placing = node
        appLogic = slicer.app.applicationLogic()
        selection, interaction = appLogic.GetSelectionNode(), appLogic.GetInteractionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(which != "box")
        interaction.SetCurrentInteractionMode(interaction.Place)
        if self.interaction is None:
            # a box is placed by two clicks: its end is the interaction node's, not always the ROI's own event
            self.interaction = interaction
            self.interactionTag = interaction.AddObserver(interaction.EndPlacementEvent, self.onPlacementEnded)
        self.positiveButton.checked = which == "positive"
        self.negativeButton.checked = which == "negative"
        self.boxButton.checked = which == "box"
        for shortcut in self.shortcuts:
            shortcut.enabled = True

    def stopPlacing(self) -> None:
        if self.placing is not None:
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        self.placing = None
        for button in (self.positiveButton, self.negativeButton, self.boxButton):
            button.checked = False
        for shortcut in self.shortcuts:
            shortcut.enabled = False

    def onPlacementEnded(self, *_) -> None:
        if self.placing is self.box and self.box is not None:
            self.logic.onPlaced(self.box, None)
            self.stopPlacing()

    def onToggle(self) -> None:
        self.onPlace("negative" if self.placing is self.positive else "positive")

    def onClear(self) -> None:
        for node in (self.positive, self.negative, self.box):
            if node is not None and slicer.mrmlScene.IsNodePresent(node):
                node.RemoveAllControlPoints()
        self.logic.pending = None

    def onFinish(self) -> None:
        """The segment is done: clear the prompts; the next click starts a new segment."""
        self.onClear()
        self.logic.finishSegment()
        self.refreshSegments(select="")
        self.show("Segment finished; the next positive point starts a new segment.")

    # -- answers -------------------------------------------------------------------------------------
    def onTimer(self) -> None:
        for outcome in self.logic.poll():
            self.show(outcome["message"])
            if outcome.get("ok"):
                self.refreshSegments(select=outcome["segmentId"])
        if self.section.collapsed and not self.logic.isBusy():
            self.timer.stop()

    def onCollapsed(self, collapsed: bool) -> None:
        if collapsed:
            self.stopPlacing()
        else:
            self.refreshSegments()

    def show(self, text: str) -> None:
        self.statusLabel.text = text

    def cleanup(self) -> None:
        self.timer.stop()
        self.stopPlacing()
        if self.interaction is not None:
            self.interaction.RemoveObserver(self.interactionTag)
            self.interaction = None
        for shortcut in self.shortcuts:
            shortcut.setParent(None)
        self.logic.shutdown()
