"""What a family's trainer provides to the shared loop (:mod:`qpbridge.training.train`), and their registry."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from qpbridge.errors import ModelCardError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qpbridge.training.data import TileSet


class FamilyTrainer(ABC):
    """Trains one family's model: its network, batches, loss, validation metric and model-folder export.

    ``metric`` names the validation value the loop maximises (early stopping, best weights). Randomness comes
    only from the ``rng`` the loop passes in (and torch's global generator), so a resumed run repeats an
    uninterrupted one.
    """

    family: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    mode: ClassVar[str] = "instances"  # the dataset masks it trains on: "instances" or "semantic"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        self.card = card
        self.data = data
        self.device = device
        self.batch_size = batch_size
        self.crop = crop

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised network (the loop seeds torch first)."""

    @abstractmethod
    def batches(self, rng: np.random.Generator, n_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Augmented training batches on the device, ``n_samples`` samples in all."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its named parts (detached scalars, for the progress line)."""

    @abstractmethod
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation metrics (``self.metric`` among them) on the validation split, the model in eval mode."""

    @abstractmethod
    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        """Write the weights into the model folder ``out`` and return the card for them."""

    def served_card(self, name: str, weights: str, **params: Any) -> dict[str, Any]:
        """The training card as the exported model's card: its name, its weights file, ``params`` added."""
        card = {**self.card, "name": name, "weights": weights}
        if params:
            card["params"] = {**card.get("params", {}), **params}
        return card

    @classmethod
    def load_data(cls, root: Path) -> TileSet:
        """The training data of the folder ``root``: by default a tile folder of ``cls.mode`` masks."""
        from qpbridge.training.data import load_tiles

        return load_tiles(root, mode=cls.mode)

    def samples_per_epoch(self) -> int:
        """Samples in one epoch: by default, the training split's area in crops, at least one batch."""
        return max(self.batch_size, self.data.train_crops(self.crop))

class JitteredCrops:
    """Training batches of random crops of ``_tiles``, colour-jittered on the device and normalised as the card
    says (``norm``, with ``_mean``/``_std`` on the device): the ``batches`` of the trainers that need nothing
    more."""

    _tiles: list[dict[str, torch.Tensor]]
    batch_size: int
    crop: int | None
    jitter: Any
    norm: Any
    _mean: torch.Tensor
    _std: torch.Tensor

    def normalise(self, rgb01: torch.Tensor) -> torch.Tensor:
        return (rgb01 * (255.0 / self.norm.scale) - self._mean) / self._std

    def batches(self, rng: np.random.Generator, n_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        from qpbridge.training.augment import random_crops

        done = 0
        while done < n_samples:
            n = min(self.batch_size, n_samples - done)
            batch = random_crops(self._tiles, rng, n, int(self.crop or 32))
            colour = self.jitter.draw(rng, n)
            rgb = self.jitter.apply(batch.pop("image").float() / 255.0, colour)
            batch["input"] = self.normalise(rgb).contiguous()
            done += n
            yield batch



_REGISTRY: dict[str, type[FamilyTrainer]] = {}

# Card family -> module that registers its trainer, imported on first use.
TRAINER_MODULES: dict[str, str] = {
    "hovernet": "qpbridge.training.hovernet",
    "segformer-hf": "qpbridge.training.segformer",
    "cyclegan": "qpbridge.training.cyclegan",
    "gradcam": "qpbridge.training.gradcam",
    "maskrcnn": "qpbridge.training.maskrcnn",
    "smp": "qpbridge.training.smp",
}

T = TypeVar("T", bound=type[FamilyTrainer])


def register_trainer(family: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        cls.family = family
        _REGISTRY[family] = cls
        return cls

    return deco


def trainer_class(family: str) -> type[FamilyTrainer]:
    if family not in _REGISTRY and family in TRAINER_MODULES:
        importlib.import_module(TRAINER_MODULES[family])
    try:
        return _REGISTRY[family]
    except KeyError:
        known = ", ".join(sorted(set(_REGISTRY) | set(TRAINER_MODULES)))
        raise ModelCardError(f"no trainer for model family '{family}'; qpbridge trains: {known}") from None


# The model folder may be served while training goes on, so exported weights replace the old ones whole.
def save_state_dict(state: dict[str, Any], path: Path) -> None:
    """``state`` (tensors, moved to the CPU) written to ``path`` by an atomic rename."""
    import os

    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def save_pretrained_folder(model: Any, folder: Path) -> None:
    """``model.save_pretrained`` into ``folder``, swapped in for the old folder rather than written over it."""
    import os
    import shutil

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
