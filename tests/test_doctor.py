"""`qpbridge doctor`: each line checks something real and says how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpbridge.cli import main
from qpbridge.doctor import FAIL, OK, WARN, check_jeromq, check_server, run_doctor


def test_server_line_reports_version_models_and_weights(server):
    checks = check_server(server.address, explicit=True)
    assert checks[0].status == OK
    assert "qpbridge 0.1.0 (protocol 1)" in checks[0].what and "nuclei" in checks[0].what
    missing = {c.what.split("'")[1]: c for c in checks if "weights missing" in c.what}
    assert {"hotspot", "histo_unet", "detectron2_nuclei"} <= set(missing)  # the cards whose weights users supply
    assert "nuclei" not in missing and "tissue" not in missing
    assert all(c.status == WARN and "README.md" in c.fix for c in missing.values())


def test_absent_server_fails_only_when_named():
    assert check_server("tcp://127.0.0.1:9", explicit=True, timeout_s=0.3)[0].status == FAIL
    c = check_server("tcp://127.0.0.1:9", explicit=False, timeout_s=0.3)[0]
    assert c.status == WARN and "qpbridge serve --bind tcp://127.0.0.1:9" in c.fix


def test_jeromq_line(tmp_path: Path):
    user = tmp_path / "QuPath" / "v0.6"
    user.mkdir(parents=True)
    c = check_jeromq(user)[0]
    assert c.status == FAIL and "qpbridge install-qupath" in c.fix
    (user / "extensions").mkdir()
    (user / "extensions" / "jeromq-0.6.0.jar").write_bytes(b"PK")
    checks = check_jeromq(None, home=tmp_path)  # found through the user directory search
    assert checks[0].status == OK and "jeromq-0.6.0.jar" in checks[0].what
    assert checks[1].status == WARN and "scripts" in checks[1].what  # scripts not installed yet
    (user / "extensions" / "sub").mkdir()
    (user / "extensions" / "sub" / "jeromq-0.5.3.jar").write_bytes(b"PK")
    assert check_jeromq(user)[0].status == WARN
    assert check_jeromq(None, home=tmp_path / "nowhere")[0].status == WARN


def test_paquo_line_follows_paquo_qupath_dir(tmp_path):
    pytest.importorskip("paquo")
    # paquo reads its settings once per process: check in a fresh one
    env = {**os.environ, "PAQUO_QUPATH_DIR": str(tmp_path / "none"), "HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "python_server"),
                                          os.environ.get("PYTHONPATH", "")])}
    code = "from qpbridge.doctor import check_paquo; c = check_paquo()[0]; print(c.status); print(c.fix)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    status, fix = out.stdout.splitlines()[:2]
    assert status == WARN and "PAQUO_QUPATH_DIR" in fix


def test_cli_doctor(server, tmp_path, capsys):
    rc = main(["doctor", "--server", server.address, "--user-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1  # no JeroMQ in that user directory
    assert "torch" in out and f"server at {server.address}" in out and "fix: run `qpbridge install-qupath`" in out
    assert out.strip().splitlines()[-1].startswith("1 problem(s)")
    assert run_doctor(server.address, tmp_path, out=lambda s: None) == 1
