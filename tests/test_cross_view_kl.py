"""pyops.cross_view_kl_entropy against pyops.reference (CPU; the CUDA variants are in test_cuda.py)."""

import pytest
import torch

import pyops
from pyops import reference

FIELDS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-10}
# float32 gradients are compared with the reference evaluated in float64 (the float32 reference is
# itself off by up to ~1.2e-5 of the largest gradient, and by a different amount on each CPU's
# ATen path); the kernel's own error, a few eps32 times |log-sum-exp| ~ 25, measured at most
# 4.5e-6 of the largest gradient over 60 seeds on every ISA path: 2e-5 leaves a 4x margin.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def make_logits(shape, dtype=torch.float32, scale=3.0, device="cpu"):
    a = torch.randn(shape, device=device) * scale
    # view b: a perturbed copy of a, so that the KL terms are neither 0 nor huge
    b = a + torch.randn(shape, device=device) * scale * 0.5
    return a.to(dtype), b.to(dtype)


def make_target(lead, vocab, ignore_index=-100, device="cpu"):
    t = torch.randint(0, vocab, lead, device=device)
    if t.numel() > 1:
        t.view(-1)[::3] = ignore_index  # every third row ignored
    return t


def assert_rows_close(out, ref, tol):
    for name in FIELDS:
        o, r = getattr(out, name), getattr(ref, name)
        if r is None:
            assert o is None, name
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, (name, o.shape, r.shape, o.dtype, r.dtype)
        o = o.to(r.dtype)
        scale = r.abs().max().item() if r.numel() else 0.0
        torch.testing.assert_close(o, r, rtol=tol, atol=tol * max(1.0, scale), msg=lambda m: f"{name}: {m}")


def run_both(fn_args, grads, ref_dtype=None, **kw):
    """Forward + backward with the given upstream gradients through pyops and the reference (in
    ``ref_dtype``, when given, from the same inputs)."""
    results = []
    for f in (pyops.cross_view_kl_entropy, reference.cross_view_kl_entropy):
        a, b, t = (x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None for x in fn_args)
        if f is reference.cross_view_kl_entropy and ref_dtype is not None:
            a, b = (x.detach().to(ref_dtype).requires_grad_() for x in (a, b))
        out = f(a, b, t, **kw)
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(out, grads) if o is not None and g is not None)
        ga, gb = torch.autograd.grad(loss, (a, b), allow_unused=True)
        results.append((out, ga, gb))
    return results


SHAPES = [(1, 1), (3, 7), (2, 5, 33), (17, 1031), (5, 2049), (2, 3, 1, 4099)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("with_target", [False, True])
def test_matches_reference(shape, dtype, temperature, with_target):
    a, b = make_logits(shape, dtype)
    t = make_target(shape[:-1], shape[-1]) if with_target else None
    lead = shape[:-1]
    grads = [torch.randn(lead) for _ in range(5)]  # grad_output != 1, mixed signs
    ref_dtype = torch.float64 if dtype == torch.float32 else None
    (out, ga, gb), (ref, rga, rgb) = run_both((a, b, t), grads, ref_dtype=ref_dtype, temperature=temperature)
    if ref_dtype is not None:
        ref = type(ref)(*(None if r is None else r.float() for r in ref))
    assert_rows_close(out, ref, TOL[dtype])
    for g, r in ((ga, rga), (gb, rgb)):
        assert g.dtype == dtype
        scale = r.double().abs().max().item()
        torch.testing.assert_close(g.double(), r.double(), rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype] * max(scale, 1.0))


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (3,), (4,), (0, 3), (1, 2, 4)])
def test_subsets_of_outputs(used):
    """Outputs left out of the loss get no gradient (None upstream) and must not matter."""
    a, b = make_logits((6, 301))
    t = make_target((6,), 301)
    grads = [torch.randn(6) if i in used else None for i in range(5)]
    (out, ga, gb), (ref, rga, rgb) = run_both((a, b, t), grads, ref_dtype=torch.float64, temperature=1.3)
    for g, r in ((ga, rga), (gb, rgb)):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:  # float64 oracle, the kernel's float32 error bound (GRAD_TOL, header)
            f32 = GRAD_TOL[torch.float32]
            torch.testing.assert_close(g.double(), r, rtol=f32, atol=f32 * max(r.abs().max().item(), 1.0))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_target", [False, True])
def test_gradcheck_float64(temperature, with_target):
    a, b = make_logits((4, 23), torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    t = make_target((4,), 23) if with_target else None

    def f(a, b):
        out = pyops.cross_view_kl_entropy(a, b, t, temperature=temperature)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, (a, b))


def test_gradcheck_one_output_and_stop_gradient():
    a, b = make_logits((3, 17), torch.float64)
    a.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pyops.cross_view_kl_entropy(a, b.detach()).kl_ab, (a,))
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda b: pyops.cross_view_kl_entropy(a.detach(), b).entropy_b, (b,))


def test_float64_outputs_are_float64():
    a, b = make_logits((3, 9), torch.float64)
    t = make_target((3,), 9)
    out = pyops.cross_view_kl_entropy(a, b, t, temperature=0.5)
    assert all(o.dtype == torch.float64 for o in out)
    assert_rows_close(out, reference.cross_view_kl_entropy(a, b, t, temperature=0.5), TOL[torch.float64])


def test_stop_gradient_on_one_view():
    a, b = make_logits((5, 64))
    a.requires_grad_()
    out = pyops.cross_view_kl_entropy(a, b.detach())
    (out.kl_ab.sum() + out.entropy_b.sum()).backward()
    a2 = a.detach().double().requires_grad_()
    ref = reference.cross_view_kl_entropy(a2, b.double())
    (ref.kl_ab.sum() + ref.entropy_b.sum()).backward()
    f32 = GRAD_TOL[torch.float32]  # float64 oracle, the kernel's float32 error bound (header)
    torch.testing.assert_close(a.grad.double(), a2.grad, rtol=f32, atol=f32 * max(a2.grad.abs().max().item(), 1.0))


def test_large_magnitude_logits_are_stable():
    """Logits ~1e4: compare with a float64 reference of the same (float32) inputs."""
    a, b = make_logits((8, 5000), scale=1.0)
    a, b = a * 1e4 / 4, b * 1e4 / 4 + 1e4
    t = make_target((8,), 5000)
    for temperature in (1.0, 50.0):
        out = pyops.cross_view_kl_entropy(a, b, t, temperature=temperature)
        ref = reference.cross_view_kl_entropy(a.double(), b.double(), t, temperature=temperature)
        for name in FIELDS:
            o, r = getattr(out, name).double(), getattr(ref, name)
            assert torch.isfinite(o).all(), name
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-2, msg=lambda m: f"{name}: {m}")


def test_large_vocabulary():
    vocab = 256_000
    a, b = make_logits((2, vocab))
    t = torch.tensor([5, vocab - 1])
    out = pyops.cross_view_kl_entropy(a, b, t, temperature=0.9)
    ref = reference.cross_view_kl_entropy(a.double(), b.double(), t, temperature=0.9)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name), rtol=1e-5, atol=1e-4)


def test_nan_and_inf_stay_in_their_row():
    a, b = make_logits((6, 50))
    t = make_target((6,), 50)
    a[1, 7] = float("nan")
    b[3, 0] = float("inf")
    a[4, 2] = float("-inf")
    out = pyops.cross_view_kl_entropy(a, b, t)
    ref = reference.cross_view_kl_entropy(a, b, t)
    bad = torch.tensor([False, True, False, True, True, False])
    for name in ("kl_ab", "kl_ba"):
        o = getattr(out, name)
        # NaN, or +inf where the divergence really is infinite (KL(q||p) with a -inf logit in p)
        assert not torch.isfinite(o[bad]).any(), name
        assert torch.isnan(o[[1, 3]]).all(), name
        torch.testing.assert_close(o[~bad], getattr(ref, name)[~bad], rtol=2e-5, atol=2e-5)
    assert torch.isnan(out.entropy_a[[1, 4]]).all() and torch.isfinite(out.entropy_a[[0, 2, 3, 5]]).all()
    assert torch.isnan(out.entropy_b[3]) and torch.isfinite(out.entropy_b[[0, 1, 2, 4, 5]]).all()


def test_empty_inputs():
    for shape in [(0, 11), (2, 0, 5)]:
        a, b = make_logits(shape)
        a.requires_grad_()
        b.requires_grad_()
        t = torch.zeros(shape[:-1], dtype=torch.long)
        out = pyops.cross_view_kl_entropy(a, b, t)
        assert all(o.shape == shape[:-1] for o in out)
        sum(o.sum() for o in out).backward()
        assert a.grad.shape == shape and b.grad.shape == shape


def test_ignore_index_rows_have_zero_ce_and_no_ce_gradient():
    a, b = make_logits((4, 10))
    a.requires_grad_()
    t = torch.tensor([3, 7, 3, 1])
    out = pyops.cross_view_kl_entropy(a, b, t, ignore_index=3)
    assert out.ce_a[0] == 0 and out.ce_a[2] == 0 and (out.ce_a[[1, 3]] > 0).all()
    out.ce_a.sum().backward()
    assert (a.grad[[0, 2]] == 0).all()
    # the CE gradient of a row, softmax(a) - onehot, sums to 0; in float32 each p_i = exp(a_i - lse)
    # carries the rounding of lse (|lse| eps32 relative), so the sum is off by ~|lse| eps32
    lse = torch.logsumexp(a[1].detach().double(), 0).abs().item()
    bound = 8 * torch.finfo(torch.float32).eps * max(1.0, lse)
    torch.testing.assert_close(a.grad[1].sum(), torch.tensor(0.0), atol=bound, rtol=0)


def test_opcheck():
    a, b = make_logits((5, 37))
    t = make_target((5,), 37)
    for args in [(a, b, t, 1.0, -100), (a.requires_grad_(), b.requires_grad_(), None, 0.7, -100)]:
        torch.library.opcheck(torch.ops.pyops.cross_view_kl_entropy_fwd.default, args)
    out = torch.ops.pyops.cross_view_kl_entropy_fwd(a.detach(), b.detach(), t, 1.3, -100)
    g = [torch.randn(5) for _ in range(5)]
    torch.library.opcheck(
        torch.ops.pyops.cross_view_kl_entropy_bwd.default,
        (*g, a.detach(), b.detach(), t, *out[:4], out[5], 1.3, -100),
    )


def test_torch_compile_fullgraph():
    a, b = make_logits((7, 129))
    t = make_target((7,), 129)

    def loss_fn(a, b, t):
        out = pyops.cross_view_kl_entropy(a, b, t, temperature=0.8)
        return out.ce_a.mean() - 0.1 * out.kl_ab.clamp(max=2.0).mean() + 0.05 * (out.entropy_a + out.kl_ba).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (loss_fn, compiled):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = f(a1, b1, t)
        loss.backward()
        results.append((loss.detach(), a1.grad, b1.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


def test_torch_compile_inductor_matches_eager():
    a, b = make_logits((3, 65))
    fn = torch.compile(lambda a, b: pyops.cross_view_kl_entropy(a, b).kl_ab * 2, fullgraph=True)
    torch.testing.assert_close(fn(a, b), pyops.cross_view_kl_entropy(a, b).kl_ab * 2)


def test_double_backward_is_refused():
    a, b = make_logits((2, 5), torch.float64)
    a.requires_grad_()
    out = pyops.cross_view_kl_entropy(a, b)
    (g,) = torch.autograd.grad(out.kl_ab.sum(), a, create_graph=True)
    with pytest.raises(Exception, match="double backward"):
        g.sum().backward()


# ---- bad inputs --------------------------------------------------------------------------
def _bad_cases():
    a, b = make_logits((3, 8))
    t = torch.tensor([0, 1, 2])
    return [
        ((a, b[:, :5]), {}, ValueError, "same shape"),
        ((a, b[:2]), {}, ValueError, "same shape"),
        ((a[:, :0], b[:, :0]), {}, ValueError, "V = logits_a.shape\\[-1\\] must be > 0"),
        ((a.long(), b.long()), {}, TypeError, "logits_a must be float"),
        ((a, b.long()), {}, TypeError, "logits_b must be float"),
        ((a, b.double()), {}, TypeError, "same dtype"),
        ((a, b, t.int()), {}, TypeError, "target must be int64"),
        ((a, b, t[:2]), {}, ValueError, "target must have the logits' leading shape"),
        ((a, b, torch.tensor([0, 8, 1])), {}, ValueError, "target\\[1\\] = 8 is out of range"),
        ((a, b, torch.tensor([0, -3, 1])), {}, ValueError, "target\\[1\\] = -3 is out of range"),
        ((a, b), {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ((a, b), {"temperature": -1.0}, ValueError, "temperature must be a finite number > 0"),
        ((a, b), {"temperature": float("inf")}, ValueError, "temperature"),
        ((a, b), {"temperature": torch.tensor(1.0)}, TypeError, "temperature must be a Python float"),
        ((a, b, t), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((a, b.to("meta")), {}, ValueError, "logits_b is on meta"),
        ((a, b, t.to("meta")), {}, ValueError, "target is on meta"),
        ((a[0, 0], b[0, 0]), {}, ValueError, "0-d"),
        (([1.0], b), {}, TypeError, "logits_a must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_clear_errors(case):
    args, kw, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        pyops.cross_view_kl_entropy(*args, **kw)


def test_raw_op_checks_target_range():
    """The CPU kernel itself refuses an out-of-range target (no out-of-bounds read)."""
    a, b = make_logits((3, 8))
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.pyops.cross_view_kl_entropy_fwd(a, b, torch.tensor([0, 100, 1]), 1.0, -100)
    with pytest.raises(ValueError, match="logits_b must have the shape of logits_a"):
        torch.ops.pyops.cross_view_kl_entropy_fwd(a, b[:, :3], None, 1.0, -100)
