"""SegBook: STU-Net segmentation and fine-tuning in 3D Slicer (module metadata, wiring, self-test).

The work is done by SegBookLib (one class per file) and the `segbook` core package shipped beside it.
"""
import logging
import os
import unittest

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

# every module of SegBookLib, each after those it imports: Reload reloads them in this order
LIB_MODULES = ["Parameters", "ProcessRunner", "NodeIO", "StatisticsTable", "ModelCatalog", "InstallLogic",
               "SegmentationLogic", "TrainingSet", "FineTuneLogic", "TrainingChart", "FineTunePanel",
               "EditorUndo", "InteractiveLogic", "InteractivePanel", "ModelPanel", "Widget"]


class SegBook(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegBook"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SegBook contributors"]
        self.parent.helpText = (
            "Segment a scan with STU-Net (CT-pretrained on TotalSegmentator, 104 structures), correct the "
            "result in the Segment Editor, and fine-tune a model on your own cases. "
            '<a href="https://github.com/segbook/SlicerSegBook">Documentation</a>.')
        self.parent.acknowledgementText = (
            "STU-Net: Huang et al., 2023 (uni-medical/STU-Net, Apache-2.0). SNOMED CT codes and colours of the "
            "TotalSegmentator structures from lassoan/SlicerTotalSegmentator (Apache-2.0).")
        # Segments name SegBook's terminology contexts; the Terminologies module's logic exists only once
        # the application has started.
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self):
        from SegBookLib import NodeIO
        folder = os.path.join(os.path.dirname(self.parent.path), "Resources", "Terminology")
        NodeIO.loadTerminologyContexts(slicer.modules.terminologies.logic(), folder)


class SegBookLogic(ScriptedLoadableModuleLogic):
    """Access to the logic for other modules and scripts: `slicer.util.getModuleLogic("SegBook")`."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from SegBookLib.InstallLogic import pythonSetting
        from SegBookLib.ModelCatalog import userDirectory
        from SegBookLib.SegmentationLogic import SegmentationLogic
        self.segmentation = SegmentationLogic(python=pythonSetting(userDirectory()))


class SegBookWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from SegBookLib.Widget import Widget
        self.logic = SegBookLogic()
        self.widget = Widget(self.resourcePath("UI/SegBook.ui"), segmentationLogic=self.logic.segmentation)
        self.layout.addWidget(self.widget)

    def cleanup(self):
        if getattr(self, "widget", None) is not None:
            self.widget.cleanup()

    def onReload(self):
        """Reload SegBookLib too (the default reload only re-reads this file)."""
        import importlib
        import sys
        for name in LIB_MODULES:
            module = sys.modules.get(f"SegBookLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


class SegBookTest(ScriptedLoadableModuleTest):
    """In-application test: a random-weight model segments a synthetic volume in the running scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """What Reload and Test calls, directly and outside unittest's runner (Slicer's
        ScriptedLoadableModule.runTest): a SkipTest raised here would be shown as a failure, so a skip is
        reported and returned. ctest's runner (slicer_add_python_unittest) calls the test_ method itself."""
        self.setUp()
        try:
            self.test_SegmentInTheApplication()
        except unittest.SkipTest as skip:
            logging.warning("SegBook self-test skipped: %s", skip)
            self.delayDisplay(f"Test skipped: {skip}")

    def test_SegmentInTheApplication(self):
        import tempfile

        import numpy as np
        from SegBookLib.InstallLogic import InstallLogic
        from SegBookLib.Parameters import SegmentParameters
        from SegBookLib.SegmentationLogic import SegmentationLogic

        if not InstallLogic().isReady():
            self.skipTest("SegBook's Python packages are not installed (open the module and click Install)")
        import torch
        from segbook.config import Arch, ModelConfig, Plan
        from segbook.network import STUNet
        from segbook.zoo import save_model_folder

        self.delayDisplay("Making a small random-weight model")
        arch = Arch(1, 3, [4, 8, 8, 8], [1, 1, 1, 1], [[2, 2, 2]] * 3)
        config = ModelConfig(name="selftest", arch=arch, plan=Plan([1.0, 1.0, 1.0], [16, 16, 16]),
                             class_names=["background", "liver", "spleen"])
        torch.manual_seed(0)
        net = STUNet(1, 3, arch.dims, arch.depth, arch.pool_op_kernel_sizes, deep_supervision=True)
        folder = save_model_folder(os.path.join(tempfile.mkdtemp(), "selftest"), config, net.state_dict())

        rng = np.random.default_rng(0)
        volume = slicer.util.addVolumeFromArray(rng.normal(100, 20, (24, 32, 32)).astype(np.float32),
                                                name="SegBook self-test")
        logic = SegmentationLogic()
        try:
            self.delayDisplay("Segmenting through the worker process")
            node = logic.segment(slicer.mrmlScene, volume, SegmentParameters(model=str(folder), device="cpu"),
                                 timeout=300)
        finally:
            logic.shutdown()
        segmentation = node.GetSegmentation()
        names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        self.assertTrue(names and names <= {"liver", "spleen"})
        self.assertEqual(node.GetNodeReferenceID("referenceImageGeometryRef"), volume.GetID())
        logging.info("SegBook self-test passed: %s", sorted(names))
        self.delayDisplay("Test passed")
