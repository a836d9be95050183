"""Base class, result types and the registry of model families."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from qpbridge.errors import ModelCardError

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard


@dataclass
class SemanticResult:
    """Per-pixel class indices (into ``card.classes``) of one tile, at the model's pixel size."""

    classes: np.ndarray  # (H, W) integer


@dataclass
class InstanceResult:
    """A label image of one tile (0 = background), at the model's pixel size.

    ``class_of`` maps a label to its index in ``card.classes`` (missing labels: class 0);
    ``measurements`` holds per-label values the family computes from pixels (intensities); shape
    measurements (area, perimeter, circularity) are computed from the final polygons elsewhere.
    """

    labels: np.ndarray  # (H, W) int32
    class_of: dict[int, int] = field(default_factory=dict)
    measurements: dict[int, dict[str, float]] = field(default_factory=dict)


TileResult = SemanticResult | InstanceResult


class ModelFamily(ABC):
    """One way of turning RGB tiles into masks. Subclasses register with ``@register_family``.

    ``predict`` gets uint8 RGB tiles (H, W, 3) already resampled to ``card.mpp`` and returns one
    result per tile, in order. Implementations must be thread-safe for concurrent ``predict`` calls
    or say so with ``thread_safe = False`` (the engine then serialises calls).
    """

    family: ClassVar[str] = ""
    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        self.card = card
        self.device = device

    @abstractmethod
    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        """Masks for a batch of tiles."""


_REGISTRY: dict[str, type[ModelFamily]] = {}

# Family name -> module that registers it, imported on first use so heavy imports stay lazy.
FAMILY_MODULES: dict[str, str] = {
    "builtin-tissue": "qpbridge.families.tissue",
    "builtin-nuclei": "qpbridge.families.nuclei",
}

F = TypeVar("F", bound=type[ModelFamily])


def register_family(name: str) -> Callable[[F], F]:
    def deco(cls: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model family '{name}' registered twice")
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return deco


def known_families() -> list[str]:
    return sorted(set(_REGISTRY) | set(FAMILY_MODULES))


def family_class(name: str) -> type[ModelFamily]:
    if name not in _REGISTRY and name in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelCardError(
            f"unknown model family '{name}'; known families: {', '.join(known_families())}"
        ) from None


def create_model(card: ModelCard, device: str = "cpu") -> ModelFamily:
    return family_class(card.family)(card, device)
