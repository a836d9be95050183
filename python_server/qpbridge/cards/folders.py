"""Model folders given by path: a qpbridge card folder, or a WSInfer-style (also nutshell) folder.

A qpbridge folder holds ``config.json`` with ``schema_version`` (a model card, see ``cards.py``).

A WSInfer-style folder holds ``config.json`` without ``schema_version``, with

- ``spacing_um_px`` (µm per pixel of the patches) and ``patch_size_pixels``;
- ``class_names`` and optionally ``class_hexadecimals`` (``"#RRGGBB"``, one per class) and ``num_classes``;
- optionally ``transform``: a list of ``{"name": "Resize" | "ToTensor" | "Normalize", "arguments": {...}}``;

and the model as ``torchscript_model.pt`` beside it (else the only ``*.pt``/``*.pth`` file there). It becomes
a ``torchscript-segmentation`` card: semantic segmentation into QuPath annotations, tile size and µm/px from
the patch size and spacing (a ``Resize`` to another size changes both: the model then sees
``spacing * patch / size`` µm/px), normalisation from ``Normalize`` (else ``x / 255``, as ``ToTensor``),
overlap a quarter of the tile (overlapping tiles are what makes stitching seam-free), fp16 on CUDA.
Classes named like background ("background", "bg", any case) make no polygons. The card is validated
against the schema like any other.

This module does not import torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qpbridge.cards.card import CARD_FILE, ModelCard, load_card
from qpbridge.errors import ModelCardError

WSINFER_MODEL_FILE = "torchscript_model.pt"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BACKGROUND_NAMES = frozenset({"background", "bg"})
SUPPORTED_TRANSFORMS = ("Resize", "ToTensor", "Normalize")
# Distinct colours (Okabe-Ito, then extras) for classes without class_hexadecimals.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (120, 120, 120), (150, 40, 40), (40, 150, 40), (40, 40, 150), (150, 150, 40),
)
BACKGROUND_COLOR = (255, 255, 255)
_HEX = re.compile(r"^#?([0-9A-Fa-f]{6})$")


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _folder_of(path: Path) -> tuple[Path, Path | None]:
    """(folder, explicit model file): a path may name the folder, its config.json or the model file."""
    if path.is_file():
        if path.name == CARD_FILE:
            return path.parent, None
        return path.parent, path
    return path, None


def is_wsinfer_config(data: dict[str, Any]) -> bool:
    return "schema_version" not in data and any(
        k in data for k in ("spacing_um_px", "patch_size_pixels", "class_names"))


def is_model_folder(path: Path) -> bool:
    """True when ``path`` (a folder, its config.json, or a model file beside one) is a qpbridge card folder
    or a WSInfer-style model folder. Never raises."""
    try:
        folder, _ = _folder_of(Path(path))
        data = _read_config(folder)
    except OSError:
        return False
    return data is not None and ("schema_version" in data or is_wsinfer_config(data))


def load_model_folder(folder: Path) -> ModelCard:
    """The model card of a folder (or of its config.json / model file): a qpbridge card as it is, a
    WSInfer-style config converted. Raises ModelCardError saying what is missing or wrong."""
    folder, model_file = _folder_of(Path(folder))
    if not folder.is_dir():
        raise ModelCardError(f"model folder {folder} does not exist")
    if not (folder / CARD_FILE).is_file():
        raise ModelCardError(f"{folder} is not a model folder: it has no {CARD_FILE} (a qpbridge model card, or "
                             f"a WSInfer config with {WSINFER_MODEL_FILE} beside it)")
    try:
        data = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{folder / CARD_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelCardError(f"{folder / CARD_FILE} must hold a JSON object")
    if "schema_version" in data:
        return load_card(folder)
    card = wsinfer_card_dict(data, folder, model_file)
    return ModelCard.from_dict(card, folder=folder)


def sanitize_name(name: str) -> str:
    """``name`` made to fit the card name pattern: other characters become '-', at most 64 long."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).lstrip("_.-")[:64].rstrip("-")
    return cleaned if cleaned and NAME_PATTERN.match(cleaned) else "model"


def _is_background(name: str) -> bool:
    return name.strip().lower() in BACKGROUND_NAMES


def _positive_number(data: dict[str, Any], key: str, where: str) -> float:
    if key not in data:
        raise ModelCardError(f"{where} has no '{key}'")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelCardError(f"{where}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _size(value: Any, where: str) -> int:
    """An int size, or a square [h, w] pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelCardError(f"{where}: size must be a positive integer (or a square [h, w]), got {value!r}")
    return value


def _triple(value: Any, key: str, where: str, positive: bool = False) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or (positive and not all(v > 0 for v in value))):
        kind = "positive numbers" if positive else "numbers"
        raise ModelCardError(f"{where}: Normalize '{key}' must be 3 {kind}, got {value!r}")
    return [float(v) for v in value]


def _colour(value: Any, where: str) -> list[int]:
    match = _HEX.match(value) if isinstance(value, str) else None
    if match is None:
        raise ModelCardError(f"{where}: class colour must be '#RRGGBB', got {value!r}")
    h = match.group(1)
    return [int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)]


def _model_file(folder: Path) -> str:
    if (folder / WSINFER_MODEL_FILE).is_file():
        return WSINFER_MODEL_FILE
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".pt", ".pth"))
    return found[0] if len(found) == 1 else WSINFER_MODEL_FILE


def wsinfer_card_dict(config: dict[str, Any], folder: Path, model_file: Path | None = None) -> dict[str, Any]:
    """A qpbridge card (as a dict, not yet validated) for a WSInfer-style ``config``."""
    where = f"WSInfer config {folder / CARD_FILE}"
    spacing = _positive_number(config, "spacing_um_px", where)
    if "patch_size_pixels" not in config:
        raise ModelCardError(f"{where} has no 'patch_size_pixels'")
    patch = _size(config["patch_size_pixels"], f"{where}: 'patch_size_pixels'")

    names = config.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ModelCardError(f"{where}: 'class_names' must be a non-empty list of names, got {names!r}")
    if "num_classes" in config and config["num_classes"] != len(names):
        raise ModelCardError(f"{where}: 'num_classes' is {config['num_classes']!r} but 'class_names' lists "
                             f"{len(names)} classes")
    hexes = config.get("class_hexadecimals")
    if hexes is not None and (not isinstance(hexes, list) or len(hexes) != len(names)):
        raise ModelCardError(f"{where}: 'class_hexadecimals' must list one colour per class ({len(names)})")
    classes: list[dict[str, Any]] = []
    palette = iter(PALETTE * (len(names) // len(PALETTE) + 1))
    for i, name in enumerate(names):
        background = _is_background(name)
        if hexes is not None:
            color = _colour(hexes[i], f"{where}: class '{name}'")
        else:
            color = list(BACKGROUND_COLOR) if background else list(next(palette))
        classes.append({"name": name.strip(), "color": color, "emit": not background})
    if not any(c["emit"] for c in classes):
        raise ModelCardError(f"{where}: every class is named like background; nothing would be annotated")

    tile, mpp = patch, spacing
    normalization: dict[str, Any] = {"scale": 255.0}
    transforms = config.get("transform", [])
    if not isinstance(transforms, list):
        raise ModelCardError(f"{where}: 'transform' must be a list of {{name, arguments}} objects")
    for step in transforms:
        name = step.get("name") if isinstance(step, dict) else None
        args = (step.get("arguments") or {}) if isinstance(step, dict) else {}
        if name not in SUPPORTED_TRANSFORMS or not isinstance(args, dict):
            raise ModelCardError(f"{where}: unsupported transform {step!r}; qpbridge understands "
                                 f"{', '.join(SUPPORTED_TRANSFORMS)}")
        if name == "Resize":
            size = _size(args.get("size"), f"{where}: Resize")
            mpp, tile = mpp * tile / size, size
        elif name == "Normalize":
            normalization["mean"] = _triple(args.get("mean"), "mean", where)
            normalization["std"] = _triple(args.get("std"), "std", where, positive=True)

    weights = str(model_file.resolve()) if model_file is not None else _model_file(folder)
    architecture = config.get("architecture")
    description = f"WSInfer-style model folder {folder.name}" + (f" ({architecture})" if architecture else "")
    return {
        "schema_version": 1,
        "name": sanitize_name(folder.resolve().name),
        "family": "torchscript-segmentation",
        "task": "semantic-segmentation",
        "description": description,
        "object_type": "annotation",
        "classes": classes,
        "tile": {"size": tile, "overlap": tile // 4, "batch_size": 32},
        "mpp": mpp,
        "requires_mpp": True,
        "normalization": normalization,
        "postprocess": {"simplify_um": mpp},
        "params": {"precision": "fp16", "source": "wsinfer"},
        "weights": weights,
    }
