"""pyops.fused_linear_cross_view (LM head + cross-view KL/entropy/CE, chunked) vs the reference."""

import pytest
import torch

import pyops
from pyops import reference

FIELDS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")


def make_inputs(lead, hid, vocab, dtype=torch.float32, bias=True):
    ha = torch.randn(*lead, hid)
    hb = ha + 0.3 * torch.randn(*lead, hid)
    w = torch.randn(vocab, hid) / hid**0.5 * 2
    b = torch.randn(vocab) * 0.1 if bias else None
    t = torch.randint(0, vocab, lead)
    if t.numel() > 2:
        t.view(-1)[1] = -100
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(ha), cast(hb), cast(w), cast(b), t


def forward_backward(fn, ha, hb, w, b, t, grads, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (ha, hb, w, b)]
    out = fn(*leaves, t, **kw)
    loss = sum((o * g).sum() for o, g in zip(out, grads) if g is not None)
    grads_in = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return out, grads_in


@pytest.mark.parametrize("lead,hid,vocab", [((1,), 3, 5), ((13,), 16, 257), ((2, 7), 9, 1030)])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_reference(lead, hid, vocab, chunk_size, bias, temperature):
    ha, hb, w, b, t = make_inputs(lead, hid, vocab, bias=bias)
    grads = [torch.randn(lead) for _ in range(5)]
    out, g = forward_backward(
        pyops.fused_linear_cross_view, ha, hb, w, b, t, grads, temperature=temperature, chunk_size=chunk_size
    )
    ref, rg = forward_backward(reference.fused_linear_cross_view, ha, hb, w, b, t, grads, temperature=temperature)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs():
    ha, hb, w, b, t = make_inputs((9,), 32, 300, dtype=torch.bfloat16)
    grads = [torch.randn(9) for _ in range(5)]
    out, g = forward_backward(pyops.fused_linear_cross_view, ha, hb, w, b, t, grads, chunk_size=4)
    ref, rg = forward_backward(reference.fused_linear_cross_view, ha, hb, w, b, t, grads)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-2, atol=1e-2)
    for x, y in zip(g, rg):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x.float(), y.float(), rtol=5e-2, atol=5e-2 * y.float().abs().max().item())


def test_gradcheck_float64():
    ha, hb, w, b, t = make_inputs((5,), 4, 11, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (ha, hb, w, b)]

    def f(ha, hb, w, b):
        return tuple(pyops.fused_linear_cross_view(ha, hb, w, b, t, temperature=0.8, chunk_size=2))

    assert torch.autograd.gradcheck(f, leaves)


def test_frozen_head_and_one_view():
    """Only what needs a gradient gets one (frozen LM head, detached second view)."""
    ha, hb, w, b, t = make_inputs((6,), 8, 40)
    ha.requires_grad_()
    out = pyops.fused_linear_cross_view(ha, hb, w, b, t, chunk_size=4)
    (out.kl_ab.sum() + out.ce_a.sum()).backward()
    ha2 = ha.detach().clone().requires_grad_()
    ref = reference.fused_linear_cross_view(ha2, hb, w, b, t)
    (ref.kl_ab.sum() + ref.ce_a.sum()).backward()
    torch.testing.assert_close(ha.grad, ha2.grad, rtol=1e-4, atol=1e-5)


def test_empty_rows():
    ha, hb, w, b, _ = make_inputs((0,), 4, 9)
    ha.requires_grad_()
    w.requires_grad_()
    out = pyops.fused_linear_cross_view(ha, hb, w, b)
    assert out.kl_ab.shape == (0,) and out.ce_a is None
    out.kl_ab.sum().backward()
    assert ha.grad.shape == (0, 4) and (w.grad == 0).all()


def test_opcheck():
    ha, hb, w, b, t = make_inputs((5,), 6, 13)
    for x in (ha, hb, w, b):
        x.requires_grad_()
    torch.library.opcheck(torch.ops.pyops.fused_linear_cross_view_fwd.default, (ha, hb, w, b, t, 0.9, -100, 2))
    torch.library.opcheck(torch.ops.pyops.fused_linear_cross_view_fwd.default, (ha, hb, w, None, None, 1.0, -100, 3))
    fwd = torch.ops.pyops.fused_linear_cross_view_fwd(ha.detach(), hb.detach(), w.detach(), b.detach(), t, 0.9, -100, 2)
    g = [torch.randn(5) for _ in range(5)]
    leaves = [x.detach() for x in (ha, hb, w, b)]
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(
            torch.ops.pyops.fused_linear_cross_view_bwd.default,
            (*g, *leaves, t, *fwd[:4], fwd[5], 0.9, -100, 2, mask),
        )


def test_torch_compile_fullgraph():
    ha, hb, w, b, t = make_inputs((7,), 8, 50)

    def loss_fn(ha, hb, w):
        out = pyops.fused_linear_cross_view(ha, hb, w, b, t, chunk_size=3)
        return out.ce_a.mean() + 0.1 * (out.kl_ab - out.entropy_b).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    res = []
    for f in (loss_fn, compiled):
        leaves = [x.clone().requires_grad_() for x in (ha, hb, w)]
        loss = f(*leaves)
        loss.backward()
        res.append([loss.detach()] + [x.grad for x in leaves])
    for x, y in zip(*res):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize(
    "mutate,exc,msg",
    [
        (lambda a: a.update(hb=a["hb"][:, :3]), ValueError, "hidden_a and hidden_b must have the same shape"),
        (lambda a: a.update(w=a["w"][:, :3]), ValueError, "weight must have shape \\(V, H\\)"),
        (lambda a: a.update(w=a["w"][:0]), ValueError, "V = weight.shape\\[0\\] must be > 0"),
        (lambda a: a.update(b=a["b"][:3]), ValueError, "bias must have shape \\(V,\\)"),
        (lambda a: a.update(w=a["w"].double()), TypeError, "must share one dtype"),
        (lambda a: a.update(ha=a["ha"].long()), TypeError, "hidden_a must be float"),
        (lambda a: a.update(t=a["t"][:2]), ValueError, "target must have"),
        (lambda a: a.update(t=torch.full_like(a["t"], 99)), ValueError, "out of range"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(w=a["w"].to("meta")), ValueError, "weight is on meta"),
    ],
)
def test_bad_inputs(mutate, exc, msg):
    ha, hb, w, b, t = make_inputs((4,), 6, 10)
    args = dict(ha=ha, hb=hb, w=w, b=b, t=t, chunk_size=None, temperature=1.0)
    mutate(args)
    with pytest.raises(exc, match=msg):
        pyops.fused_linear_cross_view(
            args["ha"],
            args["hb"],
            args["w"],
            args["b"],
            args["t"],
            chunk_size=args["chunk_size"],
            temperature=args["temperature"],
        )
