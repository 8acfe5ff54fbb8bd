"""pyops.knn (exact k-NN of point sets, the patch search with 1 x 1 patches) against an exact
float64 oracle and pyops.reference.knn (CPU)."""

import pytest
import torch

import pyops
from pyops import reference

SIZES = [
    # (batch or None, M, N, D, k)
    (None, 37, 53, 5, 4),
    (None, 1, 1, 3, 1),
    (None, 129, 67, 33, 16),
    (None, 301, 517, 3, 7),  # several database chunks of the CPU search
    (3, 41, 29, 6, 5),
    (2, 1, 700, 2, 9),
]


def oracle(x, y, k, exclude_self=False):
    """float64 differences and a stable sort: exact distances, ties to the lower index."""
    d = ((x.double()[..., :, None, :] - y.double()[..., None, :, :]) ** 2).sum(-1)
    if exclude_self:
        d = d.masked_fill(torch.eye(d.shape[-1], dtype=torch.bool), float("inf"))
    order = d.sort(dim=-1, stable=True).indices[..., :k]
    return d.gather(-1, order), order


def points(batch, n, dim, dtype=torch.float32):
    shape = (n, dim) if batch is None else (batch, n, dim)
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-M{}-N{}-D{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_exact_oracle_and_reference(size, dtype):
    b, m, n, dim, k = size
    x, y = points(b, m, dim, dtype), points(b, n, dim, dtype)
    res = pyops.knn(x, y, k)
    assert isinstance(res, pyops.KNNResult)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lead = () if b is None else (b,)
    assert res.dists.shape == res.idx.shape == (*lead, m, k)
    assert res.dists.dtype == acc and res.idx.dtype == torch.int64
    od1, oi1 = oracle(x, y, min(k + 1, n))
    od, oi = od1[..., :k], oi1[..., :k]
    torch.testing.assert_close(res.dists.double(), od, rtol=2e-6 if acc == torch.float32 else 1e-12, atol=1e-5)
    # indices: equal wherever the neighbour is not (nearly) tied with the one before or after it
    # (a float32 sum of D <= 33 squares is within D * 2^-24 < 2e-6 of the exact one, relatively)
    far = torch.full_like(od1[..., :1], 1.0)
    steps = od1[..., 1:] - od1[..., :-1]
    gaps = torch.minimum(torch.cat([far, steps], -1), torch.cat([steps, far], -1))[..., :k]
    clear = gaps > 1e-5 * (1 + od)
    assert clear.float().mean() > 0.5  # mostly untied: the check has teeth
    assert (res.idx[clear] == oi[clear]).all()
    ref = reference.knn(x, y, k)
    torch.testing.assert_close(res.dists, ref.dists, rtol=1e-5, atol=1e-5 if acc == torch.float32 else 1e-12)
    assert (res.idx[clear] == ref.idx[clear]).all()


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("batch", [None, 2])
def test_ties_go_to_the_lower_index(exclude_self, batch):
    """Small-integer coordinates: exact distances, many duplicate points and equal distances."""
    shape = (70, 2) if batch is None else (batch, 70, 2)
    x = torch.randint(0, 3, shape).float()
    y = x if exclude_self else torch.randint(0, 3, shape[:-2] + (90, 2)).float()
    n = y.shape[-2]
    for k in (1, 6, n - int(exclude_self)):
        od, oi = oracle(x, y, k, exclude_self)
        res = pyops.knn(x, y, k, exclude_self=exclude_self)
        assert torch.equal(res.idx, oi)
        assert torch.equal(res.dists, od.float())
        ref = reference.knn(x, y, k, exclude_self=exclude_self)
        assert torch.equal(ref.idx, oi)
        assert torch.equal(ref.dists, od.float())


def test_exclude_self_skips_only_the_point_itself():
    x = torch.randn(40, 3)
    x[7] = x[20]  # a duplicate: each is the other's neighbour at distance 0
    res = pyops.knn(x, x, 5, exclude_self=True)
    assert not (res.idx == torch.arange(40)[:, None]).any()
    assert res.idx[7, 0] == 20 and res.idx[20, 0] == 7 and res.dists[7, 0] == 0 and res.dists[20, 0] == 0
    plain = pyops.knn(x, x, 1)
    assert torch.equal(plain.idx[:, 0], torch.where(torch.arange(40) == 20, 7, torch.arange(40)))


def test_half_precision_points():
    x, y = torch.randn(50, 7).half(), torch.randn(60, 7).half()
    res, ref = pyops.knn(x, y, 3), reference.knn(x, y, 3)
    assert res.dists.dtype == torch.float32
    torch.testing.assert_close(res.dists, ref.dists)


def test_nan_points_come_last():
    x, y = torch.randn(6, 3), torch.randn(8, 3)
    y[2, 1] = float("nan")
    res, ref = pyops.knn(x, y, 8), reference.knn(x, y, 8)
    assert (res.idx[:, -1] == 2).all() and torch.isnan(res.dists[:, -1]).all()
    assert torch.equal(res.idx, ref.idx)


def test_empty_sizes():
    res = pyops.knn(torch.randn(0, 3), torch.randn(4, 3), 2)
    assert res.dists.shape == res.idx.shape == (0, 2)
    res = pyops.knn(torch.randn(0, 3, 2), torch.randn(0, 4, 2), 2)
    assert res.dists.shape == (0, 3, 2)
    res = pyops.knn(torch.randn(3, 0), torch.randn(4, 0), 2)  # D = 0: every distance is 0
    assert torch.equal(res.dists, torch.zeros(3, 2)) and torch.equal(res.idx, torch.tensor([[0, 1]] * 3))
    for x, y in [(torch.randn(0, 3), torch.randn(4, 3)), (torch.randn(3, 0), torch.randn(4, 0))]:
        ref, res = reference.knn(x, y, 2), pyops.knn(x, y, 2)
        assert torch.equal(ref.idx, res.idx) and torch.equal(ref.dists, res.dists)
    # no query points: the (empty) distances still backpropagate, zero gradients
    for fn in (pyops.knn, reference.knn):
        x, y = torch.randn(0, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        fn(x, y, 2).dists.sum().backward()
        assert torch.equal(y.grad, torch.zeros(4, 3)) and x.grad.shape == (0, 3)


def test_gradcheck_float64():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: pyops.knn(x, y, 3).dists, (x, y))
    assert torch.autograd.gradcheck(lambda x: pyops.knn(x, x, 4, exclude_self=True).dists, (x,))
    xb = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    yb = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: pyops.knn(x, y, 2).dists, (xb, yb))


def test_gradients_match_reference():
    x = torch.randn(2, 30, 5, requires_grad=True)
    y = torch.randn(2, 45, 5, requires_grad=True)
    g = torch.randn(2, 30, 4)
    res, ref = pyops.knn(x, y, 4), reference.knn(x, y, 4)
    assert torch.equal(res.idx, ref.idx)  # random points: no ties
    grads = torch.autograd.grad((res.dists * g).sum(), (x, y))
    ref_grads = torch.autograd.grad((ref.dists * g).sum(), (x, y))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_both_query_layouts_agree():
    """CUDA tensors go to the op as a (B, D, 1, M) map, CPU ones as (B, D, M, 1): the same search
    (grid position = point index) either way; checked here through the CPU kernel."""
    x, y = torch.randn(2, 57, 6), torch.randn(2, 83, 6)
    a = torch.ops.pyops.knn_patch_search_fwd(
        x.transpose(1, 2)[..., None], y.transpose(1, 2)[..., None], 5, 1, 1, -1, False, []
    )
    b = torch.ops.pyops.knn_patch_search_fwd(
        x.transpose(1, 2)[:, :, None], y.transpose(1, 2)[:, :, None], 5, 1, 1, -1, False, []
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[1], pyops.knn(x, y, 5).idx)


@pytest.mark.triton_interpreter
@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)
def test_triton_kernel_in_the_cuda_layout():
    """The Triton kernel (CUDA tensors) on the (B, D, 1, M) maps pyops.knn gives it on CUDA,
    here under the Triton interpreter: the CPU kernel's neighbours, ties included."""
    from pyops import knn_patch

    if knn_patch.triton is None:
        pytest.skip("triton is not installed")
    cuda_layout = lambda p: p.transpose(1, 2).unsqueeze(2)
    x, y = torch.randn(2, 45, 5), torch.randn(2, 70, 5)
    dist, idx = knn_patch.triton_knn_patch_search_fwd(cuda_layout(x), cuda_layout(y), 6, 1, 1, -1, False, [])
    res = pyops.knn(x, y, 6)
    assert torch.equal(idx, res.idx)
    torch.testing.assert_close(dist, res.dists)
    xs = torch.randint(0, 3, (1, 40, 2)).float()
    dist, idx = knn_patch.triton_knn_patch_search_fwd(cuda_layout(xs), cuda_layout(xs), 7, 1, 1, -1, True, [])
    assert torch.equal(idx, oracle(xs, xs, 7, True)[1])


def _peak_rss_growth(fn) -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size

    def kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    base = kb("VmRSS")
    fn()
    return (kb("VmHWM") - base) * 1024


def test_memory_does_not_grow_with_m_times_n():
    """30000 x 30000 float32 distances would be 3.4 GiB; the search streams the database."""
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs (Linux)")
    x, y = torch.randn(30000, 8), torch.randn(30000, 8)
    pyops.knn(x[:100], y[:100], 4)  # lazy initialisation outside the measurement
    growth = _peak_rss_growth(lambda: pyops.knn(x, y, 4))
    assert growth < 256 * 2**20, f"peak resident memory grew by {growth / 2**20:.0f} MiB"


def test_compile_fullgraph():
    """Inductor around the op (forward and backward, strided inputs) and the reference."""
    x = torch.randn(4, 33, requires_grad=True)  # points x.t(): a strided (33, 4) view
    y = torch.randn(41, 4, requires_grad=True)
    f = lambda x, y: pyops.knn(x.t(), y, 3)
    eager, comp = f(x, y), torch.compile(f, fullgraph=True)(x, y)
    assert isinstance(comp, pyops.KNNResult)
    assert torch.equal(eager.idx, comp.idx) and torch.equal(eager.dists, comp.dists)
    for a, b in zip(torch.autograd.grad(eager.dists.sum(), (x, y)), torch.autograd.grad(comp.dists.sum(), (x, y))):
        torch.testing.assert_close(a, b)
    xs = torch.randint(0, 3, (30, 2)).float()
    ref = torch.compile(reference.knn, fullgraph=True, backend="aot_eager")(xs, xs, 4, exclude_self=True)
    assert torch.equal(ref.idx, oracle(xs, xs, 4, True)[1])


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(k=0), ValueError, "knn: k must be >= 1"),
        (dict(k=2.0), TypeError, "knn: k must be an int"),
        (dict(k=13), ValueError, r"k = 13 is larger than the number of candidates per query point \(12"),
        (dict(k=10, exclude_self=True, y=torch.randn(10, 3)), ValueError, r"candidates .* \(9: N = 10 less"),
        (dict(exclude_self=True), ValueError, "exclude_self needs as many query points as database points"),
        (dict(exclude_self=1), TypeError, "exclude_self must be a bool"),
        (dict(x=torch.randn(10)), ValueError, r"x must have shape \(M, D\)"),
        (dict(y=torch.randn(2, 3, 4, 5)), ValueError, r"y must have shape"),
        (dict(x=torch.randn(1, 10, 3)), ValueError, "both be batched"),
        (dict(y=torch.randn(12, 4)), ValueError, "same dimension D"),
        (dict(x=torch.randn(2, 10, 3), y=torch.randn(3, 12, 3)), ValueError, "same batch size B"),
        (dict(y=torch.randn(12, 3).double()), TypeError, "same dtype"),
        (dict(x=torch.zeros(10, 3, dtype=torch.long)), TypeError, "knn: x must be float"),
        (dict(y=[[0.0, 1.0, 2.0]]), TypeError, "knn: y must be a torch.Tensor"),
        (dict(y=torch.randn(12, 3, device="meta")), ValueError, "y is on meta"),
    ],
)
def test_bad_inputs(kwargs, exc, msg):
    args = dict(x=torch.randn(10, 3), y=torch.randn(12, 3), k=3)
    args.update(kwargs)
    x, y, k = args.pop("x"), args.pop("y"), args.pop("k")
    with pytest.raises(exc, match=msg):
        pyops.knn(x, y, k, **args)
