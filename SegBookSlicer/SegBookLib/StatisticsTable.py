"""The core's per-structure statistics of a Segment run as a table node beside the segmentation.

The numbers are the worker's (segbook.statistics, on the input volume's own voxels), the same as
`segbook predict --statistics` writes to its CSV; the table is only their display. The segmentation node
references its table ("SegBook.Statistics"), so segmenting into the same node again updates it in place.
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
