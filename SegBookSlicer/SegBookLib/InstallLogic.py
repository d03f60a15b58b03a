"""First-run setup: find what the core needs in Slicer's Python, and install it only when the user agrees.

torch comes through the PyTorch extension's `PyTorchUtils` (it picks the CUDA build that matches the
machine's driver); the small pure-Python dependencies through `slicer.util.pip_install`. SimpleITK and
numpy ship with Slicer and are never replaced. Nothing here runs at import time; the widget calls
`missing()` when the module opens and `install(confirm)` when the user clicks Install or Segment.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Optional

log = logging.getLogger(__name__)

TORCH_REQUIREMENT = "torch>=2.4"
# import name -> pip requirement; the core's dependencies that Slicer does not ship
PIP_REQUIREMENTS = {
    "huggingface_hub": "huggingface_hub>=0.20",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.9",
    "openvino": "openvino>=2024.6",      # the fast CPU engine (segbook.openvino_engine); torch is the fallback
}
# the core's `train` extra: only needed (and only asked for) when the user first fine-tunes
TRAIN_REQUIREMENTS = {
    "batchgeneratorsv2": "batchgeneratorsv2>=0.2",
    "matplotlib": "matplotlib>=3.5",
}
SHIPPED_WITH_SLICER = ("numpy", "SimpleITK")


class InstallError(RuntimeError):
    """Setup cannot go on; the message says what the user can do."""


def _pipInstall(requirements: list) -> None:
    import slicer
    slicer.util.pip_install(requirements)


def _installTorch(requirement: str) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise InstallError("SegBook needs the PyTorch extension: install it from the Extensions Manager, "
                           "restart Slicer, and click Install again") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=requirement.replace("torch", ""))
    if torch is None:
        raise InstallError("PyTorch could not be installed (see the Python console); try again, or install "
                           "it from the PyTorch module")


class InstallLogic:
    def __init__(self, findSpec: Callable = importlib.util.find_spec, pipInstall: Callable = _pipInstall,
                 installTorch: Callable = _installTorch):
        self._findSpec = findSpec
        self._pipInstall = pipInstall
        self._installTorch = installTorch

    def _has(self, name: str) -> bool:
        try:
            return self._findSpec(name) is not None
        except (ImportError, ValueError):
            return False

    def missing(self, training: bool = False) -> list:
        """Import names of the core's dependencies that are not installed, torch first."""
        importlib.invalidate_caches()   # packages installed since the last look
        names = ["torch"] + list(PIP_REQUIREMENTS) + list(SHIPPED_WITH_SLICER)
        if training:
            names += list(TRAIN_REQUIREMENTS)
        return [n for n in names if not self._has(n)]

    def isReady(self, training: bool = False) -> bool:
        return not self.missing(training)

    @staticmethod
    def _requirement(name: str) -> str:
        return PIP_REQUIREMENTS.get(name) or TRAIN_REQUIREMENTS[name]

    def question(self, missing: list) -> str:
        """What the confirmation dialog says: what will be installed and how long it may take."""
        parts = []
        if "torch" in missing:
            parts.append("PyTorch (through the PyTorch extension, which picks the GPU build for this "
                         "computer: a download of up to 2-3 GB, typically 5-15 minutes)")
        pip = [self._requirement(n) for n in missing if n in PIP_REQUIREMENTS or n in TRAIN_REQUIREMENTS]
        if pip:
            parts.append(f"{', '.join(pip)} (a few minutes at most)")
        return ("SegBook needs these Python packages in Slicer:\n- " + "\n- ".join(parts) +
                "\n\nInstall them now?")

    def install(self, confirm: Callable[[str], bool], progress: Optional[Callable[[str], None]] = None,
                training: bool = False) -> bool:
        """Install what is missing after `confirm(question)` says yes; False if the user declined.

        `training` adds the fine-tuning packages. torch goes first so that pip never picks a torch itself.
        """
        missing = self.missing(training)
        if not missing:
            return True
        unshipped = [n for n in missing if n in SHIPPED_WITH_SLICER]
        if unshipped:
            raise InstallError(f"{', '.join(unshipped)} should ship with Slicer; reinstall Slicer")
        if not confirm(self.question(missing)):
            log.info("setup declined by the user")
            return False
        say = progress or (lambda text: log.info("%s", text))
        if "torch" in missing:
            say("Installing PyTorch (this may take several minutes)...")
            self._installTorch(TORCH_REQUIREMENT)
        pip = [self._requirement(n) for n in missing if n in PIP_REQUIREMENTS or n in TRAIN_REQUIREMENTS]
        if pip:
            say(f"Installing {', '.join(pip)}...")
            self._pipInstall(pip)
        still = self.missing(training)
        if still:
            raise InstallError(f"still missing after install: {', '.join(still)}; restart Slicer and retry")
        say("SegBook is ready.")
        return True
