"""pyops.knn_patch_search and pyops.patch_aggregate against pyops.reference (CPU).

The float32 GEMM tiles of the search run the AVX-512 micro-kernel on the avx512 path and BLAS on
the avx2 and baseline paths: `make test` runs this file on every path the CPU has
(PYOPS_CPU_ISA). The global float32 search on the avx512 path screens its candidates with AMX
bf16 tiles where the CPU has them, else the float32 micro-kernel (PYOPS_KNN_SCREEN picks one);
the section "global search screens" runs every screen this CPU has and asks for bit-equal
results."""

import pytest
import torch
import torch.nn.functional as F

import pyops
from pyops import reference

CONFIGS = [
    # (query shape, database shape, patch, stride, window, exclude_self)
    ((2, 3, 20, 17), (2, 3, 20, 17), 3, 3, None, False),  # global, non-overlapping
    ((1, 4, 23, 19), (1, 4, 23, 19), 3, 1, None, True),  # global, dense, exclude self
    ((2, 3, 20, 17), (2, 3, 11, 14), 3, 1, 5, False),  # windowed, half-resolution database
    ((1, 2, 30, 31), (1, 2, 30, 31), 3, 1, 7, True),  # windowed dense, self excluded (direct path)
    ((1, 5, 40, 38), (1, 5, 40, 38), 2, 2, 9, False),  # windowed, strided (tiled path)
    ((1, 3, 44, 41), (1, 3, 23, 20), 2, 1, 33, False),  # window > 32 (tiled path), multi-scale
    ((1, 3, 12, 13), (1, 3, 9, 30), 3, 1, 50, False),  # window larger than the grid = global
    ((1, 2, 9, 40), (1, 2, 9, 40), 4, 1, 6, False),  # a grid with 6 rows: windows at the borders
    ((1, 1, 41, 29), (1, 1, 39, 31), 2, 1, None, False),  # global, several chunks and partial panels
]


def patches(x, patch_size, stride):
    """(B, L, C * p * p): the patches of x, row-major over the patch grid (the op's indexing)."""
    return F.unfold(x, patch_size, stride=stride).transpose(1, 2)


def oracle(query, database, k, patch_size, stride, window, exclude_self):
    """float64 distances by direct differences + stable sort: exact values, ties to the lower index."""
    q, d = patches(query.double(), patch_size, stride), patches(database.double(), patch_size, stride)
    full = ((q[:, :, None, :] - d[:, None, :, :]) ** 2).sum(-1)  # (B, Lq, Ld)
    qgrid = reference.patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = reference.patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    cand = reference.window_candidates(qgrid, dgrid, window if window is not None else 1 << 30)
    dist = full.gather(2, cand.expand(full.shape[0], -1, -1))
    if exclude_self:
        dist = dist.masked_fill(cand == torch.arange(cand.shape[0])[:, None], float("inf"))
    order = dist.sort(dim=-1, stable=True).indices[..., :k]
    return dist.gather(2, order), cand.expand(full.shape[0], -1, -1).gather(2, order)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0][2]}x{c[0][3]}-p{c[2]}s{c[3]}w{c[4]}x{int(c[5])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 4])
def test_matches_exact_oracle_and_reference(config, dtype, k):
    qs, ds, p, s, w, ex = config
    query = torch.randn(qs).to(dtype)
    database = query if ex else torch.randn(ds).to(dtype)
    dist, idx = pyops.knn_patch_search(query, database, k, patch_size=p, stride=s, window=w, exclude_self=ex)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert dist.dtype == acc and idx.dtype == torch.int64
    assert (
        dist.shape
        == idx.shape
        == (qs[0], reference.patch_grid(qs[2], qs[3], p, s)[0] * reference.patch_grid(qs[2], qs[3], p, s)[1], k)
    )
    # one neighbour more than asked: the k-th is only unambiguous if the (k+1)-th is not tied with it
    od1, oi1 = oracle(query, database, k + 1, p, s, w, ex)
    od, oi = od1[..., :k], oi1[..., :k]
    torch.testing.assert_close(dist.double(), od, rtol=2e-6 if acc == torch.float32 else 1e-12, atol=1e-5)
    # indices: equal wherever the neighbour is not (nearly) tied with another candidate, before or after it
    far = torch.full_like(od1[..., :1], 1.0)
    steps = od1[..., 1:] - od1[..., :-1]
    gaps = torch.minimum(torch.cat([far, steps], -1), torch.cat([steps, far], -1))[..., :k]
    clear = gaps > 1e-3
    assert clear.float().mean() > 0.5  # mostly untied: the check has teeth
    assert (idx[clear] == oi[clear]).all()
    # and the fp32 pure-PyTorch reference agrees on the distances
    rd, _ = reference.knn_patch_search(query, database, k, patch_size=p, stride=s, window=w, exclude_self=ex)
    torch.testing.assert_close(dist, rd, rtol=1e-4, atol=1e-3 if dtype != torch.float64 else 1e-8)


@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("stride", [1, 3])
def test_ties_go_to_the_lower_index(window, stride):
    """Small-integer maps (exact distances) with many duplicate patches."""
    query = torch.randint(0, 2, (2, 2, 27, 25)).float()
    database = torch.randint(0, 2, (2, 2, 27, 25)).float()
    for k in (1, 6):
        dist, idx = pyops.knn_patch_search(query, database, k, patch_size=3, stride=stride, window=window)
        od, oi = oracle(query, database, k, 3, stride, window, False)
        assert torch.equal(dist.double(), od)
        assert torch.equal(idx, oi)


ANCHORS = [
    ((1, 0, 2, 4), (1, 0, 2, 4)),  # MSGNN's i // 2 - s // scale: the window ends before i // 2
    ((3, 1, 2, -1), (0, 4, 1, 2)),  # steeper than the grid (clamped at the end); a fixed column start
    ((1, 0, 1, 0), (2, 1, 3, 1)),
]


@pytest.mark.parametrize("anchor", ANCHORS, ids=["msgnn", "steep-fixed", "misc"])
@pytest.mark.parametrize(
    "p,s,w,shape_d",
    [(1, 1, 5, (2, 3, 17, 19)), (3, 3, 4, (2, 3, 21, 24)), (2, 1, 33, (2, 3, 40, 37))],
    ids=["direct", "tiled", "wide"],
)
def test_window_anchor_matches_oracle(anchor, p, s, w, shape_d):
    query, database = torch.randn(2, 3, 23, 20), torch.randn(shape_d)
    qgrid = reference.patch_grid(23, 20, p, s)
    dgrid = reference.patch_grid(shape_d[2], shape_d[3], p, s)
    cand = reference.window_candidates(qgrid, dgrid, w, window_anchor=anchor)
    r0 = reference._window_starts(qgrid[0], dgrid[0], w, "cpu", anchor[0])[0]
    num, off, den, shift = anchor[0]
    if w < dgrid[0]:  # the rows really follow the anchor
        i = torch.arange(qgrid[0])
        assert torch.equal(r0, ((num * i + off) // den - shift).clamp(0, dgrid[0] - w))
    full = ((patches(query.double(), p, s)[:, :, None, :] - patches(database.double(), p, s)[:, None, :, :]) ** 2).sum(
        -1
    )
    od = full.gather(2, cand.expand(2, -1, -1))
    vals, order = od.sort(dim=-1, stable=True)
    oi = cand.expand(2, -1, -1).gather(2, order[..., :4])
    dist, idx = pyops.knn_patch_search(query, database, 4, patch_size=p, stride=s, window=w, window_anchor=anchor)
    torch.testing.assert_close(dist.double(), vals[..., :4], rtol=2e-6, atol=1e-5)
    # indices: equal wherever the oracle distance is clear of the ones before and after it by more
    # than the distance tolerance above (~1e-4); a near-tie may go either way
    gap = 1e-3
    prev = torch.cat([vals[..., :1] - 2 * gap, vals[..., :3]], -1)
    untied = ((vals[..., :4] - prev) > gap) & ((vals[..., 1:5] - vals[..., :4]) > gap)
    assert untied.float().mean() > 0.5  # random data: mostly untied, the check has teeth
    assert torch.equal(idx[untied], oi[untied])
    rd, ri = reference.knn_patch_search(query, database, 4, patch_size=p, stride=s, window=w, window_anchor=anchor)
    torch.testing.assert_close(dist, rd, rtol=1e-4, atol=1e-3)


def test_window_anchor_default_equals_centred_rule():
    q, d = torch.randn(1, 2, 25, 22), torch.randn(1, 2, 16, 13)
    qg, dg = reference.patch_grid(25, 22, 3, 1), reference.patch_grid(16, 13, 3, 1)
    centred = ((2 * (dg[0] - 1), qg[0] - 1, 2 * (qg[0] - 1), 2), (2 * (dg[1] - 1), qg[1] - 1, 2 * (qg[1] - 1), 2))
    a = pyops.knn_patch_search(q, d, 3, patch_size=3, stride=1, window=5)
    b = pyops.knn_patch_search(q, d, 3, patch_size=3, stride=1, window=5, window_anchor=centred)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_exclude_self_never_returns_self():
    x = torch.zeros(1, 1, 12, 12)  # every patch equal: self would win every tie
    dist, idx = pyops.knn_patch_search(x, x, 3, patch_size=3, stride=1, window=5, exclude_self=True)
    assert not (idx == torch.arange(idx.shape[1])[None, :, None]).any()
    dist, idx = pyops.knn_patch_search(x, x, 3, patch_size=3, stride=1, exclude_self=True)
    assert not (idx == torch.arange(idx.shape[1])[None, :, None]).any()


def test_k_equal_to_all_candidates():
    q, d = torch.randn(1, 2, 9, 9), torch.randn(1, 2, 9, 9)
    n = reference.patch_grid(9, 9, 3, 3)
    dist, idx = pyops.knn_patch_search(q, d, n[0] * n[1], patch_size=3)
    assert torch.equal(idx.sort(-1).values, torch.arange(9).expand(1, 9, 9))


def test_nan_rows_do_not_crash():
    q, d = torch.randn(1, 2, 9, 9), torch.randn(1, 2, 9, 9)
    d[0, 0, 0, 0] = float("nan")
    dist, idx = pyops.knn_patch_search(q, d, 9, patch_size=3)
    assert ((idx >= 0) & (idx < 9)).all()
    assert torch.isnan(dist[..., -1]).all()  # the NaN patch sorts last


def test_gradcheck_float64():
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    d = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    f = lambda q, d: pyops.knn_patch_search(q, d, 3, patch_size=2, stride=1, window=4)[0]
    assert torch.autograd.gradcheck(f, (q, d))


def test_backward_matches_reference():
    q = torch.randn(2, 3, 14, 13, requires_grad=True)
    d = torch.randn(2, 3, 14, 13, requires_grad=True)
    g = torch.randn(2, 16, 4)
    dist, idx = pyops.knn_patch_search(q, d, 4, patch_size=3, stride=3)
    gq, gd = torch.autograd.grad((dist * g).sum(), (q, d))
    # the reference distances of the op's own neighbours: where two candidates nearly tie, the
    # float32 |q|^2 + |d|^2 - 2 q.d of the reference's top-k can rank them the other way, and
    # the gradient would then land on another patch (an O(1) difference that says nothing)
    Pq, Pd = patches(q, 3, 3), patches(d, 3, 3)  # (B, 16, 27)
    rd = ((Pq[:, :, None] - Pd[torch.arange(2)[:, None, None], idx]) ** 2).sum(-1)
    torch.testing.assert_close(rd, dist, rtol=1e-4, atol=1e-4)
    ref_dist, _ = reference.knn_patch_search(q, d, 4, patch_size=3, stride=3)
    torch.testing.assert_close(ref_dist, dist, rtol=1e-4, atol=1e-4)  # a near-tie swap keeps the values
    rq, rdd = torch.autograd.grad((rd * g).sum(), (q, d))
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gd, rdd, rtol=1e-4, atol=1e-4)


def test_empty_batch():
    q = torch.randn(0, 2, 9, 9)
    dist, idx = pyops.knn_patch_search(q, q, 2, patch_size=3)
    assert dist.shape == (0, 9, 2)


def test_opcheck():
    q = torch.randn(1, 2, 9, 10, requires_grad=True)
    d = torch.randn(1, 2, 8, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.pyops.knn_patch_search_fwd.default, (q, d, 3, 3, 1, 4, False))
    torch.library.opcheck(torch.ops.pyops.knn_patch_search_fwd.default, (q, d, 2, 2, 2, -1, False))
    torch.library.opcheck(
        torch.ops.pyops.knn_patch_search_fwd.default, (q, d, 3, 3, 1, 4, False, [1, 0, 2, 1, 2, 1, 3, 0])
    )
    dist, idx = torch.ops.pyops.knn_patch_search_fwd(q.detach(), d.detach(), 3, 3, 1, 4, False)
    torch.library.opcheck(
        torch.ops.pyops.knn_patch_search_bwd.default, (torch.randn_like(dist), q.detach(), d.detach(), idx, 3, 1)
    )
    v = torch.randn(1, 4, 8, 9, requires_grad=True)
    w = torch.randn(idx.shape, requires_grad=True)
    torch.library.opcheck(torch.ops.pyops.patch_aggregate_fwd.default, (v, idx, w, 3, 1, 9, 10))
    out = torch.ops.pyops.patch_aggregate_fwd(v.detach(), idx, w.detach(), 3, 1, 9, 10)
    torch.library.opcheck(
        torch.ops.pyops.patch_aggregate_bwd.default, (torch.randn_like(out), v.detach(), idx, w.detach(), 3, 1)
    )


def test_compile_fullgraph():
    q, d = torch.randn(1, 2, 12, 12), torch.randn(1, 2, 12, 12)
    v = torch.randn(1, 3, 12, 12)

    def f(q, d, v):
        dist, idx = pyops.knn_patch_search(q, d, 3, patch_size=3, window=3)
        w = torch.softmax(-dist, -1)
        return pyops.patch_aggregate(v, idx, w, patch_size=3, output_size=(12, 12))

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, d, v), f(q, d, v))


# ---- patch_aggregate --------------------------------------------------------------------
@pytest.mark.parametrize("p,s", [(3, 3), (3, 1), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregate_matches_reference(p, s, dtype):
    out_size = (13, 11)
    qgrid = reference.patch_grid(*out_size, p, s)
    values = torch.randn(2, 4, 9, 10, dtype=dtype, requires_grad=True)
    dgrid = reference.patch_grid(9, 10, p, s)
    idx = torch.randint(0, dgrid[0] * dgrid[1], (2, qgrid[0] * qgrid[1], 3))
    weights = torch.randn(idx.shape, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 4, *out_size, dtype=dtype)
    res = []
    for f in (pyops.patch_aggregate, reference.patch_aggregate):
        out = f(values, idx, weights, patch_size=p, stride=s, output_size=out_size)
        res.append((out, *torch.autograd.grad((out * g).sum(), (values, weights))))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y)


def test_aggregate_gradcheck():
    values = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 20, (1, 20, 3))
    weights = torch.randn(1, 20, 3, dtype=torch.float64, requires_grad=True)
    f = lambda v, w: pyops.patch_aggregate(v, idx, w, patch_size=2, stride=1, output_size=(5, 6))
    assert torch.autograd.gradcheck(f, (values, weights))


# ---- bad inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=100), ValueError, "k = 100 is larger than the number of candidates"),
        (dict(patch_size=30), ValueError, "patch_size 30 is larger than query"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(window=0), ValueError, "window must be >= 1"),
        (dict(database=torch.randn(1, 3, 12, 12)), ValueError, "same batch size B and channel count C"),
        (dict(database=torch.randn(2, 2, 12, 12)), ValueError, "same batch size B and channel count C"),
        (dict(database=torch.randn(1, 2, 12, 12).double()), TypeError, "same dtype"),
        (dict(query=torch.randn(2, 12, 12)), ValueError, "query must have shape \\(B, C, H, W\\)"),
        (dict(query=torch.zeros(1, 2, 12, 12, dtype=torch.long)), TypeError, "query must be float"),
        (dict(database=torch.randn(1, 2, 12, 12, device="meta")), ValueError, "database is on meta"),
        (dict(exclude_self=True, database=torch.randn(1, 2, 9, 9)), ValueError, "exclude_self needs"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(window_anchor=((1, 0, 2, 3), (1, 0, 2, 3))), ValueError, "window_anchor needs a window"),
        (dict(window=3, window_anchor=((1, 0, 2, 3),)), TypeError, "window_anchor must be"),
        (dict(window=3, window_anchor=((1, 0, 2, 3), (1, 0, 2.0, 3))), TypeError, "window_anchor must be"),
        (dict(window=3, window_anchor=((1, 0, 0, 3), (1, 0, 2, 3))), ValueError, "1 <= den"),
        (dict(window=3, window_anchor=((1, 0, 2, 3), (-1, 0, 2, 3))), ValueError, "window_anchor of columns"),
    ],
)
def test_search_bad_inputs(kwargs, exc, msg):
    args = dict(query=torch.randn(1, 2, 12, 12), database=torch.randn(1, 2, 12, 12), k=3)
    args.update(kwargs)
    q, d, k = args.pop("query"), args.pop("database"), args.pop("k")
    with pytest.raises(exc, match=msg):
        pyops.knn_patch_search(q, d, k, **args)


@pytest.mark.parametrize(
    "mutate,exc,msg",
    [
        (lambda a: a.update(idx=a["idx"] + 100), ValueError, "idx contains"),
        (lambda a: a.update(idx=a["idx"] - 100), ValueError, "idx contains"),
        (lambda a: a.update(idx=a["idx"].int()), TypeError, "idx must be an int64"),
        (lambda a: a.update(weights=a["weights"][:, :, :1]), ValueError, "weights must have the shape of idx"),
        (lambda a: a.update(weights=a["weights"].double()), TypeError, "weights must have the dtype of values"),
        (lambda a: a.update(output_size=(15, 12)), ValueError, "patch grid"),
        (lambda a: a.update(output_size=(2, 2)), ValueError, "larger than output_size"),
        (lambda a: a.update(values=a["values"][:1]), ValueError, "batch size"),
    ],
)
def test_aggregate_bad_inputs(mutate, exc, msg):
    a = dict(
        values=torch.randn(2, 3, 9, 9),
        idx=torch.randint(0, 9, (2, 16, 2)),
        weights=torch.randn(2, 16, 2),
        output_size=(12, 12),
    )
    mutate(a)
    with pytest.raises(exc, match=msg):
        pyops.patch_aggregate(a["values"], a["idx"], a["weights"], patch_size=3, output_size=a["output_size"])


def test_double_backward_is_refused():
    q = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    dist, _ = pyops.knn_patch_search(q, q.detach(), 2)
    (g,) = torch.autograd.grad(dist.sum(), q, create_graph=True)
    with pytest.raises(Exception, match="double backward"):
        g.sum().backward()


# ---- global search screens ------------------------------------------------------------------
# On the avx512 path the global float32 search screens candidates with AMX bf16 tiles, the
# AVX-512 bf16 dot product or the float32 micro-kernel, keeps every candidate within the screen's
# rounding-error bound of the k-th and re-ranks those by exact differences: the result must be
# the same, bit for bit, as that of the windowed path's tiles (a window larger than the grid is a
# global search there), which every screen's bound must guarantee.
SCREENS = pyops._C._knn_screens()
BIG = 1 << 20  # a window larger than any grid here: the same search through the windowed tiles


def _search(screen, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("PYOPS_KNN_SCREEN", screen)
    return pyops.knn_patch_search(*args, **kwargs)


def _assert_same(a, b):
    assert torch.equal(a[1], b[1])
    assert torch.equal(a[0].isnan(), b[0].isnan())
    assert torch.equal(a[0].nan_to_num(), b[0].nan_to_num())


def test_screens_listed():
    assert SCREENS[-1] == "fp32" and set(SCREENS) <= {"amx", "avx512bf16", "fp32"}
    if pyops.get_cpu_isa() != "avx512":
        assert SCREENS == ("fp32",)


SCREEN_CONFIGS = [
    # (query shape, database shape, patch, stride, exclude_self, k): patch lengths e = 45 (not a
    # multiple of 32), 64 (one that is) and 27; > 256 queries (several sub-tiles) and a partial
    # last 32-candidate block; a batch of 2
    ((2, 5, 37, 41), (2, 5, 31, 44), 3, 3, False, 5),
    ((1, 16, 40, 35), (1, 16, 40, 35), 2, 1, True, 4),
    ((1, 3, 61, 53), (1, 3, 58, 47), 3, 2, False, 1),
    ((1, 3, 16, 16), (1, 3, 16, 16), 3, 1, True, 195),  # k = every candidate
]


@pytest.mark.parametrize("screen", ("auto",) + SCREENS)
@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
@pytest.mark.parametrize("config", SCREEN_CONFIGS, ids=lambda c: f"{c[0][1]}x{c[0][2]}x{c[0][3]}-p{c[2]}s{c[3]}k{c[5]}")
def test_screens_match_windowed_tiles_and_oracle(screen, smooth, config, monkeypatch):
    """ "auto" picks a bf16 screen (where the CPU has one) for noise, whose neighbours are about as
    far as the patches are large, and the fp32 screen for smooth maps (a ramp plus weak noise)."""
    qs, ds, p, s, ex, k = config

    def make(shape):
        x = torch.randn(shape)
        if smooth:
            ramp = torch.linspace(0, 4, shape[-1])
            x = 0.01 * x + ramp + torch.arange(shape[1])[:, None, None].float()
        return x

    query = make(qs)
    database = query if ex else make(ds)
    kw = dict(patch_size=p, stride=s, exclude_self=ex)
    got = _search(screen, monkeypatch, query, database, k, **kw)
    _assert_same(got, pyops.knn_patch_search(query, database, k, window=BIG, **kw))
    od, _ = oracle(query, database, k, p, s, None, ex)
    # float32 differences and sums of e <= 64 squares against float64: relative error
    # <= (e + 3) 2^-24 (< 1e-5) of the sum of squares, plus the differences' rounding, at most
    # 2^-24 |q - d| (|q| + |d|) per term: < 1e-5 of max |q|^2 + max |d|^2 (the ramps' norms)
    norms = [patches(x, p, s).pow(2).sum(-1).max().item() for x in (query, database)]
    torch.testing.assert_close(got[0].double(), od, rtol=1e-5, atol=1e-5 * sum(norms))


@pytest.mark.parametrize("screen", SCREENS)
def test_screens_ties_go_to_the_lower_index(screen, monkeypatch):
    """Small-integer maps: exact distances (float32 sums of small integers), many ties, some
    within every screen's rounding of the k-th."""
    query = torch.randint(0, 3, (2, 4, 33, 29)).float()
    database = torch.randint(0, 3, (2, 4, 35, 31)).float()
    for k, s in ((1, 1), (6, 2), (9, 3)):
        got = _search(screen, monkeypatch, query, database, k, patch_size=3, stride=s)
        od, oi = oracle(query, database, k, 3, s, None, False)
        assert torch.equal(got[0].double(), od)
        assert torch.equal(got[1], oi)


@pytest.mark.parametrize("screen", SCREENS)
def test_screens_give_up_on_inseparable_candidates(screen, monkeypatch):
    """A constant map: every candidate ties (4899 of them, more than a kept list holds: 4096),
    so every query gives up its list for the direct scan; ties to the lowest indices."""
    x = torch.full((1, 1, 70, 70), 0.75)
    dist, idx = _search(screen, monkeypatch, x, x, 3, patch_size=1, stride=1, exclude_self=True)
    assert torch.equal(dist, torch.zeros_like(dist))
    first = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2]])
    assert torch.equal(idx[0, [0, 1, 2, 3, 4899]], first)


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("case", ["nan", "nan_query", "inf", "huge", "large", "small", "tiny", "mixed"])
def test_screens_non_finite_and_extreme_values(screen, case, monkeypatch):
    """NaN or inf patches (a database with a non-finite norm is scanned directly; a NaN query
    alone is), values whose squares overflow float32 (1e19), large (1e17) and small (1e-15)
    values that the screens' relative bound must handle, subnormal products (1e-22) and a mix
    of scales: the same answers as the windowed tiles."""
    g = torch.Generator().manual_seed(3)
    query, database = torch.randn(1, 3, 30, 31, generator=g), torch.randn(1, 3, 29, 33, generator=g)
    scale = {"huge": 1e19, "large": 1e17, "small": 1e-15, "tiny": 1e-22}.get(case, 1.0)
    query, database = query * scale, database * scale
    if case == "nan":
        query[0, 1, 5, 5] = float("nan")
        database[0, 2, 8, 9] = float("nan")
    elif case == "nan_query":
        query[0, 1, 5, 5] = float("nan")
    elif case == "inf":
        database[0, 0, 7, 7] = float("inf")
    elif case == "mixed":
        database[0, :, :10] *= 1e6
        query[0, :, 20:] *= 1e-6
    kw = dict(patch_size=3, stride=1)
    got = _search(screen, monkeypatch, query, database, 3, **kw)
    _assert_same(got, pyops.knn_patch_search(query, database, 3, window=BIG, **kw))


@pytest.mark.parametrize("screen", SCREENS)
def test_screens_ties_of_inexact_values(screen, monkeypatch):
    """Thirds (inexact in float32 and bf16) on small grids: many duplicate patches, so many
    exactly equal distances, and near-ties within the bf16 rounding."""
    query = torch.randint(0, 3, (1, 6, 40, 37)).float() / 3
    database = torch.randint(0, 3, (1, 6, 38, 41)).float() / 3
    kw = dict(patch_size=2, stride=1)
    got = _search(screen, monkeypatch, query, database, 7, **kw)
    _assert_same(got, pyops.knn_patch_search(query, database, 7, window=BIG, **kw))


def test_screen_env_is_validated(monkeypatch):
    monkeypatch.setenv("PYOPS_KNN_SCREEN", "gpu")
    q = torch.randn(1, 2, 12, 12)
    if pyops.get_cpu_isa() == "avx512":
        with pytest.raises(ValueError, match="PYOPS_KNN_SCREEN must be auto, amx, avx512bf16 or fp32"):
            pyops.knn_patch_search(q, q, 2, patch_size=3)
    monkeypatch.setenv("PYOPS_KNN_SCREEN", "auto")
    pyops.knn_patch_search(q, q, 2, patch_size=3)
