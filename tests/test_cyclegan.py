"""CycleGAN translator, pipeline cards (translator + model on the device), the translate op and CLI.

Every model is tiny and randomly initialised, saved in its native format (CycleGAN's state dict with the
repository's key names, TorchScript) and loaded through a card.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shapely.geometry import shape

from conftest import MONUSEG, RunningServer, need_data, start_server, write_pyramid
from qpbridge.cards import ModelCard, load_card
from qpbridge.errors import BadRequestError, ModelCardError, ModelLoadError, RemoteError
from qpbridge.families import InstanceResult, SemanticResult, create_model, family_class
from qpbridge.families.cyclegan import CycleGANTranslator, ResnetGenerator
from qpbridge.families.pipeline import Pipeline

TILE = 64
SEG_CLASSES = [{"name": "Background", "color": [255, 255, 255], "emit": False},
               {"name": "Dark", "color": [40, 40, 160]}]


def tiny_generator(seed: int = 0) -> ResnetGenerator:
    torch.manual_seed(seed)
    return ResnetGenerator(ngf=8, n_blocks=2).eval()


class TinySeg(torch.nn.Module):
    """A small fully convolutional 2-class segmenter (what a TorchScript export of a real one looks like)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def gen_card(name: str = "gen", mpp: float = 1.0, weights: str = "latest_net_G_A.pth") -> dict[str, Any]:
    return {"schema_version": 1, "name": name, "family": "cyclegan", "task": "image-translation",
            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": mpp, "requires_mpp": False,
            "params": {"ngf": 8, "n_blocks": 2}, "weights": weights}


def pipeline_card(name: str, stages: list[str], **over: Any) -> dict[str, Any]:
    card = {"schema_version": 1, "name": name, "family": "pipeline", "pipeline": stages,
            "task": "semantic-segmentation", "object_type": "annotation", "classes": SEG_CLASSES,
            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": 1.0, "requires_mpp": False,
            "params": {"tissue_filter": False}}
    card.update(over)
    return card


def write_card(root: Path, card: dict[str, Any]) -> Path:
    folder = root / card["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory: generator (state dict and TorchScript), a segmenter, pipeline cards."""
    root = tmp_path_factory.mktemp("zoo")
    gen = tiny_generator()
    folder = write_card(root, gen_card())
    torch.save(gen.state_dict(), folder / "latest_net_G_A.pth")
    ts = write_card(root, gen_card("gen-ts", weights="generator.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(gen, torch.rand(1, 3, TILE, TILE)), str(ts / "generator.pt"))
    # a checkpoint as older trainings leave it: DataParallel prefixes and InstanceNorm running stats
    legacy = write_card(root, gen_card("gen-legacy"))
    state = {f"module.{k}": v for k, v in gen.state_dict().items()}
    state["module.model.2.running_mean"] = torch.zeros(8)
    state["module.model.2.running_var"] = torch.ones(8)
    torch.save(state, legacy / "latest_net_G_A.pth")
    seg = write_card(root, {"schema_version": 1, "name": "seg", "family": "torchscript-segmentation",
                            "task": "semantic-segmentation", "object_type": "annotation", "classes": SEG_CLASSES,
                            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": 1.0,
                            "requires_mpp": False, "weights": "seg.pt",
                            "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(TinySeg().eval(), torch.rand(1, 3, TILE, TILE)), str(seg / "seg.pt"))
    write_card(root, pipeline_card("gen-seg", ["gen", "seg"]))
    # a last stage with a head and gradients: Grad-CAM of a ResNet-18 (state dict)
    import torchvision

    cam_classes = [{"name": "Tumour", "color": [200, 0, 0]}, {"name": "Stroma", "color": [0, 150, 0]}]
    cam = write_card(root, {"schema_version": 1, "name": "cam", "family": "gradcam", "task": "semantic-segmentation",
                            "object_type": "annotation", "classes": cam_classes,
                            "tile": {"size": TILE, "overlap": 16, "batch_size": 4}, "mpp": 1.0,
                            "requires_mpp": False, "params": {"arch": "resnet18"}, "weights": "classifier.pth"})
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), cam / "classifier.pth")
    write_card(root, pipeline_card("gen-cam", ["gen", "cam"], classes=cam_classes))
    # the built-in (CPU) nucleus model after a translator at its 0.5 µm/px
    half = write_card(root, gen_card("gen-half", mpp=0.5))
    torch.save(gen.state_dict(), half / "latest_net_G_A.pth")
    write_card(root, pipeline_card("gen-nuclei", ["gen-half", "nuclei"], task="instance-segmentation",
                                   object_type="detection", classes=[{"name": "Nucleus", "color": [30, 60, 200]}],
                                   tile={"size": 128, "overlap": 32}, mpp=0.5,
                                   params={"max_area_um2": 400.0, "tissue_filter": False}))
    return root


@pytest.fixture(scope="module")
def translator(zoo: Path) -> Iterator[CycleGANTranslator]:
    model = create_model(load_card(zoo / "gen"))
    assert isinstance(model, CycleGANTranslator)
    yield model
    model.close()


@pytest.fixture(scope="module")
def segmenter(zoo: Path) -> Iterator[Any]:
    model = create_model(load_card(zoo / "seg"))
    yield model
    model.close()


def tiles(n: int, seed: int = 0, h: int = TILE, w: int = TILE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def by_hand(gen: torch.nn.Module, batch: list[np.ndarray]) -> np.ndarray:
    """The repository's test-time path: [-1, 1] input, tanh output back to 0..255 (rounded here)."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    with torch.no_grad():
        y = gen(x)
    return ((y + 1.0) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


# ---- the generator ---------------------------------------------------------------------------------------


def test_generator_has_the_repositorys_layout_and_key_names() -> None:
    """resnet_9blocks, ngf 64: the parameter names and shapes of a latest_net_G_A.pth."""
    shapes = {k: tuple(v.shape) for k, v in ResnetGenerator().state_dict().items()}
    assert shapes["model.1.weight"] == (64, 3, 7, 7)
    assert shapes["model.4.weight"] == (128, 64, 3, 3) and shapes["model.7.weight"] == (256, 128, 3, 3)
    for block in range(10, 19):
        assert shapes[f"model.{block}.conv_block.1.weight"] == (256, 256, 3, 3)
        assert shapes[f"model.{block}.conv_block.5.weight"] == (256, 256, 3, 3)
    assert shapes["model.19.weight"] == (256, 128, 3, 3)  # ConvTranspose2d: (in, out, k, k)
    assert shapes["model.22.weight"] == (128, 64, 3, 3)
    assert shapes["model.26.weight"] == (3, 64, 7, 7) and shapes["model.26.bias"] == (3,)
    assert len(shapes) == 2 * (3 + 2 * 9 + 2 + 1)  # weights and biases only: instance norm has none
    dropout = ResnetGenerator(use_dropout=True).state_dict()
    assert "model.10.conv_block.6.weight" in dropout


def test_translate_matches_the_generator_by_hand(translator: CycleGANTranslator) -> None:
    batch = tiles(3)
    out = translator.translate(batch)
    assert [o.shape for o in out] == [(TILE, TILE, 3)] * 3 and out[0].dtype == np.uint8
    ref = by_hand(tiny_generator(), batch)
    # the worker normalises with one fused multiply-subtract: a value at x.5 may round the other way
    diff = np.abs(np.stack(out).astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(out[0], batch[0])  # it did translate


def test_odd_and_small_tiles_keep_their_size(translator: CycleGANTranslator) -> None:
    full = tiles(1, seed=2, h=TILE + 6, w=TILE + 10)[0]  # not a multiple of 4: padded and cropped back
    edge = full[:30, :43].copy()
    out = translator.translate([full, edge])
    assert [o.shape for o in out] == [(TILE + 6, TILE + 10, 3), (30, 43, 3)]


def test_torchscript_and_legacy_checkpoints_load_alike(zoo: Path, translator: CycleGANTranslator) -> None:
    batch = tiles(2, seed=4)
    ref = np.stack(translator.translate(batch)).astype(int)
    for name in ("gen-ts", "gen-legacy"):
        model = create_model(load_card(zoo / name))
        try:
            assert isinstance(model, CycleGANTranslator)
            assert np.abs(np.stack(model.translate(batch)).astype(int) - ref).max() <= 1
        finally:
            model.close()


def test_wrong_architecture_and_missing_weights(zoo: Path, tmp_path: Path) -> None:
    card = ModelCard.from_dict({**gen_card(), "params": {"ngf": 16, "n_blocks": 2}}, folder=zoo / "gen")
    with pytest.raises(ModelLoadError, match="does not fit the architecture"):
        create_model(card)
    with pytest.raises(ModelLoadError, match=r"latest_net_G_A\.pth"):
        create_model(ModelCard.from_dict(gen_card(), folder=tmp_path))


def test_translation_cards_have_no_classes_and_do_not_segment(translator: CycleGANTranslator) -> None:
    assert family_class("cyclegan") is CycleGANTranslator
    assert translator.card.classes == () and translator.card.task == "image-translation"
    with pytest.raises(ModelCardError, match="translates images"):
        translator.predict(tiles(1))
    with pytest.raises(ModelCardError, match="classes"):
        ModelCard.from_dict({**gen_card(), "classes": SEG_CLASSES})
    with pytest.raises(ModelCardError, match="object_type"):  # other tasks still need classes and object type
        ModelCard.from_dict({**gen_card(), "task": "semantic-segmentation"})


# ---- pipelines -------------------------------------------------------------------------------------------


def test_pipeline_equals_translating_then_segmenting(zoo: Path, translator: CycleGANTranslator,
                                                     segmenter: Any) -> None:
    """The chain runs on the device in one forward pass, rounding the RGB between the stages as translate
    returns it, so its probabilities are those of the two stages run by hand, to float precision."""
    model = create_model(load_card(zoo / "gen-seg"))
    try:
        assert isinstance(model, Pipeline) and model.on_device
        edge = tiles(1, seed=6, h=40, w=TILE + 8)[0]
        batch = [*tiles(3, seed=5), edge]
        chained = model.predict(batch)
        by_stages = segmenter.predict(translator.translate(batch[:3]))
        # an edge tile is padded once, before the first stage, and the last stage's output cropped back
        padded = np.pad(edge, ((0, TILE - 40), (0, 0), (0, 0)), mode="reflect")
        full = segmenter.predict(translator.translate([padded]))[0]
        by_stages.append(SemanticResult(probs=full.probs[:, :40]))
        for a, b in zip(chained, by_stages, strict=True):
            assert isinstance(a, SemanticResult) and a.probs is not None and b.probs is not None
            assert a.probs.shape == b.probs.shape
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        # and not merely the segmenter on the raw tiles
        assert np.abs(segmenter.predict(batch[:1])[0].probs - chained[0].probs).max() > 1e-3
        before = model.worker.forward_passes
        model.predict_native(batch[:3])
        assert model.worker.forward_passes == before + 1  # both stages in one pass
    finally:
        model.close()


def test_pipeline_compiles_the_fused_chain_when_asked(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[Any] = []

    def fake_compile(model: Any, **kwargs: Any) -> Any:
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    card = load_card(zoo / "gen-seg")
    model = create_model(dataclasses.replace(card, params={**card.params, "compile": True}))
    try:
        assert isinstance(model, Pipeline) and model.worker.compile_shape == (4, TILE, TILE)
        for _ in range(100):
            if model.worker.compile_state != "compiling":
                break
            time.sleep(0.05)
        assert [type(m).__name__ for m in compiled] == ["Chain"]  # the chain, never the last stage alone
    finally:
        model.close()


def test_pipeline_into_a_model_with_a_head_and_gradients(zoo: Path, translator: CycleGANTranslator) -> None:
    """The last stage's head reads the input it was given (the translated, renormalised tiles) and its
    gradients flow inside the fused chain: Grad-CAM after the generator equals Grad-CAM of the translation."""
    model = create_model(load_card(zoo / "gen-cam"))
    cam = create_model(load_card(zoo / "cam"))
    try:
        assert isinstance(model, Pipeline) and model.on_device and model.worker.autograd
        batch = tiles(2, seed=12)
        for a, b in zip(model.predict(batch), cam.predict(translator.translate(batch)), strict=True):
            assert a.probs is not None and b.probs is not None
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
            assert a.probs.max() > 0
    finally:
        model.close()
        cam.close()


def test_pipeline_with_a_host_model_gives_its_instances(zoo: Path) -> None:
    """A last stage without a device worker (the built-in nucleus detector) runs on the translated tiles."""
    model = create_model(load_card(zoo / "gen-nuclei"))
    nuclei = create_model(_builtin("nuclei"))
    gen = create_model(load_card(zoo / "gen-half"))
    try:
        assert isinstance(model, Pipeline) and not model.on_device
        img = need_monuseg_tile(256)
        batch = [img[:128, :128].copy(), img[128:, 128:].copy()]
        chained = model.predict(batch)
        by_stages = nuclei.predict(gen.translate(batch))
        for a, b in zip(chained, by_stages, strict=True):
            assert isinstance(a, InstanceResult) and isinstance(b, InstanceResult)
            np.testing.assert_array_equal(a.labels, b.labels)
    finally:
        model.close()
        gen.close()


def _builtin(name: str) -> ModelCard:
    from qpbridge.cards import builtin_cards_dir

    return load_card(builtin_cards_dir() / name)


def need_monuseg_tile(size: int) -> np.ndarray:
    from qpbridge.images import read_image

    path = need_data(MONUSEG / "TCGA-21-5784-01Z-00-DX1.tif")
    img, _ = read_image(path)
    return np.ascontiguousarray(img[300:300 + size, 300:300 + size])


def test_pipeline_cards_are_checked(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="pipeline"):  # a pipeline key needs the pipeline family
        ModelCard.from_dict({**pipeline_card("x", ["gen", "seg"]), "family": "segformer-hf"})
    with pytest.raises(ModelCardError, match="pipeline"):
        ModelCard.from_dict({k: v for k, v in pipeline_card("x", ["gen", "seg"]).items() if k != "pipeline"})
    bad = {"classes": [{"name": "Other", "color": [1, 2, 3]}]}
    for stages, over, match in ((["seg", "seg"], {}, "translate images"), (["gen", "gen"], {}, "last stage"),
                                (["gen", "seg"], bad, "must describe"), (["gen", "seg"], {"mpp": 0.5}, "pixel size"),
                                (["gen", "nope"], {}, "no model card 'nope'")):
        folder = write_card(tmp_path, pipeline_card(f"p{len(list(tmp_path.iterdir()))}", stages, **over))
        # stages are looked up beside the pipeline card: give this one the zoo's
        for name in ("gen", "seg"):
            link = tmp_path / name
            if not link.exists():
                link.symlink_to(zoo / name)
        with pytest.raises(ModelCardError, match=match):
            create_model(load_card(folder))


def test_pipeline_availability_and_largest_object(zoo: Path, tmp_path: Path) -> None:
    """A pipeline is available once every stage's weights are there; an instance pipeline must plan its
    overlaps with the last stage's largest object."""
    from qpbridge.cards.stages import stage_card

    assert load_card(zoo / "gen-seg").to_wire()["available"] is True
    assert load_card(zoo / "gen-seg").to_wire()["pipeline"] == ["gen", "seg"]
    lonely = write_card(tmp_path, pipeline_card("lonely", ["gen", "seg"]))  # no stages beside it
    assert load_card(lonely).to_wire()["available"] is False
    shutil.copytree(zoo / "gen", tmp_path / "gen")
    (tmp_path / "seg").symlink_to(zoo / "seg")
    assert load_card(lonely).to_wire()["available"] is True
    assert stage_card(load_card(lonely), "nuclei").family == "builtin-nuclei"  # then the built-in cards
    assert stage_card(load_card(lonely), "../lonely/../gen").name == "gen"  # a path, from the card's folder
    (tmp_path / "gen" / "latest_net_G_A.pth").unlink()
    assert load_card(lonely).to_wire()["available"] is False
    card = {**json.loads((zoo / "gen-nuclei" / "config.json").read_text()), "name": "big", "params": {}}
    (tmp_path / "gen-half").symlink_to(zoo / "gen-half")
    with pytest.raises(ModelCardError, match="largest object"):
        create_model(load_card(write_card(tmp_path, card)))


def test_shipped_cards_name_their_weights(tmp_path: Path) -> None:
    """The cards in models/ validate, and without weights fail at load naming the path and their README."""
    from qpbridge.cards import builtin_cards_dir

    root = builtin_cards_dir()
    ihc = load_card(root / "ihc2he")
    assert ihc.family == "cyclegan" and ihc.task == "image-translation" and ihc.classes == ()
    pipe = load_card(root / "ihc2he-nuclei")
    assert pipe.pipeline == ("ihc2he", "nuclei") and pipe.to_wire()["available"] == ihc.to_wire()["available"]
    nuclei = _builtin("nuclei")
    assert (pipe.task, pipe.object_type, pipe.classes, pipe.max_object_um) == \
        (nuclei.task, nuclei.object_type, nuclei.classes, nuclei.max_object_um)
    if not ihc.to_wire()["available"]:
        with pytest.raises(ModelLoadError, match="README"):
            create_model(ihc)
        with pytest.raises(ModelLoadError, match="latest_net_G_A"):
            create_model(pipe)
    for name in ("ihc2he", "ihc2he-nuclei"):
        assert (root / name / "README.md").is_file()


# ---- server and CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_server(zoo: Path) -> Iterator[RunningServer]:
    running = start_server(zoo)
    yield running
    running.server.stop()
    running.thread.join(10)


def test_translate_op_on_real_tiles(zoo_server: RunningServer, translator: CycleGANTranslator) -> None:
    from qpbridge.client import Client
    from qpbridge.protocol import ImageInfo, TileSpec

    img = need_monuseg_tile(2 * TILE)
    specs = [(TileSpec(0, 0, TILE, TILE), img[:TILE, :TILE].copy()),
             (TileSpec(TILE, 0, TILE, 50), img[:50, TILE:].copy())]
    local = translator.translate([px for _, px in specs])
    with Client(zoo_server.address) as c:
        assert "translate" in c.hello()["capabilities"]
        for enc in ("png", "raw"):
            out = c.translate("gen", specs, ImageInfo(mpp=1.0), encoding="png", reply_encoding=enc)
            assert [o.shape for o in out] == [(TILE, TILE, 3), (50, TILE, 3)]
            for a, b in zip(out, local, strict=True):
                np.testing.assert_array_equal(a, b)  # lossless both ways, same model, same batch
        # tiles at half the model's pixel size: resampled to it, translated, and back to their own size
        half = c.translate("gen", specs, ImageInfo(mpp=0.5))
        assert [o.shape for o in half] == [(TILE, TILE, 3), (50, TILE, 3)]
        assert not np.array_equal(half[0], out[0])
        with pytest.raises(RemoteError) as info:
            c.translate("seg", specs)
        assert info.value.code == "bad_request" and "image-translation" in info.value.message
        with pytest.raises(RemoteError) as info:
            c.translate("gen-seg", specs)
        assert info.value.code == "bad_request" and "translator is 'gen'" in info.value.message
        with pytest.raises(RemoteError) as info:
            c.predict("gen", specs, ImageInfo(mpp=1.0))
        assert info.value.code == "bad_request" and "translates images" in info.value.message


def test_server_predict_with_a_pipeline_on_real_tiles(zoo_server: RunningServer) -> None:
    from qpbridge.client import Client
    from qpbridge.protocol import ImageInfo, TileSpec

    img = need_monuseg_tile(2 * TILE)
    specs = [(TileSpec(x, y, TILE, TILE), img[y:y + TILE, x:x + TILE].copy()) for y in (0, TILE) for x in (0, TILE)]
    with Client(zoo_server.address) as c:
        feats = c.predict("gen-seg", specs, ImageInfo(mpp=1.0))
    assert feats, "random weights still mark some pixels as the foreground class"
    for f in feats:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"] == {"name": "Dark", "color": [40, 40, 160]}
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 2 * TILE and g.bounds[3] <= 2 * TILE


def test_annotate_slide_with_a_pipeline(zoo: Path, tmp_path: Path) -> None:
    from qpbridge.cli import main

    rng = np.random.default_rng(3)
    img = (rng.random((150, 200, 3)) * 255).astype(np.uint8)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=1.0, levels=2)
    out = tmp_path / "out.geojson"
    rc = main(["annotate", str(slide), "--model", "gen-seg", "--models-dir", str(zoo), "-o", str(out),
               "--no-tissue-filter", "--device", "cpu", "--quiet"])
    assert rc == 0
    feats = json.loads(out.read_text())["features"]
    assert feats
    for f in feats:
        assert f["properties"]["metadata"]["qpbridge.model"] == "gen-seg"
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 200 and g.bounds[3] <= 150


def test_blending_hides_tile_seams() -> None:
    """A translator whose colours shift from tile to tile (as instance norm does): butted tiles show a step
    at every border, overlapping blended ones change gently."""
    from qpbridge.translation import tile_starts, translate_image

    calls = [0]

    def shifty(batch: Any) -> list[np.ndarray]:
        out = []
        for t in batch:
            calls[0] += 1
            out.append(np.clip(t.astype(int) + 12 * (calls[0] % 5), 0, 255).astype(np.uint8))
        return out

    flat = np.full((150, 230, 3), 100, np.uint8)
    butted = translate_image(flat, shifty, 64, 0)
    blended = translate_image(flat, shifty, 64, 24)
    assert butted.shape == blended.shape == flat.shape
    step = lambda im: int(np.abs(np.diff(im.astype(int), axis=1)).max())  # noqa: E731
    assert step(butted) >= 12
    assert step(blended) <= 4
    assert tile_starts(230, 64, 24) == [0, 40, 80, 120, 160, 166] and tile_starts(50, 64, 24) == [0]


def test_cli_translate_in_process_and_through_a_server(zoo: Path, zoo_server: RunningServer,
                                                       tmp_path: Path) -> None:
    import cv2

    from qpbridge.cli import main

    rng = np.random.default_rng(8)
    img = (rng.random((90, 150, 3)) * 255).astype(np.uint8)
    src = tmp_path / "ihc.png"
    cv2.imwrite(str(src), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    local, remote = tmp_path / "he.png", tmp_path / "he-server.png"
    assert main(["translate", str(src), "--model", "gen", "--models-dir", str(zoo), "-o", str(local),
                 "--device", "cpu"]) == 0
    assert main(["translate", str(src), "--model", "gen", "--server", zoo_server.address, "-o", str(remote)]) == 0
    a = cv2.cvtColor(cv2.imread(str(local)), cv2.COLOR_BGR2RGB)
    b = cv2.cvtColor(cv2.imread(str(remote)), cv2.COLOR_BGR2RGB)
    assert a.shape == img.shape and not np.array_equal(a, img)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same tiles and blending, batches may differ
    assert main(["translate", str(src), "--model", "seg", "--models-dir", str(zoo), "-o", str(local),
                 "--device", "cpu"]) == 1
    with pytest.raises(BadRequestError):
        from qpbridge.translation import translate_image

        translate_image(img, lambda t: list(t), 64, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_matches_cpu(zoo: Path) -> None:
    card = load_card(zoo / "gen-seg")
    gpu, cpu = create_model(card, "cuda"), create_model(card, "cpu")
    try:
        batch = tiles(4, seed=11)
        on_device = gpu.predict_native(batch, on_device=True)
        assert all(isinstance(r.probs, torch.Tensor) and r.probs.is_cuda for r in on_device)
        for a, b in zip(gpu.predict(batch), cpu.predict(batch), strict=True):
            # fp32 on both: the rounding between the stages can flip a grey level (TF32 convolutions)
            np.testing.assert_allclose(np.asarray(a.probs, np.float32), b.probs, atol=2e-2)
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_translation_matches_cpu(zoo: Path, translator: CycleGANTranslator) -> None:
    card = load_card(zoo / "gen")
    model = create_model(dataclasses.replace(card, params={**card.params, "precision": "fp16"}), "cuda")
    try:
        assert isinstance(model, CycleGANTranslator) and model.worker.precision == "fp16"
        batch = tiles(4, seed=13)
        gpu = np.stack(model.translate(batch)).astype(int)
        cpu = np.stack(translator.translate(batch)).astype(int)
        diff = np.abs(gpu - cpu)
        # fp16 weights and activations: a grey level or two, never a different image
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8
    finally:
        model.close()
