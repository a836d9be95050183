"""The Groovy client (groovy/) under plain Groovy + JeroMQ against a real qpbridge server.

Drivers in tests/groovy/ are inlined exactly as `qpbridge install-qupath` inlines the QuPath scripts, run
with Debian's groovy, and print one ``QPB <json>`` line per check. Needs: groovy, libjeromq-java,
libgoogle-gson-java, libjts-java, libslf4j-java (jars in /usr/share/java) and JAVA_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qpbridge.client import Client
from qpbridge.install_qupath import inline_script, install_qupath
from qpbridge.protocol import ImageInfo, TileSpec
from qpbridge.tiling import grid

pytestmark = pytest.mark.groovy

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "groovy"
JAVA_DIR = Path(os.environ.get("QPB_JAVA_DIR", "/usr/share/java"))
JARS = {name: JAVA_DIR / f"{name}.jar" for name in ("jeromq", "gson", "jts-core", "slf4j-api", "slf4j-simple")}
MONUSEG = HERE.parent.parent / "shared" / "data" / "monuseg-train"
MONUSEG_IMAGE = "TCGA-21-5784-01Z-00-DX1.tif"


def need_data(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (expected ../shared/data beside the checkout)")
    return path


def _java_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("JAVA_HOME"):
        for cand in ("/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/default-java"):
            if Path(cand, "bin", "java").exists():
                env["JAVA_HOME"] = cand
                break
    return env


def _unavailable(reason: str) -> None:
    """Skip on a developer machine; fail where CI promised the Java side (QPBRIDGE_REQUIRE_GROOVY=1)."""
    if os.environ.get("QPBRIDGE_REQUIRE_GROOVY"):
        pytest.fail(f"Groovy tests required but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def groovy() -> str:
    exe = shutil.which("groovy")
    if exe is None:
        _unavailable("groovy is not installed (Debian: apt install groovy)")
    missing = [str(p) for p in JARS.values() if not p.exists()]
    if missing:
        _unavailable(f"jars missing: {', '.join(missing)} (Debian: apt install libjeromq-java "
                    "libgoogle-gson-java libjts-java libslf4j-java)")
    if not Path(_java_env().get("JAVA_HOME", ""), "bin", "java").exists():
        _unavailable("no JDK found: set JAVA_HOME (e.g. /usr/lib/jvm/java-17-openjdk-amd64)")
    return exe


@pytest.fixture(scope="module")
def checks_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client test driver with the core library inlined, as the installer does it."""
    out = tmp_path_factory.mktemp("groovy") / "client_checks.groovy"
    out.write_text(inline_script((DRIVERS / "client_checks.groovy").read_text(encoding="utf-8")), encoding="utf-8")
    return out


def run_groovy(groovy: str, script: Path, args: Sequence[str], jars: Sequence[str] = ("jeromq", "gson"),
               extra_cp: Sequence[Path] = (), timeout: float = 180) -> tuple[list[dict[str, Any]], str]:
    cp = os.pathsep.join([*(str(JARS[j]) for j in jars), *(str(p) for p in extra_cp)])
    proc = subprocess.run([groovy, "-cp", cp, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=_java_env())
    results = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("QPB ")]
    if proc.returncode != 0 or not results:
        raise AssertionError(f"groovy {script.name} {' '.join(args)} failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return results, proc.stderr


def by_check(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plan_matches_server_grid(groovy: str, checks_script: Path) -> None:
    (plan,), _ = run_groovy(groovy, checks_script, ["plan"])
    for case in plan["cases"]:
        ds = case["downsample"]
        assert ds == pytest.approx(max(1.0, 0.5 / case["mpp"]))
        if ds == 1.0:  # the server's own grid for the same image: identical tiles
            assert [tuple(t) for t in case["tiles"]] == grid(case["w"], case["h"], 512, 32)
        xs = {t[0] for t in case["tiles"]}
        assert max(t[0] + t[2] for t in case["tiles"]) == case["w"]  # covers the image, clipped to it
        assert min(xs) == 0
    assert [tuple(t) for t in plan["region"]] == [(1500, 900, 500, 512), (1500, 1380, 500, 120)]
    assert plan["filtered"] == 4
    assert plan["progress"].startswith("qpbridge nuclei: 25% (50/200 tiles), ")
    assert "tiles/s, ETA " in plan["progress"]
    assert plan["eta"] == "1:02:05"


def test_hello_models_and_errors(groovy: str, checks_script: Path, server: Any) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    results, _ = run_groovy(groovy, checks_script, ["hello,errors", f"address={server.address}", f"dead={dead}"])
    r = by_check(results)
    hello = r["hello"]
    assert hello["protocol"] == 1
    assert {"nuclei", "tissue"} <= set(hello["models"])
    assert "jobs" in hello["capabilities"]
    nuclei = r["models"]["nuclei"]
    assert nuclei["mpp"] == 0.5 and nuclei["object_type"] == "detection"

    down = r["server_down"]["error"]
    assert down["code"] == "server_unavailable"
    assert "qpbridge serve" in down["message"] and dead in down["message"]
    assert r["server_down"]["seconds"] < 5  # connect timeout 1.5 s, plus closing
    mismatch = r["mismatch"]["error"]
    assert mismatch["code"] == "protocol_mismatch"
    assert "speaks protocol 1" in mismatch["message"] and "speaks protocol 2" in mismatch["message"]
    assert r["unknown_model"]["error"]["code"] == "unknown_model"
    assert "nuclei" in r["unknown_model"]["error"]["message"]
    assert r["missing_mpp"]["error"]["code"] == "missing_mpp"
    assert "PIXEL_SIZE_UM" in r["missing_mpp"]["error"]["message"]
    assert r["server_missing_mpp"]["error"]["code"] == "missing_mpp"
    assert time.monotonic() - t0 < 60


def test_jeromq_missing_is_a_clear_error(groovy: str, checks_script: Path) -> None:
    (r,), _ = run_groovy(groovy, checks_script, ["nojeromq"], jars=("gson",))
    assert r["error"]["code"] == "jeromq_missing"
    assert "extensions" in r["error"]["message"] and "install-qupath" in r["error"]["message"]


def _canonical(features: list[dict[str, Any]]) -> list[str]:
    """Features without their random ids, in a stable order."""
    out = []
    for f in features:
        g = dict(f)
        g.pop("id", None)
        out.append(json.dumps(g, sort_keys=True))
    return sorted(out)


def test_full_job_matches_python_client(groovy: str, checks_script: Path, server: Any, tmp_path: Path) -> None:
    image = need_data(MONUSEG / MONUSEG_IMAGE)
    out = tmp_path / "job"
    # mpp 0.5 = the model's resolution, so the 1000 px image needs a 3 x 3 grid of 512 px tiles.
    results, stderr = run_groovy(groovy, checks_script, ["job", f"address={server.address}", f"image={image}",
                                                         "mpp=0.5", f"out={out}"])
    job = by_check(results)["job"]
    assert job["tiles"] == 9 and job["downsample"] == 1.0
    assert job["features"] > 100  # a real H&E tile set has hundreds of nuclei
    assert any("100% (9/9 tiles)" in line for line in job["progress_lines"])
    assert "ETA" in stderr

    groovy_features = json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert len(groovy_features) == job["features"]
    for f in groovy_features:
        props = f["properties"]
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3
        assert props["metadata"]["qpbridge.model"] == "nuclei"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")

    # The very same tiles through the Python client.
    sent = json.loads((out / "tiles.json").read_text(encoding="utf-8"))
    tiles = []
    for t in sent:
        px = np.frombuffer((out / t["file"]).read_bytes(), dtype=np.uint8).reshape(t["height"], t["width"], 3)
        tiles.append((TileSpec(x=t["x"], y=t["y"], width=t["width"], height=t["height"],
                               downsample=float(t["downsample"])), px))
    with Client(server.address, timeout_s=120) as client:
        py_features = client.run_job("nuclei", tiles, ImageInfo(name=image.name, mpp=0.5, width=1000, height=1000),
                                     expected_tiles=len(tiles), batch_size=3)
    assert _canonical(groovy_features) == _canonical(py_features)


def test_cancel_returns_promptly(groovy: str, checks_script: Path, server: Any) -> None:
    image = need_data(MONUSEG / MONUSEG_IMAGE)
    (r,), _ = run_groovy(groovy, checks_script, ["cancel", f"address={server.address}", f"image={image}",
                                                 "mpp=0.5"])
    assert r["tiles"] == 49
    assert r["state_before"] == "running"
    assert r["outcome"]["result"] == "threw"
    assert r["outcome"]["error"]["cls"] == "QpbCancelledException"
    assert not r["alive"]
    assert r["return_seconds"] < 5  # returns promptly
    assert r["after"] == {"error": "unknown_job"}  # cancelled, then closed on the server
    assert any("state cancelled" in line for line in r["cancel_lines"])


@pytest.fixture(scope="module")
def compiled(groovy: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Installs the scripts, compiles them (and three broken ones) against the QuPath stubs in one JVM.

    Returns the QuPath user directory and the compile result per script name.
    """
    root = tmp_path_factory.mktemp("compile")
    user_dir = root / "QuPath" / "v0.6"
    assert install_qupath(user_dir, JARS["jeromq"], out=lambda s: None) == 0
    installed = sorted((user_dir / "scripts" / "qpbridge").glob("*.groovy"))
    bad = root / "bad"
    bad.mkdir()
    (bad / "bad_import.groovy").write_text("import qupath.lib.nope.Missing\nprintln 1\n")
    (bad / "bad_lambda.groovy").write_text("def f = (x) -> x * 2\nprintln f(2)\n")  # Groovy 2.4 rejects lambdas
    (bad / "bad_class.groovy").write_text("def d = getCurrentImageData()\nnew QpbNope()\n")
    results, _ = run_groovy(groovy, DRIVERS / "compile_check.groovy",
                            [str(DRIVERS / "stubs"), str(root / "work"), *map(str, installed),
                             *map(str, sorted(bad.glob("*.groovy")))],
                            jars=("gson", "jts-core", "slf4j-api"))
    return user_dir, {r["script"]: r for r in results}


def test_scripts_compile(compiled: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    """Every installed (inlined) QuPath script compiles against the QuPath API stubs; broken ones do not."""
    user_dir, status = compiled
    installed = sorted((user_dir / "scripts" / "qpbridge").glob("*.groovy"))
    assert len(installed) == 4
    for script in installed:
        assert status[script.name]["ok"], f"{script.name}: {status[script.name].get('error')}"
    for name in ("bad_import.groovy", "bad_lambda.groovy", "bad_class.groovy"):
        assert not status[name]["ok"]
    assert "unable to resolve class qupath.lib.nope.Missing" in status["bad_import.groovy"]["error"]


def test_installed_status_script_runs(groovy: str, compiled: tuple[Path, dict[str, dict[str, Any]]],
                                      tmp_path: Path, server: Any) -> None:
    """The installed, self-contained 'qpbridge server status' script, run as is (parameters edited)."""
    user_dir, _ = compiled
    script = user_dir / "scripts" / "qpbridge" / "qpbridge server status.groovy"
    text = script.read_text(encoding="utf-8")
    assert "@qpbridge-include" not in text
    edited = text.replace("String SERVER = 'tcp://127.0.0.1:5555'", f"String SERVER = '{server.address}'", 1)
    assert edited != text
    runnable = tmp_path / "status.groovy"
    runnable.write_text(edited, encoding="utf-8")
    # The QuPath classes it links to come from the stubs compiled by the `compiled` fixture.
    stubs = user_dir.parent.parent / "work" / "stub-classes"
    cp = os.pathsep.join([*(str(JARS[j]) for j in ("jeromq", "gson", "jts-core", "slf4j-api", "slf4j-simple")),
                          str(stubs)])
    proc = subprocess.run([groovy, "-cp", cp, str(runnable)], capture_output=True, text=True, timeout=120,
                          env=_java_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert f"at {server.address}: protocol 1" in log
    assert "nuclei" in log and "tissue" in log and "µm/px" in log
