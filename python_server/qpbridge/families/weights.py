"""Weight files as users hold them, read safely and loaded strictly; shared by the torch families.

- State dicts (:func:`load_state_dict_file`): a ``.safetensors`` file or a ``torch.save`` file, read with
  ``torch.load(weights_only=True)`` so a file cannot run code when loaded, and unwrapped from the training
  checkpoints that hold one (``state_dict``, ``model``, ``net``, ``G``).
- Strict loading (:func:`load_weights_strict`): ``DataParallel``/wrapper prefixes (``module.``, ``model.``,
  ``net.``) removed where the model has none itself, and an error naming the missing, unexpected and
  misshapen parameters.
- TorchScript archives (``torch.jit.save``): :func:`is_torchscript` tells them from state dicts by the file
  itself (a zip holding a ``code/`` folder), so a card need not say; :func:`load_torchscript` loads one.
- detectron2's model-zoo pickles (:func:`read_numpy_pickle`): a pickle reader that only rebuilds numpy arrays
  and plain containers.

Errors are :class:`~qpbridge.errors.ModelLoadError` naming the model (when given) and the file.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from qpbridge.errors import ModelLoadError

__all__ = ["is_torchscript", "load_state_dict_file", "load_torchscript", "load_weights_strict",
           "read_numpy_pickle", "unwrap_checkpoint"]

# Entries under which training checkpoints keep the state dict (qpbridge's and detectron2's ``model``,
# Lightning's ``state_dict``, ``net``, pytorch-CycleGAN-style ``G``).
WRAPPER_KEYS = ("state_dict", "model", "net", "G")
# Prefixes a state dict gets from DataParallel (``module.``) or from a wrapper module holding the network.
PREFIXES = ("module.", "model.", "net.")
# How a torch.save file starts: a zip (torch >= 1.6) or a legacy pickle of protocol 2, 4 or 5.
_PICKLE_HEADERS = (b"\x80\x02", b"\x80\x04", b"\x80\x05")


def _whose(model: str | None) -> str:
    return f"model '{model}': " if model else ""


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def is_torchscript(path: Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip with ``<name>/code/``), False for anything else."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n for n in zf.namelist())


def load_torchscript(path: Path, model: str, device: torch.device, hint: str = "") -> torch.nn.Module:
    """The TorchScript module in ``path`` on ``device``; ``hint`` (what to do instead) ends the error."""
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            module: torch.nn.Module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelLoadError(_with_hint(f"model '{model}': {path} is not a loadable TorchScript file "
                                        f"({type(exc).__name__}: {exc})", hint), path=str(path)) from exc
    return module


def unwrap_checkpoint(data: Any) -> Any:
    """The state dict inside a training checkpoint (the first of :data:`WRAPPER_KEYS` holding a dict), or
    ``data`` itself."""
    if isinstance(data, dict):
        for key in WRAPPER_KEYS:
            if isinstance(data.get(key), dict):
                return data[key]
    return data


def load_state_dict_file(path: Path, model: str | None = None, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` state-dict file, unwrapped from a training checkpoint
    (never arbitrary pickled objects). ``model`` names the card in errors; ``hint`` ends them."""
    whose = _whose(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(_with_hint(f"{whose}cannot read {path} as a safetensors file "
                                            f"({type(exc).__name__}: {exc})", hint), path=str(path)) from exc
    if is_torchscript(path):  # torch.load would fail on it with a message that does not say so
        raise ModelLoadError(_with_hint(f"{whose}{path} is a TorchScript file (torch.jit.save), not a state dict",
                                        hint), path=str(path))
    try:
        with open(path, "rb") as f:
            header = f.read(2)
    except OSError as exc:
        raise ModelLoadError(f"{whose}cannot read {path}: {exc}", path=str(path)) from exc
    # Refused before torch.load, whose message for a file of another kind says little.
    if not zipfile.is_zipfile(path) and header not in _PICKLE_HEADERS:
        raise ModelLoadError(_with_hint(f"{whose}{path} is neither a torch.save file nor a safetensors file",
                                        hint), path=str(path))
    try:
        data = unwrap_checkpoint(torch.load(str(path), map_location="cpu", weights_only=True))
    except Exception as exc:
        raise ModelLoadError(_with_hint(
            f"{whose}cannot read {path} as a state dict ({type(exc).__name__}: {exc}); save the weights with "
            "torch.save(model.state_dict(), path) (a whole pickled model or a checkpoint with other objects is "
            "not loaded)", hint), path=str(path)) from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(_with_hint(f"{whose}{path} does not hold a state dict (a mapping of parameter names "
                                        "to tensors)", hint), path=str(path))
    return {str(k): v for k, v in data.items()}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """:data:`PREFIXES` removed, in turn, where every key has one and the model has no such names itself
    (a network whose own parameters start with ``model.``, as CycleGAN's, keeps them)."""
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_weights_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], model: str | None, path: Path,
                        target: str = "the architecture") -> None:
    """``module.load_state_dict(state, strict=True)`` after :func:`_strip_prefixes`. On a mismatch the
    error names the model, the file and the missing, unexpected and misshapen parameters (``target``: what
    the file was checked against, e.g. the card's arch)."""
    own = module.state_dict()
    state = _strip_prefixes(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (file vs model: {_some(shapes)})")
        raise ModelLoadError(f"{_whose(model)}{path} does not fit {target}: " + "; ".join(parts), path=str(path))
    module.load_state_dict(state, strict=True)


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
