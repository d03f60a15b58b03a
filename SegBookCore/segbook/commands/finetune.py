"""`segbook finetune DATASET -o MODEL_DIR --base NAME|MODEL_DIR`: the SegBook fine-tuning recipe.

Each flag is one field of segbook.training.config.FinetuneConfig (saved as MODEL_DIR/training/config.json).
Under `torchrun --nproc_per_node N -m segbook finetune ...` it runs DistributedDataParallel.
"""
from __future__ import annotations

import os
import shlex
import sys

HELP = "fine-tune STU-Net on annotated cases (nnU-Net raw folder or JSON case list) into a model folder"


def add_arguments(p) -> None:
    p.add_argument("dataset", help="nnU-Net/Decathlon raw folder (imagesTr, labelsTr, dataset.json) or JSON case list")
    p.add_argument("-o", "--output", required=True, help="model folder to write (MODEL_DIR)")
    p.add_argument("--base", default="stunet-s-totalseg", help="registry name or model folder to start from")
    p.add_argument("--preset", default="standard", choices=["adapt", "quick", "standard", "segbook"],
                   help="epochs x iterations: adapt 5x50 (continues from the model already in MODEL_DIR when "
                        "it is of the same task, else from --base), quick 20x250, standard 150x250, segbook "
                        "1000x250 (the paper)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="override the preset's 250")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction for validation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--resume", action="store_true", help="continue the run in MODEL_DIR exactly where it stopped")
    p.add_argument("--progress", default="bar", choices=["bar", "json", "none"])
    p.add_argument("--batch-size", type=int, default=2, help="patches per step (per rank under torchrun)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes (default: cores-1, max 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per training process (1 keeps a shared machine responsive; 0: torch's "
                        "default)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default 1e-3, 1e-2 with --scratch)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="the --base model's weights from a file (a released checkpoint downloaded by hand, for "
                        "a machine without the hub) instead of the download")
    p.add_argument("--scratch", action="store_true", help="random initialisation instead of the base's weights")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the base's widths (with --scratch)")
    p.add_argument("--plan", default="data", choices=["data", "base"],
                   help="data: spacing, patch and pools planned from the data; base: keep the base model's "
                        "(e.g. the 1.5 mm CT plan for CT data)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="patch size (default: planned from the data)")
    p.add_argument("--max-patch-voxels", type=int, default=128 ** 3, help="memory budget of a patch for planning")
    p.add_argument("--val-every", type=int, default=5, help="validate every N epochs (and after the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="model name in model.json (default: the output folder's name)")
    p.add_argument("--prompts", action="store_true",
                   help="train a model that also takes clicks: positive/negative points, a box and the previous "
                        "segmentation as extra input channels (zero-initialised), with simulated clicks")
    p.add_argument("--stop-file", default=None, metavar="FILE",
                   help="stop as on SIGTERM (checkpoint saved, continue with --resume) once FILE exists: "
                        "the way to stop a run where no signal reaches it (Windows, launchers)")


def run(args) -> int:
    from ..errors import InputError
    from ..events import make_reporter
    from ..training.config import FinetuneConfig
    from ..training.trainer import finetune

    try:
        import batchgeneratorsv2  # noqa: F401  (the augmentation library, in the `train` extra)
    except ImportError:
        raise InputError("fine-tuning needs the training extras: pip install 'segbook[train]'") from None
    fields = {k: getattr(args, k) for k in FinetuneConfig.__dataclass_fields__}
    try:
        cfg = FinetuneConfig(**fields)
    except ValueError as e:
        raise InputError(str(e)) from None
    # under torchrun rank 0 alone reports and prints: one event stream on stdout, not one per rank
    main_rank = int(os.environ.get("RANK", "0")) == 0
    reporter = make_reporter(args.progress if main_rank else "none")
    if args.progress == "json" and main_rank:   # who to signal: a launcher (Slicer's PythonSlicer) may stand between
        reporter.emit({"event": "started", "pid": os.getpid()})
    # "segbook ..." whatever argv[0] was (a venv path, -m segbook's __main__.py, torchrun's)
    result = finetune(cfg, reporter, command=shlex.join(["segbook", *args.argv]), stop_file=args.stop_file)
    if result["stopped"]:
        print(f"segbook finetune: stopped at epoch {result['epoch']} iteration {result['iteration']}; "
              f"checkpoint saved; continue with --resume", file=sys.stderr)
        return 128 + int(result["signal"])
    val = result.get("validation")
    summary = {"model_dir": result["model_dir"], "epochs": result["epochs_done"]}
    if val:
        summary.update(mean_dice=val["mean_dice"], dice=val["dice"], nsd=val["nsd"])
    reporter.done(**summary)
    if args.progress != "json" and main_rank:
        print(f"model written to {result['model_dir']}" +
              (f"; validation Dice {', '.join(f'{k} {v:.4f}' for k, v in val['dice'].items())} "
               f"(mean {val['mean_dice']:.4f})" if val else ""))
    return 0
