"""Jobs survive a restart: kill -9 of a real server process mid slide job, restart on the same tile cache,
re-run: only the missing tiles are computed and the features are those of a clean run. The cache stays
within its bound and shrugs off damaged entries."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DARK_CARD, start_server, write_pyramid
from qpbridge.client import Client
from qpbridge.protocol import ImageInfo
from qpbridge.server.cache import TileCache

REPO = Path(__file__).resolve().parents[1]
RESUME_CARD = {**DARK_CARD, "name": "resume", "tile": {"size": 64, "overlap": 16, "batch_size": 1},
               "params": {"delay_s": 0.03, "tissue_filter": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def canonical(features: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps({k: v for k, v in f.items() if k != "id"}, sort_keys=True) for f in features)


def shapes(height: int = 600, width: int = 800) -> np.ndarray:
    img = np.full((height, width, 3), 235, np.uint8)
    img[60:250, 80:420] = 25
    img[300:560, 500:760] = 40
    img[320:420, 100:300] = 30
    return img


@pytest.fixture
def resume_models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "resume").mkdir(parents=True)
    (root / "resume" / "config.json").write_text(json.dumps(RESUME_CARD))
    return root


def serve(models: Path, slides: Path, cache: Path | None, port: int,
          extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    """`qpbridge serve` in its own process, with the test model family of conftest registered."""
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import conftest; from qpbridge.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "python_server")}
    return subprocess.Popen([sys.executable, "-c", code, str(REPO / "tests"), "--log-level", "warning", "serve",
                             "--bind", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--workers", "1",
                             "--models-dir", str(models), "--slide-root", str(slides),
                             *(["--cache-dir", str(cache)] if cache is not None else []), *(extra or [])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_up(address: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            with Client(address, timeout_s=1) as c:
                c.hello()
            return
        except Exception:
            time.sleep(0.2)
    raise AssertionError("server did not start")


def run_slide_job(address: str, path: Path, stop_after: int | None = None) -> dict[str, Any]:
    with Client(address, timeout_s=30) as c:
        job = c.request({"op": "job.slide", "model": "resume", "path": str(path)})["job"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = c.job_status(job)
            if st["state"] != "running" or (stop_after is not None and st["tiles_done"] >= stop_after):
                break
            time.sleep(0.05)
        if stop_after is not None:
            return st
        assert st["state"] == "done", st
        return {**st, "features_list": list(c.job_results(job))}


@pytest.mark.slow
def test_kill_9_restart_resumes_with_nothing_lost(resume_models: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    path = write_pyramid(slides / "s.tif", shapes(), mpp=1.0, levels=2)
    clean_cache, cache = tmp_path / "clean-cache", tmp_path / "cache"

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = serve(resume_models, slides, clean_cache, port)
    try:
        wait_up(address, proc)
        clean = run_slide_job(address, path)
    finally:
        proc.kill()
        proc.wait()
    total = clean["tiles_expected"]
    assert clean["tiles_done"] == total > 100 and clean["cached_tiles"] == 0 and clean["features_list"]

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = serve(resume_models, slides, cache, port)
    try:
        wait_up(address, proc)
        partial = run_slide_job(address, path, stop_after=40)
        assert partial["state"] == "running" and 40 <= partial["tiles_done"] < total
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = len(list(cache.glob("*/*.tile")))
    assert kept >= 40

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = serve(resume_models, slides, cache, port)
    try:
        wait_up(address, proc)
        resumed = run_slide_job(address, path)
        again = run_slide_job(address, path)
    finally:
        proc.terminate()
        proc.wait(15)
    # Every tile kept before the kill came from the cache; only the rest ran the model.
    assert resumed["cached_tiles"] == kept and resumed["tiles_done"] == total
    assert canonical(resumed["features_list"]) == canonical(clean["features_list"])
    assert again["cached_tiles"] == total
    assert canonical(again["features_list"]) == canonical(clean["features_list"])


def test_planned_tile_job_rerun_takes_cached_results(models_dir: Path, tmp_path: Path) -> None:
    img = shapes(300, 400)
    running = start_server(models_dir, cache=TileCache(tmp_path / "cache", 64 << 20))

    def read(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        part = img[int(y0):int(y0) + h, int(x0):int(x0) + w]
        out[:part.shape[0], :part.shape[1]] = part
        return out

    try:
        image = ImageInfo(name="shapes", mpp=1.0, width=400, height=300)
        runs = []
        for _ in range(2):
            with Client(running.address) as c:
                statuses: list[dict[str, Any]] = []
                opened = c.job_open_planned("seams", image, (0, 0, 400, 300))
                job = opened["job"]
                c.job_tiles(job, [(spec, read(spec.x, spec.y, spec.x + spec.width, spec.y + spec.height,
                                              spec.width, spec.height)) for spec in _specs(opened)])
                c.job_finish(job)
                statuses.append(c.job_status(job))
                runs.append((canonical(list(c.job_results(job))), statuses[-1]))
        n = len(opened["plan"]["tiles"])
        assert runs[0][1]["cached_tiles"] == 0 and runs[1][1]["cached_tiles"] == n
        assert runs[0][0] == runs[1][0] and runs[0][0]
    finally:
        running.server.stop()
        running.thread.join(10)


def _specs(opened: dict[str, Any]) -> list[Any]:
    from qpbridge.protocol import TileSpec

    return [TileSpec(t["x"], t["y"], t["width"], t["height"], t["downsample"], index=t["index"])
            for t in opened["plan"]["tiles"]]


def test_cache_is_bounded_and_survives_damage(tmp_path: Path) -> None:
    cache = TileCache(tmp_path / "c", 10_000)
    blob = np.arange(1000, dtype=np.uint8)  # about 1.1 kB pickled
    for i in range(30):
        cache.put(f"{i:064x}", blob)
        time.sleep(0.002)  # distinct modification times: the oldest go first
    assert cache.size_bytes <= 10_000 and 5 <= len(cache) < 30
    assert cache.get(f"{0:064x}") is None  # evicted
    newest = f"{29:064x}"
    assert np.array_equal(cache.get(newest), blob)
    # A damaged entry (a torn write from elsewhere) is a miss, and is removed.
    path = next((tmp_path / "c").glob(f"*/{newest}.tile"))
    path.write_bytes(b"\x80\x05garbage")
    assert cache.get(newest) is None and not path.exists()
    # Reopened, the cache knows its entries and their size; leftovers of a killed write are cleaned.
    (path.parent / ".tmpdead").write_bytes(b"x")
    again = TileCache(tmp_path / "c", 10_000)
    assert len(again) == len(cache) and not (path.parent / ".tmpdead").exists()
    os.chmod(tmp_path / "c", 0o777)
    with pytest.raises(Exception, match="chmod 700"):
        TileCache(tmp_path / "c", 10_000)
