"""Sidecar GeoJSON files: where results for an image are written so that QuPath's Import script finds them.

The name is the image file's whole name plus ``.qpbridge.geojson`` (``slide1.svs`` ->
``slide1.svs.qpbridge.geojson``), beside the image unless a folder is given. The whole name (not the stem) keeps
``slide1.svs`` and ``slide1.ndpi`` in one folder apart. The Import script (qupath_scripts/) looks for this name
first, then for ``<stem>.qpbridge.geojson`` and ``<stem>.geojson``; keep :data:`SUFFIX` and the script in step.
"""

from __future__ import annotations

from pathlib import Path

SUFFIX = ".qpbridge.geojson"


def sidecar_name(image: str | Path) -> str:
    """The sidecar file name for an image file (only its name counts, not its folder)."""
    name = Path(image).name
    if not name:
        raise ValueError(f"not an image file name: {image!r}")
    return name + SUFFIX


def sidecar_path(image: str | Path, folder: str | Path | None = None) -> Path:
    """Where the sidecar of ``image`` goes: beside the image, or in ``folder`` when given."""
    image = Path(image)
    return (Path(folder) if folder is not None else image.parent) / sidecar_name(image)
