"""Trainer of the ``smp`` family: the segmentation-models-pytorch architecture and encoder the card names
(``params.arch``, ``params.encoder``, ``params.model_kwargs``), built with ``encoder_weights=None`` (nothing is
downloaded: trained from scratch), trained on semantic tiles with cross-entropy + Dice, validated by mean IoU
(HOTSPoT's metric), and saved with smp's ``save_pretrained`` into ``OUT/weights`` (``config.json`` +
``model.safetensors``), the folder :mod:`qpbridge.families.smp` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qpbridge.families.smp import PadToStride, build_smp_model, smp_spec
from qpbridge.training.base import register_trainer, save_pretrained_folder
from qpbridge.training.semantic import SemanticTrainer, ce_dice_loss


@register_trainer("smp")
class SmpTrainer(SemanticTrainer):

    def input_multiple(self) -> int:
        model = build_smp_model(self._spec())  # small next to training; gives the encoder's true stride
        return self._stride(model)

    def _spec(self) -> dict[str, Any]:
        return smp_spec(self.card.get("params", {}), len(self.card["classes"]))

    @staticmethod
    def _stride(model: torch.nn.Module) -> int:
        encoder = getattr(model, "encoder", None)
        return int(getattr(encoder, "output_stride", 32) or 32)

    def build_model(self) -> torch.nn.Module:
        return build_smp_model(self._spec())

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = PadToStride(model, self._stride(model))(x)  # whole tiles of any size, as served
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch["input"])
        if isinstance(out, (tuple, list)):  # aux_params: (mask logits, class logits)
            out = out[0]
        return ce_dice_loss(out, batch["labels"])

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        save_pretrained_folder(model, out / "weights")
        return self.served_card(name, "weights")
