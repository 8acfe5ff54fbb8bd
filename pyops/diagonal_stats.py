"""Per-lag mean and unbiased std along the upper diagonals of T x T maps: the hot path of the
rPPG methods that train on self-similarity maps (BYHE, DOHA, SSPD: ``Turn_map_into_waves`` and
``std_regular`` in their official code, Python double loops there).

Where each piece lives:

* schemas and the formulas: ``csrc/diagonal_stats/diagonal_stats.cpp``
* CPU kernels: ``csrc/diagonal_stats/diagonal_stats_cpu.cpp``
* Triton kernels (CUDA): this module
* fake kernels, autograd, input validation, the public function: this module
* pure-PyTorch reference (a masked gather, vectorised): ``pyops/reference.py``
  (``diagonal_stats``; ``diagonal_stats_loop`` is the official code's double loop)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backend, reference
from ._validation import acc_dtype, check_float, check_same_device, check_tensor

__all__ = ["diagonal_stats"]

_ops = torch.ops.pyops


def diagonal_stats(maps: torch.Tensor, num_lags: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (Bessel-corrected) std of each upper diagonal of T x T maps.

    For lag k (diagonal ``S[i, i + k]``, ``n_k = T - k`` entries), k = 0..num_lags-1:
    ``mean_k = sum_i S[i, i+k] / n_k``, ``std_k = sqrt(sum_i (S[i, i+k] - mean_k)^2 / (n_k - 1))``.

    Args:
        maps: ``(B, T, T)`` or ``(T, T)``, float32/float16/bfloat16/float64.
        num_lags: K in [0, T - 1] (default T - 1: every diagonal with at least 2 entries).

    Returns:
        ``(mean, std)``, each ``(B, K)`` (or ``(K,)``), float32 (float64 for float64 maps), both
        differentiable w.r.t. ``maps`` (the std's gradient is 0 on a constant diagonal).
    """
    fn = "diagonal_stats"
    check_tensor(maps, "maps", fn)
    check_float(maps, "maps", fn)
    if maps.dim() not in (2, 3) or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"{fn}: maps must be (B, T, T) or (T, T), got {tuple(maps.shape)}")
    T = maps.shape[-1]
    if T < 2:
        raise ValueError(f"{fn}: maps must be at least 2 x 2 (an unbiased std needs 2 entries), got T = {T}")
    if num_lags is None:
        num_lags = T - 1  # (a SymInt under torch.compile with dynamic shapes)
    elif isinstance(num_lags, bool) or not isinstance(num_lags, int):
        raise TypeError(f"{fn}: num_lags must be an int, got {type(num_lags).__name__}")
    elif not 0 <= num_lags <= T - 1:
        raise ValueError(f"{fn}: num_lags must be in [0, T - 1] = [0, {T - 1}], got {num_lags!r}")
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(maps):
        # inside torch.func transforms (grad, jacrev, vmap): they cannot differentiate through a
        # torch.library autograd registration, so the same statistics come from differentiable
        # PyTorch ops (the reference; same gradient convention)
        return reference.diagonal_stats(maps, num_lags)
    single = maps.dim() == 2
    mean, std = _ops.diagonal_stats_fwd(maps[None] if single else maps, num_lags)
    return (mean[0], std[0]) if single else (mean, std)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd
# --------------------------------------------------------------------------------------------
def _check_op_maps(maps, fn: str) -> None:
    check_tensor(maps, "maps", fn)
    if maps.dim() != 3 or maps.shape[1] != maps.shape[2]:
        raise ValueError(f"{fn}: maps must have shape (B, T, T), got {tuple(maps.shape)}")
    if maps.shape[1] < 2:
        raise ValueError(
            f"{fn}: maps must be at least 2 x 2 (an unbiased std needs 2 entries), got T = {maps.shape[1]}"
        )
    check_float(maps, "maps", fn)


def _check_fwd_op(maps, num_lags, fn: str) -> None:
    _check_op_maps(maps, fn)
    T = maps.shape[1]
    if isinstance(num_lags, bool) or not isinstance(num_lags, int) or not 0 <= num_lags <= T - 1:
        raise ValueError(f"{fn}: num_lags must be in [0, T - 1] = [0, {T - 1}], got {num_lags!r}")


def _check_bwd_op(g_mean, g_std, maps, mean, std, fn: str) -> None:
    _check_op_maps(maps, fn)
    B, T = maps.shape[0], maps.shape[1]
    check_tensor(mean, "mean", fn)
    if mean.dim() != 2 or mean.shape[0] != B:
        raise ValueError(f"{fn}: mean must have shape (B, K) with B = {B}, got {tuple(mean.shape)}")
    K = mean.shape[1]
    if K > T - 1:
        raise ValueError(f"{fn}: mean has K = {K} lags but (T, T) maps have at most T - 1 = {T - 1}")
    for name, x in (("g_mean", g_mean), ("g_std", g_std), ("mean", mean), ("std", std)):
        check_tensor(x, name, fn)
        if x.shape != (B, K):
            raise ValueError(f"{fn}: {name} must have shape (B, K) = ({B}, {K}), got {tuple(x.shape)}")
        check_float(x, name, fn)
        check_same_device(fn, maps=maps, **{name: x})


@torch.library.register_fake("pyops::diagonal_stats_fwd")
def _fwd_fake(maps, num_lags):
    _check_fwd_op(maps, num_lags, "pyops::diagonal_stats_fwd")
    shape = (maps.shape[0], num_lags)
    return maps.new_empty(shape, dtype=acc_dtype(maps)), maps.new_empty(shape, dtype=acc_dtype(maps))


@torch.library.register_fake("pyops::diagonal_stats_bwd")
def _bwd_fake(g_mean, g_std, maps, mean, std):
    _check_bwd_op(g_mean, g_std, maps, mean, std, "pyops::diagonal_stats_bwd")
    return torch.empty_like(maps, memory_format=torch.contiguous_format)


def _setup_ctx(ctx, inputs, output):
    maps, _ = inputs
    ctx.save_for_backward(maps, *output)


def _backward(ctx, g_mean, g_std):
    maps, mean, std = ctx.saved_tensors
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
    g_std = torch.zeros_like(std) if g_std is None else g_std
    return _ops.diagonal_stats_bwd(g_mean, g_std, maps, mean, std), None


torch.library.register_autograd("pyops::diagonal_stats_fwd", _backward, setup_context=_setup_ctx)
_backend.register_no_double_backward("diagonal_stats_bwd")


# --------------------------------------------------------------------------------------------
# Triton kernels (registered for CUDA; tested on the CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or unusable: the CPU kernel still works
    triton = None

if triton is not None:

    @triton.jit
    def _diag_sum(base, n, T, pivot, dt: tl.constexpr, BLOCK: tl.constexpr):
        # sum_i (S[i, i + k] - pivot) along the diagonal starting at base (n entries, stride T + 1)
        acc = tl.zeros([BLOCK], dtype=dt)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            x = tl.load(base + i * (T + 1), mask=i < n, other=0.0).to(dt)
            acc += tl.where(i < n, x - pivot, 0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _diag_fwd_kernel(s_ptr, mean_ptr, std_ptr, T, K, ACC64: tl.constexpr, BLOCK: tl.constexpr):
        # one program per (map, lag): two passes over the diagonal S[b, i, i + k]. The second
        # pass sums d = S - m0 and d^2 around the first pass's mean m0 (the corrected two-pass
        # algorithm): the mean is m0 + sum(d) / n and the variance (sum(d^2) - sum(d)^2 / n) / (n - 1),
        # so m0's float32 rounding (~1e-7 of |mean|) costs neither of them digits where std << |mean|
        dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
        b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64)
        n = T - k
        base = s_ptr + b * T * T + k
        m0 = _diag_sum(base, n, T, 0.0, dt, BLOCK) / n
        acc1 = tl.zeros([BLOCK], dtype=dt)
        acc2 = tl.zeros([BLOCK], dtype=dt)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            d = tl.where(i < n, tl.load(base + i * (T + 1), mask=i < n, other=0.0).to(dt) - m0, 0.0)
            acc1 += d
            acc2 += d * d
        s1 = tl.sum(acc1, axis=0)
        var = tl.maximum(tl.sum(acc2, axis=0) - s1 * s1 / n, 0.0) / (n - 1)
        tl.store(mean_ptr + b * K + k, m0 + s1 / n)
        tl.store(std_ptr + b * K + k, tl.sqrt(var))

    @triton.jit
    def _diag_bwd_kernel(
        gm_ptr, gs_ptr, s_ptr, mean_ptr, std_ptr, out_ptr, T, K, ACC64: tl.constexpr, BLOCK: tl.constexpr
    ):
        dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
        b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64)
        n = T - k
        t = b * K + k
        a = tl.load(gm_ptr + t).to(dt) / n
        sd = tl.load(std_ptr + t).to(dt)
        c = tl.where(sd > 0, tl.load(gs_ptr + t).to(dt) / ((n - 1) * tl.where(sd > 0, sd, 1.0)), 0.0)
        m = tl.load(mean_ptr + t).to(dt)
        off = b * T * T + k
        # the diagonal's exact mean is m + r, r = mean_i (S - m): the saved mean is rounded to
        # float32 for float32 maps, which alone would cost S - mean most of its digits where
        # std << |mean| (S - m is small there, so r sums accurately in float32)
        r = _diag_sum(s_ptr + off, n, T, m, dt, BLOCK) / n
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            j = off + i * (T + 1)
            x = tl.load(s_ptr + j, mask=i < n, other=0.0).to(dt)
            tl.store(out_ptr + j, (a + c * ((x - m) - r)).to(out_ptr.dtype.element_ty), mask=i < n)


_TRITON_BLOCK = 128


def triton_diagonal_stats_fwd(maps, num_lags):
    """Triton kernel of ``pyops::diagonal_stats_fwd`` (registered for CUDA)."""
    _check_fwd_op(maps, num_lags, "pyops::diagonal_stats_fwd")
    m = maps.contiguous()
    B, T = m.shape[0], m.shape[1]
    acc = acc_dtype(maps)
    mean = torch.empty(B, num_lags, dtype=acc, device=maps.device)
    std = torch.empty(B, num_lags, dtype=acc, device=maps.device)
    if B * num_lags > 0:
        with _backend.device_guard(m):
            _diag_fwd_kernel[(B, num_lags)](m, mean, std, T, num_lags, ACC64=acc == torch.float64, BLOCK=_TRITON_BLOCK)
    return mean, std


def triton_diagonal_stats_bwd(g_mean, g_std, maps, mean, std):
    """Triton kernel of ``pyops::diagonal_stats_bwd`` (registered for CUDA)."""
    _check_bwd_op(g_mean, g_std, maps, mean, std, "pyops::diagonal_stats_bwd")
    m = maps.contiguous()
    B, T, K = m.shape[0], m.shape[1], mean.shape[-1]
    out = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
    if B * K > 0:
        with _backend.device_guard(m):
            _diag_bwd_kernel[(B, K)](
                g_mean.contiguous(),
                g_std.contiguous(),
                m,
                mean.contiguous(),
                std.contiguous(),
                out,
                T,
                K,
                ACC64=acc_dtype(maps) == torch.float64,
                BLOCK=_TRITON_BLOCK,
            )
    return out


if triton is not None:
    _backend.register_triton_kernel("diagonal_stats_fwd", triton_diagonal_stats_fwd)
    _backend.register_triton_kernel("diagonal_stats_bwd", triton_diagonal_stats_bwd)
