"""SegBook core: STU-Net segmentation and fine-tuning, headless. See DESIGN.md for the architecture.

Importing the package (or its torch-free modules: errors, io, imagefile, dicom, labels, events) does not import
torch: the Slicer module and its batch script import them in Slicer's own Python, which has no torch when the
engine runs in another interpreter. The names below are loaded on first use; torch comes with them.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {"CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
         "Arch": "config", "ModelConfig": "config", "Plan": "config",
         "STUNet": "network", "build_stunet": "network",
         "REGISTRY": "zoo", "ModelNotFound": "zoo", "create_model": "zoo", "fetch": "zoo", "get_config": "zoo"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        # `segbook.zoo` etc. after a bare `import segbook`, as when this file imported them all
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
