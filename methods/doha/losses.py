"""DOHA's per-instance loss (spec 1.4): ``L_n = MSE(R_hat_n, R_n) + 0.1 Reg_5(R_hat_n)`` with the
Toeplitz regularizer ``Reg_s(S) = mean_{k=1..N-2} std_unbiased(diag_k S) (N - k) / s``: the SCS map
of a periodic signal is constant along its diagonals, so a predicted map whose diagonals vary
is penalised, longer diagonals more."""
from __future__ import annotations

from typing import Tuple

import torch

import pyops


def toeplitz_reg(S: torch.Tensor, scale: float = 5.0) -> torch.Tensor:
    """Reg_s per map, (B,): the unbiased std of each upper diagonal k = 1..N-2 of S (B, N, N)
    (``pyops.diagonal_stats``), weighted by its length N - k over ``scale``, averaged over k."""
    if S.dim() != 3 or S.shape[1] != S.shape[2] or S.shape[1] < 3:
        raise ValueError(f"toeplitz_reg: maps must be (B, N, N) with N >= 3, got {tuple(S.shape)}")
    N = S.shape[1]
    _, std = pyops.diagonal_stats(S)  # lags 0..N-2
    k = torch.arange(1, N - 1, device=S.device, dtype=std.dtype)
    return (std[:, 1:] * (N - k) / scale).mean(1)


def instance_losses(R_hat: torch.Tensor, R: torch.Tensor, reg_weight: float = 0.1,
                    reg_scale: float = 5.0) -> Tuple[torch.Tensor, torch.Tensor]:
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
