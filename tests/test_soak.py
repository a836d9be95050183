"""Soak: 20 clients on one real server process, 6 of them real processes killed (SIGKILL) mid-job. The
survivors' results equal a clean run's, the killed clients' jobs are cancelled after the grace period,
and the server's memory comes back near where it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DARK_CARD
from qpbridge.client import Client
from qpbridge.protocol import ImageInfo
from test_resume import canonical, free_port, serve, shapes, wait_up

REPO = Path(__file__).resolve().parents[1]
SOAK_CARD = {**DARK_CARD, "name": "soak", "tile": {"size": 64, "overlap": 16, "batch_size": 8},
             "params": {"delay_s": 0.002, "tissue_filter": False}}
IMAGE = ImageInfo(name="shapes", mpp=1.0, width=800, height=600)

# A client process that opens a planned job, reports it, then sends batches until it is killed.
KILLED_CLIENT = """
import sys, time
import numpy as np
from qpbridge.client import Client
from qpbridge.protocol import ImageInfo, TileSpec
c = Client(sys.argv[1])
opened = c.job_open_planned("soak", ImageInfo(name="shapes", mpp=1.0, width=800, height=600), (0, 0, 800, 600))
print(opened["job"], flush=True)
for t in opened["plan"]["tiles"]:
    spec = TileSpec(t["x"], t["y"], t["width"], t["height"], t["downsample"], index=t["index"])
    c.job_tiles(opened["job"], [(spec, np.full((spec.height, spec.width, 3), 30, np.uint8))])
    time.sleep(0.05)
time.sleep(600)
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def planned_run(address: str, img: np.ndarray) -> list[str]:
    def read(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)
        part = img[int(y0):int(y0) + h, int(x0):int(x0) + w]
        out[:part.shape[0], :part.shape[1]] = part
        return out

    with Client(address, timeout_s=120) as c:
        return canonical(c.run_planned("soak", IMAGE, (0, 0, 800, 600), read, batch_size=8))


@pytest.mark.slow
def test_twenty_clients_some_killed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "soak").mkdir(parents=True)
    (models / "soak" / "config.json").write_text(json.dumps(SOAK_CARD))
    (tmp_path / "slides").mkdir()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc = serve(models, tmp_path / "slides", None, port, ["--job-grace", "2", "--workers", "2"])
    img = shapes()
    killed: list[subprocess.Popen[bytes]] = []
    try:
        wait_up(address, proc)
        reference = planned_run(address, img)
        assert reference
        for _ in range(2):  # warm: allocator pools, imports
            planned_run(address, img)
        time.sleep(1.5)
        rss_start = rss_mib(proc.pid)

        env = {**os.environ, "PYTHONPATH": str(REPO / "python_server")}
        killed = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, address], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(6)]
        results: list[list[str] | BaseException] = []
        lock = threading.Lock()

        def survivor() -> None:
            try:
                out: list[str] | BaseException = planned_run(address, img)
            except BaseException as exc:  # reported below
                out = exc
            with lock:
                results.append(out)

        threads = [threading.Thread(target=survivor) for _ in range(14)]
        for t in threads:
            t.start()
        killed_jobs = []
        for p in killed:  # each is mid-job once it printed its job id
            assert p.stdout is not None
            killed_jobs.append(p.stdout.readline().decode().strip())
        time.sleep(0.5)
        for p in killed:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        for t in threads:
            t.join(300)
        assert len(results) == 14
        for r in results:
            assert not isinstance(r, BaseException), repr(r)
            assert r == reference
        time.sleep(4.0)  # grace (2 s) and the next sweep
        with Client(address) as c:
            for job in killed_jobs:
                try:
                    c.job_status(job)
                    raise AssertionError(f"job {job} of a killed client still exists")
                except Exception as exc:
                    assert "without a request from its client" in str(exc)
        time.sleep(1.5)
        rss_end = rss_mib(proc.pid)
        print(f"server RSS: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB after the soak")
        assert rss_end < rss_start + 64, (rss_start, rss_end)
    finally:
        for p in killed:
            if p.poll() is None:
                p.kill()
                p.wait()
        proc.terminate()
        proc.wait(15)
