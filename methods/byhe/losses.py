"""BYHE's training losses (spec section 3, the code's ``train.py``):
``L = 0.8 L_PC + 1.0 MSE(R_hat, R) + 0.2 L_mask + 0.1 L_spec``."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .model import BYHENet


def rowwise_neg_pearson(R_hat: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Mean over the maps' rows of 1 - Pearson r(R_hat[i], R[i])."""
    if R_hat.shape != R.shape or R_hat.dim() != 3:
        raise ValueError(f"maps must be (B, N, N) of one shape, got {tuple(R_hat.shape)} and {tuple(R.shape)}")
    a = R_hat - R_hat.mean(-1, keepdim=True)
    b = R - R.mean(-1, keepdim=True)
    r = (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1)).clamp(min=1e-12)
    return (1 - r).mean()


def spectral_sparsity(wave: torch.Tensor) -> torch.Tensor:
    """mean_b [1 - max_k |W_k| / sum_k |W_k|] over k = 1..N/2 of the wave's FFT magnitude (the
    code's Reg_version_wave): small when one frequency dominates."""
    if wave.dim() != 2 or wave.shape[1] < 4:
        raise ValueError(f"wave must be (B, N) with N >= 4, got {tuple(wave.shape)}")
    n = wave.shape[1]
    mag = torch.fft.fft(wave, dim=1).abs()[:, 1 : n // 2 + 1]
    return (1 - mag.max(1).values / mag.sum(1).clamp(min=1e-12)).mean()


def mask_loss(attention: torch.Tensor, skin: torch.Tensor) -> torch.Tensor:
    """MSE between the Fuse1 attention masks (B, T, h, w) and a binary skin mask (H, W) or
    (B, H, W), resized to (h, w)."""
    s = skin.float()
    s = s[None] if s.dim() == 2 else s
    s = F.interpolate(s[:, None], size=attention.shape[-2:], mode="area")[:, 0]
    s = (s > 0.5).to(attention.dtype)
    return ((attention - s[:, None]) ** 2).mean()


def byhe_loss(
    R_hat: torch.Tensor,
    R: torch.Tensor,
    attention: Optional[torch.Tensor] = None,
    skin: Optional[torch.Tensor] = None,
    weights=(0.8, 1.0, 0.2, 0.1),
) -> Dict[str, torch.Tensor]:
    """The four terms and their weighted sum ``loss`` (the mask term only with ``attention`` and
    ``skin``)."""
    pc, mse = rowwise_neg_pearson(R_hat, R), F.mse_loss(R_hat, R)
    spec = spectral_sparsity(BYHENet.wave(R_hat))
    out = {"pearson": pc, "mse": mse, "spectral": spec}
    total = weights[0] * pc + weights[1] * mse + weights[3] * spec
    if attention is not None and skin is not None:
        out["mask"] = mask_loss(attention, skin)
        total = total + weights[2] * out["mask"]
    out["loss"] = total
    return out
