"""Base class, result types and the registry of model families."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from qpbridge.errors import ModelCardError, ModelLoadError

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard


NO_CLASS = 255  # class-map value of pixels that belong to no class


@dataclass
class SemanticResult:
    """One tile's semantic output at the model's pixel size, as class indices or class probabilities.

    ``classes`` (H, W) holds indices into ``card.classes`` (``NO_CLASS`` for none); ``probs`` (C, H, W)
    holds per-class probabilities, which overlapping tiles blend before the argmax. A family sets at least
    one; ``class_map()`` and ``probabilities()`` derive the other. ``scale`` is the size of one output
    pixel in model pixels: 1 at the tile's own size, 4 for SegFormer's native quarter-resolution logits
    (the output of a tile of h x w px is then ceil(h / 4) x ceil(w / 4)).
    """

    classes: np.ndarray | None = None
    probs: np.ndarray | None = None
    scale: int = 1
    # (batch, row): ``probs`` is ``batch[row]`` of a batch output left on the device, so the stitcher can take
    # a run of tiles side by side as one slice of it rather than one tensor call per tile
    batch: tuple[Any, int] | None = None

    def class_map(self) -> np.ndarray:
        if self.classes is not None:
            return self.classes
        if self.probs is None:
            raise ValueError("SemanticResult has neither classes nor probs")
        return np.argmax(self.probs, axis=0).astype(np.uint8)

    def probabilities(self, n_classes: int) -> np.ndarray:
        """(C, H, W) float32; a class map becomes one-hot (NO_CLASS pixels are all zero)."""
        if self.probs is not None:
            return np.asarray(self.probs, dtype=np.float32)
        cmap = self.class_map()
        return (cmap[None, :, :] == np.arange(n_classes, dtype=cmap.dtype)[:, None, None]).astype(np.float32)


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

    def device_busy_s(self) -> float | None:
        """Seconds the model's device has computed so far, for a family that runs on one (else None)."""
        return None

    def predict_native(self, tiles: Sequence[np.ndarray], *, on_device: bool = False) -> list[TileResult]:
        """Like :meth:`predict`, with semantic outputs at the model's own resolution (``SemanticResult.scale``)
        for stitching, which blends them on that grid. With ``on_device``, a family whose model runs on a GPU
        may leave probabilities there as tensors (the stitcher then blends on the device)."""
        return self.predict(tiles)


_REGISTRY: dict[str, type[ModelFamily]] = {}

# Family name -> module that registers it, imported on first use so heavy imports stay lazy.
FAMILY_MODULES: dict[str, str] = {
    "builtin-tissue": "qpbridge.families.tissue",
    "builtin-nuclei": "qpbridge.families.nuclei",
    "segformer-hf": "qpbridge.families.segformer",
    "torchscript-segmentation": "qpbridge.families.torchscript",
    "hovernet": "qpbridge.families.hovernet",
    "cyclegan": "qpbridge.families.cyclegan",
    "pipeline": "qpbridge.families.pipeline",
    "gradcam": "qpbridge.families.gradcam",
    "smp": "qpbridge.families.smp",
    "maskrcnn": "qpbridge.families.maskrcnn",
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


def card_weights(card: ModelCard, kind: str, *, file_only: bool = False) -> Path:
    """The card's weights path, or ModelLoadError naming what is missing (``kind``: what the family reads there)
    and pointing to the card's README for where to get it."""
    readme = card.folder / "README.md" if card.folder is not None else None
    where = f"see {readme}" if readme is not None and readme.is_file() else "see the model card's README"
    if card.weights is None:
        raise ModelLoadError(f"model '{card.name}' has no 'weights' in its card; {where}")
    if not (card.weights.is_file() if file_only else card.weights.exists()):
        raise ModelLoadError(f"model '{card.name}' needs its {kind} at {card.weights}, which does not exist; "
                             f"{where} for where to get them and where to put them", path=str(card.weights))
    return card.weights


def create_model(card: ModelCard, device: str = "cpu") -> ModelFamily:
    return family_class(card.family)(card, device)
