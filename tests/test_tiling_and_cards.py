"""Tile grids, image tiles with downsampling, model cards and the family registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from conftest import DARK_CARD
from qpbridge.cards import ModelCard, builtin_cards_dir, discover_cards, load_card, validate_card_dict
from qpbridge.engine import Engine
from qpbridge.engine.plan import grid_tiles, make_plan
from qpbridge.errors import BadRequestError, MissingPixelSizeError, ModelCardError, UnknownModelError
from qpbridge.families import family_class, known_families
from qpbridge.protocol import ImageInfo, planned_tile_spec


def test_plan_covers_the_canvas_with_overlap():
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    # 0.5 µm/px image into a 1 µm/px model: 300x200 full-res px -> 150x100 canvas px.
    plan = make_plan(card, (10, 20, 300, 200), 0.5)
    assert (plan.width, plan.height, plan.ds, plan.step) == (150, 100, 2.0, 48)
    cover = np.zeros((plan.height, plan.width), int)
    for t in plan.tiles:
        cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    assert (cover >= 1).all() and cover.max() == 4
    assert [t.x for t in plan.tiles if t.row == 0] == [0, 48, 96]
    last = plan.tiles[-1]
    assert (last.x + last.w, last.y + last.h) == (150, 100)
    spec = planned_tile_spec(plan, plan.tiles[4])  # row 1, col 1
    assert (spec.x, spec.y, spec.width, spec.height, spec.downsample) == (10 + 96, 20 + 96, 64, 52, 2.0)


def test_grid_tiles_counts_a_plans_tiles_without_planning_them():
    rng = np.random.default_rng(3)
    for _ in range(100):
        size = int(rng.integers(16, 300))
        overlap = int(rng.integers(0, size))
        card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": size, "overlap": overlap}})
        region = (int(rng.integers(0, 50)), int(rng.integers(0, 50)), int(rng.integers(1, 1500)),
                  int(rng.integers(1, 1500)))
        mpp = float(rng.choice([0.25, 0.5, 0.2527, 1.0, 2.0]))
        assert grid_tiles(card, region, mpp) == len(make_plan(card, region, mpp).tiles)


def test_plan_keeps_only_tiles_touching_the_keep_geometry():
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 0}})
    keep = shapely.box(70, 70, 80, 80)
    plan = make_plan(card, (0, 0, 256, 256), 1.0, keep)
    assert [(t.row, t.col) for t in plan.tiles] == [(1, 1)]
    assert make_plan(card, (0, 0, 256, 256), 1.0, shapely.Polygon()).tiles == []
    with pytest.raises(BadRequestError):
        make_plan(card, (0, 0, 0, 10), 1.0)


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
