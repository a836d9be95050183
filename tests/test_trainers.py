"""``qpbridge train`` for the smp, maskrcnn and gradcam families: tiny models trained for a step or two on tiles
that ``qpbridge export-tiles`` wrote from generated images and QuPath GeoJSON; each model folder written is
loaded through its card and run by ``annotate`` on a generated slide; ``--resume`` repeats an uninterrupted
smp run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from shapely.geometry import shape

from conftest import write_pyramid
from qpbridge.cards import load_card
from qpbridge.cli import main
from qpbridge.families import SemanticResult, create_model
from qpbridge.training import trainer_class
from qpbridge.training.checkpoint import CHECKPOINT
from qpbridge.training.train import TrainOptions, train

PINK = (235, 170, 200)
CLASSES = {"Lymphocyte": (80, 55, 135), "Tumor": (150, 60, 120)}  # small dark discs, large paler discs


def _disc(cx: float, cy: float, r: float) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, 17)[:-1]
    ring = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in t]
    return [*ring, ring[0]]


def _source(folder: Path, name: str, seed: int, size: int = 128) -> None:
    """An image with discs of two classes and its QuPath GeoJSON (detections, classified)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), PINK, dtype=np.uint8)
    feats = []
    for k in range(8):
        cls = "Lymphocyte" if k % 2 else "Tumor"
        r = 5.0 if cls == "Lymphocyte" else 9.0
        cx, cy = (float(v) for v in rng.uniform(12, size - 12, 2))
        cv2.circle(img, (round(cx), round(cy)), round(r), CLASSES[cls], -1)
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_disc(cx, cy, r)]},
                      "properties": {"objectType": "detection",
                                     "classification": {"name": cls, "color": list(CLASSES[cls])}}})
    cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (folder / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def export(root: Path, fmt: str) -> Path:
    """Tiles of two generated images (one train, one val) in the export-tiles layout."""
    src = root / "src"
    if not src.is_dir():
        src.mkdir(parents=True)
        _source(src, "a", 1)
        _source(src, "b", 2)
    out = root / fmt
    assert main(["--log-level", "warning", "export-tiles", str(src), "-o", str(out), "--format", fmt, "--mpp", "0.5",
                 "--size", "64", "--val-fraction", "0.5", "--classes", "Lymphocyte", "Tumor",
                 "--licence", "CC0 (synthetic)"]) == 0
    return out


@pytest.fixture(scope="module")
def semantic_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("data"), "semantic")


def write_card(path: Path, card: dict[str, Any]) -> Path:
    path.write_text(json.dumps(card))
    return path


def semantic_card(family: str, **params: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": "template", "family": family, "task": "semantic-segmentation",
            "object_type": "annotation", "mpp": 0.5, "tile": {"size": 64, "overlap": 16},
            "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                        {"name": "Lymphocyte", "color": list(CLASSES["Lymphocyte"])},
                        {"name": "Tumor", "color": list(CLASSES["Tumor"])}],
            "params": {"tissue_filter": False, **params}}


SMP_PARAMS = {"arch": "Unet", "encoder": "resnet18",
              "model_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}}


def options(card: Path, data: Path, out: Path, **kw: Any) -> TrainOptions:
    base: dict[str, Any] = {"epochs": 1, "device": "cpu", "batch_size": 2, "crop": 64, "samples_per_epoch": 2,
                            "progress": False}
    return TrainOptions(card=card, data=data, out=out, **{**base, **kw})


def annotate_slide(model_dir: Path, tmp_path: Path, size: tuple[int, int] = (160, 200)) -> list[dict[str, Any]]:
    """``qpbridge annotate`` with the model folder on a generated slide; every feature must be valid."""
    img = np.full((*size, 3), PINK, dtype=np.uint8)
    cv2.circle(img, (40, 50), 9, CLASSES["Tumor"], -1)
    cv2.circle(img, (70, 75), 5, CLASSES["Lymphocyte"], -1)
    slide = write_pyramid(tmp_path / "slide.tif", img, mpp=0.5, levels=1)
    out = tmp_path / "slide.geojson"
    assert main(["annotate", str(slide), "--model", str(model_dir), "-o", str(out), "--no-tissue-filter",
                 "--device", "cpu", "--quiet"]) == 0
    feats: list[dict[str, Any]] = json.loads(out.read_text())["features"]
    for f in feats:
        assert shape(f["geometry"]).is_valid
    return feats


def test_smp_trains_writes_save_pretrained_and_annotates(semantic_tiles: Path, tmp_path: Path) -> None:
    card = write_card(tmp_path / "smp.json", semantic_card("smp", **SMP_PARAMS))
    out = tmp_path / "models" / "my-unet"
    result = train(options(card, semantic_tiles, out))
    assert trainer_class("smp").metric == "miou" and result["metric"] == "miou"
    val = result["history"][0]["val"]
    assert 0.0 <= val["miou"] <= 1.0 and 0.0 <= val["pixel_accuracy"] <= 1.0
    assert set(result["history"][0]["loss"]) == {"loss", "ce", "dice"}
    assert result["split"] == {"train": ["b"], "val": ["a"]} and result["licence"] == "CC0 (synthetic)"
    assert (out / "weights" / "config.json").is_file() and (out / "weights" / "model.safetensors").is_file()
    loaded = load_card(out)
    assert loaded.family == "smp" and loaded.weights == out / "weights" and loaded.params["encoder"] == "resnet18"
    model = create_model(loaded, "cpu")
    try:
        (res,) = model.predict([np.full((64, 64, 3), 128, dtype=np.uint8)])
        assert isinstance(res, SemanticResult) and res.probabilities(3).shape == (3, 64, 64)
    finally:
        model.close()
    for f in annotate_slide(out, tmp_path):
        assert f["properties"]["classification"]["name"] in CLASSES


def test_smp_resume_repeats_an_uninterrupted_run(semantic_tiles: Path, tmp_path: Path) -> None:
    card = write_card(tmp_path / "smp.json", semantic_card("smp", **SMP_PARAMS))
    straight = train(options(card, semantic_tiles, tmp_path / "a", epochs=2))

    def stop_after_first(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(card, semantic_tiles, tmp_path / "b", epochs=2), on_epoch=stop_after_first)
    resumed = train(options(card, semantic_tiles, tmp_path / "b", epochs=2, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["loss"] == straight["history"][1]["loss"]
    assert resumed["history"][1]["val"] == straight["history"][1]["val"]
    a = torch.load(str(tmp_path / "a" / CHECKPOINT), weights_only=False)
    b = torch.load(str(tmp_path / "b" / CHECKPOINT), weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.fixture(scope="module")
def coco_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("data"), "coco")


def test_maskrcnn_trains_on_instances_with_types_and_annotates(coco_tiles: Path, tmp_path: Path) -> None:
    from qpbridge.training.maskrcnn import MaskRCNNTrainer

    assert (coco_tiles / "coco" / "train.json").is_file()
    card = write_card(tmp_path / "maskrcnn.json", {
        "schema_version": 1, "name": "template", "family": "maskrcnn", "task": "instance-segmentation",
        "object_type": "detection", "mpp": 0.5, "tile": {"size": 64, "overlap": 16},
        "classes": [{"name": "Tumor", "color": list(CLASSES["Tumor"])},
                    {"name": "Lymphocyte", "color": list(CLASSES["Lymphocyte"])}],
        "params": {"tissue_filter": False, "detections_per_image": 20, "rpn_post_nms_top_n": 100,
                   "max_object_um": 10.0}})
    out = tmp_path / "models" / "my-maskrcnn"
    result = train(options(card, coco_tiles, out, lr=1e-4))
    assert result["metric"] == "ap50" and 0.0 <= result["best"]["ap50"] <= 1.0
    assert set(result["history"][0]["loss"]) == {"loss", "rpn", "box", "mask"}
    assert all(np.isfinite(v) for v in result["history"][0]["loss"].values())
    loaded = load_card(out)
    assert loaded.weights == out / "weights.pt" and loaded.params["weights_format"] == "torchvision"
    for f in annotate_slide(out, tmp_path, (96, 96)):  # the family loads the folder's weights as they are
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] in CLASSES
    # targets: one box (pixel edges), mask and class per object of the crop, classes matched by name
    labels = torch.zeros((8, 8), dtype=torch.int64)
    labels[1:3, 2:5], labels[5:8, 0:2] = 4, 9
    types = torch.where(labels == 4, 2, torch.where(labels == 9, 1, 0))
    t = MaskRCNNTrainer.targets(labels, types)
    assert t["boxes"].tolist() == [[2, 1, 5, 3], [0, 5, 2, 8]] and t["labels"].tolist() == [2, 1]
    assert t["masks"].sum(dim=(1, 2)).tolist() == [6, 6]


def test_gradcam_classifier_trains_on_patch_labels_and_annotates(semantic_tiles: Path, tmp_path: Path) -> None:
    from qpbridge.families.gradcam import GradCAMSegmentation

    card = write_card(tmp_path / "gradcam.json", semantic_card(
        "gradcam", arch="resnet18", background={"class": "Background"}, score_threshold=0.3))
    out = tmp_path / "models" / "my-cam"
    result = train(options(card, semantic_tiles, out, crop=32))
    assert result["metric"] == "f1" and set(result["history"][0]["loss"]) == {"loss", "bce"}
    val = result["history"][0]["val"]
    assert 0.0 <= val["f1"] <= 1.0 and 0.0 <= val["accuracy"] <= 1.0
    loaded = load_card(out)
    assert loaded.weights == out / "weights.pt" and loaded.params["arch"] == "resnet18"
    model = create_model(loaded, "cpu")
    try:
        assert isinstance(model, GradCAMSegmentation)
        assert model.scores_of([np.full((64, 64, 3), 128, dtype=np.uint8)]).shape == (1, 2)
    finally:
        model.close()
    for f in annotate_slide(out, tmp_path, (96, 96)):
        assert f["properties"]["classification"]["name"] in CLASSES
    # a softmax classifier trains single-label, on each crop's majority class
    card = write_card(tmp_path / "softmax.json", semantic_card(
        "gradcam", arch="resnet18", background={"class": "Background"}, scores="softmax"))
    result = train(options(card, semantic_tiles, tmp_path / "softmax", crop=32))
    assert set(result["history"][0]["loss"]) == {"loss", "ce"} and 0.0 <= result["best"]["f1"] <= 1.0


def test_patch_labels_from_masks() -> None:
    from qpbridge.training.gradcam import classification_metrics, patch_targets

    labels = torch.zeros((2, 10, 10), dtype=torch.int64)  # card classes: 0 Background (derived), 1, 2
    labels[0, :5] = 1  # crop 0: half class 1, 2 % class 2, the rest background
    labels[0, 9, :2] = 2
    labels[1, :, :] = 255  # crop 1: all ignored
    labels[1, 0, 0] = 2
    outputs = torch.tensor([1, 2, -1])  # the third output is a class the card does not segment
    multi, labelled = patch_targets(labels, outputs, 0.05, multi_label=True)
    assert multi.tolist() == [[1, 0, 0], [0, 1, 0]] and labelled.tolist() == [True, True]
    multi, _ = patch_targets(labels, outputs, 0.01, multi_label=True)
    assert multi[0].tolist() == [1, 1, 0]  # 2 of 52 classifier-class pixels: above 1 %
    major, _ = patch_targets(labels, outputs, 0.05, multi_label=False)
    assert major.tolist() == [0, 1]
    none, labelled = patch_targets(torch.zeros((1, 4, 4), dtype=torch.int64), outputs, 0.05, multi_label=True)
    assert none.tolist() == [[0, 0, 0]] and labelled.tolist() == [False]
    true = np.array([[1, 0], [1, 1], [0, 0]], dtype=float)
    pred = np.array([[1, 0], [0, 1], [0, 1]], dtype=float)
    m = classification_metrics(true, pred, ["a", "b"], multi_label=True)
    # a: tp 1, fn 1 -> F1 2/3; b: tp 1, fp 1 -> F1 2/3; 4 of 6 decisions right
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)


def test_cyclegan_trains_on_two_image_folders_and_translates(tmp_path: Path) -> None:
    """Unpaired IHC (A: brown on blue-grey) and H&E (B: purple on pink) folders; the generator A -> B is served
    by ``qpbridge translate``, the other direction kept beside it."""
    from qpbridge.families.cyclegan import CycleGANTranslator

    data = tmp_path / "ihc-he"
    rng = np.random.default_rng(0)
    ihc, he = ((200, 205, 215), (120, 80, 40)), (PINK, (80, 55, 135))
    for folder, (bg, fg), n in (("trainA", ihc, 3), ("testA", ihc, 1), ("trainB", he, 3), ("testB", he, 1)):
        (data / folder).mkdir(parents=True)
        for i in range(n):
            img = np.full((48, 48, 3), bg, dtype=np.uint8)
            for _ in range(3):
                cv2.circle(img, tuple(int(v) for v in rng.integers(8, 40, 2)), 5, fg, -1)
            cv2.imwrite(str(data / folder / f"{folder}{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    card = write_card(tmp_path / "cyclegan.json", {
        "schema_version": 1, "name": "template", "family": "cyclegan", "task": "image-translation",
        "tile": {"size": 32, "overlap": 8}, "mpp": 0.5, "requires_mpp": False,
        "params": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_D": 2}})
    out = tmp_path / "models" / "my-ihc2he"
    result = train(options(card, data, out, crop=32, epochs=2, lr=2e-4))
    assert result["metric"] == "cycle_psnr" and result["epochs_run"] == 2
    assert set(result["history"][0]["loss"]) == {"loss", "gan", "cycle", "idt", "d"}
    assert result["history"][0]["val"]["cycle_psnr"] > 0
    assert result["split"] == {"train": [f"A/trainA{i}.png" for i in range(3)] + [f"B/trainB{i}.png" for i in range(3)],
                               "val": ["A/testA0.png", "B/testB0.png"]}
    assert (out / "generator_BtoA.pt").is_file()
    loaded = load_card(out)
    assert loaded.weights == out / "weights.pt" and loaded.params["ngf"] == 4
    model = create_model(loaded, "cpu")
    try:
        assert isinstance(model, CycleGANTranslator)
        (rgb,) = model.translate([np.full((30, 30, 3), 128, dtype=np.uint8)])
        assert rgb.shape == (30, 30, 3) and rgb.dtype == np.uint8
    finally:
        model.close()
    assert main(["translate", str(data / "testA" / "testA0.png"), "--model", str(out), "-o", str(tmp_path / "he.png"),
                 "--mpp", "0.5", "--device", "cpu"]) == 0
    assert cv2.imread(str(tmp_path / "he.png")).shape == (48, 48, 3)


def test_cyclegan_adversarial_terms_train_each_network_only_by_its_own_loss() -> None:
    from qpbridge.training.cyclegan import CycleGAN, _frozen, _lsgan

    torch.manual_seed(0)
    net = CycleGAN(ngf=4, n_blocks=1, use_dropout=False, ndf=4, n_layers=2)
    fake = net.G_A(torch.rand(1, 3, 32, 32) * 2 - 1)
    _lsgan(_frozen(net.D_A, fake), True).backward()  # the generator's term: the critic is not trained by it
    assert all(p.grad is None for p in net.D_A.parameters())
    assert all(p.grad is not None for p in net.G_A.parameters())
    net.zero_grad(set_to_none=True)
    _lsgan(net.D_A(fake.detach()), False).backward()  # the critic's term: the generator is not trained by it
    assert all(p.grad is None for p in net.G_A.parameters())
    assert all(p.grad is not None for p in net.D_A.parameters())
