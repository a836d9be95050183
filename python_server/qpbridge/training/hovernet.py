"""Trainer of the ``hovernet`` family: random crops of the training tiles, kept on the device with their
HV targets, dihedral transforms and stain jitter there, HoVer-Net's losses, and PQ on the validation tiles
after HoVer-Net's post-processing (the family's own, so validation measures what serving will do)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpbridge.errors import BadRequestError
from qpbridge.families.hovernet_net import HoverArch, HoverNet, split_output
from qpbridge.families.hovernet_post import HoverPostParams, hover_instances
from qpbridge.families.torch_runtime import Normalization
from qpbridge.metrics import instance_metrics
from qpbridge.training.augment import ColourJitter, hv_signs, random_crops
from qpbridge.training.base import FamilyTrainer, register_trainer, save_state_dict
from qpbridge.training.data import TileSet
from qpbridge.training.losses import hover_loss
from qpbridge.training.targets import hv_maps

MAX_WEIGHTS_BYTES = 25 * 1024 * 1024


@register_trainer("hovernet")
class HoverNetTrainer(FamilyTrainer):
    metric = "pq"
    mode = "instances"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        params = card.get("params", {})
        self.arch = HoverArch.from_params(params)
        self.post = HoverPostParams.from_params(params)
        self.norm = Normalization.from_card(card.get("normalization", {}))
        self.jitter = ColourJitter()
        self._signs = hv_signs(device)
        self._mean = torch.tensor(self.norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.norm.std, device=device).view(1, 3, 1, 1)
        m = self.arch.multiple
        smallest = min(min(im.shape[:2]) for im in data.images["train"])
        side = crop or min(int(card["tile"]["size"]), smallest)
        self.crop = max(m, min(side, smallest) // m * m)
        if self.arch.n_types and any(t is None for t in data.types.get("train", [])):
            raise BadRequestError(f"the card's arch has {self.arch.n_types} types but {data.root} has no types/ "
                                  "masks: export with --format instance, or set arch.n_types to 0")
        # Training tiles live on the device with their targets: crops are cut there, no host work per step.
        self._tiles: list[dict[str, torch.Tensor]] = []
        for i, (image, mask) in enumerate(zip(data.images["train"], data.masks["train"], strict=True)):
            tile = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(device),
                    "labels": torch.from_numpy(mask).to(device),
                    "hv": torch.from_numpy(hv_maps(mask)).to(device)}
            types = data.types["train"][i]
            if self.arch.n_types and types is not None:
                tile["types"] = torch.from_numpy(types.astype(np.int64)).to(device)
            self._tiles.append(tile)

    def build_model(self) -> torch.nn.Module:
        return HoverNet(self.arch)

    def _normalise(self, rgb01: torch.Tensor) -> torch.Tensor:
        return (rgb01 * (255.0 / self.norm.scale) - self._mean) / self._std

    def batches(self, rng: np.random.Generator, n_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        c = int(self.crop or 0)
        done = 0
        while done < n_samples:
            n = min(self.batch_size, n_samples - done)
            batch = random_crops(self._tiles, rng, n, c, self._signs)
            colour = self.jitter.draw(rng, n)
            rgb = self.jitter.apply(batch.pop("image").float() / 255.0, colour)
            # One memory format for input and model: a channels-last input into a contiguous model crashes
            # torch's CPU convolution backward (torch 2.14, batches of 8).
            fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
            batch["input"] = self._normalise(rgb).contiguous(memory_format=fmt)
            done += n
            yield batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = split_output(model(batch["input"]))
        return hover_loss(out, batch)

    @torch.no_grad()
    def predict_maps(self, model: torch.nn.Module, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """NP probability and HV maps of whole tiles (padded by reflection to the network's multiple)."""
        m = self.arch.multiple
        out: list[dict[str, np.ndarray]] = []
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        for image in images:
            h, w = image.shape[:2]
            ph, pw = -(-h // m) * m, -(-w // m) * m
            padded = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
            x = torch.from_numpy(padded).permute(2, 0, 1)[None].to(self.device).float() / 255.0
            with autocast:
                named = split_output(model(self._normalise(x)).float())
            prob = torch.softmax(named["np"], dim=1)[0, 1, :h, :w].cpu().numpy()
            out.append({"np": prob, "hv": named["hv"][0, :, :h, :w].cpu().numpy()})
        return out

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        images, masks = self.data.images.get("val", []), self.data.masks.get("val", [])
        if not images:
            raise BadRequestError(f"{self.data.root} has no validation tiles (split 'val'): training needs them "
                                  "for early stopping and the model's metrics")
        maps = self.predict_maps(model, images)
        mpp = float(self.card["mpp"])

        def one(i: int) -> dict[str, float] | None:
            pred = hover_instances(maps[i]["np"], maps[i]["hv"], mpp, self.post)
            if masks[i].max() == 0 and pred.max() == 0:
                return None  # nothing to find and nothing found: no PQ
            return {k: float(v) for k, v in instance_metrics(masks[i], pred).items()
                    if isinstance(v, (int, float))}

        with ThreadPoolExecutor() as pool:  # post-processing and metrics release the GIL for most of their work
            rows = [r for r in pool.map(one, range(len(images))) if r is not None]
        if not rows:
            return {self.metric: 0.0}
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        means: dict[str, float] = {}
        for k in keys:  # a metric undefined on a tile (no match to average over) is left out of its mean
            finite = [r[k] for r in rows if math.isfinite(r[k])]
            if finite:
                means[k] = float(np.mean(finite))
        means.setdefault(self.metric, 0.0)
        return means

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        state = dict(model.state_dict())
        size = sum(v.numel() * v.element_size() for v in state.values())
        if size > MAX_WEIGHTS_BYTES:  # fp16 halves it; BN statistics and weights keep 3 significant digits
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_state_dict(state, out / "weights.pt")
        return self.served_card(name, "weights.pt", format="state_dict",
                                arch={"width": self.arch.width, "levels": self.arch.levels,
                                      "blocks": self.arch.blocks, "n_types": self.arch.n_types})
