"""Triton kernels on the CPU under the Triton interpreter.

Run in a process of its own: `TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py -m
triton_interpreter` (`make test` does it); the variable must be set before triton is imported,
so in the main test run this module is skipped. Small grids; fp32 and fp16 (bf16 is loaded and
cast to fp32 in the kernels, which the interpreter supports) and fp64.
"""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
    ),
]

triton = pytest.importorskip("triton")

import pyops  # noqa: E402,F401  (registers the ops)
from pyops import cross_view_kl as cvk  # noqa: E402
from pyops import reference  # noqa: E402

FIELDS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")


@pytest.fixture(params=[None, 64], ids=["block=auto", "block=64"])
def block(request, monkeypatch):
    """block=64 forces several blocks per row, exercising the online rescaling."""
    if request.param is not None:
        monkeypatch.setattr(cvk, "_triton_launch_config", lambda vocab: (request.param, 4))
    return request.param


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_target", [False, True])
def test_triton_kernels_match_reference(block, shape, dtype, temperature, with_target):
    n, vocab = shape
    a = (torch.randn(shape) * 3).to(dtype)
    b = (a.float() + torch.randn(shape)).to(dtype)
    t = None
    if with_target:
        t = torch.randint(0, vocab, (n,))
        t[0] = -100
    kl_ab, kl_ba, ent_a, ent_b, ce, lse = cvk.triton_cross_view_kl_entropy_fwd(a, b, t, temperature, -100)
    out = dict(kl_ab=kl_ab, kl_ba=kl_ba, entropy_a=ent_a, entropy_b=ent_b, ce_a=ce if t is not None else None)
    ref = reference.cross_view_kl_entropy(a, b, t, temperature=temperature)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in FIELDS:
        r = getattr(ref, name)
        if r is None:
            continue
        torch.testing.assert_close(out[name], r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))
    # backward with random upstream gradients against autograd through the reference
    grads = [torch.randn(n, dtype=kl_ab.dtype) for _ in range(5)]
    if t is None:
        grads[4] = None
    ga, gb = cvk.triton_cross_view_kl_entropy_bwd(*grads, a, b, t, kl_ab, kl_ba, ent_a, ent_b, lse, temperature, -100)
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    r2 = reference.cross_view_kl_entropy(a2, b2, t, temperature=temperature)
    loss = sum((o * g).sum() for o, g in zip(r2, grads) if g is not None)
    ra, rb = torch.autograd.grad(loss, (a2, b2))
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, r in ((ga, ra), (gb, rb)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=gtol, atol=gtol * max(1.0, r.float().abs().max().item()))


def test_triton_large_magnitude_and_nan_rows(block):
    a = torch.randn(4, 200) * 2500
    b = a + torch.randn(4, 200) * 100 + 1e4
    a[2, 5] = float("nan")
    kl_ab, kl_ba, ent_a, ent_b, _, _ = cvk.triton_cross_view_kl_entropy_fwd(a, b, None, 1.0, -100)
    ref = reference.cross_view_kl_entropy(a.double(), b.double())
    ok = torch.tensor([True, True, False, True])
    assert torch.isnan(kl_ab[2]) and torch.isnan(ent_a[2]) and torch.isfinite(ent_b).all()
    torch.testing.assert_close(kl_ab[ok].double(), ref.kl_ab[ok], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(ent_a[ok].double(), ref.entropy_a[ok], rtol=1e-4, atol=1e-3)


def test_triton_launcher_checks_target_range():
    a = torch.randn(3, 10)
    with pytest.raises(ValueError, match="target\\[2\\] = 10 is out of range"):
        cvk.triton_cross_view_kl_entropy_fwd(a, a, torch.tensor([0, 1, 10]), 1.0, -100)


def test_triton_empty_rows():
    a = torch.randn(0, 10)
    outs = cvk.triton_cross_view_kl_entropy_fwd(a, a, None, 1.0, -100)
    assert outs[0].shape == (0,)


# ---- GR loss ------------------------------------------------------------------------------
import importlib  # noqa: E402

grl = importlib.import_module("pyops.gr_loss")  # the module (pyops.gr_loss is also the function)


@pytest.mark.parametrize("shape", [(1, 1), (5, 13), (3, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "setting",
    [((0.0, -2.0), (0.5, 2.0), 0.01, 1.0), ((1.5, -1.0), (0.6, 0.7), 0.7, 0.3), ((-3.0, 0.5), (0.1, 0.2), 0.0, 0.0)],
    ids=["voc", "mid", "q0"],
)
def test_triton_gr_loss_matches_reference(shape, dtype, reduction, setting):
    beta, alpha, q2, q3 = setting
    z = (torch.randn(shape) * 4).to(dtype)
    z.view(-1)[0] = 40.0
    o = torch.rand(shape) < 0.2
    o[:, 0] = True
    params = torch.tensor([*beta, *alpha], dtype=torch.float64)
    out = grl.triton_gr_loss_fwd(z, o, params, q2, q3, reduction)
    zr = z.clone().requires_grad_()
    ref = reference.gr_loss(zr, o, beta, alpha, q2, q3, reduction=reduction)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
    up = torch.randn(ref.shape, dtype=ref.dtype)
    g = grl.triton_gr_loss_bwd(up, z, o, params, q2, q3, reduction)
    (gr,) = torch.autograd.grad(ref, zr, up)
    assert g.dtype == dtype
    gtol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    sub = 2 * 2.0**-24 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(
        g.double(), gr.double(), rtol=0 if gtol < 1e-4 else gtol, atol=gtol * max(gr.abs().max().item(), 1e-30) + sub
    )


def test_triton_gr_loss_empty_and_nan():
    params = torch.tensor([0.0, -2.0, 0.5, 2.0], dtype=torch.float64)
    z = torch.zeros(0, 5)
    assert torch.isnan(grl.triton_gr_loss_fwd(z, z, params, 0.01, 1.0, "mean"))
    assert grl.triton_gr_loss_fwd(z, z, params, 0.01, 1.0, "sum").item() == 0.0
    z = torch.randn(2, 9)
    z[1, 4] = float("nan")
    o = torch.zeros(2, 9)
    out = grl.triton_gr_loss_fwd(z, o, params, 0.01, 1.0, "none")
    assert torch.isnan(out[1, 4]) and torch.isfinite(out[0]).all()


# ---- diagonal statistics ------------------------------------------------------------------
dsm = importlib.import_module("pyops.diagonal_stats")


@pytest.mark.parametrize("B,T,K", [(1, 2, 1), (2, 9, 8), (3, 140, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_triton_diagonal_stats_matches_reference(B, T, K, dtype):
    S = (torch.randn(B, T, T) + 0.5).to(dtype)
    mean, std = dsm.triton_diagonal_stats_fwd(S, K)
    Sr = S.clone().requires_grad_()
    rm, rs = reference.diagonal_stats(Sr, K)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(mean, rm, rtol=tol, atol=tol)
    torch.testing.assert_close(std, rs, rtol=max(tol, 1e-12) if dtype == torch.float64 else 1e-5, atol=tol)
    gm, gs = torch.randn_like(mean), torch.randn_like(std)
    g = dsm.triton_diagonal_stats_bwd(gm, gs, S, mean, std)
    (gr,) = torch.autograd.grad((rm * gm).sum() + (rs * gs).sum(), Sr)
    assert g.dtype == dtype and g.shape == S.shape
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(g.double(), gr.double(), rtol=gtol, atol=gtol * gr.abs().max().item())


@pytest.mark.parametrize("T", [2, 140])
def test_triton_diagonal_stats_std_gradient_when_std_is_far_below_the_mean(T):
    # entries 3 + 1e-4 noise: the float32 mean is off by up to 1e-3 of the deviations; the
    # kernels' correction (sums of S - mean around the first mean) restores them (see
    # test_diagonal_stats.py)
    S64 = 3.0 + 1e-4 * torch.randn(2, T, T, dtype=torch.float64)
    S = S64.float()
    mean, std = dsm.triton_diagonal_stats_fwd(S, T - 1)
    Sr = S.double().requires_grad_()
    rm, rs = reference.diagonal_stats(Sr, T - 1)
    # the forward too: float32 statistics around the first pass's mean (a plain two-pass std
    # lost up to 5% here, on the short diagonals whose few entries nearly agree)
    torch.testing.assert_close(mean.double(), rm, rtol=1e-6, atol=0)
    torch.testing.assert_close(std.double(), rs, rtol=1e-5, atol=0)
    gs = torch.randn_like(rs)
    g = dsm.triton_diagonal_stats_bwd(torch.zeros_like(std), gs.float(), S, mean, std)
    (gr,) = torch.autograd.grad((rs * gs).sum(), Sr)
    torch.testing.assert_close(g.double(), gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())
