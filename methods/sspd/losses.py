"""SSPD's losses (spec 2.3, the code's ``losses/SSPDLoss.py``), student o against the detached
EMA teacher t:

* ``L_TSPD = 0.5 sum_l [MSE(S_l^o, S_l^t) + MSE(w_l^o, w_l^t) + NP(S_l^o, S_l^t) + NP(w_l^o, w_l^t)]``
  over the three self-similarity maps and their diagonal-mean waves ``w(S)_k = mean_i S[i, i+k]``;
* ``L_reg = 0.5 mean_l Reg_20(S_l^o)`` (DOHA's Toeplitz regularizer with scale 20);
* ``L_freq = 0.2 mean_l mean_b [sum_{k<N/2} P_k / sum_{k=lf}^{hf-1} P_k - 1]``, P the FFT magnitude
  of ``w(S_l^o)`` (first half, over its max), lf = floor(0.5 N / 30), hf = floor(3 N / 30);
* ``L_RPD = 0.5 [NP(y^o, y^t) + NP(A^o, A^t) + mean_b(sum_{k<T/2} A^o_k / sum_{k=lf}^{hf-1} A^o_k - 1)]``,
  A the FFT magnitude of the predicted wave (first half, over its max), the same band (0.5-3 Hz);
* total ``L_RPD + L_TSPD + L_reg + L_freq``.

NP is the negative Pearson of the code: ``mean(1 - clamp(cov / (sigma_a sigma_b + 1e-7), -1, 1))``
along the last dimension (unbiased moments; row-wise for maps). Magnitudes, not powers.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

import pyops
from methods.rppg.losses import toeplitz_reg


def neg_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape:
        raise ValueError(f"neg_pearson: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[-1]
    ac, bc = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    cov = (ac * bc).sum(-1) / (n - 1)
    rho = cov / (a.std(-1) * b.std(-1) + 1e-7)
    return (1 - rho.clamp(-1, 1)).mean()


def map_wave(S: torch.Tensor) -> torch.Tensor:
    """w(S)_k = mean_i S[i, i + k], k = 0..N-2 (pyops.diagonal_stats)."""
    return pyops.diagonal_stats(S)[0]


def band_ratio(x: torch.Tensor, rate: float = 30.0) -> torch.Tensor:
    """mean_b [sum_{k<N/2} A_k / sum_{k=lf}^{hf-1} A_k - 1], A = |FFT_N(x)|[:N/2] / max, the band
    0.5-3 Hz at ``rate`` samples per second (lf = floor(0.5 N / rate), hf = floor(3 N / rate))."""
    N = x.shape[-1]
    lf, hf = int(0.5 * N / rate), int(3 * N / rate)
    if hf <= lf or N < 4:
        raise ValueError(f"band_ratio: a wave of {N} samples has no 0.5-3 Hz band bins")
    A = torch.fft.fft(x, dim=-1).abs()[..., : N // 2]
    A = A / A.max(-1, keepdim=True).values.clamp(min=1e-12)
    return (A.sum(-1) / A[..., lf:hf].sum(-1).clamp(min=1e-12) - 1).mean()


def spectrum(x: torch.Tensor) -> torch.Tensor:
    N = x.shape[-1]
    A = torch.fft.fft(x, dim=-1).abs()[..., : N // 2]
    return A / A.max(-1, keepdim=True).values.clamp(min=1e-12)


def sspd_losses(
    y_o: torch.Tensor,
    y_t: torch.Tensor,
    maps_o: Sequence[torch.Tensor],
    maps_t: Sequence[torch.Tensor],
    fs: float = 30.0,
) -> Dict[str, torch.Tensor]:
    """The four terms and ``loss``, their sum. Teacher inputs are detached here."""
    if len(maps_o) != len(maps_t):
        raise ValueError(f"{len(maps_o)} student maps but {len(maps_t)} teacher maps")
    y_t = y_t.detach()
    tspd = y_o.new_zeros(())
    reg, freq = [], []
    for So, St in zip(maps_o, maps_t):
        St = St.detach()
        wo, wt = map_wave(So), map_wave(St)
        tspd = tspd + F.mse_loss(So, St) + F.mse_loss(wo, wt) + neg_pearson(So, St) + neg_pearson(wo, wt)
        reg.append(toeplitz_reg(So, 20.0).mean())
        freq.append(band_ratio(wo, 30.0))  # the lag axis counts as 30 Hz, as the code does
    out = {
        "tspd": 0.5 * tspd,
        "reg": 0.5 * torch.stack(reg).mean(),
        "freq": 0.2 * torch.stack(freq).mean(),
        "rpd": 0.5 * (neg_pearson(y_o, y_t) + neg_pearson(spectrum(y_o), spectrum(y_t)) + band_ratio(y_o, fs)),
    }
    out["loss"] = out["rpd"] + out["tspd"] + out["reg"] + out["freq"]
    return out
