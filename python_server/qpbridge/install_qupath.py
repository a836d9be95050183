"""``qpbridge install-qupath``: put the QuPath scripts and the JeroMQ jar into a QuPath user directory.

QuPath cannot import a separate ``.groovy`` file from a script, so each script names the library files it
needs on a line ``// @qpbridge-include FILE.groovy`` and the installed copy has those files inlined there:
every installed script is self-contained. The tests inline scripts with the same :func:`inline_script`.

JeroMQ: a jar given with ``--jeromq``, one already in ``extensions/``, one found on this system (Debian's
``/usr/share/java``, the local Maven repository), or else the pinned release downloaded from Maven Central
and checked against its SHA-256 before it is installed (:data:`JEROMQ_URL`, :data:`JEROMQ_SHA256`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from qpbridge import __version__
from qpbridge.errors import QPBridgeError

# The JeroMQ release the scripts are tested with on QuPath 0.5.1 (Java 17) and 0.6.0 (Java 21), as Maven Central
# publishes it (org.zeromq:jeromq). A mirror or another release: --jeromq-url URL --jeromq-sha256 HEX.
JEROMQ_VERSION = "0.3.6"
JEROMQ_URL = f"https://repo1.maven.org/maven2/org/zeromq/jeromq/{JEROMQ_VERSION}/jeromq-{JEROMQ_VERSION}.jar"
JEROMQ_SHA256 = "94d3895cb9a9a6f17cea82ea4d4d52f8bb9a6efd48ea6bebe62508a1f7e1d9e4"
_MAX_JAR_BYTES = 32 << 20

INCLUDE_RE = re.compile(r"^[ \t]*//[ \t]*@qpbridge-include[ \t]+(\S+)[ \t]*$", re.MULTILINE)
SCRIPTS_SUBDIR = "qpbridge"
_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent.parent


def _data_dir(packaged: str, in_repo: str) -> Path:
    """A data folder shipped in the wheel (``qpbridge/_groovy``) or, in a source checkout, the repo's own."""
    for cand in (_PACKAGE / packaged, _REPO / in_repo):
        if cand.is_dir():
            return cand
    raise QPBridgeError(f"cannot find the qpbridge {in_repo}/ folder (looked in {_PACKAGE / packaged} and "
                        f"{_REPO / in_repo}); reinstall qpbridge")


def library_dir() -> Path:
    """Folder holding the Groovy client library files."""
    return _data_dir("_groovy", "groovy")


def scripts_dir() -> Path:
    """Folder holding the QuPath scripts, before inlining."""
    return _data_dir("_qupath_scripts", "qupath_scripts")


def inline_script(text: str, library: Path | None = None) -> str:
    """Replace each ``// @qpbridge-include FILE`` line by FILE's text from ``library``; each file once."""
    lib = library or library_dir()
    done: set[str] = set()

    def include(match: re.Match[str]) -> str:
        name = match.group(1)
        if "/" in name or "\\" in name or name.startswith("."):
            raise QPBridgeError(f"include '{name}': only plain file names from {lib} are allowed")
        if name in done:
            return f"// (qpbridge library {name} already included above)"
        path = lib / name
        if not path.is_file():
            raise QPBridgeError(f"include '{name}': no such file in {lib}")
        done.add(name)
        body = path.read_text(encoding="utf-8").rstrip("\n")
        return (f"// ---- begin {name} (qpbridge {__version__}, inlined by `qpbridge install-qupath`; "
                f"edit the source in groovy/, not here) ----\n{body}\n// ---- end {name} ----")

    return INCLUDE_RE.sub(include, text)


def _version_key(path: Path) -> tuple[int, ...]:
    nums = re.findall(r"\d+", path.name)
    return tuple(int(n) for n in nums)


def find_user_dir(home: Path | None = None) -> Path | None:
    """The newest QuPath user directory ``~/QuPath/vX.Y`` (QuPath 0.4+ makes one per minor version)."""
    base = (home or Path.home()) / "QuPath"
    if not base.is_dir():
        return None
    versions = [p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"v\d+(\.\d+)*", p.name)]
    if versions:
        return max(versions, key=_version_key)
    return None


def find_jeromq(search_dirs: Iterable[Path] | None = None, home: Path | None = None) -> Path | None:
    """A JeroMQ jar on this system: Debian's /usr/share/java, then the local Maven repository (newest)."""
    dirs = list(search_dirs) if search_dirs is not None else [Path("/usr/share/java")]
    m2 = (home or Path.home()) / ".m2" / "repository" / "org" / "zeromq" / "jeromq"
    found: list[Path] = []
    for d in dirs:
        if d.is_dir():
            found += [p.resolve() for p in d.glob("jeromq*.jar") if not p.name.endswith(("-sources.jar",
                                                                                          "-javadoc.jar"))]
    if m2.is_dir():
        found += [p for p in m2.glob("*/jeromq-*.jar") if not p.name.endswith(("-sources.jar", "-javadoc.jar"))]
    found = [p for p in found if p.is_file()]
    if not found:
        return None
    return max(found, key=_version_key)


def download_jar(url: str, sha256: str, dest_dir: Path, *, timeout: float = 30.0) -> Path:
    """Download a jar into ``dest_dir`` and keep it only if its SHA-256 is ``sha256``.

    The bytes go to a temporary file beside the target and are renamed into place after the check, so a
    failed or tampered download never leaves a jar QuPath would load. Raises QPBridgeError with the manual way.
    """
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    if not name.endswith(".jar") or "/" in name or name.startswith("."):
        raise QPBridgeError(f"the JeroMQ URL must end in a .jar file name: {url}")
    manual = (f"Download it yourself ({url}), check `sha256sum` gives {sha256}, and re-run with --jeromq PATH, "
              f"or copy it into {dest_dir}")
    digest = hashlib.sha256()
    size = 0
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while chunk := resp.read(1 << 16):
                        size += len(chunk)
                        if size > _MAX_JAR_BYTES:
                            raise QPBridgeError(f"{url} is larger than {_MAX_JAR_BYTES >> 20} MiB: not a JeroMQ jar")
                        digest.update(chunk)
                        fh.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise QPBridgeError(f"could not download JeroMQ from {url} ({reason}); this machine may be "
                                    f"offline. {manual}.") from err
        if digest.hexdigest() != sha256.lower():
            raise QPBridgeError(f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}, not the expected "
                                f"{sha256}: it was NOT installed. {manual}.")
        target = dest_dir / name
        os.replace(tmp, target)
        return target
    finally:
        Path(tmp).unlink(missing_ok=True)


def install_qupath(user_dir: Path | None, jeromq: Path | None, *, out: Callable[[str], None] = print,
                   home: Path | None = None, jar_search_dirs: Iterable[Path] | None = None,
                   download_url: str | None = None, download_sha256: str = JEROMQ_SHA256) -> int:
    """Install the scripts (library inlined) and JeroMQ into a QuPath user directory.

    Without a jar given, present or found, JeroMQ is downloaded from ``download_url`` (None: no download) and
    installed only when its SHA-256 is ``download_sha256``. Returns 0 when everything is in place, 2 when the
    scripts were installed but no JeroMQ jar could be had, and 1 when nothing could be installed.
    ``home`` and ``jar_search_dirs`` exist for tests.
    """
    target = user_dir.expanduser() if user_dir is not None else find_user_dir(home)
    if target is None:
        out("qpbridge install-qupath: no QuPath user directory found under ~/QuPath. Start QuPath once "
            "(it creates ~/QuPath/vX.Y), or pass --user-dir DIR (QuPath shows it under Edit > Preferences > "
            "General > QuPath user directory).")
        return 1
    if jeromq is not None and not jeromq.is_file():
        out(f"qpbridge install-qupath: --jeromq {jeromq}: no such file")
        return 1

    scripts_out = target / "scripts" / SCRIPTS_SUBDIR
    scripts_out.mkdir(parents=True, exist_ok=True)
    sources = sorted(scripts_dir().glob("*.groovy"))
    lib = library_dir()
    for src in sources:
        text = inline_script(src.read_text(encoding="utf-8"), lib)
        header = (f"// Installed by `qpbridge install-qupath` (qpbridge {__version__}) from {src.name}. "
                  "Re-run the installer after upgrading qpbridge.\n")
        dest = scripts_out / src.name
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(header + text, encoding="utf-8")
        os.replace(tmp, dest)
    out(f"installed {len(sources)} scripts into {scripts_out} (QuPath: Automate > User scripts > "
        f"{SCRIPTS_SUBDIR}):")
    for src in sources:
        out(f"  {src.name}")

    ext = target / "extensions"
    ext.mkdir(parents=True, exist_ok=True)
    present = sorted(ext.rglob("jeromq*.jar"))
    status = 0
    if jeromq is not None:
        for old in present:
            if old.name != jeromq.name:
                old.unlink()
                out(f"removed {old} (replaced by {jeromq.name}: two JeroMQ versions would conflict)")
        shutil.copy2(jeromq, ext / jeromq.name)
        out(f"copied JeroMQ {jeromq} -> {ext / jeromq.name}")
    elif present:
        out(f"JeroMQ already installed: {', '.join(str(p) for p in present)}")
    else:
        found = find_jeromq(jar_search_dirs, home)
        if found is not None:
            shutil.copy2(found, ext / found.name)
            out(f"copied JeroMQ {found} -> {ext / found.name}")
        elif download_url is not None:
            try:
                jar = download_jar(download_url, download_sha256, ext)
                out(f"downloaded JeroMQ {download_url} -> {jar} (SHA-256 checked)")
            except QPBridgeError as err:
                status = 2
                out(f"MISSING: a JeroMQ jar: {err}")
        else:
            status = 2
            out("MISSING: a JeroMQ jar. None was found in /usr/share/java (Debian/Ubuntu: apt install "
                f"libjeromq-java) or ~/.m2. Download {JEROMQ_URL}, check its SHA-256 is {JEROMQ_SHA256}, and "
                f"re-run with --jeromq PATH, or copy it into {ext}.")

    out("next: restart QuPath (it loads jars from extensions/ at start), start the server with "
        "`qpbridge serve`, then run 'qpbridge server status' from Automate > User scripts.")
    return status
