"""Headless batch segmentation with the module's own logic.

    Slicer --no-main-window --python-script <module folder>/Resources/Scripts/SegBookBatch.py \
           --input IN --output OUT --model NAME [--device auto|cuda|cpu] [--tta] [--classes a,b] [--checkpoint FILE]

It lives in a resource folder because Slicer's scripted-module factory imports every `.py` at the top of
the module folder as a module and expects a class of the file's name.

IN is an image file or a folder of them; OUT is a `.seg.nrrd` file (one input) or a folder that receives
`<input name>.seg.nrrd` per input. Each output is a Slicer segmentation file with named, coloured,
terminology-coded segments. Exits with status 0 when every input was segmented, 1 otherwise (also on any
unexpected error: Slicer must never be left running), 2 for bad arguments. The same file runs with a plain
Python that has the slicer-core wheel (no application).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the module folder, holding SegBookLib

log = logging.getLogger("SegBookBatch")

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def parseArguments(argv):
    parser = argparse.ArgumentParser(prog="SegBookBatch", description="Segment files with SegBook (headless).")
    parser.add_argument("--input", required=True, help="image file or folder of image files")
    parser.add_argument("--output", required=True, help="output .seg.nrrd file, or folder")
    parser.add_argument("--model", required=True, help="model name (see `segbook models`) or model folder")
    parser.add_argument("--checkpoint", help="checkpoint file downloaded by hand, for the named model")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    parser.add_argument("--classes", help="comma-separated structure subset")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per input (default: none)")
    return parser.parse_args(argv)


def inputsOf(path: Path) -> list:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.lower().endswith(SUFFIXES) and not p.name.startswith("."))
    return [path]


def stemOf(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def outputFor(source: Path, target: Path, path: Path) -> Path:
    """Where the segmentation of `path` goes: OUT itself for one file and a `.seg.nrrd` OUT, else OUT/<name>.seg.nrrd."""
    if source.is_file() and target.name.endswith(".seg.nrrd"):
        return target
    return target / f"{stemOf(path)}.seg.nrrd"


def readVolume(scene, path: Path):
    import slicer
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", stemOf(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"{path}: Slicer cannot read this image")
    return node


def writeSegmentation(node, path: Path) -> None:
    import slicer
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"{path}: cannot write the segmentation")


def run(argv) -> int:
    import slicer
    from SegBookLib.Parameters import SegmentParameters
    from SegBookLib.SegmentationLogic import SegmentationLogic

    args = parseArguments(argv)
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        log.error("%s: no such file or folder", source)
        return 2
    inputs = inputsOf(source)
    if not inputs:
        log.error("%s: no image files", source)
        return 2
    params = SegmentParameters(model=args.model, checkpoint=args.checkpoint, device=args.device, tta=args.tta,
                               classes=[c.strip() for c in (args.classes or "").split(",") if c.strip()])
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    logic = SegmentationLogic()
    failures = 0
    try:
        for path in inputs:
            output = outputFor(source, target, path)
            try:
                volume = readVolume(scene, path)
                node = logic.segment(scene, volume, params, timeout=args.timeout)
                writeSegmentation(node, output)
                log.info("%s -> %s (%d segments)", path, output, node.GetSegmentation().GetNumberOfSegments())
                scene.RemoveNode(node)
                scene.RemoveNode(volume)
            except Exception as e:  # report, go on with the next input, fail at the end
                failures += 1
                log.error("%s: %s", path, e)
    finally:
        logic.shutdown()
    return 1 if failures else 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        status = run(sys.argv[1:])
    except SystemExit as e:             # argparse errors
        status = e.code if isinstance(e.code, int) else 2
    except BaseException as e:          # anything else, Ctrl-C included: still exit, or Slicer keeps running
        log.error("SegBookBatch stopped: %s: %s", type(e).__name__, e)
        status = 1
    import slicer
    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(status)        # Slicer --python-script keeps running otherwise
    else:
        sys.exit(status)


if __name__ == "__main__":
    main()
