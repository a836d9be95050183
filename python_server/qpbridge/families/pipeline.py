"""``pipeline``: image translators chained before a model, run as one forward pass on the device.

A pipeline card names its stages: ``"family": "pipeline", "pipeline": ["ihc2he", "my-nuclei"]``. Every stage
but the last translates images (family ``cyclegan``); the last is any model. The card runs through the
engine like its last stage (same task, classes and object type, which the card repeats and which are checked
at load; every stage works at the card's µm/px): plans, batches, stitching and features are the last stage's.

On the device. When the last stage's family runs its model on a
:class:`~qpbridge.families.torch_runtime.DeviceWorker` (every torch family here: ``self.worker``), the
pipeline builds one module, :class:`Chain`: generator(s), then the conversion to the next stage's input
(tanh output -> RGB 0..255 -> that stage's ``(x / scale - mean) / std``), then the last model; a new worker
runs it with the first stage's normalisation and the last stage's precision, batching, head and autograd
settings (``compile`` when the pipeline card or ``serve --compile`` asks for it), and replaces the last
stage's worker, so the last family's own ``predict`` (padding, grouping, post-processing) runs the whole
chain. Nothing is copied to the host between stages.

The RGB between stages is rounded to whole grey levels on the device (``tanh_to_rgb``): the chained model
then sees exactly the pixels ``translate`` returns as uint8, so chained results equal translating and
running the model by hand (the tests check this), and a ``translate`` preview shows what the model saw.

A last stage without a device worker (the built-in CPU models) gets the translated tiles copied back as
uint8 and runs on them on the host: this is the one case with a host round trip, and it says so in the log.

Stage names resolve relative to the pipeline card (:mod:`qpbridge.cards.stages`): a sibling card folder (the
same models directory), then the built-in cards; a name with a ``/`` is a model folder path relative to the
card's folder. The card repeats what the engine reads of the last stage: task, object type and classes, and
for instance models the largest object (``params.max_object_um`` or ``max_area_um2``, which sets the tile
overlap); these are checked at load. Post-processing (``postprocess``) is the pipeline card's own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from qpbridge.cards.stages import stage_card
from qpbridge.errors import ModelCardError
from qpbridge.families.base import ModelFamily, TileResult, create_model, register_family
from qpbridge.families.cyclegan import (
    CycleGANTranslator,
    generator_normalization,
    group_by_size,
    load_generator,
    rgb_head,
    tanh_to_rgb,
)
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import DeviceWorker, Head, Normalization, resolve_torch_device, worker_settings
from qpbridge.families.torch_segmentation import pad_to

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

log = logging.getLogger("qpbridge")

MPP_TOLERANCE = 0.01


class _Normalize(nn.Module):
    """RGB 0..255 (float) -> ``(x / scale - mean) / std`` in float32, as the worker normalises uint8 tiles."""

    mul: torch.Tensor
    sub: torch.Tensor

    def __init__(self, norm: Normalization) -> None:
        super().__init__()
        std = torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mul", 1.0 / (norm.scale * std), persistent=False)
        self.register_buffer("sub", mean / std, persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        # the same x * mul - sub the worker computes, so chained and by-hand inputs agree to the last bit
        return rgb.mul(self.mul.float()).sub(self.sub.float())


class Translators(nn.Module):
    """Generators in sequence, each one's output rounded to RGB and normalised for the next; returns the last
    generator's tanh output."""

    def __init__(self, generators: Sequence[nn.Module], norms: Sequence[Normalization]) -> None:
        super().__init__()
        self.generators = nn.ModuleList(generators)
        self.between = nn.ModuleList(_Normalize(n) for n in norms[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, gen in enumerate(self.generators):
            if i:
                y = self.between[i - 1](tanh_to_rgb(y)).to(x.dtype)
            y = gen(y)
        return y


class Chain(nn.Module):
    """Translators, then the last model on their output converted to its normalisation. With ``with_input``
    the output is ``(model output, model input)``, for a head that reads the input it was given."""

    def __init__(self, translators: Translators, final_norm: Normalization, final: Any, with_input: bool) -> None:
        super().__init__()
        self.translators = translators
        self.normalize = _Normalize(final_norm)
        self.final = final
        self.with_input = with_input

    def forward(self, x: torch.Tensor) -> Any:
        x2 = self.normalize(tanh_to_rgb(self.translators(x))).to(x.dtype)
        out = self.final(x2)
        return (out, x2) if self.with_input else out


def _chained_head(head: Head) -> Head:
    def chained(output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return head(output[0], output[1])

    return chained


def check_stages(card: ModelCard, stages: Sequence[ModelCard]) -> None:
    """Refuse a pipeline whose stages cannot chain, or whose card does not describe what its last stage makes."""
    *front, last = stages
    for st in front:
        if st.family != CycleGANTranslator.family:
            raise ModelCardError(f"pipeline '{card.name}': stage '{st.name}' is a {st.family} model; every stage "
                                 "but the last must translate images (family cyclegan)")
    if last.family in (CycleGANTranslator.family, Pipeline.family):
        raise ModelCardError(f"pipeline '{card.name}': the last stage '{last.name}' must be a segmentation model, "
                             f"not {last.family}")
    mine = (card.task, card.object_type, [c.name for c in card.classes])
    theirs = (last.task, last.object_type, [c.name for c in last.classes])
    if mine != theirs:
        raise ModelCardError(f"pipeline '{card.name}' must describe what its last stage '{last.name}' makes: task, "
                             f"object type and classes {theirs}, but the card has {mine}")
    if card.max_object_um != last.max_object_um:
        raise ModelCardError(f"pipeline '{card.name}' must give the largest object its last stage '{last.name}' "
                             f"gives (params max_object_um / max_area_um2: {last.max_object_um} µm), which the "
                             f"engine plans tile overlaps with; the card gives {card.max_object_um}")
    for st in stages:
        if abs(st.mpp / card.mpp - 1.0) > MPP_TOLERANCE:
            raise ModelCardError(f"pipeline '{card.name}' runs at {card.mpp} µm/px but its stage '{st.name}' "
                                 f"works at {st.mpp} µm/px; all stages must share one pixel size")


@register_family("pipeline")
class Pipeline(ModelFamily):
    """Translators chained before a model; results are the last stage's."""

    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        if len(card.pipeline) < 2:
            raise ModelCardError(f"pipeline '{card.name}' needs at least two stages in 'pipeline', got "
                                 f"{list(card.pipeline)}")
        stages = [stage_card(card, name) for name in card.pipeline]
        check_stages(card, stages)
        last = stages[-1]
        # `serve --compile` (the pipeline card's params) or the last stage's card compiles the fused chain; the
        # last stage itself is built uncompiled, so that no compile of it alone runs in the background
        compile_chain = card.params.get("compile") is True or last.params.get("compile") is True
        stages[-1] = dataclasses.replace(last, params={**last.params, "compile": False})
        self.stages = stages
        self.torch_device = resolve_torch_device(device)
        front = stages[:-1]
        norms = [generator_normalization(c) for c in front]
        translators = Translators([load_generator(c, self.torch_device) for c in front], norms)
        self.final = create_model(stages[-1], device)
        self._lock = threading.Lock()
        old = getattr(self.final, "worker", None)
        self.on_device = isinstance(old, DeviceWorker) and old.model is not None
        if isinstance(old, DeviceWorker) and old.model is not None:
            chain = Chain(translators, old.normalization, old.model, with_input=old.head is not None)
            self.worker = DeviceWorker(
                chain, self.torch_device, name=card.name, n_outputs=old.n_outputs, normalization=norms[0],
                precision=old.precision, max_batch=old.max_batch, max_wait_s=old.max_wait_s,
                channels_last=old.channels_last, weights="autocast" if old.weights == "autocast" else "cast",
                compile_shape=(old.max_batch, last.tile_size, last.tile_size) if compile_chain else None,
                compile_mode=old.compile_mode, graph_shape=None if compile_chain else old.graph_shape,
                head=_chained_head(old.head) if old.head is not None else None,
                autograd=old.autograd)
            old.close()
            setattr(self.final, "worker", self.worker)  # noqa: B010 - the last family's predict runs the chain
        else:
            log.info("pipeline %s: the last stage %s (%s) runs on the host; translated tiles are copied back",
                     card.name, stages[-1].name, stages[-1].family)
            self.worker = DeviceWorker(translators, self.torch_device, name=card.name, normalization=norms[0],
                                       head=rgb_head, **worker_settings(front[0]))
        try:  # one blank tile through the whole chain: a stage that cannot run fails at load
            self.predict([np.zeros((card.tile_size, card.tile_size, 3), dtype=np.uint8)])
        except BaseException:
            self.close()
            raise

    def _translated(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(checked)
        for (h, w), idx in group_by_size(checked, self.card.tile_size).items():
            rgb = self.worker.run(np.stack([pad_to(checked[i], h, w) for i in idx]))["rgb"]
            for j, i in enumerate(idx):
                out[i] = np.ascontiguousarray(rgb[j, :checked[i].shape[0], :checked[i].shape[1]])
        return out

    def _host_call(self, tiles: Sequence[np.ndarray], native: bool, on_device: bool) -> list[TileResult]:
        rgb = self._translated(tiles)
        call = (lambda: self.final.predict_native(rgb, on_device=on_device)) if native else \
            (lambda: self.final.predict(rgb))
        if self.final.thread_safe:
            return call()
        with self._lock:
            return call()

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        if self.on_device:
            return self.final.predict(tiles)
        return self._host_call(tiles, False, False)

    def predict_native(self, tiles: Sequence[np.ndarray], *, on_device: bool = False) -> list[TileResult]:
        if self.on_device:
            return self.final.predict_native(tiles, on_device=on_device)
        return self._host_call(tiles, True, on_device)

    def device_busy_s(self) -> float | None:
        return self.worker.device_busy_s()

    def close(self) -> None:
        self.worker.close()
        close = getattr(self.final, "close", None)
        if callable(close):
            close()
