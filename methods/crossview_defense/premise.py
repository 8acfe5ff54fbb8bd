"""The premise of the defense, measured before any defense: per training sample, how much the
model's answer distribution moves between the original and the patch-augmented view, and how
confident it is.

For every training example (teacher-forced on its own answer, augmentation drawn with a fixed
seed) `sample_statistics` gives

* ``div_mean``: the mean over answer tokens of KL(p_t || q_t) at temperature 1 (p original view,
  q augmented view);
* ``div_max``: the largest per-token KL of the answer;
* ``entropy``: the mean entropy H(p_t) of the original view;
* ``ce``: the mean CE of the original view on the answer;
* ``tv_max``: the largest per-token total variation 0.5 |p_t - q_t|_1;
* ``flip``: the share of answer tokens whose most likely token differs between the views.

The paper's premise is that backdoor outputs are abnormally invariant to a non-semantic
perturbation: poisoned samples should have a low divergence. `auroc` scores a statistic as a
poison detector (the probability that a random poisoned sample scores lower than a random clean
one, ties counted half): 0.5 is chance, 1 a perfect separation in the premise's direction.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import pyops

from . import data as D
from .defense import CrossViewDefense, DefenseConfig, answer_rows, total_variation


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """P(score of a positive < score of a negative) + 0.5 P(tie): the AUROC of "low score means
    positive" (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auroc: needs positives and negatives, got {pos.size} and {neg.size}")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    u_neg = ranks[len(pos) :].sum() - neg.size * (neg.size + 1) / 2  # pairs where neg > pos (+ ties/2)
    return float(u_neg / (pos.size * neg.size))


@torch.no_grad()
def sample_statistics(
    model,
    examples: Sequence[D.Example],
    cfg: DefenseConfig = DefenseConfig(),
    seed: int = 0,
    batch: int = 64,
    codec=None,
) -> Dict[str, np.ndarray]:
    """Per-example cross-view statistics (see the module doc) of `model` in eval mode; `codec` makes
    the batches (`codec.py`; default: the word-level tokenizer of the small LLaVA)."""
    from .codec import ToyCodec

    was = model.training
    model.eval()
    defense = CrossViewDefense(model, cfg, seed)
    weight, bias = defense.adapter.head()
    codec = ToyCodec(defense.adapter.n_image_tokens) if codec is None else codec
    out: Dict[str, List[float]] = {k: [] for k in ("div_mean", "div_max", "entropy", "ce", "tv_max", "flip")}
    for s in range(0, len(examples), batch):
        b = codec.collate(examples[s : s + batch])
        dev = weight.device
        b = {k: v.to(dev) for k, v in b.items()}
        defense.generator.manual_seed(seed * 1_000_003 + s)
        h_a, h_b = defense.two_views(b)
        ra, y, sid, keep = answer_rows(h_a, b["labels"])
        rb = h_b[:, :-1][keep]
        r = pyops.fused_linear_cross_view(ra, rb, weight, bias, target=y)
        tv = total_variation(ra, rb, weight, bias)
        flip = (F.linear(ra, weight, bias).argmax(-1) != F.linear(rb, weight, bias).argmax(-1)).double()
        nb = h_a.shape[0]
        for i in range(nb):
            m = sid == i
            if not bool(m.any()):
                for k in out:
                    out[k].append(float("nan"))
                continue
            kl = r.kl_ab[m].double()
            out["div_mean"].append(float(kl.mean()))
            out["div_max"].append(float(kl.max()))
            out["entropy"].append(float(r.entropy_a[m].double().mean()))
            out["ce"].append(float(r.ce_a[m].double().mean()))
            out["tv_max"].append(float(tv[m].max()))
            out["flip"].append(float(flip[m].mean()))
    model.train(was)
    return {k: np.asarray(v) for k, v in out.items()}
