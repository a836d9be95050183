"""Trainer of the ``segformer-hf`` family: a ``transformers`` SegFormer (B0 unless ``params.segformer`` sets other
``SegformerConfig`` values) trained from scratch on semantic tiles with its own loss (cross-entropy on the logits
upsampled to the labels, ``labels`` = class indices of the card's classes), validated by mean IoU, and saved with
``save_pretrained`` into ``OUT/weights`` as the family loads it."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from qpbridge.errors import BadRequestError, ModelCardError
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD, Normalization
from qpbridge.training.augment import ColourJitter
from qpbridge.training.base import FamilyTrainer, JitteredCrops, register_trainer, save_pretrained_folder
from qpbridge.training.data import TileSet

IGNORE = 255  # label of pixels that take no part in the loss or the metrics


@register_trainer("segformer-hf")
class SegformerTrainer(JitteredCrops, FamilyTrainer):
    metric = "miou"
    mode = "semantic"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        self.n_classes = len(card["classes"])
        extra = card.get("params", {}).get("segformer", {})
        if not isinstance(extra, dict):
            raise ModelCardError("segformer card parameter 'segformer' must be an object of SegformerConfig values")
        self.config_values = extra
        self.norm = Normalization.from_card(card.get("normalization", {}), IMAGENET_MEAN, IMAGENET_STD)
        self.jitter = ColourJitter()
        smallest = min(min(im.shape[:2]) for im in data.images["train"])
        self.crop = max(32, min(crop or int(card["tile"]["size"]), smallest) // 32 * 32)
        for split in ("train", "val"):
            for mask in data.masks.get(split, []):
                top = int(mask[mask != IGNORE].max(initial=0))
                if top >= self.n_classes:
                    raise BadRequestError(f"{data.root} has class label {top} but the card lists {self.n_classes} "
                                          "classes (label = index into the card's classes, 0 first)")
        self._tiles = [{"image": torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(device),
                        "labels": torch.from_numpy(m.astype(np.int64)).to(device)}
                       for im, m in zip(data.images["train"], data.masks["train"], strict=True)]
        self._mean = torch.tensor(self.norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.norm.std, device=device).view(1, 3, 1, 1)

    def build_model(self) -> torch.nn.Module:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        names = [c["name"] for c in self.card["classes"]]
        values: dict[str, Any] = {"num_labels": self.n_classes, "id2label": dict(enumerate(names)),
                                  "label2id": {n: i for i, n in enumerate(names)},
                                  "semantic_loss_ignore_index": IGNORE, **self.config_values}
        config = SegformerConfig(**values)
        model: torch.nn.Module = SegformerForSemanticSegmentation(config)
        return model

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(pixel_values=batch["input"], labels=batch["labels"])
        loss: torch.Tensor = out.loss
        return loss, {"ce": loss.detach()}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        images, masks = self.data.images.get("val", []), self.data.masks.get("val", [])
        if not images:
            raise BadRequestError(f"{self.data.root} has no validation tiles (split 'val')")
        n = self.n_classes
        confusion = torch.zeros(n * n, dtype=torch.int64, device=self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        for image, mask in zip(images, masks, strict=True):
            h, w = mask.shape
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device).float() / 255.0
            with autocast:
                logits = model(pixel_values=self.normalise(x)).logits
            pred = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
            true = torch.from_numpy(mask.astype(np.int64)).to(self.device)
            keep = true != IGNORE
            confusion += torch.bincount(true[keep] * n + pred[keep], minlength=n * n)
        cm = confusion.view(n, n).double().cpu().numpy()
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        present = cm.sum(1) > 0
        iou = np.divide(inter, union, out=np.zeros(n), where=union > 0)
        result = {"miou": float(iou[present].mean()) if present.any() else 0.0,
                  "pixel_accuracy": float(inter.sum() / max(cm.sum(), 1.0))}
        result.update({f"iou_{c['name']}": float(iou[i]) for i, c in enumerate(self.card["classes"]) if present[i]})
        return result

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        save_pretrained_folder(model, out / "weights")
        return self.served_card(name, "weights")
