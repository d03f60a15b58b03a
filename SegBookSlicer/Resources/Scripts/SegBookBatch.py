"""Headless batch segmentation with the module's own logic.

    Slicer --no-main-window --python-script <module folder>/Resources/Scripts/SegBookBatch.py \
           --input IN --output OUT --model NAME [--device auto|cuda|cpu] [--tta] [--classes a,b] [--checkpoint FILE] \
           [--series UID] [--skip-existing]

It lives in a resource folder because Slicer's scripted-module factory imports every `.py` at the top of
the module folder as a module and expects a class of the file's name.

IN is an image file, a folder of them, or a DICOM series folder (`--series UID` picks one when it holds
several); OUT is a `.seg.nrrd` file (one input) or a folder that receives `<input name>.seg.nrrd` per input.
Inputs are checked by the core's reader first (truncated or damaged files, DICOM slices that do not form one
grid are refused, naming the file), the output location before any input is read; outputs appear complete.
Each output is a Slicer segmentation file with named, coloured, terminology-coded segments. The worker runs in
the Engine Python chosen in the panel's Setup (kept in the user's SegBook folder), else in Slicer's own; this
script imports only the core's torch-free modules, so Slicer itself needs no torch then. Exits with status
0 when every input was segmented, 1 otherwise (also on any unexpected error: Slicer must never be left
running), 2 for bad arguments. The same file runs with a plain Python that has the slicer-core wheel (no
application).
"""
from __future__ import annotations

import argparse
import logging
import os
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
    parser.add_argument("--series", help="DICOM Series Instance UID, when the input folder holds several")
    parser.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    return parser.parse_args(argv)


def inputsOf(path: Path) -> list:
    """The image files of a folder; a folder without any is a DICOM series folder."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith(SUFFIXES) and not p.name.startswith("."))
        return files or [path]
    return [path]


def stemOf(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def outputFor(source: Path, target: Path, path: Path) -> Path:
    """Where the segmentation of `path` goes: OUT itself for one file and a `.seg.nrrd` OUT, else OUT/<name>.seg.nrrd."""
    if (source.is_file() or path == source) and target.name.endswith(".seg.nrrd"):
        return target
    return target / f"{stemOf(path)}.seg.nrrd"


def checkedFiles(path: Path, series=None) -> list:
    """The files Slicer reads for `path`, after the core's checks (InputError naming the file): the file
    itself, or a DICOM series' slice files in order."""
    if path.is_dir():
        from segbook.dicom import select_series
        return select_series(path, series)[0].files
    from segbook.imagefile import check_file
    try:
        check_file(path)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: Slicer cannot read this image ({str(e).strip().splitlines()[-1][:150]})") from None
    return [path]


def readVolume(scene, path: Path, series=None):
    import slicer
    files = checkedFiles(path, series)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", stemOf(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(files[0]))
    if len(files) > 1:
        storage.SetSingleFile(0)
        for f in files:
            storage.AddFileName(str(f))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise RuntimeError(f"{path}: Slicer cannot read this image")
    return node


def writeSegmentation(node, path: Path) -> None:
    """Write under a temporary name, then rename: a finished case is never left half-written."""
    import slicer
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp))
    try:
        if not storage.WriteData(node):
            raise RuntimeError(f"{path}: cannot write the segmentation")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run(argv) -> int:
    import slicer
    from SegBookLib.InstallLogic import pythonSetting
    from SegBookLib.ModelCatalog import userDirectory
    from SegBookLib.Parameters import SegmentParameters
    from SegBookLib.SegmentationLogic import SegmentationLogic

    args = parseArguments(argv)
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        log.error("%s: no such file or folder", source)
        return 2
    inputs = inputsOf(source)
    from segbook.errors import InputError
    from segbook.io import check_writable
    from segbook.labels import parse_class_names
    try:   # before any input is read
        check_writable(target, folder=outputFor(source, target, inputs[0]) != target)
        classes = parse_class_names(args.classes) or []
    except InputError as e:
        log.error("%s", e)
        return 2
    params = SegmentParameters(model=args.model, checkpoint=args.checkpoint, device=args.device, tta=args.tta,
                               classes=classes)
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    logic = SegmentationLogic(python=pythonSetting(userDirectory()))   # the panel's Engine Python, if set
    failures = 0
    try:
        for path in inputs:
            output = outputFor(source, target, path)
            if args.skip_existing and output.is_file():
                log.info("%s: %s exists, skipped", path, output)
                continue
            volume = node = None
            try:
                volume = readVolume(scene, path, args.series)
                node = logic.segment(scene, volume, params, timeout=args.timeout)
                writeSegmentation(node, output)
                log.info("%s -> %s (%d segments)", path, output, node.GetSegmentation().GetNumberOfSegments())
            except Exception as e:  # report, go on with the next input, fail at the end
                failures += 1
                log.error("%s: %s", path, e)
            finally:                # a long folder must not pile up volumes, failed ones included
                for done in (node, volume):
                    if done is not None and scene.IsNodePresent(done):
                        scene.RemoveNode(done)
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
