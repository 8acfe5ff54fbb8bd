"""pyops.fused_linear_cross_view_loss (gradients computed in the forward) and its in-place row op
pyops::cross_view_kl_entropy_fwd_bwd_, against the reference and the per-row ops."""

import math

import pytest
import torch

import pyops
from pyops import reference

OPS = torch.ops.pyops
WEIGHTS = dict(kl_ab_weight=0.3, kl_ba_weight=0.7, entropy_a_weight=-0.2, entropy_b_weight=0.1, ce_weight=1.5)


def make_inputs(lead, hid, vocab, dtype=torch.float64, bias=True, ignored=(1,)):
    ha = torch.randn(*lead, hid)
    hb = ha + 0.3 * torch.randn(*lead, hid)
    w = torch.randn(vocab, hid) / hid**0.5 * 2
    b = torch.randn(vocab) * 0.1 if bias else None
    t = torch.randint(0, vocab, lead)
    for i in ignored:
        if i < t.numel():
            t.view(-1)[i] = -100
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(ha), cast(hb), cast(w), cast(b), t


def loss_and_grads(fn, ha, hb, w, b, t, scale=1.0, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (ha, hb, w, b)]
    res = fn(*leaves, t, **kw)
    loss = res[0] if isinstance(res, tuple) else res
    grads = torch.autograd.grad(loss * scale, [x for x in leaves if x is not None])
    return res, grads


# float64: the two paths differ by the order of float64 sums over <= 1030 logits and rows
TOL64 = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lead,hid,vocab", [((1,), 3, 5), ((13,), 16, 257), ((2, 7), 9, 1030)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_reference(lead, hid, vocab, chunk_size, reduction, temperature):
    ha, hb, w, b, t = make_inputs(lead, hid, vocab)
    kw = dict(**WEIGHTS, temperature=temperature, reduction=reduction)
    (loss, terms), g = loss_and_grads(
        pyops.fused_linear_cross_view_loss, ha, hb, w, b, t, chunk_size=chunk_size, return_terms=True, **kw
    )
    (ref, ref_terms), rg = loss_and_grads(
        reference.fused_linear_cross_view_loss, ha, hb, w, b, t, return_terms=True, **kw
    )
    torch.testing.assert_close(loss, ref, **TOL64)
    for x, y in zip(terms, ref_terms):
        torch.testing.assert_close(x, y, **TOL64)
    assert not any(x.requires_grad for x in terms)
    torch.testing.assert_close(loss, sum(wt * x for wt, x in zip(WEIGHTS.values(), terms)), **TOL64)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y, **TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_no_target_and_upstream_scale(bias):
    ha, hb, w, b, _ = make_inputs((37,), 24, 333, dtype=torch.float32, bias=bias)
    kw = dict(kl_ab_weight=1.0, kl_ba_weight=0.25, entropy_b_weight=0.5, temperature=0.9)
    loss, g = loss_and_grads(pyops.fused_linear_cross_view_loss, ha, hb, w, b, None, scale=-2.5, chunk_size=8, **kw)
    ref, rg = loss_and_grads(reference.fused_linear_cross_view_loss, ha, hb, w, b, None, scale=-2.5, **kw)
    # float32 logits of size ~1: relative rounding ~1e-6 per term, sums over 333 logits and 37 rows
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * y.abs().max().item())


def test_bfloat16_inputs():
    ha, hb, w, b, t = make_inputs((9,), 32, 300, dtype=torch.bfloat16)
    kw = dict(ce_weight=1.0, temperature=1.3)
    loss, g = loss_and_grads(pyops.fused_linear_cross_view_loss, ha, hb, w, b, t, chunk_size=4, **kw)
    ref, rg = loss_and_grads(reference.fused_linear_cross_view_loss, ha, hb, w, b, t, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for x, y in zip(g, rg):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x.float(), y.float(), rtol=5e-2, atol=5e-2 * y.float().abs().max().item())


def test_matches_the_per_row_op_and_the_module():
    ha, hb, w, b, t = make_inputs((3, 5), 12, 41, dtype=torch.float32)
    kw = dict(**WEIGHTS, temperature=0.8)
    (loss, g) = loss_and_grads(pyops.fused_linear_cross_view_loss, ha, hb, w, b, t, chunk_size=4, **kw)

    def per_row(ha, hb, w, b, t, **kw):
        out = pyops.fused_linear_cross_view(ha, hb, w, b, t, temperature=0.8, chunk_size=4)
        valid = t != -100
        terms = [torch.where(valid, o, 0.0).sum() / valid.sum() for o in out]
        return sum(wt * x for wt, x in zip(WEIGHTS.values(), terms))

    ref, rg = loss_and_grads(per_row, ha, hb, w, b, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    module = pyops.nn.FusedLinearCrossViewLoss(**kw, chunk_size=4)
    assert torch.equal(module(ha, hb, w, b, t), pyops.fused_linear_cross_view_loss(ha, hb, w, b, t, chunk_size=4, **kw))


def test_only_the_gradients_asked_for():
    ha, hb, w, b, t = make_inputs((6,), 5, 11)
    wr = w.clone().requires_grad_()
    loss = pyops.fused_linear_cross_view_loss(ha, hb, wr, b, t, ce_weight=1.0)
    (gw,) = torch.autograd.grad(loss, [wr])
    ref = torch.autograd.grad(reference.fused_linear_cross_view_loss(ha, hb, wr, b, t, ce_weight=1.0), [wr])[0]
    torch.testing.assert_close(gw, ref, **TOL64)
    # what the public function asks the op for: nothing without grad mode or requires_grad
    for grad_mode, leaf in ((False, True), (True, False)):
        h = ha.clone().requires_grad_(leaf)
        with torch.set_grad_enabled(grad_mode):
            out = OPS.fused_linear_cross_view_loss(
                h, hb, w, b, t, [0.5, 0.5, 0.0, 0.0, 1.0], 1.0, -100, "mean", 4, [False] * 3
            )
            lo = pyops.fused_linear_cross_view_loss(h, hb, w, b, t, ce_weight=1.0)
        assert all(x.numel() == 0 for x in out[2:])
        torch.testing.assert_close(lo, out[0], **TOL64)
        assert not lo.requires_grad


def test_no_row_counts():
    ha, hb, w, b, t = make_inputs((4,), 5, 7)
    t[:] = -100
    for reduction, expect in (("mean", math.nan), ("sum", 0.0)):
        loss, g = loss_and_grads(
            pyops.fused_linear_cross_view_loss, ha, hb, w, b, t, ce_weight=1.0, reduction=reduction
        )
        ref, rg = loss_and_grads(
            reference.fused_linear_cross_view_loss, ha, hb, w, b, t, ce_weight=1.0, reduction=reduction
        )
        assert (math.isnan(loss.item()) and math.isnan(ref.item())) if math.isnan(expect) else loss.item() == expect
        for x, y in zip(g, rg):
            assert torch.equal(x, torch.zeros_like(x)) and torch.equal(y, torch.zeros_like(y))


def test_empty_rows():
    ha, hb, w, b, t = make_inputs((0,), 5, 7)
    loss, g = loss_and_grads(pyops.fused_linear_cross_view_loss, ha, hb, w, b, t, reduction="sum")
    assert loss.item() == 0.0
    assert g[0].shape == (0, 5) and torch.equal(g[2], torch.zeros_like(w)) and torch.equal(g[3], torch.zeros_like(b))


def test_gradcheck_float64():
    ha, hb, w, b, t = make_inputs((5,), 4, 9)
    leaves = [x.clone().requires_grad_() for x in (ha, hb, w, b)]
    f = lambda *x: pyops.fused_linear_cross_view_loss(*x, t, **WEIGHTS, temperature=0.7, chunk_size=2)
    assert torch.autograd.gradcheck(f, leaves)


def test_double_backward_refused():
    ha, hb, w, b, t = make_inputs((5,), 4, 9)
    h = ha.clone().requires_grad_()
    loss = pyops.fused_linear_cross_view_loss(h, hb, w, b, t)
    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        torch.autograd.grad(loss, [h], create_graph=True)


def test_op_without_the_gradient_in_its_mask():
    ha, hb, w, b, t = make_inputs((5,), 4, 9)
    h = ha.clone().requires_grad_()
    out = OPS.fused_linear_cross_view_loss(h, hb, w, b, t, [1.0, 0.0, 0.0, 0.0, 0.0], 1.0, -100, "sum", 3, [False] * 3)
    with pytest.raises(RuntimeError, match="output_mask\\[0\\] was False"):
        out[0].backward()


def test_opcheck():
    ha, hb, w, b, t = make_inputs((5,), 6, 13)
    for x in (ha, hb, w, b):
        x.requires_grad_()
    op = OPS.fused_linear_cross_view_loss.default
    torch.library.opcheck(op, (ha, hb, w, b, t, [0.5, 0.5, 0.1, 0.2, 1.0], 0.9, -100, "mean", 2, [True] * 3))
    # (the mask matches what requires a gradient; the backward refuses a gradient not computed)
    torch.library.opcheck(
        op, (ha, hb.detach(), w, None, None, [1.0, 0.0, 0.0, 0.0, 0.0], 1.0, -100, "sum", 3, [True, False, True])
    )
    a, bb = torch.randn(4, 37, dtype=torch.float64), torch.randn(4, 37, dtype=torch.float64)
    g = [torch.randn(4, dtype=torch.float64) for _ in range(5)]
    torch.library.opcheck(OPS.cross_view_kl_entropy_fwd_bwd_.default, (a, bb, t[:4].clamp(min=0), *g, 0.9, -100))


def test_torch_compile_fullgraph():
    ha, hb, w, b, t = make_inputs((7,), 8, 50, dtype=torch.float32)
    f = lambda ha, hb, w: pyops.fused_linear_cross_view_loss(ha, hb, w, b, t, **WEIGHTS, chunk_size=3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    res = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_() for x in (ha, hb, w)]
        loss = fn(*leaves)
        loss.backward()
        res.append([loss.detach()] + [x.grad for x in leaves])
    for x, y in zip(*res):
        torch.testing.assert_close(x, y)


# ---- the in-place row op -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 16, 1030, 2061])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fwd_bwd_is_the_forward_and_backward_ops(dtype, vocab, temperature):
    """Same kernels, same coefficients: bit for bit the forward op's values and the backward op's
    gradients (vocabularies with 16-lane tails, several 1024-wide blocks, the CE term at T != 1)."""
    n = 6
    a = (torch.randn(n, vocab) * 3).to(dtype)
    b = (a.float() + torch.randn(n, vocab)).to(dtype)
    t = torch.randint(0, vocab, (n,))
    t[2] = -100
    g = [torch.randn(n) for _ in range(4)] + [torch.randn(n, dtype=torch.float64)]
    g[1] = None
    fwd = OPS.cross_view_kl_entropy_fwd(a, b, t, temperature, -100)
    ga, gb = OPS.cross_view_kl_entropy_bwd(*g, a, b, t, *fwd[:4], fwd[5], temperature, -100)
    a2, b2 = a.clone(), b.clone()
    out = OPS.cross_view_kl_entropy_fwd_bwd_(a2, b2, t, *g, temperature, -100)
    for x, y in zip(out, fwd[:5]):
        assert torch.equal(x, y)
    assert torch.equal(a2, ga) and torch.equal(b2, gb)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda x: x.update(a=x["a"].t().contiguous().t()), "must be contiguous"),
        (lambda x: x.update(b=x["a"]), "must not overlap"),
        (lambda x: x.update(b=x["a"][:, :0]), "logits_b must have the shape"),
        (lambda x: x.update(g=x["g"][:3]), "grad_kl_ab must have"),
        (lambda x: x.update(t=None), "grad_ce_a needs a target"),
    ],
)
def test_fwd_bwd_bad_inputs(mutate, msg):
    x = dict(a=torch.randn(4, 9), b=torch.randn(4, 9), t=torch.randint(0, 9, (4,)), g=torch.ones(4))
    mutate(x)
    with pytest.raises((ValueError, RuntimeError), match=msg):
        OPS.cross_view_kl_entropy_fwd_bwd_(x["a"], x["b"], x["t"], x["g"], None, None, None, torch.ones(4), 1.0, -100)


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (dict(kl_ab_weight=0.0, kl_ba_weight=0.0), ValueError, "every term weight"),
        (dict(ce_weight=float("nan")), ValueError, "ce_weight must be finite"),
        (dict(kl_ab_weight="1"), TypeError, "kl_ab_weight must be a real number"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(target=None, ce_weight=1.0), ValueError, "needs a target"),
    ],
)
def test_bad_inputs(kw, exc, msg):
    ha, hb, w, b, t = make_inputs((4,), 6, 10)
    kw = dict(dict(target=t), **kw)
    with pytest.raises(exc, match=msg):
        pyops.fused_linear_cross_view_loss(ha, hb, w, b, **kw)
    if "target" in kw and kw["target"] is None or "chunk" in msg or "real number" in msg:
        return
    # the registered op checks the same (users call torch.ops directly)
    ws = [
        kw.get(k, v)
        for k, v in dict(
            kl_ab_weight=0.5, kl_ba_weight=0.5, entropy_a_weight=0.0, entropy_b_weight=0.0, ce_weight=0.0
        ).items()
    ]
    with pytest.raises(exc, match=msg):
        OPS.fused_linear_cross_view_loss(
            ha, hb, w, b, t, ws, kw.get("temperature", 1.0), -100, kw.get("reduction", "mean"), 2, [False] * 3
        )


def test_fwd_bwd_fallback_of_other_devices():
    """The in-place op's implementation for devices without a fused kernel (registered for CUDA:
    the forward and backward row ops, the gradients copied back), run here on CPU tensors: the
    same values and gradients as the fused CPU kernel."""
    from pyops.cross_view_kl import _fwd_bwd_composite

    a = torch.randn(5, 1031) * 2
    b = a + torch.randn(5, 1031)
    t = torch.randint(0, 1031, (5,))
    t[0] = -100
    g = [torch.randn(5) for _ in range(5)]
    a1, b1, a2, b2 = a.clone(), b.clone(), a.clone(), b.clone()
    ref = OPS.cross_view_kl_entropy_fwd_bwd_(a1, b1, t, *g, 0.8, -100)
    out = _fwd_bwd_composite(a2, b2, t, *g, 0.8, -100)
    for x, y in zip(out, ref):
        assert torch.equal(x, y)
    assert torch.equal(a2, a1) and torch.equal(b2, b1)
