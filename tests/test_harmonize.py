"""pyops.harmonize_gradients against pyops.reference.harmonize_gradients (CPU)."""

import pytest
import torch

import pyops
from pyops import reference


def conflicting(K, D, dtype, g=None):
    """Gradients with many conflicts: a shared direction plus large per-row noise, some rows flipped."""
    base = torch.randn(D, generator=g, dtype=torch.float64)
    x = 0.3 * base + torch.randn(K, D, generator=g, dtype=torch.float64)
    x[::3] *= -1
    return x.to(dtype)


def close(a, b, dtype):
    a, b = (torch.cat(list(t), -1) if isinstance(t, (list, tuple)) else t for t in (a, b))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a.double() - b.double()).abs().max() / scale) <= tol, (
        (a.double() - b.double()).abs().max() / scale
    ).item()


@pytest.mark.parametrize("mode", ["fedgh", "pcgrad"])
@pytest.mark.parametrize("K,D", [(1, 7), (2, 33), (5, 1001), (9, 4), (13, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_reference(mode, K, D, dtype, reduction):
    x = conflicting(K, D, dtype)
    w = torch.rand(K, dtype=torch.float64)
    order = torch.randperm(K)
    kw = dict(weights=w, mode=mode, order=order, reduction=reduction)
    out, stats = pyops.harmonize_gradients(x, generator=torch.Generator().manual_seed(3), return_stats=True, **kw)
    ref, (n_ref, cos_ref) = reference.harmonize_gradients(
        x, generator=torch.Generator().manual_seed(3), return_stats=True, **kw
    )
    assert out.dtype == dtype and out.shape == ref.shape
    close(out, ref, dtype)
    assert stats.num_conflicts == n_ref
    # float32 rows: the CPU Gram sums float32 products over runs of 64 per lane, then in float64
    ctol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(stats.cosine, cos_ref, rtol=ctol, atol=ctol)
    if K > 4:
        assert stats.num_conflicts > 0  # the test data does conflict


def test_blocks_equal_flat_and_no_copy_needed():
    x = conflicting(11, 3001, torch.float64)
    parts = [x[:, :1000].contiguous(), x[:, 1000:1001].contiguous(), x[:, 1001:].contiguous()]
    for mode in ("fedgh", "pcgrad"):
        for reduction in ("sum", "none"):
            g = lambda: torch.Generator().manual_seed(0)
            flat = pyops.harmonize_gradients(x, mode=mode, reduction=reduction, generator=g())
            blocks = pyops.harmonize_gradients(parts, mode=mode, reduction=reduction, generator=g())
            assert isinstance(blocks, list) and len(blocks) == 3
            torch.testing.assert_close(torch.cat(blocks, -1), flat, rtol=1e-13, atol=1e-13)


def test_only_order_matters():
    """Relabelling the rows (and the order with them) relabels the result; nothing else changes it."""
    K = 9
    x = conflicting(K, 300, torch.float64)
    order = torch.randperm(K)
    out = pyops.harmonize_gradients(x, order=order, reduction="none")
    perm = torch.randperm(K)  # row r of the new input is old row perm[r]
    inv = torch.argsort(perm)
    out2 = pyops.harmonize_gradients(x[perm], order=inv[order], reduction="none")
    torch.testing.assert_close(out2, out[perm], rtol=1e-12, atol=1e-12)
    # and the order does matter
    rev = pyops.harmonize_gradients(x, order=order.flip(0), reduction="none")
    assert (rev - out).abs().max() > 1e-6


def test_scale_equivariance():
    K = 8
    x = conflicting(K, 500, torch.float64)
    c = torch.rand(K, dtype=torch.float64) * 10 + 0.1
    for mode in ("fedgh", "pcgrad"):
        g = lambda: torch.Generator().manual_seed(1)
        a = pyops.harmonize_gradients(c[:, None] * x, mode=mode, reduction="none", generator=g())
        b = c[:, None] * pyops.harmonize_gradients(x, mode=mode, reduction="none", generator=g())
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_zero_rows_and_rank_deficient():
    x = conflicting(6, 4, torch.float64)  # D < K
    x[2] = 0
    x[4] = -x[1]  # exactly opposite rows
    for mode in ("fedgh", "pcgrad"):
        out = pyops.harmonize_gradients(x, mode=mode, reduction="none", generator=torch.Generator().manual_seed(0))
        ref = reference.harmonize_gradients(x, mode=mode, reduction="none", generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all()
        assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_projection_removes_conflicts_with_originals_for_two_rows():
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    out = pyops.harmonize_gradients(x, reduction="none")
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    assert (out[0] @ x[1]).abs() < 1e-15 and (out[1] @ x[0]).abs() < 1e-15


def test_default_weights_and_empty():
    x = conflicting(4, 10, torch.float32)
    torch.testing.assert_close(pyops.harmonize_gradients(x), pyops.harmonize_gradients(x, reduction="none").mean(0))
    assert pyops.harmonize_gradients(torch.zeros(3, 0)).shape == (0,)
    assert pyops.harmonize_gradients(torch.zeros(0, 5), reduction="none").shape == (0, 5)
    torch.testing.assert_close(pyops.harmonize_gradients(torch.zeros(0, 5)), torch.zeros(5))


def test_gram_is_deterministic_across_thread_counts():
    x = conflicting(7, 100_003, torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.ops.pyops.harmonize_gram([x])
        torch.set_num_threads(max(2, n))
        b = torch.ops.pyops.harmonize_gram([x])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
    exact = x.double() @ x.double().t()
    norms = exact.diagonal().sqrt()
    # relative to |g_i| |g_j|: float32 products summed in float32 over at most 64 terms per lane
    assert ((a - exact).abs() / (norms[:, None] * norms[None, :])).max() < 1e-6
    xd = x.double()
    assert torch.equal(torch.ops.pyops.harmonize_gram([xd]), torch.ops.pyops.harmonize_gram([xd]))
    torch.testing.assert_close(torch.ops.pyops.harmonize_gram([xd]), xd @ xd.t(), rtol=1e-12, atol=1e-9)


def test_opcheck():
    x = conflicting(5, 40, torch.float32)
    blocks = [x[:, :17].contiguous(), x[:, 17:].contiguous()]
    torch.library.opcheck(torch.ops.pyops.harmonize_gram, (blocks,))
    gram = torch.ops.pyops.harmonize_gram(blocks)
    torch.library.opcheck(
        torch.ops.pyops.harmonize_coefficients, (gram, torch.arange(5), torch.empty(0, 0, dtype=torch.long), "fedgh")
    )
    torch.library.opcheck(torch.ops.pyops.harmonize_combine, (blocks, torch.rand(2, 5, dtype=torch.float64)))


def test_compile_fullgraph_of_the_kernels():
    x = conflicting(6, 50, torch.float32)
    order = torch.arange(6)
    visit = torch.empty(0, 0, dtype=torch.long)

    def f(x):
        gram = torch.ops.pyops.harmonize_gram([x])
        coef = torch.ops.pyops.harmonize_coefficients(gram, order, visit, "fedgh")
        return torch.ops.pyops.harmonize_combine([x], coef)[0]

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
    torch.testing.assert_close(f(x), pyops.harmonize_gradients(x, reduction="none"))


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda x: pyops.harmonize_gradients([x, torch.zeros(3, 5)]), ValueError, r"grads\[1\] has K = 3 rows"),
        (lambda x: pyops.harmonize_gradients(x, weights=torch.ones(3)), ValueError, r"weights must have shape \(K,\)"),
        (lambda x: pyops.harmonize_gradients(x, order=[0, 1, 2, 2]), ValueError, "order must be a permutation"),
        (lambda x: pyops.harmonize_gradients(x, order=[0, 1, 2]), ValueError, "order must be a permutation"),
        (lambda x: pyops.harmonize_gradients(x, mode="mgda"), ValueError, "mode must be one of"),
        (lambda x: pyops.harmonize_gradients(x, reduction="mean"), ValueError, "reduction must be one of"),
        (lambda x: pyops.harmonize_gradients(x.half()), TypeError, "float32 or float64"),
        (lambda x: pyops.harmonize_gradients(x[0]), ValueError, r"shape \(K, D\)"),
        (lambda x: pyops.harmonize_gradients([x, x.double()]), TypeError, "has dtype"),
        (lambda x: pyops.harmonize_gradients([x, x.to("meta")]), ValueError, "one device"),
        (lambda x: pyops.harmonize_gradients([]), TypeError, "non-empty list"),
    ],
)
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(torch.randn(4, 5))


def test_nonfinite_gradients_raise_naming_a_row():
    x = torch.randn(4, 50)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*first bad row: 2"):
        pyops.harmonize_gradients(x)
    x[2, 7] = float("inf")
    with pytest.raises(ValueError, match="first bad row: 2"):
        pyops.harmonize_gradients(x)


def test_kernel_checks_without_the_python_layer():
    with pytest.raises(ValueError, match=r"order must be a permutation .* order\[1\] = 0 repeats"):
        torch.ops.pyops.harmonize_coefficients(
            torch.eye(3, dtype=torch.float64), torch.tensor([0, 0, 1]), torch.empty(0, 0, dtype=torch.long), "fedgh"
        )
    with pytest.raises(ValueError, match=r"visit row 1 .* visit\[1, 0\] = 1 is the row itself"):
        torch.ops.pyops.harmonize_coefficients(
            torch.eye(3, dtype=torch.float64), torch.arange(3), torch.tensor([[1, 2], [1, 0], [0, 1]]), "pcgrad"
        )
    with pytest.raises(ValueError, match=r"coef must have shape \(R, K\)"):
        torch.ops.pyops.harmonize_combine([torch.zeros(3, 4)], torch.zeros(1, 2, dtype=torch.float64))
