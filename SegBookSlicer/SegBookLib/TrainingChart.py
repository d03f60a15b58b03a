"""The live loss / validation Dice chart of a fine-tuning run, as MRML table and plot nodes.

Each `metric` event of `segbook finetune` (`{"event": "metric", "epoch": 3, "train_loss": 0.4, ...}`) is a
row; every numeric key becomes a column, and the losses and the mean Dice become plot series against the
epoch. The chart node is shown in the panel's plot widget (through `view`), and the table can be saved with the
scene.
"""
from __future__ import annotations

import numbers

X_KEYS = ("epoch", "iteration", "step")
SKIP = {"event", "request"}


def plotted(key: str) -> bool:
    """Whether a metric is drawn: the losses and the mean Dice (`val_mean_dice`, `val_dice`). The per-class
    Dice (`val_dice_<class>`, 104 of them for a TotalSegmentator base), the learning rate and timings stay in
    the table only."""
    return "loss" in key or key.endswith("dice")


class TrainingChart:
    def __init__(self, scene, name: str = "SegBook fine-tuning"):
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} metrics")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle("Fine-tuning")
        self.chart.SetXAxisTitle("epoch")
        # the panel's qMRMLPlotWidget shows a plot view node, which shows the chart
        self.view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", f"{name} view")
        self.view.SetPlotChartNodeID(self.chart.GetID())
        self.rows: list = []
        self.columns: list = []
        self.series: dict = {}

    @classmethod
    def reuse(cls, chart: "TrainingChart | None", scene) -> "TrainingChart":
        """`chart` emptied for a new run while its nodes are in `scene`, else a new chart: one set of
        table, chart and plot view nodes however many runs the panel starts."""
        nodes = (chart.table, chart.chart, chart.view) if chart is not None else ()
        if chart is None or chart.scene is not scene or not all(scene.IsNodePresent(n) for n in nodes):
            return cls(scene)
        chart.reset()
        return chart

    def reset(self) -> None:
        """Forget the rows and remove the series (a new run starts with an empty chart)."""
        self.chart.RemoveAllPlotSeriesNodeIDs()
        for series in self.series.values():
            if self.scene.IsNodePresent(series):
                self.scene.RemoveNode(series)
        self.rows, self.columns, self.series = [], [], {}
        import vtk
        self.table.SetAndObserveTable(vtk.vtkTable())

    def _xKey(self, event: dict) -> str:
        return next((k for k in X_KEYS if k in event), "row")

    def add(self, event: dict) -> None:
        """Append one metric event and refresh the table and its series."""
        values = {k: float(v) for k, v in event.items()
                  if k not in SKIP and isinstance(v, numbers.Number) and not isinstance(v, bool)}
        if not values:
            return
        xKey = self._xKey(event)
        values.setdefault(xKey, float(len(self.rows)))
        self.rows.append(values)
        for key in values:
            if key not in self.columns:
                self.columns.append(key)
        self._refresh(xKey)

    def _refresh(self, xKey: str) -> None:
        import vtk
        table = vtk.vtkTable()
        for key in self.columns:
            column = vtk.vtkDoubleArray()
            column.SetName(key)
            for row in self.rows:
                column.InsertNextValue(row.get(key, float("nan")))
            table.AddColumn(column)
        self.table.SetAndObserveTable(table)
        for key in self.columns:
            if key == xKey or key in self.series or not plotted(key):
                continue
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", key)
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName(xKey)
            series.SetYColumnName(key)
            series.SetPlotType(series.PlotTypeScatter)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series[key] = series

    def column(self, key: str) -> list:
        return [row.get(key) for row in self.rows]
