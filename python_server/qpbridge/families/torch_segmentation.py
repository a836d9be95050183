"""The shared base of the torch semantic-segmentation families: HF SegFormer folders (``segformer-hf``,
in :mod:`qpbridge.families.segformer`) and TorchScript files (``torchscript-segmentation``, in
:mod:`qpbridge.families.torchscript`).

Both load the model once, hand it to a :class:`~qpbridge.families.torch_runtime.DeviceWorker` (which batches
tiles across concurrent callers on one device) and return one ``SemanticResult(probs=...)`` per tile:
softmax probabilities (C, H, W) at the tile's own size, float32 on CPU and float16 from CUDA.

``segformer-hf``
    ``card.weights`` is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), loaded with
    ``transformers.SegformerForSemanticSegmentation.from_pretrained``; the logits are ``outputs.logits``
    (a quarter of the tile size, upsampled by the worker). Default normalisation: ImageNet mean/std.
``torchscript-segmentation``
    ``card.weights`` is a ``torch.jit.save`` file (as WSInfer ships them); the module returns N x C x h x w
    logits as a tensor, or a tuple/dict whose first/``logits`` entry is one. Default normalisation: none
    (``x / 255``, as WSInfer's ``ToTensor``); cards and WSInfer ``Normalize`` transforms set mean/std.

Tile sizes. Tiles need not all have the same size within a call (edge tiles of a region are clipped).
A tile smaller than ``card.tile_size`` is padded at its bottom/right to the card's size by *reflection*
and the output is cropped back: the model always sees the input size it was trained (or traced) with,
and reflected tissue keeps the colour statistics near the border, where zero or white padding would look
like glass and bias predictions at the edge (the overlap blending discounts tile borders anyway). Larger
tiles are run at their own size. Tiles are grouped by (padded) size, one worker request per group.

Card ``params``: ``precision`` ("fp32" | "fp16" | "bf16", CUDA only; CPU runs fp32), ``max_batch``
(tiles per forward pass, default ``tile.batch_size``), ``batch_wait_ms`` (how long a part-filled batch
waits for other callers' tiles, default 2), ``channels_last`` (default true), ``compile`` (default false;
``qpbridge serve --compile`` turns it on for every card): ``torch.compile`` on full batches of the card's
tile size, compiled in the background while the eager model serves. Loading runs one blank tile through
the model, so a class count that does not match the card fails at load. On CUDA with fp16/bf16 the
weights are cast to that dtype; a model that fails so is reloaded and run under autocast, and one that
fails under autocast too runs fp32, each time with a warning.

For stitching, :meth:`TorchSegmentation.predict_native` returns the model's own output resolution
(``SemanticResult.scale`` = 4 for SegFormer), left on the GPU as a tensor when asked to.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpbridge.errors import ModelLoadError
from qpbridge.families.base import ModelFamily, SemanticResult, TileResult, card_weights
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import (
    DeviceWorker,
    Normalization,
    resolve_torch_device,
    worker_settings,
)

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

log = logging.getLogger("qpbridge")


def pad_to(tile: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tile`` padded at the bottom/right to (height, width) by reflection (no copy when already there)."""
    ph, pw = height - tile.shape[0], width - tile.shape[1]
    if ph <= 0 and pw <= 0:
        return tile
    return np.pad(tile, ((0, max(ph, 0)), (0, max(pw, 0)), (0, 0)), mode="reflect")


class TorchSegmentation(ModelFamily):
    """Shared machinery of the torch semantic-segmentation families; subclasses load the module."""

    thread_safe: ClassVar[bool] = True
    default_mean: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    default_std: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)
    weights_kind: ClassVar[str] = "weights"

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        settings = worker_settings(card, compile=True)
        precision = settings.pop("precision")
        settings["normalization"] = Normalization.from_card(card.normalization, self.default_mean, self.default_std)
        self.torch_device = resolve_torch_device(device)
        weights = card_weights(card, self.weights_kind)
        half = precision != "fp32" and self.torch_device.type == "cuda"
        # Weights cast to the card's dtype first; some (exported) models only run under autocast, or fp32.
        attempts = [(precision, "cast"), (precision, "autocast"), ("fp32", "cast")] if half else [(precision, "cast")]
        for i, (prec, mode) in enumerate(attempts):
            model = self._load(weights, self.torch_device)
            try:
                self.worker = self._start_worker(model, prec, {**settings, "weights": mode})
                break
            except ModelLoadError as exc:
                if i == len(attempts) - 1:
                    raise
                nxt = attempts[i + 1]
                log.warning("model %s failed with %s weights (%s); trying %s", card.name,
                            f"{prec} {mode}", exc, f"{nxt[0]} {nxt[1]}")

    def _start_worker(self, model: torch.nn.Module, precision: str, settings: dict[str, Any]) -> DeviceWorker:
        """A worker for ``model`` that has run one blank tile at the card's size, which checks the model's
        outputs against the card at load rather than mid-job (and warms the device up)."""
        card = self.card
        worker = DeviceWorker(model, self.torch_device, name=card.name, n_outputs=len(card.classes),
                              precision=precision, **settings)
        worker.warm_up(card.tile_size)
        return worker

    @abstractmethod
    def _load(self, weights: Path, device: torch.device) -> torch.nn.Module:
        """The model from its weights, on ``device``, in eval mode."""

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        size = self.card.tile_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(checked):
            groups.setdefault((max(t.shape[0], size), max(t.shape[1], size)), []).append(i)
        futures = [(idx, self.worker.submit(np.stack([pad_to(checked[i], h, w) for i in idx])))
                   for (h, w), idx in groups.items()]
        results: list[TileResult | None] = [None] * len(checked)
        for idx, fut in futures:
            probs = fut.result()
            for j, i in enumerate(idx):
                h, w = checked[i].shape[:2]
                p = probs[j]
                if p.shape[1:] != (h, w):
                    p = np.ascontiguousarray(p[:, :h, :w])
                results[i] = SemanticResult(probs=p)
        return [r for r in results if r is not None]

    def predict_native(self, tiles: Sequence[np.ndarray], *, on_device: bool = False) -> list[TileResult]:
        """Probabilities at the model's own output resolution (``scale`` = input / output size when the input
        is a whole multiple of it), as tensors on the GPU with ``on_device``, for the stitcher."""
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        size = self.card.tile_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(checked):
            groups.setdefault((max(t.shape[0], size), max(t.shape[1], size)), []).append(i)
        # On CUDA the tiles go to the worker as a list, copied once into its pinned buffer (no stacked copy).
        as_list = self.torch_device.type == "cuda"
        futures = []
        for (h, w), idx in groups.items():
            padded = [pad_to(checked[i], h, w) for i in idx]
            futures.append(((h, w), idx, self.worker.submit(padded if as_list else np.stack(padded), native=True,
                                                            on_device=on_device)))
        results: list[TileResult | None] = [None] * len(checked)
        for (h, _), idx, fut in futures:
            probs = fut.result()
            scale = h // int(probs.shape[-2])
            for j, i in enumerate(idx):
                th, tw = checked[i].shape[:2]
                oh, ow = -(-th // scale), -(-tw // scale)
                p = probs[j]
                if tuple(p.shape[1:]) != (oh, ow):
                    results[i] = SemanticResult(probs=p[:, :oh, :ow], scale=scale)
                else:
                    results[i] = SemanticResult(probs=p, scale=scale, batch=(probs, j) if on_device else None)
        return [r for r in results if r is not None]

    def device_busy_s(self) -> float | None:
        return self.worker.device_busy_s()

    def close(self) -> None:
        """Stop the device worker and release the model."""
        self.worker.close()
