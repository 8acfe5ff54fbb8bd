"""k-NN patch search and patch aggregation (the MSGNN graph hot path; non-local denoisers), and
exact k-NN of point sets (``knn``: the search with 1 x 1 patches).

Where each piece lives:

* schemas: ``csrc/knn_patch/knn_patch.cpp``
* CPU kernels: ``csrc/knn_patch/knn_patch_cpu.cpp``
* Triton kernels (CUDA): this module, section "Triton"
* fake kernels, autograd, input validation, public functions: this module
* pure-PyTorch reference: ``pyops/reference.py`` (``knn_patch_search``, ``patch_aggregate``,
  ``window_candidates``, ``knn``)

A patch is the ``C * p * p`` vector of a ``p x p`` window of a ``(B, C, H, W)`` map, in
``(c, dy, dx)`` order (as ``F.unfold``); patches are taken every ``stride`` pixels where a whole
patch fits, giving a ``(rows, cols)`` patch grid; positions are row-major in that grid.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from . import _backend
from ._validation import acc_dtype, check_bool, check_float, check_int, check_same_device, check_tensor

__all__ = ["knn_patch_search", "patch_aggregate", "patch_grid", "knn", "KNNResult"]

_ops = torch.ops.pyops


def patch_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid of an (height, width) map."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_map(x, name: str, fn: str) -> None:
    check_tensor(x, name, fn)
    check_float(x, name, fn)
    if x.dim() != 4:
        raise ValueError(f"{fn}: {name} must have shape (B, C, H, W), got {tuple(x.shape)}")


def _check_patch(x: torch.Tensor, name: str, patch_size: int, fn: str) -> None:
    if x.shape[-2] < patch_size or x.shape[-1] < patch_size:
        raise ValueError(f"{fn}: patch_size {patch_size} is larger than {name} ({x.shape[-2]} x {x.shape[-1]})")


def _n_candidates(qgrid, dgrid, window: int, exclude_self: bool) -> int:
    if window < 0:
        n = dgrid[0] * dgrid[1]
    else:
        n = min(window, dgrid[0]) * min(window, dgrid[1])
    return n - int(exclude_self)


def _check_anchor(window_anchor, window, fn):
    """() or the 8 ints (num, off, den, shift) of rows then columns."""
    if window_anchor is None or (isinstance(window_anchor, (tuple, list)) and len(window_anchor) == 0):
        return []
    if window is None or window < 0:
        raise ValueError(f"{fn}: window_anchor needs a window (window=None is a global search)")
    try:
        axes = [tuple(a) for a in window_anchor]
    except TypeError:
        axes = []
    flat = [v for a in axes for v in a]
    if (
        len(axes) != 2
        or any(len(a) != 4 for a in axes)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    ):
        raise TypeError(
            f"{fn}: window_anchor must be ((num, off, den, shift) of rows, (num, off, den, shift) of "
            f"columns), ints; got {window_anchor!r}"
        )
    for name, (num, off, den, shift) in zip(("rows", "columns"), axes):
        if not (0 <= num < 2**31 and 0 <= off < 2**31 and 1 <= den < 2**31 and abs(shift) < 2**31):
            raise ValueError(
                f"{fn}: window_anchor of {name} needs 0 <= num, off < 2^31, 1 <= den < 2^31 and "
                f"|shift| < 2^31, got {(num, off, den, shift)}"
            )
    return flat


def _check_pair(query, database, fn):
    _check_map(query, "query", fn)
    _check_map(database, "database", fn)
    if query.dtype != database.dtype:
        raise TypeError(f"{fn}: query and database must have the same dtype, got {query.dtype} and {database.dtype}")
    if query.shape[0] != database.shape[0] or query.shape[1] != database.shape[1]:
        raise ValueError(
            f"{fn}: query {tuple(query.shape)} and database {tuple(database.shape)} must have the "
            "same batch size B and channel count C"
        )
    check_same_device(fn, query=query, database=database)


def _search_args(query, database, k, patch_size, stride, window, exclude_self, fn):
    """Checks of the search's arguments in the public form (window None = global, stride None =
    patch_size); returns (k, patch_size, stride, window) with window -1 for a global search."""
    _check_pair(query, database, fn)
    patch_size = check_int(patch_size, "patch_size", fn, 1)
    stride = patch_size if stride is None else check_int(stride, "stride", fn, 1)
    _check_patch(query, "query", patch_size, fn)
    _check_patch(database, "database", patch_size, fn)
    window = -1 if window is None else check_int(window, "window", fn, 1)
    check_bool(exclude_self, "exclude_self", fn)
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    if exclude_self and qgrid != dgrid:
        raise ValueError(
            f"{fn}: exclude_self needs query and database patch grids of the same size, got {qgrid} and {dgrid}"
        )
    k = check_int(k, "k", fn, 1)
    n_cand = _n_candidates(qgrid, dgrid, window, exclude_self)
    if k > n_cand:
        raise ValueError(f"{fn}: k = {k} is larger than the number of candidates per query ({n_cand})")
    return k, patch_size, stride, window


def _search_op_args(query, database, k, patch_size, stride, window, exclude_self, window_anchor, fn):
    """Checks of pyops::knn_patch_search_fwd's arguments (window -1 = global, window_anchor [] or
    8 ints); returns the anchor as a flat list."""
    if isinstance(window, bool) or not isinstance(window, int) or not (window == -1 or window >= 1):
        raise ValueError(f"{fn}: window must be -1 (global) or >= 1, got {window!r}")
    anchor = list(window_anchor)
    if len(anchor) not in (0, 8):
        raise ValueError(
            f"{fn}: window_anchor must be empty or 8 ints (num, off, den, shift of rows, then of "
            f"columns), got {len(anchor)} values"
        )
    _search_args(query, database, k, patch_size, stride, None if window == -1 else window, exclude_self, fn)
    return _check_anchor(anchor and (anchor[:4], anchor[4:]), None if window == -1 else window, fn)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def knn_patch_search(
    query: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    patch_size: int = 3,
    stride: Optional[int] = None,
    window: Optional[int] = None,
    exclude_self: bool = False,
    window_anchor: Optional[tuple] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest database patches (squared L2) of every query patch.

    Args:
        query: (B, C, H, W); database: (B, C, H2, W2); same B, C and dtype (float32, float16,
            bfloat16 or float64; distances accumulate in float32, float64 for float64).
        k: neighbours per query (1 <= k <= candidates per query).
        patch_size, stride: p x p patches every ``stride`` pixels (default ``stride = p``:
            non-overlapping) where a whole patch fits.
        window: None for a global search; ``w``: the w x w block of database grid positions
            centred at the query's position scaled to the database grid (``round(i (Hd-1) /
            (Hq-1))``, halves up), shifted to stay inside the grid; larger than the grid = global.
        exclude_self: never return the query's own position (same grid sizes only).
        window_anchor: where a window starts instead of the centred rule: ``((num, off, den,
            shift) of rows, (num, off, den, shift) of columns)``; the window of query row i
            starts at database row ``clamp((num * i + off) // den - shift, 0, rows - window)``
            (columns likewise); ``num, off >= 0``, ``den >= 1``. E.g. ``(1, 0, 2, 30)`` is
            IGNN/MSGNN's ``i // 2 - 30``. The centred rule is ``(2 (Hd - 1), Hq - 1, 2 (Hq - 1),
            window // 2)``.

    Returns:
        ``dist`` (B, Hq*Wq, k) ascending squared distances (float32) and ``idx`` (B, Hq*Wq, k)
        int64 row-major database grid positions; ties go to the lower index. ``dist`` is
        differentiable w.r.t. query and database.
    """
    fn = "knn_patch_search"
    k, patch_size, stride, window = _search_args(query, database, k, patch_size, stride, window, exclude_self, fn)
    anchor = _check_anchor(window_anchor, window, fn)
    return tuple(_ops.knn_patch_search_fwd(query, database, k, patch_size, stride, window, exclude_self, anchor))


def patch_aggregate(
    values: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    patch_size: int = 3,
    stride: Optional[int] = None,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Weighted sum of the k database patches of every query position, placed at the query
    patch's location in an ``output_size`` map (overlapping placements are summed).

    Args:
        values: (B, C', H2, W2) database-side features (their patch grid is the one ``idx``
            indexes). idx: (B, L, k) int64 positions (as returned by ``knn_patch_search``).
        weights: (B, L, k), same dtype as values. output_size: (H, W) whose patch grid has L
            positions.

    Returns (B, C', H, W), differentiable w.r.t. values and weights.
    """
    fn = "patch_aggregate"
    _check_map(values, "values", fn)
    patch_size = check_int(patch_size, "patch_size", fn, 1)
    stride = patch_size if stride is None else check_int(stride, "stride", fn, 1)
    _check_patch(values, "values", patch_size, fn)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 3:
        raise TypeError(
            f"{fn}: idx must be an int64 tensor of shape (B, L, k), got {getattr(idx, 'dtype', type(idx))}"
            f" {tuple(getattr(idx, 'shape', ()))}"
        )
    if not isinstance(weights, torch.Tensor) or weights.shape != idx.shape:
        raise ValueError(
            f"{fn}: weights must have the shape of idx {tuple(idx.shape)}, got {tuple(getattr(weights, 'shape', ()))}"
        )
    if weights.dtype != values.dtype:
        raise TypeError(f"{fn}: weights must have the dtype of values ({values.dtype}), got {weights.dtype}")
    if idx.shape[0] != values.shape[0]:
        raise ValueError(f"{fn}: idx has batch size {idx.shape[0]} but values has {values.shape[0]}")
    if (
        not isinstance(output_size, (tuple, list))
        or len(output_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in output_size)
    ):
        raise TypeError(f"{fn}: output_size must be a pair of ints (H, W), got {output_size!r}")
    out_h, out_w = output_size
    if out_h < patch_size or out_w < patch_size:
        raise ValueError(f"{fn}: patch_size {patch_size} is larger than output_size {tuple(output_size)}")
    qgrid = patch_grid(out_h, out_w, patch_size, stride)
    if qgrid[0] * qgrid[1] != idx.shape[1]:
        raise ValueError(
            f"{fn}: output_size {tuple(output_size)} has a {qgrid[0]} x {qgrid[1]} patch grid "
            f"({qgrid[0] * qgrid[1]} positions) but idx has L = {idx.shape[1]}"
        )
    check_same_device(fn, values=values, idx=idx, weights=weights)
    return _ops.patch_aggregate_fwd(values, idx, weights, patch_size, stride, out_h, out_w)


class KNNResult(NamedTuple):
    """Result of ``knn``: for every query point, its k nearest database points, nearest first."""

    dists: torch.Tensor  # (..., M, k) squared L2 distances, float32 (float64 for float64 points)
    idx: torch.Tensor  # (..., M, k) int64 row indices into the database y


def _check_points(x, y, k, exclude_self, fn: str) -> tuple[bool, int]:
    """The arguments of ``knn``; returns (batched, k)."""
    for name, t in (("x", x), ("y", y)):
        check_tensor(t, name, fn)
        check_float(t, name, fn)
        if t.dim() not in (2, 3):
            raise ValueError(
                f"{fn}: {name} must have shape (M, D) or (B, M, D) (y: (N, D) or (B, N, D)), got {tuple(t.shape)}"
            )
    if x.dim() != y.dim():
        raise ValueError(
            f"{fn}: x {tuple(x.shape)} and y {tuple(y.shape)} must both be batched (B, *, D) or both unbatched (*, D)"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{fn}: x and y must have the same dimension D (last dim), got {x.shape[-1]} and {y.shape[-1]}"
        )
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: x and y must have the same batch size B, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype:
        raise TypeError(f"{fn}: x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    check_same_device(fn, x=x, y=y)
    check_bool(exclude_self, "exclude_self", fn)
    k = check_int(k, "k", fn, 1)
    n_db = y.shape[-2]
    if exclude_self and x.shape[-2] != n_db:
        raise ValueError(
            f"{fn}: exclude_self needs as many query points as database points (x is y), got "
            f"M = {x.shape[-2]} and N = {n_db}"
        )
    n_cand = n_db - int(exclude_self)
    if k > n_cand:
        raise ValueError(
            f"{fn}: k = {k} is larger than the number of candidates per query point "
            f"({n_cand}: N = {n_db}{' less the point itself' if exclude_self else ''})"
        )
    return x.dim() == 3, k


def _as_maps(points: torch.Tensor) -> torch.Tensor:
    """(B, M, D) points as a (B, D, M, 1) map (CPU: a query grid of M rows, which the C++ search
    splits into row tiles, one task each) or (B, D, 1, M) (CUDA: the Triton kernel's 4 x 8 query
    tiles hold 8 points of one row instead of 4 of one column). Grid position = point index."""
    maps = points.transpose(1, 2).unsqueeze(-1)
    return maps.transpose(2, 3) if points.is_cuda else maps


def knn(x: torch.Tensor, y: torch.Tensor, k: int, *, exclude_self: bool = False) -> KNNResult:
    """Exact k nearest neighbours of point sets: for every query point ``x[..., i, :]`` the ``k``
    database points ``y[..., j, :]`` with the smallest squared L2 distance.

    Args:
        x: (M, D) query points, or (B, M, D) for B independent searches.
        y: (N, D) database points, or (B, N, D) (batched like x); the dtype (float32, float16,
            bfloat16 or float64) and device of x.
        k: neighbours per query point, 1 <= k <= N (N - 1 with ``exclude_self``).
        exclude_self: never return j = i (for a search of a set against itself, ``knn(x, x, k,
            exclude_self=True)``; needs M = N). Other points equal to x_i are still returned.

    Returns:
        ``KNNResult(dists, idx)``: ``dists`` (..., M, k) ascending squared distances
        ``sum_d (x_id - y_jd)^2``, float32 (float64 for float64 points); ``idx`` (..., M, k) int64
        rows of y. Exact (no approximate index); equal distances (duplicate database points)
        go to the lower index. NaN distances count as +inf for the order (they come last) and
        are returned as NaN. ``dists`` is differentiable w.r.t. x and y (``idx`` is not).

    The search of ``knn_patch_search`` with 1 x 1 patches (its C++ kernel on the CPU, its Triton
    kernel on CUDA): GEMM tiles of ``|y|^2 - 2 x.y`` screen chunks of database points for a
    tile of query points, the candidates kept are re-ranked with exact differences, and a query
    whose screening cannot be proven right (a rounding-error bound) is searched again directly.
    The M x N distances are never stored: memory is O((M + N) (D + k)) plus fixed-size tiles.
    """
    fn = "knn"
    batched, k = _check_points(x, y, k, exclude_self, fn)
    xb, yb = (x, y) if batched else (x.unsqueeze(0), y.unsqueeze(0))
    n_b, n_q = xb.shape[0], xb.shape[1]
    if n_q == 0:  # no query points: the op needs a non-empty query grid
        shape = (n_b, 0, k)
        link = (xb.sum() + yb.sum()).to(acc_dtype(xb)) * 0  # keeps the (empty) result in the autograd graph
        dists, idx = xb.new_zeros(shape, dtype=acc_dtype(xb)) + link, xb.new_zeros(shape, dtype=torch.int64)
    else:
        dists, idx = _ops.knn_patch_search_fwd(_as_maps(xb), _as_maps(yb), k, 1, 1, -1, exclude_self, [])
    return KNNResult(dists, idx) if batched else KNNResult(dists[0], idx[0])


# --------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("pyops::knn_patch_search_fwd")
def _knn_fwd_fake(query, database, k, patch_size, stride, window, exclude_self, window_anchor=()):
    _search_op_args(
        query, database, k, patch_size, stride, window, exclude_self, window_anchor, "pyops::knn_patch_search_fwd"
    )
    rows, cols = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    shape = (query.shape[0], rows * cols, k)
    return query.new_empty(shape, dtype=acc_dtype(query)), query.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("pyops::knn_patch_search_bwd")
def _knn_bwd_fake(grad_dist, query, database, idx, patch_size, stride):
    _knn_bwd_args(grad_dist, query, database, idx, patch_size, stride, "pyops::knn_patch_search_bwd")
    # contiguous, as the kernels return them (empty_like would keep a strided input's layout)
    return query.new_empty(query.shape), database.new_empty(database.shape)


@torch.library.register_fake("pyops::patch_aggregate_fwd")
def _agg_fwd_fake(values, idx, weights, patch_size, stride, out_h, out_w):
    _agg_args(values, idx, weights, patch_size, stride, out_h, out_w, "pyops::patch_aggregate_fwd")
    return values.new_empty((values.shape[0], values.shape[1], out_h, out_w))


@torch.library.register_fake("pyops::patch_aggregate_bwd")
def _agg_bwd_fake(grad_out, values, idx, weights, patch_size, stride):
    _agg_bwd_args(grad_out, values, idx, weights, patch_size, stride, "pyops::patch_aggregate_bwd")
    return values.new_empty(values.shape), weights.new_empty(weights.shape)  # contiguous, as the kernels


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _knn_setup(ctx, inputs, output):
    query, database = inputs[:2]
    patch_size, stride = inputs[3], inputs[4]
    ctx.save_for_backward(query, database, output[1])
    ctx.patch_size, ctx.stride = patch_size, stride
    ctx.mark_non_differentiable(output[1])


def _knn_backward(ctx, grad_dist, _grad_idx):
    query, database, idx = ctx.saved_tensors
    if grad_dist is None:
        return (None,) * 8
    gq, gd = _ops.knn_patch_search_bwd(grad_dist, query, database, idx, ctx.patch_size, ctx.stride)
    return (gq if ctx.needs_input_grad[0] else None, gd if ctx.needs_input_grad[1] else None) + (None,) * 6


def _agg_setup(ctx, inputs, output):
    values, idx, weights, patch_size, stride, out_h, out_w = inputs
    ctx.save_for_backward(values, idx, weights)
    ctx.patch_size, ctx.stride = patch_size, stride


def _agg_backward(ctx, grad_out):
    values, idx, weights = ctx.saved_tensors
    gv, gw = _ops.patch_aggregate_bwd(grad_out, values, idx, weights, ctx.patch_size, ctx.stride)
    return (
        gv if ctx.needs_input_grad[0] else None,
        None,
        gw if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("pyops::knn_patch_search_fwd", _knn_backward, setup_context=_knn_setup)
torch.library.register_autograd("pyops::patch_aggregate_fwd", _agg_backward, setup_context=_agg_setup)
for _name in ("knn_patch_search_bwd", "patch_aggregate_bwd"):
    _backend.register_no_double_backward(_name)


# ==== Triton (CUDA) ====
# Triton kernels for CUDA tensors; under TRITON_INTERPRET=1 they also run on CPU tensors, which
# is how tests/test_knn_patch_triton.py checks them. Launchers validate their inputs like the
# CPU kernels, launch inside a device guard and are registered for the CUDA dispatch key at the
# end of the module.
#
# knn_patch_search_fwd, one program per (batch, 2-D tile of BQH x BQW query positions):
#   1. the tile's candidates are the bounding box of its queries' windows (the whole database
#      grid for a global search), visited BN positions at a time; per (query, candidate) a mask
#      keeps the query's own window (and drops its own position with exclude_self);
#   2. approximate distances |q|^2 + |d|^2 - 2 q.d of a tile with tl.dot (IEEE fp32, no TF32;
#      fp64 for fp64 inputs), packed into int64 keys (order-preserving float32 bits << 32 | index)
#      so that one integer order is (distance, lower index first);
#   3. a running top-KP per query (KP = k + margin, a power of two): the tile's best KP keys
#      (bitonic top-k: tl.topk on GPU, _knn_smallest's builtin-only twin under the interpreter)
#      joined to the current list, and top-k again; tiles that improve no query of the block are
#      skipped;
#   4. exact re-rank: the KP candidates' distances sum((q - d)^2) from the patches themselves, then
#      k rounds of selection (smallest distance, ties to the lower index);
#   5. guard: the list is provably right when the k-th exact distance is strictly below the
#      KP-th approximate distance minus a bound on |approximate - exact|; other queries are
#      flagged and recomputed exactly over all their candidates (plain torch ops, flagged rows
#      only; under CUDA-graph capture all rows, without a host sync).
# knn_patch_search_bwd and patch_aggregate_bwd scatter with atomic adds into float32 (float64)
# buffers; patch_aggregate_fwd gathers: every output pixel sums the patches that cover it (no
# atomics, deterministic).
try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or unusable: the CPU (and any CUDA C++) kernels still work
    triton = None

# Index of an empty slot of the running top-KP list (whose key is +inf distance, this index).
_KNN_PAD_POS = 0x7FFFFFFF

if triton is not None:

    @triton.jit
    def _knn_patch_offsets(e, HW, W, P: tl.constexpr):
        # offset of element e = (c, dy, dx) of a patch from the patch's top-left pixel
        e = e.to(tl.int64)
        ch = e // (P * P)
        rem = e % (P * P)
        return ch * HW + (rem // P) * W + rem % P

    @triton.jit
    def _knn_smallest(x, LOG_K: tl.constexpr, LOG_N: tl.constexpr, NUMEL: tl.constexpr, LIB_TOPK: tl.constexpr):
        # The 2**LOG_K smallest entries of each row of x (R, 2**LOG_N), ascending; NUMEL = x.numel.
        # LIB_TOPK: tl.topk. Else the same bitonic top-k (sort blocks of 2**LOG_K in alternating
        # directions; then repeatedly keep the element-wise min of neighbouring blocks and re-merge)
        # written with builtins only: tl.topk's compare-and-swap (an xor reduction) runs element by
        # element under the interpreter.
        if LIB_TOPK:
            out = tl.topk(x, 2**LOG_K, dim=1, descending=False)
        else:
            h = tl.reshape(x, [NUMEL])
            for i in tl.static_range(1, LOG_N + 1):
                n: tl.constexpr = NUMEL >> (i - LOG_K) if i > LOG_K else NUMEL
                if i > LOG_K:  # halve: element-wise min of the two halves of each 2**(LOG_K+1) block
                    lo, hi = tl.split(tl.permute(tl.reshape(h, [n >> LOG_K, 2, 1 << LOG_K]), [0, 2, 1]))
                    h = tl.reshape(tl.minimum(lo, hi), [n])
                stage: tl.constexpr = i if i <= LOG_K else LOG_K
                for s in tl.static_range(stage):
                    j: tl.constexpr = stage - 1 - s  # compare-and-swap partners differ in bit j
                    left, right = tl.split(tl.permute(tl.reshape(h, [n >> (j + 1), 2, 1 << j]), [0, 2, 1]))
                    lo = tl.minimum(left, right)
                    hi = tl.maximum(left, right)
                    if i < LOG_N:  # blocks of 2**stage alternate ascending / descending
                        f = ((tl.arange(0, n >> (j + 1)) >> (stage - j - 1)) & 1)[:, None] != 0
                        left = tl.where(f, hi, lo)
                        right = tl.where(f, lo, hi)
                    else:
                        left = lo
                        right = hi
                    h = tl.reshape(tl.permute(tl.join(left, right), [0, 2, 1]), [n])
            out = tl.reshape(h, [x.shape[0], 2**LOG_K])
        return out

    @triton.jit
    def _knn_fwd_kernel(
        q_ptr,
        d_ptr,
        dist_ptr,
        idx_ptr,
        flag_ptr,
        C,
        HQ,
        WQ,
        HD,
        WD,
        GQH,
        GQW,
        GDH,
        GDW,
        n_tiles_w,
        n_tiles,
        k,
        stride,
        WH,
        WW,
        HALF_H,
        HALF_W,
        MUL_H,
        OFF_H,
        DEN_H,
        MUL_W,
        OFF_W,
        DEN_W,
        err_c,
        P: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr,
        ACC: tl.constexpr,
        BQH: tl.constexpr,
        BQW: tl.constexpr,
        BN: tl.constexpr,
        KP: tl.constexpr,
        BE: tl.constexpr,
        BER: tl.constexpr,
        LOG_BN: tl.constexpr,
        LOG_KP: tl.constexpr,
        LIB_TOPK: tl.constexpr,
    ):
        BQ: tl.constexpr = BQH * BQW
        PAD: tl.constexpr = (0x7F800000 << 32) | 0x7FFFFFFF
        PADPOS: tl.constexpr = 0x7FFFFFFF
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_tiles
        tile = pid % n_tiles
        lane = tl.arange(0, BQ).to(tl.int64)
        qi = (tile // n_tiles_w) * BQH + lane // BQW
        qj = (tile % n_tiles_w) * BQW + lane % BQW
        q_ok = (qi < GQH) & (qj < GQW)
        qi = tl.where(q_ok, qi, 0)
        qj = tl.where(q_ok, qj, 0)
        lq = qi * GQW + qj
        E = C * P * P
        HWQ = HQ * WQ
        HWD = HD * WD
        # window of each query (whole axis when WH == GDH: the clamp gives 0)
        r0 = tl.minimum(tl.maximum((qi * MUL_H + OFF_H) // DEN_H - HALF_H, 0), GDH - WH)
        c0 = tl.minimum(tl.maximum((qj * MUL_W + OFF_W) // DEN_W - HALF_W, 0), GDW - WW)
        box_r0 = tl.min(tl.where(q_ok, r0, GDH), 0)
        box_r1 = tl.max(tl.where(q_ok, r0 + WH, 0), 0)
        box_c0 = tl.min(tl.where(q_ok, c0, GDW), 0)
        box_c1 = tl.max(tl.where(q_ok, c0 + WW, 0), 0)
        n_bc = box_c1 - box_c0
        n_box = (box_r1 - box_r0) * n_bc
        q_base = b * C * HWQ + qi * stride * WQ + qj * stride
        d_img = b * C * HWD

        q_sq = tl.zeros([BQ], ACC)
        for e0 in range(0, E, BE):
            e = e0 + tl.arange(0, BE)
            e_ok = e < E
            x = tl.load(
                q_ptr + q_base[:, None] + _knn_patch_offsets(e, HWQ, WQ, P)[None, :],
                mask=q_ok[:, None] & e_ok[None, :],
                other=0.0,
            ).to(ACC)
            q_sq += tl.sum(x * x, 1)

        best = tl.full([BQ, KP], PAD, tl.int64)
        d_max = tl.zeros([BQ], ACC)
        for t0 in range(0, n_box, BN):
            t = t0 + tl.arange(0, BN).to(tl.int64)
            t_ok = t < n_box
            cr = box_r0 + t // n_bc
            cc = box_c0 + t % n_bc
            pos = cr * GDW + cc
            d_base = d_img + tl.where(t_ok, cr * stride * WD + cc * stride, 0)
            dot = tl.zeros([BQ, BN], ACC)
            d_sq = tl.zeros([BN], ACC)
            for e0 in range(0, E, BE):
                e = e0 + tl.arange(0, BE)
                e_ok = e < E
                x = tl.load(
                    q_ptr + q_base[:, None] + _knn_patch_offsets(e, HWQ, WQ, P)[None, :],
                    mask=q_ok[:, None] & e_ok[None, :],
                    other=0.0,
                ).to(ACC)
                y = tl.load(
                    d_ptr + d_base[None, :] + _knn_patch_offsets(e, HWD, WD, P)[:, None],
                    mask=e_ok[:, None] & t_ok[None, :],
                    other=0.0,
                ).to(ACC)
                dot = tl.dot(x, y, dot, input_precision="ieee")
                d_sq += tl.sum(y * y, 0)
            ok = q_ok[:, None] & t_ok[None, :]
            ok = ok & (cr[None, :] >= r0[:, None]) & (cr[None, :] < r0[:, None] + WH)
            ok = ok & (cc[None, :] >= c0[:, None]) & (cc[None, :] < c0[:, None] + WW)
            if EXCLUDE_SELF:
                ok = ok & (pos[None, :] != lq[:, None])
            approx = q_sq[:, None] + d_sq[None, :] - 2.0 * dot
            approx = tl.where(approx == approx, approx, float("inf")).to(tl.float32)
            d_max = tl.maximum(d_max, tl.max(tl.where(ok, d_sq[None, :], 0.0), 1))
            bits = approx.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            key = (ordered.to(tl.int64) << 32) | pos[None, :]
            key = tl.where(ok, key, PAD)
            improves = tl.min(key, 1) < tl.max(best, 1)
            if tl.max(improves.to(tl.int32), 0) > 0:
                if BN > KP:
                    top = _knn_smallest(key, LOG_KP, LOG_BN, BQ * BN, LIB_TOPK)
                else:
                    top = key
                both = tl.reshape(tl.join(best, top), [BQ, 2 * KP])
                best = _knn_smallest(both, LOG_KP, LOG_KP + 1, BQ * 2 * KP, LIB_TOPK)

        # KP-th approximate distance (+inf when the list is not full)
        worst = (tl.max(best, 1) >> 32).to(tl.int32)
        worst = tl.where(worst >= 0, worst, worst ^ 0x7FFFFFFF).to(tl.float32, bitcast=True).to(ACC)

        # exact re-rank of the KP candidates
        cand = best & 0x7FFFFFFF  # positions are < 2^31 - 1
        real = cand < GDH * GDW
        cs = tl.where(real, cand, 0)
        c_base = d_img + (cs // GDW) * stride * WD + (cs % GDW) * stride
        dist = tl.zeros([BQ, KP], ACC)
        for e0 in range(0, E, BER):
            e = e0 + tl.arange(0, BER)
            e_ok = e < E
            x = tl.load(
                q_ptr + q_base[:, None] + _knn_patch_offsets(e, HWQ, WQ, P)[None, :],
                mask=q_ok[:, None] & e_ok[None, :],
                other=0.0,
            ).to(ACC)
            y = tl.load(
                d_ptr + c_base[:, :, None] + _knn_patch_offsets(e, HWD, WD, P)[None, None, :],
                mask=e_ok[None, None, :],
                other=0.0,
            ).to(ACC)
            diff = x[:, None, :] - y
            dist += tl.sum(diff * diff, 2)
        order = tl.where(real & (dist == dist), dist, float("inf"))
        cand = tl.where(real, cand, PADPOS)
        out = (b * GQH * GQW + lq) * k
        kth = tl.zeros([BQ], ACC)
        for j in range(k):
            kth = tl.min(order, 1)
            hit = order == kth[:, None]
            sel = tl.min(tl.where(hit, cand, PADPOS), 1)
            one = hit & (cand == sel[:, None])
            tl.store(dist_ptr + out + j, tl.sum(tl.where(one, dist, 0.0), 1), mask=q_ok)
            tl.store(idx_ptr + out + j, sel, mask=q_ok)
            order = tl.where(one, float("inf"), order)
            cand = tl.where(one, PADPOS + 1, cand)
        safe = kth < worst - err_c * (q_sq + d_max)
        tl.store(flag_ptr + b * GQH * GQW + lq, tl.where(safe, 0, 1).to(tl.int8), mask=q_ok)

    @triton.jit
    def _knn_bwd_kernel(
        g_ptr,
        q_ptr,
        d_ptr,
        idx_ptr,
        gq_ptr,
        gd_ptr,
        C,
        HQ,
        WQ,
        HD,
        WD,
        GQW,
        GDW,
        LQ,
        LD,
        k,
        stride,
        n_blocks,
        P: tl.constexpr,
        ACC: tl.constexpr,
        BL: tl.constexpr,
        BE: tl.constexpr,
    ):
        # grad_q(patch l) += 2 g (q - d_j); grad_d(patch idx_j) -= 2 g (q - d_j)
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_blocks
        l = (pid % n_blocks) * BL + tl.arange(0, BL).to(tl.int64)
        l_ok = l < LQ
        l = tl.where(l_ok, l, 0)
        E = C * P * P
        HWQ = HQ * WQ
        HWD = HD * WD
        q_base = b * C * HWQ + (l // GQW) * stride * WQ + (l % GQW) * stride
        row = (b * LQ + l) * k
        for e0 in range(0, E, BE):
            e = e0 + tl.arange(0, BE)
            m = l_ok[:, None] & (e < E)[None, :]
            q_off = q_base[:, None] + _knn_patch_offsets(e, HWQ, WQ, P)[None, :]
            d_rel = _knn_patch_offsets(e, HWD, WD, P)[None, :]
            x = tl.load(q_ptr + q_off, mask=m, other=0.0).to(ACC)
            gq = tl.zeros([BL, BE], ACC)
            for j in range(k):
                g = tl.load(g_ptr + row + j, mask=l_ok, other=0.0).to(ACC)
                pos = tl.load(idx_ptr + row + j, mask=l_ok, other=0)
                pos = tl.minimum(tl.maximum(pos, 0), LD - 1)
                d_off = (b * C * HWD + (pos // GDW) * stride * WD + (pos % GDW) * stride)[:, None] + d_rel
                y = tl.load(d_ptr + d_off, mask=m, other=0.0).to(ACC)
                c = 2.0 * g[:, None] * (x - y)
                gq += c
                tl.atomic_add(gd_ptr + d_off, -c, mask=m)
            tl.atomic_add(gq_ptr + q_off, gq, mask=m)

    @triton.jit
    def _agg_fwd_kernel(
        v_ptr,
        idx_ptr,
        w_ptr,
        out_ptr,
        C,
        HV,
        WV,
        HO,
        WO,
        GQH,
        GQW,
        GDW,
        LD,
        k,
        stride,
        n_pix_blocks,
        n_ch_blocks,
        P: tl.constexpr,
        NR: tl.constexpr,
        ACC: tl.constexpr,
        BC: tl.constexpr,
        BPIX: tl.constexpr,
    ):
        # out pixel (y, x) = sum over the query patches (r, c) covering it and their k
        # neighbours of w * values[(patch idx) pixel (y - r s, x - c s)]
        pid = tl.program_id(0).to(tl.int64)
        b = pid // (n_pix_blocks * n_ch_blocks)
        rest = pid % (n_pix_blocks * n_ch_blocks)
        ch = (rest // n_pix_blocks) * BC + tl.arange(0, BC).to(tl.int64)
        pix = (rest % n_pix_blocks) * BPIX + tl.arange(0, BPIX).to(tl.int64)
        ch_ok = ch < C
        pix_ok = pix < HO * WO
        y = pix // WO
        x = pix % WO
        r_lo = (tl.maximum(y - P + 1, 0) + stride - 1) // stride
        r_hi = tl.minimum(y // stride, GQH - 1)
        c_lo = (tl.maximum(x - P + 1, 0) + stride - 1) // stride
        c_hi = tl.minimum(x // stride, GQW - 1)
        HWV = HV * WV
        v_chan = b * C * HWV + ch * HWV
        acc = tl.zeros([BC, BPIX], ACC)
        for a in range(NR):
            r = r_lo + a
            dy = y - r * stride
            for a2 in range(NR):
                c = c_lo + a2
                dx = x - c * stride
                ok = pix_ok & (r <= r_hi) & (c <= c_hi)
                row = (b * GQH * GQW + tl.where(ok, r * GQW + c, 0)) * k
                for j in range(k):
                    pos = tl.load(idx_ptr + row + j, mask=ok, other=0)
                    pos = tl.minimum(tl.maximum(pos, 0), LD - 1)
                    w = tl.load(w_ptr + row + j, mask=ok, other=0.0).to(ACC)
                    src = tl.where(ok, ((pos // GDW) * stride + dy) * WV + (pos % GDW) * stride + dx, 0)
                    v = tl.load(
                        v_ptr + v_chan[:, None] + src[None, :], mask=ch_ok[:, None] & ok[None, :], other=0.0
                    ).to(ACC)
                    acc += w[None, :] * v
        out = b * C * HO * WO + ch[:, None] * (HO * WO) + pix[None, :]
        tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=ch_ok[:, None] & pix_ok[None, :])

    @triton.jit
    def _agg_bwd_kernel(
        go_ptr,
        v_ptr,
        idx_ptr,
        w_ptr,
        gv_ptr,
        gw_ptr,
        C,
        HV,
        WV,
        HO,
        WO,
        GQW,
        GDW,
        LQ,
        LD,
        k,
        stride,
        n_blocks,
        P: tl.constexpr,
        ACC: tl.constexpr,
        BL: tl.constexpr,
        BE: tl.constexpr,
    ):
        # grad_values(patch idx_j) += w_j grad_out(patch l); grad_w[l, j] = <grad_out patch l, values patch idx_j>
        pid = tl.program_id(0).to(tl.int64)
        b = pid // n_blocks
        l = (pid % n_blocks) * BL + tl.arange(0, BL).to(tl.int64)
        l_ok = l < LQ
        l = tl.where(l_ok, l, 0)
        E = C * P * P
        HWO = HO * WO
        HWV = HV * WV
        o_base = b * C * HWO + (l // GQW) * stride * WO + (l % GQW) * stride
        row = (b * LQ + l) * k
        for j in range(k):
            pos = tl.load(idx_ptr + row + j, mask=l_ok, other=0)
            pos = tl.minimum(tl.maximum(pos, 0), LD - 1)
            w = tl.load(w_ptr + row + j, mask=l_ok, other=0.0).to(ACC)
            v_base = b * C * HWV + (pos // GDW) * stride * WV + (pos % GDW) * stride
            gw = tl.zeros([BL], ACC)
            for e0 in range(0, E, BE):
                e = e0 + tl.arange(0, BE)
                m = l_ok[:, None] & (e < E)[None, :]
                go = tl.load(
                    go_ptr + o_base[:, None] + _knn_patch_offsets(e, HWO, WO, P)[None, :], mask=m, other=0.0
                ).to(ACC)
                v_off = v_base[:, None] + _knn_patch_offsets(e, HWV, WV, P)[None, :]
                v = tl.load(v_ptr + v_off, mask=m, other=0.0).to(ACC)
                gw += tl.sum(go * v, 1)
                tl.atomic_add(gv_ptr + v_off, w[:, None] * go, mask=m)
            tl.store(gw_ptr + row + j, gw.to(gw_ptr.dtype.element_ty), mask=l_ok)


def _triton_launch_config(op: str, k: int, e: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the Triton kernels (tests monkeypatch smaller ones).

    op "knn_fwd": BQH x BQW query tile, BN candidates per tile (a multiple of KP), KP the
    running-list length (a power of two >= k + margin), BE / BER the patch-element chunks of the
    tl.dot and of the exact re-rank. "knn_bwd" / "agg_bwd": BL query positions, BE elements.
    "agg_fwd": BC channels x BPIX output pixels.
    """
    if op == "knn_fwd":
        kp = max(16, triton.next_power_of_2(k + max(4, k // 4)))
        bqh, bqw = 4, 8
        return dict(
            BQH=bqh,
            BQW=bqw,
            BN=max(kp, 64),
            KP=kp,
            BE=16,
            BER=max(1, min(16, 2048 // (bqh * bqw * kp))),
            num_warps=4,
            LIB_TOPK=os.environ.get("TRITON_INTERPRET") != "1",
        )
    if op in ("knn_bwd", "agg_bwd"):
        return dict(BL=32, BE=min(64, max(16, triton.next_power_of_2(max(e, 1)))), num_warps=4)
    if op == "agg_fwd":
        return dict(BC=min(16, triton.next_power_of_2(max(e, 1))), BPIX=128, num_warps=4)
    raise ValueError(f"unknown op {op!r}")


def _tl_acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _check_idx_range(idx: torch.Tensor, n_db: int, fn: str) -> None:
    """Data check of idx (one host sync); skipped under CUDA-graph capture, where the kernels
    clamp any bad index instead of reading out of bounds."""
    if idx.numel() == 0 or _backend.no_values(idx):
        return
    bad = (idx < 0) | (idx >= n_db)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: idx{list(where)} = {int(idx[where])} is out of range [0, {n_db}) (the positions "
            "of the database patch grid)"
        )


def _patch_offsets_t(channels: int, width_hw: tuple, patch_size: int, device) -> torch.Tensor:
    """(C*p*p,) offsets of a patch's elements, (c, dy, dx) order, from its top-left pixel."""
    h, w = width_hw
    c = torch.arange(channels, device=device)[:, None, None] * (h * w)
    dy = torch.arange(patch_size, device=device)[None, :, None] * w
    dx = torch.arange(patch_size, device=device)[None, None, :]
    return (c + dy + dx).reshape(-1)


def _patch_bases_t(pos: torch.Tensor, grid_w: int, stride: int, img_w: int) -> torch.Tensor:
    return (pos // grid_w) * stride * img_w + (pos % grid_w) * stride


def _window_starts_t(i: torch.Tensor, n_query: int, n_db: int, window: int, anchor=None):
    if window < 0 or window >= n_db:
        return torch.zeros_like(i), n_db
    if anchor:
        num, off, den, shift = anchor
        return ((num * i + off) // den - shift).clamp(0, n_db - window), window
    if n_query > 1:
        centre = (2 * i * (n_db - 1) + (n_query - 1)) // (2 * (n_query - 1))
    else:
        centre = torch.full_like(i, (n_db - 1) // 2)
    return (centre - window // 2).clamp(0, n_db - window), window


def _knn_exact_rows(query, database, b_idx, l_idx, k, patch_size, stride, window, exclude_self, anchor=()):
    """Exact k-NN (direct sum((q - d)^2), ties to the lower index) of the query rows
    (b_idx[i], l_idx[i]) over all their candidates, with torch ops: the guard's fallback."""
    acc = acc_dtype(query)
    dev = query.device
    (gqh, gqw) = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    (gdh, gdw) = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    n_ch = query.shape[1]
    q_flat = query.reshape(query.shape[0], -1)
    d_flat = database.reshape(database.shape[0], -1)
    q_off = _patch_offsets_t(n_ch, query.shape[-2:], patch_size, dev)
    d_off = _patch_offsets_t(n_ch, database.shape[-2:], patch_size, dev)
    r0, wh = _window_starts_t(l_idx // gqw, gqh, gdh, window, tuple(anchor[:4]))
    c0, ww = _window_starts_t(l_idx % gqw, gqw, gdw, window, tuple(anchor[4:]))
    t = torch.arange(wh * ww, device=dev)
    n_cand = wh * ww - int(exclude_self)
    n = b_idx.numel()
    dist = torch.empty((n, k), dtype=acc, device=dev)
    idx = torch.empty((n, k), dtype=torch.int64, device=dev)
    e = q_off.numel()
    chunk = max(1, (1 << 24) // max(1, wh * ww * max(e, 1)))
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        b, l = b_idx[sl], l_idx[sl]
        cand = (r0[sl, None] + t // ww) * gdw + c0[sl, None] + t % ww  # ascending per row
        if exclude_self:  # drop the one self column by a gather (no host sync, capture-safe)
            col = torch.arange(n_cand, device=dev)
            self_col = (cand < l[:, None]).sum(1, keepdim=True)
            cand = cand.gather(1, col + (col >= self_col))
        qv = q_flat[b[:, None], _patch_bases_t(l, gqw, stride, query.shape[-1])[:, None] + q_off].to(acc)
        dv = d_flat[b[:, None, None], _patch_bases_t(cand, gdw, stride, database.shape[-1])[:, :, None] + d_off]
        dd = (qv[:, None, :] - dv.to(acc)).square().sum(-1)
        vals, order = torch.sort(dd, dim=1, stable=True)
        dist[sl] = vals[:, :k]
        idx[sl] = cand.gather(1, order[:, :k])
    return dist, idx


def triton_knn_patch_search_fwd(query, database, k, patch_size, stride, window, exclude_self, window_anchor=()):
    """Triton kernel of ``pyops::knn_patch_search_fwd`` (registered for CUDA)."""
    fn = "pyops::knn_patch_search_fwd"
    anchor = _search_op_args(query, database, k, patch_size, stride, window, exclude_self, window_anchor, fn)
    window = None if window == -1 else window
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    n_db = dgrid[0] * dgrid[1]
    if n_db >= _KNN_PAD_POS:
        raise ValueError(
            f"{fn}: the database patch grid has {n_db} positions; at most {_KNN_PAD_POS - 1} are supported"
        )
    n_b, n_ch = query.shape[:2]
    n_q = qgrid[0] * qgrid[1]
    acc = acc_dtype(query)
    dist = query.new_empty((n_b, n_q, k), dtype=acc)
    idx = query.new_empty((n_b, n_q, k), dtype=torch.int64)
    if n_b == 0:
        return dist, idx
    q, d = query.contiguous(), database.contiguous()
    win = -1 if window is None else window
    if n_ch == 0:  # empty patches: every distance is 0, ties to the lower index
        rows = torch.arange(n_b * n_q, device=q.device)
        dr, ir = _knn_exact_rows(q, d, rows // n_q, rows % n_q, k, patch_size, stride, win, exclude_self, anchor)
        return dr.view(n_b, n_q, k), ir.view(n_b, n_q, k)
    cfg = _triton_launch_config("knn_fwd", k, n_ch * patch_size * patch_size, query.dtype)
    kp, bqh, bqw, bn = cfg["KP"], cfg["BQH"], cfg["BQW"], cfg["BN"]
    if not k <= kp or kp < 2 or any(v & (v - 1) for v in (kp, bqh, bqw, bn)) or bn < kp:
        raise ValueError(f"{fn}: bad launch config {cfg} for k = {k} (powers of two, k <= KP <= BN, KP >= 2)")

    def axis(n_query, n_db_axis, a):
        # the window of query row i starts at clamp((MUL * i + OFF) // DEN - HALF, 0, n_db - length)
        length = n_db_axis if win < 0 or win >= n_db_axis else win
        if length == n_db_axis:
            return length, 0, 0, 0, 1
        if a:
            return length, a[3], a[0], a[1], a[2]
        if n_query > 1:
            return length, win // 2, 2 * (n_db_axis - 1), n_query - 1, 2 * (n_query - 1)
        return length, win // 2, 0, (n_db_axis - 1) // 2, 1

    wh, half_h, mul_h, off_h, den_h = axis(qgrid[0], dgrid[0], anchor[:4])
    ww, half_w, mul_w, off_w, den_w = axis(qgrid[1], dgrid[1], anchor[4:])
    e = n_ch * patch_size * patch_size
    unit = 2.0**-53 if acc == torch.float64 else 2.0**-24
    # |approximate - exact| <= err_c * (|q|^2 + max |d|^2); for float64 the keys are float32
    err_c = 4.0 * (e + 4) * unit + (8.0 * 2.0**-24 if acc == torch.float64 else 0.0)
    n_tiles_w = triton.cdiv(qgrid[1], bqw)
    n_tiles = triton.cdiv(qgrid[0], bqh) * n_tiles_w
    flag = torch.empty((n_b, n_q), dtype=torch.int8, device=q.device)
    with _backend.device_guard(q):
        _knn_fwd_kernel[(n_b * n_tiles,)](
            q,
            d,
            dist,
            idx,
            flag,
            n_ch,
            q.shape[2],
            q.shape[3],
            d.shape[2],
            d.shape[3],
            qgrid[0],
            qgrid[1],
            dgrid[0],
            dgrid[1],
            n_tiles_w,
            n_tiles,
            k,
            stride,
            wh,
            ww,
            half_h,
            half_w,
            mul_h,
            off_h,
            den_h,
            mul_w,
            off_w,
            den_w,
            err_c,
            P=patch_size,
            EXCLUDE_SELF=exclude_self,
            ACC=_tl_acc(q),
            BQH=bqh,
            BQW=bqw,
            BN=bn,
            KP=kp,
            BE=cfg["BE"],
            BER=cfg["BER"],
            LOG_BN=bn.bit_length() - 1,
            LOG_KP=kp.bit_length() - 1,
            LIB_TOPK=cfg["LIB_TOPK"],
            num_warps=cfg["num_warps"],
        )
        if _backend.capturing(q):  # no host sync: recompute every row exactly, keep the flagged ones
            rows = torch.arange(n_b * n_q, device=q.device)
            dr, ir = _knn_exact_rows(q, d, rows // n_q, rows % n_q, k, patch_size, stride, win, exclude_self, anchor)
            f = flag.view(n_b, n_q, 1).bool()
            dist.copy_(torch.where(f, dr.view_as(dist), dist))
            idx.copy_(torch.where(f, ir.view_as(idx), idx))
        else:
            rows = flag.view(-1).nonzero().view(-1)
            if rows.numel():
                dr, ir = _knn_exact_rows(
                    q, d, rows // n_q, rows % n_q, k, patch_size, stride, win, exclude_self, anchor
                )
                dist.view(-1, k)[rows] = dr
                idx.view(-1, k)[rows] = ir
    return dist, idx


def _check_idx(idx, batch: int, n_rows: int, what: str, fn: str) -> None:
    """idx: an int64 (B, L, k) tensor; ``what`` says where L comes from."""
    check_tensor(idx, "idx", fn)
    if idx.dtype != torch.int64:
        raise TypeError(f"{fn}: idx must be int64, got {idx.dtype}")
    if idx.dim() != 3 or idx.shape[0] != batch or idx.shape[1] != n_rows:
        raise ValueError(
            f"{fn}: idx must have shape (B, L, k) = ({batch}, {n_rows}, k) (L: {what}), got {tuple(idx.shape)}"
        )


def _check_like_idx(t, name: str, idx, ref, ref_name: str, fn: str) -> None:
    """t: the shape of idx; the dtype of ref (a float dtype when ref is None)."""
    check_tensor(t, name, fn)
    if t.shape != idx.shape:
        raise ValueError(f"{fn}: {name} must have the shape of idx {tuple(idx.shape)}, got {tuple(t.shape)}")
    if ref is not None and t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    check_float(t, name, fn)
    check_same_device(fn, idx=idx, **{name: t})


def _knn_bwd_args(grad_dist, query, database, idx, patch_size, stride, fn):
    _check_pair(query, database, fn)
    patch_size = check_int(patch_size, "patch_size", fn, 1)
    stride = check_int(stride, "stride", fn, 1)
    _check_patch(query, "query", patch_size, fn)
    _check_patch(database, "database", patch_size, fn)
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    _check_idx(idx, query.shape[0], qgrid[0] * qgrid[1], "the query patch grid", fn)
    _check_like_idx(grad_dist, "grad_dist", idx, None, "", fn)
    check_same_device(fn, query=query, idx=idx)
    return patch_size, stride


def triton_knn_patch_search_bwd(grad_dist, query, database, idx, patch_size, stride):
    """Triton kernel of ``pyops::knn_patch_search_bwd`` (registered for CUDA)."""
    fn = "pyops::knn_patch_search_bwd"
    patch_size, stride = _knn_bwd_args(grad_dist, query, database, idx, patch_size, stride, fn)
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    n_db = dgrid[0] * dgrid[1]
    _check_idx_range(idx, n_db, fn)
    acc = acc_dtype(query)
    n_b, n_ch = query.shape[:2]
    n_q, k = idx.shape[1], idx.shape[2]
    if query.numel() == 0 or k == 0:
        return torch.zeros_like(query), torch.zeros_like(database)
    q, d = query.contiguous(), database.contiguous()
    g, ix = grad_dist.contiguous(), idx.contiguous()
    gq = torch.zeros(q.shape, dtype=acc, device=q.device)
    gd = torch.zeros(d.shape, dtype=acc, device=q.device)
    cfg = _triton_launch_config("knn_bwd", k, n_ch * patch_size * patch_size, query.dtype)
    n_blocks = triton.cdiv(n_q, cfg["BL"])
    with _backend.device_guard(q):
        _knn_bwd_kernel[(n_b * n_blocks,)](
            g,
            q,
            d,
            ix,
            gq,
            gd,
            n_ch,
            q.shape[2],
            q.shape[3],
            d.shape[2],
            d.shape[3],
            qgrid[1],
            dgrid[1],
            n_q,
            n_db,
            k,
            stride,
            n_blocks,
            P=patch_size,
            ACC=_tl_acc(q),
            BL=cfg["BL"],
            BE=cfg["BE"],
            num_warps=cfg["num_warps"],
        )
    return gq.to(query.dtype), gd.to(database.dtype)


_MAX_NUMEL = 2**62


def _agg_args(values, idx, weights, patch_size, stride, out_h, out_w, fn):
    """Checks of pyops::patch_aggregate_fwd's arguments; returns (patch_size, stride, query grid,
    database grid)."""
    _check_map(values, "values", fn)
    patch_size = check_int(patch_size, "patch_size", fn, 1)
    stride = check_int(stride, "stride", fn, 1)
    _check_patch(values, "values", patch_size, fn)
    out_h = check_int(out_h, "out_h", fn, patch_size)
    out_w = check_int(out_w, "out_w", fn, patch_size)
    if out_h * out_w > _MAX_NUMEL or values.shape[0] * values.shape[1] * out_h * out_w > _MAX_NUMEL:
        raise ValueError(f"{fn}: the output (B, C, out_h, out_w) = {(*values.shape[:2], out_h, out_w)} is too large")
    qgrid = patch_grid(out_h, out_w, patch_size, stride)
    _check_idx(idx, values.shape[0], qgrid[0] * qgrid[1], "the patch grid of (out_h, out_w)", fn)
    _check_like_idx(weights, "weights", idx, values, "values", fn)
    check_same_device(fn, values=values, idx=idx)
    dgrid = patch_grid(values.shape[-2], values.shape[-1], patch_size, stride)
    return patch_size, stride, qgrid, dgrid


def _agg_bwd_args(grad_out, values, idx, weights, patch_size, stride, fn):
    """Checks of pyops::patch_aggregate_bwd's arguments; returns (patch_size, stride, query
    grid, database grid)."""
    _check_map(values, "values", fn)
    _check_map(grad_out, "grad_out", fn)
    if grad_out.dtype != values.dtype:
        raise TypeError(f"{fn}: grad_out must have the dtype of values ({values.dtype}), got {grad_out.dtype}")
    if grad_out.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"{fn}: grad_out {tuple(grad_out.shape)} must have the batch size and channels of values "
            f"{tuple(values.shape)}"
        )
    check_same_device(fn, values=values, grad_out=grad_out)
    patch_size = check_int(patch_size, "patch_size", fn, 1)
    stride = check_int(stride, "stride", fn, 1)
    _check_patch(values, "values", patch_size, fn)
    _check_patch(grad_out, "grad_out", patch_size, fn)
    qgrid = patch_grid(grad_out.shape[-2], grad_out.shape[-1], patch_size, stride)
    _check_idx(idx, values.shape[0], qgrid[0] * qgrid[1], "the patch grid of grad_out", fn)
    _check_like_idx(weights, "weights", idx, None, "", fn)
    check_same_device(fn, values=values, idx=idx)
    dgrid = patch_grid(values.shape[-2], values.shape[-1], patch_size, stride)
    return patch_size, stride, qgrid, dgrid


def triton_patch_aggregate_fwd(values, idx, weights, patch_size, stride, out_h, out_w):
    """Triton kernel of ``pyops::patch_aggregate_fwd`` (registered for CUDA)."""
    fn = "pyops::patch_aggregate_fwd"
    patch_size, stride, qgrid, dgrid = _agg_args(values, idx, weights, patch_size, stride, out_h, out_w, fn)
    n_db = dgrid[0] * dgrid[1]
    _check_idx_range(idx, n_db, fn)
    n_b, n_ch = values.shape[:2]
    k = idx.shape[2]
    if n_b == 0 or n_ch == 0 or k == 0:
        return values.new_zeros((n_b, n_ch, out_h, out_w))
    out = values.new_empty((n_b, n_ch, out_h, out_w))
    v, ix, w = values.contiguous(), idx.contiguous(), weights.contiguous()
    cfg = _triton_launch_config("agg_fwd", k, n_ch, values.dtype)
    n_pix = triton.cdiv(out_h * out_w, cfg["BPIX"])
    n_chb = triton.cdiv(n_ch, cfg["BC"])
    with _backend.device_guard(v):
        _agg_fwd_kernel[(n_b * n_pix * n_chb,)](
            v,
            ix,
            w,
            out,
            n_ch,
            v.shape[2],
            v.shape[3],
            out_h,
            out_w,
            qgrid[0],
            qgrid[1],
            dgrid[1],
            n_db,
            k,
            stride,
            n_pix,
            n_chb,
            P=patch_size,
            NR=triton.cdiv(patch_size, stride),
            ACC=_tl_acc(v),
            BC=cfg["BC"],
            BPIX=cfg["BPIX"],
            num_warps=cfg["num_warps"],
        )
    return out


def triton_patch_aggregate_bwd(grad_out, values, idx, weights, patch_size, stride):
    """Triton kernel of ``pyops::patch_aggregate_bwd`` (registered for CUDA)."""
    fn = "pyops::patch_aggregate_bwd"
    patch_size, stride, qgrid, dgrid = _agg_bwd_args(grad_out, values, idx, weights, patch_size, stride, fn)
    out_h, out_w = grad_out.shape[-2:]
    n_db = dgrid[0] * dgrid[1]
    _check_idx_range(idx, n_db, fn)
    n_b, n_ch = values.shape[:2]
    n_q, k = idx.shape[1], idx.shape[2]
    acc = acc_dtype(values)
    if n_b == 0 or n_ch == 0 or k == 0:
        return torch.zeros_like(values), torch.zeros_like(weights)
    go, v, ix, w = grad_out.contiguous(), values.contiguous(), idx.contiguous(), weights.contiguous()
    gv = torch.zeros(v.shape, dtype=acc, device=v.device)
    gw = torch.empty_like(w)
    cfg = _triton_launch_config("agg_bwd", k, n_ch * patch_size * patch_size, values.dtype)
    n_blocks = triton.cdiv(n_q, cfg["BL"])
    with _backend.device_guard(v):
        _agg_bwd_kernel[(n_b * n_blocks,)](
            go,
            v,
            ix,
            w,
            gv,
            gw,
            n_ch,
            v.shape[2],
            v.shape[3],
            out_h,
            out_w,
            qgrid[1],
            dgrid[1],
            n_q,
            n_db,
            k,
            stride,
            n_blocks,
            P=patch_size,
            ACC=_tl_acc(v),
            BL=cfg["BL"],
            BE=cfg["BE"],
            num_warps=cfg["num_warps"],
        )
    return gv.to(values.dtype), gw


if triton is not None:
    _backend.register_triton_kernel("knn_patch_search_fwd", triton_knn_patch_search_fwd)
    _backend.register_triton_kernel("knn_patch_search_bwd", triton_knn_patch_search_bwd)
    _backend.register_triton_kernel("patch_aggregate_fwd", triton_patch_aggregate_fwd)
    _backend.register_triton_kernel("patch_aggregate_bwd", triton_patch_aggregate_bwd)
