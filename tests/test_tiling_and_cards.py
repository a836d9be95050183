"""Tile grids, image tiles with downsampling, model cards and the family registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DARK_CARD
from qpbridge.cards import builtin_cards_dir, discover_cards, load_card, validate_card_dict
from qpbridge.engine import Engine
from qpbridge.errors import MissingPixelSizeError, ModelCardError, UnknownModelError
from qpbridge.families import family_class, known_families
from qpbridge.protocol import ImageInfo
from qpbridge.tiling import grid, image_tiles


def test_grid_covers_image_once_without_overlap():
    boxes = grid(1000, 700, 256)
    cover = np.zeros((700, 1000), int)
    for x, y, w, h in boxes:
        cover[y:y + h, x:x + w] += 1
    assert (cover == 1).all()
    assert len(boxes) == 4 * 3


def test_grid_with_overlap():
    boxes = grid(600, 256, 256, overlap=64)
    assert [b[0] for b in boxes] == [0, 192, 384]
    assert boxes[-1][2] == 600 - 384
    with pytest.raises(ValueError):
        grid(100, 100, 64, overlap=64)


def test_image_tiles_downsample_to_model_pixels():
    img = np.zeros((1000, 800, 3), np.uint8)
    tiles = list(image_tiles(img, 0.25, 0.5, 256))
    # 800x1000 at 0.25 µm/px -> 400x500 at 0.5 µm/px -> 2x2 tiles of at most 256 px.
    assert len(tiles) == 4
    spec, px = tiles[-1]
    assert (spec.x, spec.y, spec.downsample) == (512, 512, 2.0)
    assert px.shape == (500 - 256, 400 - 256, 3)


def test_builtin_cards_validate_and_are_found():
    cards = discover_cards(builtin_cards_dir())
    assert {"tissue", "nuclei"} <= set(cards)
    for card in cards.values():
        assert card.family in known_families()


def test_card_schema_errors_name_the_field(tmp_path: Path):
    bad = {**DARK_CARD, "mpp": -1, "classes": [{"name": "X"}]}
    with pytest.raises(ModelCardError) as info:
        validate_card_dict(bad, "bad")
    msg = str(info.value)
    assert "mpp" in msg and "color" in msg
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_card(tmp_path / "x")


def test_card_name_must_match_folder(tmp_path: Path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(DARK_CARD))
    with pytest.raises(ModelCardError, match="folder"):
        discover_cards(tmp_path)


def test_user_card_cannot_shadow_builtin(tmp_path: Path):
    (tmp_path / "nuclei").mkdir()
    (tmp_path / "nuclei" / "config.json").write_text(json.dumps({**DARK_CARD, "name": "nuclei"}))
    with pytest.raises(ModelCardError, match="built-in"):
        Engine(tmp_path)


def test_unknown_family_lists_known():
    with pytest.raises(ModelCardError) as info:
        family_class("no-such-family")
    assert "builtin-nuclei" in str(info.value)


def test_engine_errors(models_dir: Path):
    engine = Engine(models_dir)
    with pytest.raises(UnknownModelError) as info:
        engine.card("x")
    assert "dark" in str(info.value) and "nuclei" in str(info.value)
    with pytest.raises(MissingPixelSizeError, match="mpp"):
        engine.check_image("nuclei", ImageInfo())


def test_discovery_serves_wsinfer_folders_and_skips_other_configs(tmp_path: Path):
    (tmp_path / "hf-weights").mkdir()
    (tmp_path / "hf-weights" / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "config.json").write_text(json.dumps({
        "spacing_um_px": 0.5, "patch_size_pixels": 128, "class_names": ["Background", "Tumor"]}))
    (tmp_path / "ws" / "torchscript_model.pt").write_bytes(b"not loaded at discovery")
    cards = discover_cards(tmp_path)
    assert list(cards) == ["ws"]
    assert cards["ws"].family == "torchscript-segmentation" and cards["ws"].mpp == 0.5
    assert [c.name for c in cards["ws"].classes if c.emit] == ["Tumor"]
