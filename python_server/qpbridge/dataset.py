"""The training-tile folder shared by ``qpbridge export-tiles``, the QuPath export script and ``qpbridge train``.

The layout is documented in docs/training.md ("Dataset layout"); keep this module, the docs and
``qupath_scripts/Export training tiles.groovy`` in step.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpbridge.errors import BadRequestError

DATASET_JSON = "dataset.json"
LABELS_JSON = "labels.json"
FORMATS = ("semantic", "instance", "coco", "points")
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SEED = 0

# QuPath TileExporter's tile name: "<image> [d=2,x=0,y=0,w=512,h=512]" (d= left out when it is 1).
_TILE_NAME = re.compile(r"^(?P<source>.*) \[(?:d=(?P<d>[0-9.eE+-]+),)?x=(?P<x>-?\d+),y=(?P<y>-?\d+),"
                        r"w=(?P<w>\d+),h=(?P<h>\d+)\]$")


def mode_of(fmt: str) -> str:
    """How ``masks/`` is read for an export format: ``semantic`` (class labels) or ``instances``."""
    if fmt not in FORMATS:
        raise BadRequestError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
    return "semantic" if fmt == "semantic" else "instances"


def format_downsample(d: float) -> str:
    """The downsample as QuPath writes it in tile names (up to 3 decimals, no trailing zeros)."""
    text = f"{d:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def tile_name(source: str, x: int, y: int, w: int, h: int, downsample: float) -> str:
    """The tile's base name (no extension), as QuPath's TileExporter names it."""
    d = "" if abs(downsample - 1) < 1e-9 else f"d={format_downsample(downsample)},"
    return f"{source} [{d}x={x},y={y},w={w},h={h}]"


def parse_tile_name(stem: str) -> dict[str, Any] | None:
    """``{"source", "x", "y", "w", "h", "downsample"}`` from a tile name (no extension), or None."""
    m = _TILE_NAME.match(stem)
    if m is None:
        return None
    return {"source": m["source"], "x": int(m["x"]), "y": int(m["y"]), "w": int(m["w"]), "h": int(m["h"]),
            "downsample": float(m["d"]) if m["d"] else 1.0}


def split_sources(names: list[str], val_fraction: float = DEFAULT_VAL_FRACTION,
                  seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Train/val split by image: ``{name: "train"|"val"}``.

    Names ranked by ``sha256(f"{seed}:{name}")``; the first ``floor(val_fraction * n + 0.5)`` are validation. With
    ``0 < val_fraction < 1`` and at least two images, each split keeps at least one. The QuPath export script
    implements the same rule, so both give the same split for the same set of images.
    """
    if not 0 <= val_fraction < 1:
        raise BadRequestError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(names))
    n = len(unique)
    n_val = math.floor(val_fraction * n + 0.5)  # half up, as Groovy's Math.round (Python's round is half-even)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    ranked = sorted(unique, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return {s: ("val" if s in val else "train") for s in unique}


@dataclass
class Tile:
    """One tile of a dataset; paths are absolute."""

    image: Path
    mask: Path
    source: str
    x: int
    y: int
    w: int
    h: int
    downsample: float
    split: str
    types: Path | None = None
    points: Path | None = None
    mpp: float | None = None      # µm/px of the tile, when the source's is known


@dataclass
class Dataset:
    """A training-tile folder read back (from ``dataset.json``, or rebuilt from ``labels.json``)."""

    root: Path
    mode: str                      # "semantic" | "instances"
    format: str
    mpp: float | None
    classes: list[dict[str, Any]]  # {"name", "label", "color" (may be None)}
    tiles: list[Tile]
    licence: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, which: str) -> list[Tile]:
        return [t for t in self.tiles if t.split == which]

    def coco_path(self, which: str) -> Path:
        return self.root / "coco" / f"{which}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"{path} is not valid JSON: {exc}") from None


def load_dataset(root: Path) -> Dataset:
    """Read a training-tile folder written by ``export-tiles`` or the QuPath script."""
    root = Path(root)
    if (root / DATASET_JSON).is_file():
        info = _read_json(root / DATASET_JSON)
        tiles = []
        for t in info.get("tiles", []):
            tiles.append(Tile(image=root / t["image"], mask=root / t["mask"], source=t["source"], x=int(t["x"]),
                              y=int(t["y"]), w=int(t["w"]), h=int(t["h"]), downsample=float(t["downsample"]),
                              split=t["split"], types=root / t["types"] if t.get("types") else None,
                              points=root / t["points"] if t.get("points") else None,
                              mpp=float(t["mpp"]) if t.get("mpp") else None))
        return Dataset(root=root, mode=info["mode"], format=info.get("format", "semantic"), mpp=info.get("mpp"),
                       classes=info.get("classes", []), tiles=tiles, licence=info.get("licence"), info=info)
    if not (root / LABELS_JSON).is_file():
        raise BadRequestError(f"{root} holds neither {DATASET_JSON} nor {LABELS_JSON}: export tiles into it first "
                              "(qpbridge export-tiles, or the QuPath script 'Export training tiles')")
    return _from_labels_json(root, _read_json(root / LABELS_JSON))


def _from_labels_json(root: Path, labels: dict[str, Any]) -> Dataset:
    """A folder from a script that wrote only labels.json: tiles, sources and regions from the tile names."""
    mode = labels.get("mode", "semantic")
    masks = root / str(labels.get("masks", "masks"))
    found: list[tuple[Path, Path, dict[str, Any]]] = []
    for img in sorted((root / str(labels.get("images", "images"))).iterdir()):
        mask = masks / (img.stem + ".png")
        parsed = parse_tile_name(img.stem)
        if img.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff") and mask.is_file() and parsed:
            found.append((img, mask, parsed))
    split = split_sources([p["source"] for _, _, p in found])
    tile_mpp = labels.get("pixel_size_um")
    tiles = [Tile(image=img, mask=mask, split=split[p["source"]], mpp=float(tile_mpp) if tile_mpp else None, **p)
             for img, mask, p in found]
    if mode == "semantic":
        classes = [{"name": n, "label": int(v), "color": None} for n, v in labels.get("labels", {}).items()]
    else:
        classes = [{"name": "Nucleus" if labels.get("instance_objects") != "annotations" else "Object", "label": 1,
                    "color": None}]
    return Dataset(root=root, mode=mode, format="semantic" if mode == "semantic" else "instance",
                   mpp=labels.get("pixel_size_um"), classes=classes, tiles=tiles, info=labels)
