"""Trainer of the ``maskrcnn`` family: torchvision's Mask R-CNN R50-FPN (the family's architecture) trained from
scratch (no weights can be downloaded; BatchNorm learns its statistics and is frozen into the family's
``FrozenBatchNorm2d`` at export) on instance tiles: ``masks/`` gives the objects, ``types/`` their classes
(matched to the card's classes by name), so folders exported with ``--format instance`` or ``--format coco``
train alike (the COCO JSON holds the same objects as polygons; the label images are exact and cropped and
rotated with the pixels).

Validation: COCO mask AP50 (pycocotools, the Detectron2 project's evaluation; ``ap``, ``ap75`` and the box APs
are recorded too) on the validation tiles, after the family's own mask pasting, so it measures what serving
returns. AP50 rather than PQ because Mask R-CNN ranks its detections by score and AP is the measure of ranked
detections it was designed and published with; AP50 rather than AP@[.5:.95] because at nucleus sizes a pixel of
boundary moves IoU by 0.1, which makes the strict thresholds noisy for choosing the best epoch.

The weights are saved as the torchvision state dict (``weights.pt``) that :mod:`qpbridge.families.maskrcnn`
loads (``params.weights_format: torchvision``)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpbridge.errors import BadRequestError, ModelCardError
from qpbridge.families.maskrcnn import MaskRCNNSettings, _paint, build_maskrcnn
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD, Normalization
from qpbridge.metrics import InstanceImage, coco_metrics
from qpbridge.training.augment import ColourJitter
from qpbridge.training.base import FamilyTrainer, JitteredCrops, register_trainer, save_state_dict
from qpbridge.training.data import TileSet


@register_trainer("maskrcnn")
class MaskRCNNTrainer(JitteredCrops, FamilyTrainer):
    metric = "ap50"
    mode = "instances"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        if card.get("task") != "instance-segmentation":
            raise ModelCardError(f"a maskrcnn card's task is instance-segmentation, not {card.get('task')}")
        self.settings = MaskRCNNSettings(card.get("params", {}))
        self.names = [str(c["name"]) for c in card["classes"]]
        self.norm = Normalization.from_card(card.get("normalization", {}), IMAGENET_MEAN, IMAGENET_STD)
        self.jitter = ColourJitter()
        self.lut = self._class_lut(data)
        smallest = min(min(im.shape[:2]) for im in data.images["train"])
        self.crop = min(crop or int(card["tile"]["size"]), smallest)
        self._tiles = [self._tile(im, mk, ty) for im, mk, ty in
                       zip(data.images["train"], data.masks["train"], data.types["train"], strict=True)]
        self._mean = torch.tensor(self.norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.norm.std, device=device).view(1, 3, 1, 1)

    def _class_lut(self, data: TileSet) -> np.ndarray:
        """Dataset class label -> model label (card class index + 1; 0 background). Without ``types/`` (the
        QuPath script's instance folders) every object is the card's one class."""
        if any(t is None for split in data.types.values() for t in split):
            if len(self.names) != 1:
                raise BadRequestError(f"{data.root} has no types/ masks (object classes): it can train a card "
                                      f"with one class, not {len(self.names)}; export with --format instance")
            return np.array([0, 1], dtype=np.int64)
        top = max([int(c.get("label", 0)) for c in data.classes] + [1])
        lut = np.zeros(top + 1, dtype=np.int64)
        for c in data.classes:
            if c["name"] not in self.names:
                raise BadRequestError(f"{data.root} has objects of class '{c['name']}', which the card does not "
                                      f"list ({', '.join(self.names)})")
            lut[int(c["label"])] = self.names.index(c["name"]) + 1
        return lut

    def _model_types(self, types: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        """Per pixel, the model label of the object covering it."""
        if types is None:
            return (mask > 0).astype(np.int64)
        return self.lut[np.minimum(types.astype(np.int64), len(self.lut) - 1)]

    def _tile(self, image: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device),
                "labels": torch.from_numpy(mask.astype(np.int64)).to(self.device),
                "types": torch.from_numpy(self._model_types(types, mask)).to(self.device)}

    def build_model(self) -> torch.nn.Module:
        return build_maskrcnn(len(self.names) + 1, self.settings, detectron2=False, trainable=True)

    @staticmethod
    def targets(labels: torch.Tensor, types: torch.Tensor) -> dict[str, torch.Tensor]:
        """torchvision's target of one crop: a binary mask, a box (pixel edges) and a class per object."""
        ids = torch.unique(labels)
        ids = ids[ids > 0]
        masks = labels[None] == ids[:, None, None]
        if not len(ids):
            h, w = labels.shape
            return {"boxes": torch.zeros((0, 4), device=labels.device), "labels": ids,
                    "masks": torch.zeros((0, h, w), dtype=torch.uint8, device=labels.device)}
        ys = masks.any(dim=2)
        xs = masks.any(dim=1)
        idx_y = torch.arange(labels.shape[0], device=labels.device)
        idx_x = torch.arange(labels.shape[1], device=labels.device)
        y0 = torch.where(ys, idx_y, labels.shape[0]).amin(1)
        y1 = torch.where(ys, idx_y, -1).amax(1) + 1
        x0 = torch.where(xs, idx_x, labels.shape[1]).amin(1)
        x1 = torch.where(xs, idx_x, -1).amax(1) + 1
        cls = torch.where(masks, types[None], 0).amax(dim=(1, 2))
        keep = cls > 0  # an object whose class the card does not segment: not a target
        boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
        return {"boxes": boxes[keep], "labels": cls[keep], "masks": masks[keep].to(torch.uint8)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = [self.targets(lab, ty) for lab, ty in zip(batch["labels"], batch["types"], strict=True)]
        losses: dict[str, torch.Tensor] = model(list(batch["input"]), targets)
        parts = {"rpn": losses["loss_objectness"] + losses["loss_rpn_box_reg"],
                 "box": losses["loss_classifier"] + losses["loss_box_reg"], "mask": losses["loss_mask"]}
        total = parts["rpn"] + parts["box"] + parts["mask"]
        return total, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, image: np.ndarray) -> InstanceImage:
        """One tile's detections as the family paints them: labels by decreasing score, classes, scores."""
        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device).float() / 255.0
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            (det,) = model(list(self.normalise(x)))
        order = torch.argsort(det["scores"], descending=True)[:self.settings.detections]
        labels = torch.zeros((h, w), dtype=torch.int32, device=self.device)
        _paint(labels, det["boxes"][order].float(), det["masks"][order].float(), self.settings.mask_threshold)
        classes = det["labels"][order].cpu().numpy()
        scores = det["scores"][order].float().cpu().numpy()
        out = labels.cpu().numpy()
        ids = [int(i) for i in np.unique(out) if i]
        return InstanceImage(out, {i: int(classes[i - 1]) for i in ids}, {i: float(scores[i - 1]) for i in ids})

    def truth(self, mask: np.ndarray, types: np.ndarray | None) -> InstanceImage:
        """A validation tile's objects with their model labels (objects of classes the card lacks left out)."""
        model_types = self._model_types(types, mask)
        ids = np.unique(mask)
        ids = ids[ids > 0]
        cls = np.zeros(int(mask.max(initial=0)) + 1, dtype=np.int64)
        np.maximum.at(cls, mask.ravel(), model_types.ravel())
        keep = [int(i) for i in ids if cls[i] > 0]
        labels = np.where(np.isin(mask, keep), mask, 0)
        return InstanceImage(labels, {i: int(cls[i]) for i in keep})

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        images = self.data.images.get("val", [])
        if not images:
            raise BadRequestError(f"{self.data.root} has no validation tiles (split 'val'): training needs them "
                                  "for early stopping and the model's metrics")
        truth = [self.truth(m, t) for m, t in zip(self.data.masks["val"], self.data.types["val"], strict=True)]
        preds = [self.predict(model, im) for im in images]
        result = {k: v for k, v in coco_metrics(truth, preds, self.names).items() if math.isfinite(v)}
        result.setdefault(self.metric, 0.0)  # no object in the validation tiles: nothing to rank by
        return result

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        state = {k: v for k, v in model.state_dict().items()
                 if not k.endswith("num_batches_tracked")}  # FrozenBatchNorm2d has no such buffer
        save_state_dict(state, out / "weights.pt")
        return self.served_card(name, "weights.pt", weights_format="torchvision")
