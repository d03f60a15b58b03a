"""The SegBook panel: Qt only. Every decision is made by the logic classes; this file wires widgets to them.

Widgets come from Resources/UI/SegBook.ui (their names are checked by Testing/test_slicer_static.py). Long
work runs in child processes; a QTimer drains their events into the progress bars and the chart.
"""
from __future__ import annotations

import logging

import qt
import slicer

from . import NodeIO
from .FineTuneLogic import FineTuneLogic
from .InstallLogic import InstallLogic, pythonSetting, setPythonSetting
from .ModelCatalog import ModelCatalog, userDirectory
from .FineTunePanel import FineTunePanel
from .InteractivePanel import InteractivePanel
from .ModelPanel import ModelPanel
from .Parameters import DEVICES, PRECISIONS, PRESETS, SegmentParameters, loadFromNode, saveToNode
from .SegmentationLogic import SegmentationError, SegmentationLogic, referenceVolume
from .StatisticsTable import refreshStatistics, showTable

log = logging.getLogger(__name__)

POLL_MS = 200


class Widget(ModelPanel, FineTunePanel, qt.QWidget):
    def __init__(self, uiPath: str, parent=None, segmentationLogic=None, installLogic=None, catalog=None):
        super().__init__(parent)
        self.python = pythonSetting(userDirectory())    # the engine's interpreter; None: Slicer's own
        self.catalog = catalog or ModelCatalog(python=self.python)
        self.segmentation = segmentationLogic or SegmentationLogic(python=self.python)
        self.install = installLogic or InstallLogic(python=self.python)
        self.fineTune = FineTuneLogic(self.catalog.trainingDirectory, self.catalog.modelsDirectory,
                                      python=self.python)
        self.chart = None
        self.download = None
        self.entries = []
        self.segmentAfterDownload = False

        layout = qt.QVBoxLayout(self)
        uiWidget = slicer.util.loadUI(uiPath)
        layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.onTimer)

        for combo in (self.ui.deviceComboBox, self.ui.fineTuneDeviceComboBox):
            combo.clear()
            for device in DEVICES:
                combo.addItem(device)
        self.ui.precisionComboBox.clear()
        for precision in PRECISIONS:
            self.ui.precisionComboBox.addItem(precision)
        self.ui.presetComboBox.clear()
        for preset in PRESETS:
            self.ui.presetComboBox.addItem(preset)

        self.ui.installButton.clicked.connect(self.onInstall)
        # ctkPathLineEdit emits currentPathChanged at every keystroke that matches its validator, and never for
        # an empty box: the setting is applied when editing is finished (Enter, leaving the box) or by the button
        self.ui.pythonPathLineEdit.currentPath = self.python or ""
        self.ui.pythonApplyButton.clicked.connect(self.onPythonApply)
        self.ui.pythonPathLineEdit.comboBox().lineEdit().editingFinished.connect(self.onPythonApply)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.downloadButton.clicked.connect(self.onDownload)
        self.ui.addModelFolderButton.clicked.connect(self.onAddModelFolder)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.updateDeviceHint)
        self.ui.segmentButton.clicked.connect(self.onSegmentOrCancel)
        self.ui.roiSelector.nodeAddedByUser.connect(self.onRoiAdded)
        self.ui.show3DButton.clicked.connect(self.onShow3D)
        self.ui.statisticsButton.clicked.connect(self.onStatistics)
        self.ui.exportDicomSegButton.clicked.connect(self.onExportDicomSeg)
        self.ui.addCaseButton.clicked.connect(self.onAddCase)
        self.ui.addFolderButton.clicked.connect(self.onAddFolder)
        self.ui.removeCaseButton.clicked.connect(self.onRemoveCase)
        self.ui.startButton.clicked.connect(lambda: self.onStartFineTune(resume=False))
        self.ui.resumeButton.clicked.connect(lambda: self.onStartFineTune(resume=True))
        self.ui.stopButton.clicked.connect(self.onStopFineTune)

        self.refreshModels()
        self.refreshCases()
        self.refreshInstallStatus()
        self.updateDeviceHint()
        self.setSegmentRunning(False)
        self.setFineTuneRunning(False)
        self.restoreParameters()
        self.interactive = InteractivePanel(self)      # clicks: its own timer drains the "click" jobs
        grid = self.ui.segmentTab.layout()
        grid.addWidget(self.interactive.section, grid.rowCount(), 0, 1, 2)

    # -- setup ------------------------------------------------------------------------------------
    def refreshInstallStatus(self) -> None:
        try:
            missing = self.install.missing()
            text = self.install.statusText()
        except Exception as e:   # e.g. the chosen interpreter cannot run
            missing, text = ["?"], f"Cannot check the engine's Python: {e}"
        self.ui.setupCollapsibleButton.collapsed = not missing
        self.ui.installStatusLabel.text = text
        self.ui.installButton.enabled = bool(missing)

    def onPythonApply(self, *_) -> None:
        self.applyPython(self.ui.pythonPathLineEdit.currentPath)

    def applyPython(self, path: str) -> None:
        """Run the engine in another Python (any environment with the core's dependencies) or, when empty,
        in Slicer's own. The running worker is stopped; the next Segment starts one in the new Python."""
        python = (path or "").strip() or None
        if python == self.python:
            return
        with slicer.util.tryWithErrorDisplay("This Python cannot run SegBook's engine"):
            setPythonSetting(userDirectory(), python)
            self.python = python
            self.segmentation.shutdown()
            self.segmentation.python = self.fineTune.python = self.catalog.python = python
            self.install = InstallLogic(python=python)
            self.refreshInstallStatus()
            self.refreshModels()
            self.updateDeviceHint()

    def ensureInstalled(self, training: bool = False, dicom: bool = False) -> bool:
        """Ready, or installed now after asking (`training`: fine-tuning's packages; `dicom`: the DICOM SEG
        writer)."""
        if self.install.isReady(training, dicom):
            return True
        return self.onInstall(training=training, dicom=dicom)

    def onInstall(self, *_, training: bool = False, dicom: bool = False) -> bool:
        def confirm(question):
            return slicer.util.confirmYesNoDisplay(question, windowTitle="SegBook setup")
        try:
            with slicer.util.tryWithErrorDisplay("SegBook setup failed", waitCursor=True):
                ok = self.install.install(confirm, progress=self.showStatus, training=training, dicom=dicom)
                self.refreshInstallStatus()
                if ok:
                    self.refreshModels()
                    self.updateDeviceHint()
                return ok
        except Exception:
            return False

    def showStatus(self, text: str) -> None:
        self.ui.segmentStatusLabel.text = text
        slicer.app.processEvents()

    # -- segment ----------------------------------------------------------------------------------
    def segmentParameters(self) -> SegmentParameters:
        items = [self.ui.classesListWidget.item(i) for i in range(self.ui.classesListWidget.count)]
        checked = [it.text() for it in items if it.checkState() == qt.Qt.Checked]
        return SegmentParameters(model=self.ui.modelComboBox.currentData, device=self.ui.deviceComboBox.currentText,
                                 tta=self.ui.ttaCheckBox.checked, classes=checked,
                                 precision=self.ui.precisionComboBox.currentText,
                                 checkpoint=self.ui.checkpointPathLineEdit.currentPath or None)

    def setSegmentRunning(self, running: bool) -> None:
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        for w in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector,
                  self.ui.roiSelector, self.ui.classesListWidget, self.ui.deviceComboBox, self.ui.ttaCheckBox,
                  self.ui.precisionComboBox, self.ui.exportDicomSegButton):
            w.enabled = not running
        self.ui.modelComboBox.enabled = not running and not self.isDownloading()
        if not running:
            self.ui.segmentProgressBar.setRange(0, 100)

    def onSegmentOrCancel(self) -> None:
        if self.isDownloading():    # the button is disabled then; never let it reach the download's Cancel
            return
        if self.segmentation.isBusy():
            self.segmentation.cancel()
            self.setSegmentRunning(False)
            self.ui.segmentProgressBar.value = 0
            self.showStatus("Cancelled; the scene is unchanged.")
            return
        if not self.ensureInstalled():
            return
        params = self.segmentParameters()
        entry = self.currentEntry()
        if entry is not None and not entry.downloaded and not params.checkpoint:
            # download first, with its own progress and Cancel, then segment
            if slicer.util.confirmOkCancelDisplay(
                    f"{entry.name} ({entry.sizeText}) is not on this computer yet. Download it now?",
                    windowTitle="SegBook"):
                self.segmentAfterDownload = True
                self.onDownload()
            return
        saveToNode(params, self.parameterNode(), "Segment")
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation"):
            self.segmentation.start(self.ui.inputVolumeSelector.currentNode(), params,
                                    self.ui.roiSelector.currentNode(),
                                    self.ui.outputSegmentationSelector.currentNode())
            self.setSegmentRunning(True)
            self.showStatus("Starting...")
            self.timer.start()

    def onSegmentEvents(self, events: list) -> None:
        for event in events:
            if event.get("event") == "progress":
                total = max(int(event.get("total", 1)), 1)
                self.ui.segmentProgressBar.value = int(100 * event.get("done", 0) / total)
                self.ui.segmentStatusLabel.text = f"{event.get('stage')}: {event.get('done')}/{event.get('total')}"
            elif event.get("event") == "loaded":
                self.ui.segmentStatusLabel.text = f"Model loaded on {event.get('device')}"
        job = self.segmentation.job
        if job is None or job["final"] is None:
            return
        self.setSegmentRunning(False)
        if job["kind"] == "dicom_seg":
            try:
                result = self.segmentation.finishDicomSeg()
            except SegmentationError as e:
                self.showStatus(f"DICOM SEG not written: {e}")
                slicer.util.errorDisplay(f"DICOM SEG not written: {e}", windowTitle="SegBook")
                return
            self.ui.segmentProgressBar.value = 100
            self.showStatus(f"DICOM SEG of {result.get('segments')} segments written to {result.get('output')}")
            return
        with slicer.util.tryWithErrorDisplay("Segmentation failed"):
            try:    # the nodes the job was started with (after Close Scene, their IDs name other nodes)
                node = self.segmentation.applyResult(slicer.mrmlScene, job["volume"], job["segmentation"])
            except SegmentationError as e:      # a message for the user, not a traceback
                self.ui.segmentProgressBar.value = 0
                self.showStatus(f"Failed: {e}")
                slicer.util.errorDisplay(f"Segmentation failed: {e}", windowTitle="SegBook")
                return
            self.ui.outputSegmentationSelector.setCurrentNode(node)
            elapsed = float(node.GetAttribute("SegBook.Elapsed") or 0)
            self.ui.elapsedLabel.text = f"{elapsed:.1f} s"
            self.ui.segmentProgressBar.value = 100
            self.showStatus(f"Done: {node.GetSegmentation().GetNumberOfSegments()} structures found.")

    def onRoiAdded(self, roiNode) -> None:
        """'Create new ROI' makes a zero-size box: start from the input volume's extent instead."""
        NodeIO.initializeRoi(roiNode, self.ui.inputVolumeSelector.currentNode())

    def onExportDicomSeg(self) -> None:
        node = self.ui.outputSegmentationSelector.currentNode()
        if node is None:
            self.showStatus("Segment first, or select the segmentation to export.")
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export DICOM SEG", f"{node.GetName()}.dcm",
                                              "DICOM SEG (*.dcm)")
        if not path or not self.ensureInstalled(dicom=True):
            return
        with slicer.util.tryWithErrorDisplay("Cannot export the DICOM SEG"):
            self.segmentation.startDicomSeg(self.ui.inputVolumeSelector.currentNode(), node, path,
                                            node.GetAttribute("SegBook.Model") or "SegBook")
            self.setSegmentRunning(True)
            self.showStatus("Writing the DICOM SEG...")
            self.timer.start()

    def onStatistics(self) -> None:
        """The output segmentation's statistics as it is now (after edits), over the volume it was made on."""
        node = self.ui.outputSegmentationSelector.currentNode()
        volume = (referenceVolume(node) if node is not None else None) or self.ui.inputVolumeSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Cannot compute the statistics"):
            showTable(refreshStatistics(slicer.mrmlScene, node, volume))

    def onShow3D(self) -> None:
        node = self.ui.outputSegmentationSelector.currentNode()
        if node is not None:
            node.CreateClosedSurfaceRepresentation()

    # -- timer / parameters / cleanup -------------------------------------------------------------
    def onTimer(self) -> None:
        busy = False
        if self.segmentation.job is not None and self.segmentation.job["kind"] != "click":
            self.onSegmentEvents(self.segmentation.poll())
            busy |= self.segmentation.isBusy()
        if self.fineTune.runner is not None and (self.fineTune.final is None):
            self.onFineTuneEvents(self.fineTune.poll())
            busy |= self.fineTune.final is None
        if self.download is not None:
            for event in self.download.poll():
                if event.get("event") == "progress" and event.get("stage") == "download":
                    self.showDownloadProgress(event)
            if self.download.isRunning():
                busy = True
            else:
                code = self.download.process.returncode
                last = (self.download.stderrTail().splitlines() or [f"exit code {code}"])[-1]
                self.download = None
                self.setDownloadRunning(False)
                self.showStatus("Download finished." if code == 0 else f"Download failed: {last}")
                self.catalog.invalidate()
                self.refreshModels()
                if code == 0 and self.segmentAfterDownload:
                    self.segmentAfterDownload = False
                    self.onSegmentOrCancel()
                    busy = True
                self.segmentAfterDownload = False
        if not busy:
            self.timer.stop()

    def parameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode("SegBook", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetSingletonTag("SegBook")
            node.SetName("SegBook")
        return node

    def restoreParameters(self) -> None:
        node = self.parameterNode()
        params = loadFromNode(SegmentParameters, node, "Segment")
        self.ui.deviceComboBox.setCurrentText(params.device)
        self.ui.ttaCheckBox.checked = params.tta
        self.ui.precisionComboBox.setCurrentText(params.precision)

    def cleanup(self) -> None:
        self.timer.stop()
        self.interactive.cleanup()
        self.segmentation.shutdown()
        if self.fineTune.isRunning():
            self.fineTune.stop(wait=30)
        if self.download is not None:
            self.download.kill()
