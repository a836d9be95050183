"""Stain translation of whole images: tiles with overlap through a translator, blended back without seams.

A translator (:class:`~qpbridge.families.cyclegan.CycleGANTranslator`, in process or behind a server's
``translate`` op) maps uint8 RGB tiles to uint8 RGB tiles. Its instance normalisation makes each tile's colours
depend a little on the tile's content, so tiles butted edge to edge show seams; here tiles overlap and are
blended with the engine's cosine window (weights falling to ~0 at every tile edge that another tile covers),
so every output pixel is a weighted mean in which the tiles' borders count least.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from qpbridge.errors import BadRequestError

if TYPE_CHECKING:
    from qpbridge.engine import Engine

Translate = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
RESAMPLE_TOLERANCE = 0.01


def translator(engine: Engine, name: str) -> Translate:
    """The ``translate`` function of the model ``name``; a model that does not translate images is refused."""
    card = engine.card(name)
    if card.task != "image-translation":
        hint = f" (this pipeline's translator is '{card.pipeline[0]}')" if card.pipeline else ""
        raise BadRequestError(f"model '{name}' is a {card.task} model ({card.family}); translate needs an "
                              f"image-translation model such as a cyclegan card{hint}")
    fn: Translate = getattr(engine.model(name), "translate")  # noqa: B009 - the family is known by its task
    return fn


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` px overlap; the last
    tile ends at the edge (so no tile is cut when the image is at least one tile long)."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def translate_image(rgb: np.ndarray, translate: Translate, tile: int, overlap: int, *, batch: int = 8,
                    factor: float = 1.0) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 translated tile by tile and blended. ``factor`` = model pixels per image pixel:
    the image is resampled to the model's pixel size first and the result back to the image's size."""
    from qpbridge.engine.stitching import cosine_window

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise BadRequestError(f"translate needs a uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    if overlap < 0 or overlap >= tile:
        raise BadRequestError(f"overlap must be in [0, tile size {tile}), got {overlap}")
    src = rgb
    if abs(factor - 1.0) > RESAMPLE_TOLERANCE:
        import cv2

        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        src = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    h, w = src.shape[:2]
    acc = np.zeros((h, w, 3), np.float32)
    wsum = np.zeros((h, w), np.float32)
    boxes = [(y, x, min(tile, h - y), min(tile, w - x))
             for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        outs = translate([np.ascontiguousarray(src[y:y + th, x:x + tw]) for y, x, th, tw in chunk])
        for (y, x, th, tw), out in zip(chunk, outs, strict=True):
            if out.shape != (th, tw, 3):
                raise BadRequestError(f"the translator returned a {out.shape} tile for a {th}x{tw} one")
            win = cosine_window(th, tw, overlap)
            acc[y:y + th, x:x + tw] += out.astype(np.float32) * win[:, :, None]
            wsum[y:y + th, x:x + tw] += win
    out = np.clip(np.rint(acc / wsum[:, :, None]), 0, 255).astype(np.uint8)
    if src is not rgb:
        import cv2

        out = cv2.resize(out, (rgb.shape[1], rgb.shape[0]),
                         interpolation=cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR)
    return out
