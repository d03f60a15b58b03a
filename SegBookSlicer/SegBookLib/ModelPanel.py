"""The model part of the Segment tab: the model selectors, their description and classes, download with
cancel, adding a model folder, and the device hint.

A part of `Widget` (its base class), split out for size as `FineTunePanel` is: it uses the widget's `ui`,
`install`, `catalog`, `segmentation`, `timer`, `python`, `download`, `ensureInstalled` and `showStatus`. Qt
only; the decisions are ModelCatalog's and InstallLogic's.
"""
from __future__ import annotations

import logging
from pathlib import Path

import qt
import slicer

from .ProcessRunner import ProcessRunner, coreEnvironment, pythonExecutable

log = logging.getLogger(__name__)


class ModelPanel:
    def refreshModels(self, select: str = None) -> None:
        if not self.install.isReady():
            return
        self.entries = self.catalog.entries()
        for combo in (self.ui.modelComboBox, self.ui.baseModelComboBox):
            current = select or combo.currentData
            combo.blockSignals(True)
            combo.clear()
            for entry in self.entries:
                mark = "" if entry.downloaded else "  (download)"
                combo.addItem(f"{entry.label} - {entry.sizeText}{mark}", entry.name)
            index = combo.findData(current) if current else -1
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(False)
        self.onModelChanged()

    def currentEntry(self, combo=None):
        name = (combo or self.ui.modelComboBox).currentData
        return next((e for e in self.entries if e.name == name), None)

    def onModelChanged(self, *_) -> None:
        entry = self.currentEntry()
        if entry is None:
            return
        channels = ("" if entry.channels == 1 else
                    f"\nTakes {entry.channels} co-registered input volumes: use `segbook predict` for it.")
        self.ui.modelInfoLabel.text = (f"{entry.description}\n{entry.sizeText}, {len(entry.classNames) - 1} "
                                       f"structures, {'on this computer' if entry.downloaded else 'not downloaded'}"
                                       + channels)
        self.ui.downloadButton.enabled = not entry.downloaded
        self.ui.classesListWidget.clear()
        for name in entry.classNames[1:]:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            self.ui.classesListWidget.addItem(item)

    def isDownloading(self) -> bool:
        return self.download is not None and self.download.isRunning()

    def setDownloadRunning(self, running: bool) -> None:
        """While a model downloads, its button cancels it; the model cannot be changed and Segment waits (it
        starts by itself when the download was asked for by Segment)."""
        self.ui.downloadButton.text = "Cancel download" if running else "Download"
        self.ui.modelComboBox.enabled = not running and not self.segmentation.isBusy()
        self.ui.segmentButton.enabled = not running
        if not running:
            self.ui.segmentProgressBar.setRange(0, 100)

    def onDownload(self) -> None:
        """Download + convert in a child process (`segbook download`); the button becomes Cancel."""
        if self.isDownloading():
            self.download.kill()
            self.download = None
            self.segmentAfterDownload = False
            self.setDownloadRunning(False)
            return
        entry = self.currentEntry()
        if entry is None or not self.ensureInstalled():
            return
        self.download = ProcessRunner([pythonExecutable(self.python), "-m", "segbook", "download", entry.name,
                                       "--progress", "json"], env=coreEnvironment(python=self.python))
        self.download.start()
        self.setDownloadRunning(True)
        self.ui.segmentProgressBar.setRange(0, 0)      # busy until the size is known
        self.showStatus(f"Downloading {entry.name}...")
        self.timer.start()

    def showDownloadProgress(self, event: dict) -> None:
        """The core's "download" progress event (bytes) on the progress bar and the status line."""
        done, total = int(event.get("done", 0)), int(event.get("total", 0))
        if total > 0:
            self.ui.segmentProgressBar.setRange(0, 100)
            self.ui.segmentProgressBar.value = min(100, int(100 * done / total))
            self.ui.segmentStatusLabel.text = f"Downloading: {done / 1e6:.1f} of {total / 1e6:.1f} MB"
        else:
            self.ui.segmentStatusLabel.text = f"Downloading: {done / 1e6:.1f} MB"

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self, "Model folder (weights.safetensors + model.json)")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Not a SegBook model folder"):
            self.catalog.addModelFolder(folder)
            self.refreshModels(select=str(Path(folder).resolve()))

    def updateDeviceHint(self, *_) -> None:
        if not self.install.isReady():
            return
        try:
            hasGpu = self.install.gpuAvailable()
        except Exception as e:
            log.warning("cannot ask the engine's torch for a GPU: %s", e)
            hasGpu = False
        self.ui.deviceHintLabel.text = ("" if hasGpu else
                                        "No GPU found: the CPU is slower; use the S model and leave TTA off.")
        if not hasGpu and self.ui.deviceComboBox.currentText == "cuda":
            self.ui.deviceComboBox.setCurrentText("auto")
