"""DOHA's per-instance loss (spec 1.4): ``L_n = MSE(R_hat_n, R_n) + 0.1 Reg_5(R_hat_n)`` with the
Toeplitz regularizer ``Reg_s`` (``methods.rppg.losses.toeplitz_reg``, shared with SSPD)."""

from __future__ import annotations

from typing import Tuple

import torch

from methods.rppg.losses import toeplitz_reg

REG_WEIGHT = 0.1  # the weight of Reg in L_n (the code's)
REG_SCALE = 5.0  # s of Reg_s


def instance_losses(
    R_hat: torch.Tensor, R: torch.Tensor, reg_weight: float = REG_WEIGHT, reg_scale: float = REG_SCALE
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(L_n (B,), Reg_n (B,)): per-instance MSE against the SCS label plus ``reg_weight`` Reg."""
    if R_hat.shape != R.shape or R_hat.dim() != 3:
        raise ValueError(f"maps must be (B, N, N) of one shape, got {tuple(R_hat.shape)} and {tuple(R.shape)}")
    reg = toeplitz_reg(R_hat, reg_scale)
    return ((R_hat - R) ** 2).mean((1, 2)) + reg_weight * reg, reg


def per_instance_neg_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - Pearson r per row of (B, T) waves, (B,)."""
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"waves must be (B, T) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return 1 - (xc * yc).sum(1) / torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1)).clamp(min=1e-12)
