"""The self-cosine-similarity (SCS) label of BYHE / DOHA (spec 1.1), on batched tensors.

From a label wave b (..., L): trim ``trim`` samples at both ends, take the analytic signal
(Hilbert transform via the FFT), its phase phi, drop the first sample (N = L - 2 trim - 1), and
``R_ij = cos(phi_i - phi_j) = u_i u_j + v_i v_j`` with u = cos phi, v = sin phi (rank 2).
A constant delay of the wave only shifts phi by a constant, so R is unchanged.

Two phase modes:

* ``"faithful"``: the official code's: psi = atan(Im / Re) in (-pi/2, pi/2) (+-pi/2 where
  Re = 0), unwrapped by adding every drop psi_{t-1} - psi_t to a running offset (this stalls
  for one sample at each pi-wrap: the map differs from the ideal one by ~0.19 on average on a
  clean 75 bpm sine);
* ``"clean"``: phi = unwrap(angle(z)) (wrapped differences summed), the ideal phase.

The label wave goes in filtered, as the official preprocessing (BYHE's ``VIPL_preprocess.py``)
filters it over the whole recording before any clip is cut: ``filter_label`` applies the code's
Butterworth band-pass (``butter(6, [0.65, 3.5] Hz)``, zero-phase) and then its CWT smoothing,
which weights the wavelet scales by a Gaussian around the dominant one. We apply that weight in the
Fourier domain (the code's scales are frequencies 3.75 -> 0.088 Hz in steps of 0.0293 Hz and its
weight is ``exp(-0.3 ((j - j*) / (0.08 * 126))^2)`` over the scale index j, so a Gaussian in
frequency of standard deviation 0.38 Hz around the dominant frequency): our approximation of the
Morlet transform and its inverse, not the code's pycwt call. ``methods.rppg.data.VideoSet``
filters every video's label once; clips cut the filtered wave.
"""

from __future__ import annotations

import math

import torch

from methods.common.optional import requires

MODES = ("faithful", "clean")
LABEL_BAND = (0.65, 3.5)  # Hz, the official label band-pass
CWT_STEP = 3.75 / 128  # Hz between the code's CWT frequencies (126 of them, 3.75 down to 0.088 Hz)
CWT_SIGMA = 0.08 * 126 * CWT_STEP / math.sqrt(0.6)  # exp(-0.3 x^2) = exp(-x^2 / (2 * (1 / 0.6)))


def filter_label(wave, fs: float, smooth: bool = True):
    """The official label preprocessing on whole recordings (numpy, last axis): Butterworth
    band-pass 0.65-3.5 Hz (scipy ``butter(6, ...)``, ``filtfilt``), then (``smooth``) a Gaussian
    weight of standard deviation ``CWT_SIGMA`` Hz around the dominant frequency in 0.088-3.75 Hz
    (the code's CWT smoothing, applied in the Fourier domain)."""
    import numpy as np

    with requires("methods"):
        from scipy.signal import butter, filtfilt

    x = np.asarray(wave, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 40:
        raise ValueError(
            f"filter_label: need waves of at least 40 samples (the order-6 band-pass pads 39), got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("filter_label: the wave has NaN or infinite samples")
    if not fs > 2 * LABEL_BAND[1]:
        raise ValueError(f"filter_label: a sampling rate of {fs} Hz cannot hold the band {LABEL_BAND} Hz")
    b, a = butter(6, [2 * LABEL_BAND[0] / fs, 2 * LABEL_BAND[1] / fs], "bandpass")
    y = filtfilt(b, a, x, axis=-1)
    if not smooth:
        return y
    n = y.shape[-1]
    Y = np.fft.rfft(y, axis=-1)
    f = np.fft.rfftfreq(n, 1.0 / fs)
    inside = (f >= 3 * CWT_STEP) & (f <= 3.75)
    dom = f[np.where(inside, np.abs(Y), -1.0).argmax(-1)]  # the dominant frequency per wave
    weight = np.exp(-0.5 * ((f - dom[..., None]) / CWT_SIGMA) ** 2)
    return np.fft.irfft(Y * weight, n=n, axis=-1)


def analytic_signal(x: torch.Tensor) -> torch.Tensor:
    """scipy.signal.hilbert along the last dim: ifft(fft(x) * h), h = 1, 2, ..., 2, (1), 0, ..."""
    n = x.shape[-1]
    X = torch.fft.fft(x.to(torch.float64) if x.dtype == torch.float64 else x.float(), dim=-1)
    h = torch.zeros(n, dtype=X.real.dtype, device=x.device)
    h[0] = 1
    if n % 2 == 0:
        h[1 : n // 2] = 2
        h[n // 2] = 1
    else:
        h[1 : (n + 1) // 2] = 2
    return torch.fft.ifft(X * h, dim=-1)


def label_phase(wave: torch.Tensor, mode: str = "clean", trim: int = 12) -> torch.Tensor:
    """phi (..., L - 2 trim - 1) of a label wave (..., L)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(wave, torch.Tensor) or not wave.is_floating_point():
        raise TypeError("wave must be a floating-point tensor (..., L)")
    L = wave.shape[-1]
    if L - 2 * trim - 1 < 2:
        raise ValueError(f"the wave has {L} samples; with trim {trim} at both ends fewer than 2 phases remain")
    if not torch.isfinite(wave).all():
        raise ValueError("the wave has NaN or infinite samples")
    z = analytic_signal(wave[..., trim : L - trim])
    if mode == "clean":
        ang = torch.angle(z)
        d = torch.diff(ang, dim=-1)
        d = torch.remainder(d + math.pi, 2 * math.pi) - math.pi  # wrapped into [-pi, pi)
        phi = torch.cat([ang[..., :1], ang[..., :1] + torch.cumsum(d, dim=-1)], dim=-1)
    else:
        re, im = z.real, z.imag
        psi = torch.where(re == 0, torch.where(im >= 0, math.pi / 2, -math.pi / 2) + 0 * re, torch.atan(im / re))
        drop = torch.clamp(psi[..., :-1] - psi[..., 1:], min=0)  # psi_t < psi_{t-1}: add the drop
        acc = torch.cat([torch.zeros_like(psi[..., :1]), torch.cumsum(drop, dim=-1)], dim=-1)
        phi = psi + acc
    return phi[..., 1:]


def scs_label(wave: torch.Tensor, mode: str = "clean", trim: int = 12) -> torch.Tensor:
    """The SCS map R (..., N, N), N = L - 2 trim - 1, float32 (float64 for float64 waves)."""
    phi = label_phase(wave, mode, trim)
    u, v = torch.cos(phi), torch.sin(phi)
    R = u[..., :, None] * u[..., None, :] + v[..., :, None] * v[..., None, :]
    return R.to(torch.float64 if wave.dtype == torch.float64 else torch.float32)
