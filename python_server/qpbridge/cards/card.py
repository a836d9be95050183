"""Model cards: data describing a model, validated against the schema shipped in the package.

A card lives at ``<models-dir>/<name>/config.json``. The built-in cards ship with the package (in a
wheel under ``qpbridge/_cards``; in a source checkout they are read from the repository's ``models/``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qpbridge.errors import ModelCardError, ModelLoadError

CARD_FILE = "config.json"


@dataclass(frozen=True)
class ClassInfo:
    name: str
    color: tuple[int, int, int]
    emit: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "color": list(self.color), "emit": self.emit}


@dataclass(frozen=True)
class ModelCard:
    name: str
    family: str
    task: str
    object_type: str
    classes: tuple[ClassInfo, ...]
    tile_size: int
    mpp: float
    overlap: int = 0
    batch_size: int = 8
    requires_mpp: bool = True
    description: str = ""
    normalization: dict[str, Any] = field(default_factory=dict)
    simplify_um: float = 0.0
    min_area_um2: float = 0.0
    max_hole_area_um2: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    licence: str = ""
    pipeline: tuple[str, ...] = ()  # family "pipeline": the stages' model names, translators first
    folder: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: Path | None = None) -> ModelCard:
        validate_card_dict(data, source=str(folder) if folder else "<dict>")
        tile = data["tile"]
        post = data.get("postprocess", {})
        weights = data.get("weights")
        return cls(
            name=data["name"],
            family=data["family"],
            task=data["task"],
            object_type=data.get("object_type", "annotation"),  # translation cards make no objects
            classes=tuple(
                ClassInfo(c["name"], (int(c["color"][0]), int(c["color"][1]), int(c["color"][2])),
                          bool(c.get("emit", True)))
                for c in data.get("classes", [])
            ),
            tile_size=int(tile["size"]),
            overlap=int(tile.get("overlap", 0)),
            batch_size=int(tile.get("batch_size", 8)),
            mpp=float(data["mpp"]),
            requires_mpp=bool(data.get("requires_mpp", True)),
            description=data.get("description", ""),
            normalization=dict(data.get("normalization", {})),
            simplify_um=float(post.get("simplify_um", 0.0)),
            min_area_um2=float(post.get("min_area_um2", 0.0)),
            max_hole_area_um2=float(post.get("max_hole_area_um2", 0.0)),
            params=dict(data.get("params", {})),
            weights=(folder / weights) if (weights and folder) else (Path(weights) if weights else None),
            licence=data.get("licence", ""),
            pipeline=tuple(data.get("pipeline", ())),
            folder=folder,
            raw=data,
        )

    @property
    def max_object_um(self) -> float | None:
        """The largest object an instance model reports (µm across): ``params.max_object_um``, else the
        diameter of a disc of ``params.max_area_um2``; None when the card says neither."""
        value = self.params.get("max_object_um")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        area = self.params.get("max_area_um2")
        if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0:
            return 2.0 * math.sqrt(float(area) / math.pi)
        return None

    @property
    def emit_classes(self) -> list[int]:
        """Indices of the classes whose regions become objects (the others, background, are not emitted)."""
        return [i for i, c in enumerate(self.classes) if c.emit]

    @property
    def plan_overlap(self) -> int:
        """The overlap tiles are planned with. An instance is kept by the tile whose core holds its centroid,
        and it is whole there only if it is smaller than half the overlap, so instance cards overlap by at
        least twice their largest object (up to half the tile)."""
        largest = self.max_object_um
        if self.task != "instance-segmentation" or largest is None or self.mpp <= 0:
            return self.overlap
        return max(self.overlap, min(math.ceil(2.0 * largest / self.mpp), self.tile_size // 2))

    def weights_available(self) -> bool:
        """False for a card whose weights the user has not supplied yet (for a pipeline: any stage's)."""
        if self.weights is not None and not self.weights.exists():
            return False
        if self.pipeline and self.family == "pipeline":
            from qpbridge.cards.stages import stages_available

            return stages_available(self)
        return True

    def to_wire(self) -> dict[str, Any]:
        """The card as the ``models`` op reports it."""
        return {
            "name": self.name,
            "family": self.family,
            "task": self.task,
            "description": self.description,
            "object_type": self.object_type,
            "classes": [c.to_wire() for c in self.classes],
            "tile_size": self.tile_size,
            "overlap": self.plan_overlap,
            "mpp": self.mpp,
            "requires_mpp": self.requires_mpp,
            # False for a card whose weights the user has not supplied yet (see its README).
            "available": self.weights_available(),
            **({"pipeline": list(self.pipeline)} if self.pipeline else {}),
        }


@lru_cache(maxsize=1)
def card_schema() -> dict[str, Any]:
    path = Path(__file__).parent.parent / "schemas" / "model_card.schema.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def validate_card_dict(data: Any, source: str = "<dict>") -> None:
    """Raise ModelCardError naming every schema violation (path and reason)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(card_schema())
    problems = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '<card>'}: {e.message}" for e in problems]
        raise ModelCardError(f"invalid model card {source}: " + "; ".join(lines))


def load_card(folder: Path) -> ModelCard:
    path = folder / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelCardError(f"no {CARD_FILE} in model folder {folder}") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{path} is not valid JSON: {exc}") from exc
    return ModelCard.from_dict(data, folder=folder)


def builtin_cards_dir() -> Path:
    """Where the built-in cards are: inside an installed wheel, or the checkout's models/."""
    packaged = Path(__file__).parent.parent / "_cards"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "models"


def require_weights(card: dict[str, Any], where: str = "") -> None:
    """Refuse, before any work, a model whose card (as the ``models`` op reports it) has no weights installed."""
    if not card.get("available", True):
        raise ModelLoadError(f"model '{card['name']}' has no weights installed{where}: see the model card's README "
                             "(qpbridge models lists what is installed); nothing was run")
