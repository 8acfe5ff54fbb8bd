"""pyops.diagonal_stats against the official double-loop definition and the vectorised reference
(CPU; the Triton kernels: test_triton_interpret.py)."""

import pytest
import torch

import pyops
from pyops import reference

TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-12}


def make_maps(B, T, dtype=torch.float32, offset=0.0):
    """Cosine self-similarity maps plus noise (so that no diagonal, the main one included, is
    constant: the std's gradient is ill-conditioned there) and an offset."""
    x = torch.randn(B, T, 5)
    x = x / x.norm(dim=-1, keepdim=True)
    return (x @ x.transpose(1, 2) + 0.1 * torch.randn(B, T, T) + offset).to(dtype)


@pytest.mark.parametrize("B,T,K", [(1, 2, 1), (3, 7, None), (2, 33, 20), (4, 50, 0), (2, 301, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference_and_gradients(B, T, K, dtype):
    S = make_maps(B, T, dtype)
    S1 = S.clone().requires_grad_()
    mean, std = pyops.diagonal_stats(S1, K)
    rm, rs = reference.diagonal_stats(S, K)
    Kn = T - 1 if K is None else K
    assert mean.shape == std.shape == (B, Kn)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mean, rm, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(std, rs, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=TOL[dtype])
    if Kn == 0:
        return
    gm, gs = torch.randn_like(mean), torch.randn_like(std)
    (g,) = torch.autograd.grad((mean * gm).sum() + (std * gs).sum(), S1)
    # the oracle: the reference in float64 on the same values (the float32 reference's own error
    # grows like eps |mean| / std, unbounded where a diagonal's entries nearly agree, e.g. T = 2)
    S3 = S.double().requires_grad_()
    dm, ds = reference.diagonal_stats(S3, K)
    (gr,) = torch.autograd.grad((dm * gm.double()).sum() + (ds * gs.double()).sum(), S3)
    assert g.dtype == dtype
    # the op's gradient: float64 statistics, then A + C (S - mean) in float32 (float64 for
    # float64) rounded to the maps' dtype: a few ulps of the largest term, 1 ulp of the output type
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol * gr.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_std_gradient_keeps_its_digits_when_std_is_far_below_the_mean(dtype):
    # diagonals of entries 3 + 1e-4 noise: the float32-rounded mean is off by up to 1.2e-7, 1e-3 of
    # the deviations S - mean; a backward that took the saved mean as exact lost those digits
    # (relative error ~1e-3; CI caught it at 9e-5 on a T = 2 map whose two entries agreed to 1e-3)
    B, T = 3, 17
    S = (3.0 + 1e-4 * torch.randn(B, T, T, dtype=torch.float64)).to(dtype)
    S1, S2 = S.clone().requires_grad_(), S.double().requires_grad_()
    mean, std = pyops.diagonal_stats(S1)
    dm, ds = reference.diagonal_stats(S2)
    gs = torch.randn_like(ds)
    (g,) = torch.autograd.grad((std * gs.to(std.dtype)).sum(), S1)
    (gr,) = torch.autograd.grad((ds * gs).sum(), S2)
    # S - mean is exact in float32 here (Sterbenz: S within a factor 2 of the pivot), so the
    # gradient is a few float32 ulps of itself
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol * gr.abs().max().item())


def test_matches_the_double_loop_definition():
    S = make_maps(2, 23, torch.float64, offset=0.3)
    mean, std = pyops.diagonal_stats(S)
    lm, ls = reference.diagonal_stats_loop(S)
    torch.testing.assert_close(mean, lm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(std, ls, rtol=1e-12, atol=1e-14)
    # by hand, lag 3 of map 1
    d = torch.stack([S[1, i, i + 3] for i in range(20)])
    assert mean[1, 3].item() == pytest.approx(d.mean().item())
    assert std[1, 3].item() == pytest.approx(d.std(unbiased=True).item())


def test_single_map_and_only_upper_diagonals():
    S = make_maps(1, 12)[0]
    mean, std = pyops.diagonal_stats(S, 5)
    assert mean.shape == (5,)
    S2 = S.clone()
    S2[torch.tril_indices(12, 12, -1).unbind()] = 1e6  # below the diagonal: never read
    torch.testing.assert_close(pyops.diagonal_stats(S2, 5)[0], mean)
    S.requires_grad_()
    (g,) = torch.autograd.grad(pyops.diagonal_stats(S, 5)[0].sum(), S)
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert (g[(j - i < 0) | (j - i >= 5)] == 0).all() and (g[(j - i >= 0) & (j - i < 5)] != 0).all()


def test_constant_diagonal_has_zero_std_and_zero_std_gradient():
    S = torch.ones(1, 6, 6, dtype=torch.float64, requires_grad=True)
    mean, std = pyops.diagonal_stats(S)
    assert (std == 0).all() and (mean == 1).all()
    (g,) = torch.autograd.grad(std.sum(), S)
    assert torch.isfinite(g).all() and (g == 0).all()


def test_torch_func_transforms():
    """jacrev / vmap / grad see through the op (it runs the reference's PyTorch ops there, since
    torch.func cannot differentiate a torch.library autograd registration): same values and
    gradients as the op under ordinary autograd, constant diagonals included."""
    from torch.func import grad, jacrev, vmap

    S = make_maps(3, 9, torch.float64)
    S[1, 0, 2] = S[1, 1, 3] = S[1, 2, 4] = S[1, 3, 5] = S[1, 4, 6] = S[1, 5, 7] = S[1, 6, 8] = 0.25  # lag 2: constant
    w = torch.randn(3, 8, dtype=torch.float64)

    def per_map(S):
        mean, std = pyops.diagonal_stats(S)
        return (mean * w).sum(1) + (std * w).sum(1) ** 2

    J = jacrev(per_map)(S)
    S1 = S.clone().requires_grad_()
    out = per_map(S1)
    for b in range(3):
        (g,) = torch.autograd.grad(out[b], S1, retain_graph=True)
        torch.testing.assert_close(J[b], g, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(J).all()
    g1 = grad(lambda s: pyops.diagonal_stats(s)[1].sum())(S[1])  # a single (T, T) map
    (g2,) = torch.autograd.grad(pyops.diagonal_stats(S1[1])[1].sum(), S1)
    torch.testing.assert_close(g1, g2[1], rtol=1e-10, atol=1e-12)
    mean_v, std_v = vmap(pyops.diagonal_stats)(S)
    mean, std = pyops.diagonal_stats(S)
    torch.testing.assert_close(mean_v, mean)
    torch.testing.assert_close(std_v, std)


def test_gradcheck_float64():
    S = make_maps(2, 9, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pyops.diagonal_stats(x, 7), (S,))
    assert torch.autograd.gradcheck(lambda x: pyops.diagonal_stats(x)[1], (S,))


def test_opcheck():
    S = make_maps(3, 11).requires_grad_()
    torch.library.opcheck(torch.ops.pyops.diagonal_stats_fwd.default, (S, 8))
    mean, std = pyops.diagonal_stats(S.detach(), 8)
    torch.library.opcheck(
        torch.ops.pyops.diagonal_stats_bwd.default,
        (torch.randn_like(mean), torch.randn_like(std), S.detach(), mean, std),
    )


def test_torch_compile_fullgraph():
    S = make_maps(2, 15)

    def f(x):
        m, s = pyops.diagonal_stats(x * 2, 10)
        return m.sum() + s.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = []
    for fn in (f, compiled):
        x = S.clone().requires_grad_()
        y = fn(x)
        y.backward()
        out.append((y.detach(), x.grad))
    torch.testing.assert_close(out[0], out[1])


def test_empty_batch_and_no_lags():
    m, s = pyops.diagonal_stats(torch.zeros(0, 5, 5))
    assert m.shape == (0, 4)
    m, s = pyops.diagonal_stats(torch.randn(2, 5, 5), 0)
    assert m.shape == s.shape == (2, 0)


@pytest.mark.parametrize(
    "maps,kw,exc,msg",
    [
        ([[1.0]], {}, TypeError, "maps must be a torch.Tensor"),
        (torch.zeros(3, 4, 5), {}, ValueError, r"\(B, T, T\)"),
        (torch.zeros(2, 3, 3, 3), {}, ValueError, r"\(B, T, T\)"),
        (torch.zeros(2, 1, 1), {}, ValueError, "at least 2 x 2"),
        (torch.zeros(2, 4, 4, dtype=torch.long), {}, TypeError, "float"),
        (torch.zeros(2, 4, 4), {"num_lags": 4}, ValueError, r"num_lags must be in \[0, T - 1\]"),
        (torch.zeros(2, 4, 4), {"num_lags": 2.0}, TypeError, "num_lags must be an int"),
        (torch.zeros(2, 4, 4), {"num_lags": -1}, ValueError, "num_lags"),
    ],
)
def test_bad_inputs(maps, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        pyops.diagonal_stats(maps, **kw)
