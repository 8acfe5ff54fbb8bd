"""Triton kernels of the k-NN patch search and patch aggregation on the CPU, under the Triton
interpreter.

Run in a process of its own: `TRITON_INTERPRET=1 pytest tests/test_knn_patch_triton.py -m
triton_interpreter`; the variable must be set before triton is imported, so in the main test run
this module is skipped. The launchers are called directly on small CPU tensors and checked
against an exact float64 oracle (direct differences, stable sort: ties to the lower index), the
reference (`pyops.reference`) and autograd through the reference.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
    ),
]

triton = pytest.importorskip("triton")

import pyops  # noqa: E402
from pyops import reference  # noqa: E402

if not hasattr(torch.ops.pyops, "knn_patch_search_fwd"):
    pytest.skip("pyops._C was built without the knn_patch schemas; rebuild the extension", allow_module_level=True)

from pyops import knn_patch as kp  # noqa: E402

LOW = (torch.float16, torch.bfloat16)


def _small_config(op, k, e, dtype):
    """Small tiles: several programs per image, several candidate tiles per program, a short
    running list (margin 2) and odd chunkings of the patch elements."""
    if op == "knn_fwd":
        kpad = max(2, triton.next_power_of_2(k + 2))
        return dict(BQH=2, BQW=4, BN=max(kpad, 16), KP=kpad, BE=8, BER=4, num_warps=4, LIB_TOPK=False)
    if op in ("knn_bwd", "agg_bwd"):
        return dict(BL=8, BE=8, num_warps=4)
    return dict(BC=2, BPIX=16, num_warps=4)


@pytest.fixture(params=["default", "small"])
def config(request, monkeypatch):
    if request.param == "small":
        monkeypatch.setattr(kp, "_triton_launch_config", _small_config)
    return request.param


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(kp, "_triton_launch_config", _small_config)


@pytest.fixture
def fallback_rows(monkeypatch):
    """Records the (batch, position) rows that the guard sent to the exact fallback."""
    rows = []
    orig = kp._knn_exact_rows

    def spy(query, database, b_idx, l_idx, *args):
        rows.extend(zip(b_idx.tolist(), l_idx.tolist()))
        return orig(query, database, b_idx, l_idx, *args)

    monkeypatch.setattr(kp, "_knn_exact_rows", spy)
    return rows


# --------------------------------------------------------------------------------------------
# Oracle and checks
# --------------------------------------------------------------------------------------------
def _grid(x, p, s):
    return reference.patch_grid(x.shape[-2], x.shape[-1], p, s)


def _candidates(q, d, p, s, window, exclude_self):
    qgrid, dgrid = _grid(q, p, s), _grid(d, p, s)
    n_q = qgrid[0] * qgrid[1]
    if window is None:
        cand = torch.arange(dgrid[0] * dgrid[1]).expand(n_q, -1)
    else:
        cand = reference.window_candidates(qgrid, dgrid, window)
    if exclude_self:
        keep = cand != torch.arange(n_q)[:, None]
        cand = cand[keep].view(n_q, -1)
    return cand


def _oracle(q, d, p, s, window, exclude_self):
    """All candidates of every query sorted by the exact float64 distance (stable: ties to the
    lower index): (B, Lq, n) distances and positions."""
    qv = F.unfold(q.double(), p, stride=s).transpose(1, 2)
    dv = F.unfold(d.double(), p, stride=s).transpose(1, 2)
    cand = _candidates(q, d, p, s, window, exclude_self)
    dist = (qv[:, :, None, :] - dv[:, cand, :]).square().sum(-1)
    vals, order = torch.sort(dist, dim=-1, stable=True)
    return vals, cand.expand(q.shape[0], -1, -1).gather(2, order)


def _check_knn(dist, idx, q, d, k, p, s, window, exclude_self, exact=False):
    n_b = q.shape[0]
    qgrid = _grid(q, p, s)
    assert dist.shape == idx.shape == (n_b, qgrid[0] * qgrid[1], k)
    assert dist.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert idx.dtype == torch.int64
    vals, oidx = _oracle(q, d, p, s, window, exclude_self)
    if exact:  # exactly representable distances: values and indices (ties to the lower index) must match
        assert torch.equal(idx, oidx[..., :k])
        assert torch.equal(dist.double(), vals[..., :k])
        return
    scale = max(1.0, vals.abs().max().item())
    tol = (1e-10 if q.dtype == torch.float64 else 2e-5) * scale
    torch.testing.assert_close(dist.double(), vals[..., :k], rtol=0, atol=tol)
    # every returned index is a distinct candidate of its query, at its oracle distance
    cand = _candidates(q, d, p, s, window, exclude_self)
    member = (idx[..., :, None] == cand[None, :, None, :]).any(-1)
    assert member.all()
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    qv = F.unfold(q.double(), p, stride=s).transpose(1, 2)
    dv = F.unfold(d.double(), p, stride=s).transpose(1, 2)
    own = (qv[:, :, None, :] - dv[torch.arange(n_b)[:, None, None], idx]).square().sum(-1)
    torch.testing.assert_close(own, vals[..., :k], rtol=0, atol=tol)
    # indices match exactly wherever the oracle distance is not (nearly) tied with a neighbour
    gap = 5 * tol
    padded = torch.cat([vals[..., :1] - 2 * gap, vals, vals[..., -1:] + 2 * gap], -1)
    untied = ((padded[..., 1:-1] - padded[..., :-2]) > gap) & ((padded[..., 2:] - padded[..., 1:-1]) > gap)
    untied = untied[..., :k]
    assert untied.float().mean() > 0.5  # the data are mostly untied: the check has teeth
    assert torch.equal(idx[untied], oidx[..., :k][untied])


def _rand(shape, dtype):
    return torch.randn(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# knn_patch_search_fwd
# --------------------------------------------------------------------------------------------
# (query (C, H, W), database (H, W), patch_size, stride, window, exclude_self, k)
SEARCH_CASES = {
    "global-s1": ((3, 9, 10), (8, 9), 3, 1, None, False, 4),
    "global-s=p-self": ((2, 12, 10), (12, 10), 2, 2, None, True, 5),
    "window3-borders-self": ((2, 9, 11), (9, 11), 2, 1, 3, True, 3),
    "window-multiscale": ((3, 14, 14), (8, 8), 2, 2, 2, False, 3),
    "window>grid-one-axis": ((1, 8, 16), (7, 12), 2, 1, 7, False, 6),
    "window>grid": ((2, 8, 8), (6, 6), 2, 1, 9, False, 4),
    "k=1-window": ((2, 10, 9), (10, 9), 3, 1, 5, True, 1),
    "k=all-window": ((2, 9, 9), (9, 9), 2, 1, 3, True, 8),
    "k=all-global": ((1, 6, 6), (6, 4), 2, 2, None, False, 6),
    "query-1-row": ((2, 3, 12), (9, 12), 3, 1, 3, False, 2),
}


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_knn_search_fwd_matches_oracle(config, case):
    (c, h, w), (hd, wd), p, s, window, excl, k = SEARCH_CASES[case]
    q = torch.randn(2, c, h, w)
    d = torch.randn(2, c, hd, wd)
    if excl:
        d = q + 0.7 * torch.randn_like(q)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, k, p, s, -1 if window is None else window, excl)
    _check_knn(dist, idx, q, d, k, p, s, window, excl)
    # against the reference itself (expansion + topk): same distances up to rounding
    rd, _ = reference.knn_patch_search(q, d, k, patch_size=p, stride=s, window=window, exclude_self=excl)
    torch.testing.assert_close(dist, rd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("anchor", [[1, 0, 2, 2, 1, 0, 2, 2], [3, 1, 2, -1, 0, 4, 1, 1]])
def test_knn_search_window_anchor(small, anchor):
    q, d = torch.randn(2, 3, 13, 11), torch.randn(2, 3, 12, 14)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 3, 2, 1, 4, False, anchor)
    qg, dg = _grid(q, 2, 1), _grid(d, 2, 1)
    cand = reference.window_candidates(qg, dg, 4, window_anchor=(anchor[:4], anchor[4:]))
    qv = F.unfold(q.double(), 2, stride=1).transpose(1, 2)
    dv = F.unfold(d.double(), 2, stride=1).transpose(1, 2)
    full = (qv[:, :, None, :] - dv[:, cand, :]).square().sum(-1)
    vals, order = torch.sort(full, dim=-1, stable=True)
    torch.testing.assert_close(dist.double(), vals[..., :3], rtol=1e-5, atol=1e-4)
    # indices: equal wherever the oracle distance is clear of its neighbours in the sorted list by
    # more than the distance tolerance above (~3.4e-4 at |d| ~ 24); a near-tie may go either way
    gap = 1e-3
    padded = torch.cat([vals[..., :1] - 2 * gap, vals], -1)
    untied = ((padded[..., 1:4] - padded[..., :3]) > gap) & ((vals[..., 1:4] - vals[..., :3]) > gap)
    assert untied.float().mean() > 0.5  # random data: mostly untied, the check has teeth
    assert torch.equal(idx[untied], cand.expand(2, -1, -1).gather(2, order[..., :3])[untied])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("window", [None, 3])
def test_knn_search_fwd_dtypes(small, dtype, window):
    q = _rand((2, 2, 9, 9), dtype)
    d = _rand((2, 2, 8, 10), dtype)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 3, 2, 1, -1 if window is None else window, False)
    _check_knn(dist, idx, q, d, 3, 2, 1, window, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("window,excl", [(None, False), (3, True)])
def test_knn_search_ties_go_to_lower_index(config, dtype, window, excl):
    # small integers: every distance is exact in every dtype, and many are tied
    q = torch.randint(0, 2, (2, 1, 8, 8)).to(dtype)
    d = q.clone()
    d[:, :, ::3] = 1 - d[:, :, ::3]
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 4, 2, 1, -1 if window is None else window, excl)
    _check_knn(dist, idx, q, d, 4, 2, 1, window, excl, exact=True)


def test_knn_search_guard_all_tied(small, fallback_rows):
    # identical database patches: every distance is tied, no list of KP < candidates can be
    # proven right, every query must take the exact path and get the lowest indices
    q = torch.randn(2, 2, 8, 8)
    d = torch.ones(2, 2, 8, 8)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 3, 2, 2, -1, True)
    assert len(fallback_rows) == 2 * 16
    vals, oidx = _oracle(q, d, 2, 2, None, True)
    assert torch.equal(idx, oidx[..., :3])
    torch.testing.assert_close(dist.double(), vals[..., :3], rtol=1e-6, atol=1e-6)


def test_knn_search_guard_some_rows(small, fallback_rows):
    # query patch 0 (far from all the others) has 6 exact copies in the database (distance 0),
    # more than the running list holds (k = 2, KP = 4): that query must be flagged, the others
    # not all; the answer is the two lowest copies
    q = torch.randn(1, 2, 8, 8)
    q[:, :, 0:2, 0:2] += 20.0
    d = torch.randn(1, 2, 8, 8)
    copies = [(0, 3), (1, 1), (2, 0), (2, 2), (3, 1), (3, 3)]  # database grid (4 x 4) positions
    for r, c in copies:
        d[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = q[:, :, 0:2, 0:2]
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 2, 2, 2, -1, False)
    assert (0, 0) in fallback_rows
    assert len(fallback_rows) < 16
    assert idx[0, 0].tolist() == [3, 5] and dist[0, 0].tolist() == [0.0, 0.0]
    vals, oidx = _oracle(q, d, 2, 2, None, False)
    torch.testing.assert_close(dist.double(), vals[..., :2], rtol=0, atol=1e-4)


def test_knn_search_guard_cancellation(config, fallback_rows):
    # a large common offset: |q|^2 + |d|^2 - 2 q.d loses every digit of the small distances,
    # the guard must notice and the exact path must still find the true neighbours
    q = 300.0 + 0.01 * torch.randn(1, 2, 8, 8)
    d = 300.0 + 0.01 * torch.randn(1, 2, 8, 8)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 3, 3, 1, -1, False)
    assert len(fallback_rows) == 36
    vals, oidx = _oracle(q, d, 3, 1, None, False)
    torch.testing.assert_close(dist.double(), vals[..., :3], rtol=1e-5, atol=1e-9)
    assert torch.equal(idx, oidx[..., :3])


def test_knn_search_random_data_rarely_flagged(fallback_rows):
    q = torch.randn(2, 3, 12, 12)
    d = torch.randn(2, 3, 12, 12)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 5, 3, 1, -1, False)
    assert len(fallback_rows) <= 2
    _check_knn(dist, idx, q, d, 5, 3, 1, None, False)


def test_knn_search_library_topk(monkeypatch):
    # the tl.topk path used on GPUs (slow under the interpreter: one tiny program)
    def cfg(op, k, e, dtype):
        return dict(BQH=4, BQW=4, BN=16, KP=8, BE=8, BER=4, num_warps=4, LIB_TOPK=True)

    monkeypatch.setattr(kp, "_triton_launch_config", cfg)
    q = torch.randn(1, 2, 8, 8)
    d = torch.randn(1, 2, 10, 10)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 3, 2, 2, -1, False)
    _check_knn(dist, idx, q, d, 3, 2, 2, None, False)


def test_knn_search_noncontiguous_and_empty(small):
    q = torch.randn(2, 2, 9, 8).transpose(2, 3)
    d = torch.randn(2, 2, 9, 8).transpose(2, 3)
    dist, idx = kp.triton_knn_patch_search_fwd(q, d, 2, 2, 2, 3, False)
    _check_knn(dist, idx, q, d, 2, 2, 2, 3, False)
    dist, idx = kp.triton_knn_patch_search_fwd(q[:0], d[:0], 2, 2, 2, -1, False)
    assert dist.shape == idx.shape == (0, 16, 2)
    # no channels: every distance is 0, the lowest candidates win
    dist, idx = kp.triton_knn_patch_search_fwd(q[:, :0], d[:, :0], 3, 2, 2, 3, True)
    assert dist.shape == (2, 16, 3) and (dist == 0).all()
    assert torch.equal(idx, _candidates(q, d, 2, 2, 3, True)[None, :, :3].expand(2, -1, -1))


def test_knn_search_validation():
    q = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match="window"):
        kp.triton_knn_patch_search_fwd(q, q, 2, 2, 2, 0, False)
    with pytest.raises(ValueError, match="k = 9"):
        kp.triton_knn_patch_search_fwd(q, q, 9, 2, 2, -1, True)
    with pytest.raises(TypeError, match="dtype"):
        kp.triton_knn_patch_search_fwd(q, q.double(), 2, 2, 2, -1, False)
    with pytest.raises(ValueError, match="exclude_self"):
        kp.triton_knn_patch_search_fwd(q, torch.randn(1, 2, 8, 8), 2, 2, 2, -1, True)


# --------------------------------------------------------------------------------------------
# knn_patch_search_bwd
# --------------------------------------------------------------------------------------------
GTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,s", [(3, 1), (2, 2), (2, 3)])
def test_knn_search_bwd_matches_autograd(config, dtype, p, s):
    q = _rand((2, 2, 10, 9), dtype)
    d = _rand((2, 2, 8, 11), dtype)
    q2, d2 = q.clone().requires_grad_(), d.clone().requires_grad_()
    rd, ridx = reference.knn_patch_search(q2, d2, 3, patch_size=p, stride=s)
    g = torch.randn(rd.shape, dtype=rd.dtype)
    rq, rdb = torch.autograd.grad((rd * g).sum(), (q2, d2))
    gq, gd = kp.triton_knn_patch_search_bwd(g, q, d, ridx, p, s)
    assert gq.dtype == gd.dtype == dtype and gq.shape == q.shape and gd.shape == d.shape
    tol = GTOL[dtype]
    for got, want in ((gq, rq), (gd, rdb)):
        torch.testing.assert_close(
            got.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.double().abs().max().item())
        )


def test_knn_search_bwd_checks():
    q = torch.randn(1, 2, 6, 6)
    idx = torch.zeros(1, 9, 2, dtype=torch.int64)
    g = torch.randn(1, 9, 2)
    idx[0, 4, 1] = 9
    with pytest.raises(ValueError, match="idx"):
        kp.triton_knn_patch_search_bwd(g, q, q, idx, 2, 2)
    idx[0, 4, 1] = -1
    with pytest.raises(ValueError, match="idx"):
        kp.triton_knn_patch_search_bwd(g, q, q, idx, 2, 2)
    with pytest.raises(ValueError, match="grad_dist"):
        kp.triton_knn_patch_search_bwd(g[:, :, :1], q, q, idx.clamp(0), 2, 2)
    gq, gd = kp.triton_knn_patch_search_bwd(g[:0], q[:0], q[:0], idx[:0], 2, 2)
    assert gq.shape == (0, 2, 6, 6) and gd.shape == (0, 2, 6, 6)


# --------------------------------------------------------------------------------------------
# patch_aggregate_fwd / _bwd
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,s", [(3, 1), (2, 2), (2, 3), (3, 2)])
def test_patch_aggregate_matches_reference(config, dtype, p, s):
    out_h, out_w = 10, 9
    values = _rand((2, 3, 8, 11), dtype)
    qgrid, dgrid = reference.patch_grid(out_h, out_w, p, s), _grid(values, p, s)
    k = 3
    idx = torch.randint(0, dgrid[0] * dgrid[1], (2, qgrid[0] * qgrid[1], k))
    weights = _rand(idx.shape, dtype)
    out = kp.triton_patch_aggregate_fwd(values, idx, weights, p, s, out_h, out_w)
    assert out.dtype == dtype and out.shape == (2, 3, out_h, out_w)
    v2, w2 = values.double().requires_grad_(), weights.double().requires_grad_()
    ref = reference.patch_aggregate(v2, idx, w2, patch_size=p, stride=s, output_size=(out_h, out_w))
    tol = GTOL[dtype]
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol * scale)
    # backward with a random upstream gradient against autograd through the reference
    go = _rand(out.shape, dtype)
    rv, rw = torch.autograd.grad((ref * go.double()).sum(), (v2, w2))
    gv, gw = kp.triton_patch_aggregate_bwd(go, values, idx, weights, p, s)
    assert gv.dtype == gw.dtype == dtype and gv.shape == values.shape and gw.shape == weights.shape
    for got, want in ((gv, rv), (gw, rw)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_patch_aggregate_idx_out_of_range():
    values = torch.randn(1, 2, 6, 6)
    idx = torch.zeros(1, 9, 2, dtype=torch.int64)
    w = torch.randn(1, 9, 2)
    go = torch.randn(1, 2, 6, 6)
    for bad in (9, -1, 100):
        idx[0, 3, 1] = bad
        with pytest.raises(ValueError, match="idx"):
            kp.triton_patch_aggregate_fwd(values, idx, w, 2, 2, 6, 6)
        with pytest.raises(ValueError, match="idx"):
            kp.triton_patch_aggregate_bwd(go, values, idx, w, 2, 2)


def test_patch_aggregate_validation_and_empty():
    values = torch.randn(2, 2, 6, 6)
    idx = torch.zeros(2, 9, 2, dtype=torch.int64)
    w = torch.randn(2, 9, 2)
    with pytest.raises(ValueError, match=r"idx must have shape \(B, L, k\) = \(2, 16, k\)"):
        kp.triton_patch_aggregate_fwd(values, idx, w, 2, 2, 8, 8)
    with pytest.raises(TypeError, match="dtype"):
        kp.triton_patch_aggregate_fwd(values, idx, w.double(), 2, 2, 6, 6)
    with pytest.raises(TypeError, match="idx"):
        kp.triton_patch_aggregate_fwd(values, idx.int(), w, 2, 2, 6, 6)
    out = kp.triton_patch_aggregate_fwd(values[:0], idx[:0], w[:0], 2, 2, 6, 6)
    assert out.shape == (0, 2, 6, 6)
    gv, gw = kp.triton_patch_aggregate_bwd(out, values[:0], idx[:0], w[:0], 2, 2)
    assert gv.shape == (0, 2, 6, 6) and gw.shape == (0, 9, 2)


def test_triton_kernels_registered():
    names = {"knn_patch_search_fwd", "knn_patch_search_bwd", "patch_aggregate_fwd", "patch_aggregate_bwd"}
    assert names <= set(pyops.backends()["triton_kernels"])
