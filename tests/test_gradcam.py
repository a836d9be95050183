"""HistoSegNet-style Grad-CAM weak segmentation (family ``gradcam``).

Two classifiers in their native formats: a colour classifier built by hand and saved as TorchScript (class k
responds to one colour, so its map must sit on that colour), and a randomly initialised torchvision ResNet-18
saved as a state dict, whose maps are checked against Grad-CAM computed by hand with hooks.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from shapely.geometry import shape

from conftest import MONUSEG, RunningServer, need_data, start_server, write_pyramid
from qpbridge.cards import ModelCard, load_card
from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families import NO_CLASS, SemanticResult, create_model, family_class
from qpbridge.families.gradcam import Adjustment, GradCAMSegmentation, guided_filter

TILE = 64
COLOUR_CLASSES = [{"name": "Background", "color": [255, 255, 255], "emit": False},
                  {"name": "Red", "color": [220, 30, 30]},
                  {"name": "Green", "color": [30, 180, 30]},
                  {"name": "Blue", "color": [30, 30, 220]}]
RED, GREEN, BLUE, WHITE = (200, 30, 30), (30, 200, 30), (30, 30, 200), (250, 250, 250)


class ColourClassifier(torch.nn.Module):
    """Activations: channel k = ReLU of how much the pixel is colour k (1x1 conv), pooled 4x4; logits: their
    mean, scaled. So d logit_k / d A = e_k / (h w) and class k's Grad-CAM is channel k: the colour's region."""

    def __init__(self) -> None:
        super().__init__()
        self.match = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.match.weight.copy_(torch.tensor([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0]])
                                    .view(3, 3, 1, 1))
            self.match.bias.fill_(-0.3)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.relu(self.match(x)), 4)

    @torch.jit.export
    def forward_head(self, acts: torch.Tensor) -> torch.Tensor:
        return 20.0 * acts.mean(dim=(2, 3)) - 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def colour_card(name: str = "colours", **params: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": name, "family": "gradcam", "task": "semantic-segmentation",
            "object_type": "annotation", "classes": COLOUR_CLASSES,
            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": 1.0, "requires_mpp": False,
            "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
            "params": {"background": {"class": "Background"}, "score_threshold": 0.5, "tissue_filter": False,
                       **params},
            "weights": "colours.pt"}


RESNET_CLASSES = [{"name": "Tumour", "color": [200, 0, 0]}, {"name": "Stroma", "color": [0, 150, 0]}]


def resnet_card(**params: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": "resnet-cam", "family": "gradcam", "task": "semantic-segmentation",
            "object_type": "annotation", "classes": RESNET_CLASSES,
            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": 1.0, "requires_mpp": False,
            "params": {"arch": "resnet18", "tissue_filter": False, **params}, "weights": "classifier.pth"}


def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=2).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cams")
    for card in (colour_card(), resnet_card()):
        (root / card["name"]).mkdir()
        (root / card["name"] / "config.json").write_text(json.dumps(card))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(ColourClassifier().eval()), str(root / "colours" / "colours.pt"))
    torch.save(resnet18().state_dict(), root / "resnet-cam" / "classifier.pth")
    return root


@pytest.fixture(scope="module")
def colours(zoo: Path) -> Iterator[GradCAMSegmentation]:
    model = create_model(load_card(zoo / "colours"))
    assert isinstance(model, GradCAMSegmentation)
    yield model
    model.close()


def quadrants() -> np.ndarray:
    """Red top left, green top right, white bottom left, blue bottom right: all 32 x 32."""
    tile = np.empty((TILE, TILE, 3), np.uint8)
    h = TILE // 2
    tile[:h, :h], tile[:h, h:], tile[h:, :h], tile[h:, h:] = RED, GREEN, WHITE, BLUE
    return tile


def test_each_class_map_peaks_on_its_colour(colours: GradCAMSegmentation) -> None:
    h = TILE // 2
    tile = quadrants()
    tile[h:, h:] = WHITE  # no blue in this one: its score stays below the threshold
    (result,) = colours.predict([tile])
    assert isinstance(result, SemanticResult) and result.probs is not None and result.classes is not None
    probs = result.probs
    red, green, blue, bg = probs[1], probs[2], probs[3], probs[0]
    red_peak = np.unravel_index(red.argmax(), red.shape)
    green_peak = np.unravel_index(green.argmax(), green.shape)
    assert red_peak[0] < h and red_peak[1] < h
    assert green_peak[0] < h and green_peak[1] >= h
    assert blue.max() == 0.0  # below score_threshold: no map at all
    assert bg[h + 4:, 4:TILE - 4].min() > 0.3  # the white half is glass
    core = result.classes
    assert (core[4:h - 4, 4:h - 4] == 1).all() and (core[4:h - 4, h + 4:TILE - 4] == 2).all()
    assert (core[h + 4:TILE - 4, 4:TILE - 4] == 0).all()
    scores = colours.scores_of([tile])[0]
    assert scores[0] > 0.5 and scores[1] > 0.5 and scores[2] < 0.5


def test_no_class_where_nothing_claims_a_pixel(zoo: Path) -> None:
    card = ModelCard.from_dict(colour_card(background=None, refine="none",
                                           classifier_classes=["Red", "Green", "Blue"]), folder=zoo / "colours")
    model = create_model(card)
    try:
        tile = np.full((TILE, TILE, 3), 128, np.uint8)  # grey: no colour, no glass
        tile[:32, :32] = RED
        (result,) = model.predict([tile])
        assert result.classes is not None and result.probs is not None
        assert (result.classes[40:, 40:] == NO_CLASS).all() and (result.classes[2:30, 2:30] == 1).all()
        # class subtraction (unrefined): at most one class is positive at a pixel
        two = quadrants()
        for probs in (result.probs, model.predict([two])[0].probs):
            assert ((probs > 0).sum(axis=0) <= 1).all()
    finally:
        model.close()


def test_resnet_state_dict_gradcam_matches_by_hand(zoo: Path) -> None:
    """torchvision ResNet-18 from a state dict: the maps are Grad-CAM of layer4 as computed by hand."""
    card = ModelCard.from_dict(resnet_card(refine="none", class_subtraction=False), folder=zoo / "resnet-cam")
    model = create_model(card)
    try:
        rng = np.random.default_rng(0)
        batch = [rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8) for _ in range(2)]
        got = np.stack([r.probs for r in model.predict(batch)])
        net = resnet18()
        acts: list[torch.Tensor] = []
        net.layer4.register_forward_hook(lambda _m, _i, o: acts.append(o))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        logits = net(x)
        maps = []
        for k in range(2):
            (g,) = torch.autograd.grad(logits[:, k].sum(), acts[0], retain_graph=True)
            cam = (g.mean(dim=(2, 3), keepdim=True) * acts[0]).sum(dim=1, keepdim=True)
            cam = torch.nn.functional.interpolate(cam, size=(TILE, TILE), mode="bilinear").clamp_min(0)
            cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-7)
            maps.append(cam[:, 0] * torch.sigmoid(logits[:, k]).view(-1, 1, 1))
        np.testing.assert_allclose(got, torch.stack(maps, 1).detach().numpy(), atol=1e-4)
    finally:
        model.close()


def test_adjustment_and_guided_filter() -> None:
    adj = Adjustment(n_classes=4, clf_to_card=(0, 1), background=2, other=3, refine="none", bg_sigma=0.0)
    cams = torch.zeros(1, 2, 8, 8)
    cams[0, 0, :, :4] = 0.8
    cams[0, 1, :, 2:] = 0.5
    rgb = torch.full((1, 3, 8, 8), 120.0)
    rgb[..., 6:, :] = 255.0  # glass at the bottom
    out = adj(cams, rgb)[0]
    assert torch.allclose(out[0, :5, :2], torch.tensor(0.8 - 0.05 * 0.2))  # minus "other" = 0.05 * (1 - 0.8)
    assert torch.allclose(out[0, :5, 2:4], torch.tensor(0.3))  # 0.8 - 0.5 where both claim
    assert (out[1, :5, 2:4] == 0).all() and torch.allclose(out[1, :5, 4:], torch.tensor(0.5 - 0.025))
    # background only on glass, and not where a class claims more (0.8 > 0.75 at columns 0-3)
    assert (out[2, 6:, 4:] > 0).all() and (out[2, :5] == 0).all() and (out[2, 6:, :4] == 0).all()
    assert torch.allclose(out[3, :5, :2], torch.tensor(0.05 * 0.2))  # "other" is not subtracted
    # a classifier output the card does not segment (null in classifier_classes) is left out
    skip = Adjustment(n_classes=2, clf_to_card=(0, -1, 1), refine="none", subtract=False)
    three = torch.rand(1, 3, 8, 8)
    got = skip(three, rgb)[0]
    assert torch.equal(got[0], three[0, 0]) and torch.equal(got[1], three[0, 2])
    flat = torch.full((1, 2, 16, 16), 0.4)
    guide = torch.rand(1, 1, 16, 16)
    assert torch.allclose(guided_filter(guide, flat, 3, 1e-2), flat, atol=1e-5)
    # a blurry map across a sharp image edge comes out sharper
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1.0
    blurry = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    sharp = guided_filter(edge, blurry, 3, 1e-3)
    assert (sharp[..., 9] - sharp[..., 6]).mean() > (blurry[..., 9] - blurry[..., 6]).mean()


def test_card_errors(zoo: Path) -> None:
    assert family_class("gradcam") is GradCAMSegmentation
    for params, match in (({"refine": "crf"}, "refine"), ({"background": {"class": "Glass"}}, "Glass"),
                          ({"classifier_classes": ["Red", "Red"]}, "once"), ({"score_threshold": [0.1, 0.2]}, "one"),
                          ({"scores": "relu"}, "scores")):
        with pytest.raises(ModelCardError, match=match):
            create_model(ModelCard.from_dict(colour_card(**params), folder=zoo / "colours"))
    with pytest.raises(ModelCardError, match="arch"):
        create_model(ModelCard.from_dict(resnet_card(arch=None), folder=zoo / "resnet-cam"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        create_model(ModelCard.from_dict(resnet_card(arch="resnet34"), folder=zoo / "resnet-cam"))
    with pytest.raises(ModelCardError, match="no layer"):
        create_model(ModelCard.from_dict(resnet_card(target_layer="layer9"), folder=zoo / "resnet-cam"))
    three = {**resnet_card(), "classes": [*RESNET_CLASSES, {"name": "Fat", "color": [250, 250, 0]}]}
    with pytest.raises(ModelLoadError, match="does not fit"):  # 3 classifier outputs in the card, 2 in the file
        create_model(ModelCard.from_dict(three, folder=zoo / "resnet-cam"))


def test_shipped_card(tmp_path: Path) -> None:
    """models/histosegnet-func validates, names its weights, and runs once given a classifier in the
    TorchScript layout its README shows (forward_features / forward_head)."""
    import shutil

    from qpbridge.cards import builtin_cards_dir

    src = builtin_cards_dir() / "histosegnet-func"
    card = load_card(src)
    assert card.family == "gradcam" and (src / "README.md").is_file()
    adj = Adjustment.from_card(card)
    assert adj.background == 0 and adj.other == 1 and adj.clf_to_card == (2, 3, 4) and adj.bg_exceptions == (2, 3, 4)
    folder = tmp_path / "histosegnet-func"
    shutil.copytree(src, folder)
    if (folder / "classifier.pth").exists():
        (folder / "classifier.pth").unlink()
    with pytest.raises(ModelLoadError, match="README"):
        create_model(load_card(folder))
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3)

    class Split(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*list(net.children())[:-2])
            self.head = torch.nn.Sequential(net.avgpool, torch.nn.Flatten(1), net.fc)

        @torch.jit.export
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        @torch.jit.export
        def forward_head(self, a: torch.Tensor) -> torch.Tensor:
            return self.head(a)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Split().eval()), str(folder / "classifier.pth"))
    model = create_model(load_card(folder))
    try:
        tile = np.random.default_rng(1).integers(0, 256, (card.tile_size, card.tile_size, 3), dtype=np.uint8)
        tile[:40] = 252  # glass
        (result,) = model.predict([tile])
        assert result.probs is not None and result.probs.shape == (5, card.tile_size, card.tile_size)
        assert result.probs[0, 5:35, 5:-5].min() > 0  # the glass band is Background
    finally:
        model.close()


@pytest.fixture(scope="module")
def cam_server(zoo: Path) -> Iterator[RunningServer]:
    running = start_server(zoo)
    yield running
    running.server.stop()
    running.thread.join(10)


def test_server_predict_on_real_tiles(cam_server: RunningServer) -> None:
    from qpbridge.client import Client
    from qpbridge.images import read_image
    from qpbridge.protocol import ImageInfo, TileSpec

    img, _ = read_image(need_data(MONUSEG / "TCGA-21-5784-01Z-00-DX1.tif"))
    specs = [(TileSpec(x, y, TILE, TILE), np.ascontiguousarray(img[y:y + TILE, x:x + TILE]))
             for y in (0, TILE) for x in (0, TILE)]
    with Client(cam_server.address) as c:
        feats = c.predict("resnet-cam", specs, ImageInfo(mpp=1.0))
    assert feats
    for f in feats:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] in {"Tumour", "Stroma"}
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 2 * TILE and g.bounds[3] <= 2 * TILE


def test_annotate_colour_slide_finds_the_colours(zoo: Path, tmp_path: Path) -> None:
    """Over a generated slide, stitched across overlapping tiles: red and green regions come back as Red
    and Green annotations where they are, glass as nothing."""
    from qpbridge.cli import main

    img = np.full((160, 240, 3), 250, np.uint8)
    img[20:140, 10:110] = RED
    img[20:140, 130:230] = GREEN
    slide = write_pyramid(tmp_path / "colours.tif", img, mpp=1.0, levels=2)
    out = tmp_path / "out.geojson"
    assert main(["annotate", str(slide), "--model", "colours", "--models-dir", str(zoo), "-o", str(out),
                 "--no-tissue-filter", "--device", "cpu", "--quiet"]) == 0
    feats = json.loads(out.read_text())["features"]
    by_class: dict[str, Any] = {}
    for f in feats:
        g = shape(f["geometry"])
        assert g.is_valid and f["properties"]["objectType"] == "annotation"
        name = f["properties"]["classification"]["name"]
        by_class[name] = g if name not in by_class else by_class[name].union(g)
    assert set(by_class) == {"Red", "Green"}
    # blended across the tile overlaps: each colour block is one region, not one piece per tile
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names.count("Red") == 1 and names.count("Green") == 1
    from shapely.geometry import box

    red, green = box(10, 20, 110, 140), box(130, 20, 230, 140)
    assert by_class["Red"].intersection(red).area > 0.8 * red.area
    assert by_class["Green"].intersection(green).area > 0.8 * green.area
    assert by_class["Red"].intersection(green).area < 0.05 * green.area
    assert by_class["Green"].intersection(red).area < 0.05 * red.area


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(zoo: Path, colours: GradCAMSegmentation) -> None:
    model = create_model(load_card(zoo / "colours"), "cuda")
    try:
        batch = [quadrants(), quadrants()[::-1].copy()]
        on_device = model.predict_native(batch, on_device=True)
        assert all(isinstance(r.probs, torch.Tensor) and r.probs.is_cuda for r in on_device)
        for a, b in zip(model.predict(batch), colours.predict(batch), strict=True):
            np.testing.assert_allclose(np.asarray(a.probs, np.float32), b.probs, atol=2e-2)
    finally:
        model.close()
