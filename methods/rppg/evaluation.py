"""Evaluation of a trained rPPG model on test videos: the heart rate of its predicted signal
against the label's, by the toolbox pipeline (``methods.rppg.pipeline``), and the result tables.

A model maps a clip (1, 3, T, H, W) to ``(out, extra)``: ``out`` is a wave (1, T') or a
self-similarity map (1, N, N), whose diagonal-mean wave (``pyops.diagonal_stats``) carries the
heart rate (BYHE, DOHA).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
import torch

import pyops

from . import pipeline as P
from .data import VideoSet, evaluation_clips


@torch.no_grad()
def predict_signal(model, video: torch.Tensor) -> np.ndarray:
    """The pulse-like signal the heart rate is read from, for one clip (1, 3, T, H, W): BYHE's
    diagonal-mean wave of R_hat (T - 26 lags) or the baseline's wave (T - 15)."""
    out, _ = model(video.to(next(model.parameters()).device))
    sig = pyops.diagonal_stats(out)[0] if out.dim() == 3 else out
    return sig[0].double().cpu().numpy()


def _record(
    sig: np.ndarray,
    label: np.ndarray,
    video: int,
    hr_true: float,
    fs: float,
    diff_label: bool = False,
    diff_pred: bool = False,
) -> Dict:
    """One clip's record. ``diff_label`` / ``diff_pred``: the label / the predicted signal is a
    first difference (``--label-type diff-normalized``), integrated (cumsum) first, as the
    toolbox's ``diff_flag``: the derivative weights the harmonics by their frequency and would
    move the FFT peak to them."""
    if diff_label:
        label = np.cumsum(label)
    if diff_pred:
        sig = np.cumsum(sig)
    rec = {"video": video, "hr_true": hr_true}
    for m in ("fft", "peak"):
        rec[f"hr_label_{m}"] = P.signal_hr(label, fs, m)
        try:
            rec[f"hr_pred_{m}"] = P.signal_hr(sig, fs, m)
        except ValueError:  # a flat prediction has no peaks: count it at the band's centre
            rec[f"hr_pred_{m}"] = 60.0 * sum(P.BAND) / 2
    rec["snr_db"] = P.snr_db(P.preprocess(sig, fs), rec["hr_label_fft"], fs)
    return rec


def _named(test: VideoSet, rec: Dict) -> Dict:
    """A real dataset's record also names its clip's video (``<recording>#<chunk>``)."""
    if test.names is not None:
        rec["name"] = test.names[rec["video"]]
    return rec


def _summary(recs: List[Dict]) -> Dict:
    out = {"records": recs}
    for m in ("fft", "peak"):
        e = P.hr_errors([r[f"hr_pred_{m}"] for r in recs], [r[f"hr_label_{m}"] for r in recs])
        out.update({f"{k}_{m}": v for k, v in e.items() if k != "n"})
    out["SNR"] = float(np.mean([r["snr_db"] for r in recs]))
    out["n"] = len(recs)
    return out


def evaluate(model, test: VideoSet, fs: float, clip: int = 0, diff_pred: bool = False) -> Dict:
    """HR errors over the test clips (whole videos by default) by FFT and by peak counting, the
    mean SNR (dB) of the predicted signals at the label's heart rate, and the per-clip records.
    Labels that are first differences (``test.diff_labels``) are integrated before their heart
    rate is read; ``diff_pred``: so are the predictions (a model trained to regress such labels)."""
    model.eval()
    recs = []
    for c in evaluation_clips(test, clip):
        sig = predict_signal(model, c["video"])
        label = c["wave"][0].double().numpy()
        rec = _record(sig, label, int(c["index"][0]), float(c["hr"][0]), fs, test.diff_labels, diff_pred)
        recs.append(_named(test, rec))
    model.train()
    return _summary(recs)


ROIS = ("true", "estimated")


def evaluate_classic(test: VideoSet, fs: float, method: str = "pos", clip: int = 0, roi: str = "true") -> Dict:
    """The same evaluation for a training-free method (``"pos"`` or ``"chrom"``) on the mean skin
    colour of each frame: ``roi="true"`` averages the videos' true skin masks (an advantage no
    learned model gets; the mask of the face at rest, which does not follow a moving head),
    ``"estimated"`` each frame's skin pixels found by colour
    (``synth.skin_signal_estimated``), as a pipeline without the true mask would."""
    from .synth import chrom, pos, skin_signal, skin_signal_estimated

    fns = {"pos": pos, "chrom": chrom}
    if method not in fns:
        raise ValueError(f"method must be one of {sorted(fns)}, got {method!r}")
    if roi not in ROIS:
        raise ValueError(f"roi must be one of {ROIS}, got {roi!r}")
    recs = []
    for c in evaluation_clips(test, clip):
        i = int(c["index"][0])
        video = c["video"][0].permute(1, 2, 3, 0).numpy() / 255.0  # (T, H, W, 3)
        rgb = skin_signal(video, test.masks[i]) if roi == "true" else skin_signal_estimated(video)
        sig = fns[method](rgb, fs)
        recs.append(
            _named(test, _record(sig, c["wave"][0].double().numpy(), i, float(c["hr"][0]), fs, test.diff_labels))
        )
    return _summary(recs)


RECORD_KEYS = ("video", "hr_true", "hr_label_fft", "hr_pred_fft", "hr_pred_peak")


def records_table(recs: List[Dict], keys=RECORD_KEYS) -> str:
    rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in recs:
        rows.append("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(rows)


def results_table(title: str, res: Dict) -> str:
    """Markdown: MAE / RMSE / MAPE / Pearson by FFT and by peaks, SNR, then the per-clip table."""
    return (
        f"# {title}\n\n| HR by | MAE (bpm) | RMSE (bpm) | MAPE (%) | Pearson r |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {m} | {res[f'MAE_{m}']:.2f} ± {res[f'MAE_se_{m}']:.2f} | {res[f'RMSE_{m}']:.2f} | "
            f"{res[f'MAPE_{m}']:.1f} | {res[f'Pearson_{m}']:.3f} |\n"
            for m in ("fft", "peak")
        )
        + f"\nMean SNR {res['SNR']:.1f} dB over {res['n']} test clips.\n\n"
        + records_table(res["records"], (("name",) if any("name" in r for r in res["records"]) else ()) + RECORD_KEYS)
        + "\n"
    )


def write_results(out: str, title: str, res: Dict, extra: Dict) -> None:
    """results.json (``extra`` + the results) and results.md in ``out``; prints the summary."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**extra, "results": res}, f, indent=2)
    text = results_table(title, res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text.split("\n\n| video")[0])


__all__ = ["ROIS", "evaluate", "evaluate_classic", "predict_signal", "records_table", "results_table", "write_results"]
