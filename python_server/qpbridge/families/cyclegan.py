"""``cyclegan``: the ResNet generator of CycleGAN (Zhu et al. 2017) for stain translation, IHC -> H&E and back.

The architecture is the one of ``ResnetGenerator`` in junyanz/pytorch-CycleGAN-and-pix2pix
(``models/networks.py``, ``--netG resnet_9blocks --norm instance --no_dropout``), module for module, so the
``latest_net_G_A.pth`` / ``latest_net_G_B.pth`` a user trained with that repository load as they are
(``G_A`` maps domain A to B: which of the two is IHC -> H&E depends on how the dataset's ``trainA`` and
``trainB`` were filled; the card's README says so). Its state-dict keys are ``model.<i>.weight`` /
``model.<i>.bias`` for the convolutions of one ``nn.Sequential`` and ``model.<i>.conv_block.{1,5}.*`` for the
residual blocks (``conv_block.{1,6}`` with dropout): reflection padding 3, 7x7 conv, two stride-2 3x3 convs,
``n_blocks`` residual blocks at ``4 * ngf`` channels, two stride-2 transposed convs, reflection padding 3, 7x7
conv, tanh. Instance norm without affine parameters or running statistics, so biases are on (the repository's
``use_bias``). Old checkpoints that carry InstanceNorm ``running_mean``/``running_var`` entries (torch < 0.4)
have them dropped, as the repository's own loader does.

Weights: that state dict (``.pth``), or a TorchScript file of a generator taking N x 3 x H x W in [-1, 1] and
returning the same in [-1, 1]; the file itself says which (see :mod:`qpbridge.families.weights`).

Pixels. Inputs are normalised to [-1, 1] (``x / 255 * 2 - 1``: card normalisation mean 0.5, std 0.5, the
repository's ``Normalize((0.5,)*3, (0.5,)*3)``); the tanh output goes back to RGB as
``round((y + 1) * 127.5)`` clipped to [0, 255], on the device, and only the uint8 image is copied back (a
quarter of the bytes of float32). The repository's ``tensor2im`` truncates instead of rounding: its saved
images can differ from ours by one grey level. Tiles need not have sizes that are multiples of 4 (the
generator's two stride-2 stages): they are padded by reflection to the next multiple and cropped back.

Use. :meth:`CycleGANTranslator.translate` turns uint8 RGB tiles into translated uint8 RGB tiles (the server's
``translate`` op and ``qpbridge translate``, which tiles large images with overlap and blends them, see
:mod:`qpbridge.translation`). A translation card (``task: image-translation``) has no classes and does not
segment: ``predict`` refuses; chain it before a segmentation model with a pipeline card
(:mod:`qpbridge.families.pipeline`), which runs both on the device in one forward pass.

Card ``params``: ``ngf`` (64), ``n_blocks`` (9), ``use_dropout`` (false), ``precision``, ``max_batch``,
``batch_wait_ms``, ``channels_last``, as for the other torch families.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families.base import ModelFamily, TileResult, register_family
from qpbridge.families.params import bool_param, int_param
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import (
    DeviceWorker,
    Normalization,
    resolve_torch_device,
    worker_settings,
)
from qpbridge.families.torch_segmentation import pad_to
from qpbridge.families.weights import is_torchscript, load_state_dict_file, load_torchscript, load_weights_strict

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

# [-1, 1] inputs: (x / 255 - 0.5) / 0.5
CYCLEGAN_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
CYCLEGAN_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
DOWNSAMPLING = 4  # two stride-2 stages


class ResnetBlock(nn.Module):
    """Residual block of the repository: pad, conv 3x3, norm, ReLU, [dropout], pad, conv 3x3, norm."""

    def __init__(self, dim: int, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=True),
                                   nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, padding=0, bias=True), nn.InstanceNorm2d(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator (``resnet_9blocks`` with the defaults), layer indices as in the repository."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9,
                 use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, padding=0, bias=True),
                                   nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2 ** i
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                       nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                          bias=True),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PaddedGenerator(nn.Module):
    """A generator on any input size: reflection-padded to a multiple of 4 at the bottom/right, cropped back."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = -h % DOWNSAMPLING, -w % DOWNSAMPLING
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        y: torch.Tensor = self.generator(x)
        return y[..., :h, :w] if (ph or pw) else y


def tanh_to_rgb(y: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> RGB values 0..255 as the uint8 image holds them (rounded, float32)."""
    return ((y.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()


def rgb_head(output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The worker's head for translation: uint8 NHWC (the tile layout), so only bytes come back."""
    return {"rgb": tanh_to_rgb(output).to(torch.uint8).permute(0, 2, 3, 1)}


def load_generator(card: ModelCard, device: torch.device) -> nn.Module:
    """The card's generator (state dict into :class:`ResnetGenerator`, or TorchScript), padded for any size."""
    weights = card.weights
    readme = f"see {card.folder / 'README.md'}" if card.folder is not None else "see the model card's README"
    if weights is None:
        raise ModelLoadError(f"model '{card.name}' has no 'weights' in its card; {readme}")
    if not weights.is_file():
        raise ModelLoadError(f"model '{card.name}' needs its generator weights (a CycleGAN latest_net_G_A.pth "
                             f"state dict, or a TorchScript file) at {weights}, which does not exist; {readme}",
                             path=str(weights))
    if is_torchscript(weights):
        gen: nn.Module = load_torchscript(weights, card.name, device)
    else:
        params = card.params
        ngf = int_param(params, "ngf", 64, 1)
        n_blocks = int_param(params, "n_blocks", 9, 0)
        gen = ResnetGenerator(3, 3, ngf, n_blocks, bool_param(params, "use_dropout", False))
        state = {k: v for k, v in load_state_dict_file(weights, card.name).items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        load_weights_strict(gen, state, card.name, weights)
    gen = gen.to(device).eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return PaddedGenerator(gen)


def generator_normalization(card: ModelCard) -> Normalization:
    return Normalization.from_card(card.normalization, CYCLEGAN_MEAN, CYCLEGAN_STD)


def group_by_size(tiles: Sequence[np.ndarray], size: int) -> dict[tuple[int, int], list[int]]:
    """Tile indices by the size they are run at: at least ``size`` square (smaller ones are padded)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tiles):
        groups.setdefault((max(t.shape[0], size), max(t.shape[1], size)), []).append(i)
    return groups


@register_family("cyclegan")
class CycleGANTranslator(ModelFamily):
    """A CycleGAN ResNet generator: uint8 RGB tiles in, translated uint8 RGB tiles out."""

    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        self.torch_device = resolve_torch_device(device)
        self.generator = load_generator(card, self.torch_device)
        self.worker = DeviceWorker(self.generator, self.torch_device, name=card.name,
                                   normalization=generator_normalization(card), head=rgb_head,
                                   **worker_settings(card))
        self.worker.warm_up(card.tile_size)  # a broken model fails at load, not mid-job

    def translate(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Translated uint8 RGB tiles, each of its input's size."""
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        futures = [(idx, self.worker.submit(np.stack([pad_to(checked[i], h, w) for i in idx])))
                   for (h, w), idx in group_by_size(checked, self.card.tile_size).items()]
        out: list[np.ndarray | None] = [None] * len(checked)
        for idx, fut in futures:
            rgb = fut.result()["rgb"]
            for j, i in enumerate(idx):
                h, w = checked[i].shape[:2]
                out[i] = np.ascontiguousarray(rgb[j, :h, :w])
        return [o for o in out if o is not None]

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        raise ModelCardError(
            f"model '{self.card.name}' translates images ({self.card.task}) and makes no objects: preview it with "
            "the translate op or `qpbridge translate`, or chain it before a segmentation model in a pipeline card")

    def device_busy_s(self) -> float | None:
        return self.worker.device_busy_s()

    def close(self) -> None:
        self.worker.close()
