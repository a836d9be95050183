"""Shared fixtures: a real server on a random loopback port, real data paths, small test models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qpbridge.engine import Engine
from qpbridge.families import ModelFamily, SemanticResult, register_family
from qpbridge.protocol import Limits
from qpbridge.server import Server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MONUSEG = SHARED_DATA / "monuseg-train"
CMU_SVS = SHARED_DATA / "CMU-1-Small-Region.svs"


def need_data(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (expected ../shared/data beside the checkout)")
    return path


@register_family("test-dark")
class DarkPixels(ModelFamily):
    """A tiny deterministic model for protocol tests: class 1 where the pixel is dark, else background."""

    def predict(self, tiles: Sequence[np.ndarray]) -> list[SemanticResult]:
        time.sleep(self.card.params.get("delay_s", 0.0) * len(tiles))  # lets tests cancel mid-batch
        return [SemanticResult(classes=(t.mean(axis=2) < self.card.params.get("level", 128)).astype(np.uint8))
                for t in tiles]


DARK_CARD = {
    "schema_version": 1, "name": "dark", "family": "test-dark", "task": "semantic-segmentation",
    "object_type": "annotation",
    "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                {"name": "Dark", "color": [10, 20, 30]}],
    "tile": {"size": 64, "overlap": 0}, "mpp": 1.0, "requires_mpp": False,
    "params": {"tissue_filter": False},
}


def write_pyramid(path: Path, img: np.ndarray, mpp: float | None, levels: int = 3,
                  compression: str | None = "zlib") -> Path:
    """A tiled pyramidal TIFF (sub-resolutions as SubIFDs), as scanners' generic TIFFs are laid out."""
    import tifffile

    opts: dict = {"tile": (256, 256), "photometric": "rgb", "compression": compression}
    if mpp is not None:
        opts["resolutionunit"] = "CENTIMETER"
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(levels):
            ds = 2 ** lvl
            level = np.ascontiguousarray(img[::ds, ::ds])
            res = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds))} if mpp is not None else {}
            if lvl == 0:
                tw.write(level, subifds=levels - 1, **opts, **res)
            else:
                tw.write(level, subfiletype=1, **opts, **res)
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "dark").mkdir()
    (root / "dark" / "config.json").write_text(json.dumps(DARK_CARD))
    seams = {**DARK_CARD, "name": "seams", "tile": {"size": 64, "overlap": 16, "batch_size": 16}}
    (root / "seams").mkdir()
    (root / "seams" / "config.json").write_text(json.dumps(seams))
    slow = {**DARK_CARD, "name": "slow", "tile": {"size": 64, "batch_size": 1},
            "params": {"delay_s": 0.05, "tissue_filter": False}}
    (root / "slow").mkdir()
    (root / "slow" / "config.json").write_text(json.dumps(slow))
    return root


@dataclass
class RunningServer:
    server: Server
    thread: threading.Thread

    @property
    def address(self) -> str:
        return self.server.address


def start_server(models_dir: Path | None, limits: Limits | None = None, workers: int = 2,
                 slide_roots: list[Path] | None = None, **server_options: object) -> RunningServer:
    server = Server(Engine(models_dir), "tcp://127.0.0.1:*", limits=limits, workers=workers,
                    slide_roots=slide_roots, **server_options)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return RunningServer(server, thread)


@pytest.fixture(scope="session")
def server(models_dir: Path) -> Iterator[RunningServer]:
    """One server for the whole test run, serving the built-in models and the test model 'dark'."""
    running = start_server(models_dir)
    yield running
    running.server.stop()
    running.thread.join(10)


@pytest.fixture
def small_server(models_dir: Path) -> Iterator[RunningServer]:
    """A server with small limits and a short job TTL, for limit and expiry tests."""
    running = start_server(models_dir, Limits(max_request_bytes=1 << 20, max_tiles_per_request=4,
                                              max_tile_pixels=256 * 256, job_ttl_s=1.0))
    yield running
    running.server.stop()
    running.thread.join(10)
