"""``hovernet``: HoVer-style nucleus models (nucleus pixels, horizontal/vertical distance maps, optional types).

The network is :class:`~qpbridge.families.hovernet_net.HoverNet` (``params.arch``), held as

- ``params.format = "state_dict"`` (default): ``card.weights`` is a ``torch.save`` of its state dict (a plain
  dict of tensors, or ``{"model": state_dict}`` as ``qpbridge train`` checkpoints hold it), read and loaded
  by :mod:`qpbridge.families.weights` (``weights_only=True``, strict);
- ``params.format = "torchscript"``: ``card.weights`` is a ``torch.jit.save`` file of any module with the same
  output layout (N, 4 [+ n_types + 1], H, W): NP logits, HV, TP logits.

The model runs on the shared :class:`~qpbridge.families.torch_runtime.DeviceWorker` (batching across callers,
fp16 weights on CUDA, pinned asynchronous copies); its ``head`` turns the raw output into the nucleus
probability, the HV maps and the argmax type on the device, so only those come back. Post-processing
(:mod:`qpbridge.families.hovernet_post`, HoVer-Net's marker-controlled watershed) runs per tile on the shared
post-processing pool, on all cores. Results are :class:`InstanceResult` per tile; the engine keeps each
nucleus once across tile seams.

Types: with ``arch.n_types`` = n > 0 the card lists n classes, type t (1..n) being ``classes[t - 1]``
(PanNuke's Neoplastic, Inflammatory, Connective, Dead, Epithelial in ``hovernet_card_dict``'s default);
without types every nucleus is ``classes[0]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families.base import InstanceResult, ModelFamily, TileResult, card_weights, register_family
from qpbridge.families.hovernet_net import HoverArch, HoverNet, split_output
from qpbridge.families.hovernet_post import HoverPostParams, hover_instances, instance_types
from qpbridge.families.params import choice_param
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import (
    DeviceWorker,
    Normalization,
    resolve_torch_device,
    worker_settings,
)
from qpbridge.families.torch_segmentation import pad_to
from qpbridge.families.weights import load_state_dict_file, load_torchscript, load_weights_strict

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

PANNUKE_TYPES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Neoplastic", (255, 0, 0)),
    ("Inflammatory", (0, 255, 0)),
    ("Connective", (0, 0, 255)),
    ("Dead", (255, 255, 0)),
    ("Epithelial", (255, 165, 0)),
)
PROBABILITY = "Nucleus: probability mean"
FORMATS = ("state_dict", "torchscript")


def build_network(card: ModelCard, weights: Path | None) -> torch.nn.Module:
    """The card's network (fp32, CPU), with its weights when given."""
    arch = HoverArch.from_params(card.params)
    fmt = choice_param(card.params, "format", FORMATS, "state_dict", "hovernet")
    if weights is None:
        return HoverNet(arch)
    if fmt == "torchscript":
        return load_torchscript(weights, card.name, torch.device("cpu"),
                                hint='a state dict needs "format": "state_dict"')
    state = load_state_dict_file(weights, card.name, hint='a TorchScript file needs "format": "torchscript"')
    net = HoverNet(arch)
    load_weights_strict(net, state, card.name, weights, target=f"the card's arch {arch}")
    return net


def check_card_classes(card: ModelCard, arch: HoverArch) -> None:
    if arch.n_types and len(card.classes) != arch.n_types:
        raise ModelCardError(f"hovernet card '{card.name}' has arch.n_types = {arch.n_types} but lists "
                             f"{len(card.classes)} classes; list one class per type, in the type order")


@register_family("hovernet")
class HoverNetFamily(ModelFamily):
    """HoVer-style nuclei: NP/HV(/TP) maps on the device worker, HoVer-Net's watershed on all cores."""

    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        if card.mpp <= 0:
            raise ModelCardError(f"hovernet card '{card.name}' needs a positive mpp, got {card.mpp}")
        params = card.params
        self.arch = HoverArch.from_params(params)
        check_card_classes(card, self.arch)
        self.post = HoverPostParams.from_params(params)
        if card.tile_size % self.arch.multiple:
            raise ModelCardError(f"hovernet card '{card.name}': tile size {card.tile_size} must be a multiple of "
                                 f"{self.arch.multiple} (2 ** (arch.levels - 1))")
        settings = worker_settings(card, compile=True)
        self.torch_device = resolve_torch_device(device)
        weights = card_weights(card, f"weights ({card.params.get('format', 'state_dict')})", file_only=True)
        model = build_network(card, weights)
        self.worker = DeviceWorker(model, self.torch_device, name=card.name,
                                   normalization=Normalization.from_card(card.normalization), head=self._head,
                                   **settings)
        self.worker.warm_up(card.tile_size)  # a broken model fails at load, not mid-job

    def _head(self, output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = output if isinstance(output, torch.Tensor) else output[0]
        if out.ndim != 4 or out.shape[1] != self.arch.out_channels:
            raise ModelLoadError(f"model '{self.card.name}' returned shape {tuple(out.shape)}; its card's arch "
                                 f"(n_types = {self.arch.n_types}) needs N x {self.arch.out_channels} x H x W")
        named = split_output(out.float())
        dtype = torch.float32 if x.dtype == torch.float32 else torch.float16  # numpy has no bfloat16
        result = {"np": torch.softmax(named["np"], dim=1)[:, 1].to(dtype), "hv": named["hv"].to(dtype)}
        if "tp" in named:
            result["tp"] = torch.argmax(named["tp"], dim=1).to(torch.uint8)
        return result

    def maps(self, tiles: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The model's maps of each tile, cropped to it: ``np`` (H, W), ``hv`` (2, H, W), ``tp`` (H, W)."""
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        size, m = self.card.tile_size, self.arch.multiple
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(checked):
            h = max(size, -(-t.shape[0] // m) * m)
            w = max(size, -(-t.shape[1] // m) * m)
            groups.setdefault((h, w), []).append(i)
        futures = [(idx, self.worker.submit(np.stack([pad_to(checked[i], h, w) for i in idx])))
                   for (h, w), idx in groups.items()]
        out: list[dict[str, np.ndarray]] = [{} for _ in checked]
        for idx, fut in futures:
            res = fut.result()
            for j, i in enumerate(idx):
                h, w = checked[i].shape[:2]
                out[i] = {k: v[j][..., :h, :w] for k, v in res.items()}
        return out

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        maps = self.maps(tiles)
        if len(maps) <= 1:
            return [self.postprocess(m) for m in maps]
        from qpbridge.pools import postprocess_pool

        return list(postprocess_pool().map(self.postprocess, maps))

    def postprocess(self, maps: dict[str, np.ndarray]) -> InstanceResult:
        """One tile's maps -> labelled nuclei with their classes and mean nucleus probability."""
        prob = np.asarray(maps["np"], dtype=np.float32)
        labels = hover_instances(prob, np.asarray(maps["hv"], dtype=np.float32), self.card.mpp, self.post)
        n = int(labels.max())
        class_of: dict[int, int] = {}
        if "tp" in maps and self.arch.n_types:
            class_of = {k: t - 1 for k, t in instance_types(labels, maps["tp"], self.arch.n_types).items()}
        measurements: dict[int, dict[str, float]] = {}
        if n:
            flat = labels.ravel()
            counts = np.maximum(np.bincount(flat, minlength=n + 1), 1)
            mean = np.bincount(flat, weights=prob.ravel(), minlength=n + 1) / counts
            measurements = {i: {PROBABILITY: float(mean[i])} for i in range(1, n + 1)}
        return InstanceResult(labels=labels, class_of=class_of, measurements=measurements)

    def device_busy_s(self) -> float | None:
        return self.worker.device_busy_s()

    def close(self) -> None:
        self.worker.close()


def hovernet_card_dict(name: str, *, mpp: float = 0.25, tile_size: int = 256, n_types: int = 0,
                       arch: dict[str, int] | None = None, weights: str | None = "weights.pt",
                       fmt: str = "state_dict", description: str = "", licence: str = "",
                       max_object_um: float = 16.0) -> dict[str, Any]:
    """A hovernet card (as JSON data): PanNuke's five types as the classes when ``n_types`` is 5 (else
    ``Type 1..n``), one ``Nucleus`` class without types."""
    if n_types == len(PANNUKE_TYPES):
        classes = [{"name": n, "color": list(c)} for n, c in PANNUKE_TYPES]
    elif n_types:
        classes = [{"name": f"Type {i}", "color": [(70 * i) % 256, (150 + 40 * i) % 256, (200 - 30 * i) % 256]}
                   for i in range(1, n_types + 1)]
    else:
        classes = [{"name": "Nucleus", "color": [30, 60, 200]}]
    return {
        "schema_version": 1, "name": name, "family": "hovernet", "task": "instance-segmentation",
        "description": description or "HoVer-style nuclei (NP/HV branches, marker-controlled watershed).",
        "object_type": "detection", "classes": classes,
        "tile": {"size": tile_size, "overlap": 32, "batch_size": 16},
        "mpp": mpp, "requires_mpp": True,
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 255.0},
        "postprocess": {"simplify_um": 0.25, "min_area_um2": 3.0},
        "params": {"format": fmt, "arch": {**(arch or {}), "n_types": n_types}, "precision": "fp16",
                   "max_object_um": max_object_um},
        "weights": weights, "licence": licence,
    }
