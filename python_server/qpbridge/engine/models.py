"""In-process inference: model cards + loaded models + tiles in, QuPath features out.

Used by the server (one Engine shared by all clients) and by the CLI when no server is given.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qpbridge import geometry
from qpbridge.cards import ModelCard, builtin_cards_dir, discover_cards
from qpbridge.engine.features import FeatureBuilder
from qpbridge.engine.morphology import Morphology
from qpbridge.errors import BadRequestError, MissingPixelSizeError, ModelCardError, TileError, UnknownModelError
from qpbridge.families import InstanceResult, ModelFamily, SemanticResult, TileResult, create_model
from qpbridge.protocol import ImageInfo, TileSpec

log = logging.getLogger("qpbridge")

RESAMPLE_TOLERANCE = 0.01  # tiles within 1% of the model's pixel size are used as they are


class Engine:
    """Holds the model cards and lazily loaded models; thread-safe."""

    def __init__(self, models_dir: Path | None = None, device: str = "cpu", *,
                 model_roots: list[Path] | None = None, any_model_path: bool = False,
                 compile_models: bool = False) -> None:
        """``models_dir``: cards served by name beside the built-ins. A model may also be named by the path
        of a model folder (qpbridge card or WSInfer-style): anywhere with ``any_model_path`` (the CLI),
        else only below ``model_roots`` (a server never loads files its operator did not allow).
        ``compile_models`` turns on ``torch.compile`` for every card (``params.compile``)."""
        self.device = device
        self.compile_models = compile_models
        # GPU outputs stay on the device for stitching there (only class rasters come back).
        self._on_device = device.startswith("cuda")
        self.model_roots = [r.resolve() for r in (model_roots or [])]
        self.any_model_path = any_model_path
        self.cards: dict[str, ModelCard] = discover_cards(builtin_cards_dir())
        self.builtin = set(self.cards)
        if models_dir is not None:
            if not models_dir.is_dir():
                raise ModelCardError(f"models directory {models_dir} does not exist")
            for name, card in discover_cards(models_dir).items():
                if name in self.builtin:
                    raise ModelCardError(f"{models_dir / name} would replace the built-in model '{name}'; rename it")
                self.cards[name] = card
        self._models: dict[str, ModelFamily] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def card(self, name: str) -> ModelCard:
        card = self.cards.get(name)
        if card is not None:
            return card
        if "/" in name or name.startswith((".", "~")) or "\\" in name:
            return self._card_from_path(name)
        raise UnknownModelError(
            f"unknown model '{name}'; this server has: {', '.join(sorted(self.cards))}",
            known_models=sorted(self.cards))

    def _card_from_path(self, name: str) -> ModelCard:
        from qpbridge.cards.folders import is_model_folder, load_model_folder

        path = Path(name).expanduser()
        if not self.any_model_path:
            real = path.resolve()
            if not path.is_absolute() or not any(real == r or r in real.parents for r in self.model_roots):
                where = ", ".join(str(r) for r in self.model_roots) or "nowhere (start it with --model-root DIR)"
                raise UnknownModelError(f"model path {name} is not allowed: this server loads model folders only "
                                        f"below {where}", known_models=sorted(self.cards))
        if not is_model_folder(path):
            raise UnknownModelError(f"{name} is not a model folder (config.json with a qpbridge card, or a "
                                    "WSInfer-style config.json + torchscript_model.pt)",
                                    known_models=sorted(self.cards))
        card = load_model_folder(path)
        with self._lock:
            self.cards.setdefault(name, card)
        log.info("model %s loaded from %s", card.name, path)
        return self.cards[name]

    def effective_card(self, name: str) -> ModelCard:
        """The card as the model is built from it (server-wide options applied)."""
        card = self.card(name)
        if self.compile_models and not card.params.get("compile"):
            card = dataclasses.replace(card, params={**card.params, "compile": True})
        return card

    def model(self, name: str) -> ModelFamily:
        card = self.effective_card(name)
        with self._lock:
            if name not in self._models:
                log.info("loading model %s (%s) on %s", name, card.family, self.device)
                self._models[name] = create_model(card, self.device)
                self._locks[name] = threading.Lock()
            return self._models[name]

    def check_image(self, name: str, image: ImageInfo) -> ModelCard:
        """The card, after checking that the image carries what the model needs."""
        card = self.card(name)
        if card.task == "image-translation":
            raise BadRequestError(f"model '{name}' translates images and makes no objects: use the translate op "
                                  "(qpbridge translate), or chain it before a segmentation model in a pipeline card")
        if card.requires_mpp and image.mpp is None:
            raise MissingPixelSizeError(
                f"model '{name}' works at {card.mpp} µm/px and needs the image's pixel size: set image.mpp "
                "(µm per full-resolution pixel), or --mpp on the command line")
        return card

    def infer(self, name: str, pixels: Sequence[np.ndarray], *, native: bool = True) -> list[TileResult]:
        """One batch through the model (tiles already at the card's µm/px), serialised for families that
        are not thread-safe. ``native``: semantic outputs at the model's own resolution, left on the device
        when the model runs on a GPU (for stitching); else at the tiles' size, on the host."""
        model = self.model(name)
        call = (lambda: model.predict_native(pixels, on_device=self._on_device)) if native else \
            (lambda: model.predict(pixels))
        if model.thread_safe:
            return call()
        with self._locks[name]:
            return call()

    def infer_batches(self, name: str, pixels: Sequence[np.ndarray],
                      should_stop: Callable[[], bool] | None = None, *, native: bool = True
                      ) -> Iterator[tuple[range, list[TileResult]]]:
        """``pixels`` through the model in the card's batches: (indices of the batch, results), polling
        ``should_stop`` between batches."""
        batch = max(1, self.card(name).batch_size)
        for start in range(0, len(pixels), batch):
            if should_stop is not None and should_stop():
                return
            chunk = range(start, min(start + batch, len(pixels)))
            yield chunk, self.infer(name, [pixels[i] for i in chunk], native=native)

    def predict(self, name: str, image: ImageInfo, tiles: Sequence[tuple[TileSpec, np.ndarray]],
                should_stop: Callable[[], bool] | None = None,
                on_tile: Callable[[TileSpec, list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        """Features of every tile, each on its own, in full-resolution coordinates.

        ``should_stop`` is polled between batches (cancel); ``on_tile`` gets each tile's features as soon
        as they are ready (jobs record progress with it).
        """
        card = self.check_image(name, image)
        features: list[dict[str, Any]] = []
        prepared = [self._to_model_pixels(card, image, spec, px) for spec, px in tiles]
        for chunk, results in self.infer_batches(name, [p[0] for p in prepared], should_stop, native=False):
            for i, result in zip(chunk, results, strict=True):
                spec = tiles[i][0]
                _, sx, sy = prepared[i]
                tile_features = self._features(card, image, spec, sx, sy, result)
                features.extend(tile_features)
                if on_tile is not None:
                    on_tile(spec, tile_features)
        return features

    @staticmethod
    def _to_model_pixels(card: ModelCard, image: ImageInfo, spec: TileSpec,
                         px: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The tile resampled to the card's µm/px, and the full-res size of one model pixel (x, y)."""
        if px.shape != (spec.height, spec.width, 3):
            raise TileError(f"tile at ({spec.x}, {spec.y}) has shape {px.shape}, expected "
                            f"({spec.height}, {spec.width}, 3)")
        if image.mpp is None:
            return px, spec.downsample, spec.downsample
        factor = image.mpp * spec.downsample / card.mpp  # model pixels per tile pixel
        if abs(factor - 1.0) <= RESAMPLE_TOLERANCE:
            return px, spec.downsample, spec.downsample
        import cv2

        w = max(1, round(spec.width * factor))
        h = max(1, round(spec.height * factor))
        interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(np.ascontiguousarray(px), (w, h), interpolation=interp)
        return resized, spec.width * spec.downsample / w, spec.height * spec.downsample / h

    def _features(self, card: ModelCard, image: ImageInfo, spec: TileSpec, sx: float, sy: float,
                  result: SemanticResult | InstanceResult) -> list[dict[str, Any]]:
        builder = FeatureBuilder(card, image.mpp)
        out: list[dict[str, Any]] = []
        if isinstance(result, InstanceResult):
            for label, geom in geometry.labels_to_polygons(result.labels).items():
                cls_index = result.class_of.get(label, 0)
                if card.classes[cls_index].emit:
                    f = builder.build(geom, cls_index, spec.x, spec.y, sx, sy, result.measurements.get(label))
                    if f is not None:
                        out.append(f)
            return out
        cmap = result.class_map()
        morphology = Morphology.from_card(card)
        if morphology is not None:  # the tile on its own (model pixels): its borders are the raster's
            cmap = morphology.apply(cmap)
        for cls_index, cls in enumerate(card.classes):
            if not cls.emit:
                continue
            mask = cmap == cls_index
            if not mask.any():
                continue
            for geom in geometry.mask_to_polygons(mask):
                f = builder.build(geom, cls_index, spec.x, spec.y, sx, sy)
                if f is not None:
                    out.append(f)
        return out
