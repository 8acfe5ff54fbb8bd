"""Mean average precision, as the SPML code computes it: 100 x the mean over classes of
scikit-learn's ``average_precision_score`` (step-wise precision-recall area, tied scores taken
together), with AP = 0 for a class that has no positive."""

from __future__ import annotations

import numpy as np
import torch


def average_precision(scores, labels) -> float:
    """AP of one class: sum over the distinct score thresholds (high to low) of
    (recall_n - recall_{n-1}) * precision_n. 0 when there is no positive."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() == 1
    if s.shape != y.shape:
        raise ValueError(f"average_precision: scores and labels differ in length ({s.size} vs {y.size})")
    if not np.isfinite(s).all():
        raise ValueError("average_precision: scores must be finite")
    n_pos = int(y.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, labels) -> float:
    """100 x mean over classes (columns) of ``average_precision``."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(
            f"mean_average_precision: scores and labels must be (N, C) of one shape, got {s.shape} and {y.shape}"
        )
    if s.shape[1] == 0:
        raise ValueError("mean_average_precision: no classes")
    return 100.0 * float(np.mean([average_precision(s[:, c], y[:, c]) for c in range(s.shape[1])]))
