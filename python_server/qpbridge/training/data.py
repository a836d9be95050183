"""Training tiles read into memory from a dataset folder (layout: docs/training.md, "Dataset layout").

Only ``dataset.json``'s ``tiles`` (``image``, ``mask``, ``split``, optional ``types``), ``mode``, ``mpp``,
``classes`` and ``licence`` are used, so folders written by ``qpbridge export-tiles`` and the QuPath script
train alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qpbridge.errors import BadRequestError


@dataclass
class TileSet:
    """Images (uint8 RGB), masks (int32) and optional types (uint8) per split, and the folder's metadata."""

    root: Path
    mode: str
    mpp: float | None
    classes: list[dict[str, Any]]
    licence: str | None
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    types: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.images.get(split, []))

    def train_crops(self, crop: int | None) -> int:
        """How many crops of ``crop`` px cover the training tiles' area once."""
        area = sum(im.shape[0] * im.shape[1] for im in self.images.get("train", []))
        side = crop or 256
        return int(np.ceil(area / (side * side)))

    def summary(self) -> dict[str, Any]:
        return {split: {"tiles": self.count(split), "sources": sorted(set(self.sources.get(split, [])))}
                for split in ("train", "val")}


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadRequestError(f"cannot read tile image {path}")
    out: np.ndarray = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return out


def _read_mask(path: Path) -> np.ndarray:
    """A label image as stored: palette PNGs as their indices (OpenCV would expand them to colours), 16-bit as
    16-bit."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mask = np.array(im)
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"cannot read mask {path}: {exc}") from None
    if mask.ndim == 3:
        raise BadRequestError(f"mask {path} has colour channels; masks are single-channel label images")
    return mask


def _entries(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(folder metadata, tiles with absolute paths), through ``qpbridge.dataset.load_dataset`` (which also reads
    folders the QuPath script left with only ``labels.json``)."""
    from qpbridge.dataset import load_dataset

    ds = load_dataset(root)
    meta = {"mode": ds.mode, "mpp": ds.mpp, "classes": ds.classes, "licence": ds.licence}
    tiles = [{"image": Path(t.image), "mask": Path(t.mask), "types": Path(t.types) if t.types else None,
              "split": t.split, "source": t.source} for t in ds.tiles]
    return meta, tiles


def load_tiles(root: Path, mode: str = "instances") -> TileSet:
    """Every tile of the folder ``root`` in memory, by split; the folder's mode must be ``mode``."""
    root = Path(root)
    meta, tiles = _entries(root)
    if meta.get("mode") != mode:
        fmt = "instance" if mode == "instances" else "semantic"
        raise BadRequestError(f"{root} holds '{meta.get('mode')}' masks; this model trains on '{mode}' masks "
                              f"(export with --format {fmt})")
    data = TileSet(root=root, mode=mode, mpp=meta.get("mpp"), classes=meta.get("classes", []),
                   licence=meta.get("licence"))
    for tile in tiles:
        split = tile["split"]
        image = _read_rgb(tile["image"])
        mask = _read_mask(tile["mask"]).astype(np.int32)
        if mask.shape != image.shape[:2]:
            raise BadRequestError(f"{tile['mask']} is {mask.shape[::-1]} px but its image is "
                                  f"{image.shape[1::-1]} px")
        types = _read_mask(tile["types"]).astype(np.uint8) if tile["types"] is not None else None
        data.images.setdefault(split, []).append(image)
        data.masks.setdefault(split, []).append(mask)
        data.types.setdefault(split, []).append(types)
        data.names.setdefault(split, []).append(tile["image"].name)
        data.sources.setdefault(split, []).append(tile["source"])
    if not data.count("train"):
        raise BadRequestError(f"{root} has no training tiles (split 'train')")
    return data
