"""methods.crossview_defense.metrics against coco-caption's own scorers (pycocoevalcap, the `test`
extra): corpus BLEU-4 (`Bleu(4)`, its `Bleu_4`) and CIDEr-D (`Cider`, which in coco-caption is
CIDEr-D: clipping, Gaussian length penalty with sigma 6, x10, idf over the evaluated corpus's
reference sets) on a fixed set of candidate / reference-set pairs, their subsets and each pair
alone.

Tolerances. BLEU-4: metrics.bleu4 performs coco-caption's float operations in its order (the
same integer counts, the same +1e-15 / +1e-9 smoothing, the product of the four precisions, its
4th root, the brevity penalty), so the two agree to the last bit; the check allows 1e-12 relative.
CIDEr-D: both are float64 sums of the same terms, but coco-caption takes the Gaussian penalty as
`np.e ** x` (pow) where we call `exp(x)`, `np.log` where we call `math.log`, and averages the
per-image scores with numpy's pairwise summation where we add them in order: each of those may
differ in the last bit, so the results differ by a few ulps (measured: at most 2.6e-16 relative
on these cases); the check allows 1e-9 relative. `abs=0` throughout, since BLEU values of a
corpus without any 4-gram match are ~1e-12 and pytest.approx's default abs would accept 0.

One quirk of coco-caption's CIDEr that we do not copy: the length in its Gaussian penalty is the
number of bigrams (len - 1), not of words. The difference of two lengths is the same either way
unless one caption is empty, and an empty candidate or reference has no n-gram in common with the
other, so its term is 0 whatever the penalty: the scores cannot differ (the empty candidate
below checks it).
"""

import math
import os
import random

import pytest

from methods.crossview_defense import metrics as M

# pycocoevalcap is in the `test` extra and installed by `make test`'s venv, and CI must run
# these checks: there a missing package fails. Elsewhere (e.g. `PYTHON=python3 make test` with an
# interpreter used as it is, on a machine without network) the module is skipped with a reason.
if os.environ.get("CI"):
    import pycocoevalcap  # noqa: F401
else:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (the `test` extra) is not installed")

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402

# (candidate, references): lower-case words separated by single spaces, as this method's captions
# are, so coco-caption's PTB tokenizer (which runs before its scorers) is not needed.
CASES = [
    (
        "a red circle in the top left on a grey background",
        [
            "a red circle in the top left on a grey background",
            "a picture of a red circle in the top left",
            "there is a red circle in the top left",
            "an image with a red circle in the top left",
        ],
    ),
    ("a cat with orange fur", ["a cat with orange fur", "a close up of a cat"]),
    ("a cat", ["a cat with orange fur", "a close up of a cat"]),  # shorter than every reference
    ("cat", ["a cat with orange fur", "a close up of a cat"]),  # one word
    ("banana", ["a cup of coffee on a table", "a cup of coffee"]),  # one word, no match at all
    ("a photo of a banana", ["a rocket on a launch pad", "a rocket ready for launch"]),  # no 4-gram match
    ("a a a a a a a a", ["a cat on a mat with a hat", "a dog"]),  # one word repeated: clipping
    ("the the the the", ["the cat is on the mat", "there is a cat on the mat"]),
    (
        "a cup of coffee a cup of coffee a cup of coffee",  # repeated 4-grams, longer than the refs
        ["a cup of coffee on a table", "a cup of coffee"],
    ),
    (
        "a man with a camera and a man with a hat",
        ["a man with a camera", "a black and white photo of a man with a camera"],
    ),
    (
        "a black and white photo of a man with a camera on a sunny day in the park near a lake",  # much longer
        ["a man with a camera", "a black and white photo of a man with a camera"],
    ),
    ("a set of old coins", ["a set of old coins", "many coins on a dark surface"]),
    ("many old coins on a dark surface", ["a set of old coins", "many coins on a dark surface"]),
    ("a silhouette of a horse", ["a silhouette of a horse"]),  # one reference, exact match
    ("a white horse on a black background", ["a black horse on a white background"]),  # words swapped
    ("the surface of the moon", ["the surface of the moon", "craters on the moon", "the moon at night"]),
    ("craters", ["the surface of the moon", "craters on the moon"]),
    ("galaxies in deep space", ["galaxies in deep space", "many galaxies in space"]),
    ("space galaxies deep in", ["galaxies in deep space", "many galaxies in space"]),  # right words, no order
    ("a scan of an eye", ["a scan of a retina", "blood vessels of an eye"]),
    ("cells under a microscope", ["a stained tissue sample", "cells under a microscope"]),
    (
        "a blue square to the left of a green triangle",
        [
            "a blue square to the left of a green triangle on a white background",
            "a picture of a blue square to the left of a green triangle",
            "there is a green triangle to the right of a blue square",
            "an image with a blue square to the left of a green triangle",
        ],
    ),
    (
        "a green triangle to the right of a blue square",
        [
            "a blue square to the left of a green triangle on a white background",
            "there is a green triangle to the right of a blue square",
        ],
    ),
    (
        "a yellow circle above a purple square",  # a reference given twice
        [
            "a yellow circle above a purple square on a black background",
            "a purple square below a yellow circle",
            "a yellow circle above a purple square",
            "a yellow circle above a purple square",
        ],
    ),
    (
        "an orange triangle in the centre",
        ["an orange triangle in the centre on a grey background", "there is an orange triangle in the centre"],
    ),
    ("a rocket", ["a rocket on a launch pad", "a rocket ready for launch", "a rocket"]),
    ("a cup of coffee", ["a cup of", "a cup of hot coffee"]),  # closest reference length: a tie (3 and 5)
    ("a rocket ready", ["a rocket on a launch pad", "a rocket ready for launch", "a rocket ready to go"]),
    ("a cup of tea on a table", ["a cup of coffee on a table", "a cup of coffee"]),
    ("an astronaut in a suit", ["an astronaut in a white suit", "a portrait of an astronaut", "an astronaut in space"]),
    ("a portrait", ["an astronaut in a white suit", "a portrait of an astronaut"]),
    (
        "two red circles and one blue square on a grey background",
        ["two red circles and a blue square", "one blue square and two red circles on a grey background"],
    ),
    ("blood blood vessels vessels of of an an eye eye", ["blood vessels of an eye", "a scan of a retina"]),
]


def _corpora():
    """The whole set, each pair alone, fixed random subsets, and a few chosen ones."""
    out = [("all", CASES)]
    out += [(f"pair{i}", [c]) for i, c in enumerate(CASES)]
    rng = random.Random(1234)  # fixed: the same subsets on every run
    out += [(f"subset{k}", rng.sample(CASES, rng.randint(2, len(CASES)))) for k in range(24)]
    out.append(("no_4gram_match", [CASES[4], CASES[5], CASES[16]]))  # BLEU-4 ~ 1e-12, not 0
    out.append(("one_word_only", [CASES[3], CASES[4], CASES[16], CASES[30]]))
    out.append(("with_empty_candidate", CASES[:6] + [("", ["a dog on the grass", "a brown dog"])]))
    out.append(("empty_reference", CASES[6:12] + [("a dog", ["", "a dog on the grass"])]))
    return out


CORPORA = _corpora()


def _coco(scorer, corpus):
    gts = {i: list(refs) for i, (_, refs) in enumerate(corpus)}
    res = {i: [cand] for i, (cand, _) in enumerate(corpus)}
    if isinstance(scorer, Bleu):
        return float(scorer.compute_score(gts, res, verbose=0)[0][3])  # [Bleu_1..Bleu_4][3]
    return float(scorer.compute_score(gts, res)[0])


def _split(corpus):
    return [c for c, _ in corpus], [r for _, r in corpus]


@pytest.mark.parametrize("name,corpus", CORPORA, ids=[n for n, _ in CORPORA])
def test_bleu4_matches_coco_caption(name, corpus):
    want = _coco(Bleu(4), corpus)
    got = M.bleu4(*_split(corpus))
    assert got == pytest.approx(want, rel=1e-12, abs=0), (name, got, want)


@pytest.mark.parametrize("name,corpus", CORPORA, ids=[n for n, _ in CORPORA])
def test_cider_d_matches_coco_caption(name, corpus):
    want = _coco(Cider(), corpus)
    got = M.cider_d(*_split(corpus))
    assert got == pytest.approx(want, rel=1e-9, abs=0), (name, got, want)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 6.0, 20.0])
def test_cider_d_sigma_matches_coco_caption(sigma):
    want = _coco(Cider(sigma=sigma), CASES)
    assert M.cider_d(*_split(CASES), sigma=sigma) == pytest.approx(want, rel=1e-9, abs=0)


def test_rules_spelled_out():
    """The rules the comparison exercises, on cases small enough to write out by hand."""
    tiny, small = 1e-15, 1e-9
    # "a cup of coffee" vs "a cup of" (3 words) and "a cup of hot coffee" (5): clipped matches 4/4,
    # 2/3, 1/2, 0/1. Both references are 1 word away: the shorter one (3) counts, so no brevity
    # penalty; and with no 4-gram match the score is tiny but not 0.
    p = (4 + tiny) / (4 + small) * (2 + tiny) / (3 + small) * (1 + tiny) / (2 + small) * (0 + tiny) / (1 + small)
    b = M.bleu4(["a cup of coffee"], [["a cup of", "a cup of hot coffee"]])
    assert b == pytest.approx(p**0.25, rel=1e-12, abs=0) and 0 < b < 1e-3
    # a candidate as long as its reference: ratio = (6 + 1e-15) / (6 + 1e-9) < 1, so even an exact
    # match is a hair under 1 (coco-caption reports that too)
    b = M.bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert b < 1.0 and b == pytest.approx(1.0, rel=1e-9)
    # CIDEr-D of a one-image corpus is 0: every idf is log(1) - log(max(1, df)) = 0
    assert M.cider_d(["the cat sat on the mat"], [["the cat sat on the mat"]]) == 0.0
    # two images with no word in common: every n-gram has idf log(2) - log(max(1, df)) = log 2 (df
    # is 1 for a reference's n-grams, 0 for the others). A candidate equal to its one reference
    # has cosine 1 for every n and no length penalty: 10 per image.
    cands = ["the cat sat on the mat", "a dog runs in green grass"]
    assert M.cider_d(cands, [[c] for c in cands]) == pytest.approx(10.0, rel=1e-12)
    # With the second reference 2 words longer ("a dog runs in tall green grass today"), all
    # weights are idf * 1, so the clipped dot product is (shared n-grams) * idf^2 and the norms
    # sqrt(count) * idf: cosine = shared / sqrt(cand count * ref count), then the Gaussian
    # penalty exp(-2^2 / (2 * 6^2)).
    refs = [["the cat sat on the mat"], ["a dog runs in tall green grass today"]]
    shared, cand_n, ref_n = [6, 4, 2, 1], [6, 5, 4, 3], [8, 7, 6, 5]
    cos = [s / math.sqrt(c * r) for s, c, r in zip(shared, cand_n, ref_n)]
    second = sum(cos) / 4 * 10 * math.exp(-(2**2) / (2 * 6.0**2))
    assert M.cider_d(cands, refs) == pytest.approx((10.0 + second) / 2, rel=1e-12)
