"""Choosing the compute device, loudly: users must see whether the GPU is used."""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("qpbridge")

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str = "auto") -> str:
    """'auto' -> 'cuda:0' when torch sees a GPU, else 'cpu'; 'cuda' without one is an error."""
    from qpbridge.errors import QPBridgeError

    if requested not in DEVICE_CHOICES and not requested.startswith("cuda:"):
        raise QPBridgeError(f"unknown device {requested!r}; use one of auto, cpu, cuda, cuda:N")
    if requested == "cpu":
        return "cpu"
    has_torch = importlib.util.find_spec("torch") is not None
    cuda = False
    if has_torch:
        import torch

        cuda = bool(torch.cuda.is_available())
    if requested == "auto":
        return "cuda:0" if cuda else "cpu"
    if not cuda:
        why = "torch is not installed" if not has_torch else "torch sees no CUDA device"
        raise QPBridgeError(f"device {requested} was asked for but {why}; use --device cpu or auto")
    return "cuda:0" if requested == "cuda" else requested
