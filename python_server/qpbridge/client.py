"""Python client for the qpbridge server (protocol v1); used by the CLI, tests and benchmarks.

It uses a DEALER socket with an empty delimiter frame, so a request that timed out can be abandoned
without recreating the socket: late replies are recognised by their ``id`` and dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import zmq

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.errors import BadRequestError, ClientError, RemoteError, ServerUnavailableError
from qpbridge.protocol import ImageInfo, Limits, TileSpec, encode_tile

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
_NO_LIMITS = Limits(max_request_bytes=1 << 62, max_tiles_per_request=1 << 30, max_tile_pixels=1 << 40)
Tile = tuple[TileSpec, np.ndarray]


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout_s: float = 60.0,
                 context: zmq.Context | None = None) -> None:
        if not address.startswith(("tcp://", "ipc://", "inproc://")) or address.endswith("://"):
            raise ClientError(f"invalid address {address!r}: write it as tcp://HOST:PORT, e.g. {DEFAULT_ADDRESS}")
        self.address = address
        self.timeout_s = timeout_s
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------------------
    def request(self, header: dict[str, Any], frames: Sequence[Any] = (), *,
                timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return its reply header; raise RemoteError when ``ok`` is false."""
        req_id = next(self._ids)
        header = {"v": PROTOCOL_VERSION, **header, "id": req_id}
        self._sock.send_multipart([b"", json.dumps(header).encode("utf-8"), *frames], copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise ServerUnavailableError(
                    f"no reply from the qpbridge server at {self.address} within "
                    f"{self.timeout_s if timeout_s is None else timeout_s:.0f} s: is it running? "
                    f"Start it with: qpbridge serve --bind {self.address}", address=self.address)
            parts = self._sock.recv_multipart()
            try:
                reply = json.loads(parts[-1])
            except (ValueError, IndexError):
                continue
            if reply.get("id") != req_id:
                continue  # a late reply to a request that timed out earlier
            if not reply.get("ok"):
                err = reply.get("error") or {}
                raise RemoteError(err.get("code", "error"), err.get("message", "server error"),
                                  **(err.get("details") or {}))
            return dict(reply)

    # ---- ops -------------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return self.request({"op": "hello", "client": {"name": "qpbridge-python", "version": __version__}})

    def models(self) -> list[dict[str, Any]]:
        return list(self.request({"op": "models"})["models"])

    @staticmethod
    def _tile_frames(tiles: Sequence[Tile], encoding: str) -> tuple[list[dict[str, Any]], list[Any]]:
        headers, frames = [], []
        for spec, px in tiles:
            if px.shape != (spec.height, spec.width, 3):
                raise BadRequestError(f"tile at ({spec.x}, {spec.y}) has shape {px.shape}, header says "
                                      f"{spec.width}x{spec.height}")
            headers.append({**spec.to_wire(), "encoding": encoding})
            frames.append(encode_tile(px, encoding))
        return headers, frames

    def predict(self, model: str, tiles: Sequence[Tile], image: ImageInfo | None = None,
                encoding: str = "raw") -> list[dict[str, Any]]:
        headers, frames = self._tile_frames(tiles, encoding)
        reply = self.request({"op": "predict", "model": model, "image": (image or ImageInfo()).to_wire(),
                              "tiles": headers}, frames)
        return list(reply["features"])

    def translate(self, model: str, tiles: Sequence[Tile], image: ImageInfo | None = None,
                  encoding: str = "raw", reply_encoding: str = "png") -> list[np.ndarray]:
        """Translated pixels of each tile (uint8 RGB, the tile's size), from an image-translation model."""
        import base64

        from qpbridge.protocol import decode_tile, parse_tiles

        headers, frames = self._tile_frames(tiles, encoding)
        reply = self.request({"op": "translate", "model": model, "image": (image or ImageInfo()).to_wire(),
                              "tiles": headers, "encoding": reply_encoding}, frames)
        out = reply["tiles"]
        data = [base64.b64decode(t["data"]) for t in out]
        specs = parse_tiles({"tiles": [{k: v for k, v in t.items() if k != "data"} for t in out]}, data, _NO_LIMITS)
        return [decode_tile(spec, d).copy() for spec, d in zip(specs, data, strict=True)]

    def job_open(self, model: str, image: ImageInfo | None = None, expected_tiles: int | None = None) -> str:
        header: dict[str, Any] = {"op": "job.open", "model": model, "image": (image or ImageInfo()).to_wire()}
        if expected_tiles is not None:
            header["expected_tiles"] = expected_tiles
        return str(self.request(header)["job"])

    def job_open_planned(self, model: str, image: ImageInfo, region: tuple[int, int, int, int],
                         roi: dict[str, Any] | None = None) -> dict[str, Any]:
        """Open a job whose tiles the server plans over ``region`` (x, y, width, height, full resolution).

        The reply's ``plan.tiles`` lists the tiles to send; the server stitches them seam-free.
        """
        x, y, w, h = region
        header: dict[str, Any] = {"op": "job.open", "model": model, "image": image.to_wire(),
                                  "region": {"x": x, "y": y, "width": w, "height": h}}
        if roi is not None:
            header["roi"] = roi
        return self.request(header)

    def job_tiles(self, job: str, tiles: Sequence[Tile], encoding: str = "raw") -> dict[str, Any]:
        headers, frames = self._tile_frames(tiles, encoding)
        return self.request({"op": "job.tiles", "job": job, "tiles": headers}, frames)

    def job_status(self, job: str) -> dict[str, Any]:
        return self.request({"op": "job.status", "job": job})

    def job_results(self, job: str, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every feature of a job, page by page."""
        offset: int | None = 0
        while offset is not None:
            reply = self.request({"op": "job.results", "job": job, "offset": offset, "limit": page_size})
            yield from reply["features"]
            offset = reply["next_offset"]
            if offset is not None and not reply["features"]:
                time.sleep(0.05)  # running job with nothing new yet

    def job_finish(self, job: str) -> dict[str, Any]:
        return self.request({"op": "job.finish", "job": job})

    def job_cancel(self, job: str) -> dict[str, Any]:
        return self.request({"op": "job.cancel", "job": job})

    def job_close(self, job: str) -> dict[str, Any]:
        return self.request({"op": "job.close", "job": job})

    def run_planned(self, model: str, image: ImageInfo, region: tuple[int, int, int, int],
                    read: Callable[[float, float, float, float, int, int], np.ndarray], *,
                    roi: dict[str, Any] | None = None, batch_size: int = 16, encoding: str = "raw",
                    on_progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """A planned, seam-free job: the server plans the tiles, ``read(x0, y0, x1, y1, w, h)`` supplies
        each one's pixels (full-resolution box, output size), then every stitched feature comes back."""
        opened = self.job_open_planned(model, image, region, roi)
        job = opened["job"]
        try:
            batch: list[Tile] = []
            for t in opened["plan"]["tiles"]:
                spec = TileSpec(t["x"], t["y"], t["width"], t["height"], t["downsample"], index=t.get("index"))
                px = read(spec.x, spec.y, spec.x + spec.width * spec.downsample,
                          spec.y + spec.height * spec.downsample, spec.width, spec.height)
                batch.append((spec, px))
                if len(batch) >= batch_size:
                    reply = self.job_tiles(job, batch, encoding)
                    batch = []
                    if on_progress is not None:
                        on_progress(reply)
            if batch:
                reply = self.job_tiles(job, batch, encoding)
                if on_progress is not None:
                    on_progress(reply)
            self.job_finish(job)
            return list(self.job_results(job))
        finally:
            with contextlib.suppress(RemoteError, ServerUnavailableError):
                self.job_close(job)
