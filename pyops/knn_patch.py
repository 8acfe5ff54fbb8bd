"""k-NN patch search and patch aggregation (the MSGNN graph hot path; non-local denoisers).

Where each piece lives:

* schemas: ``csrc/knn_patch/knn_patch.cpp``
* CPU kernels: ``csrc/knn_patch/knn_patch_cpu.cpp``
* Triton kernels (CUDA): this module, section "Triton"
* fake kernels, autograd, input validation, public functions: this module
* pure-PyTorch reference: ``pyops/reference.py`` (``knn_patch_search``, ``patch_aggregate``,
  ``window_candidates``)

A patch is the ``C * p * p`` vector of a ``p x p`` window of a ``(B, C, H, W)`` map, in
``(c, dy, dx)`` order (as ``F.unfold``); patches are taken every ``stride`` pixels where a whole
patch fits, giving a ``(rows, cols)`` patch grid; positions are row-major in that grid.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from . import _backend

__all__ = ["knn_patch_search", "patch_aggregate", "patch_grid"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ops = torch.ops.pyops


def patch_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid of an (height, width) map."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_map(x, name: str, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: {name} must have shape (B, C, H, W), got {tuple(x.shape)}")


def _check_int(value, name: str, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _check_patch(x: torch.Tensor, name: str, patch_size: int, fn: str) -> None:
    if x.shape[-2] < patch_size or x.shape[-1] < patch_size:
        raise ValueError(
            f"{fn}: patch_size {patch_size} is larger than {name} ({x.shape[-2]} x {x.shape[-1]})"
        )


def _same_device(fn: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}")


def _n_candidates(qgrid, dgrid, window: int, exclude_self: bool) -> int:
    if window < 0:
        n = dgrid[0] * dgrid[1]
    else:
        n = min(window, dgrid[0]) * min(window, dgrid[1])
    return n - int(exclude_self)


def _search_args(query, database, k, patch_size, stride, window, exclude_self, fn):
    _check_map(query, "query", fn)
    _check_map(database, "database", fn)
    patch_size = _check_int(patch_size, "patch_size", fn, 1)
    stride = patch_size if stride is None else _check_int(stride, "stride", fn, 1)
    if query.shape[0] != database.shape[0] or query.shape[1] != database.shape[1]:
        raise ValueError(
            f"{fn}: query {tuple(query.shape)} and database {tuple(database.shape)} must have the "
            "same batch size B and channel count C"
        )
    if query.dtype != database.dtype:
        raise TypeError(f"{fn}: query and database must have the same dtype, got {query.dtype} and {database.dtype}")
    _same_device(fn, query=query, database=database)
    _check_patch(query, "query", patch_size, fn)
    _check_patch(database, "database", patch_size, fn)
    window = -1 if window is None else _check_int(window, "window", fn, 1)
    if not isinstance(exclude_self, bool):
        raise TypeError(f"{fn}: exclude_self must be a bool, got {type(exclude_self).__name__}")
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    if exclude_self and qgrid != dgrid:
        raise ValueError(
            f"{fn}: exclude_self needs query and database patch grids of the same size, got {qgrid} and {dgrid}"
        )
    k = _check_int(k, "k", fn, 1)
    n_cand = _n_candidates(qgrid, dgrid, window, exclude_self)
    if k > n_cand:
        raise ValueError(f"{fn}: k = {k} is larger than the number of candidates per query ({n_cand})")
    return k, patch_size, stride, window


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

    Returns:
        ``dist`` (B, Hq*Wq, k) ascending squared distances (float32) and ``idx`` (B, Hq*Wq, k)
        int64 row-major database grid positions; ties go to the lower index. ``dist`` is
        differentiable w.r.t. query and database.
    """
    fn = "knn_patch_search"
    k, patch_size, stride, window = _search_args(query, database, k, patch_size, stride, window, exclude_self, fn)
    return tuple(_ops.knn_patch_search_fwd(query, database, k, patch_size, stride, window, exclude_self))


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
    patch_size = _check_int(patch_size, "patch_size", fn, 1)
    stride = patch_size if stride is None else _check_int(stride, "stride", fn, 1)
    _check_patch(values, "values", patch_size, fn)
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 3:
        raise TypeError(f"{fn}: idx must be an int64 tensor of shape (B, L, k), got {getattr(idx, 'dtype', type(idx))}"
                        f" {tuple(getattr(idx, 'shape', ()))}")
    if not isinstance(weights, torch.Tensor) or weights.shape != idx.shape:
        raise ValueError(f"{fn}: weights must have the shape of idx {tuple(idx.shape)}, got {tuple(getattr(weights, 'shape', ()))}")
    if weights.dtype != values.dtype:
        raise TypeError(f"{fn}: weights must have the dtype of values ({values.dtype}), got {weights.dtype}")
    if idx.shape[0] != values.shape[0]:
        raise ValueError(f"{fn}: idx has batch size {idx.shape[0]} but values has {values.shape[0]}")
    if (not isinstance(output_size, (tuple, list)) or len(output_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in output_size)):
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
    _same_device(fn, values=values, idx=idx, weights=weights)
    return _ops.patch_aggregate_fwd(values, idx, weights, patch_size, stride, out_h, out_w)


# --------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyops::knn_patch_search_fwd")
def _knn_fwd_fake(query, database, k, patch_size, stride, window, exclude_self):
    rows, cols = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    shape = (query.shape[0], rows * cols, k)
    return query.new_empty(shape, dtype=_acc_dtype(query)), query.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("pyops::knn_patch_search_bwd")
def _knn_bwd_fake(grad_dist, query, database, idx, patch_size, stride):
    return torch.empty_like(query), torch.empty_like(database)


@torch.library.register_fake("pyops::patch_aggregate_fwd")
def _agg_fwd_fake(values, idx, weights, patch_size, stride, out_h, out_w):
    return values.new_empty((values.shape[0], values.shape[1], out_h, out_w))


@torch.library.register_fake("pyops::patch_aggregate_bwd")
def _agg_bwd_fake(grad_out, values, idx, weights, patch_size, stride):
    return torch.empty_like(values), torch.empty_like(weights)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _knn_setup(ctx, inputs, output):
    query, database, k, patch_size, stride, window, exclude_self = inputs
    ctx.save_for_backward(query, database, output[1])
    ctx.patch_size, ctx.stride = patch_size, stride
    ctx.mark_non_differentiable(output[1])


def _knn_backward(ctx, grad_dist, _grad_idx):
    query, database, idx = ctx.saved_tensors
    if grad_dist is None:
        return (None,) * 7
    gq, gd = _ops.knn_patch_search_bwd(grad_dist, query, database, idx, ctx.patch_size, ctx.stride)
    return (gq if ctx.needs_input_grad[0] else None, gd if ctx.needs_input_grad[1] else None) + (None,) * 5


def _agg_setup(ctx, inputs, output):
    values, idx, weights, patch_size, stride, out_h, out_w = inputs
    ctx.save_for_backward(values, idx, weights)
    ctx.patch_size, ctx.stride = patch_size, stride


def _agg_backward(ctx, grad_out):
    values, idx, weights = ctx.saved_tensors
    gv, gw = _ops.patch_aggregate_bwd(grad_out, values, idx, weights, ctx.patch_size, ctx.stride)
    return (gv if ctx.needs_input_grad[0] else None, None, gw if ctx.needs_input_grad[2] else None,
            None, None, None, None)


def _no_double_backward(name: str):
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"pyops::{name}: double backward is not supported")

    return backward, setup


torch.library.register_autograd("pyops::knn_patch_search_fwd", _knn_backward, setup_context=_knn_setup)
torch.library.register_autograd("pyops::patch_aggregate_fwd", _agg_backward, setup_context=_agg_setup)
for _name in ("knn_patch_search_bwd", "patch_aggregate_bwd"):
    _b, _s = _no_double_backward(_name)
    torch.library.register_autograd(f"pyops::{_name}", _b, setup_context=_s)


# ==== Triton (CUDA) ====
