"""The model zoo: one record per set of released weights, downloads, and `create_model`.

A released checkpoint is downloaded once through `huggingface_hub` (into its own cache, so
`HF_HUB_OFFLINE=1` works), read safely, checked key by key, and converted into a model folder
(`weights.safetensors` + `model.json`) under `cache_dir()`; later loads read only that folder.
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_weights
from .config import Arch, ModelConfig, Plan
from .errors import SegBookError
from .labels import default_color, totalseg_class_names
from .network import STUNET_SIZES, TOTALSEG_POOLS, STUNet

__all__ = ["REGISTRY", "ModelNotFound", "CheckpointError", "cache_dir", "create_model", "get_config", "fetch",
           "list_models", "is_cached", "save_model_folder", "num_parameters"]

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "weights.safetensors", "model.json"


class ModelNotFound(SegBookError, ValueError):
    """An unknown name, or weights that are neither cached nor downloadable; one-line message."""


def _totalseg(size: str, filename: str) -> ModelConfig:
    names = list(totalseg_class_names())
    return ModelConfig(
        name=f"stunet-{size.lower()}-totalseg", size=size,
        arch=Arch(1, len(names), STUNET_SIZES[size]["dims"], STUNET_SIZES[size]["depth"], TOTALSEG_POOLS),
        plan=Plan(spacing=[1.5, 1.5, 1.5], patch_size=[128, 128, 128], normalization="zscore"),
        class_names=names, colors=[default_color(n, i) for i, n in enumerate(names)],
        description=f"STU-Net-{size} pretrained on TotalSegmentator (104 structures, CT)",
        hub_repo="ziyanhuang/STU-Net", hub_filename=filename,
        license="Apache-2.0 (STU-Net); trained on TotalSegmentator data (CC BY 4.0)",
        provenance={"source": "uni-medical/STU-Net, 4000 epochs", "plan": "nnU-Net v1 plans, nonCT z-score"})


def _finetuned(repo: str, classes: list[str], description: str, channels=1, pools=TOTALSEG_POOLS,
               note="") -> ModelConfig:
    return ModelConfig(
        name=repo.split("_", 1)[1].lower() + "-stunet-b", size="B",
        arch=Arch(channels, len(classes), STUNET_SIZES["B"]["dims"], STUNET_SIZES["B"]["depth"], pools),
        plan=Plan(spacing=[1.5, 1.5, 1.5], patch_size=[128, 128, 128], normalization="zscore"),
        class_names=classes, colors=[default_color(n, i) for i, n in enumerate(classes)],
        description=description, hub_repo=repo, hub_filename="base_ep1k.model",
        license="see the hub repository", provenance={"source": "SegBook fine-tuned STU-Net-B", "note": note})


_UNVERIFIED = "plan values not published with the checkpoint; the base model's plan is assumed"

REGISTRY: dict[str, ModelConfig] = {c.name: c for c in [
    _totalseg("S", "small_ep4k.model"),
    _totalseg("B", "base_ep4k.model"),
    _totalseg("L", "large_ep4k.model"),
    _totalseg("H", "huge_ep4k.model"),
    _finetuned("blueyo0/STU-Net_CT-ORG", ["background", "liver", "urinary_bladder", "lung", "kidney", "bone",
                                          "brain"], "STU-Net-B fine-tuned on CT-ORG (6 organs, CT)",
               note=_UNVERIFIED),
    _finetuned("blueyo0/STU-Net_FeTA21", ["background", "external_cerebrospinal_fluid", "grey_matter",
                                          "white_matter", "ventricles", "cerebellum", "deep_grey_matter",
                                          "brainstem"], "STU-Net-B fine-tuned on FeTA 2021 (fetal brain MRI)",
               note=_UNVERIFIED),
    _finetuned("blueyo0/STU-Net_BraTS21", ["background", "necrotic_tumor_core", "peritumoral_edema",
                                           "label_3", "enhancing_tumor"],
               "STU-Net-B fine-tuned on BraTS 2021 (4 MRI channels: T1, T1ce, T2, FLAIR)", channels=4,
               pools=[[2, 2, 2]] * 5, note=_UNVERIFIED + "; class names follow BraTS label values"),
]}


def _bundled() -> dict[str, Path]:
    """Model folders shipped inside the package (no download needed)."""
    root = resources.files("segbook") / "data" / "models"
    if not root.is_dir():
        return {}
    return {p.name: Path(str(p)) for p in root.iterdir() if (p / CONFIG).is_file()}


def cache_dir() -> Path:
    """Where converted model folders live: $SEGBOOK_CACHE, else ~/.cache/segbook."""
    return Path(os.environ.get("SEGBOOK_CACHE") or Path.home() / ".cache" / "segbook")


def list_models() -> list[str]:
    return sorted(REGISTRY) + sorted(n for n in _bundled() if n not in REGISTRY)


def get_config(name_or_folder: str | os.PathLike) -> ModelConfig:
    """The record of a registered name, a bundled model, or a model folder on disk."""
    folder = Path(name_or_folder)
    if (folder / CONFIG).is_file():
        return ModelConfig.load(folder / CONFIG)
    name = str(name_or_folder)
    if name in _bundled():
        return ModelConfig.load(_bundled()[name] / CONFIG)
    if name in REGISTRY:
        return REGISTRY[name]
    raise ModelNotFound(f"unknown model '{name}' (known: {', '.join(list_models())}; or give a model folder)")


def is_cached(name: str) -> bool:
    """Bundled, or converted into the cache (model.json is written last: its presence means complete)."""
    return name in _bundled() or (cache_dir() / "models" / name / CONFIG).is_file()


def num_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _network(config, deep_supervision=False).parameters())


def _network(config: ModelConfig, deep_supervision: bool) -> STUNet:
    a = config.arch
    return STUNet(a.input_channels, a.num_classes, a.dims, a.depth, a.pool_op_kernel_sizes,
                  deep_supervision=deep_supervision)


def save_model_folder(folder: str | os.PathLike, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write weights + model.json into `folder`, each verified complete before it replaces the previous one.

    The weights go first and model.json last, so a folder with a model.json always holds complete weights
    (readers and `fetch` look for model.json). A reader that loads while a fine-tune rewrites the folder may
    pair model.json of one epoch with the weights of the next: the same network, so it still loads. Other
    files in the folder (a fine-tune's `training/`) are left alone.
    """
    folder = Path(folder)
    save_weights(state, folder / WEIGHTS)
    config.save(folder / CONFIG)
    return folder


def _download(config: ModelConfig, again: bool = False, reporter=None) -> Path:
    """The released checkpoint's path in the hub cache, downloaded if missing (or, `again`, in any case);
    its bytes reported to `reporter` as "download" progress events."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .hubprogress import DownloadProgress
    try:
        with DownloadProgress(reporter, config.hub_repo, config.hub_filename, config.hub_revision):
            return Path(hf_hub_download(config.hub_repo, config.hub_filename, revision=config.hub_revision,
                                        force_download=again))
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"{config.name}: {config.hub_repo}/{config.hub_filename} is not cached and the Hugging Face hub "
            f"cannot be reached; connect and run `segbook download {config.name}`, or pass "
            f"--checkpoint FILE with a copy you downloaded") from None
    except Exception as e:  # network, auth and HTTP errors of the hub client
        raise ModelNotFound(f"{config.name}: download of {config.hub_repo}/{config.hub_filename} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def fetch(name: str, reporter=None) -> Path:
    """The model folder of a registered or bundled model, downloading and converting it if needed (download
    progress to `reporter`, see segbook.hubprogress)."""
    if Path(name).joinpath(CONFIG).is_file():
        return Path(name)
    if name in _bundled():
        return _bundled()[name]
    config = get_config(name)
    folder = cache_dir() / "models" / name
    damage = _damage(folder)
    if damage is None:
        return folder
    if folder.exists():
        log.warning("%s: the converted model is damaged (%s); converting it again", folder, damage)
    if not config.hub_repo:
        raise ModelNotFound(f"{name}: no weights cached and no download source")
    path = _download(config, reporter=reporter)
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        state = _fetch_again(config, path, e, reporter)
    check_state_dict(_network(config, deep_supervision=True), state, str(path))
    log.info("converted %s into %s", path, folder)
    return save_model_folder(folder, config, state)


def _damage(folder: Path) -> str | None:
    """Why a converted model folder in the cache cannot be used (missing, a cut or garbled file), or None.
    Cheap: model.json parsed, the weights' header read and their length checked, no tensor read."""
    from safetensors import SafetensorError, safe_open
    if not (folder / CONFIG).is_file():
        return "no model.json" if folder.exists() else "not converted yet"
    try:
        ModelConfig.load(folder / CONFIG)
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            if not list(f.keys()):
                return "weights.safetensors holds no tensors"
    except (SegBookError, SafetensorError, OSError) as e:
        return str(e).splitlines()[0][:200]
    return None


def _fetch_again(config: ModelConfig, path: Path, error: CheckpointError, reporter=None) -> dict:
    """A downloaded checkpoint that cannot be read: downloaded once more, or refused saying what to do."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{path}: the downloaded checkpoint is damaged ({_detail(error)}); delete it and "
                              f"run `segbook download {config.name}` with a connection") from None
    log.warning("%s: the downloaded checkpoint is damaged (%s); downloading it again", path, _detail(error))
    path = _download(config, again=True, reporter=reporter)
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: downloaded twice and still unreadable ({_detail(e)}); the file on "
                              f"the hub may be damaged: report it to {config.hub_repo}") from None


def _detail(error: Exception) -> str:
    """The reason part of a one-line "PATH: reason" message."""
    return str(error).split(": ", 1)[-1].split("; download it again")[0]


def create_model(name_or_folder: str | os.PathLike, pretrained: bool = True, *,
                 checkpoint: str | os.PathLike | None = None, deep_supervision: bool = False) -> STUNet:
    """A ready STU-Net with its ModelConfig attached as `.config`.

    `checkpoint` loads weights from a file (released `.model`, `.pth`, `.safetensors`) with the named
    model's config, for users who downloaded a checkpoint by hand. With `pretrained=False` the network is
    randomly initialised. Raises ModelNotFound / CheckpointError with a one-line message.
    """
    config = get_config(name_or_folder)
    net = _network(config, deep_supervision)
    if checkpoint is not None:
        state, source = load_checkpoint(checkpoint), str(checkpoint)
    elif pretrained:
        folder = fetch(str(name_or_folder))
        state, source = load_checkpoint(folder / WEIGHTS), str(folder / WEIGHTS)
    else:
        state = None
    if state is not None:
        check_state_dict(net, state, source)
        net.load_state_dict(state)
    net.config = config
    return net

