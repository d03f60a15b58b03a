"""The models the Segment panel offers: released ones, bundled ones and the user's fine-tuned folders.

A fine-tuned model is a model folder (weights.safetensors + model.json) under the user's SegBook folder;
it appears here as soon as a fine-tuning run writes it. Model folders picked by hand (offline use) are
remembered in `extra_models.json`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def userDirectory() -> Path:
    """Where SegBook keeps fine-tuned models and training cases across Slicer sessions.

    $SEGBOOK_HOME, else the per-user *local* application data folder, as Qt's
    QStandardPaths::AppLocalDataLocation places it for organisation slicer.org:
    Windows %LOCALAPPDATA%\\slicer.org\\SegBook (not the roaming %APPDATA%, where Slicer.ini lives: models
    and cases take gigabytes, and a roaming profile copies them at every log-on), macOS
    ~/Library/Application Support/slicer.org/SegBook, elsewhere $XDG_DATA_HOME (~/.local/share)/slicer.org/SegBook.
    The same folder inside and outside the application (panel, batch script).
    """
    if os.environ.get("SEGBOOK_HOME"):
        return Path(os.environ["SEGBOOK_HOME"])
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "slicer.org" / "SegBook"


_PARAMETERS: dict = {}


def _parameters(config) -> int:
    """Parameter count, computed once per architecture (building the H model's graph takes a moment)."""
    a = config.arch
    key = (a.input_channels, a.num_classes, tuple(a.dims), tuple(a.depth), str(a.pool_op_kernel_sizes))
    if key not in _PARAMETERS:
        from segbook.zoo import num_parameters
        _PARAMETERS[key] = num_parameters(config)
    return _PARAMETERS[key]


@dataclass
class ModelEntry:
    name: str               # what the worker is given: a registered name or a folder path
    label: str              # what the selector shows
    description: str
    parameters: int
    downloaded: bool
    fineTuned: bool
    classNames: list
    channels: int = 1

    @property
    def sizeText(self) -> str:
        return f"{self.parameters / 1e6:.1f}M parameters"


def _entryDicts(root: str) -> list:
    return [dataclasses.asdict(e) for e in ModelCatalog(root).entries()]


def _checkModelFolder(folder: str) -> None:
    from segbook.zoo import get_config
    get_config(folder)  # raises a one-line error if it is not a model folder


class ModelCatalog:
    def __init__(self, root: Optional[Path] = None, python: Optional[str] = None):
        """`python`: the engine's interpreter when it is not Slicer's own; the core (and torch) is then
        only importable there, so the catalog is read there."""
        self.root = Path(root) if root is not None else userDirectory()
        self.python = python or None
        self._cached = None             # (fingerprint, entries) of the last list read in an Engine Python
        self._generation = 0

    @property
    def modelsDirectory(self) -> Path:
        return self.root / "models"

    @property
    def trainingDirectory(self) -> Path:
        return self.root / "training"

    def _extraFile(self) -> Path:
        return self.root / "extra_models.json"

    def addModelFolder(self, folder) -> None:
        """Remember a model folder chosen on disk (for offline users)."""
        folder = str(Path(folder).resolve())
        if self.python:
            from .ProcessRunner import callInCore
            callInCore(self.python, f"{__name__}:_checkModelFolder", folder, timeout=120)
        else:
            _checkModelFolder(folder)
        extra = self._extraFolders()
        if folder not in extra:
            extra.append(folder)
            self.root.mkdir(parents=True, exist_ok=True)
            # a temporary name of this process, then a rename: a full disk or a crash keeps the previous list
            tmp = self._extraFile().with_name(f".extra_models.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(extra, indent=1))
                tmp.replace(self._extraFile())
            finally:
                tmp.unlink(missing_ok=True)

    def _extraFolders(self) -> list:
        try:
            folders = json.loads(self._extraFile().read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read the list of added model folders (%s); add them again", self._extraFile(), e)
            return []
        return [p for p in folders if isinstance(p, str)] if isinstance(folders, list) else []

    def fineTunedFolders(self) -> list:
        if not self.modelsDirectory.is_dir():
            return []
        return sorted(p for p in self.modelsDirectory.iterdir() if (p / "model.json").is_file())

    def invalidate(self) -> None:
        """Read the list again next time (a model was downloaded)."""
        self._generation += 1

    def _fingerprint(self) -> tuple:
        """What the list depends on that can change while Slicer runs, read without the core."""
        folders = tuple((p.name, (p / "model.json").stat().st_mtime_ns) for p in self.fineTunedFolders())
        return self.python, str(self.root), folders, tuple(self._extraFolders()), self._generation

    def entries(self) -> list:
        """Every model the selector offers: the TotalSegmentator STU-Nets S, B, L, H first, the other released
        and bundled ones, then the user's.

        In an Engine Python the list is read by a child process that imports the core (and torch: seconds, on
        the GUI thread), so the answer is kept until a model folder appears or changes, or `invalidate()`."""
        if self.python:
            from .ProcessRunner import callInCore
            fingerprint = self._fingerprint()
            if self._cached is None or self._cached[0] != fingerprint:
                found = callInCore(self.python, f"{__name__}:_entryDicts", str(self.root))
                self._cached = (fingerprint, found)
            return [ModelEntry(**e) for e in self._cached[1]]
        from segbook.zoo import get_config, is_cached, list_models
        released = []
        for name in list_models():
            config = get_config(name)
            released.append(ModelEntry(name, name, config.description, _parameters(config), is_cached(name),
                                       False, list(config.class_names), config.arch.input_channels))
        order = {"S": 0, "B": 1, "L": 2, "H": 3}
        released.sort(key=lambda e: ("totalseg" not in e.name, order.get(get_config(e.name).size, 9), e.name))
        out = released
        for folder in self.fineTunedFolders() + [Path(p) for p in self._extraFolders()]:
            try:
                config = get_config(folder)
            except ValueError as e:
                log.warning("skipping model folder %s: %s", folder, e)
                continue
            out.append(ModelEntry(str(folder), f"{config.name} (yours)", config.description,
                                  _parameters(config), True, True, list(config.class_names),
                                  config.arch.input_channels))
        return out
