"""What a new user meets in the first hour: one clear line instead of tracebacks, normal file modes, weights
checked before any work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import cv2
import numpy as np

from conftest import CMU_SVS, REPO, need_data
from qpbridge.cli import main


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python_server"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "qpbridge", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_serve_on_a_used_port_says_so_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "--bind", f"tcp://127.0.0.1:{port}")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("qpbridge: error:")]
    assert len(errors) == 1 and "cannot bind" in errors[0] and "another port" in errors[0]


def test_address_without_scheme_is_an_invalid_address(capsys):
    assert main(["serve", "--bind", "127.0.0.1:5555"]) == 1
    assert "invalid address '127.0.0.1:5555'" in capsys.readouterr().err
    assert main(["models", "--server", "127.0.0.1:5555"]) == 1
    assert "invalid address" in capsys.readouterr().err


def test_output_closed_early_is_not_an_error():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python_server"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "qpbridge", "models", "--json"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # like `| head` exiting before qpbridge writes
    err = p.stderr.read()
    assert p.wait(60) == 0
    assert "BrokenPipe" not in err and "Traceback" not in err


def test_annotate_on_a_png_points_to_predict(tmp_path, capsys):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((50, 50, 3), 200, np.uint8))
    assert main(["annotate", str(img), "--model", "nuclei", "-o", str(tmp_path / "o.geojson")]) == 1
    err = capsys.readouterr().err
    assert "qpbridge predict" in err and "not a slide" in err and "TIFF" not in err.split("(")[0]


def test_outputs_get_the_normal_file_mode(tmp_path, capsys):
    img = tmp_path / "a.png"
    im = np.full((120, 160, 3), 235, np.uint8)
    im[30:60, 40:90] = 20
    cv2.imwrite(str(img), im)
    out = tmp_path / "o.geojson"
    old = os.umask(0o022)
    try:
        assert main(["predict", str(img), "--model", "tissue", "--mpp", "8", "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_missing_weights_stop_annotate_before_any_work(tmp_path):
    svs = need_data(CMU_SVS)
    t0 = time.perf_counter()
    r = run_cli("annotate", str(svs), "--model", "hotspot", "-o", str(tmp_path / "o.geojson"))
    assert r.returncode == 1 and "no weights installed" in r.stderr
    assert "tissue covers" not in r.stderr  # tissue detection did not run first
    assert not (tmp_path / "o.geojson").exists()
    assert time.perf_counter() - t0 < 60


def test_serve_lists_models_without_weights(caplog):
    from qpbridge.engine import Engine
    from qpbridge.server import Server

    server = Server(Engine(), "tcp://127.0.0.1:*")
    import threading

    t = threading.Thread(target=server.serve_forever, daemon=True)
    with caplog.at_level("INFO", logger="qpbridge"):
        t.start()
        deadline = time.monotonic() + 10
        while not any("models:" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    server.stop()
    t.join(10)
    line = next(r.getMessage() for r in caplog.records if "models:" in r.getMessage())
    assert "hotspot (semantic-segmentation, 1.0 µm/px, weights missing)" in line
    assert " nuclei (" in line and " nuclei (instance-segmentation, 0.5 µm/px, weights missing)" not in line
    # a pipeline is missing weights while one of its stages is
    assert "ihc2he-nuclei (instance-segmentation, 0.5 µm/px, weights missing)" in line


def test_readme_examples_run_as_written():
    """The README's set-up activates the venv, so `qpbridge` is a command; every example names a real command
    and its options parse."""
    import shlex

    from qpbridge.cli import build_parser

    text = (REPO / "README.md").read_text()
    setup = text[text.index("## Set-up"):text.index("## Commands")]
    assert "source .venv/bin/activate" in setup
    examples = [ln.strip() for ln in text.split("```bash")[1:] for ln in ln.split("```")[0].splitlines()
                if ln.strip().startswith("qpbridge ")]
    assert len(examples) >= 3
    parser = build_parser()
    for line in examples:
        argv = shlex.split(line.split("#")[0])[1:]
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown command or option
        assert callable(args.func), line
