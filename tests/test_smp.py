"""The ``smp`` family (segmentation-models-pytorch), the Histo_Unet card, blend windows and the class-raster
morphology.

Models are small randomly initialised smp U-Nets saved by smp itself (``save_pretrained``) or as plain state
dicts, and loaded through cards; real tiles come from ``../shared/data`` (skipped when absent).
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")

from conftest import DARK_CARD, MONUSEG, need_data, start_server, write_pyramid  # noqa: E402
from qpbridge.cards import ModelCard, load_card  # noqa: E402
from qpbridge.errors import ModelCardError, ModelLoadError  # noqa: E402
from qpbridge.families import SemanticResult, create_model, family_class  # noqa: E402
from qpbridge.families.smp import SmpSegmentation  # noqa: E402
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TILE = 64
CLASSES = [
    {"name": "Background", "color": [255, 255, 255], "emit": False},
    {"name": "Tumor", "color": [200, 0, 0]},
    {"name": "Stroma", "color": [150, 200, 150]},
]
# efficientnet-b0, as Histo_Unet's, cut to three levels and a narrow decoder: small and fast
SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}


def tiny_unet(classes: int = 3, **over: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL, **over}
    model: torch.nn.Module = smp.Unet(encoder_name="efficientnet-b0", encoder_weights=None, classes=classes,
                                      **kwargs)
    return model.eval()


def card_dict(name: str = "tiny-unet", **over: Any) -> dict[str, Any]:
    card = {
        "schema_version": 1, "name": name, "family": "smp", "task": "semantic-segmentation",
        "object_type": "annotation", "classes": CLASSES,
        "tile": {"size": TILE, "overlap": 16, "batch_size": 8}, "mpp": 1.0,
        "params": {"arch": "Unet", "encoder": "efficientnet-b0"}, "weights": "weights",
    }
    card.update(over)
    return card


def tiles(n: int, seed: int = 0, h: int = TILE, w: int = TILE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def reference(model: torch.nn.Module, batch: list[np.ndarray]) -> np.ndarray:
    """The smp model by hand: ImageNet normalisation, softmax."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


@pytest.fixture(scope="module")
def unet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A card folder with a tiny U-Net saved by smp's save_pretrained in weights/."""
    root = tmp_path_factory.mktemp("models") / "tiny-unet"
    root.mkdir()
    tiny_unet().save_pretrained(str(root / "weights"))
    (root / "config.json").write_text(json.dumps(card_dict()))
    return root


@pytest.fixture(scope="module")
def unet_model(unet_root: Path) -> Iterator[SmpSegmentation]:
    model = create_model(load_card(unet_root), "cpu")
    assert isinstance(model, SmpSegmentation)
    yield model
    model.close()


def test_save_pretrained_folder_gives_the_models_probabilities(unet_model: SmpSegmentation, unet_root: Path) -> None:
    assert family_class("smp") is SmpSegmentation
    saved = json.loads((unet_root / "weights" / "config.json").read_text())
    assert saved["_model_class"] == "Unet" and saved["encoder_depth"] == 3  # smp's own folder layout
    batch = tiles(3)
    results = unet_model.predict(batch)
    assert all(isinstance(r, SemanticResult) and r.probs is not None for r in results)
    probs = np.stack([r.probs for r in results])
    assert probs.shape == (3, 3, TILE, TILE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference(tiny_unet(), batch), atol=1e-5)


def test_tiles_not_a_multiple_of_the_stride_are_padded(unet_model: SmpSegmentation) -> None:
    """The encoder needs multiples of 8 here: edge tiles and larger odd-sized tiles still run."""
    odd = tiles(1, seed=2, h=TILE + 13, w=TILE + 5)[0]
    edge = odd[:21, :37].copy()
    results = unet_model.predict([odd, edge])
    assert [r.probs.shape for r in results] == [(3, TILE + 13, TILE + 5), (3, 21, 37)]
    padded = np.pad(odd, ((0, 3), (0, 3), (0, 0)), mode="reflect")  # 77 x 69 -> 80 x 72
    np.testing.assert_allclose(results[0].probs, reference(tiny_unet(), [padded])[0][:, :TILE + 13, :TILE + 5],
                               atol=1e-5)


def test_plain_state_dicts_load_like_the_folder(tmp_path: Path, unet_model: SmpSegmentation) -> None:
    state = tiny_unet().state_dict()
    batch = tiles(2, seed=4)
    expected = np.stack([r.probs for r in unet_model.predict(batch)])
    variants = {
        "plain.pth": state,
        "checkpoint.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7},
        "lightning.pth": {"model": {f"model.{k}": v for k, v in state.items()}},
    }
    for name, data in variants.items():
        torch.save(data, tmp_path / name)
        params = {"arch": "unet", "encoder": "efficientnet-b0", "model_kwargs": SMALL}
        model = create_model(ModelCard.from_dict(card_dict(weights=name, params=params), folder=tmp_path), "cpu")
        try:
            got = np.stack([r.probs for r in model.predict(batch)])
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
        finally:
            model.close()  # type: ignore[attr-defined]


def test_weights_that_do_not_fit_name_the_parameters(tmp_path: Path, unet_root: Path) -> None:
    torch.save(tiny_unet().state_dict(), tmp_path / "small.pth")
    # the card leaves out model_kwargs: smp's default five-level U-Net does not take these weights
    card = ModelCard.from_dict(card_dict(weights="small.pth"), folder=tmp_path)
    with pytest.raises(ModelLoadError, match=r"does not fit the architecture: \d+ missing \(decoder\.blocks\.3\..*"
                       r"of another shape \(file vs model: decoder\.blocks\.0\.conv1\.0\.weight \(16, 64, 3, 3\)"):
        create_model(card, "cpu")
    torch.save({**tiny_unet().state_dict(), "aux.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    extra = card_dict(weights="extra.pth", params={"arch": "Unet", "encoder": "efficientnet-b0", "model_kwargs": SMALL})
    with pytest.raises(ModelLoadError, match=r"1 unexpected \(aux\.weight\)"):
        create_model(ModelCard.from_dict(extra, folder=tmp_path), "cpu")
    four = card_dict(classes=[*CLASSES, {"name": "Other", "color": [1, 2, 3]}])
    with pytest.raises(ModelLoadError, match=r"3 classes \(card lists 4\)"):
        create_model(ModelCard.from_dict(four, folder=unet_root), "cpu")
    other = card_dict(params={"arch": "FPN", "encoder": "resnet18"})
    with pytest.raises(ModelLoadError, match=r"architecture Unet \(card: FPN\), encoder efficientnet-b0"):
        create_model(ModelCard.from_dict(other, folder=unet_root), "cpu")
    for params, message in (({"encoder": "resnet18"}, "params.arch"), ({"arch": "Unet"}, "params.encoder"),
                            ({"arch": "NoSuchNet", "encoder": "resnet18"}, "unknown smp architecture"),
                            ({"arch": "Unet", "encoder": "x", "model_kwargs": {"classes": 2}}, "must not set")):
        with pytest.raises(ModelCardError, match=message):
            create_model(ModelCard.from_dict(card_dict(params=params, weights="small.pth"), folder=tmp_path), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"neither a torch\.save file"):
        create_model(ModelCard.from_dict(card_dict(weights="junk.pth"), folder=tmp_path), "cpu")


def test_building_never_touches_the_network(monkeypatch: pytest.MonkeyPatch, unet_root: Path) -> None:
    """A folder saved from a model built with ImageNet encoder weights still loads offline."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network access while building an smp model")

    config_path = unet_root / "weights" / "config.json"
    saved = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(saved), "encoder_weights": "imagenet"}))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    try:
        model = create_model(load_card(unet_root), "cpu")
        model.close()  # type: ignore[attr-defined]
        real = smp.Unet(encoder_name="efficientnet-b0", encoder_weights=None, classes=4)
        assert sum(p.numel() for p in real.parameters()) > 6_000_000
    finally:
        config_path.write_text(saved)


def test_histo_unet_card() -> None:
    card = load_card(REPO / "models" / "histo_unet")
    assert (card.family, card.task, card.object_type) == ("smp", "semantic-segmentation", "annotation")
    assert (card.params["arch"], card.params["encoder"], len(card.classes)) == ("Unet", "efficientnet-b0", 4)
    assert card.overlap == 3 * card.tile_size // 4  # "16-fold": every inner pixel in 4 x 4 tiles
    assert card.params["blend_window"] == "spline"
    assert card.params["morphology"]["opening_um"] > 0 and card.max_hole_area_um2 > 0 and card.min_area_um2 > 0
    assert (REPO / "models" / "histo_unet" / "README.md").is_file()
    if not card.weights or not card.weights.exists():
        assert card.to_wire()["available"] is False
        with pytest.raises(ModelLoadError, match="README"):
            create_model(card, "cpu")


def test_models_command_flags_missing_weights(capsys: pytest.CaptureFixture[str]) -> None:
    from qpbridge.cli import main

    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("histo_unet", "detectron2_nuclei"):
        card = load_card(REPO / "models" / name)
        assert listed[name]["available"] == bool(card.weights and card.weights.exists())
        line = next(x for x in lines if x.startswith(name))
        assert ("weights missing" in line) != listed[name]["available"]


# ---- blend windows and morphology in the engine ----------------------------------------------------------


def test_blend_windows() -> None:
    from qpbridge.engine.stitching import WINDOW_FLOOR, blend_window

    for kind in ("cosine", "spline", "gaussian"):
        win = blend_window(kind, 64, 48, 48)
        assert win.shape == (64, 48) and win.dtype == np.float32
        assert win.min() >= WINDOW_FLOOR ** 2 and win.max() <= 1.0  # corners: floor x floor
        assert win[32, 24] == win.max()  # peak in the middle, symmetric
        np.testing.assert_allclose(win, win[::-1, ::-1], atol=1e-6)
    spline = blend_window("spline", 64, 64, 0)
    assert spline[0, 0] < 0.01 and spline[32, 32] > 0.99
    with pytest.raises(ValueError, match="unknown blend window"):
        blend_window("box", 8, 8, 0)


def test_strip_morphology_equals_whole_raster() -> None:
    from qpbridge.engine.morphology import NO_CLASS, Morphology, StripMorphology

    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.random((300, 200)).astype(np.float32), (0, 0), 3)
    raster = ((noise - noise.min()) * 60).astype(np.uint8) % 4
    raster[250:, :30] = NO_CLASS
    morph = Morphology(opening_px=3, closing_px=2, classes=(1, 2, 3), fill=0)
    whole = morph.apply(raster)
    assert (whole != raster).mean() > 0.05
    assert (whole[250:, :30] == NO_CLASS).all()  # uncovered stays uncovered
    for step in (7, 16, 64):
        out: list[np.ndarray] = []
        strips = StripMorphology(morph, lambda s, last, out=out: out.append(s))
        for y in range(0, 300, step):
            strips.add_strip(raster[y:y + step], last=y + step >= 300)
        np.testing.assert_array_equal(np.concatenate(out), whole)


def _dark_card(tmp_path: Path, name: str, **params: Any) -> Path:
    card = {**DARK_CARD, "name": name, "tile": {"size": 64, "overlap": 48, "batch_size": 64},
            "params": {"tissue_filter": False, **params}}
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(card))
    return tmp_path


def test_morphology_and_windows_in_a_sixteen_fold_run(tmp_path: Path) -> None:
    """A dark square cut by a 2 px white line and a 3 px speck: the card's closing joins the two halves into
    one region and its opening removes the speck, across many 16-fold overlapping tiles."""
    from shapely.geometry import shape

    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine

    img = np.full((400, 500, 3), 235, np.uint8)
    img[60:300, 80:400] = 30
    img[60:300, 230:232] = 235  # the cut
    img[350:353, 40:43] = 30  # the speck
    slide = write_pyramid(tmp_path / "square.tif", img, mpp=1.0, levels=1)
    models = _dark_card(tmp_path, "plain")
    _dark_card(tmp_path, "morph", blend_window="spline", morphology={"opening_um": 2.0, "closing_um": 2.0})
    engine = Engine(models)
    plain = annotate_slide(engine, slide, "plain", tissue_filter=False)
    morph = annotate_slide(engine, slide, "morph", tissue_filter=False)
    assert plain.plan.overlap == 48
    assert len(plain.features) == 3  # two halves and the speck
    geoms = [shape(f["geometry"]) for f in morph.features]
    assert len(geoms) == 1 and geoms[0].is_valid
    assert geoms[0].area == pytest.approx(240 * 320, rel=0.02)
    # a tile on its own (predict, no stitching) is filtered the same way
    from qpbridge.protocol import ImageInfo, TileSpec

    tile = (TileSpec(200, 290, 64, 64), np.ascontiguousarray(img[290:354, 200:264]))
    spot = (TileSpec(20, 330, 64, 64), np.ascontiguousarray(img[330:394, 20:84]))
    assert len(engine.predict("plain", ImageInfo(mpp=1.0), [tile, spot])) == 3  # two halves, the speck
    assert len(engine.predict("morph", ImageInfo(mpp=1.0), [tile, spot])) == 1
    _dark_card(tmp_path, "bad", blend_window="box")
    with pytest.raises(ModelCardError, match="blend_window"):
        annotate_slide(Engine(models), slide, "bad", tissue_filter=False)
    from qpbridge.engine.morphology import Morphology

    with pytest.raises(ModelCardError, match="unknown key"):
        Morphology.from_card(ModelCard.from_dict({**DARK_CARD, "params": {"morphology": {"fill_holes": 1}}}))
    with pytest.raises(ModelCardError, match="fill_class"):
        Morphology.from_card(ModelCard.from_dict({**DARK_CARD, "params": {"morphology": {"fill_class": "X"}}}))


# ---- through a real server and annotate ------------------------------------------------------------------


def test_server_serves_the_smp_card_on_real_tiles(unet_root: Path) -> None:
    import tifffile

    from qpbridge.client import Client
    from qpbridge.protocol import ImageInfo, TileSpec

    image = sorted(need_data(MONUSEG).glob("*.tif"))[0]
    rgb = tifffile.imread(image)[..., :3]
    running = start_server(unet_root.parent)
    try:
        with Client(running.address) as c:
            assert "tiny-unet" in {m["name"] for m in c.models()}
            # 256 px at 0.25 µm/px = 64 model px at 1 µm/px: two real tiles, resampled by the engine
            specs = [(TileSpec(x, 0, 256, 256), np.ascontiguousarray(rgb[:256, x:x + 256])) for x in (0, 256)]
            feats = c.predict("tiny-unet", specs, ImageInfo(name=image.name, mpp=0.25))
    finally:
        running.server.stop()
        running.thread.join(10)
    assert feats, "random weights still give some tumour or stroma pixels"
    from shapely.geometry import shape

    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in {"Tumor", "Stroma"}
        assert props["classification"]["color"] in ([200, 0, 0], [150, 200, 150])
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 512 and g.bounds[3] <= 256


def test_histo_unet_card_annotates_a_slide_with_real_architecture(tmp_path: Path) -> None:
    """The shipped card, with a randomly initialised full-size Unet/efficientnet-b0 saved where its README
    says, annotates a generated slide through the CLI: 16-fold blending, morphology, QuPath annotations."""
    from shapely.geometry import shape

    from qpbridge.cli import main

    folder = tmp_path / "histo_unet"
    shutil.copytree(REPO / "models" / "histo_unet", folder, ignore=shutil.ignore_patterns("weights"))
    torch.manual_seed(1)
    smp.Unet(encoder_name="efficientnet-b0", encoder_weights=None, classes=4).eval().save_pretrained(
        str(folder / "weights"))
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur((rng.random((640, 640, 3)) * 255).astype(np.uint8), (0, 0), 8)
    img = cv2.normalize(img, None, 30, 230, cv2.NORM_MINMAX)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, levels=2)
    out = tmp_path / "out.geojson"
    assert main(["annotate", str(slide), "--model", str(folder), "-o", str(out), "--no-tissue-filter",
                 "--device", "cpu", "--quiet"]) == 0
    feats = json.loads(out.read_text())["features"]
    assert feats
    for f in feats:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] in {"Tumor", "Stroma", "Other tissue"}
        g = shape(f["geometry"])
        assert g.is_valid and g.area * 0.25 >= 2000 * 0.99  # min_area_um2 of the card
        assert g.bounds[2] <= 640 and g.bounds[3] <= 640


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu_fp32(unet_root: Path, unet_model: SmpSegmentation) -> None:
    card = ModelCard.from_dict(card_dict(params={"arch": "Unet", "encoder": "efficientnet-b0",
                                                 "precision": "fp16"}), folder=unet_root)
    model = create_model(card, "cuda")
    assert isinstance(model, SmpSegmentation)
    try:
        batch = tiles(6, seed=8)
        gpu = model.predict(batch)
        cpu = unet_model.predict(batch)
        assert model.worker.precision == "fp16"
        for a, b in zip(gpu, cpu, strict=True):
            assert a.probs.dtype == np.float16
            np.testing.assert_allclose(a.probs.astype(np.float32), b.probs, atol=3e-2)
    finally:
        model.close()
