"""Per-epoch training checkpoints: model, optimizer, scaler, scheduler, epoch, history and every RNG state,
written atomically (a crash or Ctrl-C mid-write leaves the previous checkpoint), so ``--resume`` continues
exactly where the last completed epoch ended."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpbridge.errors import QPBridgeError

CHECKPOINT = "checkpoint.pt"


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"numpy": rng.bit_generator.state, "python": random.getstate(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], rng: np.random.Generator) -> None:
    rng.bit_generator.state = state["numpy"]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise QPBridgeError(f"--resume: no checkpoint at {path}; start without --resume")
    # Our own file (optimizer state and RNG states need more than tensors).
    state: dict[str, Any] = torch.load(str(path), map_location="cpu", weights_only=False)
    return state
