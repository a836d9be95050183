"""Reading weight files and loading them into a module, shared by the torch families.

Files are read without unpickling arbitrary objects: ``torch.load(weights_only=True)`` for ``torch.save``
files, safetensors, and (for detectron2's ``.pkl`` checkpoints) a pickle reader that only rebuilds numpy
arrays and plain containers (:func:`read_numpy_pickle`).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from qpbridge.errors import ModelLoadError

__all__ = ["load_state_dict_file", "load_weights_strict", "read_numpy_pickle"]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (tensors only: never arbitrary
    pickled objects), unwrapped from a checkpoint's ``state_dict``/``model`` entry."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not zipfile.is_zipfile(path) and path.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise ModelLoadError(f"{path} is neither a torch.save file nor a safetensors file", path=str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} as a state dict: {type(exc).__name__}: {exc}. Save the weights "
                             "with torch.save(model.state_dict(), path) (a whole pickled model or a checkpoint "
                             "with other objects is not loaded)", path=str(path)) from exc
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)",
                             path=str(path))
    return {str(k): v for k, v in data.items()}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``module.`` (DataParallel) and ``model.`` (a wrapper module) prefixes removed where the model has no such
    names itself."""
    for prefix in ("module.", "model.", "net."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` with an error naming the missing, unexpected and misshapen parameters."""
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def some(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs model: {some(shapes)})")
        raise ModelLoadError(f"{what} do not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# What a pickle of numpy arrays in plain containers refers to; anything else is refused.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            with warnings.catch_warnings():  # numpy 2 warns about pickles naming numpy.core
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers")


def read_numpy_pickle(path: Path) -> Any:
    """A pickle holding numpy arrays in dicts/lists (detectron2's model-zoo ``.pkl``/``.pth`` layout), read with
    ``latin1`` for Python 2 pickles (as detectron2 does), refusing any other object."""
    with open(path, "rb") as f:
        return _NumpyUnpickler(f, encoding="latin1").load()
