"""Writing output files: atomically (a crash never leaves half a file) and with the user's normal file mode."""

from __future__ import annotations

import contextlib
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


def write_json_atomic(path: Path, data: Any, *more: Path) -> None:
    """Write JSON next to the target, then rename. The file gets the mode a plain ``open(path, "w")`` would
    give it (0666 less the umask), not the 0600 of a temporary file. ``more`` paths get the same text, encoded
    once."""
    paths = [path, *more]
    tmps: list[str] = []
    try:
        with contextlib.ExitStack() as files:
            handles = []
            for p in paths:
                p.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
                tmps.append(tmp)
                handles.append(files.enter_context(os.fdopen(fd, "w", encoding="utf-8")))
            for text in json_pieces(data):
                for fh in handles:
                    fh.write(text)
        for tmp, p in zip(tmps, paths, strict=True):
            if os.name != "nt":
                os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, p)
    except BaseException:
        for tmp in tmps:
            Path(tmp).unlink(missing_ok=True)
        raise
