"""The core's per-structure statistics of a Segment run as a table node beside the segmentation.

The numbers are the worker's (segbook.statistics, on the input volume's own voxels), the same as
`segbook predict --statistics` writes to its CSV; the table is only their display. The segmentation node
references its table ("SegBook.Statistics"), so segmenting into the same node again updates it in place.
After edits in the Segment Editor, `refreshStatistics` computes them again with the same core function from the
segments as they are now (Label: the segment's place in the node), and `showTable` shows the table in the
layout's table view, as Slicer's Segment Statistics module does.
"""
from __future__ import annotations

REFERENCE_ROLE = "SegBook.Statistics"
# (key in the core's rows, column title, unit, vtk array class)
COLUMNS = (("label", "Label", "", "vtkIntArray"), ("name", "Structure", "", "vtkStringArray"),
           ("voxels", "Voxels", "", "vtkIntArray"), ("volume_ml", "Volume", "ml", "vtkDoubleArray"),
           ("mean", "Mean", "", "vtkDoubleArray"), ("std", "Std", "", "vtkDoubleArray"),
           ("min", "Min", "", "vtkDoubleArray"), ("max", "Max", "", "vtkDoubleArray"))


def updateStatisticsTable(scene, segmentationNode, rows: list):
    """Fill (or create) the statistics table of `segmentationNode` with the core's rows; returns it."""
    import vtk
    table = segmentationNode.GetNodeReference(REFERENCE_ROLE)
    if table is None or table.GetScene() is not scene:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentationNode.GetName()} statistics")
        segmentationNode.SetNodeReferenceID(REFERENCE_ROLE, table.GetID())
    wasModifying = table.StartModify()
    try:
        table.RemoveAllColumns()
        for key, title, unit, arrayClass in COLUMNS:
            column = getattr(vtk, arrayClass)()
            column.SetName(title)
            for row in rows:
                column.InsertNextValue(row[key])
            table.AddColumn(column)
            if unit:
                table.SetColumnUnitLabel(title, unit)
        table.SetUseColumnTitleAsColumnHeader(True)
    finally:
        table.EndModify(wasModifying)
    return table


def refreshStatistics(scene, segmentationNode, volumeNode):
    """Fill the statistics table from the segments as they are now, over `volumeNode`'s voxels (the core's
    segbook.statistics in this process: it needs numpy only, no torch); returns the table node."""
    import slicer
    from segbook.statistics import label_statistics

    from . import NodeIO
    if segmentationNode is None or volumeNode is None:
        raise ValueError("select the segmentation and the volume it lies on")
    labels, classes = NodeIO.segmentsToLabels(segmentationNode, volumeNode)
    rows = label_statistics(labels, slicer.util.arrayFromVolume(volumeNode), volumeNode.GetSpacing(), classes)
    return updateStatisticsTable(scene, segmentationNode, rows)


def showTable(table) -> None:
    """Switch to a layout with a table view and show `table` there."""
    import slicer
    layoutManager = slicer.app.layoutManager()
    layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
    applicationLogic = slicer.app.applicationLogic()
    applicationLogic.GetSelectionNode().SetActiveTableID(table.GetID())
    applicationLogic.PropagateTableSelection()
