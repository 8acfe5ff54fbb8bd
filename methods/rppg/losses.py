"""Training losses on predicted pulse waves (spec section 5), batched over (B, T) tensors:

* ``neg_pearson``: 1 - Pearson r (PhysNet); invariant to the prediction's scale and offset, not
  to a delay of the label;
* ``neg_max_cross_cov``: the negative maximum cross-covariance over lags (Gideon & Stent,
  ICCV'21), via the FFT with zero padding to 2T, restricted to the heart-rate band and
  normalised by the in-band share of the cross-spectrum: robust to a label delay;
* ``neg_snr``: minus the SNR (dB) of the prediction's spectrum at the label's heart rate
  against the rest of the 40-250 bpm band;

and on self-similarity maps (B, N, N):

* ``toeplitz_reg``: DOHA's Toeplitz regularizer ``Reg_s(S) = mean_{k=1..N-2} std_unbiased(diag_k S)
  (N - k) / s`` (spec 1.4; SSPD's L_reg with s = 20): the SCS map of a periodic signal is constant
  along its diagonals, so a map whose diagonals vary is penalised, longer diagonals more.
"""

from __future__ import annotations

import torch

import pyops

BAND_BPM = (40.0, 250.0)


def _check(x: torch.Tensor, y: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{fn}: predictions must be a (B, T) tensor")
    if y.shape != x.shape:
        raise ValueError(f"{fn}: labels must have the predictions' shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[1] < 3:
        raise ValueError(f"{fn}: need at least 3 samples per wave, got {x.shape[1]}")


def neg_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over the batch of 1 - r(x_b, y_b)."""
    _check(x, y, "neg_pearson")
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    r = (xc * yc).sum(1) / torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1)).clamp(min=1e-12)
    return (1 - r).mean()


def _band_mask(n_fft: int, fs: float, device) -> torch.Tensor:
    f = torch.fft.rfftfreq(n_fft, d=1.0 / fs).to(device) * 60.0
    return (f >= BAND_BPM[0]) & (f <= BAND_BPM[1])


def neg_max_cross_cov(x: torch.Tensor, y: torch.Tensor, fs: float) -> torch.Tensor:
    """-max_lag cov(x, y shifted) / (sigma_x sigma_y), the cross-spectrum kept to the heart-rate
    band and divided by its in-band share (Gideon & Stent's MCC), batch mean."""
    _check(x, y, "neg_max_cross_cov")
    T = x.shape[1]
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    X, Y = torch.fft.rfft(xc, n=2 * T), torch.fft.rfft(yc, n=2 * T)
    C = X * torch.conj(Y)
    band = _band_mask(2 * T, fs, x.device)
    mag = C.abs()
    r_e = mag[:, band].sum(1) / mag.sum(1).clamp(min=1e-12)
    C = torch.where(band, C, torch.zeros_like(C))
    cc = torch.fft.irfft(C, n=2 * T) / (T - 1)
    mcc = cc.max(1).values / r_e.clamp(min=1e-12)
    return (-mcc / (xc.std(1) * yc.std(1)).clamp(min=1e-12)).mean()


def neg_snr(x: torch.Tensor, hr_bpm: torch.Tensor, fs: float) -> torch.Tensor:
    """-mean SNR (dB): power at the bin of each wave's heart rate over the mean power of the
    other bins in 40-250 bpm (|rfft(x, norm='forward')|^2)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("neg_snr: predictions must be a (B, T) tensor")
    hr = torch.as_tensor(hr_bpm, dtype=x.dtype, device=x.device).reshape(-1)
    if hr.numel() != x.shape[0]:
        raise ValueError(f"neg_snr: one heart rate per wave needed, got {hr.numel()} for {x.shape[0]} waves")
    T = x.shape[1]
    P = torch.fft.rfft(x - x.mean(1, keepdim=True), norm="forward").abs() ** 2
    f = torch.fft.rfftfreq(T, d=1.0 / fs).to(x.device) * 60.0
    band = (f >= BAND_BPM[0]) & (f <= BAND_BPM[1])
    ref = (f[None, :] - hr[:, None]).abs().argmin(1)
    p_ref = P.gather(1, ref[:, None])[:, 0]
    others = band[None, :] & (torch.arange(f.numel(), device=x.device)[None, :] != ref[:, None])
    noise = (P * others).sum(1) / others.sum(1).clamp(min=1)
    return -(10 * torch.log10(p_ref.clamp(min=1e-30) / noise.clamp(min=1e-30))).mean()


def toeplitz_reg(S: torch.Tensor, scale: float = 5.0) -> torch.Tensor:
    """Reg_s per map, (B,): the unbiased std of each upper diagonal k = 1..N-2 of S (B, N, N)
    (``pyops.diagonal_stats``), weighted by its length N - k over ``scale``, averaged over k."""
    if S.dim() != 3 or S.shape[1] != S.shape[2] or S.shape[1] < 3:
        raise ValueError(f"toeplitz_reg: maps must be (B, N, N) with N >= 3, got {tuple(S.shape)}")
    N = S.shape[1]
    _, std = pyops.diagonal_stats(S)  # lags 0..N-2
    k = torch.arange(1, N - 1, device=S.device, dtype=std.dtype)
    return (std[:, 1:] * (N - k) / scale).mean(1)


__all__ = ["neg_pearson", "neg_max_cross_cov", "neg_snr", "toeplitz_reg"]
