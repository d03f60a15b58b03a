"""Draw the README's picture of clicks in the Slicer module, from a real run.

    python Utilities/draw_slicer_clicks.py docs/images/slicer_clicks.png

Runs what the module's "Interactive (clicks)" section runs, without the application: a real MRML scene
(the `slicer-core` wheel), the volume read by Slicer's own reader, markups point lists placed in world RAS,
InteractiveLogic sending each placement to the real worker with the shipped `hippocampus-demo` model. The
clicks are the simulated user's (`segbook.clicks.next_click`) on a held-out case; each panel shows the
segment as the scene holds it after that click, on the slice (first array axis) of the first click.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "SegBookSlicer"))

CASE = "hippocampus_015"
STRUCTURE, VALUE = "anterior", 1
CLICKS = 3


def main(out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer
    import vtk
    from segbook.clicks import dice, next_click
    from SegBookLib import NodeIO
    from SegBookLib.InteractiveLogic import InteractiveLogic
    from SegBookLib.Parameters import SegmentParameters
    from SegBookLib.SegmentationLogic import SegmentationLogic

    cases = ROOT / "SegBookCore" / "segbook" / "data" / "demo_cases"
    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)     # as the application sets its scene up
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", CASE)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(cases / f"{CASE}_image.nii.gz"))
    if not storage.ReadData(volume):
        raise SystemExit(f"Slicer could not read {storage.GetFileName()}")
    import SimpleITK as sitk
    target = sitk.GetArrayFromImage(sitk.ReadImage(str(cases / f"{CASE}_label.nii.gz"))) == VALUE
    image = slicer.util.arrayFromVolume(volume)
    ijkToRas = NodeIO.ijkToRasArray(volume)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "clicks")
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    worker = SegmentationLogic()
    logic = InteractiveLogic(worker, scene)
    try:
        logic.begin(volume, segmentation, None, SegmentParameters(model="hippocampus-demo", device="cpu"),
                    ["background", "anterior", "posterior"])
        logic.observe(positive, negative)
        states, prediction = [], None
        for _ in range(CLICKS):
            click = next_click(target, prediction)
            if click is None:
                break
            (z, y, x), isPositive = click
            ras = ijkToRas @ np.array([x, y, z, 1.0])
            (positive if isPositive else negative).AddControlPointWorld(vtk.vtkVector3d(*ras[:3]))
            outcome = logic.wait()[-1]
            if not outcome["ok"]:
                raise SystemExit(outcome["message"])
            prediction = NodeIO.segmentMask(segmentation, outcome["segmentId"], volume).astype(bool)
            states.append(((z, y, x), isPositive, prediction, outcome))
    finally:
        logic.shutdown()
        worker.shutdown()

    first = states[0][0][0]
    fig, axes = plt.subplots(1, len(states) + 1, figsize=(3 * (len(states) + 1), 3.6))
    axes[0].imshow(image[first], cmap="gray", interpolation="nearest")
    axes[0].contour(target[first], levels=[0.5], colors="yellow", linewidths=1)
    axes[0].set_title(f"{CASE}: {STRUCTURE}\n(reference, yellow)", fontsize=9)
    for n, (ax, ((_, _, _), _, mask, outcome)) in enumerate(zip(axes[1:], states), 1):
        ax.imshow(image[first], cmap="gray", interpolation="nearest")
        ax.imshow(np.ma.masked_where(~mask[first], mask[first]), cmap="autumn", alpha=0.45,
                  interpolation="nearest")
        ax.contour(target[first], levels=[0.5], colors="yellow", linewidths=1)
        for (z, y, x), isPositive, _, _ in states[:n]:
            ax.plot(x, y, "o", color="lime" if isPositive else "red", markersize=7 if z == first else 4,
                    markeredgecolor="black")
        load = " (model loading included)" if n == 1 else ""
        ax.set_title(f"after click {n}: Dice {dice(mask, target):.3f}\n{outcome['seconds']} s in the worker{load}",
                     fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("SegBook in Slicer: positive (green) and negative (red) points, the segment after each", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    for n, (zyx, isPositive, mask, outcome) in enumerate(states, 1):
        print(f"click {n}: {'positive' if isPositive else 'negative'} at voxel {zyx}, Dice {dice(mask, target):.3f}, "
              f"{outcome['seconds']} s in the worker, {outcome['tiles']} tile(s)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/slicer_clicks.png")
