"""Read checkpoints without executing code from them.

Released STU-Net checkpoints are nnU-Net v1 pickles (`{"epoch", "state_dict", "optimizer_state_dict",
"plot_stuff", "amp_grad_scaler", ...}`) holding numpy scalars, which `torch.load(weights_only=True)`
refuses. We unpickle them with an explicit allowlist of globals instead: anything else the pickle asks
for (os.system, builtins.eval, arbitrary classes) is refused before it can be called.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import SegBookError

__all__ = ["CheckpointError", "load_checkpoint", "save_weights", "strip_prefixes", "check_state_dict"]


class CheckpointError(SegBookError, ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def _numpy_core() -> str:
    return "numpy._core" if hasattr(np, "_core") else "numpy.core"


_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    # numpy scalars in nnU-Net's plot_stuff: scalar(dtype, bytes), bytes made by _codecs.encode(str, "latin1")
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("_codecs", "encode"),
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and name in _TORCH_DTYPES):
            # numpy 1.x files say numpy.core, numpy 2.x files numpy._core: load both with either numpy.
            if module.startswith(("numpy.core", "numpy._core")):
                module = _numpy_core() + module.split("core", 1)[1]
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' (not a tensor, container "
                                     f"or numpy value; the file may contain code)")


class _SafePickleModule:
    """What torch.load needs of a pickle module, with find_class restricted to the allowlist."""
    Unpickler = _AllowlistUnpickler
    load = staticmethod(lambda f, **kw: _AllowlistUnpickler(f, **kw).load())
    __name__ = "segbook_safe_pickle"


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SafePickleModule)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith("refusing"):
            raise CheckpointError(f"{path}: {msg}") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({msg}); download it again") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{path}: no such file") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              f"download it again") from None


def strip_prefixes(state: dict) -> dict:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a released-format checkpoint (`*.model`), a `.pth`, or a `.safetensors` file.

    Pickles are read with an allowlist and never run code. Raises CheckpointError (one line) on a file
    that is missing, corrupt, malicious, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return strip_prefixes(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e}); download it again") from None
    obj = _load_pickle(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "network_weights", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return strip_prefixes(dict(obj))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError naming the first missing, unexpected or wrongly shaped key."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore_prefixes)}
    theirs = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    for k, v in own.items():
        if k not in theirs:
            raise CheckpointError(f"{source}: missing key '{k}' (is this checkpoint for another network size?)")
        if tuple(theirs[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: key '{k}' has shape {tuple(theirs[k].shape)}, "
                                  f"the network expects {tuple(v.shape)}")
    extra = sorted(set(theirs) - set(own))
    if extra:
        raise CheckpointError(f"{source}: unexpected key '{extra[0]}' (is this checkpoint for another network?)")


def _verify_weights(tmp: Path, state: dict[str, torch.Tensor]) -> None:
    """The file's header lists every tensor and the file is as long as its header says (safetensors checks
    the length when it opens a file); the data itself is not read back."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(tmp), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        from .atomic import short_write_reason
        raise OSError(errno.EIO, short_write_reason(tmp, f"incomplete safetensors file ({e})")) from None
    if keys != set(state):
        raise OSError(errno.EIO, "the file read back lacks tensors")


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a safetensors file atomically, verified complete before it replaces the previous one
    (atomic.WriteError naming `path` when it cannot be written)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from .atomic import atomic_write, usual_permissions
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_write(path, verify=lambda tmp: _verify_weights(tmp, tensors), suffix=".safetensors") as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as e:    # "... (os error 27)", older: "IoError(Os { code: 27, ... })"
            code = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(e))
            number = int(code.group(1) or code.group(2)) if code else None
            raise OSError(number, os.strerror(number)) if number else OSError(
                errno.EIO, str(e).splitlines()[0] if str(e) else "safetensors could not write") from None
        usual_permissions(tmp)      # safetensors makes a file of its own, readable by its owner only
