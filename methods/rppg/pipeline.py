"""The rPPG-Toolbox evaluation pipeline (spec section 4): detrending, band-pass filtering, heart
rate by FFT peak or by peak counting, windowed evaluation, and the metrics MAE, RMSE, MAPE,
Pearson r (each with its standard error), SNR and MACC.

Signals are 1-D numpy arrays (or anything ``np.asarray`` takes) sampled at ``fs`` Hz. Bad input
(NaN or inf samples, a signal shorter than the evaluation window, a band the sampling rate
cannot hold) raises a ValueError that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from methods.common.optional import requires

BAND = (0.75, 2.5)  # Hz: the toolbox's recommended band (45-150 bpm)
MIN_WINDOW = 9  # windows with fewer samples are skipped, as the toolbox does


def _signal(x, name: str = "signal") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a NaN or infinite sample (first at index {bad}); a NaN frame upstream?")
    return a


def check_band(fs: float, band=BAND) -> None:
    low, high = band
    if not (fs > 0 and np.isfinite(fs)):
        raise ValueError(f"the sampling rate must be a finite number > 0, got {fs}")
    if not 0 < low < high:
        raise ValueError(f"the band must satisfy 0 < low < high, got {band}")
    if high >= fs / 2:
        raise ValueError(
            f"a sampling rate of {fs} Hz cannot hold the band {band} Hz (its upper edge must be "
            f"below the Nyquist frequency {fs / 2} Hz)"
        )


def detrend(x, lam: float = 100.0) -> np.ndarray:
    """Smoothness-priors detrending (Tarvainen et al. 2002): x - (I + lam^2 D2^T D2)^-1 x."""
    with requires("methods"):
        from scipy import sparse
    from scipy.sparse.linalg import spsolve

    a = _signal(x)
    n = a.size
    if n < 3:
        return a - a.mean() if n else a
    d2 = sparse.diags([np.ones(n - 2), -2 * np.ones(n - 2), np.ones(n - 2)], [0, 1, 2], shape=(n - 2, n))
    trend = spsolve((sparse.identity(n) + lam**2 * (d2.T @ d2)).tocsc(), a)
    return a - trend


def bandpass(x, fs: float, band=BAND, order: int = 1) -> np.ndarray:
    """Butterworth band-pass (order 1 by default), zero-phase (filtfilt)."""
    with requires("methods"):
        from scipy.signal import butter, filtfilt

    check_band(fs, band)
    a = _signal(x)
    b, c = butter(order, [band[0] / (fs / 2), band[1] / (fs / 2)], btype="bandpass")
    padlen = 3 * max(len(b), len(c))
    if a.size <= padlen:
        raise ValueError(f"the signal has {a.size} samples; filtering needs more than {padlen}")
    return filtfilt(b, c, a)


def preprocess(x, fs: float, diff_normalized: bool = False, band=BAND, lam: float = 100.0) -> np.ndarray:
    """The toolbox's post-processing: cumsum (for DiffNormalized signals), detrend, band-pass."""
    a = _signal(x)
    if diff_normalized:
        a = np.cumsum(a)
    return bandpass(detrend(a, lam), fs, band)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(n, 1)))))


def _periodogram(x, fs: float, band):
    """(the signal, frequencies, power): the toolbox's periodogram, nfft the next power of 2."""
    with requires("methods"):
        from scipy.signal import periodogram

    check_band(fs, band)
    a = _signal(x)
    f, p = periodogram(a, fs=fs, nfft=_next_pow2(a.size), detrend=False)
    return a, f, p


def hr_fft(x, fs: float, band=BAND) -> float:
    """Heart rate (bpm) at the periodogram's peak within the band (nfft: next power of 2)."""
    a, f, p = _periodogram(x, fs, band)
    mask = (f >= band[0]) & (f <= band[1])
    if not mask.any():
        raise ValueError(f"no frequency bin of a {a.size}-sample signal falls in the band {band} Hz")
    return 60.0 * float(f[mask][np.argmax(p[mask])])


def hr_peaks(x, fs: float) -> float:
    """Heart rate (bpm) from the mean interval between the signal's peaks."""
    with requires("methods"):
        from scipy.signal import find_peaks

    a = _signal(x)
    peaks, _ = find_peaks(a)
    if peaks.size < 2:
        raise ValueError("fewer than 2 peaks: the heart rate cannot be counted")
    return 60.0 * fs / float(np.mean(np.diff(peaks)))


def snr_db(x, hr_bpm: float, fs: float, band=BAND, tolerance_bpm: float = 6.0) -> float:
    """Power within +-6 bpm of the heart rate and of its first harmonic, over the rest of the
    band, in dB."""
    _, f, p = _periodogram(x, fs, band)
    f1, f2, dev = hr_bpm / 60.0, 2 * hr_bpm / 60.0, tolerance_bpm / 60.0
    inband = (f >= band[0]) & (f <= band[1])
    sig = ((f >= f1 - dev) & (f <= f1 + dev)) | ((f >= f2 - dev) & (f <= f2 + dev))
    s, n = p[sig].sum(), p[inband & ~sig].sum()
    if s <= 0 or n <= 0:
        return float("inf") if n <= 0 < s else float("-inf")
    return 10.0 * float(np.log10(s / n))


def macc(x, y) -> float:
    """Maximum over the circular lags 0..N-2 of |Pearson r(x, roll(y, lag))|, via the FFT."""
    a, b = _signal(x, "x"), _signal(y, "y")
    if a.size != b.size or a.size < 3:
        raise ValueError(f"x and y must have the same length >= 3, got {a.size} and {b.size}")
    a, b = a - a.mean(), b - b.mean()
    den = a.size * a.std() * b.std()
    if den == 0:
        return 0.0
    cc = np.fft.irfft(np.fft.rfft(a) * np.conj(np.fft.rfft(b)), n=a.size)  # cc[l] = sum_t a[t] b[t - l]
    return float(np.max(np.abs(cc[: a.size - 1])) / den)


def pearson(x, y) -> float:
    a, b = _signal(x, "x"), _signal(y, "y")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


@dataclass
class WindowResult:
    hr_pred: List[float]
    hr_label: List[float]
    snr: List[float]
    macc: List[float]


def evaluate_windows(
    preds: Sequence,
    labels: Sequence,
    fs: float,
    window_s: float = 10.0,
    method: str = "fft",
    diff_normalized: bool = False,
    band=BAND,
) -> Dict[str, float]:
    """Windowed evaluation of predicted pulse signals against label signals (one pair per
    video): non-overlapping windows of ``window_s`` seconds (``window_s=0``: the whole video),
    each post-processed, HR by ``method`` ("fft" or "peak"); then MAE, RMSE, MAPE, Pearson r
    over the windows' HRs (with standard errors), mean SNR and mean MACC."""
    if method not in ("fft", "peak"):
        raise ValueError(f"method must be 'fft' or 'peak', got {method!r}")
    check_band(fs, band)
    if len(preds) != len(labels) or not len(preds):
        raise ValueError(f"need as many predictions as labels (>= 1), got {len(preds)} and {len(labels)}")
    hr_fn = (lambda s: hr_fft(s, fs, band)) if method == "fft" else (lambda s: hr_peaks(s, fs))
    res = WindowResult([], [], [], [])
    for v, (p, l) in enumerate(zip(preds, labels)):
        p, l = _signal(p, f"prediction {v}"), _signal(l, f"label {v}")
        if p.size != l.size:
            raise ValueError(f"video {v}: prediction and label lengths differ ({p.size} vs {l.size})")
        w = p.size if window_s <= 0 else int(round(window_s * fs))
        if p.size < w:
            raise ValueError(f"video {v} has {p.size} samples, shorter than the {window_s} s window ({w} samples)")
        if w < MIN_WINDOW:
            continue
        for s in range(0, p.size - w + 1, w):
            pw = preprocess(p[s : s + w], fs, diff_normalized, band)
            lw = preprocess(l[s : s + w], fs, diff_normalized, band)
            hp, hl = hr_fn(pw), hr_fn(lw)
            res.hr_pred.append(hp)
            res.hr_label.append(hl)
            res.snr.append(snr_db(pw, hl, fs, band))
            res.macc.append(macc(pw, lw))
    return summarize(res)


def signal_hr(x, fs: float, method: str = "fft", band=BAND) -> float:
    """The heart rate (bpm) of one pulse-like signal: detrend and band-pass (``preprocess``), then
    the periodogram peak (``method="fft"``) or peak counting (``"peak"``)."""
    if method not in ("fft", "peak"):
        raise ValueError(f"method must be 'fft' or 'peak', got {method!r}")
    s = preprocess(x, fs, band=band)
    return hr_fft(s, fs, band) if method == "fft" else hr_peaks(s, fs)


def hr_errors(hr_pred, hr_label) -> Dict[str, float]:
    """MAE, RMSE, MAPE and Pearson r of predicted against label heart rates, with standard
    errors (``n``: how many)."""
    hp, hl = np.asarray(hr_pred, np.float64), np.asarray(hr_label, np.float64)
    if hp.shape != hl.shape or hp.ndim != 1 or not hp.size:
        raise ValueError(f"need as many predicted as label heart rates (>= 1), got {hp.shape} and {hl.shape}")
    n = hp.size
    err = hp - hl
    out = {
        "n": n,
        "MAE": float(np.mean(np.abs(err))),
        "MAE_se": float(np.std(np.abs(err)) / np.sqrt(n)),
        "RMSE": float(np.sqrt(np.mean(err**2))),
        "RMSE_se": float(np.std(err**2) / np.sqrt(n)),
        "MAPE": float(np.mean(np.abs(err) / hl) * 100),
        "MAPE_se": float(np.std(np.abs(err) / hl) / np.sqrt(n) * 100),
    }
    r = pearson(hp, hl) if n >= 3 else float("nan")
    out["Pearson"] = r
    out["Pearson_se"] = float(np.sqrt((1 - r**2) / (n - 2))) if n >= 3 else float("nan")
    return out


def summarize(res: WindowResult) -> Dict[str, float]:
    out = hr_errors(res.hr_pred, res.hr_label)
    out["windows"] = out.pop("n")
    out["SNR"], out["MACC"] = float(np.mean(res.snr)), float(np.mean(res.macc))
    return out
