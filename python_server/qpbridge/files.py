"""Writing output files: atomically (a crash never leaves half a file) and with the user's normal file mode."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_pieces(data: Any) -> Iterator[str]:
    """The JSON text of ``data`` (what ``json.dump`` writes, NaN refused) in pieces made by the C encoder: a
    feature collection one feature at a time. ``json.dump`` encodes in Python, three times slower on a slide's
    coordinates; one ``dumps`` of it all would hold the whole text at once."""
    encode = json.JSONEncoder(allow_nan=False, ensure_ascii=False).encode
    features = data.get("features") if isinstance(data, dict) else None
    if not isinstance(features, list):
        yield encode(data)
        return
    head = encode({k: v for k, v in data.items() if k != "features"})
    yield head[:-1] + (", " if len(head) > 2 else "") + '"features": ['
    for i, feature in enumerate(features):
        yield (", " + encode(feature)) if i else encode(feature)
    yield "]}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to the target, then rename. The file gets the mode a plain ``open(path, "w")`` would
    give it (0666 less the umask), not the 0600 of a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for text in json_pieces(data):
                fh.write(text)
        if os.name != "nt":
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
