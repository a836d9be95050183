"""SegFormer / TorchScript segmentation families, the batching device worker and model folders.

Every model here is a tiny randomly initialised SegFormer saved and loaded through the real code paths
(``save_pretrained`` folder, ``torch.jit.save`` file in a WSInfer-style folder).
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from qpbridge.cards import ModelCard, is_model_folder, load_card, load_model_folder, sanitize_name  # noqa: E402
from qpbridge.errors import ModelCardError, ModelLoadError, TileError  # noqa: E402
from qpbridge.families import SemanticResult, create_model, family_class  # noqa: E402
from qpbridge.families.segformer import SegformerHF  # noqa: E402
from qpbridge.families.torch_runtime import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceWorker,
    Normalization,
    resolve_torch_device,
)
from qpbridge.families.torch_segmentation import TorchSegmentation  # noqa: E402
from qpbridge.families.torchscript import TorchScriptSegmentation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TILE = 64
CLASSES = [
    {"name": "Background", "color": [255, 255, 255], "emit": False},
    {"name": "Lobule", "color": [222, 120, 160]},
    {"name": "Portal tract", "color": [30, 110, 220]},
]


def tiny_segformer(num_labels: int = 3) -> Any:
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        num_encoder_blocks=4, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], decoder_hidden_size=16,
        num_labels=num_labels, num_attention_heads=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1])
    return transformers.SegformerForSemanticSegmentation(config).eval()


class LogitsOnly(torch.nn.Module):
    """What a TorchScript export traces: pixel values in, logits tensor out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(pixel_values=x).logits


def card_dict(name: str = "tiny", **over: Any) -> dict[str, Any]:
    card = {
        "schema_version": 1, "name": name, "family": "segformer-hf", "task": "semantic-segmentation",
        "object_type": "annotation", "classes": CLASSES,
        "tile": {"size": TILE, "overlap": 16, "batch_size": 8}, "mpp": 1.0,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "params": {"precision": "fp16"}, "weights": "weights",
    }
    card.update(over)
    return card


def tiles(n: int, seed: int = 0, h: int = TILE, w: int = TILE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def probs_of(results: list[Any]) -> np.ndarray:
    assert all(isinstance(r, SemanticResult) and r.probs is not None for r in results)
    return np.stack([r.probs for r in results])


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A card folder with a tiny SegFormer saved by save_pretrained in weights/."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_segformer().save_pretrained(root / "weights")
    (root / "config.json").write_text(json.dumps(card_dict()))
    return root


@pytest.fixture(scope="module")
def hf_model(hf_root: Path) -> Iterator[TorchSegmentation]:
    model = create_model(load_card(hf_root), "cpu")
    assert isinstance(model, SegformerHF)
    yield model
    model.close()


@pytest.fixture(scope="module")
def wsinfer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights traced to TorchScript, in a WSInfer-style folder."""
    folder = tmp_path_factory.mktemp("wsinfer") / "tiny seg (v1)"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(LogitsOnly(tiny_segformer()).eval(), torch.rand(2, 3, TILE, TILE),
                                 check_trace=False)
        torch.jit.save(traced, str(folder / "torchscript_model.pt"))
    (folder / "config.json").write_text(json.dumps({
        "spec_version": "1.0", "architecture": "segformer-tiny", "num_classes": 3,
        "class_names": ["Background", "Lobule", "Portal tract"],
        "patch_size_pixels": TILE, "spacing_um_px": 1.0,
        "transform": [{"name": "Resize", "arguments": {"size": TILE}}, {"name": "ToTensor"},
                      {"name": "Normalize", "arguments": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}],
    }))
    return folder


def reference_probs(batch: list[np.ndarray]) -> np.ndarray:
    """The HF model run by hand: ImageNet normalisation, logits upsampled bilinearly, softmax."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = tiny_segformer()(pixel_values=x).logits
    logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1).numpy()


# ---- the HF family ---------------------------------------------------------------------------------


def test_hf_predict_gives_probabilities_at_tile_size(hf_model: TorchSegmentation) -> None:
    batch = tiles(3)
    probs = probs_of(hf_model.predict(batch))
    assert probs.shape == (3, 3, TILE, TILE)
    assert probs.dtype == np.float32  # CPU: float32 (CUDA gives float16)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference_probs(batch), atol=1e-5)
    assert hf_model.worker.precision == "fp32"  # fp16 asked for, but CPU runs fp32


def test_family_registered_lazily() -> None:
    assert family_class("segformer-hf") is SegformerHF
    assert family_class("torchscript-segmentation") is TorchScriptSegmentation


def test_edge_tiles_of_other_sizes(hf_model: TorchSegmentation) -> None:
    full = tiles(1, seed=3)[0]
    edge = full[:40, :23].copy()
    tiny = full[:1, :1].copy()
    big = tiles(1, seed=4, h=TILE + 32, w=TILE + 32)[0]
    results = hf_model.predict([full, edge, tiny, big])
    shapes = [r.probs.shape for r in results]
    assert shapes == [(3, TILE, TILE), (3, 40, 23), (3, 1, 1), (3, TILE + 32, TILE + 32)]
    for r in results:
        np.testing.assert_allclose(r.probs.sum(axis=0), 1.0, atol=1e-5)
    # an edge tile is the reflection-padded full-size tile, cropped back
    padded = np.pad(edge, ((0, TILE - 40), (0, TILE - 23), (0, 0)), mode="reflect")
    np.testing.assert_allclose(results[1].probs, hf_model.predict([padded])[0].probs[:, :40, :23], atol=1e-5)


def test_bad_tiles_are_tile_errors(hf_model: TorchSegmentation) -> None:
    with pytest.raises(TileError):
        hf_model.predict([np.zeros((TILE, TILE, 3), dtype=np.float32)])
    with pytest.raises(TileError):
        hf_model.predict([np.zeros((TILE, TILE), dtype=np.uint8)])
    assert hf_model.predict([]) == []


def test_concurrent_callers_share_forward_passes(hf_root: Path, hf_model: TorchSegmentation) -> None:
    data = card_dict(params={"batch_wait_ms": 500})  # a part-filled batch waits for the others' tiles
    model = create_model(ModelCard.from_dict(data, folder=hf_root), "cpu")
    assert isinstance(model, TorchSegmentation)
    try:
        inputs = [tiles(2, seed=10 + i) for i in range(4)]  # 4 callers x 2 tiles = one batch of 8
        expected = [probs_of(hf_model.predict(batch)) for batch in inputs]
        before = model.worker.forward_passes
        barrier = threading.Barrier(4)
        got: list[np.ndarray | None] = [None] * 4

        def call(i: int) -> None:
            barrier.wait()
            got[i] = probs_of(model.predict(inputs[i]))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i, result in enumerate(got):
            assert result is not None
            np.testing.assert_allclose(result, expected[i], atol=1e-5)
        assert model.worker.forward_passes - before < 4
        assert model.worker.tiles_processed >= 8
    finally:
        model.close()


def test_missing_weights_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("put the weights in weights/\n")
    card = ModelCard.from_dict(card_dict(), folder=tmp_path)
    with pytest.raises(ModelLoadError) as info:
        create_model(card, "cpu")
    assert str(tmp_path / "weights") in str(info.value)
    assert "README.md" in str(info.value)
    ts = ModelCard.from_dict(card_dict(family="torchscript-segmentation", weights="model.pt"), folder=tmp_path)
    with pytest.raises(ModelLoadError, match=r"model\.pt"):
        create_model(ts, "cpu")


def test_wrong_class_count(hf_root: Path, wsinfer_folder: Path) -> None:
    two = card_dict(classes=CLASSES[:2])
    with pytest.raises(ModelLoadError, match="3 labels but the card lists 2 classes"):
        create_model(ModelCard.from_dict(two, folder=hf_root), "cpu")
    four = card_dict(family="torchscript-segmentation", weights="torchscript_model.pt",
                     classes=[*CLASSES, {"name": "Extra", "color": [1, 2, 3]}])
    with pytest.raises(ModelLoadError, match="outputs 3 channels but its card lists 4 classes"):
        create_model(ModelCard.from_dict(four, folder=wsinfer_folder), "cpu")


def test_not_torchscript_is_a_load_error(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(1)}, tmp_path / "state.pt")
    card = ModelCard.from_dict(card_dict(family="torchscript-segmentation", weights="state.pt"), folder=tmp_path)
    with pytest.raises(ModelLoadError, match="TorchScript"):
        create_model(card, "cpu")


def test_bad_precision_is_a_card_error(hf_root: Path) -> None:
    card = ModelCard.from_dict(card_dict(params={"precision": "fp8"}), folder=hf_root)
    with pytest.raises(ModelCardError, match="precision"):
        create_model(card, "cpu")


# ---- TorchScript through a WSInfer-style folder ------------------------------------------------------


def test_wsinfer_folder_matches_hf(wsinfer_folder: Path, hf_model: TorchSegmentation) -> None:
    assert is_model_folder(wsinfer_folder)
    card = load_model_folder(wsinfer_folder)
    assert card.family == "torchscript-segmentation"
    assert card.task == "semantic-segmentation" and card.object_type == "annotation"
    assert card.name == "tiny-seg-v1"
    assert (card.tile_size, card.overlap, card.mpp) == (TILE, TILE // 4, 1.0)
    assert card.normalization["mean"] == pytest.approx(IMAGENET_MEAN)
    assert card.params["precision"] == "fp16"
    assert [c.emit for c in card.classes] == [False, True, True]
    assert card.weights == wsinfer_folder / "torchscript_model.pt"
    model = create_model(card, "cpu")
    assert isinstance(model, TorchScriptSegmentation)
    try:
        batch = [*tiles(3, seed=5), tiles(1, seed=6, h=50, w=TILE)[0]]
        ts = model.predict(batch)
        hf = hf_model.predict(batch)
        for a, b in zip(ts, hf, strict=True):
            assert a.probs.shape == b.probs.shape
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)
    finally:
        model.close()


def test_model_folder_conversion_details(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    config: dict[str, Any] = {"spacing_um_px": 0.5, "patch_size_pixels": 512, "class_names": ["bg", "Tumour"],
                              "class_hexadecimals": ["#000000", "ff0000"],
                              "transform": [{"name": "Resize", "arguments": {"size": 256}}, {"name": "ToTensor"}]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "weights.pth").write_bytes(b"")
    card = load_model_folder(folder)
    assert (card.tile_size, card.mpp, card.overlap) == (256, 1.0, 64)  # a Resize halves the pixel count
    assert [(c.name, c.color, c.emit) for c in card.classes] == [("bg", (0, 0, 0), False),
                                                                   ("Tumour", (255, 0, 0), True)]
    assert card.weights == folder / "weights.pth"  # the only model file, when torchscript_model.pt is absent
    assert card.normalization == {"scale": 255.0}
    assert load_model_folder(folder / "config.json").name == "m"

    for broken, message in [
        ({k: v for k, v in config.items() if k != "spacing_um_px"}, "spacing_um_px"),
        ({**config, "patch_size_pixels": "big"}, "patch_size_pixels"),
        ({**config, "class_names": []}, "class_names"),
        ({**config, "class_hexadecimals": ["#000000"]}, "class_hexadecimals"),
        ({**config, "class_hexadecimals": ["#000000", "red"]}, "RRGGBB"),
        ({**config, "num_classes": 5}, "num_classes"),
        ({**config, "transform": [{"name": "CenterCrop", "arguments": {"size": 224}}]}, "CenterCrop"),
        ({k: v for k, v in config.items() if k != "class_hexadecimals"} | {"class_names": ["Background"]},
         "background"),
    ]:
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ModelCardError, match=message):
            load_model_folder(folder)


def test_is_model_folder_and_names(tmp_path: Path, hf_root: Path) -> None:
    assert is_model_folder(hf_root) and load_model_folder(hf_root).family == "segformer-hf"
    assert not is_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_model_folder(tmp_path)
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_model_folder(tmp_path)
    with pytest.raises(ModelCardError, match="does not exist"):
        load_model_folder(tmp_path / "absent")
    assert sanitize_name("HOTSPoT v2 (traced)") == "HOTSPoT-v2-traced"
    assert sanitize_name("__x") == "x" and sanitize_name("???") == "model"
    assert len(sanitize_name("a" * 100)) == 64


def test_hotspot_card_validates() -> None:
    card = load_card(REPO / "models" / "hotspot")
    assert card.name == "hotspot" and card.family == "segformer-hf"
    assert [c.name for c in card.classes] == ["Background", "Lobule", "Portal tract"]
    assert [c.emit for c in card.classes] == [False, True, True]
    assert (card.tile_size, card.overlap, card.batch_size, card.mpp) == (256, 64, 64, 1.0)
    assert card.weights == REPO / "models" / "hotspot" / "weights"
    if not (card.weights / "config.json").is_file():
        with pytest.raises(ModelLoadError, match="README"):
            create_model(card, "cpu")


# ---- the device worker on its own --------------------------------------------------------------------


class Flaky(torch.nn.Module):
    """Two logit channels at half resolution; fails on 48 px inputs, returns a dict like HF models."""

    def forward(self, x: Any) -> Any:
        if x.shape[-1] == 48:
            raise RuntimeError("boom")
        g = x.mean(dim=1, keepdim=True)[:, :, ::2, ::2]
        return {"logits": torch.cat([g, -g], dim=1)}


def test_worker_splits_joins_and_survives_errors() -> None:
    with DeviceWorker(Flaky(), torch.device("cpu"), name="flaky", n_outputs=2, max_batch=4,
                      normalization=Normalization(), max_wait_s=0.0) as worker:
        batch = np.stack(tiles(10, seed=7, h=32, w=32))
        out = worker.run(batch)
        assert out.shape == (10, 2, 32, 32) and out.dtype == np.float32
        assert worker.forward_passes == 3  # 4 + 4 + 2
        np.testing.assert_allclose(out[7:8], worker.run(batch[7:8]), atol=1e-6)
        with pytest.raises(ModelLoadError, match=r"flaky' failed on a batch of 2 tiles of 48x48 px.*boom"):
            worker.run(np.stack(tiles(2, h=48, w=48)))
        assert worker.run(batch[:1]).shape == (1, 2, 32, 32)  # still serving
        with pytest.raises(TileError):
            worker.submit(np.zeros((1, 8, 8), dtype=np.uint8))
        assert worker.run(batch[:0]).shape == (0, 2, 32, 32)
        frozen = np.frombuffer(batch[:2].tobytes(), dtype=np.uint8).reshape(2, 32, 32, 3)  # as zmq frames are
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_allclose(worker.run(frozen), out[:2], atol=1e-6)
    with pytest.raises(ModelLoadError, match="closed"):
        worker.submit(batch[:1])


def test_worker_head_gives_named_outputs_per_caller() -> None:
    """A family's head turns the raw output into named tensors; callers get their own rows of each, also
    when a batch above max_batch is split and joined, and autograd lets a model take gradients itself."""

    class TwoBranch(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.mean(dim=1, keepdim=True), x.amax(dim=(1, 2, 3))

    def head(output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grey, peak = output
        return {"grey": grey[:, 0], "peak": peak, "input": x}

    batch = np.stack(tiles(5, seed=3, h=16, w=16))
    with DeviceWorker(TwoBranch(), torch.device("cpu"), name="two", max_batch=2, head=head,
                      normalization=Normalization()) as worker:
        out = worker.run(batch)
        assert set(out) == {"grey", "peak", "input"}
        assert out["grey"].shape == (5, 16, 16) and out["peak"].shape == (5,)
        np.testing.assert_allclose(out["grey"], batch.astype(np.float32).mean(axis=3) / 255.0, atol=1e-5)
        np.testing.assert_allclose(out["peak"], batch.reshape(5, -1).max(axis=1) / 255.0, atol=1e-6)
        assert worker.forward_passes == 3
        one = worker.run(batch[3:4])
        np.testing.assert_allclose(one["grey"], out["grey"][3:4], atol=1e-6)
        with pytest.raises(TileError, match="empty batch"):
            worker.run(batch[:0])

    class GradModel(torch.nn.Module):
        """d(sum of squares)/dx = 2x: only computable with gradients enabled."""

        def forward(self, x: Any) -> Any:
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((x ** 2).sum(), x)
            return g

    with DeviceWorker(GradModel(), torch.device("cpu"), name="grad", head=lambda o, x: {"g": o},
                      autograd=True) as worker:
        g = worker.run(batch[:2])["g"]
        np.testing.assert_allclose(g, 2 * batch[:2].transpose(0, 3, 1, 2).astype(np.float32) / 255.0, atol=1e-5)


def test_worker_rejects_patch_classifiers() -> None:
    class Classifier(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.mean(dim=(2, 3))

    with DeviceWorker(Classifier(), torch.device("cpu"), name="clf") as worker, \
            pytest.raises(ModelLoadError, match="patch classifier"):
        worker.run(np.zeros((1, 16, 16, 3), dtype=np.uint8))


def test_resolve_torch_device() -> None:
    assert resolve_torch_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_torch_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu(hf_root: Path, hf_model: TorchSegmentation) -> None:
    model = create_model(load_card(hf_root), "cuda")
    assert isinstance(model, TorchSegmentation)
    try:
        batch = [*tiles(5, seed=8), tiles(1, seed=9, h=TILE, w=40)[0]]
        gpu = model.predict(batch)
        cpu = hf_model.predict(batch)
        assert model.worker.precision == "fp16"
        for a, b in zip(gpu, cpu, strict=True):
            assert a.probs.dtype == np.float16 and a.probs.shape == b.probs.shape
            np.testing.assert_allclose(a.probs.astype(np.float32), b.probs, atol=2e-2)
    finally:
        model.close()


def test_annotate_slide_with_wsinfer_folder_by_path(wsinfer_folder: Path, tmp_path: Path) -> None:
    """The CLI takes a WSInfer-style folder as --model and stitches SegFormer output over a slide."""
    from conftest import write_pyramid
    from qpbridge.cli import main

    rng = np.random.default_rng(5)
    img = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, levels=2)
    out = tmp_path / "out.geojson"
    rc = main(["annotate", str(slide), "--model", str(wsinfer_folder), "-o", str(out), "--no-tissue-filter",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    feats = json.loads(out.read_text())["features"]
    assert feats, "random weights still classify some pixels as lobule or portal tract"
    names = {f["properties"]["classification"]["name"] for f in feats}
    assert names <= {"Lobule", "Portal tract"}
    assert {f["properties"]["metadata"]["qpbridge.model"] for f in feats} == {sanitize_name(wsinfer_folder.name)}
    from shapely.geometry import shape

    for f in feats:
        g = shape(f["geometry"])
        assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 400 and g.bounds[3] <= 300


def test_server_loads_model_folders_only_below_model_roots(wsinfer_folder: Path) -> None:
    from conftest import RunningServer
    from qpbridge.client import Client
    from qpbridge.engine import Engine
    from qpbridge.errors import RemoteError
    from qpbridge.protocol import ImageInfo, TileSpec
    from qpbridge.server import Server

    def serve(roots: list[Path]) -> RunningServer:
        server = Server(Engine(None, model_roots=roots), "tcp://127.0.0.1:*")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return RunningServer(server, thread)

    tile = (TileSpec(0, 0, TILE, TILE), tiles(1)[0])
    for roots, allowed in (([wsinfer_folder.parent], True), ([], False)):
        running = serve(roots)
        try:
            with Client(running.address) as c:
                if allowed:
                    feats = c.predict(str(wsinfer_folder), [tile], ImageInfo(mpp=1.0))
                    assert all(f["properties"]["objectType"] == "annotation" for f in feats)
                else:
                    with pytest.raises(RemoteError) as info:
                        c.predict(str(wsinfer_folder), [tile], ImageInfo(mpp=1.0))
                    assert info.value.code == "unknown_model" and "--model-root" in info.value.message
        finally:
            running.server.stop()
            running.thread.join(10)


# ---- native-resolution outputs, device blending, compile ------------------------------------------------


def native_reference(batch: list[np.ndarray]) -> np.ndarray:
    """The HF model by hand, without the upsampling: softmax of the quarter-size logits."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = tiny_segformer()(pixel_values=x).logits
    return torch.softmax(logits, dim=1).numpy()


def test_native_outputs_are_the_models_own_resolution(hf_model: TorchSegmentation) -> None:
    full = tiles(2, seed=21)
    edge = full[0][:40, :23].copy()
    results = hf_model.predict_native([*full, edge])
    assert all(isinstance(r, SemanticResult) and r.scale == 4 for r in results)
    assert [r.probs.shape for r in results] == [(3, TILE // 4, TILE // 4)] * 2 + [(3, 10, 6)]
    np.testing.assert_allclose(np.stack([r.probs for r in results[:2]]), native_reference(full), atol=1e-5)
    padded = np.pad(edge, ((0, TILE - 40), (0, TILE - 23), (0, 0)), mode="reflect")
    np.testing.assert_allclose(results[2].probs, native_reference([padded])[0][:, :10, :6], atol=1e-5)
    # on the CPU, "on the device" is the host: results stay numpy arrays
    assert isinstance(hf_model.predict_native(full, on_device=True)[0].probs, np.ndarray)


def test_device_blending_matches_host_blending() -> None:
    from qpbridge.engine.stitching import _DeviceBlend, _HostBlend, cosine_window

    rng = np.random.default_rng(4)
    host, dev = _HostBlend(3, 40, 50), _DeviceBlend(3, 40, 50, torch.device("cpu"))
    for y, x in ((0, 0), (0, 20), (10, 5), (16, 24)):
        probs = rng.random((3, 16, 26)).astype(np.float32)
        win = cosine_window(16, 26, 4)
        host.add(probs, host.window(win), y, x)
        dev.add(torch.from_numpy(probs), dev.window(win), y, x)
    np.testing.assert_array_equal(host.classes(30), dev.classes(30))
    host.track_weights()  # as once a tile leaves pixels to no class
    dev.track_weights()
    probs = np.zeros((3, 16, 26), np.float32)  # a tile of no class at all
    host.add(probs, host.window(win), 20, 0)
    dev.add(torch.from_numpy(probs), dev.window(win), 20, 0)
    classes = host.classes(30)
    np.testing.assert_array_equal(classes, dev.classes(30))
    assert (classes[24:30, 4:20] == 255).all() and (classes[:10, :40] != 255).all()
    for _ in range(5):  # the host ring wraps around; the device buffer is copied up
        host.shift(12)
        dev.shift(12)
        np.testing.assert_allclose(host.rows(40)[0], dev.acc.numpy(), atol=1e-6)
        np.testing.assert_allclose(host.rows(40)[1], dev.wsum.numpy(), atol=1e-6)
        probs = rng.random((3, 16, 26)).astype(np.float32)
        host.add(probs, host.window(win), 22, 7)  # across the wrap from the second shift on
        dev.add(torch.from_numpy(probs), dev.window(win), 22, 7)
        np.testing.assert_array_equal(host.classes(40), dev.classes(40))


def test_compile_is_opt_in_and_warms_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of the compiled shape switch to the compiled model once it is warm; others stay eager."""
    calls: list[tuple[int, ...]] = []
    release = threading.Event()

    def fake_compile(model: Any, **kwargs: Any) -> Any:
        def compiled(x: torch.Tensor) -> Any:
            release.wait(10)  # compiling takes a while: the eager model serves meanwhile
            calls.append(tuple(x.shape))
            return model(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    with DeviceWorker(Flaky(), torch.device("cpu"), name="c", n_outputs=2, max_wait_s=0.0,
                      compile_shape=(2, 32, 32)) as worker:
        batch = np.stack(tiles(2, seed=3, h=32, w=32))
        eager = worker.run(batch)  # served while the compile is still warming up
        assert worker.compile_state == "compiling" and calls == []
        release.set()
        for _ in range(100):
            if worker.compile_state == "ready":
                break
            threading.Event().wait(0.05)
        assert worker.compile_state == "ready" and calls == [(2, 3, 32, 32)]  # the warm-up
        np.testing.assert_allclose(worker.run(batch), eager, atol=1e-6)
        worker.run(batch[:1])
        assert calls == [(2, 3, 32, 32)] * 2  # the 1-tile batch ran eager


def test_compile_param_reaches_the_worker(hf_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    model = create_model(ModelCard.from_dict(card_dict(params={"compile": True}), folder=hf_root), "cpu")
    assert isinstance(model, TorchSegmentation)
    try:
        assert model.worker.compile_shape == (model.worker.max_batch, TILE, TILE)
        assert model.worker.compile_mode == "max-autotune"
    finally:
        model.close()
    quick = create_model(ModelCard.from_dict(card_dict(params={"compile": True, "compile_mode": "default"}),
                                             folder=hf_root), "cpu")
    assert isinstance(quick, TorchSegmentation)
    try:
        assert quick.worker.compile_mode == "default"
    finally:
        quick.close()
    with pytest.raises(ModelCardError, match="compile_mode"):  # CUDA graphs would share output memory
        create_model(ModelCard.from_dict(card_dict(params={"compile": True, "compile_mode": "reduce-overhead"}),
                                         folder=hf_root), "cpu")
    from qpbridge.engine import Engine

    engine = Engine(None, compile_models=True)  # serve --compile
    assert engine.card("tissue").params.get("compile") is None
    assert engine.effective_card("tissue").params["compile"] is True


@pytest.mark.slow
def test_real_compile_serves_eager_meanwhile_then_the_same_answers(hf_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``"compile": true`` with torch's own compiler (Inductor) on a real SegFormer: requests are answered
    by the eager model while it compiles, then by the compiled one, with the same probabilities."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, every time
    folder = tmp_path / "compiled"
    shutil.copytree(hf_root, folder)
    (folder / "config.json").write_text(json.dumps(card_dict(params={"compile": True})))
    model = create_model(load_card(folder), "cpu")
    assert isinstance(model, TorchSegmentation)
    try:
        batch = tiles(8, seed=5)  # the card's batch_size: the shape that is compiled
        eager = probs_of(model.predict(batch))
        assert model.worker.compile_state == "compiling" and model.worker.compiled_passes == 0
        deadline = time.monotonic() + 600
        while model.worker.compile_state == "compiling" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert model.worker.compile_state == "ready"
        compiled = probs_of(model.predict(batch))
        assert model.worker.compiled_passes == 1
        np.testing.assert_allclose(compiled, eager, atol=1e-4)
        probs_of(model.predict(batch[:3]))  # another shape: eager, not recompiled
        assert model.worker.compiled_passes == 1
    finally:
        model.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cast_weights_and_device_outputs(hf_root: Path, hf_model: TorchSegmentation) -> None:
    model = create_model(load_card(hf_root), "cuda")
    assert isinstance(model, TorchSegmentation)
    try:
        assert model.worker.weights == "cast" and model.worker.input_dtype == torch.float16
        batch = tiles(4, seed=12)
        on_gpu = model.predict_native(batch, on_device=True)
        assert all(isinstance(r.probs, torch.Tensor) and r.probs.is_cuda for r in on_gpu)
        # each whole tile names its row of the batch output, so the stitcher can slice runs of tiles from it
        assert [r.batch[1] for r in on_gpu if r.batch is not None] == list(range(len(batch)))
        assert all(r.batch is not None and r.batch[0][r.batch[1]].data_ptr() == r.probs.data_ptr() for r in on_gpu)
        cpu = hf_model.predict_native(batch)
        for a, b in zip(on_gpu, cpu, strict=True):
            np.testing.assert_allclose(a.probs.float().cpu().numpy(), b.probs, atol=2e-2)
        for _ in range(3):  # pinned buffers are reused without mixing results up
            host = model.predict_native(batch)
            for a, b in zip(host, cpu, strict=True):
                np.testing.assert_allclose(a.probs.astype(np.float32), b.probs, atol=2e-2)
    finally:
        model.close()


def test_cuda_graphs_are_on_by_default_for_full_batches_and_off_with_compile(hf_root: Path) -> None:
    """Cards get a CUDA graph of full batches of their tile size unless they say ``cuda_graphs: false`` or
    compile; on the CPU there is none."""
    from qpbridge.families.torch_runtime import worker_settings

    def shape(**params: Any) -> Any:
        return worker_settings(ModelCard.from_dict(card_dict(params=params), folder=hf_root), compile=True)[
            "graph_shape"]

    assert shape() == (8, TILE, TILE) and shape(max_batch=4) == (4, TILE, TILE)
    assert shape(cuda_graphs=False) is None and shape(compile=True) is None
    with pytest.raises(ModelCardError, match="cuda_graphs"):
        shape(cuda_graphs="yes")
    model = create_model(load_card(hf_root), "cpu")
    assert isinstance(model, TorchSegmentation)
    try:
        assert model.worker.graph_shape is None and model.worker.graph_state == "off"
    finally:
        model.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_full_batches_with_the_eager_results(hf_root: Path) -> None:
    """Full batches of the card's tile size replay a CUDA graph captured at the first one: the eager model's
    probabilities, results of one replay left untouched by the next, other batches eager."""
    graphed = create_model(load_card(hf_root), "cuda")
    eager = create_model(ModelCard.from_dict(card_dict(params={"precision": "fp16", "cuda_graphs": False}),
                                             folder=hf_root), "cuda")
    assert isinstance(graphed, TorchSegmentation) and isinstance(eager, TorchSegmentation)
    try:
        worker, n = graphed.worker, graphed.worker.max_batch
        assert worker.graph_shape == (n, TILE, TILE) and eager.worker.graph_state == "off"
        first = graphed.predict_native(tiles(n, seed=20), on_device=True)
        kept = [r.probs.clone() for r in first]
        assert worker.graph_state == "ready" and worker.graph_passes == 1
        for seed in (21, 22):
            batch = tiles(n, seed=seed)
            for a, b in zip(graphed.predict_native(batch), eager.predict_native(batch), strict=True):
                np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), atol=2e-3)
        assert worker.graph_passes == 3
        assert all(torch.equal(r.probs, k) for r, k in zip(first, kept, strict=True))  # not overwritten
        batch = tiles(n, seed=23)
        full = graphed.predict(batch)  # full-resolution outputs: a graph of their own
        assert worker.graph_passes == 4 and len(worker._graphs) == 2
        for a, b in zip(full, eager.predict(batch), strict=True):
            np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), atol=2e-3)
        part = tiles(n - 1, seed=24)
        for a, b in zip(graphed.predict_native(part), eager.predict_native(part), strict=True):
            np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), atol=2e-3)
        assert worker.graph_passes == 4  # a partial batch runs eagerly
    finally:
        graphed.close()
        eager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_that_cannot_be_captured_runs_eagerly() -> None:
    """A forward pass that waits for the device (a host sync) cannot be captured: the worker says why in the
    log and serves the eager model, with correct results, in the same process (a fresh one, so a broken CUDA
    context could not hide in this one)."""
    import subprocess
    import sys

    code = """
import logging, numpy as np, torch
from qpbridge.families.torch_runtime import DeviceWorker
logging.basicConfig(level=logging.WARNING)
class Syncing(torch.nn.Module):
    def forward(self, x):
        if float(x.abs().sum().item()) < 0:  # a host sync: not capturable
            raise AssertionError
        g = x.mean(dim=1, keepdim=True)
        return torch.cat([g, -g], dim=1)
rng = np.random.default_rng(0)
batch = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
with DeviceWorker(Syncing(), torch.device("cuda"), n_outputs=2, max_batch=4, max_wait_s=0.0,
                  graph_shape=(4, 32, 32)) as w, \
        DeviceWorker(Syncing(), torch.device("cuda"), n_outputs=2, max_batch=4, max_wait_s=0.0) as plain:
    for _ in range(2):
        np.testing.assert_allclose(w.run(batch).astype(np.float32), plain.run(batch).astype(np.float32), atol=1e-3)
    print("state", w.graph_state, w.graph_passes, w.forward_passes)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "state failed 0 2" in proc.stdout and "no CUDA graph" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_annotate_blends_on_the_device(wsinfer_folder: Path, tmp_path: Path) -> None:
    """A slide run on CUDA keeps the model's outputs on the GPU and blends them there; the polygons agree
    with the CPU run's."""
    import cv2
    import torch
    from shapely.geometry import shape

    from conftest import write_pyramid
    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine

    rng = np.random.default_rng(5)
    # Smooth content: a random model on pixel noise gives near-tied logits everywhere, which any rounding flips.
    img = cv2.GaussianBlur((rng.random((600, 800, 3)) * 255).astype(np.uint8), (0, 0), 12)
    img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, levels=2)
    from qpbridge.engine.session import RunOptions

    runs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare like with like
    try:
        for device in ("cpu", "cuda"):
            engine = Engine(None, device=device, any_model_path=True)
            runs[device] = annotate_slide(engine, slide, str(wsinfer_folder), tissue_filter=False,
                                          options=RunOptions(trace_process=False))
        # traced and built in processes: the same polygons as the same engine on threads
        apart = annotate_slide(engine, slide, str(wsinfer_folder), tissue_filter=False,
                               options=RunOptions(trace_process=True))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    gpu, cpu = runs["cuda"], runs["cpu"]
    assert apart.stats.extra["trace_process_cpu_s"] > 0 and len(gpu.features) > 0
    import shapely

    ua = shapely.union_all([shape(f["geometry"]) for f in apart.features])
    ub = shapely.union_all([shape(f["geometry"]) for f in gpu.features])
    assert ua.symmetric_difference(ub).area < 0.005 * ub.area  # the same regions (up to a near-tied pixel)
    assert gpu.stats.extra["blend_on"] == "device" and cpu.stats.extra["blend_on"] == "host"
    assert gpu.stats.device_s is not None and gpu.stats.device_s > 0
    area = {d: sum(shape(f["geometry"]).area for f in r.features) for d, r in runs.items()}
    assert all(shape(f["geometry"]).is_valid for f in gpu.features)
    assert area["cuda"] == pytest.approx(area["cpu"], rel=0.05)
