"""The CLI in process (main(argv) -> int) and `qpbridge serve` as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import shape

from qpbridge.cli import main
from qpbridge.client import Client


def synthetic_png(path: Path) -> Path:
    img = np.full((200, 300, 3), 235, np.uint8)
    img[40:80, 50:150] = 15
    img[120:180, 200:260] = 15
    cv2.imwrite(str(path), img)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_predict_in_process(tmp_path, models_dir, capsys):
    img = synthetic_png(tmp_path / "a.png")
    out = tmp_path / "out" / "a.geojson"
    rc = main(["predict", str(img), "--model", "dark", "-o", str(out), "--models-dir", str(models_dir),
               "--device", "cpu"])
    assert rc == 0
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection"
    # 64 px tiles cross both squares; stitched, each comes back whole.
    areas = sorted(shape(f["geometry"]).area for f in fc["features"])
    assert areas == pytest.approx([60 * 60, 40 * 100], rel=0.01)
    assert "2 features" in capsys.readouterr().out


def test_predict_through_server_matches_in_process(tmp_path, server, models_dir):
    img = synthetic_png(tmp_path / "a.png")
    local, remote = tmp_path / "local.geojson", tmp_path / "remote.geojson"
    assert main(["predict", str(img), "--model", "dark", "-o", str(local), "--models-dir", str(models_dir)]) == 0
    assert main(["predict", str(img), "--model", "dark", "-o", str(remote), "--server", server.address,
                 "--encoding", "png"]) == 0

    def key(path: Path) -> list:
        feats = json.loads(path.read_text())["features"]
        return sorted(json.dumps([f["geometry"], f["properties"]]) for f in feats if f.pop("id"))

    assert key(local) == key(remote)


def test_missing_mpp_is_a_clear_error(tmp_path, capsys):
    img = synthetic_png(tmp_path / "a.png")
    rc = main(["predict", str(img), "--model", "nuclei", "-o", str(tmp_path / "x.geojson"), "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--mpp" in err and "pixel size" in err
    assert not (tmp_path / "x.geojson").exists()


def test_unknown_model_and_missing_file(tmp_path, capsys):
    img = synthetic_png(tmp_path / "a.png")
    assert main(["predict", str(img), "--model", "nope", "-o", str(tmp_path / "x.geojson")]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--model", "dark", "-o", "x.geojson"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_models_command(capsys, models_dir):
    assert main(["models", "--json", "--models-dir", str(models_dir)]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert {"tissue", "nuclei", "dark"} <= names


def test_serve_refuses_public_bind(capsys):
    assert main(["serve", "--bind", "tcp://0.0.0.0:5599", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--curve-secret" in err and "qpbridge keys new" in err and "--insecure" in err


def test_serve_subprocess_answers_and_stops_on_sigterm(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qpbridge", "serve", "--bind", address, "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        with Client(address, timeout_s=30) as c:
            hello = c.hello()
        assert hello["protocol"] == 1 and hello["device"] == "cpu"
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(15)
        assert time.monotonic() - t0 < 5
        assert proc.returncode == 0
        log = proc.stderr.read() if proc.stderr else ""
        assert address in log and "protocol 1" in log and "device cpu" in log
        assert "tissue" in log and "nuclei" in log and "stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_output_files_are_written_by_the_c_encoder_feature_by_feature(tmp_path, monkeypatch):
    """GeoJSON outputs are the text json.dumps writes, made a feature at a time (once for several files); NaN
    is refused and leaves neither the files nor temporary ones."""
    import math

    from qpbridge import files

    shapes = [{"type": "Polygon", "coordinates": [[(0.0, 0.0), (1.5, 0.0), (1.5, 2.25), (0.0, 0.0)]]},
              {"type": "MultiPolygon", "coordinates": []}]
    features = [{"type": "Feature", "id": str(i), "geometry": g, "properties": {"name": "Région"}}
                for i, g in enumerate(shapes)]
    encoded: list[object] = []
    encode = json.JSONEncoder.encode
    monkeypatch.setattr(json.JSONEncoder, "encode", lambda self, o: encoded.append(o) or encode(self, o))
    for data in ({"type": "FeatureCollection", "features": features}, {"type": "FeatureCollection", "features": []},
                 {"features": features[:1]}, [1, 2.5, "x"], {"features": "not a list"}):
        expected = json.dumps(data, ensure_ascii=False)
        encoded.clear()
        out = tmp_path / "out.geojson"
        files.write_json_atomic(out, data)
        assert out.read_text(encoding="utf-8") == expected
        if isinstance(data, dict) and isinstance(data["features"], list):
            assert encoded[1:] == data["features"]  # the header, then one call per feature
    # more paths: the same text, each feature encoded once
    collection = {"type": "FeatureCollection", "features": features}
    encoded.clear()
    files.write_json_atomic(tmp_path / "a.geojson", collection, tmp_path / "sub" / "b.geojson")
    assert len(encoded) == 1 + len(features)
    assert (tmp_path / "a.geojson").read_text(encoding="utf-8") == (tmp_path / "sub" / "b.geojson").read_text(
        encoding="utf-8") == json.dumps(collection, ensure_ascii=False)
    bad = tmp_path / "bad.geojson"
    with pytest.raises(ValueError):
        files.write_json_atomic(bad, {"type": "FeatureCollection", "features": [*features, {"x": math.nan}]},
                                tmp_path / "sub" / "bad.geojson")
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson", "out.geojson", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.geojson"]
