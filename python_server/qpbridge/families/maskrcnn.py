"""``maskrcnn``: Mask R-CNN R50-FPN (torchvision's architecture) for nuclei or other objects, as instances.

``card.classes`` are the foreground classes, in the model's order (the model has one more output, the
background). ``card.weights`` is one of (``params.weights_format``, default ``auto``: told apart by the
parameter names):

``torchvision``
    a state dict of ``torchvision.models.detection.maskrcnn_resnet50_fpn(num_classes = classes + 1)``
    (``torch.save(model.state_dict())``, or a checkpoint holding it under ``model``/``state_dict``).
    Default normalisation: ImageNet mean/std on RGB / 255, as torchvision's detection models are trained.
``detectron2``
    a detectron2 ``mask_rcnn_R_50_FPN`` checkpoint (``model_final.pth`` or a model-zoo ``.pkl``), read
    without detectron2 through the key map of :mod:`qpbridge.families.detectron2_keys` (which also says which
    configs are supported and what the family does so that torchvision computes what detectron2 does).
    Default normalisation: the checkpoint's ``pixel_mean``/``pixel_std`` when it has them, else detectron2's
    defaults, converted to RGB; ``params.input_format`` is ``BGR`` (detectron2's default) or ``RGB``.

Never downloads: the model is built with ``weights=None, weights_backbone=None``. The card's
``normalization`` is applied once, by the device worker; torchvision's internal transform is told to
normalise nothing and never to resize (the card's tile size and µm/px fix the scale).

Card ``params`` (detectron2's test-time defaults in brackets): ``score_threshold`` [0.05],
``nms_threshold`` [0.5] (per class), ``mask_threshold`` [0.5], ``detections_per_image`` [100],
``rpn_pre_nms_top_n`` [1000 per level], ``rpn_post_nms_top_n`` [1000], ``rpn_nms_threshold`` [0.7];
``precision`` (CUDA: ``fp16``/``bf16`` run under autocast, box arithmetic stays fp32), ``max_batch``,
``batch_wait_ms``, ``channels_last``; ``max_object_um`` (the largest object, for the tile overlap the engine
plans: see :attr:`~qpbridge.cards.ModelCard.plan_overlap`).

Output: one :class:`~qpbridge.families.base.InstanceResult` per tile: each detection's 28 x 28 mask is pasted
into its box (bilinear sampling at pixel centres, as detectron2 pastes) and thresholded; detections are
painted in order of decreasing score, so where two overlap the pixels go to the higher score and the lower
one keeps the rest (or vanishes). ``class_of`` maps each label to its card class and the measurement
``Detection probability`` holds its score. The engine keeps each instance only in the tile whose core holds
its centroid and drops copies seen by two tiles. The batching, the copy back and the label painting run on
the device worker (:class:`~qpbridge.families.torch_runtime.DeviceWorker` with a ``head``): only label images,
classes and scores come back to the host.
"""

from __future__ import annotations

import functools
import logging
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families.base import InstanceResult, ModelFamily, TileResult, card_weights, register_family
from qpbridge.families.params import choice_param
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceWorker,
    Normalization,
    resolve_torch_device,
    worker_settings,
)
from qpbridge.families.weights import (
    load_state_dict_file,
    load_weights_strict,
    read_numpy_pickle,
    unwrap_checkpoint,
)

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

log = logging.getLogger("qpbridge")

__all__ = ["DETECTRON2_MEAN_RGB", "MaskRCNNFamily", "MaskRCNNSettings", "build_maskrcnn", "read_detectron2"]

DETECTRON2_MEAN_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)  # PIXEL_MEAN, reversed from BGR
SCORE = "Detection probability"
FORMATS = ("auto", "torchvision", "detectron2")


class MaskRCNNSettings:
    """The card's test-time settings, checked."""

    def __init__(self, params: dict[str, Any]) -> None:
        def number(key: str, default: float, lo: float, hi: float = math.inf) -> float:
            v = params.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise ModelCardError(f"maskrcnn card parameter '{key}' must be a number in [{lo}, {hi}], got {v!r}")
            return float(v)

        def integer(key: str, default: int) -> int:
            v = params.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelCardError(f"maskrcnn card parameter '{key}' must be an integer >= 1, got {v!r}")
            return v

        self.score_threshold = number("score_threshold", 0.05, 0.0, 1.0)
        self.nms_threshold = number("nms_threshold", 0.5, 0.0, 1.0)
        self.mask_threshold = number("mask_threshold", 0.5, 0.0, 1.0)
        self.detections = integer("detections_per_image", 100)
        self.rpn_pre_nms = integer("rpn_pre_nms_top_n", 1000)
        self.rpn_post_nms = integer("rpn_post_nms_top_n", 1000)
        self.rpn_nms_threshold = number("rpn_nms_threshold", 0.7, 0.0, 1.0)
        self.weights_format = choice_param(params, "weights_format", FORMATS, "auto", "maskrcnn")
        colour = params.get("input_format", "BGR")
        if colour not in ("BGR", "RGB"):
            raise ModelCardError(f"maskrcnn card parameter 'input_format' must be BGR or RGB, got {colour!r}")
        self.bgr = colour == "BGR"
        stride = params.get("stride_in_1x1", True)
        if not isinstance(stride, bool):
            raise ModelCardError(f"maskrcnn card parameter 'stride_in_1x1' must be true or false, got {stride!r}")
        self.stride_in_1x1 = stride


# ---- the architecture ----------------------------------------------------------------------------------


def build_maskrcnn(num_classes: int, settings: MaskRCNNSettings, *, detectron2: bool,
                   trainable: bool = False) -> torch.nn.Module:
    """torchvision's Mask R-CNN R50-FPN with ``num_classes`` outputs (background included), random weights,
    frozen BatchNorm, no resizing and no normalisation inside; with ``detectron2``, computing what a
    detectron2 R50-FPN computes (see :mod:`qpbridge.families.detectron2_keys`). ``trainable`` (for training
    from scratch): every backbone layer trainable, with BatchNorm that learns its statistics; its state dict,
    without ``num_batches_tracked``, loads into the frozen model."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    norm: Any = torch.nn.BatchNorm2d if trainable else FrozenBatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=norm,
                                   trainable_layers=5 if trainable else 0)
    kwargs: dict[str, Any] = {
        "box_score_thresh": settings.score_threshold, "box_nms_thresh": settings.nms_threshold,
        "box_detections_per_img": settings.detections,
        "rpn_pre_nms_top_n_test": settings.rpn_pre_nms, "rpn_post_nms_top_n_test": settings.rpn_post_nms,
        "rpn_nms_thresh": settings.rpn_nms_threshold,
    }
    if detectron2:
        kwargs["rpn_anchor_generator"] = _unrounded_anchors()(((32,), (64,), (128,), (256,), (512,)),
                                                              ((0.5, 1.0, 2.0),) * 5)
        kwargs["box_roi_pool"] = _aligned_pool()(7)
        kwargs["mask_roi_pool"] = _aligned_pool()(14)
    model = MaskRCNN(backbone, num_classes=num_classes, **kwargs)
    if detectron2 and settings.stride_in_1x1:
        body: Any = model.backbone.body
        for layer in (body.layer2, body.layer3, body.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    model.transform = _AsIs(model.transform)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _unrounded_anchors() -> type:
    """The anchor generator class (defined here so torchvision's detection modules load only when used)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class UnroundedAnchors(AnchorGenerator):
        """detectron2's cell anchors: torchvision's, without rounding to whole pixels."""

        def generate_anchors(self, scales: Any, aspect_ratios: Any, dtype: torch.dtype = torch.float32,
                             device: torch.device | None = None) -> torch.Tensor:
            scales = torch.as_tensor(scales, dtype=dtype, device=device)
            aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
            h_ratios = torch.sqrt(aspect_ratios)
            w_ratios = 1 / h_ratios
            ws = (w_ratios[:, None] * scales[None, :]).view(-1)
            hs = (h_ratios[:, None] * scales[None, :]).view(-1)
            return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    return UnroundedAnchors


@functools.lru_cache(maxsize=1)
def _aligned_pool() -> type:
    """The pooler class (defined here so torchvision's detection modules load only when used)."""
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    class AlignedRoIPool(MultiScaleRoIAlign):
        """detectron2's ``ROIPooler`` with ``ROIAlignV2`` on P2-P5: ``aligned=True``, adaptive sampling, boxes to
        levels by ``floor(4 + log2(sqrt(area) / 224 + 1e-8))``."""

        def __init__(self, output_size: int) -> None:
            super().__init__(["0", "1", "2", "3"], output_size, 0)

        def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                    image_shapes: list[tuple[int, int]]) -> torch.Tensor:
            feats = [x[k] for k in self.featmap_names]
            all_boxes = torch.cat(boxes)
            index = torch.cat([torch.full((len(b), 1), i, dtype=all_boxes.dtype, device=all_boxes.device)
                               for i, b in enumerate(boxes)])
            rois = torch.cat([index, all_boxes], dim=1)
            size = torch.sqrt((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]))
            level = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5).to(torch.int64) - 2
            out = torch.zeros((len(rois), feats[0].shape[1], *self.output_size), dtype=feats[0].dtype,
                              device=feats[0].device)
            for lvl, feat in enumerate(feats):
                idx = torch.where(level == lvl)[0]
                if len(idx):
                    pooled = roi_align(feat, rois[idx].to(feat.dtype), self.output_size,
                                       spatial_scale=1.0 / 2 ** (lvl + 2), sampling_ratio=0, aligned=True)
                    out[idx] = pooled.to(out.dtype)
            return out

    return AlignedRoIPool


class _AsIs(torch.nn.Module):
    """torchvision's ``GeneralizedRCNNTransform`` without normalising (the device worker did), resizing (the
    engine did) or pasting masks (the head does, into one label image): it only pads the batch to 32 px."""

    def __init__(self, transform: Any) -> None:
        super().__init__()
        self.size_divisible = int(transform.size_divisible)

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> tuple[Any, Any]:
        from torchvision.models.detection.image_list import ImageList

        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        d = self.size_divisible
        batch = images[0].new_zeros((len(images), images[0].shape[0], -(-h // d) * d, -(-w // d) * d))
        for i, im in enumerate(images):
            batch[i, :, :im.shape[-2], :im.shape[-1]].copy_(im)
        return ImageList(batch, sizes), targets

    def postprocess(self, result: Any, image_shapes: Any, original_image_sizes: Any) -> Any:
        return result


# ---- weights -------------------------------------------------------------------------------------------


def read_detectron2(path: Path, model: str | None = None) -> dict[str, Any]:
    """The ``model`` state dict of a detectron2 checkpoint (numpy arrays or tensors), read safely: a
    ``torch.save`` zip with ``weights_only``, any other file as a pickle of numpy arrays only. ``model`` names
    the card in errors."""
    whose = f"model '{model}': " if model else ""
    if zipfile.is_zipfile(path):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{whose}cannot read {path} ({type(exc).__name__}: {exc}); a detectron2 checkpoint "
                                 "with an optimizer or scheduler state may hold other objects: keep only its "
                                 "'model' entry (torch.save({'model': ckpt['model']}, path))", path=str(path)) from exc
    else:
        try:
            data = read_numpy_pickle(path)
        except Exception as exc:
            raise ModelLoadError(f"{whose}cannot read {path} as a detectron2 checkpoint: {type(exc).__name__}: "
                                 f"{exc}", path=str(path)) from exc
    data = unwrap_checkpoint(data)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{whose}{path} holds a {type(data).__name__}, not a detectron2 checkpoint dict",
                             path=str(path))
    return {str(k): v for k, v in data.items()}


def _is_detectron2(state: dict[str, Any]) -> bool:
    return any(k.startswith("backbone.bottom_up.") for k in state)


# ---- the family ----------------------------------------------------------------------------------------


@register_family("maskrcnn")
class MaskRCNNFamily(ModelFamily):
    """Mask R-CNN R50-FPN instances from torchvision or detectron2 weights, batched on a device worker."""

    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        if card.task != "instance-segmentation":
            raise ModelCardError(f"model '{card.name}': the maskrcnn family gives instances; set the card's task to "
                                 f"instance-segmentation (it says {card.task})")
        params = card.params
        self.settings = MaskRCNNSettings(params)
        settings = worker_settings(card, channels_last=False)
        self.torch_device = resolve_torch_device(device)
        model, default_norm = self._load(card_weights(card, "Mask R-CNN weights file", file_only=True))
        normalization = Normalization.from_card(card.normalization, default_norm.mean, default_norm.std)
        if "scale" not in card.normalization:
            normalization = Normalization(normalization.mean, normalization.std, default_norm.scale)
        self.normalization = normalization
        self.worker = DeviceWorker(_ListInput(model), self.torch_device, name=card.name, normalization=normalization,
                                   weights="autocast", head=self._head, **settings)
        self.worker.warm_up(card.tile_size)  # a broken model fails at load, not mid-job

    def _load(self, path: Path) -> tuple[torch.nn.Module, Normalization]:
        """The model on the device, and the normalisation its weights expect unless the card says otherwise."""
        card = self.card
        fmt = self.settings.weights_format
        what = f"model '{card.name}': {path}"
        k = len(card.classes)
        if fmt == "torchvision":
            state: dict[str, Any] = load_state_dict_file(path, card.name)
        else:
            state = read_detectron2(path, card.name)
            if fmt == "auto" and not _is_detectron2(state):
                fmt = "torchvision"
                state = load_state_dict_file(path, card.name)
            elif fmt == "auto":
                fmt = "detectron2"
        if fmt == "detectron2":
            from qpbridge.families.detectron2_keys import check_supported, detectron2_to_torchvision

            try:
                check_supported(state, k)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{what}: {exc}", path=str(path)) from None
            norm = _detectron2_normalization(state, self.settings.bgr)
            state = detectron2_to_torchvision(state, bgr=self.settings.bgr)
            model = build_maskrcnn(k + 1, self.settings, detectron2=True)
        else:
            rows = state.get("roi_heads.box_predictor.cls_score.weight")
            if isinstance(rows, torch.Tensor) and rows.shape[0] != k + 1:
                raise ModelLoadError(f"{what} has {rows.shape[0] - 1} classes (cls_score has {rows.shape[0]} rows, "
                                     f"background first) but the card lists {k}", path=str(path))
            norm = Normalization(IMAGENET_MEAN, IMAGENET_STD, 255.0)
            model = build_maskrcnn(k + 1, self.settings, detectron2=False)
        load_weights_strict(model, state, card.name, path)
        return model.to(self.torch_device), norm

    def _head(self, output: list[dict[str, torch.Tensor]], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections of each tile as one label image (higher scores painted first), classes and scores,
        padded to ``detections_per_image``."""
        n, _, h, w = x.shape
        d = self.settings.detections
        dev = x.device
        labels = torch.zeros((n, h, w), dtype=torch.int32, device=dev)
        classes = torch.zeros((n, d), dtype=torch.int32, device=dev)
        scores = torch.zeros((n, d), dtype=torch.float32, device=dev)
        for i, det in enumerate(output):
            order = torch.argsort(det["scores"], descending=True)[:d]
            boxes = det["boxes"][order].float()
            masks = det["masks"][order].float()
            classes[i, :len(order)] = (det["labels"][order] - 1).to(torch.int32)
            scores[i, :len(order)] = det["scores"][order].float()
            _paint(labels[i], boxes, masks, self.settings.mask_threshold)
        return {"labels": labels, "classes": classes, "scores": scores}

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        size = self.card.tile_size
        fill = self._pad_value()
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(checked):
            groups.setdefault((max(t.shape[0], size), max(t.shape[1], size)), []).append(i)
        futures = []
        for (h, w), idx in groups.items():
            batch = np.empty((len(idx), h, w, 3), np.uint8)
            batch[:] = fill  # padding in the colour the normalisation maps to 0, as detectron2 pads
            for j, i in enumerate(idx):
                t = checked[i]
                batch[j, :t.shape[0], :t.shape[1]] = t
            futures.append((idx, self.worker.submit(batch)))
        results: list[TileResult | None] = [None] * len(checked)
        for idx, fut in futures:
            out = fut.result()
            for j, i in enumerate(idx):
                th, tw = checked[i].shape[:2]
                results[i] = _instances(out["labels"][j, :th, :tw], out["classes"][j], out["scores"][j])
        return [r for r in results if r is not None]

    def _pad_value(self) -> np.ndarray:
        n = self.normalization
        return np.clip(np.round(np.asarray(n.mean) * n.scale), 0, 255).astype(np.uint8)

    def device_busy_s(self) -> float | None:
        return self.worker.device_busy_s()

    def close(self) -> None:
        self.worker.close()


class _ListInput(torch.nn.Module):
    """torchvision's detection models take a list of images; the device worker hands a batch tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(list(x.float()))


def _paint(labels: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, threshold: float) -> None:
    """Paste each (1, M, M) mask into its box and give its pixels above ``threshold`` label i + 1 where no
    earlier (higher-scoring) detection holds them."""
    h, w = labels.shape
    for i, (x0, y0, x1, y1) in enumerate(boxes.cpu().tolist()):  # one copy to the host, not one sync per box
        ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        ix1, iy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
        if ix1 <= ix0 or iy1 <= iy0 or x1 <= x0 or y1 <= y0:
            continue
        # pixel centres in the box's normalised coordinates ([-1, 1] spans the box), as detectron2 pastes
        ys = (torch.arange(iy0, iy1, device=labels.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        xs = (torch.arange(ix0, ix1, device=labels.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
        prob = F.grid_sample(masks[i][None], grid, mode="bilinear", align_corners=False)[0, 0]
        region = labels[iy0:iy1, ix0:ix1]
        region[(prob >= threshold) & (region == 0)] = i + 1


def _instances(labels: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> InstanceResult:
    """The tile's labels renumbered 1..N (detections without pixels in the tile dropped), with classes and
    scores."""
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    out = lut[labels]
    class_of = {j + 1: int(classes[p - 1]) for j, p in enumerate(present)}
    measurements = {j + 1: {SCORE: float(scores[p - 1])} for j, p in enumerate(present)}
    return InstanceResult(out.astype(np.int32), class_of, measurements)


def _detectron2_normalization(state: dict[str, Any], bgr: bool) -> Normalization:
    """detectron2's pixel mean/std (the checkpoint's when it kept them) in RGB order, on 0-255 pixels."""
    mean: Any = state.get("pixel_mean")
    std: Any = state.get("pixel_std")
    m = [float(v) for v in np.asarray(mean, np.float64).reshape(-1)] if mean is not None else \
        list(DETECTRON2_MEAN_RGB[::-1] if bgr else DETECTRON2_MEAN_RGB)
    s = [float(v) for v in np.asarray(std, np.float64).reshape(-1)] if std is not None else [1.0, 1.0, 1.0]
    if len(m) != 3 or len(s) != 3:
        raise ModelLoadError(f"pixel_mean/pixel_std of the checkpoint have {len(m)}/{len(s)} values, not 3")
    if bgr:  # stored in the checkpoint's channel order
        m, s = m[::-1], s[::-1]
    return Normalization((m[0], m[1], m[2]), (s[0], s[1], s[2]), 1.0)
