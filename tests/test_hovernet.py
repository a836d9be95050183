"""The hovernet family: HoVer-Net's post-processing, its state-dict and TorchScript forms through cards, a real
server on real MoNuSeg tiles, and ``annotate`` on a generated slide with nuclei on tile seams."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from shapely.geometry import shape
from torch import nn
from torch.nn import functional as F

from conftest import MONUSEG, RunningServer, need_data, write_pyramid
from qpbridge.cards import load_card
from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families import InstanceResult, create_model
from qpbridge.families.hovernet import PROBABILITY, HoverNetFamily, hovernet_card_dict
from qpbridge.families.hovernet_net import HoverArch, HoverNet
from qpbridge.families.hovernet_post import HoverPostParams, hover_instances, instance_types
from qpbridge.training.targets import hv_maps

MPP = 0.25
TINY_ARCH = {"width": 4, "levels": 3, "blocks": 1}


def discs(shape_hw: tuple[int, int], centres: list[tuple[float, float]], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape_hw[0], : shape_hw[1]]
    labels = np.zeros(shape_hw, dtype=np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---- post-processing -----------------------------------------------------------------------------------


def test_touching_discs_are_split_by_ideal_hv_maps() -> None:
    """Three discs in a row, each touching the next, are one foreground piece; the HV maps split them."""
    truth = discs((96, 160), [(48, 40), (48, 76), (50, 112)], 19)
    fg = truth > 0
    from scipy import ndimage as ndi

    assert ndi.label(fg)[1] == 1, "the discs touch: one connected piece"
    labels = hover_instances(fg.astype(np.float32), hv_maps(truth), MPP, HoverPostParams())
    assert labels.max() == 3
    for i in range(1, 4):
        best = max(iou(truth == i, labels == j) for j in range(1, 4))
        assert best > 0.9, f"disc {i} recovered with IoU {best:.2f}"


def test_hv_targets_point_away_from_the_centre() -> None:
    truth = discs((64, 64), [(32, 30)], 12)
    hv = hv_maps(truth)
    assert hv.min() == -1.0 and hv.max() == 1.0
    assert hv[0, 32, 20] < 0 < hv[0, 32, 40] and hv[1, 22, 30] < 0 < hv[1, 42, 30]
    assert not hv[:, truth == 0].any()


def test_dihedral_transforms_keep_hv_targets_exact() -> None:
    """Flipping or rotating the HV maps with their pixels gives the maps of the flipped or rotated labels."""
    from qpbridge.training.augment import dihedral

    truth = discs((48, 64), [(20, 18), (30, 44)], 9) + 0
    truth[5:9, 50:60] = 3  # not symmetric
    hv = torch.from_numpy(hv_maps(truth))
    for code in range(8):
        out = dihedral({"labels": torch.from_numpy(truth), "hv": hv}, code)
        expected = hv_maps(np.ascontiguousarray(out["labels"].numpy()))
        np.testing.assert_allclose(out["hv"].numpy(), expected, atol=1e-6, err_msg=f"code {code}")


def test_types_by_majority_vote() -> None:
    labels = np.zeros((4, 6), dtype=np.int32)
    labels[:, :3], labels[:, 3:] = 1, 2
    types = np.zeros((4, 6), dtype=np.uint8)
    types[:, 0], types[:, 1:3] = 2, 4  # nucleus 1: 4 px of type 2, 8 of type 4
    types[:3, 3:] = 1  # nucleus 2: 9 px of type 1, 3 background
    assert instance_types(labels, types, 5) == {1: 4, 2: 1}


def test_post_params_are_checked() -> None:
    with pytest.raises(ModelCardError, match="sobel"):
        HoverPostParams.from_params({"post": {"sobel": 3}})
    with pytest.raises(ModelCardError, match="np_threshold"):
        HoverPostParams.from_params({"post": {"np_threshold": -1}})
    with pytest.raises(ModelCardError, match="width"):
        HoverArch.from_params({"arch": {"width": 0}})


# ---- cards, weights formats ----------------------------------------------------------------------------


class DiscOracle(nn.Module):
    """A HoVer-layout model for tests that knows the answer for isolated dark nuclei: NP = dark pixels, HV = the
    offset to the centroid of the dark pixels within ``window`` px (right while nuclei are ``window`` apart)."""

    def __init__(self, window: int = 41, radius: float = 10.0) -> None:
        super().__init__()
        self.window = window
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        m = (x.mean(dim=1, keepdim=True) < 0.5).float()
        xs = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        ys = torch.arange(h, dtype=torch.float32, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        k = self.window
        s = F.avg_pool2d(m, k, stride=1, padding=k // 2).clamp_min(1e-6)
        cx = F.avg_pool2d(m * xs, k, stride=1, padding=k // 2) / s
        cy = F.avg_pool2d(m * ys, k, stride=1, padding=k // 2) / s
        hmap = ((xs - cx) / self.radius).clamp(-1.0, 1.0) * m
        vmap = ((ys - cy) / self.radius).clamp(-1.0, 1.0) * m
        logit = (m * 2.0 - 1.0) * 8.0
        return torch.cat([-logit, logit, hmap, vmap], dim=1)


def write_card(folder: Path, **kwargs: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hovernet_card_dict(folder.name, **kwargs)))  # type: ignore[arg-type]
    return folder


@pytest.fixture(scope="module")
def oracle_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_card(tmp_path_factory.mktemp("m") / "oracle", tile_size=128, weights="oracle.pt",
                        fmt="torchscript", max_object_um=6.0)
    torch.jit.save(torch.jit.script(DiscOracle()), str(folder / "oracle.pt"))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_card(tmp_path_factory.mktemp("m") / "tiny-hover", tile_size=64, arch=TINY_ARCH)
    torch.manual_seed(0)
    torch.save(HoverNet(HoverArch(**TINY_ARCH)).state_dict(), str(folder / "weights.pt"))
    return folder


def test_state_dict_and_torchscript_forms_agree(tiny_folder: Path, tmp_path: Path) -> None:
    net = HoverNet(HoverArch(**TINY_ARCH))
    net.load_state_dict(torch.load(str(tiny_folder / "weights.pt"), weights_only=True))
    net.eval()
    ts = write_card(tmp_path / "tiny-ts", tile_size=64, arch=TINY_ARCH, weights="model.pt", fmt="torchscript")
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 64, 64)), str(ts / "model.pt"))
    rng = np.random.default_rng(0)
    tiles = [(rng.random((64, 64, 3)) * 255).astype(np.uint8), (rng.random((40, 50, 3)) * 255).astype(np.uint8)]
    a = create_model(load_card(tiny_folder))
    b = create_model(load_card(ts))
    try:
        assert isinstance(a, HoverNetFamily) and isinstance(b, HoverNetFamily)
        for ma, mb in zip(a.maps(tiles), b.maps(tiles), strict=True):
            np.testing.assert_allclose(ma["np"], mb["np"], atol=1e-5)
            np.testing.assert_allclose(ma["hv"], mb["hv"], atol=1e-5)
        assert a.maps(tiles)[1]["hv"].shape == (2, 40, 50)  # edge tiles padded and cropped back
    finally:
        a.close()
        b.close()


def test_weights_that_do_not_fit_the_card_fail_at_load(tiny_folder: Path, tmp_path: Path) -> None:
    wrong = write_card(tmp_path / "wrong", tile_size=64, arch={**TINY_ARCH, "width": 8})
    (wrong / "weights.pt").write_bytes((tiny_folder / "weights.pt").read_bytes())
    with pytest.raises(ModelLoadError, match="does not fit the card's arch"):
        create_model(load_card(wrong))
    typed = write_card(tmp_path / "typed", tile_size=64, arch=TINY_ARCH, n_types=5, weights="m.pt",
                       fmt="torchscript")
    torch.jit.save(torch.jit.script(DiscOracle()), str(typed / "m.pt"))
    with pytest.raises(ModelLoadError, match="needs N x 10 x H x W"):
        create_model(load_card(typed))
    missing = write_card(tmp_path / "missing", tile_size=64, arch=TINY_ARCH)
    with pytest.raises(ModelLoadError, match=r"weights\.pt"):
        create_model(load_card(missing))


def test_types_become_pannuke_classes(tmp_path: Path) -> None:
    card = hovernet_card_dict("typed", n_types=5)
    assert [c["name"] for c in card["classes"]] == ["Neoplastic", "Inflammatory", "Connective", "Dead",
                                                     "Epithelial"]
    folder = write_card(tmp_path / "typed", tile_size=64, arch=TINY_ARCH, n_types=5)
    torch.save(HoverNet(HoverArch(**TINY_ARCH, n_types=5)).state_dict(), str(folder / "weights.pt"))
    model = create_model(load_card(folder))
    try:
        assert isinstance(model, HoverNetFamily)
        labels = discs((64, 64), [(20, 20), (44, 44)], 8)
        maps = {"np": (labels > 0).astype(np.float32), "hv": hv_maps(labels),
                "tp": np.where(labels == 1, 3, np.where(labels == 2, 5, 0)).astype(np.uint8)}
        result = model.postprocess(maps)
        by_centre = {int(result.labels[20, 20]): 2, int(result.labels[44, 44]): 4}  # type t -> classes[t - 1]
        assert result.class_of == by_centre
    finally:
        model.close()


# ---- engine, server, annotate ---------------------------------------------------------------------------


def slide_with_discs(radius: int = 10, spacing: int = 64, size: int = 384) -> tuple[np.ndarray, list[tuple[int, int]]]:
    img = np.full((size, size, 3), (235, 170, 200), dtype=np.uint8)
    centres = [(y, x) for y in range(spacing // 2 - 5, size - radius, spacing)
               for x in range(spacing // 2 + 7, size - radius, spacing)]
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = (80, 55, 135)
    return img, centres


def test_annotate_keeps_seam_nuclei_once(oracle_folder: Path, tmp_path: Path) -> None:
    """Every nucleus of a generated slide once, those on tile seams included, with its class and measurement."""
    from qpbridge.cli import main

    img, centres = slide_with_discs()
    slide = write_pyramid(tmp_path / "discs.tif", img, mpp=MPP, levels=1)
    card = load_card(oracle_folder)
    stride = card.tile_size - card.plan_overlap
    borders = [card.plan_overlap / 2 + k * stride for k in range(1, 6)]  # where one tile's core ends
    assert any(min(abs(cx - b) for b in borders) <= 2 for _, cx in centres), "some discs lie on a seam"
    out = tmp_path / "out.geojson"
    rc = main(["annotate", str(slide), "--model", str(oracle_folder), "-o", str(out), "--no-tissue-filter",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == len(centres)
    found = []
    for f in feats:
        g = shape(f["geometry"])
        assert g.is_valid and f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Nucleus"
        assert f["properties"]["measurements"][PROBABILITY] > 0.99
        found.append((g.centroid.y, g.centroid.x))
    for cy, cx in centres:
        d = min(np.hypot(fy - cy, fx - cx) for fy, fx in found)
        assert d < 1.5, f"disc at ({cy}, {cx}) found {d:.1f} px away"


def test_real_server_on_monuseg_tiles(oracle_folder: Path, tiny_folder: Path) -> None:
    """Both weight formats served by name from a models folder, on real MoNuSeg pixels at their pixel size."""
    import cv2

    from qpbridge.client import Client
    from qpbridge.engine import Engine
    from qpbridge.protocol import ImageInfo, TileSpec
    from qpbridge.server import Server

    image = need_data(MONUSEG / "TCGA-21-5784-01Z-00-DX1.tif")
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    tiles = [(TileSpec(x, 0, 128, 128), np.ascontiguousarray(rgb[:128, x:x + 128])) for x in (0, 128)]
    assert oracle_folder.parent != tiny_folder.parent
    server = Server(Engine(None, model_roots=[oracle_folder.parent, tiny_folder.parent]), "tcp://127.0.0.1:*")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    running = RunningServer(server, thread)
    try:
        with Client(running.address) as c:
            for folder in (oracle_folder, tiny_folder):
                feats = c.predict(str(folder), tiles, ImageInfo(name=image.name, mpp=0.2527))
                for f in feats:
                    g = shape(f["geometry"])
                    assert g.is_valid and g.bounds[0] >= 0 and g.bounds[2] <= 256 and g.bounds[3] <= 128
                    assert f["properties"]["objectType"] == "detection"
                if folder is oracle_folder:
                    assert len(feats) >= 5, "dark nuclei of a real H&E tile"
    finally:
        running.server.stop()
        running.thread.join(10)


def test_postprocessing_runs_tiles_in_parallel(oracle_folder: Path) -> None:
    """Several tiles are post-processed on the shared pool and give the same results as one by one."""
    model = create_model(load_card(oracle_folder))
    try:
        img, _ = slide_with_discs(size=256)
        tiles = [np.ascontiguousarray(img[y:y + 128, x:x + 128]) for y in (0, 128) for x in (0, 128)]
        together = model.predict(tiles)
        alone = [model.predict([t])[0] for t in tiles]
        for a, b in zip(together, alone, strict=True):
            assert isinstance(a, InstanceResult) and isinstance(b, InstanceResult)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert a.labels.max() >= 2
    finally:
        model.close()


def test_fill_holes_matches_scipy() -> None:
    from scipy import ndimage as ndi

    from qpbridge.families.hovernet_post import fill_holes

    rng = np.random.default_rng(0)
    for i in range(10):
        mask = rng.random((40, 56)) < 0.4 + 0.04 * i
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


@pytest.mark.gpu
def test_cuda_fp16_maps_match_cpu(tiny_folder: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(1)
    tiles = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(3)]
    cpu = create_model(load_card(tiny_folder))
    gpu = create_model(load_card(tiny_folder), "cuda")
    try:
        assert isinstance(cpu, HoverNetFamily) and isinstance(gpu, HoverNetFamily)
        for a, b in zip(gpu.maps(tiles), cpu.maps(tiles), strict=True):
            assert a["np"].dtype == np.float16
            np.testing.assert_allclose(a["np"].astype(np.float32), b["np"], atol=2e-2)
            np.testing.assert_allclose(a["hv"].astype(np.float32), b["hv"], atol=2e-2)
    finally:
        cpu.close()
        gpu.close()


def test_pipeline_into_hovernet_runs_on_the_device(tmp_path: Path) -> None:
    """``"pipeline": [generator, hovernet]``: one fused forward pass; the nuclei equal translating the tiles and
    running the hovernet model on them by hand."""
    from qpbridge.families.cyclegan import CycleGANTranslator
    from qpbridge.families.pipeline import Pipeline
    from test_cyclegan import gen_card, pipeline_card, tiny_generator
    from test_cyclegan import write_card as write_json_card

    gen = write_json_card(tmp_path, gen_card("gen", mpp=MPP))
    torch.save(tiny_generator().state_dict(), gen / "latest_net_G_A.pth")
    hover = write_card(tmp_path / "hover", tile_size=64, arch=TINY_ARCH, max_object_um=4.0)
    torch.manual_seed(3)
    torch.save(HoverNet(HoverArch(**TINY_ARCH)).state_dict(), str(hover / "weights.pt"))
    classes = [{"name": "Nucleus", "color": [30, 60, 200]}]
    write_json_card(tmp_path, pipeline_card("gen-hover", ["gen", "hover"], task="instance-segmentation",
                                            object_type="detection", classes=classes, mpp=MPP,
                                            params={"max_object_um": 4.0, "tissue_filter": False}))
    chained = create_model(load_card(tmp_path / "gen-hover"))
    translator = create_model(load_card(gen))
    alone = create_model(load_card(hover))
    try:
        assert isinstance(chained, Pipeline) and chained.on_device
        assert isinstance(translator, CycleGANTranslator) and isinstance(alone, HoverNetFamily)
        rng = np.random.default_rng(4)
        batch = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(2)]
        by_hand = alone.maps(translator.translate(batch))
        assert isinstance(chained.final, HoverNetFamily)
        for a, b in zip(chained.final.maps(batch), by_hand, strict=True):
            np.testing.assert_allclose(a["np"], b["np"], atol=1e-5)
            np.testing.assert_allclose(a["hv"], b["hv"], atol=1e-5)
        for a, b in zip(chained.predict(batch), alone.predict(translator.translate(batch)), strict=True):
            assert isinstance(a, InstanceResult) and isinstance(b, InstanceResult)
            np.testing.assert_array_equal(a.labels, b.labels)
    finally:
        chained.close()
        translator.close()
        alone.close()


@pytest.mark.slow
def test_shipped_monuseg_model_beats_the_builtin_nuclei_on_a_held_out_image(tmp_path: Path) -> None:
    """The shipped hovernet-monuseg weights, through `qpbridge evaluate` as a user runs it, on one of the images
    held out from its training: better PQ and AJI than the built-in `nuclei` model."""
    from qpbridge.cli import main

    name = "TCGA-B0-5710-01Z-00-DX1"
    for ext in (".tif", ".xml"):
        (tmp_path / f"{name}{ext}").symlink_to(need_data(MONUSEG / f"{name}{ext}"))
    repo = Path(__file__).resolve().parents[1]
    folder = repo / "models" / "hovernet-monuseg"
    assert (folder / "weights.pt").stat().st_size < 25 * 2 ** 20
    split = json.loads((folder / "training.json").read_text(encoding="utf-8"))["split"]
    assert name in split["val"] and name not in split["train"]
    scores = {}
    for model in ("nuclei", str(folder)):
        out = tmp_path / f"{Path(model).name}.json"
        assert main(["evaluate", "--model", model, "--data", str(tmp_path), "--mpp", "0.25", "--device", "cpu",
                     "-o", str(out)]) == 0
        scores[model] = json.loads(out.read_text(encoding="utf-8"))
    trained, builtin = scores[str(folder)], scores["nuclei"]
    assert trained["pq"] > builtin["pq"] + 0.05 and trained["aji"] > builtin["aji"] + 0.05
    assert trained["pq"] > 0.55
