"""``qpbridge doctor``: what is installed and working, one line per check, and how to fix what is not."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"
PACKAGES = ["numpy", "pyzmq", "shapely", "opencv-python-headless", "scikit-image", "tiffslide", "tifffile",
            "transformers", "torch", "paquo", "JPype1"]


@dataclass
class Check:
    status: str
    what: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> list[Check]:
    from qpbridge import PROTOCOL_VERSION, __version__

    out = [Check(OK, f"qpbridge {__version__} (protocol {PROTOCOL_VERSION}) on Python {platform.python_version()} "
                     f"({sys.executable})")]
    found: list[str] = []
    missing: list[str] = []
    for dist in PACKAGES:
        v = _version(dist)
        (found if v else missing).append(f"{dist} {v}" if v else dist)
    out.append(Check(OK, "packages: " + ", ".join(found)))
    required = [m for m in missing if m not in ("paquo", "JPype1")]
    if required:
        out.append(Check(FAIL, f"missing packages: {', '.join(required)}",
                         "reinstall qpbridge: pip install -e . (in the checkout)"))
    return out


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check(FAIL, f"torch cannot be imported ({exc})", "pip install torch (see pyproject.toml for the "
                                                                 "version)")]
    built = torch.version.cuda
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        return [Check(OK, f"torch {torch.__version__} (CUDA {built}): `--device auto` uses cuda:0 ({n} device(s): "
                          f"{names})")]
    if not built:
        return [Check(WARN, f"torch {torch.__version__} is a CPU-only build: `--device auto` uses the CPU (deep "
                            "models will be slow; the built-in models are fine)",
                      "for a GPU, install a CUDA build of torch (https://pytorch.org/get-started/locally/)")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" CUDA_VISIBLE_DEVICES={visible!r} hides devices;" if visible is not None else ""
    return [Check(WARN, f"torch {torch.__version__} (CUDA {built}) sees no CUDA device: `--device auto` uses the CPU",
                  f"check the NVIDIA driver (nvidia-smi);{hint} or ignore this on a machine without a GPU")]


def check_paquo() -> list[Check]:
    from qpbridge.paquo_io import qupath_for_paquo

    env = os.environ.get("PAQUO_QUPATH_DIR")
    version, where = qupath_for_paquo()
    if version is None:
        return [Check(WARN, f"paquo cannot use QuPath: {where}",
                      "needed only for `annotate-project` writing into projects (without it, sidecar files are "
                      "written): set PAQUO_QUPATH_DIR to a QuPath installation")]
    src = f"PAQUO_QUPATH_DIR={env}" if env else "found by paquo's search"
    return [Check(OK, f"paquo {_version('paquo')} uses QuPath {version} at {where} ({src})")]


def check_jeromq(user_dir: Path | None = None, home: Path | None = None) -> list[Check]:
    from qpbridge.install_qupath import find_user_dir

    target = user_dir if user_dir is not None else find_user_dir(home)
    if target is None:
        return [Check(WARN, "no QuPath user directory found (~/QuPath/vX.Y)",
                      "start QuPath once (it creates it), or pass --user-dir DIR; then `qpbridge install-qupath`")]
    jars = sorted((target / "extensions").rglob("jeromq*.jar")) if (target / "extensions").is_dir() else []
    if not jars:
        return [Check(FAIL, f"no JeroMQ jar in {target / 'extensions'}: the QuPath scripts cannot reach the server",
                      "run `qpbridge install-qupath` (or with --jeromq path/to/jeromq-0.6.0.jar), restart QuPath")]
    if len(jars) > 1:
        return [Check(WARN, f"several JeroMQ jars in {target / 'extensions'}: {', '.join(j.name for j in jars)}",
                      "keep one (two versions conflict): `qpbridge install-qupath --jeromq JAR` replaces them")]
    scripts = target / "scripts" / "qpbridge"
    out = [Check(OK, f"JeroMQ {jars[0].name} in {jars[0].parent}")]
    if not scripts.is_dir():
        out.append(Check(WARN, f"the qpbridge QuPath scripts are not in {scripts}", "run `qpbridge install-qupath`"))
    return out


def check_server(address: str, explicit: bool, timeout_s: float = 3.0) -> list[Check]:
    from qpbridge.client import Client
    from qpbridge.errors import QPBridgeError, ServerUnavailableError

    try:
        with Client(address, timeout_s=timeout_s) as client:
            hello = client.hello()
            cards = client.models()
    except QPBridgeError as exc:
        status = FAIL if explicit else WARN
        why = f"no reply within {timeout_s:g} s" if isinstance(exc, ServerUnavailableError) else str(exc)
        return [Check(status, f"no qpbridge server answers at {address} ({why})",
                      f"start one: qpbridge serve --bind {address}" if not explicit else
                      f"is it running, and is {address} its --bind address (and reachable from here)?")]
    out = [Check(OK, f"server at {address}: qpbridge {hello.get('server_version')} (protocol {hello.get('protocol')}), "
                     f"device {hello.get('device')}, models: {', '.join(hello.get('models', []))}")]
    out += _weights([(c["name"], bool(c.get("available", True)), None) for c in cards], "on the server")
    return out


def check_local_models() -> list[Check]:
    from qpbridge.engine import Engine
    from qpbridge.errors import QPBridgeError

    try:
        engine = Engine()
    except QPBridgeError as exc:
        return [Check(FAIL, f"model cards: {exc}", "reinstall qpbridge")]
    cards = sorted(engine.cards.items())
    return _weights([(n, c.to_wire()["available"], c.folder) for n, c in cards], "here")


def _weights(cards: list[tuple[str, bool, Path | None]], where: str) -> list[Check]:
    ready = [n for n, ok, _ in cards if ok]
    out = [Check(OK, f"models {where} with weights installed: {', '.join(ready) or 'none'}")]
    for n, ok, folder in cards:
        if not ok:
            readme = folder / "README.md" if folder is not None else f"models/{n}/README.md"
            out.append(Check(WARN, f"model '{n}' {where}: weights missing",
                             f"see {readme} for where to get them and where to put them"))
    return out


def run_doctor(server: str | None, user_dir: Path | None = None, out: Callable[[str], None] = print) -> int:
    from qpbridge.client import DEFAULT_ADDRESS

    checks: list[Check] = []
    for fn in (check_python, check_torch, check_local_models, check_paquo):
        checks += fn()
    checks += check_jeromq(user_dir)
    checks += check_server(server or DEFAULT_ADDRESS, explicit=server is not None)
    for c in checks:
        out(f"{c.status:<4}  {c.what}")
        if c.fix and c.status != OK:
            out(f"      fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    out(f"{failed} problem(s), {warned} warning(s)")
    return 1 if failed else 0
