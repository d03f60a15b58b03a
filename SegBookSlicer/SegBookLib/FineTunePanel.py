"""The Fine-tune tab of the SegBook panel: cases, parameters, start/stop/resume and the training chart.

A part of `Widget` (its base class), split out for size: it uses the widget's `ui`, `fineTune` logic, `chart`,
`timer`, `ensureInstalled`, `currentEntry`, `refreshModels` and `parameterNode`. Qt only; the decisions are
FineTuneLogic's.
"""
from __future__ import annotations

import qt
import slicer

from .FineTuneLogic import timeLeft
from .TrainingSet import annotationNote
from .Parameters import FineTuneParameters, saveToNode
from .TrainingChart import TrainingChart


def viewOrientation() -> str:
    """The orientation of the red slice view (Axial, Coronal, Sagittal; Axial when there is none)."""
    layout = slicer.app.layoutManager() if hasattr(slicer.app, "layoutManager") else None
    widget = layout.sliceWidget("Red") if layout is not None else None
    orientation = widget.mrmlSliceNode().GetOrientation() if widget is not None else "Axial"
    return orientation if orientation.lower() in ("axial", "coronal", "sagittal") else "Axial"


class FineTunePanel:
    def refreshCases(self) -> None:
        self.ui.casesListWidget.clear()
        for case in self.fineTune.cases():
            note = " (missing classes = background)" if case.get("missing_as_background") else ""
            self.ui.casesListWidget.addItem(f"{case['name']}: {', '.join(case['classes_present'])}{note}"
                                            f"{annotationNote(case)}")
        classes = self.fineTune.classNames()[1:]
        self.ui.classesLabel.text = f"Classes: {', '.join(classes) if classes else '(from the first case)'}"
        self.ui.trainingFolderLabel.text = str(self.fineTune.trainingDirectory)

    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot add this case"):
            base = self.currentEntry(self.ui.baseModelComboBox)
            self.fineTune.addCase(self.ui.trainVolumeSelector.currentNode(),
                                  self.ui.trainSegmentationSelector.currentNode(),
                                  missingAsBackground=self.ui.missingAsBackgroundCheckBox.checked,
                                  baseClasses=base.classNames if base is not None else None,
                                  onlyAnnotatedSlices=self.ui.onlyAnnotatedSlicesCheckBox.checked,
                                  orientation=viewOrientation())
            self.refreshCases()

    def onAddFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self, "Dataset folder (nnU-Net / Decathlon layout)")
        if folder:
            with slicer.util.tryWithErrorDisplay("Cannot add this dataset folder", waitCursor=True):
                self.fineTune.addDatasetFolder(folder, self.ui.missingAsBackgroundCheckBox.checked)
                self.refreshCases()

    def onRemoveCase(self) -> None:
        item = self.ui.casesListWidget.currentItem()
        if item is not None:
            self.fineTune.removeCase(item.text().split(":")[0])
            self.refreshCases()

    def fineTuneParameters(self) -> FineTuneParameters:
        return FineTuneParameters(base=self.ui.baseModelComboBox.currentData,
                                  outputName=self.ui.outputModelNameLineEdit.text or "my-model",
                                  preset=self.ui.presetComboBox.currentText,
                                  device=self.ui.fineTuneDeviceComboBox.currentText,
                                  epochs=self.ui.epochsSpinBox.value or None)

    def setFineTuneRunning(self, running: bool) -> None:
        self.ui.startButton.enabled = not running
        self.ui.resumeButton.enabled = not running
        self.ui.stopButton.enabled = running
        self.ui.addCaseButton.enabled = not running

    def onStartFineTune(self, resume: bool) -> None:
        if not self.ensureInstalled(training=True):
            return
        params = self.fineTuneParameters()
        saveToNode(params, self.parameterNode(), "FineTune")
        with slicer.util.tryWithErrorDisplay("Cannot start fine-tuning"):
            self.fineTune.start(params, resume=resume)
            self.estimate = None             # the new run measures its own speed
            self.chart = TrainingChart.reuse(self.chart, slicer.mrmlScene)
            self.ui.plotWidget.setMRMLPlotViewNode(self.chart.view)
            self.setFineTuneRunning(True)
            self.ui.fineTuneStatusLabel.text = "Starting..."
            self.timer.start()

    def onStopFineTune(self) -> None:
        self.fineTune.stop()
        self.ui.stopButton.enabled = False
        self.ui.fineTuneStatusLabel.text = "Stopping: saving a checkpoint..."

    def onFineTuneEvents(self, events: list) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "estimate":
                self.estimate = event
            elif kind == "progress":
                total = max(int(event.get("total", 1)), 1)
                self.ui.fineTuneProgressBar.value = int(100 * event.get("done", 0) / total)
                self.ui.fineTuneStatusLabel.text = f"{event.get('stage')}: {event.get('done')}/{event.get('total')}" \
                    + timeLeft(getattr(self, "estimate", None), event)
            elif kind == "metric" and self.chart is not None:
                self.chart.add(event)
        final = self.fineTune.final
        if final is None:
            return
        self.setFineTuneRunning(False)
        if final.get("stopped"):
            self.ui.fineTuneStatusLabel.text = "Stopped; Resume continues from the last checkpoint."
        elif final["ok"]:
            self.ui.fineTuneStatusLabel.text = f"Done: model saved in {final['model']}"
            self.refreshModels(select=final["model"])
        else:
            self.ui.fineTuneStatusLabel.text = f"Failed: {final['message']}"
