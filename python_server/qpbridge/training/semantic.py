"""What the trainers of semantic models share: class-label checks, training tiles kept on the device, augmented
random crops (dihedral transforms, stain jitter) normalised as the family normalises, cross-entropy + Dice with
an ignore label, and HOTSPoT's validation metrics (pixel accuracy, IoU per class, mean IoU over the classes
present) from one confusion matrix over the validation tiles."""

from __future__ import annotations

from abc import abstractmethod
from contextlib import nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from qpbridge.errors import BadRequestError
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD, Normalization
from qpbridge.training.augment import ColourJitter
from qpbridge.training.base import FamilyTrainer, JitteredCrops
from qpbridge.training.data import TileSet

IGNORE = 255  # label of pixels that take no part in the loss or the metrics


def check_labels(data: TileSet, n_classes: int) -> None:
    """Every mask label is an index into the card's classes (or ``IGNORE``)."""
    for split in ("train", "val"):
        for mask in data.masks.get(split, []):
            top = int(mask[mask != IGNORE].max(initial=0))
            if top >= n_classes:
                raise BadRequestError(f"{data.root} has class label {top} but the card lists {n_classes} classes "
                                      "(label = index into the card's classes, 0 first)")


def ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy + soft Dice (mean over the classes in the batch's truth), ``IGNORE`` pixels left out of
    both: the usual loss of smp U-Nets on histology (Dice keeps small classes from being drowned)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    keep = (labels != IGNORE)[:, None].float()
    onehot = F.one_hot(labels.clamp_max(logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float() * keep
    prob = torch.softmax(logits, dim=1) * keep
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
    dice_loss = dice[present].mean() if bool(present.any()) else dice.sum() * 0.0
    return ce + dice_loss, {"ce": ce.detach(), "dice": dice_loss.detach()}


def confusion_metrics(confusion: np.ndarray, names: list[str]) -> dict[str, float]:
    """``miou`` (over classes present in truth or prediction), ``pixel_accuracy`` and ``iou_<class>`` from a
    confusion matrix [true, pred]."""
    cm = confusion.astype(np.float64)
    n = len(names)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    iou = np.divide(inter, union, out=np.zeros(n), where=present)
    result = {"miou": float(iou[present].mean()) if present.any() else 0.0,
              "pixel_accuracy": float(inter.sum() / max(cm.sum(), 1.0))}
    result.update({f"iou_{name}": float(iou[i]) for i, name in enumerate(names) if present[i]})
    return result


class SemanticCrops(JitteredCrops, FamilyTrainer):
    """Augmented, normalised crops of semantic tiles with their class labels (``input``, ``labels``); crops are
    cut to a multiple of the network's :meth:`input_multiple`."""

    mode = "semantic"
    default_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        self.n_classes = len(card["classes"])
        self.class_names = [str(c["name"]) for c in card["classes"]]
        self.norm = Normalization.from_card(card.get("normalization", {}), self.default_mean, self.default_std)
        self.jitter = ColourJitter()
        check_labels(data, self.n_classes)
        m = self.input_multiple()
        smallest = min(min(im.shape[:2]) for im in data.images["train"])
        if smallest < m:
            raise BadRequestError(f"the smallest training tile of {data.root} is {smallest} px; this model needs "
                                  f"crops of at least {m} px")
        self.crop = max(m, min(crop or int(card["tile"]["size"]), smallest) // m * m)
        self._tiles = [{"image": torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(device),
                        "labels": torch.from_numpy(mk.astype(np.int64)).to(device)}
                       for im, mk in zip(data.images["train"], data.masks["train"], strict=True)]
        self._mean = torch.tensor(self.norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.norm.std, device=device).view(1, 3, 1, 1)

    def input_multiple(self) -> int:
        return 32

    def val_tiles(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        images, masks = self.data.images.get("val", []), self.data.masks.get("val", [])
        if not images:
            raise BadRequestError(f"{self.data.root} has no validation tiles (split 'val'): training needs them "
                                  "for early stopping and the model's metrics")
        return images, masks


class SemanticTrainer(SemanticCrops):
    """A network with per-pixel logits, validated by mean IoU; subclasses build the network, compute its logits
    and write its weights."""

    metric = "miou"

    @abstractmethod
    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits (N, C, H, W) of normalised input of any size (N, 3, H, W)."""

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        images, masks = self.val_tiles()
        n = self.n_classes
        confusion = torch.zeros(n * n, dtype=torch.int64, device=self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        for image, mask in zip(images, masks, strict=True):
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device).float() / 255.0
            with autocast:
                pred = self.logits(model, self.normalise(x)).float().argmax(1)[0]
            true = torch.from_numpy(mask.astype(np.int64)).to(self.device)
            keep = true != IGNORE
            confusion += torch.bincount(true[keep] * n + pred[keep], minlength=n * n)
        return confusion_metrics(confusion.view(n, n).cpu().numpy(), self.class_names)
