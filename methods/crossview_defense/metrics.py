"""Caption, VQA and attack metrics, written out here (no pycocoevalcap at run time).

* ``bleu4``: corpus BLEU-4 (Papineni et al. 2002) exactly as coco-caption's ``Bleu(4)`` reports
  ``Bleu_4`` (pycocoevalcap ``BleuScorer``, option "closest"): clipped 1-4-gram matches and
  candidate n-gram counts summed over the corpus, each precision taken as
  ``(matches + 1e-15) / (count + 1e-9)``, their product raised to 1/4, and the brevity penalty
  ``exp(1 - 1/ratio)`` when ``ratio = (cand_len + 1e-15) / (ref_len + 1e-9) < 1``, where the
  reference length of a candidate is that of its closest reference (the shorter one on a tie).
  Those two constants are coco-caption's: a corpus with no 4-gram match scores a tiny positive
  number (e.g. 8.7e-13), not 0, and an exact match scores a hair under 1 (by ~1e-10), not 1.
* ``cider_d``: CIDEr-D (Vedantam et al. 2015) as coco-caption computes it (pycocoevalcap's
  ``Cider``, which is CIDEr-D: the same code as ``CiderD`` of the authors' cider repository with
  idf from the evaluated corpus): tf-idf n-gram vectors (n = 1..4, idf ``log(N) - log(max(1, df))``
  with N the number of images and df the number of images whose reference set holds the n-gram),
  candidate weights clipped by the reference's, a Gaussian length penalty (sigma = 6), averaged
  over references and n, times 10. A corpus of one image scores 0 (every idf is log 1 - log 1).
* ``vqa_accuracy``: exact match of the generated answer with the single ground-truth word.
* ``attack_success_rate``: the share of outputs containing the target response.
All scores are fractions in [0, 1] except CIDEr-D (0-10, conventionally reported x100 like BLEU).
Captions here are already lower-case words separated by single spaces with no punctuation (the
generated ones and the references of ``data``), so they are split on whitespace as they are:
coco-caption's PTB tokenizer (Java, run before its scorers) would leave them unchanged.
``tests/test_crossview_metrics_reference.py`` checks both scores against pycocoevalcap.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import List, Sequence


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check(cands, refs, fn):
    if len(cands) != len(refs):
        raise ValueError(f"{fn}: {len(cands)} candidates but {len(refs)} reference sets")
    if any(len(r) == 0 for r in refs):
        raise ValueError(f"{fn}: every candidate needs at least one reference")


# coco-caption's BleuScorer constants: added to the matches and to the counts (and to the
# candidate and reference lengths) so that no precision is 0 and nothing divides by 0.
_TINY = 1e-15
_SMALL = 1e-9


def bleu4(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    _check(cands, refs, "bleu4")
    if not cands:
        return 0.0
    match, total = [0] * 4, [0] * 4
    c_len = r_len = 0
    for c, rs in zip(cands, refs):
        cw, rws = c.split(), [r.split() for r in rs]
        c_len += len(cw)
        # the closest reference length; on a tie the shorter one
        r_len += min((abs(len(r) - len(cw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            cn = _ngrams(cw, n)
            best = Counter()
            for r in rws:
                best |= _ngrams(r, n)
            match[n - 1] += sum(min(k, best[g]) for g, k in cn.items())
            total[n - 1] += max(len(cw) - n + 1, 0)
    # The same float operations in the same order as coco-caption, so the result is the same
    # double: the product of the four smoothed precisions, its 4th root, the brevity penalty.
    prod = 1.0
    for m, t in zip(match, total):
        prod *= (m + _TINY) / (t + _SMALL)
    score = prod**0.25
    ratio = (c_len + _TINY) / (r_len + _SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def cider_d(cands: Sequence[str], refs: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    _check(cands, refs, "cider_d")
    if not cands:
        return 0.0
    n_img = len(cands)
    df = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r.split(), n)})
    log_n = math.log(float(n_img))

    def vec(words):
        out, norms = [], []
        for n in range(1, 5):
            v = {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in _ngrams(words, n).items()}
            out.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return out, norms, len(words)

    total = 0.0
    for c, rs in zip(cands, refs):
        vc, nc, lc = vec(c.split())
        score = [0.0] * 4
        for r in rs:
            vr, nr, lr = vec(r.split())
            for n in range(4):
                val = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                if nc[n] and nr[n]:
                    val /= nc[n] * nr[n]
                score[n] += val * math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
        total += sum(score) / 4 / len(rs) * 10.0
    return total / n_img


def vqa_accuracy(answers: Sequence[str], truths: Sequence[str]) -> float:
    if len(answers) != len(truths):
        raise ValueError(f"vqa_accuracy: {len(answers)} answers but {len(truths)} truths")
    return sum(a.strip() == t.strip() for a, t in zip(answers, truths)) / max(len(answers), 1)


def attack_success_rate(outputs: Sequence[str], target: str) -> float:
    return sum(target in o for o in outputs) / max(len(outputs), 1)


def summarize_captions(cands: List[str], refs: List[List[str]]) -> dict:
    return {"bleu4": bleu4(cands, refs), "cider": cider_d(cands, refs)}
