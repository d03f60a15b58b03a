"""`segbook predict`: segment image files, DICOM folders or a folder of images with one model."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import InputError
from ..events import make_reporter
from ..io import DICOM_SEG_SUFFIX, IMAGE_SUFFIXES, check_writable, output_format, sidecar_path
from ..labels import parse_class_names
from ..runners import BACKENDS, PRECISIONS

HELP = "segment CT/MR images (NIfTI, NRRD, MHA, DICOM folders) with an STU-Net model"

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image file, DICOM series folder, or folder of image files")
    parser.add_argument("-o", "--output", required=True,
                        help="output label map (e.g. seg.nii.gz, seg.seg.nrrd) or DICOM SEG (seg.dcm, for a DICOM "
                             "series input); a folder for several inputs")
    parser.add_argument("--model", required=True, help="model name (see `segbook models`) or model folder")
    parser.add_argument("--checkpoint", help="weights file to use with the named model's plan "
                                             "(e.g. a hand-downloaded base_ep4k.model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="network engine: auto (OpenVINO on the CPU when installed, else torch), torch, openvino")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto (fp32 on the CPU, fp16 on CUDA), fp32, bf16 (faster on CPUs with bf16 units; "
                             "fidelity in benchmarks/RESULTS.md), fp16 (CUDA)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", help="mirror test-time augmentation (8 flips)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation (default)")
    parser.set_defaults(tta=False)
    parser.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch (0.5)")
    parser.add_argument("--classes", help="comma-separated class names to keep (others become background)")
    parser.add_argument("--roi", help="X0,Y0,Z0,X1,Y1,Z1: predict only inside this physical box (LPS mm)")
    prompts = parser.add_argument_group(
        "prompts", "segment one structure from clicks (LPS mm, as --roi): OUTPUT holds it with its label value. "
                   "Any model selects the structure under the points; a model trained with prompts refines it")
    prompts.add_argument("--point", action="append", default=[], metavar="X,Y,Z",
                         help="a positive point on the structure (repeat for more)")
    prompts.add_argument("--negative-point", action="append", default=[], metavar="X,Y,Z",
                         help="a point that is not the structure (repeat for more)")
    prompts.add_argument("--box", metavar="X0,Y0,Z0,X1,Y1,Z1", help="the structure lies inside this box")
    prompts.add_argument("--previous", metavar="LABELS",
                         help="the structure as segmented so far (label map on the input's grid; non-zero voxels)")
    parser.add_argument("--format", default=".nii.gz",
                        choices=[s for s in IMAGE_SUFFIXES if s != ".nhdr"] + [DICOM_SEG_SUFFIX],
                        help="output suffix when OUTPUT is a folder (default .nii.gz; .dcm: DICOM SEG)")
    parser.add_argument("--statistics", action="store_true",
                        help="per-structure voxels, volume (ml) and intensity mean/std/min/max, in the sidecar "
                             "JSON and in NAME.statistics.csv beside each output")
    parser.add_argument("--series", metavar="UID",
                        help="Series Instance UID to segment when a DICOM folder holds several (they are listed)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="skip inputs whose output and sidecar exist (resume an interrupted batch)")
    parser.add_argument("--progress", default="bar", choices=["bar", "json", "none"],
                        help="progress display: bar (stderr), json (one event per line on stdout), none")


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def _is_image_file(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES if s != ".nhdr")


def _expand(inputs: list[str]) -> tuple[list[Path], bool]:
    """Input paths -> images to segment, and whether the output must be a folder. A folder holding image
    files stands for those files; any other folder is a DICOM series."""
    images, many = [], len(inputs) > 1
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if _is_image_file(p))
            if files:
                images += files
                many = True
                continue
        images.append(item)
    return images, many


def _check_targets(images: list[Path], targets: list[Path]) -> None:
    """Never lose work to a bad path: two inputs must not write one output, an output must not be an input."""
    seen = {}
    inputs = {p.resolve() for p in images}
    for src, dst in zip(images, targets):
        key = dst.resolve()
        if key in seen:
            raise InputError(f"{dst}: both {seen[key]} and {src} would be written there: rename one input")
        if key in inputs or sidecar_path(dst).resolve() in inputs:
            raise InputError(f"{dst}: writing it would overwrite the input {src}: choose another output")
        seen[key] = src


def _finished(target: Path) -> bool:
    """A case is finished when its label map and its sidecar exist: the sidecar is renamed into place last."""
    return target.is_file() and sidecar_path(target).is_file()


def _parse_numbers(text: str | None, n: int, option: str):
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        what = "six numbers X0,Y0,Z0,X1,Y1,Z1" if n == 6 else "three numbers X,Y,Z"
        raise InputError(f"{option} '{text}': need {what} (LPS mm)")
    return values


def _parse_roi(text: str | None):
    return _parse_numbers(text, 6, "--roi")


def _prompted(args, predictor, image: Path, target: Path, classes, reporter) -> None:
    """One structure from the prompts on the command line into `target`."""
    from ..click_file import FileSession
    if classes and len(classes) > 1:
        raise InputError("with prompts, --classes names the one structure to segment")
    points = [_parse_numbers(p, 3, "--point") for p in args.point]
    negative = [_parse_numbers(p, 3, "--negative-point") for p in args.negative_point]
    box = _parse_numbers(args.box, 6, "--box")
    if output_format(target) == DICOM_SEG_SUFFIX:
        raise InputError(f"{target}: with prompts, write a label map (e.g. .nii.gz or .seg.nrrd)")
    session = FileSession(predictor, image, series=args.series)
    sidecar = session.segment(target, points_lps=points, negative_points_lps=negative, box_lps=box,
                              previous=args.previous, class_name=classes[0] if classes else None)
    for w in sidecar["result"]["warnings"]:
        log.warning("%s", w)
    reporter.done(input=str(image), output=str(target), elapsed_s=sidecar["elapsed_s"], result=sidecar["result"])


def _shard(images: list, targets: list, device: str):
    """Under torchrun (RANK/WORLD_SIZE set), rank r of n predicts inputs r, r+n, ... on its own GPU
    (LOCAL_RANK) or its share of the CPU cores (inference._cpu_count). No process group is needed."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return images, targets, device
    if device == "auto":
        import torch
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    log.info("rank %d of %d: %d of %d inputs on %s", rank, world, len(images[rank::world]), len(images), device)
    return images[rank::world], targets[rank::world], device


def run(args) -> int:
    import os
    # Transparent huge pages for PyTorch's large CPU buffers (read at the first large allocation): on the torch
    # engine each 128^3 tile allocates ~10 GB of short-lived activations, and 4 KB pages make that ~1M page
    # faults. (The OpenVINO engine keeps its own buffers; end to end it measured the same with and without.)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from ..inference import Predictor

    images, many = _expand(args.inputs)
    classes = parse_class_names(args.classes)
    roi = _parse_roi(args.roi)
    prompted = bool(args.point or args.negative_point or args.box or args.previous)
    if prompted and (many or roi is not None):
        raise InputError("prompts (--point, --negative-point, --box, --previous) take one input and no --roi")
    out = Path(args.output)
    if many:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: several inputs need an output folder, and this is a file")
        check_writable(out, folder=True)
        targets = [out / (_strip_suffix(p.name) + args.format) for p in images]
    else:
        if output_format(out) == DICOM_SEG_SUFFIX:
            from ..dicom_seg import read_source_series
            read_source_series(images[0], args.series)   # a series a SEG cannot reference: refused before loading
        check_writable(out)
        targets = [out]
    _check_targets(images, targets)
    if args.skip_existing:
        todo = [(src, dst) for src, dst in zip(images, targets) if not _finished(dst)]
        if len(todo) < len(images):
            log.warning("skipping %d of %d inputs whose outputs exist (--skip-existing)",
                        len(images) - len(todo), len(images))
        images, targets = [src for src, _ in todo], [dst for _, dst in todo]
        if not images:
            return 0
    images, targets, device = _shard(images, targets, args.device)
    reporter = make_reporter(args.progress)
    predictor = Predictor(args.model, checkpoint=args.checkpoint, device=device, tta=args.tta,
                          step=args.step, reporter=reporter, backend=args.backend, precision=args.precision)
    if classes:
        predictor.label_values(classes)     # an unknown class name fails before any image is read
    if prompted:
        _prompted(args, predictor, images[0], targets[0], classes, reporter)
        return 0
    failed = 0
    for i, (src, dst) in enumerate(zip(images, targets)):
        reporter.emit({"event": "case", "input": str(src), "output": str(dst), "index": i, "total": len(images)})
        try:
            sidecar = predictor.predict_file(src, dst, roi_lps=roi, classes=classes, statistics=args.statistics,
                                             series=args.series)
        except InputError as e:
            if not many:
                raise
            # one bad case in a batch of hundreds should not cost the rest: report it, go on, fail at the end
            failed += 1
            print(f"segbook predict: error: {e}", file=sys.stderr)
            reporter.error(str(e))
            continue
        reporter.done(input=str(src), output=str(dst), elapsed_s=sidecar["elapsed_s"])
    if failed:
        raise InputError(f"{failed} of {len(images)} inputs failed (named above); the other outputs were written")
    return 0
