"""Augmentation of training batches on the device: dihedral transforms (flips, 90° rotations) per crop, and
colour/stain jitter per batch.

HV targets are transformed with their pixels: a horizontal flip negates H, a vertical flip negates V, a
transpose swaps them. HoVer-Net's per-side scaling makes these exact (the two sides' scales swap with the sign).
All randomness comes from the numpy ``Generator`` passed in, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qpbridge.families.stains import DEFAULT_EOSIN, DEFAULT_HEMATOXYLIN, stain_matrix


def dihedral(maps: dict[str, torch.Tensor], code: int, signs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One of the 8 symmetries of the square (``code`` 0..7: bit 0 transpose, bit 1 flip x, bit 2 flip y) on
    (..., H, W) tensors; the ``hv`` entry (2, H, W), if any, has its values transformed too. ``signs``:
    ``hv_signs(device)``, made once (a small tensor made per call would be a host-to-device copy each time)."""
    out = dict(maps)
    if "hv" in out and signs is None:
        signs = hv_signs(out["hv"].device)
    if code & 1:
        out = {k: v.transpose(-1, -2) for k, v in out.items()}
        if "hv" in out:
            out["hv"] = out["hv"].flip(0)  # H and V swap places
    if code & 2:
        out = {k: v.flip(-1) for k, v in out.items()}
        if "hv" in out and signs is not None:
            out["hv"] = out["hv"] * signs[0]
    if code & 4:
        out = {k: v.flip(-2) for k, v in out.items()}
        if "hv" in out and signs is not None:
            out["hv"] = out["hv"] * signs[1]
    return out


def random_crops(tiles: list[dict[str, torch.Tensor]], rng: np.random.Generator, n: int, crop: int,
                 signs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``n`` random ``crop`` px crops of random tiles (each a dict of (..., H, W) tensors on the device), each
    under a random dihedral transform, stacked per key."""
    picks = rng.integers(0, len(tiles), n)
    codes = rng.integers(0, 8, n)
    parts: dict[str, list[torch.Tensor]] = {}
    for k, code in zip(picks, codes, strict=True):
        tile = tiles[int(k)]
        h, w = next(iter(tile.values())).shape[-2:]
        y = int(rng.integers(0, h - crop + 1))
        x = int(rng.integers(0, w - crop + 1))
        cut = {key: v[..., y:y + crop, x:x + crop] for key, v in tile.items()}
        for key, value in dihedral(cut, int(code), signs).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.stack(v) for key, v in parts.items()}


def hv_signs(device: torch.device) -> torch.Tensor:
    """(2, 2, 1, 1): the factors of a flip along x (H negated) and along y (V negated)."""
    return torch.tensor([[-1.0, 1.0], [1.0, -1.0]], device=device).view(2, 2, 1, 1)


@dataclass(frozen=True)
class ColourJitter:
    """Stain jitter in HED space (each stain scaled by 1 ± ``stain_scale`` and shifted by ± ``stain_shift``
    OD, per image), then brightness ± ``brightness`` and contrast 1 ± ``contrast``."""

    stain_scale: float = 0.05
    stain_shift: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        return {"scale": rng.uniform(1 - self.stain_scale, 1 + self.stain_scale, (n, 3)),
                "shift": rng.uniform(-self.stain_shift, self.stain_shift, (n, 3)),
                "bright": rng.uniform(-self.brightness, self.brightness, n),
                "contrast": rng.uniform(1 - self.contrast, 1 + self.contrast, n)}

    def apply(self, rgb: torch.Tensor, params: dict[str, np.ndarray]) -> torch.Tensor:
        """``rgb`` (N, 3, H, W) float in [0, 1] -> jittered, same shape and range."""
        dev = rgb.device
        n = rgb.shape[0]
        # all parameters in one host-to-device copy, asynchronous from pinned memory on CUDA
        packed = torch.from_numpy(np.concatenate([params["scale"], params["shift"], params["bright"][:, None],
                                                  params["contrast"][:, None]], axis=1).astype(np.float32))
        if dev.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(dev, non_blocking=True).view(n, 8, 1, 1)
        scale, shift, bright, contrast = packed[:, 0:3], packed[:, 3:6], packed[:, 6:7], packed[:, 7:8]
        mat, inv = _stain_matrices(dev)
        od = -torch.log(rgb.float().clamp_min(1.0 / 255.0))  # (N, 3, H, W)
        stains = torch.einsum("nchw,cs->nshw", od, inv) * scale + shift
        out = torch.exp(-torch.einsum("nshw,sc->nchw", stains, mat))
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + bright
        return out.clamp(0.0, 1.0)


_MATRICES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _stain_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The H&E stain matrix and its inverse on ``device``, made once."""
    key = str(device)
    if key not in _MATRICES:
        mat = torch.tensor(stain_matrix(DEFAULT_HEMATOXYLIN, DEFAULT_EOSIN), dtype=torch.float32)
        _MATRICES[key] = (mat.to(device), torch.linalg.inv(mat).to(device))
    return _MATRICES[key]
