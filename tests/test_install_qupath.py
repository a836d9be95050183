"""`qpbridge install-qupath`: scripts inlined into the QuPath user directory, JeroMQ jar found or reported."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpbridge.cli import main
from qpbridge.errors import QPBridgeError
from qpbridge.install_qupath import (
    INCLUDE_RE,
    JEROMQ_SHA256,
    JEROMQ_URL,
    download_jar,
    find_jeromq,
    find_user_dir,
    inline_script,
    install_qupath,
    library_dir,
    scripts_dir,
)

EXPECTED_SCRIPTS = {"Run qpbridge model.groovy", "Export training tiles.groovy", "qpbridge server status.groovy",
                    "Import qpbridge GeoJSON.groovy"}


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def fake_jar(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jar = folder / name
    jar.write_bytes(b"PK\x03\x04 " + name.encode())
    return jar


def test_inline_replaces_each_include_once(tmp_path: Path) -> None:
    (tmp_path / "a.groovy").write_text("class A {}\n")
    text = "println 1\n// @qpbridge-include a.groovy\n  //@qpbridge-include   a.groovy  \nprintln 2\n"
    out = inline_script(text, tmp_path)
    assert out.count("class A {}") == 1
    assert "already included above" in out
    assert not INCLUDE_RE.search(out)
    assert out.startswith("println 1\n") and out.endswith("println 2\n")


@pytest.mark.parametrize("name", ["missing.groovy", "../a.groovy", "sub/a.groovy"])
def test_inline_rejects_bad_includes(tmp_path: Path, name: str) -> None:
    (tmp_path / "a.groovy").write_text("class A {}\n")
    with pytest.raises(QPBridgeError):
        inline_script(f"// @qpbridge-include {name}\n", tmp_path)


def test_every_script_names_only_existing_library_files() -> None:
    scripts = {p.name: p.read_text(encoding="utf-8") for p in scripts_dir().glob("*.groovy")}
    assert set(scripts) == EXPECTED_SCRIPTS
    libs = {p.name for p in library_dir().glob("*.groovy")}
    for text in scripts.values():
        assert {m.group(1) for m in INCLUDE_RE.finditer(text)} <= libs
    # Every script carries the whole library, in dependency order.
    for text in scripts.values():
        names = [m.group(1) for m in INCLUDE_RE.finditer(text)]
        assert names == ["qpbridge_transport.groovy", "qpbridge_client.groovy", "qpbridge_jobs.groovy",
                         "qpbridge_qupath.groovy"]


def test_find_user_dir_picks_newest_version(tmp_path: Path) -> None:
    assert find_user_dir(tmp_path) is None
    for v in ("v0.4", "v0.10", "v0.6", "not-a-version"):
        (tmp_path / "QuPath" / v).mkdir(parents=True)
    assert find_user_dir(tmp_path) == tmp_path / "QuPath" / "v0.10"


def test_find_jeromq_prefers_newest(tmp_path: Path) -> None:
    share = tmp_path / "share"
    fake_jar(share, "jeromq-0.3.6.jar")
    fake_jar(share, "gson.jar")
    assert find_jeromq([share], home=tmp_path) == share / "jeromq-0.3.6.jar"
    m2 = tmp_path / ".m2" / "repository" / "org" / "zeromq" / "jeromq"
    fake_jar(m2 / "0.6.0", "jeromq-0.6.0.jar")
    fake_jar(m2 / "0.6.0", "jeromq-0.6.0-sources.jar")
    assert find_jeromq([share], home=tmp_path) == m2 / "0.6.0" / "jeromq-0.6.0.jar"
    assert find_jeromq([tmp_path / "nowhere"], home=tmp_path / "empty") is None


def test_install_into_found_user_dir(tmp_path: Path) -> None:
    user = tmp_path / "QuPath" / "v0.6"
    user.mkdir(parents=True)
    share = tmp_path / "share"
    fake_jar(share, "jeromq-0.3.6.jar")
    log = Log()
    assert install_qupath(None, None, out=log, home=tmp_path, jar_search_dirs=[share]) == 0
    installed = {p.name: p.read_text(encoding="utf-8") for p in (user / "scripts" / "qpbridge").glob("*.groovy")}
    assert set(installed) == EXPECTED_SCRIPTS
    for name, text in installed.items():
        assert not INCLUDE_RE.search(text), name
        assert text.startswith("// Installed by `qpbridge install-qupath`")
    run = installed["Run qpbridge model.groovy"]
    assert "class QpbClient" in run and "class QpbQuPath" in run
    assert run.index("String SERVER =") < run.index("class QpbClient")  # parameters stay at the top
    assert (user / "extensions" / "jeromq-0.3.6.jar").read_bytes().endswith(b"jeromq-0.3.6.jar")
    assert "copied JeroMQ" in log.text and str(user / "scripts" / "qpbridge") in log.text
    # Re-running is safe and keeps the jar that is there.
    log2 = Log()
    assert install_qupath(None, None, out=log2, home=tmp_path, jar_search_dirs=[share]) == 0
    assert "JeroMQ already installed" in log2.text


def test_install_reports_missing_jar(tmp_path: Path) -> None:
    user = tmp_path / "custom"
    log = Log()
    assert install_qupath(user, None, out=log, home=tmp_path, jar_search_dirs=[tmp_path / "none"]) == 2
    assert len(list((user / "scripts" / "qpbridge").glob("*.groovy"))) == 4
    assert "MISSING: a JeroMQ jar" in log.text and "--jeromq" in log.text
    assert JEROMQ_URL in log.text and JEROMQ_SHA256 in log.text  # the manual way, with the checksum


class JarServer:
    """A real HTTP server on a random loopback port serving one jar (as Maven Central would) and counting GETs."""

    def __init__(self, body: bytes) -> None:
        outer = self
        self.gets = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.gets += 1
                if not self.path.endswith(".jar"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                """No request log on the test's stderr."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jar_server() -> Iterator[tuple[JarServer, bytes]]:
    body = b"PK\x03\x04" + bytes(range(256)) * 64  # any bytes: only the checksum decides
    srv = JarServer(body)
    yield srv, body
    srv.close()


def test_download_checks_sha256(tmp_path: Path, jar_server: tuple[JarServer, bytes]) -> None:
    srv, body = jar_server
    url = srv.url("/maven2/org/zeromq/jeromq/0.3.6/jeromq-0.3.6.jar")
    user = tmp_path / "u"
    log = Log()
    good = hashlib.sha256(body).hexdigest()
    assert install_qupath(user, None, out=log, home=tmp_path, jar_search_dirs=[], download_url=url,
                          download_sha256=good) == 0
    jar = user / "extensions" / "jeromq-0.3.6.jar"
    assert jar.read_bytes() == body and "SHA-256 checked" in log.text
    assert [p.name for p in (user / "extensions").iterdir()] == ["jeromq-0.3.6.jar"]  # no temporary file left


def test_download_with_wrong_sha256_installs_nothing(tmp_path: Path, jar_server: tuple[JarServer, bytes]) -> None:
    srv, body = jar_server
    user = tmp_path / "u"
    log = Log()
    assert install_qupath(user, None, out=log, home=tmp_path, jar_search_dirs=[],
                          download_url=srv.url("/jeromq-0.3.6.jar"), download_sha256="0" * 64) == 2
    assert srv.gets == 1
    assert list((user / "extensions").iterdir()) == []  # neither the jar nor a partial file
    assert "NOT installed" in log.text and hashlib.sha256(body).hexdigest() in log.text and "--jeromq" in log.text


def test_download_offline_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = tmp_path / "u"
    log = Log()
    assert install_qupath(user, None, out=log, home=tmp_path, jar_search_dirs=[],
                          download_url=f"http://127.0.0.1:{port}/jeromq-0.3.6.jar", download_sha256="0" * 64) == 2
    assert "could not download JeroMQ" in log.text and "offline" in log.text and "--jeromq PATH" in log.text
    assert list((user / "extensions").iterdir()) == []


def test_download_refuses_a_url_that_is_no_jar(tmp_path: Path, jar_server: tuple[JarServer, bytes]) -> None:
    srv, _ = jar_server
    with pytest.raises(QPBridgeError, match=r"\.jar"):
        download_jar(srv.url("/index.html"), "0" * 64, tmp_path)


def test_cli_download_needs_a_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       jar_server: tuple[JarServer, bytes]) -> None:
    srv, body = jar_server
    url = srv.url("/jeromq-0.6.0.jar")
    assert main(["install-qupath", "--user-dir", str(tmp_path / "u"), "--jeromq-url", url]) == 1
    assert "--jeromq-sha256" in capsys.readouterr().err
    assert main(["install-qupath", "--user-dir", str(tmp_path / "u"), "--jeromq-url", url,
                 "--jeromq-sha256", hashlib.sha256(body).hexdigest()]) == 0
    assert (tmp_path / "u" / "extensions" / "jeromq-0.6.0.jar").read_bytes() == body


def test_explicit_jar_replaces_other_versions(tmp_path: Path) -> None:
    user = tmp_path / "u"
    fake_jar(user / "extensions", "jeromq-0.3.6.jar")
    new = fake_jar(tmp_path / "dl", "jeromq-0.6.0.jar")
    log = Log()
    assert install_qupath(user, new, out=log, home=tmp_path) == 0
    assert [p.name for p in (user / "extensions").glob("jeromq*.jar")] == ["jeromq-0.6.0.jar"]
    assert "removed" in log.text


def test_install_without_user_dir_or_with_bad_jar(tmp_path: Path) -> None:
    log = Log()
    assert install_qupath(None, None, out=log, home=tmp_path) == 1
    assert "--user-dir" in log.text
    assert install_qupath(tmp_path / "u", tmp_path / "no.jar", out=log, home=tmp_path) == 1
    assert not (tmp_path / "u").exists()


def test_cli_install_qupath(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jar = fake_jar(tmp_path / "dl", "jeromq-0.5.4.jar")
    assert main(["install-qupath", "--user-dir", str(tmp_path / "u"), "--jeromq", str(jar)]) == 0
    assert "installed 4 scripts" in capsys.readouterr().out
    assert (tmp_path / "u" / "extensions" / "jeromq-0.5.4.jar").exists()
