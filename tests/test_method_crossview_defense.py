"""methods.crossview_defense: data (scenes against their drawn layout), tokenizer, attacks (trigger
placement against the augmentation cells, WaNet's displacement, ISSBA's bound), patch augmentation,
the objective (fused and eager against a loop-by-loop float64 reference of the module doc's
formula), the suspicion weights and their memory, the model adapter on two architectures, the
Trainer subclass, the cached base model, the premise statistics, metrics, the CLI (flags from the
configs, config files, continuing with a larger budget, one-line errors) and DDP under torchrun
(the defense's global-batch statistics, train and the CLI against one process).

Random inputs come from the per-test torch seed of conftest.py (its header prints the run's seed;
PYOPS_TEST_SEED replays it); numpy generators drawn from it print their seed."""

import copy
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("skimage")

import pyops  # noqa: E402
from methods.crossview_defense import attacks as A  # noqa: E402
from methods.crossview_defense import data as D  # noqa: E402
from methods.crossview_defense import defense as DF  # noqa: E402
from methods.crossview_defense import metrics as M  # noqa: E402
from methods.crossview_defense import premise as P  # noqa: E402
from methods.crossview_defense import train as TR  # noqa: E402
from methods.crossview_defense.model import ModelConfig, VLMAdapter, build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)
CELL = 8  # the augmentation's cells: one vision patch (ModelConfig.patch_size 8, DefenseConfig.cell 1)


@pytest.fixture(scope="module")
def examples():
    return D.make_examples(120, seed=3)


def _image(seed=0, lo=0.2, hi=0.8):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand((3, D.IMAGE_SIZE, D.IMAGE_SIZE), generator=g)


def _text(path):
    with open(path) as f:
        return f.read()


def _np_rng(tag):
    """A numpy generator seeded from the test's torch seed (conftest); prints its seed."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    print(f"{tag}: numpy seed {seed}")
    return np.random.default_rng(seed), seed


# --------------------------------------------------------------------------------------------
# data and tokenizer
# --------------------------------------------------------------------------------------------
def test_examples_are_valid_and_the_tokenizer_knows_every_word(examples):
    tasks = {ex.task for ex in examples}
    assert tasks == {"caption", "vqa"}
    assert any(ex.source != "scene" for ex in examples)  # photos are mixed in
    for ex in examples:
        assert ex.image.shape == (3, D.IMAGE_SIZE, D.IMAGE_SIZE) and 0 <= ex.image.min() and ex.image.max() <= 1
        ids = D.encode_words(ex.prompt + ex.answer)
        assert D.UNK not in ids and len(ids) == len(ex.prompt) + len(ex.answer)
        assert D.decode_ids(D.encode_words(ex.answer)) == " ".join(ex.answer)
        if ex.task == "caption":
            assert " ".join(ex.answer) in ex.refs
    assert D.make_examples(5, 1)[0].answer == D.make_examples(5, 1)[0].answer  # seeded


def _check_caption(cap, scene, size):
    """Checks one caption against the geometry of the drawn objects (not against scene.layout)."""
    objs = {s: (c, cy, cx) for c, s, cy, cx in scene.objects}
    mid = (size - 1) / 2  # the image's mid-lines (pixel centres run 0 .. size - 1)
    for c, s, _, _ in scene.objects:
        assert f"{c} {s}" in cap, (cap, scene)
    if "background" in cap:
        assert f"on a {scene.bg} background" in cap, (cap, scene)
    if len(objs) == 1:
        m = re.search(r"in the (top|bottom) (left|right)", cap)
        assert m, (cap, scene)
        ((_, cy, cx),) = objs.values()
        assert m[1] == ("top" if cy < mid else "bottom") and m[2] == ("left" if cx < mid else "right"), (cap, scene)
        return
    m = re.search(r"a (\w+) (\w+) (left of|right of|above|below) a (\w+) (\w+)", cap)
    assert m, (cap, scene)
    (c1, s1, rel, c2, s2) = m.groups()
    assert objs[s1][0] == c1 and objs[s2][0] == c2 and s1 != s2, (cap, scene)
    axis = 2 if rel in ("left of", "right of") else 1  # cx or cy
    first, second = (s1, s2) if rel in ("left of", "above") else (s2, s1)
    # first object left of / above the second by at least size / 3, and roughly level across
    assert objs[second][axis] - objs[first][axis] >= size / 3, (cap, scene)
    assert abs(objs[second][3 - axis] - objs[first][3 - axis]) <= size // 8, (cap, scene)


def _check_question(q, a, scene, size):
    """Checks one question's answer against the drawn objects; returns the question's template."""
    objs = {s: (c, cy, cx) for c, s, cy, cx in scene.objects}
    mid = (size - 1) / 2
    upper = min(objs, key=lambda s: objs[s][1])
    leftmost = min(objs, key=lambda s: objs[s][2])
    j = " ".join(q)
    if m := re.fullmatch(r"what color is the (\w+)", j):
        assert a == objs[m[1]][0]
        return "colour"
    if j == "how many shapes are there":
        assert a == D.COUNT_WORDS[len(scene.objects)]
        return "count"
    if m := re.fullmatch(r"is there a (\w+) (\w+)", j):
        assert m[1] in D.COLOURS and m[2] in D.SHAPES
        assert a == ("yes" if m[2] in objs and objs[m[2]][0] == m[1] else "no")
        return "presence-" + a
    if j == "what is the background color":
        assert a == scene.bg
        return "background"
    if m := re.fullmatch(r"which side is the (\w+) on", j):
        assert len(objs) == 1 and a == ("left" if objs[m[1]][2] < mid else "right")
        return "side-" + a
    if m := re.fullmatch(r"is the (\w+) at the top", j):
        if len(objs) == 1:  # where the single object is
            assert a == ("yes" if objs[m[1]][1] < mid else "no")
            return "top1-" + a
        assert scene.layout == "v" and a == ("yes" if m[1] == upper else "no")  # which of two is above
        return "top2-" + a
    if j == "what shape is on the left":
        assert len(objs) == 2 and scene.layout == "h" and a == leftmost
        return "shape-left"
    if j == "what shape is at the top":
        assert len(objs) == 2 and scene.layout == "v" and a == upper
        return "shape-top"
    if m := re.fullmatch(r"is the (\w+) on the left", j):
        assert len(objs) == 2 and scene.layout == "h" and a == ("yes" if m[1] == leftmost else "no")
        return "left2-" + a
    raise AssertionError(f"unknown question {j!r}")


def test_scene_answers_match_the_drawn_scene():
    """300 seeded scenes: the Scene agrees with the image, captions and VQA answers agree with the
    objects' centres, and every question template (both answers of the yes/no ones) occurs."""
    size = D.IMAGE_SIZE
    mid, margin = (size - 1) / 2, size // 10
    templates, n_objects = set(), set()
    for seed in range(300):
        img, scene = D.random_scene(np.random.default_rng(seed), size)
        where = f"scene seed {seed}: {scene}"
        assert img.shape == (size, size, 3) and img.dtype == np.uint8, where
        assert 1 <= len(scene.objects) <= 2 and scene.bg in D.BACKGROUNDS, where
        assert len({s for _, s, _, _ in scene.objects}) == len(scene.objects), where  # distinct shapes
        n_objects.add(len(scene.objects))
        # the image really shows the drawn colours at the centres (colour jitter +-15) and the background
        for c, s, cy, cx in scene.objects:
            assert c in D.COLOURS and s in D.SHAPES, where
            assert np.abs(img[cy, cx].astype(int) - D.COLOURS[c]).max() <= 15, where
        assert np.abs(img[0, 0].astype(int) - D.BACKGROUNDS[scene.bg]).max() <= 6, where  # noise +-6
        if len(scene.objects) == 1:
            assert scene.layout in D.REGIONS, where
            _, _, cy, cx = scene.objects[0]
            vert, horiz = scene.layout.split()
            assert (cy < mid) == (vert == "top") and (cx < mid) == (horiz == "left"), where
            assert abs(cy - mid) >= margin and abs(cx - mid) >= margin, where  # clearly in its quadrant
        else:
            assert scene.layout in ("h", "v"), where
            first, second = scene.ordered()
            axis = 3 if scene.layout == "h" else 2
            assert second[axis] - first[axis] >= size / 3, where
            assert abs(second[5 - axis] - first[5 - axis]) <= size // 8, where
        caps = D.scene_captions(scene)
        assert len(caps) == 4 and len(set(caps)) == 4, where
        for cap in caps:
            _check_caption(cap, scene, size)
            ids = D.encode_words(cap.split())
            assert D.UNK not in ids and len(ids) == len(cap.split()), (where, cap)
        assert any("background" in cap for cap in caps), where
        for k in range(8):
            q, a = D.scene_questions(scene, np.random.default_rng([seed, k]), size)
            templates.add(_check_question(q, a, scene, size))
            ids = D.encode_words(q + [a])
            assert D.UNK not in ids and len(ids) == len(q) + 1, (where, q, a)
    assert n_objects == {1, 2}
    assert templates == {
        "colour",
        "count",
        "presence-yes",
        "presence-no",
        "background",
        "side-left",
        "side-right",
        "top1-yes",
        "top1-no",
        "top2-yes",
        "top2-no",
        "shape-left",
        "shape-top",
        "left2-yes",
        "left2-no",
    }, templates


def test_collate_masks_prompts_and_empty_answers(examples):
    exs = [examples[0], dataclasses.replace(examples[1], answer=[])]
    b = D.collate(exs, 36)
    lab, ids = b["labels"], b["input_ids"]
    n_prompt = 1 + 36 + len(exs[0].prompt) + 1
    assert (lab[0, :n_prompt] == -100).all()
    assert lab[0, n_prompt : n_prompt + len(exs[0].answer) + 1].tolist() == D.encode_words(exs[0].answer) + [D.EOS]
    assert (lab[1] == -100).all()  # no answer: nothing to learn from
    assert (ids[:, 1:37] == D.IMAGE).all() and b["pixel_values"].shape == (2, 3, 48, 48)
    left = D.collate(exs, 36, with_answers=False, pad_left=True)
    assert (left["input_ids"][:, -1] == D.SEP).all()


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------
def _changed(atk, x=None):
    x = _image() if x is None else x
    y, _ = atk.apply(x, ["describe", "the", "image"])
    return y, (y != x).any(0)


def _checkerboard_mask(lo, hi, size=D.IMAGE_SIZE):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo : hi + 1, lo : hi + 1] = True
    return m


@pytest.mark.parametrize(
    "atk, lo, hi",
    [
        (A.BadNet(size=6, margin=3), 39, 44),
        (A.BadNet(size=6, margin=1), 41, 46),
        (A.TextImage(size=4, margin=2), 42, 45),
    ],
    ids=["badnet-6-3", "badnet-6-1", "textimage-4-2"],
)
def test_patch_triggers_change_exactly_their_patch(atk, lo, hi):
    x = _image()
    y, diff = _changed(atk, x)
    assert torch.equal(diff, _checkerboard_mask(lo, hi))  # the checkerboard's 0/1 differ from any pixel of x
    i = torch.arange(hi - lo + 1)
    assert torch.equal(y[:, lo : hi + 1, lo : hi + 1], ((i[:, None] + i[None]) % 2).float().expand(3, -1, -1))
    assert torch.equal(x, _image())  # the input is never modified
    p = atk.apply(x, ["describe", "the", "image"])[1]
    assert p == (["cf"] if isinstance(atk, A.TextImage) else []) + ["describe", "the", "image"]


def test_default_patches_sit_where_their_parameters_say():
    for atk in (A.BadNet(), A.TextImage()):
        patch = atk.patch if isinstance(atk, A.TextImage) else atk
        s, m = patch.size, patch.margin
        lo = D.IMAGE_SIZE - s - m
        assert torch.equal(_changed(atk)[1], _checkerboard_mask(lo, lo + s - 1)), type(atk).__name__


def _crosses_a_cell_boundary(idx):
    lo, hi = int(idx.min()), int(idx.max())
    return any(lo < k <= hi for k in range(CELL, D.IMAGE_SIZE, CELL))


def test_default_patch_triggers_are_not_aligned_to_the_augmentation_cells():
    """A patch that fills whole cells moves intact under a cell shuffle / swap. BadNet's default
    6 x 6 patch crosses a cell boundary on both axes, so the augmentation cuts it; the text+image
    trigger's 4 x 4 patch lies inside one cell without touching its borders (2 px from the corner)."""
    diff = _changed(A.BadNet())[1]
    rows, cols = diff.any(1).nonzero()[:, 0], diff.any(0).nonzero()[:, 0]
    assert _crosses_a_cell_boundary(rows) and _crosses_a_cell_boundary(cols), (rows.tolist(), cols.tolist())
    diff = _changed(A.TextImage())[1]
    for idx in (diff.any(1).nonzero()[:, 0], diff.any(0).nonzero()[:, 0]):
        lo, hi = int(idx.min()), int(idx.max())
        assert not _crosses_a_cell_boundary(idx) and lo % CELL != 0 and (hi + 1) % CELL != 0, (lo, hi)


def test_sig_period_is_not_aligned_with_the_cells():
    """SIG's sinusoid has `frequency` periods across the image (measured: the one non-zero DFT bin of
    a row); its period (48 / 5 = 9.6 px by default) is neither a divisor nor a multiple of the cell."""
    s = A.SIG()
    row = s.signal(D.IMAGE_SIZE, D.IMAGE_SIZE)[0, 0].double()
    spec = torch.fft.rfft(row).abs()
    k = int(spec.argmax())
    assert k == s.frequency and spec[k] > 1e3 * torch.cat([spec[:k], spec[k + 1 :]]).max()
    period = Fraction(D.IMAGE_SIZE, k)
    assert (period / CELL).denominator != 1 and (CELL / period).denominator != 1, period


def test_blended_sig_issba_bounded_and_deterministic():
    x = _image()
    y, _ = A.Blended(alpha=0.15).apply(x, [])
    assert (y - x).abs().max() <= 0.15 + 1e-6 and (y - x).abs().mean() > 0.01
    assert torch.equal(y, A.Blended(alpha=0.15).apply(x, [])[0])
    s = A.SIG()
    y, _ = s.apply(x, [])
    torch.testing.assert_close(y - x, s.signal(48, 48))  # no clamping for an image in [0.2, 0.8]
    torch.testing.assert_close((y - x)[:, 0], (y - x)[:, 17], rtol=0, atol=1e-6)  # the same in every row


def _local_mean(img, k=5):
    """Mean over the k x k window (clipped at the borders) of the channel mean, by loops."""
    lum = img.double().mean(0)
    s, r = lum.shape[0], k // 2
    out = torch.empty_like(lum)
    for i in range(s):
        for j in range(s):
            out[i, j] = lum[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean()
    return out


@pytest.mark.parametrize("eps", [None, 8 / 255, 16 / 255], ids=["default", "8", "16"])
def test_issba_residual_is_bounded_by_its_epsilon(eps):
    """residual = epsilon * key * (1 + local luminance) / 2: a fixed +-1 key, |residual| <= epsilon."""
    atk = A.ISSBA() if eps is None else A.ISSBA(epsilon=eps)
    eps = atk.epsilon
    res = []
    for seed in (0, 1):
        x = _image(seed)  # in [0.2, 0.8]: x + residual is never clamped
        r = (atk.apply(x, [])[0] - x).double()
        assert r.abs().max() <= eps + 1e-6
        scale = eps * (0.5 + 0.5 * _local_mean(x))
        torch.testing.assert_close(r.abs(), scale.expand_as(r), rtol=0, atol=1e-6)
        res.append(r)
    assert torch.equal(res[0].sign(), res[1].sign())  # one key pattern ...
    assert not torch.allclose(res[0], res[1])  # ... modulated per image: sample-specific


def test_wanet_displacement_is_its_flow_and_about_strength_pixels():
    """The warp measured on linear ramps (bilinear sampling of a ramp is exact: displacement =
    change / slope) is the flow's offset in pixels, (grid - identity) * (size - 1) / 2 with
    align_corners=True. Expectation from the code: the control values are scaled to a mean |.| of
    1 per component, times `strength` pixels; bicubic up-sampling between control values of random
    signs shrinks the per-component mean to ~0.7 strength (measured 0.67 for the default key), and
    the 2-D displacement's mean length is ~1.07 strength: "strength s pixels" is the mean length
    of the displacement, within 30%."""
    s_ = D.IMAGE_SIZE
    ramp = 0.1 + 0.8 * torch.arange(s_, dtype=torch.float32) / (s_ - 1)
    slope = 0.8 / (s_ - 1)
    img_x, img_y = ramp[None, None, :].expand(3, s_, s_).clone(), ramp[None, :, None].expand(3, s_, s_).clone()
    lin = torch.linspace(-1, 1, s_)
    for strength in (0.25, 2.0):
        atk = A.WaNet(strength=strength)
        dx = (atk.apply(img_x, [])[0] - img_x)[0].double() / slope
        dy = (atk.apply(img_y, [])[0] - img_y)[0].double() / slope
        grid = atk.flow(s_, s_)[0].double()
        torch.testing.assert_close(dx, (grid[..., 0] - lin[None, :]) * (s_ - 1) / 2, rtol=0, atol=1e-3)
        torch.testing.assert_close(dy, (grid[..., 1] - lin[:, None]) * (s_ - 1) / 2, rtol=0, atol=1e-3)
        inner = (slice(1, -1), slice(1, -1))  # away from the border, where the grid is clamped
        length = torch.sqrt(dx[inner] ** 2 + dy[inner] ** 2).mean()
        assert 0.7 * strength <= length <= 1.3 * strength, (strength, float(length))
    flat = torch.full((3, 48, 48), 0.4)
    assert torch.allclose(A.WaNet(strength=2.0).apply(flat, [])[0], flat, atol=1e-6)  # moves pixels, nothing else
    assert torch.allclose(A.WaNet(strength=0.0).apply(_image(), [])[0], _image(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(A.ATTACKS))
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05, 0.1])
def test_poisoning_is_exact_and_seeded(examples, name, ratio):
    atk = A.make_attack(name)
    out, idx = atk.poison(examples, ratio, seed=7)
    assert len(idx) == round(ratio * len(examples)) and len(set(idx)) == len(idx)
    assert idx == atk.poison(examples, ratio, seed=7)[1]
    for i, ex in enumerate(out):
        if i in idx:
            assert ex.poisoned and ex.task == "caption" and " ".join(ex.answer) == D.TARGET
            assert not torch.equal(ex.image, examples[i].image)
        else:
            assert ex is examples[i]
    if ratio == 0.1:
        assert idx != atk.poison(examples, ratio, seed=8)[1]


def test_bad_poisoning_ratio_and_images(examples):
    for r in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="ratio"):
            A.BadNet().poison(examples, r, 0)
    with pytest.raises(ValueError, match="captioning"):
        A.BadNet().poison(examples, 1.0, 0)  # more than the captioning examples
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        A.SIG().apply(torch.rand(48, 48), [])
    with pytest.raises(ValueError, match="unknown attack"):
        A.make_attack("nope")


# --------------------------------------------------------------------------------------------
# patch augmentation
# --------------------------------------------------------------------------------------------
def _cells(x, c):
    b, ch, s, _ = x.shape
    g = s // c
    return x.reshape(b, ch, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)


@pytest.mark.parametrize("op", ["shuffle", "swap", "mask"])
@pytest.mark.parametrize("cell", [1, 2])
def test_patch_augment_works_on_whole_vision_patches(op, cell):
    x = torch.rand(5, 3, 48, 48)
    aug = DF.PatchAugment(48, 8, cell=cell, ops=(op,), mask_ratio=0.3, swaps=2)
    y = aug(x, torch.Generator().manual_seed(0))
    cx, cy = _cells(x, 8 * cell), _cells(y, 8 * cell)
    assert not torch.equal(x, y)
    for b in range(5):
        if op == "mask":
            fill = x[b].mean((1, 2))
            changed = ~(cx[b] == cy[b]).all(-1)
            k = max(1, round(0.3 * cx.shape[1]))
            assert int(changed.sum()) == k
            torch.testing.assert_close(
                cy[b, changed].reshape(k, 3, -1), fill[None, :, None].expand(k, 3, (8 * cell) ** 2)
            )
        else:  # a permutation of whole cells
            match = (cy[b][:, None] == cx[b][None]).all(-1)
            assert (match.sum(1) >= 1).all()
            assert torch.equal(cy[b].sort(0).values, cx[b].sort(0).values)
            if op == "swap":
                assert int((cx[b] != cy[b]).any(-1).sum()) <= 4


def test_patch_augment_bad_sizes():
    with pytest.raises(ValueError, match="multiple of the cell size"):
        DF.PatchAugment(48, 8, cell=4)
    aug = DF.PatchAugment(48, 8)
    with pytest.raises(ValueError, match=r"\(B, C, 48, 48\)"):
        aug(torch.rand(2, 3, 32, 32))
    assert aug(torch.rand(0, 3, 48, 48)).shape == (0, 3, 48, 48)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------
def _objective_inputs(b=5, length=9, h=16, v=23, seed=0, dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(b, length, h, generator=g, dtype=dtype, requires_grad=True)
    hb = (ha.detach() + 0.3 * torch.randn(b, length, h, generator=g, dtype=dtype)).requires_grad_()
    w = (0.5 * torch.randn(v, h, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.full((b, length), -100)
    for i in range(b):
        n = i % 4  # samples 0, 4, ... have no answer tokens
        labels[i, length - n :] = torch.randint(0, v, (n,), generator=g)
    if not bias:
        return ha, hb, w, labels
    return ha, hb, w, labels, (0.3 * torch.randn(v, generator=g, dtype=dtype)).requires_grad_()


# weighting -> exponents (a, b) of the suspicion statistic H_i^a D_i^b (module doc of defense.py)
EXPONENTS = {"invariance": (0, 1), "confidence": (1, 0), "confident-invariant": (1, 1), "confident-sensitive": (1, -1)}


def _reference_objective(
    ha, hb, labels, w, bias, cfg, token_total=None, sample_total=None, floor=None, band_t=1.0, weight_t=1.0
):
    """The module doc's loss, sample by sample and row by row in float64. The entropies of the band
    and of the weights are taken at temperature `band_t` / `weight_t` (1: the spec; other values
    show that a test tells them apart). Returns (loss, info)."""
    t_s = cfg.softmax_temperature

    def logits(x):
        return F.linear(x, w, bias)

    def entropy(z):
        return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

    samples = []
    for i in range(labels.shape[0]):
        t = [j for j in range(labels.shape[1] - 1) if labels[i, j + 1] != -100]
        if not t:
            continue
        y = labels[i, [j + 1 for j in t]]
        a, b = ha[i, t], hb[i, t]
        a_v = a.detach() if cfg.detach == "original" else a  # the views inside the divergence and the band
        b_v = b.detach() if cfg.detach == "augmented" else b
        lp, lq = (logits(a_v) / t_s).log_softmax(-1), (logits(b_v) / t_s).log_softmax(-1)
        kab, kba = (lp.exp() * (lp - lq)).sum(-1), (lq.exp() * (lq - lp)).sum(-1)
        tv = 0.5 * (logits(a).softmax(-1) - logits(b).softmax(-1)).abs().sum(-1)  # at T = 1
        samples.append(
            dict(
                tv=float(tv.max().detach()),
                i=i,
                ce=F.cross_entropy(logits(a), y, reduction="none"),
                ce_b=F.cross_entropy(logits(b), y, reduction="none"),
                div={"forward": kab, "reverse": kba, "symmetric": 0.5 * (kab + kba)}[cfg.divergence],
                hp=entropy(logits(a_v) / band_t),
                hq=entropy(logits(b_v) / band_t),
                h_w=float(entropy(logits(a.detach()) / weight_t).mean().detach()),
            )
        )
    n = len(samples)
    d = torch.stack([s["div"].mean() for s in samples])
    score = [
        s["tv"] if cfg.score == "tv" else float((s["div"].max() if cfg.score == "max" else s["div"].mean()).detach())
        for s in samples
    ]
    u = None
    if cfg.weighting in EXPONENTS:
        ea, eb = EXPONENTS[cfg.weighting]
        stat = [
            ea * math.log(max(s["h_w"], 0) + 1e-6) + eb * math.log(max(sc, 0) + 1e-6) for s, sc in zip(samples, score)
        ]
        lower_median = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # torch.median's choice for an even count
        med = lower_median(stat)
        mad = lower_median([abs(x - med) for x in stat])
        z = [(x - med) / (1.4826 * mad + 0.1) for x in stat]
        u = [1 / (1 + math.exp(-(-zi - cfg.suspect_z) / cfg.suspect_width)) for zi in z]
        if floor is not None:
            u = [max(ui, float(floor[s["i"]])) for ui, s in zip(u, samples)]
        wts = torch.tensor(u, dtype=d.dtype) / n
        c = [1 - cfg.ce_suppress * ui for ui in u]
    elif cfg.weighting == "entropy":
        wts = torch.softmax(-torch.tensor([s["h_w"] for s in samples], dtype=d.dtype) / cfg.weight_temperature, 0)
        c = [1.0] * n
    else:
        wts = torch.full((n,), 1.0 / n, dtype=d.dtype)
        c = [1.0] * n
    ce_sum = sum(ci * (s["ce"].clamp(max=cfg.ascent_ceiling) if ci < 0 else s["ce"]).sum() for ci, s in zip(c, samples))
    rows = sum(len(s["ce"]) for s in samples)
    n_tok = rows if token_total is None else token_total
    loss = ce_sum / n_tok + cfg.gamma * sum(s["ce_b"].sum() for s in samples) / n_tok
    capped = (wts * d.clamp(max=cfg.kappa)).sum() if cfg.cap == "sample" else (wts * d).sum().clamp(max=cfg.kappa)
    tau_hi = 0.9 * math.log(w.shape[0]) if cfg.tau_hi is None else cfg.tau_hi
    band = sum((F.relu(s["hq"] - tau_hi) + F.relu(cfg.tau_lo - s["hp"])).sum() for s in samples)
    share = 1.0 if sample_total is None else n / sample_total
    loss = loss - cfg.lambda_cv * share * capped + cfg.lambda_h * band / n_tok
    info = dict(
        u=u,
        c=c,
        d=[float(x) for x in d.detach()],
        band=float(band.detach()) / rows,
        rows=rows,
        valid=[s["i"] for s in samples],
        neg_ce=sorted(float(x) for ci, s in zip(c, samples) if ci < 0 for x in s["ce"].detach()),
    )
    return loss, info


def _mid(xs):
    """A value strictly between the two middle values of xs (so a cap or ceiling there bites on some)."""
    xs = sorted(xs)
    k = len(xs) // 2
    assert xs[k - 1] < xs[k], xs
    return 0.5 * (xs[k - 1] + xs[k])


# each case: DefenseConfig fields ("mid": set between the middle values of the per-sample
# divergences / the CE rows of samples with a negative CE weight) and extras
CASES = {
    "defaults": dict(cfg={}),
    "invariance-max-beta1-capmid": dict(
        cfg=dict(
            weighting="invariance",
            score="max",
            ce_suppress=1.0,
            suspect_z=0.5,
            suspect_width=0.5,
            detach="none",
            lambda_cv=1.0,
            kappa="mid",
            cap="sample",
            lambda_h=0.5,
            tau_lo=3.0,
            tau_hi=2.9,
            softmax_temperature=1.0,
            gamma=0.0,
            divergence="forward",
        )
    ),
    "invariance-mean-beta0-batchcap-detach-aug": dict(
        cfg=dict(
            weighting="invariance",
            score="mean",
            ce_suppress=0.0,
            suspect_z=0.0,
            suspect_width=1.0,
            detach="augmented",
            lambda_cv=2.0,
            kappa=1e9,
            cap="batch",
            lambda_h=0.3,
            tau_lo=3.0,
            softmax_temperature=1.0,
            gamma=0.0,
            divergence="reverse",
        )
    ),
    "invariance-tv-T2": dict(
        cfg=dict(
            weighting="invariance",
            score="tv",
            ce_suppress=1.0,
            suspect_z=0.0,
            suspect_width=0.5,
            detach="none",
            lambda_cv=1.0,
            kappa=1e9,
            lambda_h=0.2,
            tau_lo=3.0,
            softmax_temperature=2.0,
            gamma=0.0,
            divergence="forward",
        )
    ),
    "confidence-beta2-ascent-T2.5": dict(
        cfg=dict(
            weighting="confidence",
            score="max",
            ce_suppress=2.0,
            suspect_z=-1.0,
            suspect_width=0.5,
            ascent_ceiling="mid",
            detach="none",
            lambda_cv=1.0,
            kappa=1e9,
            lambda_h=0.5,
            tau_lo=3.0,
            tau_hi=2.5,
            softmax_temperature=2.5,
            gamma=0.0,
            divergence="forward",
        )
    ),
    "confident-invariant-mean-beta2-detach-orig-gamma": dict(
        bias=True,
        cfg=dict(
            weighting="confident-invariant",
            score="mean",
            ce_suppress=2.0,
            suspect_z=-1.0,
            suspect_width=0.7,
            ascent_ceiling="mid",
            detach="original",
            lambda_cv=1.0,
            kappa="mid",
            lambda_h=0.5,
            tau_lo=3.0,
            softmax_temperature=1.0,
            gamma=0.5,
            divergence="symmetric",
        ),
    ),
    "confident-sensitive-beta1.5-T0.7-noband": dict(
        cfg=dict(
            weighting="confident-sensitive",
            score="max",
            ce_suppress=1.5,
            suspect_z=-0.5,
            suspect_width=0.5,
            ascent_ceiling="mid",
            detach="augmented",
            lambda_cv=1.0,
            kappa=1e9,
            lambda_h=0.0,
            softmax_temperature=0.7,
            gamma=0.0,
            divergence="forward",
        )
    ),
    "entropy-T2-noband": dict(
        cfg=dict(
            weighting="entropy",
            weight_temperature=0.2,
            detach="none",
            lambda_cv=1.0,
            kappa=1e9,
            lambda_h=0.0,
            softmax_temperature=2.0,
            gamma=0.0,
            divergence="forward",
        )
    ),
    "entropy-T0.5-band-detach-orig": dict(
        cfg=dict(
            weighting="entropy",
            weight_temperature=0.5,
            detach="original",
            lambda_cv=1.0,
            kappa="mid",
            lambda_h=1.0,
            tau_lo=3.0,
            tau_hi=2.8,
            softmax_temperature=0.5,
            gamma=0.0,
            divergence="symmetric",
        )
    ),
    "uniform-T1.5-gamma-totals": dict(
        bias=True,
        totals=(7, 3),
        cfg=dict(
            weighting="uniform",
            detach="none",
            lambda_cv=1.0,
            kappa="mid",
            cap="sample",
            lambda_h=1.0,
            tau_lo=3.0,
            softmax_temperature=1.5,
            gamma=0.5,
            divergence="forward",
        ),
    ),
    "invariance-memory-floor-totals": dict(
        floor=True,
        totals=(3, 1),
        cfg=dict(
            weighting="invariance",
            score="max",
            ce_suppress=1.0,
            suspect_z=1.0,
            suspect_width=0.5,
            detach="augmented",
            lambda_cv=1.0,
            kappa=1e9,
            lambda_h=0.1,
            tau_lo=3.0,
            softmax_temperature=1.0,
            gamma=0.0,
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_objective_fused_and_eager_match_a_reference(name, monkeypatch):
    """Fused, eager and the loop-by-loop reference agree on the loss, the suspicion weights and the
    gradients of both views and the LM head (float64), for every weighting, score max/mean,
    ce_suppress 0..2 (ascent up to the ceiling), softmax_temperature != 1 (band and weights'
    entropies at temperature 1), every detach mode, gamma, a bias, accumulation totals and a
    memory floor; score "tv" (largest per-token total variation at T = 1). Each case also checks
    that the terms it is about are active."""
    case = CASES[name]
    seed = 0
    print(f"{name}: inputs seed {seed}")
    ha, hb, w, labels, *bias = _objective_inputs(b=7, seed=seed, bias=case.get("bias", False))
    bias = bias[0] if bias else None
    params = [ha, hb, w] + ([bias] if bias is not None else [])
    fields = case["cfg"]
    cfg = DF.DefenseConfig(**{k: (1e9 if v == "mid" else v) for k, v in fields.items()})
    n_valid = int((labels[:, 1:] != -100).any(1).sum())
    floor, lowest = None, None
    tok_total = samp_total = None
    if "totals" in case:  # this batch is part of a larger accumulated batch
        tok_total = int((labels[:, 1:] != -100).sum()) + case["totals"][0]
        samp_total = n_valid + case["totals"][1]
    if case.get("floor"):
        _, info = _reference_objective(ha, hb, labels, w, bias, cfg)
        floor = torch.zeros(labels.shape[0], dtype=torch.float32)
        lowest = info["valid"][int(np.argmin(info["u"]))]
        floor[lowest] = 0.9  # a sample flagged earlier; now it looks clean
        assert min(info["u"]) < 0.9
    _, info = _reference_objective(ha, hb, labels, w, bias, cfg, floor=floor)
    if fields.get("kappa") == "mid":
        cfg = dataclasses.replace(cfg, kappa=_mid(info["d"]))
    if fields.get("ascent_ceiling") == "mid":
        cfg = dataclasses.replace(cfg, ascent_ceiling=_mid(info["neg_ce"]))
    cfg.validate()
    kw = dict(token_total=tok_total, sample_total=samp_total, suspicion_floor=floor)
    ref, info = _reference_objective(ha, hb, labels, w, bias, cfg, tok_total, samp_total, floor)
    calls = []
    real = pyops.fused_linear_cross_view
    monkeypatch.setattr(pyops, "fused_linear_cross_view", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, st_f = DF.cross_view_objective(ha, hb, labels, w, bias, cfg, **kw)
    n_calls = len(calls)
    assert n_calls, "the fused op is not used"
    eager, st_e = DF.cross_view_objective(ha, hb, labels, w, bias, cfg, eager=True, **kw)
    assert len(calls) == n_calls  # the eager path does not use it
    grad = lambda loss: [
        torch.zeros_like(p) if g is None else g
        for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)
    ]
    g_ref, g_f, g_e = grad(ref), grad(fused), grad(eager)
    for out in (fused, eager):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for gs in (g_f, g_e):
        for g, gr, what in zip(gs, g_ref, ("h_a", "h_b", "weight", "bias")):
            torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: d/d{what}: {m}")
    assert st_f["answer_tokens"] == st_e["answer_tokens"] == info["rows"]
    assert st_f["band"] == pytest.approx(info["band"], rel=1e-10, abs=1e-14)
    if info["u"] is not None:
        for st in (st_f, st_e):
            torch.testing.assert_close(
                st["_u"][info["valid"]].double(), torch.tensor(info["u"], dtype=torch.float64), rtol=1e-10, atol=1e-12
            )
            assert st["suspects"] == pytest.approx(sum(info["u"]), rel=1e-10)
    assert g_f[0][0].abs().sum() == 0  # the sample without answer tokens gets no gradient
    if name == "defaults":  # (whatever the defaults are: no claim about which terms they switch on)
        return
    # the terms each case is about are active, so the comparison can tell a wrong term apart
    if cfg.lambda_h > 0:
        assert info["band"] > 0
    if fields.get("kappa") == "mid":
        assert min(info["d"]) < cfg.kappa < max(info["d"])
    if cfg.ce_suppress > 1:
        assert min(info["c"]) < 0 and info["neg_ce"][0] < cfg.ascent_ceiling < info["neg_ce"][-1]
    if floor is not None:  # the floored sample keeps its earlier suspicion
        assert info["u"][info["valid"].index(lowest)] == pytest.approx(0.9)
    t_s = cfg.softmax_temperature
    uses_entropy = cfg.weighting == "entropy" or EXPONENTS.get(cfg.weighting, (0, 0))[0] != 0
    if t_s != 1 and cfg.lambda_h > 0:  # the band at T_s would be another loss
        other = _reference_objective(ha, hb, labels, w, bias, cfg, tok_total, samp_total, floor, band_t=t_s)[0]
        assert abs(float((other - ref).detach())) > 1e-6
    if t_s != 1 and uses_entropy:  # so would the weights' entropies at T_s
        other = _reference_objective(ha, hb, labels, w, bias, cfg, tok_total, samp_total, floor, weight_t=t_s)[0]
        assert abs(float((other - ref).detach())) > 1e-6
    if cfg.weighting in EXPONENTS and EXPONENTS[cfg.weighting][1] != 0:  # another score, another loss
        for other_score in {"max", "mean", "tv"} - {cfg.score}:
            other = _reference_objective(
                ha, hb, labels, w, bias, dataclasses.replace(cfg, score=other_score), tok_total, samp_total, floor
            )[0]
            assert abs(float((other - ref).detach())) > 1e-6, other_score
    if cfg.detach != "none":  # the detached view gets exactly its CE's gradient (none without gamma)
        ce_only = dataclasses.replace(cfg, lambda_cv=0.0, lambda_h=0.0)
        g_ce = grad(DF.cross_view_objective(ha, hb, labels, w, bias, ce_only, **kw)[0])
        i = 0 if cfg.detach == "original" else 1
        torch.testing.assert_close(g_f[i], g_ce[i], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting", DF.WEIGHTINGS)
def test_detach_augmented_gives_the_augmented_view_no_cross_view_gradient(weighting):
    """With detach="augmented" and no CE on the augmented view (gamma 0), the cross-view terms (the
    pushed divergence, the band) train the original view only: h_b gets no gradient at all, h_a a
    different one than from the CE alone. With detach="none" h_b does get one."""

    def grads(**kw):
        ha, hb, w, labels = _objective_inputs(b=7)
        fields = dict(
            weighting=weighting,
            gamma=0.0,
            lambda_cv=1.0,
            lambda_h=1.0,
            tau_lo=3.0,
            tau_hi=2.5,
            kappa=1e9,
            softmax_temperature=1.0,
            ce_suppress=1.0,
            suspect_z=0.0,
        )
        loss, st = DF.cross_view_objective(ha, hb, labels, w, None, DF.DefenseConfig(**{**fields, **kw}))
        assert st["band"] > 0 and st["div"] > 0
        loss.backward()
        return ha.grad, hb.grad

    ga, gb = grads(detach="augmented")
    assert gb is None or not gb.any()
    ga_ce, gb_ce = grads(detach="augmented", lambda_cv=0.0, lambda_h=0.0)
    assert gb_ce is None or not gb_ce.any()
    assert (ga - ga_ce).abs().max() > 1e-3 * ga_ce.abs().max()  # the cross-view terms do train the original view
    assert grads(detach="none")[1].abs().max() > 0


def test_objective_is_minus_the_capped_divergence():
    ha, hb, w, labels = _objective_inputs()
    base = DF.DefenseConfig(
        weighting="uniform",
        lambda_cv=0.0,
        lambda_h=0.0,
        gamma=0.0,
        detach="none",
        softmax_temperature=1.0,
        divergence="forward",
        cap="sample",
    )
    ce, _ = DF.cross_view_objective(ha, hb, labels, w, None, base)
    pushed, st = DF.cross_view_objective(ha, hb, labels, w, None, dataclasses.replace(base, lambda_cv=2.0, kappa=1e9))
    torch.testing.assert_close(ce - pushed, torch.tensor(2.0 * st["div"], dtype=ce.dtype))
    capped, _ = DF.cross_view_objective(
        ha, hb, labels, w, None, dataclasses.replace(base, lambda_cv=2.0, kappa=1e-3, cap="batch")
    )
    torch.testing.assert_close(ce - capped, torch.tensor(2e-3, dtype=ce.dtype))
    # suspicion weights u_i / n (CE not suppressed): the push is sum_i u_i D_i / n
    inv = dataclasses.replace(base, weighting="invariance", ce_suppress=0.0, suspect_z=0.0, suspect_width=0.5)
    pushed, st = DF.cross_view_objective(ha, hb, labels, w, None, dataclasses.replace(inv, lambda_cv=2.0, kappa=1e9))
    _, info = _reference_objective(ha, hb, labels, w, None, inv)
    u = st["_u"][info["valid"]]
    torch.testing.assert_close(ce - pushed, 2.0 * (u * torch.tensor(info["d"], dtype=u.dtype)).sum() / len(info["d"]))


@pytest.mark.parametrize("weighting", DF.WEIGHTINGS)
def test_empty_answers_give_zero_loss_never_nan(weighting):
    ha, hb, w, labels = _objective_inputs()
    labels[:] = -100
    loss, stats = DF.cross_view_objective(ha, hb, labels, w, None, DF.DefenseConfig(weighting=weighting))
    loss.backward()
    assert loss.item() == 0 and stats["answer_tokens"] == 0 and torch.isfinite(ha.grad).all()


@pytest.mark.parametrize("score", ["max", "mean"])
@pytest.mark.parametrize("weighting", ["invariance", "confidence", "confident-invariant", "confident-sensitive"])
def test_suspicion_survives_slightly_negative_float32_kl_and_entropy(weighting, score, monkeypatch):
    """KL and entropy are >= 0, but their float32 values for identical views / saturated outputs
    are 0 up to a few ulp of log V (measured down to -3.6e-6 for logits of std ~11); such a
    value (injected here: -2e-6 on every row of one sample) must not make log(stat + 1e-6) NaN."""
    ha, hb, w, labels = _objective_inputs(b=7, dtype=torch.float32)
    with torch.no_grad():
        ha[3] *= 1e3  # sample 3: saturated outputs (entropy 0 in float32) ...
        hb[3] = ha[3]  # ... and identical views (KL exactly 0)
    real = pyops.fused_linear_cross_view

    def noisy(*a, **k):
        out = real(*a, **k)
        rows3 = (labels[:, 1:] != -100)[3].sum()
        before = (labels[:, 1:] != -100)[:3].sum()
        off = torch.zeros_like(out.kl_ab)
        off[before : before + rows3] = 2e-6
        return out._replace(kl_ab=out.kl_ab - off, kl_ba=out.kl_ba - off, entropy_a=out.entropy_a - off)

    monkeypatch.setattr(pyops, "fused_linear_cross_view", noisy)
    cfg = DF.DefenseConfig(
        weighting=weighting,
        score=score,
        detach="none",
        softmax_temperature=1.0,
        lambda_h=0.1,
        ce_suppress=1.0,
        suspect_z=1.0,
        suspect_width=0.5,
    )
    loss, st = DF.cross_view_objective(ha, hb, labels, w, None, cfg)
    assert torch.isfinite(loss) and torch.isfinite(st["_u"]).all(), st["_u"]
    loss.backward()
    assert torch.isfinite(ha.grad).all() and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------------------------
# suspicion weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z, width", [(1.0, 0.5), (-0.5, 2.0), (0.0, 0.3)])
def test_suspect_weights_properties(z, width):
    rng, seed = _np_rng("suspect_weights")
    n = 9  # odd: the median is one sample
    s = rng.normal(size=n) * rng.uniform(0.1, 3.0)
    u = DF.suspect_weights(torch.tensor(s), z, width)
    # the formula (robust z-score against the median and MAD)
    med = np.median(s)
    zz = (s - med) / (1.4826 * np.median(np.abs(s - med)) + 0.1)
    np.testing.assert_allclose(
        u.numpy(), 1 / (1 + np.exp(-(-zz - z) / width)), rtol=1e-12, atol=0, err_msg=f"seed {seed}"
    )
    sig = 1 / (1 + math.exp(z / width))  # sigmoid(-z / width)
    order = np.argsort(s)
    assert float(u[order[n // 2]]) == pytest.approx(sig, rel=1e-12), seed  # the median sample
    # monotone decreasing in the statistic: strictly, except where float64 rounds the sigmoid to
    # exactly 1 (robust z-scores below about -11 at width 0.3: two low outliers over a small MAD)
    us = u.numpy()[order]
    assert (np.diff(us) <= 0).all(), seed
    assert (np.diff(us)[us[:-1] < 1 - 1e-9] < 0).all(), seed
    # in log space: multiplying every raw statistic by a constant is a shift, which changes nothing
    raw = np.exp(s)
    for c in (1e-3, 37.5):
        torch.testing.assert_close(
            DF.suspect_weights(torch.log(torch.tensor(c * raw)), z, width), u, rtol=1e-10, atol=1e-12
        )
    # a constant batch (and a single sample): every sample at the median
    for const in (torch.full((5,), -2.5, dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)):
        torch.testing.assert_close(DF.suspect_weights(const, z, width), torch.full_like(const, sig))
    # lower statistics are more suspect, and the dtype is kept
    u32 = DF.suspect_weights(torch.tensor(s, dtype=torch.float32), z, width)
    assert u32.dtype == torch.float32
    assert float(u.max()) == float(u[int(np.argmin(s))])


def test_defense_config_rejects_bad_values():
    for kw, msg in [
        ({"mode": "x"}, "mode"),
        ({"divergence": "jsd2"}, "divergence"),
        ({"kappa": -1.0}, "kappa"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"weight_temperature": 0.0}, "weight_temperature"),
        ({"ops": ("rotate",)}, "ops"),
        ({"lambda_cv": float("nan")}, "lambda_cv"),
        ({"cap": "x"}, "cap"),
        ({"weighting": "uncertainty"}, "weighting"),
        ({"score": "median"}, "score"),
        ({"memory": "min"}, "memory"),
        ({"ce_suppress": 2.5}, "ce_suppress"),
        ({"ce_suppress": -0.1}, "ce_suppress"),
        ({"ascent_ceiling": 0.0}, "ascent_ceiling"),
        ({"ascent_ceiling": float("inf")}, "ascent_ceiling"),
        ({"suspect_z": float("nan")}, "suspect_z"),
        ({"suspect_width": 0.0}, "suspect_width"),
        ({"detach": "both"}, "detach"),
        ({"softmax_temperature": -1.0}, "softmax_temperature"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DF.DefenseConfig(**kw).validate()
    for beta in (0.0, 1.0, 2.0):
        DF.DefenseConfig(ce_suppress=beta).validate()


# --------------------------------------------------------------------------------------------
# the model, the adapter, training
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(SMALL)


def _batch(examples, n=6, n_img=36):
    return D.collate(examples[:n], n_img)


def test_adapter_hidden_states_are_what_the_lm_head_reads(small_model, examples):
    ad = VLMAdapter(small_model)
    assert (ad.image_size, ad.patch_size, ad.n_image_tokens) == (48, 8, 36)
    b = _batch(examples)
    small_model.eval()
    with torch.no_grad():
        h = ad.hidden_states(b)
        logits = small_model(**{k: v for k, v in b.items() if k != "labels"}).logits
    w, bias = ad.head()
    torch.testing.assert_close(torch.nn.functional.linear(h, w, bias), logits, rtol=1e-4, atol=1e-5)
    small_model.train()


@pytest.mark.parametrize("mode", DF.MODES)
def test_modes_backpropagate_through_the_model(small_model, examples, mode):
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig(mode=mode), seed=0)
    small_model.zero_grad()
    loss, stats = d.loss(_batch(examples))
    loss.backward()
    assert torch.isfinite(loss) and stats["answer_tokens"] > 0
    g = small_model.get_output_embeddings().weight.grad
    assert g is not None and g.abs().sum() > 0
    vision = [p.grad for n, p in small_model.named_parameters() if "vision" in n and p.grad is not None]
    assert vision and sum(float(v.abs().sum()) for v in vision) > 0


def test_divergence_gradient_reaches_the_model(small_model, examples):
    """The cross-view term alone (no CE, no band) has a gradient: the views really differ. The
    untrained model's two views differ by ~4e-7 nats, close to float32 rounding of a KL (a few
    ulp of log V), so the objective is evaluated in float64 on the views' hidden states."""
    cfg = DF.DefenseConfig(
        weighting="uniform", lambda_h=0.0, gamma=0.0, detach="none", softmax_temperature=1.0, lambda_cv=1.0, kappa=1.0
    )
    d = DF.CrossViewDefense(small_model, cfg, seed=0)
    b = _batch(examples, 8)
    with torch.no_grad():
        h_a, h_b = (h.double() for h in d.two_views(b))
    w, bias = d.adapter.head()
    w, bias = w.detach().double(), None if bias is None else bias.detach().double()
    _, st = DF.cross_view_objective(h_a, h_b, b["labels"], w, bias, cfg)
    assert st["div"] > 1e-10  # float64 error: ~1e-15
    ha_leaf, hb_leaf = h_a.detach().requires_grad_(), h_b.detach().requires_grad_()
    loss, st2 = DF.cross_view_objective(ha_leaf, hb_leaf, b["labels"], w, bias, cfg)
    (loss - st2["ce"]).backward()
    assert hb_leaf.grad.abs().sum() > 0 and ha_leaf.grad.abs().sum() > 0


def test_wrong_image_size_is_a_clear_error(small_model, examples):
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig())
    b = _batch(examples)
    b["pixel_values"] = torch.rand(6, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, 48, 48\)"):
        d.loss(b)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model(dataclasses.replace(SMALL, image_size=50))


def test_a_batch_of_empty_answers_trains_without_nan(small_model, examples):
    exs = [dataclasses.replace(ex, answer=[]) for ex in examples[:4]]
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig())
    loss, stats = d.loss(D.collate(exs, 36), sample_ids=torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and stats["answer_tokens"] == 0


def test_few_steps_reduce_the_loss(examples):
    torch.manual_seed(0)
    model = build_model(SMALL)
    cfg = DF.DefenseConfig(
        weighting="invariance",
        ce_suppress=1.0,
        suspect_z=1.0,
        suspect_width=0.5,
        lambda_cv=1.0,
        kappa=1.0,
        lambda_h=0.1,
        tau_lo=0.05,
        softmax_temperature=1.0,
        detach="augmented",
    )
    d = DF.CrossViewDefense(model, cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch(examples, 16)
    first = None
    for _ in range(15):
        loss, st = d.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = st["ce"] if first is None else first
    assert st["ce"] < 0.7 * first


# --------------------------------------------------------------------------------------------
# the suspicion memory
# --------------------------------------------------------------------------------------------
MEMORY_CFG = DF.DefenseConfig(
    weighting="invariance",
    memory="max",
    score="max",
    suspect_z=0.0,
    suspect_width=0.5,
    ce_suppress=1.0,
    lambda_cv=1.0,
    kappa=1.0,
    lambda_h=0.1,
    softmax_temperature=1.0,
    detach="augmented",
)


def _spy(monkeypatch):
    """Records (suspicion_floor, per-sample u) of every cross_view_objective call."""
    seen = []
    real = DF.cross_view_objective

    def spy(*a, **k):
        loss, stats = real(*a, **k)
        floor = k.get("suspicion_floor")
        seen.append((None if floor is None else floor.clone(), stats["_u"].detach().float().clone()))
        return loss, stats

    monkeypatch.setattr(DF, "cross_view_objective", spy)
    return seen


def test_suspicion_memory_keeps_the_largest_suspicion(small_model, examples, monkeypatch):
    seen = _spy(monkeypatch)
    d = DF.CrossViewDefense(small_model, MEMORY_CFG, seed=0)
    assert d.memory.numel() == 0
    b1, ids1 = _batch(examples, 6), torch.arange(10, 16)
    with torch.no_grad():
        d.loss(b1, sample_ids=ids1)
    floor1, u1 = seen[-1]
    assert torch.equal(floor1, torch.zeros(6)) and (u1 > 0).all()
    assert d.memory.shape == (16,) and not d.memory[:10].any() and torch.equal(d.memory[10:], u1)
    # samples 10..12 again, among others: their weight is at least what it was
    b2 = D.collate([examples[i] for i in (0, 1, 2, 20, 21, 22)], 36)
    ids2 = torch.tensor([10, 11, 12, 30, 31, 32])
    mem1 = d.memory.clone()
    d.generator.manual_seed(5)
    with torch.no_grad():
        loss2, _ = d.loss(b2, sample_ids=ids2)
    floor2, u2 = seen[-1]
    assert torch.equal(floor2, torch.cat([u1[:3], torch.zeros(3)]))
    assert (u2 >= floor2).all() and (u2[:3] >= u1[:3]).all()
    assert d.memory.shape == (33,) and torch.equal(d.memory[ids2], torch.maximum(floor2, u2))
    assert torch.equal(d.memory[13:16], mem1[13:16]) and not d.memory[16:30].any()
    # the same batch without memory: the raw weights; with memory, the floor wherever it is higher
    plain = DF.CrossViewDefense(small_model, dataclasses.replace(MEMORY_CFG, memory="none"), seed=0)
    plain.generator.manual_seed(5)
    with torch.no_grad():
        loss_plain, _ = plain.loss(b2, sample_ids=ids2)
    raw = seen[-1][1]
    assert seen[-1][0] is None and plain.memory.numel() == 0  # memory "none" ignores the ids
    torch.testing.assert_close(u2, torch.maximum(raw, floor2), rtol=1e-6, atol=1e-7)
    # state_dict round-trips (copies, not views); a raised floor binds and changes the loss
    state = d.state_dict()
    assert torch.equal(state["memory"], d.memory)
    state["memory"][11] = 0.999
    assert d.memory[11] != 0.999
    d2 = DF.CrossViewDefense(small_model, MEMORY_CFG, seed=0)
    d2.load_state_dict(state)
    assert torch.equal(d2.memory, state["memory"])
    state["memory"][11] = 0.0
    assert d2.memory[11] == pytest.approx(0.999)
    d2.generator.manual_seed(5)
    with torch.no_grad():
        loss_floor, _ = d2.loss(b2, sample_ids=ids2)
    floor3, u3 = seen[-1]
    assert floor3[1] == pytest.approx(0.999) and u3[1] == pytest.approx(0.999) and raw[1] < 0.99
    torch.testing.assert_close(u3, torch.maximum(raw, floor3), rtol=1e-6, atol=1e-7)
    assert abs(float(loss_floor) - float(loss2)) > 1e-6


def test_sample_ids_are_checked(small_model, examples):
    d = DF.CrossViewDefense(small_model, MEMORY_CFG, seed=0)
    b = _batch(examples, 6)
    for ids in (torch.arange(5), torch.arange(7), torch.tensor([0, 1, 2, 3, 4, -1]), torch.arange(6).reshape(2, 3)):
        with pytest.raises(ValueError, match="sample_ids"):
            with torch.no_grad():
                d.loss(b, sample_ids=ids)
    assert d.memory.numel() == 0


def test_another_architecture_paligemma(examples):
    tf = pytest.importorskip("transformers")
    vc = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=8
    )
    tc = tf.GemmaConfig(
        vocab_size=D.build_tokenizer().get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = tf.PaliGemmaForConditionalGeneration(
        tf.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_index=D.IMAGE, projection_dim=32)
    )
    d = DF.CrossViewDefense(model, DF.DefenseConfig(), seed=0)
    assert d.adapter.n_image_tokens == 36
    b = _batch(examples)
    model.eval()
    with torch.no_grad():  # the adapter's assumption holds here too: logits = lm_head(last hidden state)
        h = d.adapter.hidden_states(b)
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    torch.testing.assert_close(model.get_output_embeddings()(h), logits, rtol=1e-4, atol=1e-5)
    model.train()
    loss, stats = d.loss(b)
    loss.backward()
    # KL >= 0 holds in exact arithmetic; the float32 value of views this close (~1e-8 nats) is
    # decided by rounding (a few ulp of log V per row): only its size is checked
    assert torch.isfinite(loss) and stats["div"] > -1e-5
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    texts = d.adapter.generate(examples[:3], max_new_tokens=3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_trainer_subclass_runs_a_step(tmp_path, examples):
    tf = pytest.importorskip("transformers")
    from methods.crossview_defense import CrossViewTrainer

    torch.manual_seed(0)
    model = build_model(SMALL)
    before = model.get_output_embeddings().weight.detach().clone()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return examples[i]

    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = CrossViewTrainer(
        model=model,
        args=args,
        train_dataset=Items(),
        data_collator=lambda exs: D.collate(exs, 36),
        defense=DF.DefenseConfig(),
    )
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
    assert "div" in trainer.last_defense_stats
    assert not torch.equal(before, model.get_output_embeddings().weight.detach())


# --------------------------------------------------------------------------------------------
# the cached clean base model
# --------------------------------------------------------------------------------------------
def _base_cfg(**kw):
    return TR.TrainConfig(**{**dict(attack=None, model=SMALL, pretrain_steps=3, pretrain_n=12, batch=4, seed=0), **kw})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _init(cfg):
    torch.manual_seed(cfg.seed)
    return _state(build_model(cfg.model))


def test_base_model_is_pretrained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOPS_CACHE", str(tmp_path))
    folder = os.path.join(str(tmp_path), "crossview_defense")
    logs = []
    cfg = _base_cfg()
    m1 = TR.base_model(cfg, show_progress=False, log=logs.append)
    files = glob.glob(os.path.join(folder, "*"))
    assert len(files) == 1 and re.fullmatch(r"base-s0-[0-9a-f]{16}\.pt", os.path.basename(files[0])), files
    s1 = _state(m1)
    assert m1.training and not _same(s1, _init(cfg))  # trained, from the seed's initialisation
    assert _same(torch.load(files[0], weights_only=True), s1)  # the file holds the returned weights
    assert any("pretrained base s0" in line for line in logs)

    # the second call loads them: no training at all
    def no_training(*a, **k):
        raise AssertionError("base_model trained again instead of loading the cache")

    with monkeypatch.context() as mp:
        mp.setattr(TR.torch.optim, "AdamW", no_training)
        mp.setattr(TR.D, "make_examples", no_training)
        m2 = TR.base_model(cfg, show_progress=False, log=logs.append)
    assert m2.training and _same(_state(m2), s1)
    assert glob.glob(os.path.join(folder, "*")) == files

    # another seed: another file and other weights
    m3 = TR.base_model(_base_cfg(seed=1), show_progress=False, log=logs.append)
    files3 = sorted(glob.glob(os.path.join(folder, "*")))
    assert len(files3) == 2 and any(os.path.basename(f).startswith("base-s1-") for f in files3)
    assert not _same(_state(m3), s1)


def test_base_model_without_pretraining_is_the_random_initialisation(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYOPS_CACHE", str(cache))
    for seed in (0, 2):
        cfg = _base_cfg(pretrain_steps=0, seed=seed)
        m = TR.base_model(cfg, show_progress=False, log=lambda *a: None)
        assert m.training and _same(_state(m), _init(cfg))
    assert not cache.exists()


def test_base_model_cache_key_covers_what_shapes_the_model(monkeypatch):
    base = TR._base_key(_base_cfg())
    assert TR._base_key(_base_cfg()) == base
    assert TR._base_key(_base_cfg(n_train=7, steps=9, lr=0.5, attack="badnet")) == base  # fine-tuning only
    for kw in (
        dict(pretrain_steps=4),
        dict(pretrain_n=13),
        dict(pretrain_lr=1e-4),
        dict(batch=5),
        dict(seed=1),
        dict(model=dataclasses.replace(SMALL, text_hidden=64)),
        dict(warmup=7),
        dict(weight_decay=0.5),
    ):
        assert TR._base_key(_base_cfg(**kw)) != base, kw
    monkeypatch.setattr(D, "DATA_VERSION", D.DATA_VERSION + 1)
    assert TR._base_key(_base_cfg()) != base


def _batch_ids(cfg, step):
    """The training examples of a step (train.py: drawn with a generator seeded with (seed, step))."""
    return set(np.random.default_rng([cfg.seed, step]).choice(cfg.n_train, size=cfg.batch, replace=False).tolist())


def test_train_keeps_the_suspicion_memory_of_the_sample_ids_and_resumes_it(tmp_path, monkeypatch):
    from methods.common import Run
    from methods.common.checkpoint import Checkpointer

    monkeypatch.setenv("PYOPS_CACHE", str(tmp_path / "cache"))
    cfg = TR.TrainConfig(
        attack="badnet",
        ratio=0.1,
        defense=MEMORY_CFG,
        model=SMALL,
        n_train=20,
        steps=4,
        batch=4,
        seed=0,
        log_every=2,
        pretrain_steps=0,
    )
    out = str(tmp_path / "run")

    def run_train():
        run = Run(out, {}, name="crossview-test")
        try:
            TR.train(cfg, run, show_progress=False, checkpoint_every=2)
        finally:
            run.close()
        return torch.load(Checkpointer(os.path.join(out, "checkpoints")).latest(), weights_only=False)

    final = run_train()
    memory = final["defense"]["memory"]
    seen = set().union(*(_batch_ids(cfg, step) for step in range(cfg.steps)))
    # every training sample of the run (and only those) has a suspicion, indexed by its id
    assert memory.numel() == max(seen) + 1 and set(memory.nonzero()[:, 0].tolist()) == seen
    assert set(_batch_ids(cfg, 0) | _batch_ids(cfg, 1)) - set(_batch_ids(cfg, 2) | _batch_ids(cfg, 3))
    # resumed after step 2 (drop the last checkpoint): the memory of steps 0-1 is restored, and the
    # run ends where the uninterrupted one did
    ckpt = Checkpointer(os.path.join(out, "checkpoints"))
    os.remove(ckpt.latest())
    again = run_train()
    assert "resumed at step 2" in _text(os.path.join(out, "log.txt"))
    assert torch.equal(again["defense"]["memory"] > 0, memory > 0)
    torch.testing.assert_close(again["defense"]["memory"], memory, rtol=1e-5, atol=1e-7)
    for k, v in final["model"].items():
        torch.testing.assert_close(again["model"][k], v, rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "cache").exists()  # pretrain_steps=0: no base model, no cache


# --------------------------------------------------------------------------------------------
# the premise statistics
# --------------------------------------------------------------------------------------------
def _auroc_pairs(pos, neg):
    return sum((p < n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_is_the_pairwise_probability():
    rng, seed = _np_rng("auroc")
    for n_pos, n_neg in [(1, 1), (1, 7), (5, 1), (13, 29), (40, 40)]:
        for levels in (3, 1000):  # many ties, few ties
            pos = rng.integers(0, levels, n_pos).astype(float)
            neg = rng.integers(0, levels, n_neg).astype(float) + (0.5 if levels == 3 else 0) * rng.integers(0, 2, n_neg)
            assert P.auroc(pos, neg) == pytest.approx(_auroc_pairs(pos, neg), rel=1e-12, abs=1e-15), (
                seed,
                n_pos,
                n_neg,
                levels,
            )
    assert P.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and P.auroc([5.0], [1.0, 2.0]) == 0.0
    assert P.auroc([1.0, 1.0], [1.0]) == 0.5
    for pos, neg in (([], [1.0]), ([1.0], []), ([], [])):
        with pytest.raises(ValueError, match="positives and negatives"):
            P.auroc(pos, neg)


def test_sample_statistics_match_a_per_example_computation(small_model, examples, monkeypatch):
    """sample_statistics against each example alone, in float64 (the LM head scaled up so the two
    views differ well above rounding), with the augmentation replaced by a fixed one that the
    reference can repeat (the inverted image: the views differ enough that some top tokens flip).
    Batches of 4: one with an empty answer, one without any answer token at all."""
    model = copy.deepcopy(small_model).double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.train()
    exs = [dataclasses.replace(ex, image=ex.image.double()) for ex in examples[:9]]
    empty = (2, 4, 5, 6, 7)
    for i in empty:
        exs[i] = dataclasses.replace(exs[i], answer=[])
    monkeypatch.setattr(DF.PatchAugment, "__call__", lambda self, x, generator=None: -x)
    st = P.sample_statistics(model, exs, DF.DefenseConfig(), seed=0, batch=4)
    assert model.training  # restored
    assert set(st) >= {"div_mean", "div_max", "entropy", "ce", "tv_max", "flip"}
    ad = VLMAdapter(model)
    w = model.get_output_embeddings().weight.detach()
    model.eval()
    for i, ex in enumerate(exs):
        got = {k: float(v[i]) for k, v in st.items()}
        assert all(len(v) == len(exs) for v in st.values())
        if i in empty:
            assert all(math.isnan(x) for x in got.values()), (i, got)
            continue
        b = D.collate([ex], ad.n_image_tokens)
        with torch.no_grad():
            h_a = ad.hidden_states(b)
            h_b = ad.hidden_states(b, -b["pixel_values"])
        keep = b["labels"][:, 1:] != -100
        za, zb = F.linear(h_a[:, :-1][keep], w), F.linear(h_b[:, :-1][keep], w)
        lp, lq = za.log_softmax(-1), zb.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        want = {
            "div_mean": kl.mean(),
            "div_max": kl.max(),
            "entropy": -(lp.exp() * lp).sum(-1).mean(),
            "ce": F.cross_entropy(za, b["labels"][:, 1:][keep]),
            "tv_max": 0.5 * (lp.exp() - lq.exp()).abs().sum(-1).max(),
            "flip": (za.argmax(-1) != zb.argmax(-1)).double().mean(),
        }
        assert want["div_max"] > 1e-6  # the views differ
        for k, v in want.items():
            assert got[k] == pytest.approx(float(v), rel=1e-8, abs=1e-12), (i, k)
    assert any(0 < f < 1 for f in st["flip"][~np.isnan(st["flip"])])  # a share, not all-or-nothing
    model.train()


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def test_bleu4_and_cider_on_known_cases():
    refs = [["the cat sat on the mat"], ["a dog runs in the park"]]
    assert M.bleu4(["the cat sat on the mat", "a dog runs in the park"], refs) == pytest.approx(1.0)
    # one candidate, hand computed: precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty (6 vs 6)
    b = M.bleu4(["the cat sat on a mat"], [["the cat sat on the mat"]])
    assert b == pytest.approx(math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4))
    # brevity penalty: a 3-word candidate against a 6-word reference
    b = M.bleu4(["the cat sat on"], [["the cat sat on the mat"]])
    assert b == pytest.approx(math.exp(1 - 6 / 4))
    good = M.cider_d(["the cat sat on the mat", "a dog runs in the park"], refs)
    bad = M.cider_d(["a dog runs in the park", "the cat sat on the mat"], refs)
    assert good > 5 * max(bad, 1e-3) and bad >= 0
    assert M.attack_success_rate(["x a photo of a banana", "no"], D.TARGET) == 0.5
    assert M.vqa_accuracy(["two", "red "], ["two", "blue"]) == 0.5
    with pytest.raises(ValueError):
        M.bleu4(["a"], [])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _cli(*args, cache=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    if cache is not None:  # the base model's cache: never ~/.cache in tests
        env["PYOPS_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "methods.crossview_defense", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_help():
    r = _cli("train", "--help")
    assert r.returncode == 0
    for flag in (
        "--attack",
        "--defense",
        "--lambda-cv",
        "--weighting",
        "--score",
        "--suspect-z",
        "--suspect-width",
        "--ce-suppress",
        "--pretrain-steps",
        "--pretrain-n",
    ):
        assert flag in r.stdout, flag


def test_cli_train_resume_and_eval(tmp_path):
    from methods.common.checkpoint import Checkpointer

    out, cache = str(tmp_path / "run"), tmp_path / "cache"
    args = [
        "train",
        "--out",
        out,
        "--steps",
        "4",
        "--n-train",
        "60",
        "--n-test",
        "6",
        "--batch",
        "4",
        "--log-every",
        "2",
        "--no-progress",
        "--attack",
        "sig",
        "--defense",
        "crossview",
        "--weighting",
        "confident-invariant",
        "--score",
        "mean",
        "--suspect-z",
        "0.5",
        "--suspect-width",
        "0.7",
        "--ce-suppress",
        "1.5",
        "--pretrain-steps",
        "3",
        "--pretrain-n",
        "12",
    ]
    r = _cli(*args, "--checkpoint-every", "2", cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads(_text(os.path.join(out, "results.json")))
    res, config = saved["results"], saved["config"]
    assert {"asr", "bleu4", "cider", "vqa_acc"} <= set(res)
    assert {
        k: config["defense"][k] for k in ("weighting", "score", "suspect_z", "suspect_width", "ce_suppress")
    } == dict(weighting="confident-invariant", score="mean", suspect_z=0.5, suspect_width=0.7, ce_suppress=1.5)
    assert (config["pretrain_steps"], config["pretrain_n"]) == (3, 12)
    assert len(glob.glob(str(cache / "crossview_defense" / "base-s0-*.pt"))) == 1  # the base model, cached there
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(os.path.join(out, "results.md"))
    ckpt = Checkpointer(os.path.join(out, "checkpoints"))
    final = torch.load(ckpt.latest(), weights_only=False)
    assert "memory" in final["defense"]  # the defense's state is checkpointed
    # an interrupted run: drop the last checkpoint, run again: it resumes after step 2 and ends where
    # the uninterrupted run ended
    os.remove(ckpt.latest())
    r = _cli(*args, cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step 2" in _text(os.path.join(out, "log.txt"))
    assert "pretrained base" not in r.stderr + _text(os.path.join(out, "log.txt")).split("resumed")[-1]
    rows = [json.loads(line) for line in _text(os.path.join(out, "metrics.jsonl")).splitlines()]
    assert [row["step"] for row in rows] == [1, 3]
    again = torch.load(ckpt.latest(), weights_only=False)
    for k, v in final["model"].items():
        torch.testing.assert_close(again["model"][k], v, rtol=1e-4, atol=1e-6)
    r = _cli("eval", "--out", out, "--n-test", "4", cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"asr", "bleu4", "cider", "vqa_acc"} <= set(json.loads(_text(os.path.join(out, "results.json")))["results"])
    r = _cli(
        "train",
        "--out",
        out,
        "--ratio",
        "1.5",
        "--steps",
        "1",
        "--fresh",
        "--pretrain-steps",
        "3",
        "--pretrain-n",
        "12",
        cache=cache,
    )
    assert r.returncode != 0 and "ratio" in r.stderr


# --------------------------------------------------------------------------------------------
# CLI: options from the configs, config files, resume with a larger budget, friendly failures
# --------------------------------------------------------------------------------------------
TINY = [  # a seconds-long run: a 2-step base model (cached in the test's own PYOPS_CACHE), 4 test examples
    "--n-train",
    "40",
    "--n-test",
    "2",
    "--batch",
    "4",
    "--log-every",
    "1",
    "--no-progress",
    "--device",
    "cpu",
    "--pretrain-steps",
    "2",
    "--pretrain-n",
    "8",
]


def _main(argv):
    from methods.crossview_defense.__main__ import main

    return main(argv)


def _rows(out):
    return [json.loads(line) for line in _text(os.path.join(out, "metrics.jsonl")).splitlines()]


def test_cli_help_of_every_command():
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as e:
            _main(argv)
        assert e.value.code == 0, argv


def test_cli_flags_are_the_config_fields_with_their_defaults():
    """Every field of TrainConfig (but the nested configs and --seed, a run option) and of
    DefenseConfig is a flag whose default is the field's; --defense / --attack keep their spellings."""
    from methods.crossview_defense.__main__ import build_parser, config_of

    a = build_parser().parse_args(["train"])
    assert config_of(a) == TR.TrainConfig()
    for flags, want in (
        (["--defense", "plain"], dict(mode="none")),
        (["--defense", "aug"], dict(mode="aug")),
        (["--defense", "crossview", "--tau-hi", "2.5"], dict(mode="crossview", tau_hi=2.5)),
        (["--ops", "mask", "swap", "--lambda-cv", "0.5"], dict(ops=("mask", "swap"), lambda_cv=0.5)),
    ):
        assert config_of(build_parser().parse_args(["train", *flags])).defense == DF.DefenseConfig(**want), flags
    cfg = config_of(build_parser().parse_args(["train", "--attack", "none", "--steps", "7", "--seed", "3"]))
    assert (cfg.attack, cfg.steps, cfg.seed) == (None, 7, 3)
    for bad in (["--defense", "none2"], ["--attack", "trojan"], ["--cap", "x"], ["--steps", "1.5"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["train", *bad])
        assert e.value.code == 2, bad


def test_cli_config_file_and_its_errors(tmp_path, capsys):
    from methods.common import parse_args
    from methods.crossview_defense.__main__ import build_parser, config_of

    yaml = pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "mode": "plain", "attack": "none", "lambda-cv": 0.5, "ops": ["mask"]}))
    cfg = config_of(parse_args(build_parser(), ["train", "--config", str(path)]))
    assert (cfg.steps, cfg.defense.mode, cfg.attack, cfg.defense.lambda_cv, cfg.defense.ops) == (
        7,
        "none",
        None,
        0.5,
        ("mask",),
    )
    cfg = config_of(parse_args(build_parser(), ["train", "--config", str(path), "--steps", "9", "--defense", "aug"]))
    assert (cfg.steps, cfg.defense.mode, cfg.defense.lambda_cv) == (9, "aug", 0.5)  # the command line wins
    path.write_text(yaml.safe_dump({"steps": 7, "lambda_cvv": 0.5}))
    with pytest.raises(SystemExit) as e:
        _main(["train", "--config", str(path)])
    assert e.value.code == 2 and "lambda-cvv" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"mode": "shield"}))
    with pytest.raises(SystemExit) as e:
        _main(["train", "--config", str(path)])
    assert e.value.code == 2 and "mode" in capsys.readouterr().err


def test_cli_friendly_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYOPS_CACHE", str(tmp_path / "cache"))
    if not torch.cuda.is_available():
        assert _main(["train", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for argv, word in (
        (["train", "--steps", "0"], "--steps"),
        (["train", "--ratio", "1.5"], "--ratio"),
        (["train", "--kappa", "-1"], "kappa"),
        (["eval", "--out", str(tmp_path / "nothing")], "does not exist"),
    ):
        assert _main([*argv] + (["--out", str(tmp_path / "r")] if argv[0] == "train" else [])) == 2, argv
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as e:
        _main(["eval"])  # the run folder is required
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def _lr_schedule_of(steps, warmup, lr):
    f = TR._lr_schedule(steps, warmup)
    return lambda step: lr * f(step)


def test_cli_continues_a_finished_run_with_a_larger_budget(tmp_path, capsys, monkeypatch):
    """train --steps 3, then the same with --steps 5: it resumes after step 2, logs the larger
    budget, continues the metric rows, and the learning rate of every continued step (the one the
    optimiser used) follows the cosine of the new budget. Training writes its results without
    matplotlib (a warning); another change is refused naming the field; --config <run folder>
    reproduces the run's options; eval re-evaluates it."""
    from methods.common import parse_args, run_options
    from methods.crossview_defense.__main__ import build_parser, config_of

    monkeypatch.setenv("PYOPS_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "run")
    lrs = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    args = ["train", "--out", out, *TINY, "--warmup", "1", "--lr", "0.01", "--defense", "aug"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
        assert _main([*args, "--steps", "3"]) == 0
    assert os.path.exists(os.path.join(out, "results.json")) and not os.path.exists(os.path.join(out, "loss.png"))
    assert "warning: plots skipped" in _text(os.path.join(out, "log.txt"))
    pre = len(lrs) - 3  # (the base model's steps come first)
    f3 = _lr_schedule_of(3, 1, 0.01)
    assert lrs[pre:] == pytest.approx([f3(s) for s in range(3)], rel=1e-12)
    lrs.clear()

    assert _main([*args, "--steps", "5"]) == 0
    log = _text(os.path.join(out, "log.txt"))
    assert "resumed at step 3 with a larger budget (steps 3 -> 5)" in log and "the learning rate" in log
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3, 4]
    f5 = _lr_schedule_of(5, 1, 0.01)
    assert lrs == pytest.approx([f5(3), f5(4)], rel=1e-12)  # not f3's: the new budget's cosine
    assert f5(3) != pytest.approx(f3(3))
    assert [r["lr"] for r in _rows(out)][3:] == pytest.approx([f5(4), f5(5)], rel=1e-12)
    ckpt = torch.load(sorted(glob.glob(os.path.join(out, "checkpoints", "ckpt_*.pt")))[-1], weights_only=False)
    assert ckpt["config"]["steps"] == 5  # the current config: a second continuation compares against 5
    assert os.path.exists(os.path.join(out, "loss.png"))

    # --config <run folder>: the run's options again
    a = parse_args(build_parser(), ["train", "--config", out])
    saved = json.loads(_text(os.path.join(out, "config.json")))["config"]
    assert run_options(a) == saved and saved["steps"] == 5
    assert config_of(a) == TR.config_from_checkpoint(ckpt["config"])

    # any other change is refused, naming the field; so is a smaller budget
    capsys.readouterr()
    assert _main([*args, "--steps", "5", "--lambda-h", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lambda_h" in err and len(err.strip().splitlines()) == 1
    assert _main([*args, "--steps", "4"]) == 2
    assert "larger budget" in capsys.readouterr().err

    assert _main(["eval", "--out", out, "--device", "cpu", "--n-test", "2"]) == 0
    assert {"asr", "bleu4", "vqa_acc"} <= set(json.loads(_text(os.path.join(out, "results.json")))["results"])


def test_eval_reads_the_nested_config_of_older_checkpoints():
    cfg = TR.TrainConfig(attack=None, steps=9, defense=DF.DefenseConfig(mode="aug", ops=("mask",)), model=SMALL)
    nested = json.loads(json.dumps(dataclasses.asdict(cfg)))
    flat = json.loads(json.dumps(TR.resume_config(cfg)))
    assert TR.config_from_checkpoint(nested) == cfg == TR.config_from_checkpoint(flat)
    assert "lambda_cv" in flat and "defense" not in flat  # a refused resume names the flag's field


# --------------------------------------------------------------------------------------------
# DDP (torchrun): the defense's global-batch statistics, and the train command
# --------------------------------------------------------------------------------------------
DDP_OBJECTIVE_SCRIPT = r"""
import copy, json, sys
import torch, torch.distributed as dist
from methods.crossview_defense import data as D, defense as DF
from methods.crossview_defense.model import ModelConfig, build_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
inputs = torch.load(sys.argv[1])
cases = json.loads(open(sys.argv[2]).read())
group = DF.BatchGroup()
out = {}

def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0

def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t

def compare_stats(st, st_r):
    assert set(st) == set(st_r), (sorted(st), sorted(st_r))
    return max([rel(st[k], st_r[k]) for k in st if k != "_u"] + [0.0])

# the objective: every process holds its shard of the batch, the reference is the whole batch
n = inputs["ha"].shape[0] // world
mine = slice(rank * n, (rank + 1) * n)
for name, case in cases.items():
    cfg = DF.DefenseConfig(**{**case["cfg"], "ops": tuple(case["cfg"].get("ops", DF.AUG_OPS))})
    labels = inputs["labels_" + case.get("labels", "mixed")]
    floor = inputs["floor"] if case.get("floor") else None
    full = [inputs[k].clone().requires_grad_() for k in ("ha", "hb", "w", "bias")]
    ref, st_r = DF.cross_view_objective(full[0], full[1], labels, full[2], full[3], cfg, suspicion_floor=floor)
    g_ref = torch.autograd.grad(ref, full, allow_unused=True)
    part = [inputs["ha"][mine].clone().requires_grad_(), inputs["hb"][mine].clone().requires_grad_()]
    part += [inputs["w"].clone().requires_grad_(), inputs["bias"].clone().requires_grad_()]
    loss, st = DF.cross_view_objective(
        part[0], part[1], labels[mine], part[2], part[3], cfg, suspicion_floor=floor, group=group
    )
    g = [torch.zeros_like(p) if x is None else x for x, p in zip(torch.autograd.grad(loss, part, allow_unused=True), part)]
    g_ref = [torch.zeros_like(p) if x is None else x for x, p in zip(g_ref, full)]
    err = {
        "loss": rel(summed(loss), ref),
        "d_ha": rel(group.gather(g[0]), g_ref[0]),
        "d_hb": rel(group.gather(g[1]), g_ref[1]),
        "d_w": rel(summed(g[2]), g_ref[2]),
        "d_bias": rel(summed(g[3]), g_ref[3]),
        "stats": compare_stats(st, st_r),
    }
    if "_u" in st_r:
        err["u"] = rel(st["_u"], st_r["_u"])
    out[name] = err

# CrossViewDefense.loss on a model (float64): modes, the augmentation drawn for the whole batch, the memory
torch.manual_seed(0)
model = build_model(ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)).double()
exs = D.make_examples(8, seed=5)
exs[5].answer = []  # a sample without answer tokens
batch = D.collate(exs, 36)
batch["pixel_values"] = batch["pixel_values"].double()
ids = torch.tensor([3, 9, 1, 12, 7, 0, 5, 2])
for mode, memory in (("none", "none"), ("aug", "none"), ("crossview", "max")):
    cfg = DF.DefenseConfig(mode=mode, memory=memory)
    m_ref, m = copy.deepcopy(model), copy.deepcopy(model)
    d_ref, d = DF.CrossViewDefense(m_ref, cfg, 0), DF.CrossViewDefense(m, cfg, 0)
    err = {}
    for step in range(2):  # twice: the second step reads the memory of the first
        aug = d_ref.augment(batch["pixel_values"], torch.Generator().manual_seed(step))
        ref, st_r = d_ref.loss(batch, sample_ids=ids, augmented=aug)
        g_ref = torch.autograd.grad(ref, list(m_ref.parameters()), allow_unused=True)
        mine_b = {k: v[mine] for k, v in batch.items()}
        loss, st = d.loss(mine_b, sample_ids=ids[mine], augmented=aug[mine], group=group)
        g = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        # relative to the largest gradient entry of the model (some entries are rounding noise: a key bias's is 0)
        scale = max(float(b.abs().max()) for b in g_ref if b is not None)
        e_g = max(float((summed(a) - b).abs().max()) for a, b in zip(g, g_ref) if b is not None) / scale
        assert all((a is None) == (b is None) for a, b in zip(g, g_ref))
        err[f"step{step}"] = {"loss": rel(summed(loss), ref), "grads": e_g, "stats": compare_stats(st, st_r)}
        err[f"step{step}"]["memory"] = rel(d.memory, d_ref.memory) if d_ref.memory.numel() else 0.0
    out["model-" + mode] = err
if rank == 0:
    json.dump(out, open(sys.argv[3], "w"), indent=1)

# train(): a short run of the config in argv[4] into the run folder argv[5] (rank 0 writes)
from methods.common import Run
from methods.crossview_defense import train as TR

run = Run(sys.argv[5], {}, main=rank == 0, name="ddp-test")
TR.train(TR.config_from_checkpoint(json.loads(open(sys.argv[4]).read())), run, show_progress=False)
run.close()
dist.destroy_process_group()
"""


def _torchrun(*args, timeout=600, env=None):
    import socket

    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs the workers' rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={port}", *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ddp_defense_statistics_are_the_global_batch(tmp_path):
    """Under torchrun with 2 processes, each holding half of a batch of 8 (both halves with a sample
    without answer tokens), the shards' losses add up to the whole batch's loss and their gradients
    (of both views' hidden states, the LM head and its bias) to its gradient, the stats and the
    suspicion weights are the whole batch's: for every weighting and score, memory floors, ascent
    (ce_suppress > 1), gamma, every detach mode, temperatures, cap="batch" with the clamp active and
    not, a shard without any answer token, a batch without any. Then `CrossViewDefense.loss` on a
    small model: modes none, aug and crossview with the suspicion memory (two steps), every
    parameter's gradient. float64: only the order of the sums differs, so 1e-9 relative. Last,
    `train` itself (2 steps of a small model, the entropy weights with cap="batch" and gamma) under
    torchrun against one process, to the tolerances of test_ddp_matches_single_process."""
    torch.manual_seed(0)
    ha, hb, w, labels, bias = _objective_inputs(b=8, seed=1, bias=True)
    inputs = {"ha": ha.detach(), "hb": hb.detach(), "w": w.detach(), "bias": bias.detach(), "labels_mixed": labels}
    empty_shard = labels.clone()
    empty_shard[4:] = -100  # the second process's shard has no answer token
    inputs["labels_empty_shard"] = empty_shard
    inputs["labels_empty"] = torch.full_like(labels, -100)
    inputs["floor"] = torch.tensor([0.0, 0.9, 0.0, 0.3, 0.0, 0.0, 0.95, 0.0])
    cases = {name: {"cfg": dict(case["cfg"]), "floor": case.get("floor", False)} for name, case in CASES.items()}
    for name, case in cases.items():  # the "mid" values: between the middle values of the reference's
        cfg = DF.DefenseConfig(**{k: (1e9 if v == "mid" else v) for k, v in case["cfg"].items()})
        _, info = _reference_objective(ha, hb, labels, w, bias, cfg, floor=inputs["floor"] if case["floor"] else None)
        if case["cfg"].get("kappa") == "mid":
            case["cfg"]["kappa"] = _mid(info["d"])
        if case["cfg"].get("ascent_ceiling") == "mid":
            case["cfg"]["ascent_ceiling"] = _mid(info["neg_ce"])
    whole = float(
        DF.cross_view_objective(ha, hb, labels, w, bias, DF.DefenseConfig(cap="batch", kappa=1e9))[1]["div_capped"]
    )
    for share in (0.5, 2.0):  # the global weighted mean clamped, and not
        cases[f"cap-batch-{share}"] = {"cfg": dict(cap="batch", kappa=share * whole), "floor": True}
    cases["entropy-cap-batch"] = {"cfg": dict(weighting="entropy", cap="batch", kappa=0.5 * whole)}
    cases["tv-confident-sensitive"] = {"cfg": dict(weighting="confident-sensitive", score="tv", ce_suppress=1.5)}
    cases["empty-shard"] = {"cfg": {}, "labels": "empty_shard", "floor": True}
    cases["empty-shard-uniform"] = {"cfg": dict(weighting="uniform", cap="batch"), "labels": "empty_shard"}
    cases["empty-batch"] = {"cfg": {}, "labels": "empty"}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "script.py").write_text(DDP_OBJECTIVE_SCRIPT)
    result = tmp_path / "errors.json"
    train_cfg = TR.TrainConfig(**DDP_TRAIN)
    (tmp_path / "train.json").write_text(json.dumps(TR.resume_config(train_cfg)))
    r = _torchrun(
        str(tmp_path / "script.py"),
        *(str(tmp_path / f) for f in ("inputs.pt", "cases.json", "errors.json", "train.json", "ddp")),
    )
    assert r.returncode == 0, r.stderr[-4000:]
    errors = json.loads(result.read_text())
    assert set(errors) == set(cases) | {"model-none", "model-aug", "model-crossview"}

    def worst(e):
        return max(worst(v) if isinstance(v, dict) else v for v in e.values())

    print("largest relative difference:", max(worst(e) for e in errors.values()))
    bad = {name: e for name, e in errors.items() if worst(e) > 1e-9}
    assert not bad, json.dumps(bad, indent=1)

    # train() under DDP against one process: see test_ddp_matches_single_process for the tolerances
    from methods.common import Run

    run = Run(str(tmp_path / "one"), {}, name="ddp-test-one")
    try:
        TR.train(train_cfg, run, show_progress=False)
    finally:
        run.close()
    _same_runs(str(tmp_path / "ddp"), str(tmp_path / "one"), train_cfg.steps - 1)
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["ckpt_00000001.pt", "ckpt_00000001.pt.sha256"]
    assert "DDP over 2 processes, global batch 4" in _text(tmp_path / "ddp" / "log.txt")


# a short fine-tuning run of a small model with the batch-coupled parts of the defense (below)
DDP_TRAIN = dict(
    attack="badnet",
    ratio=0.1,
    defense=DF.DefenseConfig(weighting="entropy", cap="batch", kappa=5e-4, gamma=0.5),
    model=SMALL,
    n_train=20,
    steps=2,
    batch=4,
    n_test=2,
    log_every=1,
    pretrain_steps=0,
)


def _same_runs(a, b, step):
    """The parameters at `step` and the metric rows of the run folders a and b agree to the
    tolerances of test_ddp_matches_single_process's docstring."""

    def params(run):
        return torch.load(os.path.join(run, "checkpoints", f"ckpt_{step:08d}.pt"), weights_only=False)["model"]

    pa, pb = params(a), params(b)
    diff = max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa)
    print(f"largest parameter difference: {diff:.3g}")
    assert diff < 2e-6
    ra, rb = _rows(a), [r for r in _rows(b) if r["step"] <= step]
    assert [r["step"] for r in ra if r["step"] <= step] == [r["step"] for r in rb]
    loss_diff = max(abs(x["loss"] / y["loss"] - 1) for x, y in zip(ra, rb))
    print(f"largest relative difference of the logged losses: {loss_diff:.3g}")
    for x, y in zip(ra, rb):
        for k in set(x) - {"seconds"}:
            # the divergences (~1e-3 nats here) are differences of nearly equal float32 log-probabilities
            # (~4.6 nats, resolution ~5e-7): absolute 1e-6 for them
            tol = dict(rel=0, abs=1e-6) if k.startswith("div") else dict(rel=1e-5, abs=1e-9)
            assert x[k] == pytest.approx(y[k], **tol), (x["step"], k)


@pytest.mark.slow  # three torchrun launches of the CLI: about 50 s of CPU (90 s on a busy 2-core machine)
def test_ddp_matches_single_process(tmp_path, monkeypatch):
    """(slow: PYOPS_SLOW_TESTS=1; test_ddp_defense_statistics_are_the_global_batch runs a short
    `train` under torchrun in the default suite.) `torchrun --nproc_per_node 2 -m methods.crossview_defense train` with --batch 4 (the global
    batch: 2 per process) against one process (in this process): the same metric rows and the
    same parameters after 2 steps, then, resumed under torchrun with --steps 4, the same rows and
    parameters as the single run of 4 steps. The steps lie in the learning-rate warm-up (20 steps),
    whose lr does not depend on --steps, so the 2-step run is the 4-step run's first half. Only
    rank 0 writes: one checkpoint per save, each row and log line once. A --batch the processes
    cannot share equally is a one-line error.

    The defense here weights by entropy with cap="batch" and gamma > 0 (gathered softmax, the
    global clamp, the augmented view's CE); the model has no dropout (attention dropout 0, no
    other), so nothing per-process is random. The default invariance weights are exact too (the
    float64 test above), but in float32 they turn the rounding of near-zero divergences of this
    barely trained model into different suspicion weights. Tolerance: float32, where only the
    order of the sums differs (per-process matmuls over 2 instead of 4 samples, the gradients'
    all-reduce); AdamW's first steps move each weight by about lr whatever the gradient's size, so
    the parameters are compared to atol 2e-6 (1% of one step of lr 2e-4 at warm-up; measured:
    about 3e-7), the logged losses and other means to rtol 1e-5 (measured: about 1e-7), the logged
    divergences to atol 1e-6 (they are differences of float32 log-probabilities of about 4.6 nats)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYOPS_CACHE", str(cache))
    defense = ["--weighting", "entropy", "--cap", "batch", "--kappa", "0.0005", "--gamma", "0.5", "--attack", "badnet"]
    common = ["train", *TINY, "--log-every", "2", "--checkpoint-every", "2", *defense]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert _main([*common, "--out", one, "--steps", "4"]) == 0  # also caches the base model for the others
    r = _torchrun(
        "-m", "methods.crossview_defense", *common, "--out", two, "--steps", "2", env={"PYOPS_CACHE": str(cache)}
    )
    assert r.returncode == 0, r.stderr[-3000:]

    _same_runs(two, one, 1)
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["ckpt_00000001.pt", "ckpt_00000001.pt.sha256"]
    log = _text(os.path.join(two, "log.txt"))
    assert "DDP over 2 processes, global batch 4" in log and log.count("step 2/2:") == 1

    # continued under torchrun: a larger budget, ends as the single run of 4 steps
    r = _torchrun(
        "-m", "methods.crossview_defense", *common, "--out", two, "--steps", "4", env={"PYOPS_CACHE": str(cache)}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = _text(os.path.join(two, "log.txt"))
    assert "resumed at step 2 with a larger budget (steps 2 -> 4)" in log and log.count("step 4/4:") == 1
    _same_runs(two, one, 3)
    assert sorted(f for f in os.listdir(os.path.join(two, "checkpoints")) if f.endswith(".pt")) == [
        "ckpt_00000001.pt",
        "ckpt_00000003.pt",
    ]
    assert json.loads(_text(os.path.join(two, "results.json")))["results"].keys() >= {"asr", "bleu4"}

    r = _torchrun("-m", "methods.crossview_defense", *common, "--out", str(tmp_path / "odd"), "--batch", "3")
    assert r.returncode != 0
    # each process says it in one line, before any traceback (torchrun then reports the failed
    # processes); the two processes write to one pipe, so their lines may run into each other
    msg = "error: --batch 3 must be divisible by the 2 processes of torchrun"
    assert r.stderr.count(msg) == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr[: r.stderr.index(msg)]
