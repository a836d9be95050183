"""Trainer of the ``gradcam`` family's patch classifier (HistoSegNet-style weak segmentation): the torchvision
(or ``timm:``) architecture of ``params.arch``, built with random weights (nothing is downloaded), trained on
crops of semantic tiles at the card's tile size and µm/px, the patches the family explains when it serves.

Patch labels from the masks. With the family's default ``params.scores: "sigmoid"`` the classifier is
multi-label, as HistoSegNet's (trained on ADP, whose patches carry every tissue type they show): a classifier
class is a positive label of a crop when it covers at least ``params.label_min_fraction`` of the crop's
pixels (default 0.05: a sliver at the border is not a label), trained with binary cross-entropy. Multi-label,
not the majority class: Grad-CAM draws a class's region only when the classifier scores that class high
(the family multiplies each map by the class's sigmoid score and drops classes below ``score_threshold``), so
a class that shares a patch with a larger one must be trained as present, not as absent, or its regions
vanish from every mixed patch. With ``scores: "softmax"`` the classifier is single-label, trained with
cross-entropy on each crop's majority class, as a softmax classifier is used.

Pixels of classes the classifier does not output (the ``background`` and ``other`` classes the family derives,
``IGNORE``) are left out of the fractions. Mask labels are indices into the card's classes (label 0 is the
first class), as for the other semantic trainers.

Validation: the validation tiles cut into non-overlapping crops of the training size, labelled the same way;
``f1`` is the macro F1 over the classifier's classes (classes with neither a true nor a predicted positive are
left out), the metric of multi-label patch classifiers such as ADP's; ``accuracy`` (multi-label: the mean of
per-class accuracies; single-label: top-1) and ``f1_<class>`` are recorded too. A class is predicted when its
score reaches ``params.score_threshold`` (the family's; 0.5 when the card sets none or 0). The weights are the
classifier's state dict (``weights.pt``), which the family loads into ``params.arch``."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from qpbridge.errors import ModelCardError
from qpbridge.families.gradcam import Adjustment, build_classifier
from qpbridge.training.base import register_trainer, save_state_dict
from qpbridge.training.data import TileSet
from qpbridge.training.semantic import SemanticCrops


def patch_targets(labels: torch.Tensor, outputs: torch.Tensor, min_fraction: float, multi_label: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of crops (N, H, W) of card class labels for a classifier whose output k is card class
    ``outputs[k]`` (-1: a class the card does not segment, never present): multi-label (N, K) floats (1 where
    the class covers at least ``min_fraction`` of the pixels of classifier classes), or the majority class
    (N,); and whether each crop has any pixel of a classifier class (N,)."""
    n = labels.shape[0]
    top = int(outputs.max().clamp_min(0)) + 1
    flat = labels.reshape(n, -1).clamp(0, top)  # IGNORE and labels past the outputs fall in bin ``top``
    counts = torch.zeros((n, top + 2), dtype=torch.float32, device=labels.device)  # bin top + 1 stays empty
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    per_output = counts[:, torch.where(outputs >= 0, outputs, top + 1)]  # (N, K)
    total = per_output.sum(dim=1, keepdim=True)
    labelled = total[:, 0] > 0
    if multi_label:
        return (per_output >= min_fraction * total.clamp_min(1.0)).float() * labelled[:, None].float(), labelled
    return per_output.argmax(dim=1), labelled


@register_trainer("gradcam")
class GradCAMClassifierTrainer(SemanticCrops):
    metric = "f1"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        from qpbridge.cards import ModelCard

        params = card.get("params", {})
        arch = params.get("arch")
        if not isinstance(arch, str) or not arch:
            raise ModelCardError("a gradcam card to train needs params.arch, the classifier's architecture (a "
                                 "torchvision model name such as resnet18, or timm:<name>)")
        self.arch = arch
        adjust = Adjustment.from_card(ModelCard.from_dict(card))
        outputs = adjust.clf_to_card
        self.n_outputs = len(outputs)
        self.outputs = torch.tensor(outputs, device=device)  # -1: an output the card does not segment
        self.output_names = [self.class_names[c] if c >= 0 else f"output{k}" for k, c in enumerate(outputs)]
        self.multi_label = params.get("scores", "sigmoid") != "softmax"
        fraction = params.get("label_min_fraction", 0.05)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ModelCardError(f"card parameter 'label_min_fraction' must be a number in (0, 1], got {fraction!r}")
        self.min_fraction = float(fraction)
        threshold = params.get("score_threshold", 0.0)
        values = threshold if isinstance(threshold, list) else [threshold] * self.n_outputs
        self.thresholds = torch.tensor([float(v) if v else 0.5 for v in values], device=device)

    def build_model(self) -> torch.nn.Module:
        return build_classifier(self.arch, self.n_outputs, str(self.card.get("name", "")))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input"]).float()
        target, labelled = patch_targets(batch["labels"], self.outputs, self.min_fraction, self.multi_label)
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, target)
            return loss, {"bce": loss.detach()}
        # crops without any classifier class (all background) teach nothing about the classes
        per_crop = F.cross_entropy(logits, target, reduction="none")
        loss = (per_crop * labelled).sum() / labelled.sum().clamp_min(1)
        return loss, {"ce": loss.detach()}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        images, masks = self.val_tiles()
        c = int(self.crop or 32)
        pairs = [(image[y:y + c, x:x + c], mask[y:y + c, x:x + c])
                 for image, mask in zip(images, masks, strict=True)
                 for y in range(0, max(mask.shape[0] - c, 0) + 1, c)
                 for x in range(0, max(mask.shape[1] - c, 0) + 1, c)]
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        preds, trues, keep = [], [], []
        for image, mask in pairs:  # one crop at a time: edge tiles give crops of other sizes
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device).float() / 255.0
            with autocast:
                logits = model(self.normalise(x)).float()
            labels = torch.from_numpy(mask.astype(np.int64))[None].to(self.device)
            target, labelled = patch_targets(labels, self.outputs, self.min_fraction, self.multi_label)
            if self.multi_label:
                preds.append((torch.sigmoid(logits) >= self.thresholds).float())
            else:
                preds.append(F.one_hot(logits.argmax(1), self.n_outputs).float())
                target = F.one_hot(target, self.n_outputs).float()
            trues.append(target)
            keep.append(labelled)
        pred = torch.cat(preds).cpu().numpy()
        true = torch.cat(trues).cpu().numpy()
        labelled_np = torch.cat(keep).cpu().numpy()
        if not self.multi_label:  # single-label: crops without any classifier class are not scored
            pred, true = pred[labelled_np], true[labelled_np]
        return classification_metrics(true, pred, self.output_names, self.multi_label)

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        save_state_dict(model.state_dict(), out / "weights.pt")
        return self.served_card(name, "weights.pt")


def classification_metrics(true: np.ndarray, pred: np.ndarray, names: list[str], multi_label: bool
                           ) -> dict[str, float]:
    """Macro ``f1`` over classes with a true or predicted positive, ``f1_<class>``, and ``accuracy`` (multi-label:
    mean per-class accuracy; single-label: top-1) of 0/1 matrices (crops, classes)."""
    if not len(true):
        return {"f1": 0.0, "accuracy": 0.0}
    tp = (true * pred).sum(0)
    fp = ((1 - true) * pred).sum(0)
    fn = (true * (1 - pred)).sum(0)
    defined = tp + fp + fn > 0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(names)), where=defined)
    result = {"f1": float(f1[defined].mean()) if defined.any() else 0.0,
              "accuracy": float((true == pred).mean() if multi_label else (true * pred).sum(1).mean())}
    result.update({f"f1_{n}": float(f1[i]) for i, n in enumerate(names) if defined[i]})
    return result
