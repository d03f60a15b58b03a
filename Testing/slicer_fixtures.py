"""Helpers shared by the Slicer-module tests: the module on sys.path, a tiny model folder, real images.

The model is a small random-weight STU-Net saved as a model folder with `save_model_folder`; its classes
are TotalSegmentator names so that the SNOMED CT terminology path is exercised.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "slicer"
SLICER_MODULE = ROOT / "SegBookSlicer"
if str(SLICER_MODULE) not in sys.path:
    sys.path.insert(0, str(SLICER_MODULE))

IMAGE = DATA / "hippocampus_001_image.nii.gz"
LABEL = DATA / "hippocampus_001_label.nii.gz"
IMAGE2 = DATA / "hippocampus_003_image.nii.gz"
LABEL2 = DATA / "hippocampus_003_label.nii.gz"
TINY_CLASSES = ["background", "liver", "spleen"]


def make_tiny_model(folder, seed: int = 0, classes=TINY_CLASSES, name: str = "tiny-test", stages: int = 4) -> Path:
    """`stages` = 6 gives the released models' pooling ([2,2,2] x4, then [1,1,2]) at a tiny width."""
    import torch
    from segbook.config import Arch, ModelConfig, Plan
    from segbook.network import STUNet
    from segbook.zoo import save_model_folder
    pools = [[2, 2, 2]] * 3 if stages == 4 else [[2, 2, 2]] * 4 + [[1, 1, 2]]
    arch = Arch(1, len(classes), [4] + [8] * (stages - 1), [1] * stages, pools)
    config = ModelConfig(name=name, arch=arch, plan=Plan(spacing=[1.0, 1.0, 1.0], patch_size=[32, 32, 32]),
                         class_names=list(classes), description="random weights, for tests")
    torch.manual_seed(seed)
    net = STUNet(1, len(classes), arch.dims, arch.depth, arch.pool_op_kernel_sizes, deep_supervision=True)
    return save_model_folder(folder, config, net.state_dict())


def load_volume(scene, path, name="volume"):
    """A scalar volume node read by Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode)."""
    import slicer
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def load_label_segmentation(scene, path, reference, names, name="segmentation"):
    """A segmentation node with one named segment per label value of a label map file."""
    import slicer
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(labelmap)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
    seg = segmentation.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        segment.SetName(names[segment.GetLabelValue()])
    scene.RemoveNode(labelmap)
    scene.RemoveNode(storage)
    return segmentation
