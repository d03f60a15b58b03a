"""SegBook's Slicer module library: one class per file; logic without Qt so it runs on slicer-core.

From a clone (SegBookSlicer/ added to Slicer's Application Settings > Modules > Additional module paths) the
core package is not installed beside the module but in ../SegBookCore: it goes first on sys.path, so that
the module, its worker process (ProcessRunner.coreEnvironment) and the batch script use the clone's core.
"""
import sys
from pathlib import Path

_CLONE_CORE = Path(__file__).resolve().parents[2] / "SegBookCore"
if (_CLONE_CORE / "segbook" / "__init__.py").is_file() and str(_CLONE_CORE) not in sys.path:
    sys.path.insert(0, str(_CLONE_CORE))
