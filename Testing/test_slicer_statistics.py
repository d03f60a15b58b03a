"""The Slicer module's statistics table after Segment, on a real MRML scene (slicer-core), through the real
worker; the numbers are checked against ITK's label statistics of the segments Slicer holds."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError:  # every test here is marked slicer: they skip visibly without slicer-core
    slicer = None
pytestmark = pytest.mark.slicer

from slicer_fixtures import IMAGE, load_volume  # noqa: E402
from SegBookLib import NodeIO  # noqa: E402
from SegBookLib.Parameters import SegmentParameters  # noqa: E402
from SegBookLib.StatisticsTable import REFERENCE_ROLE  # noqa: E402
from test_slicer_logic import logic, scene, tiny_model  # noqa: E402,F401  (fixtures: one worker, a scene, a model)


def table_rows(table):
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return columns, [{columns[c]: table.GetCellText(r, c) for c in range(len(columns))}
                     for r in range(table.GetNumberOfRows())]


def test_segment_adds_a_statistics_table_with_itks_numbers(scene, logic, tiny_model):  # noqa: F811
    volume = load_volume(scene, IMAGE, "MRI")
    segmentation = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu"),
                                 timeout=120)
    table = segmentation.GetNodeReference(REFERENCE_ROLE)
    assert table is not None and table.IsA("vtkMRMLTableNode")
    assert table.GetName() == f"{segmentation.GetName()} statistics"
    columns, rows = table_rows(table)
    assert columns == ["Label", "Structure", "Voxels", "Volume", "Mean", "Std", "Min", "Max"]
    assert table.GetColumnUnitLabel("Volume") == "ml"
    seg = segmentation.GetSegmentation()
    assert sorted(r["Structure"] for r in rows) == sorted(seg.GetNthSegment(i).GetName()
                                                         for i in range(seg.GetNumberOfSegments()))
    # independent: ITK's statistics of each segment as Slicer holds it, over the volume node's voxels
    voxels = slicer.util.arrayFromVolume(volume).astype(np.float64)
    spacing = volume.GetSpacing()
    for row in rows:
        mask = NodeIO.segmentMask(segmentation, seg.GetSegmentIdBySegmentName(row["Structure"]), volume)
        f = sitk.LabelStatisticsImageFilter()
        f.Execute(sitk.GetImageFromArray(voxels), sitk.GetImageFromArray(mask))
        assert int(row["Voxels"]) == f.GetCount(1)
        assert float(row["Volume"]) == pytest.approx(f.GetCount(1) * np.prod(spacing) / 1000, rel=1e-5)
        for title, value in (("Mean", f.GetMean(1)), ("Std", f.GetSigma(1)), ("Min", f.GetMinimum(1)),
                             ("Max", f.GetMaximum(1))):
            assert float(row[title]) == pytest.approx(value, rel=1e-5, abs=1e-6), title

    # segmenting into the same node again updates its table, no second table node
    again = logic.segment(scene, volume, SegmentParameters(model=str(tiny_model), device="cpu", classes=["spleen"]),
                          segmentationNode=segmentation, timeout=120)
    assert again.GetNodeReference(REFERENCE_ROLE) is table
    assert scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 1
    assert [r["Structure"] for r in table_rows(table)[1]] == ["spleen"]


def test_no_table_when_statistics_are_off(scene, logic, tiny_model):  # noqa: F811
    volume = load_volume(scene, IMAGE)
    params = SegmentParameters(model=str(tiny_model), device="cpu", statistics=False)
    segmentation = logic.segment(scene, volume, params, timeout=120)
    assert segmentation.GetNodeReference(REFERENCE_ROLE) is None
    assert scene.GetFirstNodeByClass("vtkMRMLTableNode") is None
