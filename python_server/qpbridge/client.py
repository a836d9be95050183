"""Python client for the qpbridge server (protocol v1); used by the CLI, tests and benchmarks.

It uses a DEALER socket with an empty delimiter frame, so a request that timed out can be abandoned
without recreating the socket: late replies are recognised by their ``id`` and dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.errors import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    RemoteError,
    ServerUnavailableError,
)
from qpbridge.protocol import ImageInfo, Limits, TileSpec, encode_tile

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
_NO_LIMITS = Limits(max_request_bytes=1 << 62, max_tiles_per_request=1 << 30, max_tile_pixels=1 << 40,
                    max_request_pixels=1 << 62)
Tile = tuple[TileSpec, np.ndarray]


SERVER_KEY_ENV = "QPBRIDGE_SERVER_KEY"
CLIENT_KEY_ENV = "QPBRIDGE_CLIENT_KEY"
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
BUSY_ANSWER_S = 0.5  # time left for the answer to a retried request


class Client:
    """``server_key``: the server's CURVE public key (a ``.key`` file or its 40-character text) for a server
    started with ``--curve-secret``; ``client_key``: this client's ``.key_secret`` file when the server keeps
    an allow-list (else a fresh key pair is made). Both default to $QPBRIDGE_SERVER_KEY / $QPBRIDGE_CLIENT_KEY.
    Busy answers are retried after the server's ``retry_after_ms`` within the timeout."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout_s: float = 60.0,
                 context: zmq.Context | None = None, server_key: str | Path | None = None,
                 client_key: str | Path | None = None) -> None:
        if not address.startswith(("tcp://", "ipc://", "inproc://")) or address.endswith("://"):
            raise ClientError(f"invalid address {address!r}: write it as tcp://HOST:PORT, e.g. {DEFAULT_ADDRESS}")
        self.address = address
        self.timeout_s = timeout_s
        server_key = server_key or os.environ.get(SERVER_KEY_ENV) or None
        client_key = client_key or os.environ.get(CLIENT_KEY_ENV) or None
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.curve = server_key is not None
        if server_key is not None:
            from qpbridge.keys import load_public, load_secret

            try:
                public, secret = load_secret(Path(client_key)) if client_key else zmq.curve_keypair()
                self._sock.setsockopt(zmq.CURVE_SERVERKEY, load_public(server_key))
            except Exception:
                self._sock.close(linger=0)
                if self._own_ctx:
                    self._ctx.term()
                raise
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        # Handshake events tell a refused key (or a server that wants one) from a server that is not there.
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                      | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._handshake: str | None = None  # "ok", or why it failed
        self._drops = 0
        self._sock.connect(address)
        self._ids = itertools.count(1)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake, self._drops = "ok", 0
            elif event & _HANDSHAKE_FAILED:
                self._handshake = "failed"
            elif event == zmq.EVENT_DISCONNECTED and self._handshake != "ok":
                self._drops += 1  # a CURVE server drops a client whose key it cannot use, before any handshake

    def _auth_problem(self) -> str | None:
        self._read_monitor()
        if self._handshake == "failed" or (self._drops >= 2 and self._handshake != "ok"):
            if self.curve:
                return (f"the server at {self.address} refused the CURVE handshake: the server key given is not "
                        "this server's public key, or the server keeps an allow-list that lacks this client's key "
                        "(pass --client-key with a key pair whose .key is in the server's --curve-clients folder), "
                        "or the server does not use CURVE")
            return (f"the server at {self.address} refused the connection's handshake: it requires CURVE "
                    "authentication; pass its public key with --server-key FILE (or $QPBRIDGE_SERVER_KEY)")
        return None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------------------
    def request(self, header: dict[str, Any], frames: Sequence[Any] = (), *,
                timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return its reply header; raise RemoteError when ``ok`` is false."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return self._request_once(header, frames, deadline, timeout_s)
            except RemoteError as err:
                wait = max(0.01, float(err.details.get("retry_after_ms", 500)) / 1000.0)
                # Retry only while a retry and its answer still fit before the deadline; else the busy answer
                # stands (never a "no reply" for a server that did reply).
                if err.code != "busy" or deadline - time.monotonic() < wait + BUSY_ANSWER_S:
                    raise
                time.sleep(wait)

    def _request_once(self, header: dict[str, Any], frames: Sequence[Any], deadline: float,
                      timeout_s: float | None) -> dict[str, Any]:
        req_id = next(self._ids)
        header = {"v": PROTOCOL_VERSION, **header, "id": req_id}
        self._sock.send_multipart([b"", json.dumps(header).encode("utf-8"), *frames], copy=False)
        while True:
            left = deadline - time.monotonic()
            if self._sock.poll(int(min(max(left, 0), 0.2) * 1000) + 1):
                parts = self._sock.recv_multipart()
                try:
                    reply = json.loads(parts[-1])
                except (ValueError, IndexError):
                    continue
                if not isinstance(reply, dict) or reply.get("id") != req_id:
                    continue  # a late reply to a request that timed out earlier
                if not reply.get("ok"):
                    err = reply.get("error") or {}
                    raise RemoteError(err.get("code", "error"), err.get("message", "server error"),
                                      **(err.get("details") or {}))
                return dict(reply)
            problem = self._auth_problem()
            if problem is not None:
                raise AuthenticationError(problem, address=self.address)
            if deadline - time.monotonic() <= 0:
                raise ServerUnavailableError(
                    f"no reply from the qpbridge server at {self.address} within "
                    f"{self.timeout_s if timeout_s is None else timeout_s:.0f} s: is it running? "
                    f"Start it with: qpbridge serve --bind {self.address}", address=self.address)

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
