"""Wire format of protocol version 1 (see docs/protocol.md): headers, tiles, limits, replies.

Pure functions shared by the server and the Python client; the conversion of engine types (tile plans)
to the wire lives here too. Sizes are checked from the header (and from
the PNG/JPEG header) before any pixel buffer is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from qpbridge import PROTOCOL_VERSION
from qpbridge.errors import (
    BadRequestError,
    FrameCountError,
    LimitExceededError,
    QPBridgeError,
    TileError,
    UnsupportedVersionError,
)

if TYPE_CHECKING:
    from qpbridge.engine.plan import PlannedTile, TilePlan

ENCODINGS = ("raw", "png", "jpeg")
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of a header: a GeoJSON MultiPolygon in a FeatureCollection needs 9
MAX_INT = 1 << 53  # integers beyond this do not survive JSON readers that use doubles (Java, JavaScript)
MAX_COORD = 1 << 31  # full-resolution pixel coordinates and image sizes
MPP_RANGE = (1e-3, 1e3)  # µm per pixel: from electron-microscope-fine to a thumbnail of a whole slide
DOWNSAMPLE_RANGE = (1e-3, 1e5)
MAX_STRING = 4096  # names and paths (PATH_MAX)


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 512 << 20
    max_tiles_per_request: int = 256
    max_tile_pixels: int = 4096 * 4096
    job_ttl_s: float = 600.0
    # Decoded pixels of one request, tiles as sent plus tiles resampled to the model's µm/px.
    max_request_pixels: int = 128 << 20
    max_plan_tiles: int = 100_000
    max_roi_vertices: int = 100_000
    # A running job no request has named for this long is cancelled: its client is gone.
    job_grace_s: float = 60.0
    # Fair share: model requests (predict, job.tiles) queued or running per client, their tiles, and
    # running jobs per client; past them the answer is `busy` with a retry time.
    max_client_requests: int = 4
    max_client_tiles: int = 1024
    max_client_jobs: int = 8
    max_queued_requests: int = 64
    # Bytes of model requests queued or running server-wide: received messages past it are dropped at once.
    max_queued_bytes: int = 1 << 30
    # Blending buffers of running planned jobs (semantic models), estimated from the plan at job.open.
    max_stitch_bytes: int = 2 << 30

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def max_frame_bytes(self) -> int:
        """The per-frame cap given to ZeroMQ: the largest tile (raw, or a PNG a little larger) or header."""
        return min(self.max_request_bytes, max(self.max_tile_pixels * 3, MAX_HEADER_BYTES) + (1 << 20))


@dataclass(frozen=True)
class ImageInfo:
    name: str = ""
    mpp: float | None = None
    width: int | None = None
    height: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key in ("mpp", "width", "height"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class TileSpec:
    x: int
    y: int
    width: int
    height: int
    downsample: float = 1.0
    encoding: str = "raw"
    index: int | None = None  # the tile's index in a server-made plan (planned jobs)

    @property
    def key(self) -> tuple[int, int, float, int, int]:
        """Identity of a tile within a job, used to skip re-sent tiles."""
        return (self.x, self.y, self.downsample, self.width, self.height)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"x": self.x, "y": self.y, "downsample": self.downsample, "width": self.width,
                               "height": self.height, "encoding": self.encoding}
        if self.index is not None:
            out["index"] = self.index
        return out


def planned_tile_spec(plan: TilePlan, tile: PlannedTile) -> TileSpec:
    """What a client reads for a planned tile: full-resolution origin, downsample, the pixel size to send,
    and the tile's index in the plan."""
    x0, y0, _, _ = plan.fullres_box(tile)
    return TileSpec(x=round(x0), y=round(y0), width=tile.w, height=tile.h, downsample=plan.ds, index=tile.index)


def plan_to_wire(plan: TilePlan) -> dict[str, Any]:
    """A tile plan as ``job.open`` answers it."""
    return {"downsample": plan.ds, "tile_size": plan.tile, "overlap": plan.overlap, "rows": plan.rows,
            "cols": plan.cols, "tiles": [planned_tile_spec(plan, t).to_wire() for t in plan.tiles]}


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BadRequestError(f"{where}: missing field '{key}'")
    value = obj[key]
    # bool is an int subclass; a boolean is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequestError(f"{where}: field '{key}' must be {names}, got {json.dumps(value)[:80]}")
    return value


def _no_constant(name: str) -> Any:
    raise BadRequestError(f"frame 0: {name} is not a JSON number; numbers must be finite")


def _check_tree(obj: Any) -> None:
    """Every value of a parsed header within bounds: nesting depth, integer size, finite floats, text that
    is valid Unicode (a lone surrogate cannot be encoded in a reply). Iterative, so depth cannot recurse."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequestError("frame 0 holds a string with a lone surrogate (\\ud800-\\udfff); "
                                      "send valid Unicode") from None
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -MAX_INT <= value <= MAX_INT:
                raise BadRequestError(f"frame 0 holds an integer beyond ±2^53 ({str(value)[:20]}...)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BadRequestError("frame 0 holds a number out of the double range; numbers must be finite")
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRequestError(f"frame 0 is nested more than {MAX_DEPTH} levels deep")
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for key, item in items:
                if key is not None:
                    stack.append((key, depth))
                stack.append((item, depth + 1))


def parse_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode frame 0 and check that it has a string ``op`` and an integer ``v``.

    Anything JSON allows but the protocol cannot carry is refused here: NaN/Infinity, integers of
    thousands of digits, nesting past MAX_DEPTH, lone surrogates.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise LimitExceededError(f"header frame is {len(frame)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(frame).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"frame 0 must be a UTF-8 JSON object: {exc}") from None
    except RecursionError:
        raise BadRequestError(f"frame 0 is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise BadRequestError(f"frame 0 is not acceptable JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise BadRequestError("frame 0 must be a JSON object with 'op' and 'v'")
    _check_tree(header)
    _require(header, "op", str, "header")
    _require(header, "v", int, "header")
    return header


def check_number(value: Any, where: str, lo: float, hi: float, *, integer: bool = False) -> Any:
    """``value`` if it is a number (an integer when asked) within [lo, hi]; else bad_request."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise BadRequestError(f"{where} must be {what} in [{lo:g}, {hi:g}], got {str(value)[:40]}")
    return value


def check_text(value: Any, where: str, *, empty: bool = True) -> str:
    """A name or path: a string without NUL bytes, at most MAX_STRING bytes."""
    if not isinstance(value, str) or (not empty and not value):
        raise BadRequestError(f"{where} must be a {'' if empty else 'non-empty '}string")
    if "\0" in value or len(value.encode("utf-8", "replace")) > MAX_STRING:
        raise BadRequestError(f"{where} must hold no NUL byte and at most {MAX_STRING} bytes")
    return value


def check_version(header: dict[str, Any]) -> None:
    """Raise UnsupportedVersionError (naming both versions) unless the header speaks our protocol."""
    version = header["v"]
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"client speaks protocol {version}, this server speaks protocol {PROTOCOL_VERSION}: "
            f"update the {'client' if version < PROTOCOL_VERSION else 'server'}",
            server_protocol=PROTOCOL_VERSION, client_protocol=version, op=header["op"],
        )


def parse_image(obj: Any) -> ImageInfo:
    if obj is None:
        return ImageInfo()
    if not isinstance(obj, dict):
        raise BadRequestError("'image' must be an object like {\"name\": ..., \"mpp\": ...}")
    mpp = obj.get("mpp")
    if mpp is not None:
        check_number(mpp, "image.mpp (µm per full-resolution pixel)", *MPP_RANGE)
    name = check_text(obj.get("name", ""), "image.name")
    dims = {}
    for key in ("width", "height"):
        value = obj.get(key)
        if value is not None:
            check_number(value, f"image.{key}", 1, MAX_COORD, integer=True)
        dims[key] = value
    return ImageInfo(name=name, mpp=float(mpp) if mpp is not None else None, **dims)


def parse_tiles(header: dict[str, Any], frames: Sequence[Any], limits: Limits) -> list[TileSpec]:
    """Check the tile list against the frames and the limits, before decoding anything."""
    tiles = _require(header, "tiles", list, "request")
    if len(tiles) > limits.max_tiles_per_request:
        raise LimitExceededError(
            f"{len(tiles)} tiles in one request; the limit is {limits.max_tiles_per_request}: send smaller batches",
            limit=limits.max_tiles_per_request)
    if len(frames) != len(tiles):
        raise FrameCountError(f"header lists {len(tiles)} tiles but {len(frames)} binary frames follow")
    specs = []
    for i, t in enumerate(tiles):
        where = f"tiles[{i}]"
        if not isinstance(t, dict):
            raise BadRequestError(f"{where} must be an object")
        x = check_number(_require(t, "x", int, where), f"{where}.x", -MAX_COORD, MAX_COORD)
        y = check_number(_require(t, "y", int, where), f"{where}.y", -MAX_COORD, MAX_COORD)
        w = _require(t, "width", int, where)
        h = _require(t, "height", int, where)
        ds = t.get("downsample", 1.0)
        if isinstance(ds, bool) or not isinstance(ds, (int, float)) or not math.isfinite(ds) or ds <= 0:
            raise BadRequestError(f"{where}: downsample must be a positive number, got {ds!r}")
        check_number(ds, f"{where}.downsample", *DOWNSAMPLE_RANGE)
        enc = t.get("encoding", "raw")
        if enc not in ENCODINGS:
            raise BadRequestError(f"{where}: encoding must be one of {', '.join(ENCODINGS)}, got {enc!r}")
        if w <= 0 or h <= 0:
            raise BadRequestError(f"{where}: width and height must be positive, got {w}x{h}")
        if w * h > limits.max_tile_pixels:
            raise LimitExceededError(
                f"{where} is {w}x{h} = {w * h} pixels; the limit is {limits.max_tile_pixels} per tile",
                limit=limits.max_tile_pixels)
        index = t.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise BadRequestError(f"{where}: index must be a non-negative integer (the plan's tile index)")
        specs.append(TileSpec(x=x, y=y, width=w, height=h, downsample=float(ds), encoding=enc, index=index))
    sent = sum(s.width * s.height for s in specs)
    if sent > limits.max_request_pixels:
        raise LimitExceededError(f"the tiles of one request hold {sent} pixels; the limit is "
                                 f"{limits.max_request_pixels}: send smaller batches", limit=limits.max_request_pixels)
    return specs


def model_pixels(spec: TileSpec, image: ImageInfo, model_mpp: float) -> int:
    """Pixels of the tile once resampled to the model's µm/px (the engine's resampling, bounded first)."""
    if image.mpp is None:
        return spec.width * spec.height
    factor = image.mpp * spec.downsample / model_mpp
    return max(1, math.ceil(spec.width * factor)) * max(1, math.ceil(spec.height * factor))


def check_model_pixels(specs: Sequence[TileSpec], image: ImageInfo, model_mpp: float, limits: Limits) -> None:
    """Refuse tiles whose resampling to the model's pixel size would exceed the pixel limits."""
    total = 0
    for i, spec in enumerate(specs):
        px = model_pixels(spec, image, model_mpp)
        if px > limits.max_tile_pixels:
            raise LimitExceededError(
                f"tiles[{i}] at {spec.width}x{spec.height} px, downsample {spec.downsample:g} and image.mpp "
                f"{image.mpp:g} becomes {px} pixels at the model's {model_mpp:g} µm/px; the limit is "
                f"{limits.max_tile_pixels}: send tiles nearer the model's pixel size", limit=limits.max_tile_pixels)
        total += px + spec.width * spec.height
    if total > limits.max_request_pixels:
        raise LimitExceededError(f"the request's tiles need {total} pixels once resampled; the limit is "
                                 f"{limits.max_request_pixels}: send smaller batches", limit=limits.max_request_pixels)


def _encoded_size(data: bytes | memoryview, encoding: str) -> tuple[int, int]:
    """(width, height) read from a PNG IHDR or a JPEG SOF marker, without decoding pixels."""
    buf = bytes(data[:65536]) if encoding == "png" else bytes(data)
    if encoding == "png":
        if len(buf) < 24 or buf[:8] != b"\x89PNG\r\n\x1a\n" or buf[12:16] != b"IHDR":
            raise TileError("tile is not a PNG file")
        w, h = struct.unpack(">II", buf[16:24])
        return int(w), int(h)
    if buf[:2] != b"\xff\xd8":
        raise TileError("tile is not a JPEG file")
    i = 2
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            raise TileError("corrupt JPEG: marker expected")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", buf[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > len(buf):
                break
            h, w = struct.unpack(">HH", buf[i + 5:i + 9])
            return int(w), int(h)
        i += 2 + seg_len
    raise TileError("corrupt JPEG: no frame header found")


def decode_tile(spec: TileSpec, data: Any) -> np.ndarray:
    """The tile's pixels as a (height, width, 3) uint8 array; raw tiles are wrapped without a copy."""
    buf = memoryview(data)
    if spec.encoding == "raw":
        expected = spec.width * spec.height * 3
        if buf.nbytes != expected:
            raise TileError(
                f"raw tile at ({spec.x}, {spec.y}) has {buf.nbytes} bytes; {spec.width}x{spec.height} RGB "
                f"needs {expected}")
        return np.frombuffer(buf, dtype=np.uint8).reshape(spec.height, spec.width, 3)
    w, h = _encoded_size(buf, spec.encoding)
    if (w, h) != (spec.width, spec.height):
        raise TileError(f"{spec.encoding} tile at ({spec.x}, {spec.y}) is {w}x{h}, "
                        f"header says {spec.width}x{spec.height}")
    import cv2

    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise TileError(f"{spec.encoding} tile at ({spec.x}, {spec.y}) could not be decoded")
    if img.dtype != np.uint8:
        raise TileError(f"{spec.encoding} tile at ({spec.x}, {spec.y}) is {img.dtype}; only 8-bit images")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


def encode_tile(img: np.ndarray, encoding: str = "raw", jpeg_quality: int = 90) -> bytes | memoryview:
    """Bytes for one tile frame (the inverse of decode_tile)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise TileError(f"tiles must be uint8 RGB (H, W, 3), got {img.dtype} {img.shape}")
    if encoding == "raw":
        return memoryview(np.ascontiguousarray(img).data).cast("B")
    import cv2

    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if encoding == "png":
        ok, out = cv2.imencode(".png", bgr)
    elif encoding == "jpeg":
        ok, out = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    else:
        raise TileError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if not ok:
        raise TileError(f"could not encode tile as {encoding}")
    return out.tobytes()


def reply_ok(op: str | None, req_id: Any = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": True, "v": PROTOCOL_VERSION}
    if op is not None:
        out["op"] = op
    if req_id is not None:
        out["id"] = req_id
    out.update(fields)
    return out


def reply_error(err: QPBridgeError, op: str | None = None, req_id: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "v": PROTOCOL_VERSION, "error": err.to_wire()}
    if op is not None:
        out["op"] = op
    if req_id is not None:
        out["id"] = req_id
    return out


def dumps(obj: dict[str, Any]) -> bytes:
    """JSON for the wire; NaN/Infinity are refused rather than sent as invalid JSON."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate (from a file name, say) would make strict UTF-8 fail: it becomes "?" instead.
    return text.encode("utf-8", "replace") if not text.isascii() else text.encode("ascii")


def dumps_reply(reply: dict[str, Any]) -> bytes:
    """``dumps`` that never fails: a reply that cannot be encoded becomes an ``internal`` error reply."""
    try:
        return dumps(reply)
    except (ValueError, TypeError, RecursionError) as exc:
        err = {"code": "internal", "message": f"internal error: reply not serialisable: {type(exc).__name__}"}
        safe = {"ok": False, "v": PROTOCOL_VERSION, "error": err}
        for key in ("op", "id"):
            if isinstance(reply.get(key), (str, int)):
                safe[key] = reply[key]
        return dumps(safe)
