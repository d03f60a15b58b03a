"""How a fine-tune is set up before its first step: the config checked against a run to resume, the
dataset checked and split, the plan and the cache, and the model folder's description and provenance.
(`trainer` runs the steps.)"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig, Plan
from ..dataset import check_dataset
from ..errors import InputError, SegBookError
from ..labels import default_color
from ..planning import plan_from_data, pools_for_patch, target_spacing
from ..atomic import append_text, write_text
from .adapt import PREVIOUS, previous_model
from .cache import cache_dataset
from .config import FinetuneConfig
from .distributed import Dist


class TrainingError(SegBookError):
    """Training cannot go on (NaN loss, a run already in the output folder...); one-line message."""


def split_cases(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) names: a seeded shuffle; at least one case each side when fraction > 0."""
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    n_val = 0 if fraction <= 0 else min(max(1, int(round(fraction * len(order)))), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def _prepare_config(cfg: FinetuneConfig, train_dir: Path) -> FinetuneConfig:
    saved = train_dir / "config.json"
    if cfg.resume:
        if not (train_dir / "checkpoint.pt").is_file():
            raise TrainingError(f"{train_dir}: no checkpoint.pt to resume from")
        old = FinetuneConfig.load(saved)
        changed = _changed_recipe(cfg, old)
        if changed:
            raise TrainingError(f"{cfg.output}: --resume continues the run as it was started, which differs in "
                                f"{', '.join(changed)}: leave these out, or train into another output folder")
        # what may change between runs: where it runs, how it reports, and a longer schedule
        for k in ("device", "num_workers", "threads", "progress", "val_every"):
            setattr(old, k, getattr(cfg, k))
        if cfg.epochs is not None:
            old.epochs = cfg.epochs
        old.resume = True
        return old
    if (train_dir / "checkpoint.pt").is_file() and cfg.preset != "adapt":   # adapt: see _adapt_start
        raise TrainingError(f"{cfg.output} already holds a training run; continue it with --resume "
                            f"or choose another output folder")
    return cfg


# what --resume may change (where the run is, where it runs, how it reports, a longer schedule); every other
# field is the recipe the checkpoint was trained with
_RESUMABLE = ("dataset", "output", "resume", "device", "num_workers", "threads", "progress", "val_every", "epochs")


def _changed_recipe(new: FinetuneConfig, old: FinetuneConfig) -> list[str]:
    """The recipe flags given to --resume (not left at their default) with another value than the run's,
    e.g. ["--batch-size 1 (the run has 2)"]. A flag left out takes the run's value."""
    def shown(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    out = []
    for f in dataclasses.fields(FinetuneConfig):
        value, was = getattr(new, f.name), getattr(old, f.name)
        if f.name in _RESUMABLE or value == f.default or value == was:
            continue
        flag = "--" + f.name.replace("_", "-")
        flag = flag if isinstance(value, bool) else f"{flag} {shown(value)}"
        out.append(f"{flag} (the run has {'its default' if was is None else shown(was)})")
    return out


def _adapt_start(cfg, ds, out: Path, d: Dist) -> None:
    """`--preset adapt`: start from the output folder's model when it is of the same task (training.adapt);
    a finished run of another task there is refused, as for any preset."""
    channels = len(ds.cases[0].images) if ds.cases else 1
    train_dir = out / "training"
    kept = train_dir / PREVIOUS
    previous = d.main_first(lambda: previous_model(out, ds.class_names, channels) if d.is_main
                            else (kept if kept.is_dir() else None), "taking the previous model")
    if previous is not None:
        cfg.base = str(previous)
    elif (train_dir / "checkpoint.pt").is_file():
        raise TrainingError(f"{cfg.output} already holds a training run of another task; choose another "
                            f"output folder")


def _plan(cfg, ds, train_cases, base_config, cache_dir, reporter, d: Dist):
    """Plan spacing from the headers, cache the training cases, then fit patch and pools to their shapes
    (or, with `--plan base`, keep the base model's spacing, patch, normalisation and pools).

    Returns (Plan, pools, cached cases). Under DDP each rank preprocesses its share of the cases, then
    every rank reads the whole cache.
    """
    import SimpleITK as sitk
    if cfg.plan == "base":
        bp = base_config.plan
        plan = Plan(spacing=list(bp.spacing), patch_size=list(bp.patch_size), normalization=bp.normalization,
                    ct_intensities=bp.ct_intensities, mirror_axes=list(bp.mirror_axes),
                    crop_to_nonzero=bp.crop_to_nonzero)
        pools = [list(p) for p in base_config.arch.pool_op_kernel_sizes]
    else:
        spacings = []
        for c in train_cases:
            r = sitk.ImageFileReader()
            r.SetFileName(str(c.label))
            r.ReadImageInformation()
            spacings.append(r.GetSpacing()[::-1])
        plan = Plan(spacing=target_spacing(np.array(spacings)), patch_size=[0, 0, 0], normalization="zscore",
                    mirror_axes=[0, 1, 2])
    cached = d.checked(lambda: cache_dataset(ds, d.shard(train_cases), plan, cache_dir, reporter), "preprocessing")
    if d.enabled:   # the other ranks' shares are on disk now: every rank reads the whole cache
        cached = cache_dataset(ds, train_cases, plan, cache_dir)
    if cfg.plan == "data":
        shapes = [np.load(c.image_path, mmap_mode="r").shape[1:] for c in cached]
        data_plan = plan_from_data([plan.spacing] * len(shapes), shapes, cfg.max_patch_voxels)
        plan.patch_size, pools = data_plan.patch_size, data_plan.pool_op_kernel_sizes
    if cfg.patch_size:
        pools = pools_for_patch(cfg.patch_size, plan.spacing) if cfg.plan == "data" else pools
        div = np.prod(np.array(pools), axis=0)
        if any(p % d for p, d in zip(cfg.patch_size, div)):
            raise InputError(f"--patch-size {cfg.patch_size} must be divisible by the pooling {list(div)}")
        plan.patch_size = list(cfg.patch_size)
    return plan, pools, cached


def _describe(base_config, cfg, dims, ds) -> str:
    shape = f"STU-Net-{base_config.size}" if base_config.size else f"the {base_config.name} network"
    if cfg.width != 1.0:
        shape = f"{shape} shape at {cfg.width:g}x width (dims {'-'.join(map(str, dims))})"
    how = "trained from scratch" if cfg.scratch else f"fine-tuned from {base_config.name}"
    return f"{shape}, {how} on {ds.name} ({', '.join(ds.class_names[1:])})"


def _check_and_split(cfg, ds, base_config, train_dir: Path) -> dict:
    """Bad input fails here, before any training; returns {"train": names, "validation": names}."""
    base_channels = base_config.image_channels
    n_channels = len(ds.cases[0].images) if ds.cases else 1
    # a one-channel base adapts to any channel count (first layer repeated); a multi-channel base must match
    check_dataset(ds, expected_channels=None if (base_channels == 1 or cfg.scratch) else base_channels)
    bad = next((c for c in ds.cases if len(c.images) != n_channels), None)
    if bad is not None:
        raise InputError(f"case {bad.name}: {len(bad.images)} channels, the first case has {n_channels}")
    split_file = train_dir / "split.json"
    if cfg.resume and split_file.is_file():
        return json.loads(split_file.read_text())
    tr, va = split_cases([c.name for c in ds.cases], cfg.val_fraction, cfg.seed)
    return {"train": tr, "validation": va}


def _record_command(train_dir: Path, command: str | None, resume: bool) -> dict:
    """Add this invocation to training/commands.txt (a fresh run starts the file anew); returns
    {"command": the first, "resumed": the later ones}. A file of its own, so the first command survives a
    stop before the first epoch wrote model.json."""
    path = train_dir / "commands.txt"
    line = (command or "(called from Python: segbook.training.finetune)").replace("\n", " ") + "\n"
    (append_text if resume else write_text)(path, line)
    first, *later = path.read_text().splitlines()
    return {"command": first, "resumed": later} if later else {"command": first}


def _model_config(cfg, out: Path, net, plan, base_config, init_info, ds, split, commands, world_size
                  ) -> ModelConfig:
    return ModelConfig(
        name=cfg.name or out.name, arch=net.arch, plan=plan, class_names=list(ds.class_names),
        prompts=net.prompts,
        colors=[default_color(n, i) for i, n in enumerate(ds.class_names)],
        description=_describe(base_config, cfg, net.arch.dims, ds),
        license="same terms as the training data and the base model",
        size=base_config.size if cfg.width == 1.0 else None,
        provenance={**init_info, "data": {"source": ds.source, "name": ds.name, "train_cases": len(split["train"]),
                                          "validation_cases": split["validation"]},
                    "recipe": cfg.to_dict(), "processes": world_size, **commands})
