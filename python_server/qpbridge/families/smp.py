"""``smp``: any segmentation-models-pytorch architecture and encoder, named in the card.

Card ``params``:

``arch``
    the smp architecture, as its class is named (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``,
    ``MAnet``, ``Linknet``, ``PSPNet``, ``PAN``, ``UPerNet``, ``Segformer``, ``DPT``; case does not matter).
``encoder``
    the smp encoder name (``efficientnet-b0``, ``resnet34``, ``tu-...`` for timm encoders ...).
``model_kwargs`` (optional)
    further constructor arguments (``encoder_depth``, ``decoder_channels``, ...), for a model trained
    with other than smp's defaults.

The number of output channels is the card's class count, in the card's order. ``card.weights`` is either

* an smp ``save_pretrained`` folder: ``config.json`` (the constructor arguments, with ``_model_class``) and
  ``model.safetensors`` (or ``pytorch_model.bin``). The folder's architecture, encoder and class count must
  agree with the card; its other constructor arguments are used as saved. Or
* a plain state dict file (``.pth``/``.pt``/``.bin``/``.safetensors``), as ``torch.save(model.state_dict())``
  writes it, or a training checkpoint holding it under ``state_dict`` or ``model``; ``module.`` prefixes
  (DataParallel) and a ``model.`` prefix (a Lightning module wrapping the net) are stripped.

The model is always built with ``encoder_weights=None``: constructing it never downloads anything (a folder
saved from a model built with ImageNet encoder weights says ``"encoder_weights": "imagenet"``; its own file
holds every weight). Weights that do not fit the architecture fail at load with the missing and unexpected
parameter names. smp models need inputs divisible by their output stride (32 for five-level encoders): tiles
are padded by reflection up to the next multiple and the logits are cropped back, so any tile size runs.
Default normalisation: ImageNet mean/std (what smp's pretrained encoders expect; a card says otherwise).
The machinery (device worker, precision, batching, tile sizes) is
:class:`~qpbridge.families.torch_segmentation.TorchSegmentation`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families.base import register_family
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD
from qpbridge.families.torch_segmentation import TorchSegmentation
from qpbridge.families.weights import load_state_dict_file, load_weights_strict

__all__ = ["PadToStride", "SmpSegmentation", "build_smp_model", "smp_spec"]

STATE_FILES = ("model.safetensors", "pytorch_model.bin")


class PadToStride(torch.nn.Module):
    """Pads the input at the bottom/right to a multiple of ``stride`` (reflection) and crops the logits back."""

    def __init__(self, model: torch.nn.Module, stride: int) -> None:
        super().__init__()
        self.model = model
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> Any:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # aux_params: (mask logits, class logits)
            out = out[0]
        return out[..., :h, :w] if (ph or pw) else out


def smp_spec(card_params: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """The smp constructor arguments a card asks for (``arch`` and the keyword arguments)."""
    arch = card_params.get("arch")
    encoder = card_params.get("encoder")
    if not isinstance(arch, str) or not arch:
        raise ModelCardError("an smp card needs params.arch, the smp architecture (e.g. \"Unet\")")
    if not isinstance(encoder, str) or not encoder:
        raise ModelCardError("an smp card needs params.encoder, the smp encoder name (e.g. \"efficientnet-b0\")")
    extra = card_params.get("model_kwargs", {})
    if not isinstance(extra, dict):
        raise ModelCardError("smp card parameter 'model_kwargs' must be an object of constructor arguments")
    reserved = {"encoder_name", "encoder_weights", "classes"} & set(extra)
    if reserved:
        raise ModelCardError(f"smp params.model_kwargs must not set {', '.join(sorted(reserved))}: the card's "
                             "params.encoder and classes say them, and encoder weights are never downloaded")
    return {"arch": arch, "encoder_name": encoder, "classes": n_classes, **extra}


def build_smp_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The smp model of ``spec`` (from :func:`smp_spec` or a ``save_pretrained`` config), randomly initialised,
    without touching the network (``encoder_weights=None``)."""
    import segmentation_models_pytorch as smp

    kwargs = {k: v for k, v in spec.items() if k != "arch" and not k.startswith("_")}
    kwargs["encoder_weights"] = None
    arch = str(spec["arch"])
    classes = {a.lower(): a for a in smp.MODEL_ARCHITECTURES_MAPPING}
    if arch.lower() not in classes:
        names = sorted(c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise ModelCardError(f"unknown smp architecture '{arch}'; smp {smp.__version__} has {', '.join(names)}")
    try:
        model: torch.nn.Module = smp.create_model(arch, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelCardError(f"smp cannot build {arch} with {kwargs}: {type(exc).__name__}: {exc}") from exc
    return model


@register_family("smp")
class SmpSegmentation(TorchSegmentation):
    """A segmentation-models-pytorch model: architecture and encoder from the card, weights from a
    ``save_pretrained`` folder or a state dict file."""

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD
    weights_kind = "smp weights (a save_pretrained folder with config.json + model.safetensors, or a state dict .pth)"

    def _load(self, weights: Path, device: torch.device) -> torch.nn.Module:
        card = self.card
        spec = smp_spec(card.params, len(card.classes))
        if weights.is_dir():
            spec, state = self._read_folder(weights, spec)
        else:
            state = load_state_dict_file(weights, card.name)
        model = build_smp_model(spec)
        load_weights_strict(model, state, card.name, weights)
        encoder = getattr(model, "encoder", None)
        stride = int(getattr(encoder, "output_stride", 32) or 32)
        return PadToStride(model, stride).float().to(device)

    def _read_folder(self, folder: Path, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The folder's constructor arguments (checked against the card's) and its state dict."""
        name = self.card.name
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"model '{name}': {folder} is not an smp save_pretrained folder (no config.json); "
                                 "point the card's weights at the folder or at a state dict file", path=str(folder))
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelLoadError(f"model '{name}': {config_path} is not valid JSON: {exc}",
                                 path=str(config_path)) from exc
        saved_arch = str(config.get("_model_class", spec["arch"]))
        mismatch = []
        if saved_arch.lower() != str(spec["arch"]).lower():
            mismatch.append(f"architecture {saved_arch} (card: {spec['arch']})")
        if config.get("encoder_name", spec["encoder_name"]) != spec["encoder_name"]:
            mismatch.append(f"encoder {config.get('encoder_name')} (card: {spec['encoder_name']})")
        if int(config.get("classes", spec["classes"])) != spec["classes"]:
            mismatch.append(f"{config.get('classes')} classes (card lists {spec['classes']})")
        if mismatch:
            raise ModelLoadError(f"model '{name}': {folder} holds a model with " + ", ".join(mismatch) +
                                 "; the card must describe the saved model", path=str(folder))
        merged = {**{k: v for k, v in config.items() if not k.startswith("_")}, **spec, "arch": saved_arch}
        for file in STATE_FILES:
            if (folder / file).is_file():
                return merged, load_state_dict_file(folder / file, name)
        raise ModelLoadError(f"model '{name}': {folder} has no {' or '.join(STATE_FILES)}", path=str(folder))
