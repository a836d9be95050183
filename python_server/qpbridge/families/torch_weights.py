"""Reading torch weight files as users hold them: a state dict (``torch.save(model.state_dict())``, possibly
saved from ``DataParallel`` with ``module.`` prefixes, or wrapped in a dict under ``state_dict``/``model``)
or a TorchScript archive (``torch.jit.save``). Which one a file is is read from the file itself (a
TorchScript archive is a zip holding a ``code/`` folder), so a card need not say.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from qpbridge.errors import ModelLoadError


def is_torchscript(path: Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip with ``<name>/code/``), False for anything else."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n for n in zf.namelist())


def load_torchscript(path: Path, model: str, device: torch.device) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
            module: torch.nn.Module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelLoadError(f"model '{model}': {path} is not a loadable TorchScript file "
                             f"({type(exc).__name__}: {exc})", path=str(path)) from exc
    return module


def load_state_dict(path: Path, model: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``weights_only``: a checkpoint cannot run code when loaded)."""
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model '{model}': cannot read {path} as a torch state dict "
                             f"({type(exc).__name__}: {exc})", path=str(path)) from exc
    for key in ("state_dict", "model", "net", "G"):  # common training-checkpoint wrappers
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"model '{model}': {path} holds no state dict of tensors", path=str(path))
    if data and all(k.startswith("module.") for k in data):  # saved from DataParallel
        data = {k[len("module."):]: v for k, v in data.items()}
    return dict(data)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], model: str, path: Path) -> None:
    """``module.load_state_dict(state)`` (strict), with the missing/unexpected keys named on failure."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = set(module.state_dict())
        missing = sorted(own - set(state))[:5]
        unexpected = sorted(set(state) - own)[:5]
        raise ModelLoadError(
            f"model '{model}': {path} does not fit the architecture the card describes (missing keys "
            f"{missing}, unexpected keys {unexpected}; first differences: {str(exc).splitlines()[-1][:300]})",
            path=str(path)) from exc
