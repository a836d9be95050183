"""HoVer-Net's losses: NP and TP = cross-entropy + Dice; HV = MSE + MSGE (the mean squared error of the
maps' Sobel gradients, on nucleus pixels only)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Soft Dice loss summed over classes, as HoVer-Net's ``dice_loss`` (logits (N, C, H, W), target (N, H, W))."""
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), prob.shape[1]).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + eps) / (total + eps)).sum()


def ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target.long()) + dice_loss(logits, target)


def _sobel_kernels(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """HoVer-Net's normalised Sobel kernels (d/dx, d/dy) of odd ``size``."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    h = r[None, :].expand(size, size)
    v = r[:, None].expand(size, size)
    denom = h * h + v * v
    denom[size // 2, size // 2] = 1.0
    return h / denom, v / denom


def msge_loss(pred: torch.Tensor, true: torch.Tensor, focus: torch.Tensor, size: int = 5) -> torch.Tensor:
    """Mean squared error of the HV maps' gradients (H along x, V along y) over ``focus`` pixels."""
    kh, kv = _sobel_kernels(size, pred.device)

    def grad(hv: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(hv[:, 0:1].float(), kh[None, None], padding=size // 2)
        v = F.conv2d(hv[:, 1:2].float(), kv[None, None], padding=size // 2)
        return torch.cat([h, v], dim=1)

    mask = focus[:, None].float().expand(-1, 2, -1, -1)
    diff = (grad(pred) - grad(true)) ** 2
    return (diff * mask).sum() / (mask.sum() + 1e-8)


def hover_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the branch losses, and each part (detached: read without waiting for the device) for the
    progress line. HoVer-Net weights HV MSE x2, MSGE x1."""
    np_target = (batch["labels"] > 0).long()
    np_loss = ce_dice(out["np"], np_target)
    hv_mse = F.mse_loss(out["hv"].float(), batch["hv"])
    hv_msge = msge_loss(out["hv"], batch["hv"], np_target)
    total = np_loss + 2.0 * hv_mse + hv_msge
    parts = {"np": np_loss.detach(), "hv": (2.0 * hv_mse + hv_msge).detach()}
    if "tp" in out and "types" in batch:
        tp_loss = ce_dice(out["tp"], batch["types"])
        total = total + tp_loss
        parts["tp"] = tp_loss.detach()
    return total, parts
