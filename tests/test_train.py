"""``qpbridge train``: a tiny hovernet trained for a step or two on a small tile folder, its model folder served
at once, ``--resume`` repeating an uninterrupted run, early stopping, the trainer registry; the MoNuSeg builder
on the real images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from shapely.geometry import shape

from conftest import MONUSEG, need_data, start_server, write_pyramid
from qpbridge.cards import load_card
from qpbridge.client import Client
from qpbridge.errors import BadRequestError, ModelCardError
from qpbridge.families import InstanceResult, SemanticResult, create_model
from qpbridge.families.hovernet import hovernet_card_dict
from qpbridge.families.segformer import SegformerHF
from qpbridge.metrics import instance_metrics
from qpbridge.protocol import ImageInfo, TileSpec
from qpbridge.training import trainer_class
from qpbridge.training.augment import ColourJitter
from qpbridge.training.checkpoint import CHECKPOINT
from qpbridge.training.train import TrainOptions, train

TINY_ARCH = {"width": 4, "levels": 3, "blocks": 1}


def write_tiles(root: Path, n_train: int = 3, n_val: int = 2, size: int = 64, seed: int = 0) -> Path:
    """A tile folder in the dataset layout: pink tiles with a few purple discs, 16-bit instance masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    tiles = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_train + n_val):
        img = np.full((size, size, 3), (235, 170, 200), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint16)
        for k in range(1, 4):
            cy, cx = rng.integers(10, size - 10, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            img[disc] = (80, 55, 135)
            mask[disc] = k
        split = "train" if i < n_train else "val"
        name = f"img{i}.png [x=0,y=0,w={size},h={size}]"
        cv2.imwrite(str(root / "images" / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
        tiles.append({"image": f"images/{name}.png", "mask": f"masks/{name}.png", "source": f"img{i}.png",
                      "x": 0, "y": 0, "w": size, "h": size, "downsample": 1.0, "mpp": 0.25, "split": split})
    (root / "dataset.json").write_text(json.dumps({
        "version": 1, "format": "instance", "mode": "instances", "mpp": 0.25, "tile_size": size,
        "classes": [{"name": "Nucleus", "label": 1, "color": [0, 0, 255]}], "licence": "CC0 (synthetic)",
        "tiles": tiles}))
    return root


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiles(tmp_path_factory.mktemp("data") / "tiles")


@pytest.fixture(scope="module")
def card_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("card") / "config.json"
    path.write_text(json.dumps(hovernet_card_dict("template", tile_size=64, arch=TINY_ARCH, max_object_um=4.0)))
    return path


def options(card: Path, data: Path, out: Path, **kw: object) -> TrainOptions:
    base: dict[str, object] = {"epochs": 2, "device": "cpu", "batch_size": 2, "crop": 32, "samples_per_epoch": 2,
                               "progress": False}
    return TrainOptions(card=card, data=data, out=out, **{**base, **kw})  # type: ignore[arg-type]


def test_train_cli_writes_a_model_folder_that_serves(card_file: Path, tiles: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from qpbridge.cli import main

    out = tmp_path / "models" / "my-nuclei"
    rc = main(["train", "--card", str(card_file), "--data", str(tiles), "--out", str(out), "--epochs", "1",
               "--device", "cpu", "--batch-size", "2", "--crop", "32", "--samples-per-epoch", "2", "--quiet"])
    assert rc == 0
    assert "best epoch 1: " in capsys.readouterr().out
    card = load_card(out)
    assert card.name == "my-nuclei" and card.family == "hovernet" and card.weights == out / "weights.pt"
    assert card.params["format"] == "state_dict" and "CC0 (synthetic)" in card.licence
    record = json.loads((out / "training.json").read_text())
    assert record["licence"] == "CC0 (synthetic)" and record["seed"] == 0 and record["epochs_run"] == 1
    assert record["split"] == {"train": ["img0.png", "img1.png", "img2.png"], "val": ["img3.png", "img4.png"]}
    assert [h["epoch"] for h in record["history"]] == [1] and "pq" in record["history"][0]["val"]
    assert (out / CHECKPOINT).is_file()
    model = create_model(card)  # the folder serves as it is
    try:
        rgb = cv2.cvtColor(cv2.imread(str(next((tiles / "images").iterdir()))), cv2.COLOR_BGR2RGB)
        (result,) = model.predict([rgb])
        assert isinstance(result, InstanceResult) and result.labels.shape == (64, 64)
    finally:
        model.close()
    # ... by annotate on a generated slide, and by a server on real MoNuSeg pixels (the model has trained for one
    # step: what it finds is noise, but whatever it finds must be valid QuPath detections)
    img = np.full((200, 260, 3), (235, 170, 200), dtype=np.uint8)
    img[60:90, 80:110] = (80, 55, 135)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.25, levels=1)
    geojson = tmp_path / "s.geojson"
    assert main(["annotate", str(slide), "--model", str(out), "-o", str(geojson), "--no-tissue-filter",
                 "--device", "cpu", "--quiet"]) == 0
    feats = json.loads(geojson.read_text())["features"]
    real = need_data(MONUSEG / "TCGA-21-5784-01Z-00-DX1.tif")
    pixels = cv2.cvtColor(cv2.imread(str(real)), cv2.COLOR_BGR2RGB)[:128, :128].copy()
    running = start_server(out.parent)
    try:
        with Client(running.address) as client:
            assert "my-nuclei" in {m["name"] for m in client.models()}
            feats += client.predict("my-nuclei", [(TileSpec(0, 0, 128, 128), pixels)], ImageInfo(mpp=0.2527))
    finally:
        running.server.stop()
        running.thread.join(10)
    for f in feats:
        assert shape(f["geometry"]).is_valid and f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Nucleus"


def test_resume_repeats_an_uninterrupted_run(card_file: Path, tiles: Path, tmp_path: Path) -> None:
    straight = train(options(card_file, tiles, tmp_path / "a"))

    def stop_after_first(record: dict[str, object]) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(card_file, tiles, tmp_path / "b"), on_epoch=stop_after_first)
    resumed = train(options(card_file, tiles, tmp_path / "b", resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["loss"] == straight["history"][1]["loss"]
    a = torch.load(str(tmp_path / "a" / CHECKPOINT), weights_only=False)
    b = torch.load(str(tmp_path / "b" / CHECKPOINT), weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    with pytest.raises(Exception, match="no checkpoint"):
        train(options(card_file, tiles, tmp_path / "c", resume=True))


def test_early_stopping_on_the_validation_metric(card_file: Path, tiles: Path, tmp_path: Path) -> None:
    result = train(options(card_file, tiles, tmp_path / "m", epochs=6, patience=1))
    assert result["epochs_run"] < 6 and result["stopped"].startswith("early stop")
    assert result["epochs_run"] - result["best"]["epoch"] == 1


def test_trainer_registry_and_dataset_checks(card_file: Path, tmp_path: Path) -> None:
    assert trainer_class("hovernet").metric == "pq"
    with pytest.raises(ModelCardError, match="hovernet"):
        trainer_class("builtin-nuclei")
    semantic = write_tiles(tmp_path / "sem", n_train=1, n_val=1)
    info = json.loads((semantic / "dataset.json").read_text())
    (semantic / "dataset.json").write_text(json.dumps({**info, "mode": "semantic"}))
    with pytest.raises(BadRequestError, match="--format instance"):
        train(options(card_file, semantic, tmp_path / "x"))


def test_minimal_metrics_by_hand() -> None:
    true = np.zeros((4, 10), dtype=np.int32)
    true[:, 0:4], true[:, 6:10] = 1, 2  # two nuclei of 16 px
    pred = np.zeros_like(true)
    pred[:, 0:3] = 5  # 12 px inside nucleus 1: IoU 0.75
    pred[:, 5:7] = 7  # 4 px in nucleus 2, 4 px outside: IoU 4 / 20
    pred[0, 4] = 9  # an extra prediction of 1 px
    m = instance_metrics(true, pred)
    # PQ: one match (IoU 0.75), FP 2, FN 1 -> DQ 1 / (1 + 1 + 0.5) = 0.4, SQ 0.75
    assert m["dq"] == pytest.approx(0.4) and m["sq"] == pytest.approx(0.75) and m["pq"] == pytest.approx(0.3)
    # AJI: (12 + 4) / (16 + 20 + 1 unmatched px)
    assert m["aji"] == pytest.approx(16 / 37)
    assert m["dice"] == pytest.approx(2 * 16 / (32 + 21))


def test_colour_jitter_keeps_range_and_is_identity_at_zero() -> None:
    rng = np.random.default_rng(0)
    rgb = torch.rand(3, 3, 8, 8) * 0.9 + 0.05
    jitter = ColourJitter()
    out = jitter.apply(rgb, jitter.draw(rng, 3))
    assert out.shape == rgb.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - rgb).abs().mean()) > 1e-3
    none = {"scale": np.ones((3, 3)), "shift": np.zeros((3, 3)), "bright": np.zeros(3), "contrast": np.ones(3)}
    torch.testing.assert_close(ColourJitter().apply(rgb, none), rgb, atol=2e-3, rtol=0)


def test_export_tiles_of_monuseg_train_as_they_are(tmp_path: Path) -> None:
    """The loop's first two steps on real data: export-tiles writes MoNuSeg as instance tiles, and the trainer
    reads that folder as it is (labels 1..n per tile, the split by image)."""
    from qpbridge.cli import main
    from qpbridge.training.data import load_tiles

    need_data(MONUSEG)
    src = tmp_path / "src"
    src.mkdir()
    names = ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"]
    for n in names:
        for ext in (".tif", ".xml"):
            os.symlink(MONUSEG / f"{n}{ext}", src / f"{n}{ext}")
    assert main(["export-tiles", str(src), "-o", str(tmp_path / "ds"), "--mpp", "0.25", "--size", "512",
                 "--format", "instance", "--val-fraction", "0.5"]) == 0
    data = load_tiles(tmp_path / "ds")
    assert data.count("train") == 4 and data.count("val") == 4  # 1000 px images: 2 x 2 tiles each
    mask = data.masks["train"][0]
    assert 0 < mask.max() < 400
    assert sorted(np.unique(mask)) == list(range(int(mask.max()) + 1))  # labels 1..n in each tile
    assert data.images["val"][0].shape[2] == 3


def test_mixed_precision_training_on_cuda(card_file: Path, tiles: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    result = train(options(card_file, tiles, tmp_path / "g", device="cuda", epochs=2))
    assert result["precision"] == "fp16 autocast" and result["epochs_run"] == 2
    assert all(np.isfinite(h["loss"]["loss"]) for h in result["history"])
    assert (tmp_path / "g" / "weights.pt").is_file()


def write_semantic_tiles(root: Path, size: int = 64) -> Path:
    """Semantic tiles as export-tiles writes them: 8-bit palette masks, 0 = background, 1 = dark."""
    from PIL import Image

    base = write_tiles(root, size=size)
    info = json.loads((base / "dataset.json").read_text())
    for tile in info["tiles"]:
        mask = (np.array(Image.open(base / tile["mask"])) > 0).astype(np.uint8)
        im = Image.fromarray(mask, mode="P")
        im.putpalette([255, 255, 255, 80, 55, 135] + [0] * 762)
        im.save(base / tile["mask"])
    info.update(format="semantic", mode="semantic",
                classes=[{"name": "Background", "label": 0}, {"name": "Dark", "label": 1}])
    (base / "dataset.json").write_text(json.dumps(info))
    return base


@pytest.mark.slow
def test_segformer_trains_with_its_own_loss_and_serves(tmp_path: Path) -> None:
    data = write_semantic_tiles(tmp_path / "sem")
    card = {"schema_version": 1, "name": "template", "family": "segformer-hf", "task": "semantic-segmentation",
            "object_type": "annotation", "mpp": 0.25, "tile": {"size": 64, "overlap": 16},
            "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                        {"name": "Dark", "color": [80, 55, 135]}],
            "params": {"segformer": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
                                     "decoder_hidden_size": 16, "num_attention_heads": [1, 1, 1, 1]}}}
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(card))
    out = tmp_path / "models" / "dark-seg"
    result = train(options(card_path, data, out, epochs=1, crop=64, samples_per_epoch=4))
    assert result["metric"] == "miou" and 0.0 <= result["best"]["miou"] <= 1.0
    assert {"pixel_accuracy", "iou_Background"} <= set(result["history"][0]["val"])
    assert (out / "weights" / "config.json").is_file()
    loaded = load_card(out)
    assert loaded.family == "segformer-hf" and loaded.weights == out / "weights"
    model = create_model(loaded)
    assert isinstance(model, SegformerHF)
    try:
        (res,) = model.predict([np.full((64, 64, 3), 128, dtype=np.uint8)])
        assert isinstance(res, SemanticResult) and res.probabilities(2).shape == (2, 64, 64)
    finally:
        model.close()


def test_type_branch_trains_on_types_masks(tmp_path: Path) -> None:
    """With ``arch.n_types`` the TP branch trains on ``types/`` (class label per pixel) and its loss is reported;
    a folder without ``types/`` is refused for such a card."""
    from PIL import Image

    data = write_tiles(tmp_path / "typed")
    info = json.loads((data / "dataset.json").read_text())
    (data / "types").mkdir()
    for tile in info["tiles"]:
        labels = np.array(Image.open(data / tile["mask"]))
        types = np.where(labels > 0, 1 + labels % 2, 0).astype(np.uint8)  # two types
        tile["types"] = tile["mask"].replace("masks/", "types/")
        Image.fromarray(types, mode="P").save(data / tile["types"])
    (data / "dataset.json").write_text(json.dumps(info))
    card = tmp_path / "typed.json"
    card.write_text(json.dumps(hovernet_card_dict("typed", tile_size=64, arch=TINY_ARCH, n_types=2)))
    result = train(options(card, data, tmp_path / "out", epochs=1))
    assert set(result["history"][0]["loss"]) == {"loss", "np", "hv", "tp"}
    assert load_card(tmp_path / "out").params["arch"]["n_types"] == 2
    with pytest.raises(BadRequestError, match="types/"):
        train(options(card, write_tiles(tmp_path / "untyped"), tmp_path / "out2"))


def test_time_limit_stops_after_the_epoch_and_anneals(card_file: Path, tiles: Path, tmp_path: Path) -> None:
    from qpbridge.training.train import cosine_lr

    assert cosine_lr(1e-3, 0.0) == pytest.approx(1e-3) and cosine_lr(1e-3, 1.0) == pytest.approx(2e-5)
    assert cosine_lr(1e-3, 0.5) == pytest.approx(0.51e-3)
    result = train(options(card_file, tiles, tmp_path / "t", epochs=5, max_minutes=1e-4))
    assert result["epochs_run"] == 1 and result["stopped"].startswith("time limit")
