"""``torchscript-segmentation``: a ``torch.jit.save`` file (as WSInfer ships them) whose module returns
N x C x h x w logits as a tensor, or a tuple/dict whose first/``logits`` entry is one. Default
normalisation: none (``x / 255``, as WSInfer's ``ToTensor``); cards and WSInfer ``Normalize`` transforms
set mean/std. The machinery is :class:`~qpbridge.families.torch_segmentation.TorchSegmentation`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpbridge.errors import ModelLoadError
from qpbridge.families.base import register_family
from qpbridge.families.torch_segmentation import TorchSegmentation
from qpbridge.families.weights import load_torchscript

__all__ = ["TorchScriptSegmentation"]


@register_family("torchscript-segmentation")
class TorchScriptSegmentation(TorchSegmentation):
    """A TorchScript module (``torch.jit.save``) returning N x C x h x w logits."""

    weights_kind = "TorchScript file"

    def _load(self, weights: Path, device: torch.device) -> torch.nn.Module:
        if weights.is_dir():
            raise ModelLoadError(f"model '{self.card.name}': {weights} is a folder; a TorchScript family needs "
                                 "the .pt file itself", path=str(weights))
        return load_torchscript(weights, self.card.name, device,
                                hint="export the model with torch.jit.trace/script and torch.jit.save (a plain "
                                     "state dict needs its architecture: use a family that knows it)")
