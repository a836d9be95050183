"""Trainer of the ``cyclegan`` family: unpaired stain translation (IHC <-> H&E) as CycleGAN (Zhu et al. 2017)
and junyanz/pytorch-CycleGAN-and-pix2pix train it.

Data: two image folders, ``DIR/trainA`` and ``DIR/trainB`` (that repository's layout; any RGB images, each at
least one crop in size), with ``DIR/testA`` and ``DIR/testB`` as the validation images when they exist, else a
fifth of each folder held out by the dataset split rule (``qpbridge.dataset.split_sources``, by file name).
Which domain is which is the user's choice: the card's ``params.direction`` (``AtoB``, the default, or
``BtoA``) says which generator the model folder serves.

Networks and losses are the repository's defaults: the family's ResNet generator (``params.ngf``,
``params.n_blocks``) in both directions, 70 x 70 PatchGAN discriminators (``params.ndf`` 64,
``params.n_layers_D`` 3, instance norm), least-squares GAN losses, cycle losses weighted 10 and identity
losses 0.5 x 10. Differences, so that the model fits the shared loop (one optimizer, one backward pass per
step): the generators' and discriminators' losses are summed and stepped together, the generators' adversarial
terms seeing the discriminators through detached parameters (so each network gets exactly its own gradients,
as in the repository's alternating steps, which also score the same batch's fakes); no pool of 50 earlier fakes;
the loop's AdamW and cosine schedule instead of Adam(0.5, 0.999) with a linear decay. Augmentation: random crops
with flips and 90° rotations only: colour jitter would change the very stain the model learns to produce.

Validation: the repository has no validation metric; ``cycle_psnr`` (the PSNR of A -> B -> A and B -> A -> B
against the validation images, dB, mean of both) measures how much of the image content survives a
translation, higher is better; ``cycle_l1`` (on [-1, 1] values) is recorded too. It cannot tell a faithful
translation from a merely invertible one: judge the translated images too (``qpbridge translate``).

The model folder holds the served generator's state dict (``weights.pt``, the repository's ``latest_net_G_A``
keys, which the family loads) and the other direction's in ``generator_<BtoA|AtoB>.pt``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qpbridge.errors import BadRequestError, ModelCardError
from qpbridge.families.cyclegan import DOWNSAMPLING, PaddedGenerator, ResnetGenerator
from qpbridge.families.params import bool_param, int_param
from qpbridge.training.augment import random_crops
from qpbridge.training.base import FamilyTrainer, register_trainer, save_state_dict
from qpbridge.training.data import TileSet, _read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LAMBDA_CYCLE = 10.0
LAMBDA_IDENTITY = 0.5


class NLayerDiscriminator(nn.Module):
    """The repository's PatchGAN discriminator (``--netD basic``, instance norm)."""

    def __init__(self, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1, bias=True),
                       nn.InstanceNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


class CycleGAN(nn.Module):
    """Both generators and both discriminators, one module for the loop's optimizer and checkpoint."""

    def __init__(self, ngf: int, n_blocks: int, use_dropout: bool, ndf: int, n_layers: int) -> None:
        super().__init__()
        self.G_A = ResnetGenerator(3, 3, ngf, n_blocks, use_dropout)  # A -> B
        self.G_B = ResnetGenerator(3, 3, ngf, n_blocks, use_dropout)  # B -> A
        self.D_A = NLayerDiscriminator(ndf, n_layers)  # real B vs G_A(A), the repository's naming
        self.D_B = NLayerDiscriminator(ndf, n_layers)  # real A vs G_B(B)


def _frozen(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` with gradients to ``x`` only (the generator's adversarial term must not train the critic)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    out: torch.Tensor = torch.func.functional_call(net, params, (x,))
    return out


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(pred.float(), torch.full_like(pred.float(), 1.0 if real else 0.0))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def load_unpaired(root: Path) -> TileSet:
    """``trainA``/``trainB`` as split ``train``, ``testA``/``testB`` as ``val``, each image's source
    ``A/<file>`` or ``B/<file>``."""
    from qpbridge.dataset import split_sources

    root = Path(root)
    data = TileSet(root=root, mode="unpaired", mpp=None, classes=[], licence=None)
    for domain in ("A", "B"):
        train_files = _images(root / f"train{domain}")
        if not train_files:
            raise BadRequestError(f"{root / f'train{domain}'} has no images: a CycleGAN trains on two image "
                                  "folders, DIR/trainA and DIR/trainB (optional DIR/testA, DIR/testB for validation)")
        val_files = _images(root / f"test{domain}")
        if not val_files:
            split = split_sources([p.name for p in train_files], 0.2)
            val_files = [p for p in train_files if split[p.name] == "val"]
            train_files = [p for p in train_files if split[p.name] == "train"]
        if not val_files:
            raise BadRequestError(f"{root}: domain {domain} needs at least two images (one held out for "
                                  f"validation), or a test{domain} folder")
        for split_name, files in (("train", train_files), ("val", val_files)):
            for path in files:
                data.images.setdefault(split_name, []).append(_read_rgb(path))
                data.masks.setdefault(split_name, []).append(np.zeros((0, 0), np.int32))  # unpaired: no masks
                data.types.setdefault(split_name, []).append(None)
                data.names.setdefault(split_name, []).append(path.name)
                data.sources.setdefault(split_name, []).append(f"{domain}/{path.name}")
    return data


def domain_images(data: TileSet, split: str, domain: str) -> list[np.ndarray]:
    return [im for im, src in zip(data.images.get(split, []), data.sources.get(split, []), strict=True)
            if src.startswith(f"{domain}/")]


@register_trainer("cyclegan")
class CycleGANTrainer(FamilyTrainer):
    metric = "cycle_psnr"
    mode = "unpaired"

    def __init__(self, card: dict[str, Any], data: TileSet, device: torch.device, *, batch_size: int,
                 crop: int | None) -> None:
        super().__init__(card, data, device, batch_size=batch_size, crop=crop)
        params = card.get("params", {})
        if card.get("task") != "image-translation":
            raise ModelCardError(f"a cyclegan card's task is image-translation, not {card.get('task')}")
        direction = params.get("direction", "AtoB")
        if direction not in ("AtoB", "BtoA"):
            raise ModelCardError(f"card parameter 'direction' must be AtoB or BtoA, got {direction!r}")
        self.direction = str(direction)
        self.arch = {"ngf": int_param(params, "ngf", 64, 1), "n_blocks": int_param(params, "n_blocks", 9, 0),
                     "use_dropout": bool_param(params, "use_dropout", False),
                     "ndf": int_param(params, "ndf", 64, 1), "n_layers": int_param(params, "n_layers_D", 3, 1)}
        smallest = min(min(im.shape[:2]) for im in data.images["train"])
        side = min(crop or int(card["tile"]["size"]), smallest)
        if side < 16:
            raise BadRequestError(f"the smallest training image of {data.root} is {smallest} px; crops need 16 px")
        self.crop = side // DOWNSAMPLING * DOWNSAMPLING
        self._tiles = {d: [{"image": torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(device)}
                           for im in domain_images(data, "train", d)] for d in ("A", "B")}

    @classmethod
    def load_data(cls, root: Path) -> TileSet:
        return load_unpaired(root)

    def build_model(self) -> torch.nn.Module:
        a = self.arch
        return CycleGAN(int(a["ngf"]), int(a["n_blocks"]), bool(a["use_dropout"]), int(a["ndf"]), int(a["n_layers"]))

    def batches(self, rng: np.random.Generator, n_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        done = 0
        while done < n_samples:
            n = min(self.batch_size, n_samples - done)
            batch = {d: random_crops(self._tiles[d], rng, n, int(self.crop or 16))["image"].float() / 127.5 - 1.0
                     for d in ("A", "B")}
            done += n
            yield batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net: Any = model
        real_a, real_b = batch["A"], batch["B"]
        fake_b, fake_a = net.G_A(real_a), net.G_B(real_b)
        rec_a, rec_b = net.G_B(fake_b), net.G_A(fake_a)
        gan = _lsgan(_frozen(net.D_A, fake_b), True) + _lsgan(_frozen(net.D_B, fake_a), True)
        cycle = LAMBDA_CYCLE * (F.l1_loss(rec_a.float(), real_a) + F.l1_loss(rec_b.float(), real_b))
        identity = LAMBDA_CYCLE * LAMBDA_IDENTITY * (F.l1_loss(net.G_A(real_b).float(), real_b)
                                                     + F.l1_loss(net.G_B(real_a).float(), real_a))
        critic = 0.5 * (_lsgan(net.D_A(real_b), True) + _lsgan(net.D_A(fake_b.detach()), False)
                        + _lsgan(net.D_B(real_a), True) + _lsgan(net.D_B(fake_a.detach()), False))
        total = gan + cycle + identity + critic
        return total, {"gan": gan.detach(), "cycle": cycle.detach(), "idt": identity.detach(), "d": critic.detach()}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        net: Any = model
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else nullcontext()
        psnr, l1 = [], []
        for domain, there, back in (("A", net.G_A, net.G_B), ("B", net.G_B, net.G_A)):
            forward, backward = PaddedGenerator(there), PaddedGenerator(back)
            for image in domain_images(self.data, "val", domain):
                x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device)
                x = x.float() / 127.5 - 1.0
                with autocast:
                    rec = backward(forward(x)).float().clamp(-1.0, 1.0)
                mse = float(((rec - x) / 2.0).pow(2).mean())  # on [0, 1] values
                psnr.append(10.0 * np.log10(1.0 / max(mse, 1e-10)))
                l1.append(float((rec - x).abs().mean()))
        if not psnr:
            raise BadRequestError(f"{self.data.root} has no validation images")
        return {"cycle_psnr": float(np.mean(psnr)), "cycle_l1": float(np.mean(l1))}

    def export(self, model: torch.nn.Module, out: Path, name: str) -> dict[str, Any]:
        net: Any = model
        served, other = (net.G_A, net.G_B) if self.direction == "AtoB" else (net.G_B, net.G_A)
        reverse = "BtoA" if self.direction == "AtoB" else "AtoB"
        for generator, file in ((served, "weights.pt"), (other, f"generator_{reverse}.pt")):
            save_state_dict(generator.state_dict(), out / file)
        return self.served_card(name, "weights.pt", ngf=self.arch["ngf"], n_blocks=self.arch["n_blocks"],
                                use_dropout=self.arch["use_dropout"])
