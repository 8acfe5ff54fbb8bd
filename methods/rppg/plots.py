"""Figures of a trained rPPG model on one test video: the predicted signal against the label, and
(map models: BYHE, DOHA) the predicted SCS map against the label's."""

from __future__ import annotations

import numpy as np
import torch

import pyops
from methods.common.optional import requires

from . import pipeline as P
from .backbones import WAVE_OFFSET
from .scs import scs_label


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


@torch.no_grad()
def plot_example(
    model, clip, fs: float, path: str, scs_mode: str = "clean", trim: int = 12, offset: int = WAVE_OFFSET
) -> None:
    """``clip``: one test clip (``methods.rppg.data.evaluation_clips``). Wave models: the band-passed
    predicted wave over the aligned label. BYHE: the diagonal-mean waves of R_hat and of the
    label's SCS map R (both over lags), and the two maps side by side."""
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    out, _ = model(clip["video"].to(next(model.parameters()).device))
    out = out.cpu()
    model.train()
    label = clip["wave"][0].double()
    hr = float(clip["hr"][0])
    if out.dim() == 3:  # BYHE: R_hat (1, N, N)
        R_hat = out[0].double()
        R = scs_label(clip["scs_wave"][0].double()[None], scs_mode, trim)[0]
        w_hat, w = pyops.diagonal_stats(R_hat)[0].numpy(), pyops.diagonal_stats(R)[0].numpy()
        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        lags = np.arange(w.size) / fs
        ax[0].plot(lags, w, label="label SCS map R", lw=1.5)
        ax[0].plot(lags, w_hat, label="predicted R_hat", lw=1.2)
        ax[0].set_xlabel("lag (s)")
        ax[0].set_ylabel("mean cosine along the diagonal")
        ax[0].set_title(f"diagonal-mean waves (true HR {hr:.1f} bpm, predicted {P.signal_hr(w_hat, fs):.1f})")
        ax[0].legend()
        for a, m, t in ((ax[1], R.numpy(), "label SCS map R"), (ax[2], R_hat.numpy(), "predicted R_hat")):
            im = a.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            a.set_title(t)
            a.set_xlabel("window j")
            a.set_ylabel("window i")
        fig.colorbar(im, ax=ax[2], shrink=0.8)
        fig.tight_layout()
    else:  # a wave (1, T - 15)
        pred = out[0].double().numpy()
        lab = label.numpy()[offset : offset + pred.size]
        t = (np.arange(pred.size) + offset) / fs
        fig, ax = plt.subplots(figsize=(12, 3.5))
        ax.plot(t, _z(lab), label="label wave", lw=1.5)
        ax.plot(t, _z(P.preprocess(pred, fs)), label="predicted (detrended, band-passed)", lw=1.2)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("z-score")
        ax.set_title(f"true HR {hr:.1f} bpm, predicted {P.signal_hr(pred, fs):.1f} bpm")
        ax.legend(loc="upper right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
