"""``segformer-hf``: a ``transformers`` SegFormer saved with ``save_pretrained`` (``card.weights`` is the
folder, ``config.json`` + ``model.safetensors``). Logits are ``outputs.logits``, a quarter of the tile
size. Default normalisation: ImageNet mean/std. The machinery (device worker, tile sizes, card params)
is :class:`~qpbridge.families.torch_segmentation.TorchSegmentation`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpbridge.errors import ModelLoadError
from qpbridge.families.base import register_family
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD
from qpbridge.families.torch_segmentation import TorchSegmentation, log

__all__ = ["SegformerHF", "TorchSegmentation"]


@register_family("segformer-hf")
class SegformerHF(TorchSegmentation):
    """A ``transformers`` SegFormer saved with ``save_pretrained`` (``card.weights`` is the folder)."""

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD
    weights_kind = "save_pretrained folder (config.json + model.safetensors)"

    def _load(self, weights: Path, device: torch.device) -> torch.nn.Module:
        folder = weights.parent if weights.is_file() else weights
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"model '{self.card.name}': {folder} is not a save_pretrained folder (no "
                                 "config.json); point the card's weights at the folder", path=str(folder))
        try:
            from transformers import SegformerForSemanticSegmentation

            model = SegformerForSemanticSegmentation.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"model '{self.card.name}': cannot load SegFormer from {folder}: "
                                 f"{type(exc).__name__}: {exc}", path=str(folder)) from exc
        n_labels = int(getattr(model.config, "num_labels", 0) or 0)
        if n_labels != len(self.card.classes):
            raise ModelLoadError(
                f"model '{self.card.name}': {folder} has {n_labels} labels but the card lists "
                f"{len(self.card.classes)} classes ({', '.join(c.name for c in self.card.classes)})",
                path=str(folder))
        self._check_label_names(getattr(model.config, "id2label", None) or {})
        model = model.float()
        return model.to(device)

    def _check_label_names(self, id2label: dict[Any, Any]) -> None:
        """Warn when the checkpoint names its labels and the card's class order looks different."""
        names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(self.card.classes))]
        if all(n.upper().startswith("LABEL_") or not n for n in names):
            return  # unnamed labels: nothing to compare
        card_names = [c.name for c in self.card.classes]
        if [n.lower() for n in names] != [n.lower() for n in card_names]:
            log.warning("model %s: checkpoint labels %s differ from the card's classes %s; check the order",
                        self.card.name, names, card_names)
