"""CURVE key pairs (ZeroMQ's elliptic-curve authentication and encryption) as ZeroMQ certificate files.

``qpbridge keys new DIR --name NAME`` writes ``NAME.key`` (the public key, to hand out) and
``NAME.key_secret`` (both keys; owner-only permissions). A server's allow-list (``--curve-clients``) is a
folder of clients' ``.key`` files. Wherever a public key is asked for, the 40-character Z85 text of the key
works too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qpbridge.errors import QPBridgeError

Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_FIELD = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]{40})"\s*$', re.MULTILINE)


def _curve_available() -> None:
    import zmq

    if not zmq.has("curve"):
        raise QPBridgeError("this pyzmq/libzmq was built without CURVE support; install pyzmq from PyPI wheels")


def new_key_pair(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """Write ``name.key`` and ``name.key_secret`` in ``directory``; refuse to overwrite a secret."""
    import zmq

    _curve_available()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) or name.startswith("."):
        raise QPBridgeError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    if secret_file.exists() or public_file.exists():
        raise QPBridgeError(f"{public_file} or {secret_file} exists already; pick another --name or folder")
    public, secret = zmq.curve_keypair()
    head = "#   ZeroMQ CURVE certificate written by qpbridge keys new\n"
    public_file.write_text(f"{head}metadata\ncurve\n    public-key = \"{public.decode()}\"\n", encoding="ascii")
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{head}#   SECRET: keep this file private\nmetadata\ncurve\n"
                f"    public-key = \"{public.decode()}\"\n    secret-key = \"{secret.decode()}\"\n")
    return public_file, secret_file


def _fields(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise QPBridgeError(f"cannot read key file {path}: {exc.strerror}") from None
    found = dict(_FIELD.findall(text))
    for value in found.values():
        if not Z85_KEY.match(value):
            raise QPBridgeError(f"{path}: a key is not 40 characters of Z85 text")
    return found


def load_public(key: str | Path) -> bytes:
    """A public key from a ``.key`` (or ``.key_secret``) file, or given as its 40-character Z85 text."""
    text = str(key)
    if Z85_KEY.match(text) and not Path(text).exists():
        return text.encode("ascii")
    found = _fields(Path(key))
    if "public" not in found:
        raise QPBridgeError(f"{key} holds no public-key line; give a file from `qpbridge keys new` or the "
                            "40-character key itself")
    return found["public"].encode("ascii")


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    _curve_available()
    found = _fields(Path(path))
    if "secret" not in found or "public" not in found:
        raise QPBridgeError(f"{path} is not a secret key file (it needs public-key and secret-key lines, as "
                            "`qpbridge keys new` writes them in NAME.key_secret)")
    return found["public"].encode("ascii"), found["secret"].encode("ascii")
