"""pyops.nn: every module against its functional op, the cross-view losses' weighting, masking
and reductions against a hand computation on pyops.reference, argument checks, extra_repr,
GRLoss's state, and torch.compile(fullgraph=True) of the loss modules (CPU)."""

import pytest
import torch
import torch.nn.functional as F

import pyops
from pyops import nn as pnn
from pyops import reference

DTYPES = [torch.float32, torch.float64]
TERMS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")
WEIGHT_ARGS = ("kl_ab_weight", "kl_ba_weight", "entropy_a_weight", "entropy_b_weight", "ce_weight")
# The module reduces the op's own per-row outputs: only the summation order of the reduction
# differs from the tests' (masked select + sum vs where + sum), a few ulps of the sum.
SAME_OP = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# Against pyops.reference (separately rounded log-softmax maths): the tolerances of
# tests/test_cross_view_kl.py (float32 compared with the reference in float64).
VS_REF = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def make_logits(lead, vocab, dtype, scale=3.0):
    a = torch.randn(*lead, vocab, dtype=torch.float64) * scale
    b = a + torch.randn(*lead, vocab, dtype=torch.float64) * scale * 0.5
    return a.to(dtype), b.to(dtype)


def make_target(lead, vocab, ignore_index=-100):
    t = torch.randint(0, vocab, lead)
    t.view(-1)[1::3] = ignore_index  # every third row ignored, row 0 kept
    return t


def all_weights():
    return dict(kl_ab_weight=0.7, kl_ba_weight=0.3, entropy_a_weight=-0.2, entropy_b_weight=0.15, ce_weight=1.1)


def hand_loss(out, target, weights, reduction, ignore_index=-100):
    """The documented semantics, from per-row terms: l_i = sum_t w_t term_t[i] over the rows that
    count (target != ignore_index; all rows without a target), then mean / sum / per row."""
    rows = sum(w * getattr(out, name) for name, w in zip(TERMS, weights.values()) if w != 0)
    valid = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    if reduction == "none":
        return torch.where(valid, rows, 0.0)
    if reduction == "sum":
        return rows[valid].sum()
    return rows[valid].sum() / valid.sum()


# --------------------------------------------------------------------------------------------
# CrossViewKLEntropy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_view_terms_are_the_ops_rows_reduced(dtype, reduction):
    a, b = make_logits((3, 5), 37, dtype)
    t = make_target((3, 5), 37)
    m = pnn.CrossViewKLEntropy(**all_weights(), temperature=1.7, reduction=reduction)
    loss, terms = m(a, b, t, return_terms=True)
    out = pyops.cross_view_kl_entropy(a, b, t, temperature=1.7)
    valid = t != -100
    for name in TERMS:
        rows = getattr(out, name)
        got = getattr(terms, name)
        want = {
            "none": torch.where(valid, rows, 0.0),
            "sum": rows[valid].sum(),
            "mean": rows[valid].sum() / valid.sum(),
        }[reduction]
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got, want, **SAME_OP[dtype])
    # the loss is exactly the weighted sum of the returned terms, in the order of the fields
    expected = sum(w * getattr(terms, name) for name, w in zip(TERMS, all_weights().values()))
    assert torch.equal(loss, expected)
    assert torch.equal(m(a, b, t), loss)  # return_terms changes nothing about the loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [True, False])
def test_cross_view_reduction_against_reference(dtype, reduction, with_target):
    a, b = make_logits((4, 3), 29, dtype)
    t = make_target((4, 3), 29, ignore_index=7) if with_target else None
    weights = all_weights() if with_target else {**all_weights(), "ce_weight": 0.0}
    m = pnn.CrossViewKLEntropy(**weights, temperature=0.6, ignore_index=7, reduction=reduction)
    ref = reference.cross_view_kl_entropy(a.double(), b.double(), t, temperature=0.6, ignore_index=7)
    want = hand_loss(ref, t, weights, reduction, ignore_index=7)
    got = m(a, b, t)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **VS_REF[dtype])


def test_cross_view_default_is_the_symmetric_kl():
    a, b = make_logits((11,), 13, torch.float64)
    out = pyops.cross_view_kl_entropy(a, b)
    torch.testing.assert_close(
        pnn.CrossViewKLEntropy()(a, b), (0.5 * (out.kl_ab + out.kl_ba)).mean(), **SAME_OP[torch.float64]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_view_gradient_is_the_weighted_sum_of_term_gradients(dtype):
    a, b = make_logits((9,), 23, dtype)
    t = make_target((9,), 23)
    weights = all_weights()

    def grads(**kw):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = pnn.CrossViewKLEntropy(temperature=1.3, **kw)(x, y, t)
        return torch.autograd.grad(loss, (x, y))

    ga, gb = grads(**weights)
    wa, wb = torch.zeros_like(a, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)
    for arg, w in weights.items():
        one = {name: 1.0 if name == arg else 0.0 for name in WEIGHT_ARGS}
        ta, tb = grads(**one)
        wa += w * ta.double()
        wb += w * tb.double()
    # float32: each per-term gradient is rounded once more than the fused one (4 eps of the largest)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga.double(), wa, **tol)
    torch.testing.assert_close(gb.double(), wb, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_view_ignored_rows_count_for_no_term(reduction):
    a, b = make_logits((13,), 19, torch.float64)
    t = make_target((13,), 19)
    valid = t != -100
    m = pnn.CrossViewKLEntropy(**all_weights(), reduction=reduction)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = m(a1, b1, t)
    # the same loss from the kept rows alone
    kept = m(a[valid], b[valid], t[valid])
    if reduction == "none":
        assert torch.equal(loss[~valid], torch.zeros(int((~valid).sum()), dtype=loss.dtype))
        torch.testing.assert_close(loss[valid], kept, rtol=0, atol=0)
    else:
        torch.testing.assert_close(loss, kept, **SAME_OP[torch.float64])
    # ignored rows' logits change nothing and get no gradient
    a2 = torch.where(valid[:, None], a, torch.randn_like(a) * 10)
    torch.testing.assert_close(m(a2, b, t), loss.detach(), rtol=0, atol=0)
    ga, gb = torch.autograd.grad(loss.sum(), (a1, b1))
    assert not ga[~valid].any() and not gb[~valid].any()
    assert ga[valid].abs().sum() > 0 and gb[valid].abs().sum() > 0


def test_cross_view_all_rows_ignored():
    a, b = make_logits((4,), 6, torch.float64)
    t = torch.full((4,), -100)
    assert torch.isnan(pnn.CrossViewKLEntropy(ce_weight=1.0)(a, b, t))  # mean of no rows
    assert pnn.CrossViewKLEntropy(ce_weight=1.0, reduction="sum")(a, b, t).item() == 0.0


def test_cross_view_without_target():
    a, b = make_logits((2, 6), 11, torch.float64)
    weights = {**all_weights(), "ce_weight": 0.0}
    loss, terms = pnn.CrossViewKLEntropy(**weights)(a, b, return_terms=True)
    assert terms.ce_a is None
    out = pyops.cross_view_kl_entropy(a, b)
    torch.testing.assert_close(loss, hand_loss(out, None, weights, "mean"), **SAME_OP[torch.float64])
    with pytest.raises(ValueError, match="ce_weight"):
        pnn.CrossViewKLEntropy(ce_weight=1.0)(a, b)


# --------------------------------------------------------------------------------------------
# FusedLinearCrossViewLoss
# --------------------------------------------------------------------------------------------
def make_hidden(lead, hid, vocab, dtype):
    ha = torch.randn(*lead, hid, dtype=dtype)
    hb = ha + 0.3 * torch.randn(*lead, hid, dtype=dtype)
    w = torch.randn(vocab, hid, dtype=dtype) / hid**0.5 * 3
    bias = torch.randn(vocab, dtype=dtype) * 0.1
    return ha, hb, w, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_matches_the_op_and_the_logits_module(dtype, reduction):
    ha, hb, w, bias = make_hidden((3, 5), 12, 41, dtype)
    t = make_target((3, 5), 41)
    kw = dict(**all_weights(), temperature=0.8, reduction=reduction)
    m = pnn.FusedLinearCrossViewLoss(**kw, chunk_size=4)
    leaves = [x.clone().requires_grad_() for x in (ha, hb, w, bias)]
    loss, terms = m(*leaves, target=t, return_terms=True)
    out = pyops.fused_linear_cross_view(ha, hb, w, bias, t, temperature=0.8, chunk_size=4)
    torch.testing.assert_close(loss, hand_loss(out, t, all_weights(), reduction), **SAME_OP[dtype])
    assert torch.equal(terms.kl_ab, m(ha, hb, w, bias, t, return_terms=True)[1].kl_ab)
    # = CrossViewKLEntropy of the materialised logits (same row kernel, logits from chunked matmuls)
    ref_leaves = [x.clone().requires_grad_() for x in (ha, hb, w, bias)]
    za, zb = (F.linear(h, ref_leaves[2], ref_leaves[3]) for h in ref_leaves[:2])
    ref = pnn.CrossViewKLEntropy(**kw)(za, zb, t)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref, **tol)
    g = torch.autograd.grad(loss.sum(), leaves)
    rg = torch.autograd.grad(ref.sum(), ref_leaves)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y, **tol)


def test_fused_linear_chunk_size_and_no_bias():
    ha, hb, w, _ = make_hidden((17,), 8, 23, torch.float64)
    losses = [pnn.FusedLinearCrossViewLoss(chunk_size=c, reduction="none")(ha, hb, w) for c in (None, 1, 5, 100)]
    for x in losses[1:]:
        torch.testing.assert_close(x, losses[0], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Patch and diagonal modules: the same call as the functional op, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_patch_search_module_is_the_op(dtype):
    q = torch.randn(2, 3, 13, 11, dtype=dtype)
    d = torch.randn(2, 3, 9, 14, dtype=dtype)
    m = pnn.KNNPatchSearch(5, patch_size=3, stride=2, window=4)
    for got, want in zip(m(q, d), pyops.knn_patch_search(q, d, 5, patch_size=3, stride=2, window=4)):
        assert torch.equal(got, want)
    anchored = pnn.KNNPatchSearch(3, patch_size=2, stride=1, window=3, window_anchor=((1, 0, 2, 1), (1, 1, 2, 0)))
    want = pyops.knn_patch_search(q, d, 3, patch_size=2, stride=1, window=3, window_anchor=((1, 0, 2, 1), (1, 1, 2, 0)))
    for got, w in zip(anchored(q, d), want):
        assert torch.equal(got, w)
    # database=None: a self-search of the query map
    selfm = pnn.KNNPatchSearch(4, patch_size=3, stride=1, exclude_self=True)
    for got, w in zip(selfm(q), pyops.knn_patch_search(q, q, 4, patch_size=3, stride=1, exclude_self=True)):
        assert torch.equal(got, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_aggregate_module_is_the_op(dtype):
    v = torch.randn(2, 4, 10, 9, dtype=dtype, requires_grad=True)
    q = torch.randn(2, 4, 11, 7, dtype=dtype)
    dist, idx = pyops.knn_patch_search(q, v.detach(), 3, patch_size=3, stride=2)
    wts = torch.softmax(-dist, -1).to(dtype).requires_grad_()
    out = pnn.PatchAggregate(3, stride=2)(v, idx, wts, (11, 7))
    want = pyops.patch_aggregate(v, idx, wts, patch_size=3, stride=2, output_size=(11, 7))
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (v, wts), g), torch.autograd.grad(want, (v, wts), g)):
        assert torch.equal(x, y)
    torch.testing.assert_close(out, reference.patch_aggregate(v, idx, wts, patch_size=3, stride=2, output_size=(11, 7)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_lags", [None, 0, 4])
def test_diagonal_stats_module_is_the_op(dtype, num_lags):
    maps = torch.randn(3, 9, 9, dtype=dtype)
    for got, want in zip(pnn.DiagonalStats(num_lags)(maps), pyops.diagonal_stats(maps, num_lags)):
        assert torch.equal(got, want)
    for got, want in zip(pnn.DiagonalStats(num_lags)(maps[0]), pyops.diagonal_stats(maps[0], num_lags)):
        assert torch.equal(got, want)


def test_joseph_projector_is_reexported():
    assert pnn.JosephProjector is pyops.pet.JosephProjector


# --------------------------------------------------------------------------------------------
# GRLoss
# --------------------------------------------------------------------------------------------
def spml(B, C, dtype):
    logits = torch.randn(B, C, dtype=dtype) * 2
    observed = torch.zeros(B, C, dtype=torch.int64)
    observed[torch.arange(B), torch.randint(0, C, (B,))] = 1
    return logits, observed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gr_loss_module_is_the_op_with_the_schedule(dtype, reduction):
    z, o = spml(7, 9, dtype)
    m = pnn.GRLoss(
        (0.5, 3.0, -2.5, -1.0), (0.4, 2.0, 0.9, 0.3), (0.05, 0.7), epochs=6, linear_init=1, reduction=reduction
    )
    for e in (1, 3, 6):
        m.start_epoch(e)
        P = m.params_at(e)
        assert m.schedule() == P and m.epoch == e
        x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        got = m(x1, o)
        want = pyops.gr_loss(x2, o, (P["w"], P["b"]), (P["mu"], P["sigma"]), 0.05, 0.7, reduction=reduction)
        assert torch.equal(got, want)  # the same float64 parameters: the same kernel call
        g = torch.randn_like(got)
        assert torch.equal(torch.autograd.grad(got, x1, g)[0], torch.autograd.grad(want, x2, g)[0])
    # "mean" is over all B x C entries
    m.start_epoch(2)
    per = pnn.GRLoss(
        (0.5, 3.0, -2.5, -1.0), (0.4, 2.0, 0.9, 0.3), (0.05, 0.7), epochs=6, linear_init=1, reduction="none"
    )
    per.start_epoch(2)
    if reduction != "none":
        want = per(z, o).sum() / (z.numel() if reduction == "mean" else 1)
        torch.testing.assert_close(m(z, o), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_gr_loss_schedule_formulas():
    beta, alpha, T, n = (0.5, 3.0, -2.5, -1.0), (0.4, 2.0, 0.9, 0.3), 10, 3
    m = pnn.GRLoss(beta, alpha, epochs=T, linear_init=n)
    for e in range(1, T + 1):
        fk, fv = max(e - n - 1, 0) / (T - n), max(e - n, 0) / (T - n)
        assert m.params_at(e) == pytest.approx(
            {
                "w": beta[0] + (beta[1] - beta[0]) * fk,
                "b": beta[2] + (beta[3] - beta[2]) * fk,
                "mu": alpha[0] + (alpha[2] - alpha[0]) * fv,
                "sigma": alpha[1] + (alpha[3] - alpha[1]) * fv,
            }
        )
    m.start_epoch(5)
    p = torch.linspace(0, 1, 7)
    P = m.schedule()
    torch.testing.assert_close(m.k_hat(p), torch.sigmoid(P["w"] * p + P["b"]))
    torch.testing.assert_close(m.v(p), torch.exp(-((p - P["mu"]) ** 2) / (2 * P["sigma"] ** 2)))


def test_gr_loss_state_dict_round_trip():
    z, o = spml(5, 6, torch.float64)
    m = pnn.GRLoss(epochs=8)
    m.start_epoch(6)
    state = m.state_dict()
    assert list(state) == ["_extra_state"] and state["_extra_state"] == {"epoch": 6}
    other = pnn.GRLoss(epochs=8)
    assert other.epoch == 1
    other.load_state_dict(state)
    assert other.epoch == 6 and other.schedule() == m.schedule()
    assert torch.equal(other(z, o), m(z, o))
    # (tests/test_method_grloss.py: the method's GRLoss loads the same state)


def test_gr_loss_schedule_survives_dtype_casts():
    z, o = spml(4, 5, torch.float32)
    m = pnn.GRLoss(epochs=7)
    m.start_epoch(4)
    before = m(z, o)
    m.half()  # casts floating buffers; the schedule stays float64
    assert torch.equal(m(z, o), before)
    m.start_epoch(5)
    m.float()
    want = pnn.GRLoss(epochs=7)
    want.start_epoch(5)
    assert torch.equal(m(z, o), want(z, o))


def test_gr_loss_require_positive():
    z, o = spml(4, 5, torch.float64)
    o[2] = 0
    pnn.GRLoss()(z, o)  # allowed by default
    with pytest.raises(ValueError, match="row 2"):
        pnn.GRLoss(require_positive=True)(z, o)


# --------------------------------------------------------------------------------------------
# Arguments and extra_repr
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: pnn.CrossViewKLEntropy(kl_ab_weight=float("nan")), "kl_ab_weight"),
        (lambda: pnn.CrossViewKLEntropy(entropy_b_weight="1"), "entropy_b_weight"),
        (lambda: pnn.CrossViewKLEntropy(ce_weight=True), "ce_weight"),
        (lambda: pnn.CrossViewKLEntropy(kl_ab_weight=0, kl_ba_weight=0), "kl_ab_weight"),
        (lambda: pnn.CrossViewKLEntropy(temperature=0.0), "temperature"),
        (lambda: pnn.CrossViewKLEntropy(temperature=float("inf")), "temperature"),
        (lambda: pnn.CrossViewKLEntropy(ignore_index=1.5), "ignore_index"),
        (lambda: pnn.CrossViewKLEntropy(reduction="batchmean"), "reduction"),
        (lambda: pnn.FusedLinearCrossViewLoss(chunk_size=0), "chunk_size"),
        (lambda: pnn.FusedLinearCrossViewLoss(chunk_size=2.0), "chunk_size"),
        (lambda: pnn.FusedLinearCrossViewLoss(kl_ba_weight=-float("inf")), "kl_ba_weight"),
        (lambda: pnn.KNNPatchSearch(0), "k"),
        (lambda: pnn.KNNPatchSearch(3, patch_size=0), "patch_size"),
        (lambda: pnn.KNNPatchSearch(3, stride=-1), "stride"),
        (lambda: pnn.KNNPatchSearch(3, window=0), "window"),
        (lambda: pnn.KNNPatchSearch(3, exclude_self=1), "exclude_self"),
        (lambda: pnn.KNNPatchSearch(3, window_anchor=((1, 0, 2, 1), (1, 0, 2, 1))), "window_anchor"),
        (lambda: pnn.KNNPatchSearch(3, window=5, window_anchor=((1, 0, 0, 1), (1, 0, 2, 1))), "window_anchor"),
        (lambda: pnn.PatchAggregate(patch_size=2.5), "patch_size"),
        (lambda: pnn.PatchAggregate(stride=0), "stride"),
        (lambda: pnn.DiagonalStats(num_lags=-1), "num_lags"),
        (lambda: pnn.DiagonalStats(num_lags="3"), "num_lags"),
        (lambda: pnn.GRLoss(beta=(0.0, 2.0, -2.0)), "beta"),
        (lambda: pnn.GRLoss(alpha=(0.5, 0.0, 0.8, 0.5)), "sigma0"),
        (lambda: pnn.GRLoss(alpha=(0.5, 2.0, 0.8, -1.0)), "sigmaT"),
        (lambda: pnn.GRLoss(q=(0.01, -1.0)), "q2 and q3"),
        (lambda: pnn.GRLoss(epochs=0), "epochs"),
        (lambda: pnn.GRLoss(epochs=3, linear_init=3), "linear_init"),
        (lambda: pnn.GRLoss(reduction="batchmean"), "reduction"),
        (lambda: pnn.GRLoss(require_positive=None), "require_positive"),
        (lambda: pnn.GRLoss().start_epoch(2.5), "epoch"),
    ],
)
def test_bad_arguments_name_the_argument(make, name):
    with pytest.raises((TypeError, ValueError), match=name):
        make()


def test_extra_repr():
    r = repr(
        pnn.CrossViewKLEntropy(ce_weight=1.0, entropy_a_weight=-0.1, temperature=2.0, ignore_index=-1, reduction="sum")
    )
    for part in (
        "kl_ab_weight=0.5",
        "kl_ba_weight=0.5",
        "entropy_a_weight=-0.1",
        "ce_weight=1.0",
        "temperature=2.0",
        "ignore_index=-1",
        "reduction='sum'",
    ):
        assert part in r
    assert "entropy_b_weight" not in r  # weight 0: not part of the loss
    assert "chunk_size=7" in repr(pnn.FusedLinearCrossViewLoss(chunk_size=7))
    r = repr(pnn.KNNPatchSearch(4, patch_size=5, stride=2, window=6, window_anchor=((1, 0, 2, 3), (1, 0, 2, 3))))
    for part in (
        "k=4",
        "patch_size=5",
        "stride=2",
        "window=6",
        "exclude_self=False",
        "window_anchor=((1, 0, 2, 3), (1, 0, 2, 3))",
    ):
        assert part in r
    assert repr(pnn.PatchAggregate(3)) == "PatchAggregate(patch_size=3, stride=None)"
    assert repr(pnn.DiagonalStats(5)) == "DiagonalStats(num_lags=5)"
    gr = pnn.GRLoss(epochs=5, reduction="sum")
    gr.start_epoch(3)
    for part in (
        "beta=(0.0, 2.0, -2.0, -2.0)",
        "alpha=(0.5, 2.0, 0.8, 0.5)",
        "q=(0.01, 1.0)",
        "epochs=5",
        "linear_init=0",
        "epoch=3",
        "reduction='sum'",
    ):
        assert part in repr(gr)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
def eager_and_compiled(module, inputs, n_leaves):
    """(loss, grads of the first n_leaves inputs) eager and under torch.compile(fullgraph=True)."""
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    res = []
    for f in (module, compiled):
        args = [x.clone().requires_grad_() if i < n_leaves else x for i, x in enumerate(inputs)]
        loss = f(*args)
        res.append([loss.detach(), *torch.autograd.grad(loss.sum(), args[:n_leaves])])
    return res


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_cross_view_losses(reduction):
    torch._dynamo.reset()
    a, b = make_logits((6,), 17, torch.float32)
    t = make_target((6,), 17)
    m = pnn.CrossViewKLEntropy(**all_weights(), temperature=1.4, reduction=reduction)
    for x, y in zip(*eager_and_compiled(m, (a, b, t), 2)):
        torch.testing.assert_close(x, y)
    ha, hb, w, bias = make_hidden((7,), 8, 19, torch.float32)
    m = pnn.FusedLinearCrossViewLoss(**all_weights(), chunk_size=3, reduction=reduction)
    for x, y in zip(*eager_and_compiled(m, (ha, hb, w, bias, t[:5].repeat(2)[:7]), 4)):
        torch.testing.assert_close(x, y)


def test_compile_gr_loss_new_epochs_do_not_recompile():
    torch._dynamo.reset()
    z, o = spml(6, 7, torch.float64)
    m = pnn.GRLoss(epochs=12)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for e in (1, 2, 7, 12):
            m.start_epoch(e)
            x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
            got, want = compiled(x1, o), m(x2, o)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(torch.autograd.grad(got, x1)[0], torch.autograd.grad(want, x2)[0])


def test_compile_inductor_cross_view_loss_matches_eager():
    torch._dynamo.reset()
    a, b = make_logits((2, 5), 33, torch.float32)
    t = make_target((2, 5), 33)
    m = pnn.CrossViewKLEntropy(**all_weights(), temperature=0.9)
    compiled = torch.compile(m, fullgraph=True)
    res = []
    for f in (m, compiled):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = f(x, y, t)
        res.append([loss.detach(), *torch.autograd.grad(loss, (x, y))])
    for x, y in zip(*res):
        torch.testing.assert_close(x, y)
