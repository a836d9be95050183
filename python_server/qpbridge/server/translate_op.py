"""The ``translate`` op: translated pixels of tiles, for previewing an image-translation model (docs/protocol.md).

Request as ``predict`` (``model``, optional ``image``, ``tiles`` and one frame per tile) plus an optional
``encoding`` for the reply's tiles (``png`` by default, ``jpeg`` or ``raw``). Each tile is resampled to the
model's pixel size when ``image.mpp`` says it differs, translated, and resampled back to its own size. Protocol
v1 replies have no binary frames, so each translated tile comes back base64-encoded in the reply header.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from qpbridge.errors import BadRequestError
from qpbridge.protocol import (
    ENCODINGS,
    ImageInfo,
    check_model_pixels,
    decode_tile,
    encode_tile,
    parse_image,
    parse_tiles,
)

if TYPE_CHECKING:
    from qpbridge.server.router import Request, Server

RESAMPLE_TOLERANCE = 0.01


def op_translate(server: Server, req: Request) -> dict[str, Any]:
    """The op (run on a model worker): every field checked, resampling bounded, then the translation."""
    import cv2

    from qpbridge.server.ops import _card
    from qpbridge.translation import translator

    header, frames = req.header, req.frames
    card = _card(server, header)
    name = str(header["model"])
    if card.task != "image-translation":
        translator(server.engine, name)  # refuses, naming a pipeline's translator
    image = parse_image(header["image"]) if header.get("image") is not None else ImageInfo()
    specs = parse_tiles(header, frames, server.limits)
    check_model_pixels(specs, image, card.mpp, server.limits)
    encoding = header.get("encoding", "png")
    if encoding not in ENCODINGS:
        raise BadRequestError(f"field 'encoding' must be one of {', '.join(ENCODINGS)}, got {str(encoding)[:40]!r}")
    t0 = time.perf_counter()
    translate = translator(server.engine, name)
    tiles, sizes = [], []
    for spec, frame in zip(specs, frames, strict=True):
        px = decode_tile(spec, frame.buffer)
        factor = image.mpp * spec.downsample / card.mpp if image.mpp else 1.0
        if abs(factor - 1.0) > RESAMPLE_TOLERANCE:
            size = (max(1, round(spec.width * factor)), max(1, round(spec.height * factor)))
            px = cv2.resize(np.ascontiguousarray(px), size,
                            interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        tiles.append(px)
        sizes.append((spec.width, spec.height))
    out = []
    for spec, rgb, (w, h) in zip(specs, translate(tiles), sizes, strict=True):
        if rgb.shape[:2] != (h, w):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        data = bytes(encode_tile(np.ascontiguousarray(rgb), encoding))
        out.append({**spec.to_wire(), "encoding": encoding, "data": base64.b64encode(data).decode("ascii")})
    return {"tiles": out, "stats": {"tiles": len(out), "seconds": round(time.perf_counter() - t0, 6)}}
