"""GR loss (Generalized Robust loss, Chen et al., IJCAI 2024) for single-positive multi-label
learning, fused: one elementwise pass forward, one backward.

Where each piece lives:

* schemas and the formulas: ``csrc/gr_loss/gr_loss.cpp``
* CPU kernels: ``csrc/gr_loss/gr_loss_cpu.cpp`` (16-lane float32 vectors, float64 with libm)
* Triton kernels (CUDA): this module (``triton_gr_loss_fwd`` / ``triton_gr_loss_bwd``)
* fake kernels, autograd, input validation, the public function: this module
* pure-PyTorch reference: ``pyops/reference.py`` (``gr_loss``)

The module with the per-epoch schedules of k-hat and v: ``pyops.nn.GRLoss``; the training method:
``methods/grloss`` (a checkout).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import _backend
from ._validation import acc_dtype, check_float, check_same_device, check_tensor

__all__ = ["gr_loss"]

_ops = torch.ops.pyops
_REDUCTIONS = ("none", "sum", "mean")
Pair = Union[Sequence[float], torch.Tensor]


def _pair(x: Pair, name: str, fn: str) -> tuple:
    """(a, b) from a pair of floats / 0-d tensors or a tensor of 2 values."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 2:
            raise ValueError(f"{fn}: {name} must hold 2 values, got a tensor of shape {tuple(x.shape)}")
        return x.reshape(2)[0], x.reshape(2)[1]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a pair of numbers (or a tensor of 2), got {type(x).__name__}")
    if len(x) != 2:
        raise ValueError(f"{fn}: {name} must be a pair of numbers (or a tensor of 2), got {x!r}")
    for v in x:
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{fn}: {name} must hold numbers, got {x!r}")
    return tuple(x)


def _check_finite_scalars(fn: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"{fn}: {name} must be a scalar, got shape {tuple(v.shape)}")
            if v.is_complex() or v.dtype == torch.bool:
                raise TypeError(f"{fn}: {name} must be a real number, got dtype {v.dtype}")
            if _backend.no_values(v):
                continue  # no host reads: meta tensors, traced or captured regions
            v = float(v)
        if not math.isfinite(float(v)):
            raise ValueError(f"{fn}: {name} must be finite, got {v}")
        if name == "sigma" and not float(v) > 0:
            raise ValueError(f"{fn}: sigma (alpha[1], the width of the weight v) must be > 0, got {float(v)}")


def _check_q(q, name: str, fn: str) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"{fn}: {name} must be a Python float, got {type(q).__name__}")
    if not (math.isfinite(q) and q >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0 (0 means the log limit), got {q}")
    return float(q)


def check_observed(observed: torch.Tensor, fn: str, *, values: bool = True, require_positive: bool = True) -> None:
    """Data checks of an observed-label matrix (a host sync): with ``values``, entries in {0, 1};
    with ``require_positive``, at least one observed positive per row (last dim). Skipped while
    compiling or capturing a CUDA graph."""
    if observed.numel() == 0 or _backend.no_values(observed):
        return
    o = observed.detach()
    if values and o.dtype != torch.bool:
        bad = (o != 0) & (o != 1)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{fn}: observed must hold 0 (unobserved) or 1 (observed positive), got {o[idx].item()} at index {idx}"
            )
    if require_positive:
        empty = ~(o != 0).any(dim=-1)
        if bool(empty.any()):
            idx = tuple(int(i) for i in empty.nonzero()[0])
            row = idx[0] if len(idx) == 1 else idx  # (B, C) labels: the row number itself
            raise ValueError(
                f"{fn}: row {row} of observed has no positive label; single-positive "
                "training needs at least one observed positive per row"
            )


def _params(beta: Pair, alpha: Pair, device: torch.device, fn: str) -> torch.Tensor:
    w, b = _pair(beta, "beta", fn)
    mu, sigma = _pair(alpha, "alpha", fn)
    _check_finite_scalars(fn, w=w, b=b, mu=mu, sigma=sigma)
    vals = (w, b, mu, sigma)
    if not any(isinstance(v, torch.Tensor) for v in vals):
        return torch.tensor([float(v) for v in vals], dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()).detach() for v in vals])


def gr_loss(
    logits: torch.Tensor,
    observed: torch.Tensor,
    beta: Pair = (0.0, -2.0),
    alpha: Pair = (0.5, 2.0),
    q2: float = 0.01,
    q3: float = 1.0,
    *,
    reduction: str = "mean",
    require_positive: bool = False,
) -> torch.Tensor:
    """GR loss of multi-label logits against single-positive (or partial positive) labels.

    With p = sigmoid(logits) and s = observed:

    * s = 1: ``-log p``
    * s = 0: ``v(p) * (k(p) * (1 - p^q2) / q2 + (1 - k(p)) * (1 - (1 - p)^q3) / q3)`` with the
      soft pseudo-label ``k(p) = sigmoid(w p + b)`` and the weight
      ``v(p) = exp(-(p - mu)^2 / (2 sigma^2))``, both treated as constants (no gradient flows
      through them, as in the reference code's ``preds.detach()``). q = 0 means the limit
      (``-log p``, ``-log(1 - p)``).

    Computed in logit space: finite for saturated logits (the reference's ``-log(p + 1e-7)``
    differs from ``-log p`` only there).

    Args:
        logits: ``(..., C)`` float32/float16/bfloat16/float64.
        observed: same shape; bool, integer or float; 1 = observed positive, 0 = unobserved.
        beta: ``(w, b)`` of k-hat; alpha: ``(mu, sigma)`` of v, sigma > 0. Floats, 0-d tensors
            or a tensor of 2 (tensors avoid recompiles under ``torch.compile`` when the
            per-epoch schedule changes them).
        q2, q3: the GCE exponents of the positive and negative terms (>= 0).
        reduction: ``"mean"`` (over all entries, the reference's), ``"sum"`` or ``"none"``.
        require_positive: also check that each row has an observed positive (a host sync;
            skipped under ``torch.compile`` and CUDA-graph capture).

    Observed labels other than 0 / 1 raise a ValueError (the CPU kernel checks them as it reads
    them; on CUDA a separate check runs, skipped under ``torch.compile`` and graph capture).

    Returns:
        float32 (float64 for float64 logits): a 0-d loss, or per entry for ``"none"``. The
        mean of no entries is NaN, as ``torch.mean``.
    """
    fn = "gr_loss"
    check_tensor(logits, "logits", fn)
    check_tensor(observed, "observed", fn)
    check_float(logits, "logits", fn)
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must have shape (..., C), got a 0-d tensor")
    if observed.shape != logits.shape:
        raise ValueError(
            f"{fn}: observed must have the logits' shape {tuple(logits.shape)}, got {tuple(observed.shape)}"
        )
    if observed.is_complex():
        raise TypeError(f"{fn}: observed must be bool, integer or float, got {observed.dtype}")
    check_same_device(fn, logits=logits, observed=observed)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    q2, q3 = _check_q(q2, "q2", fn), _check_q(q3, "q3", fn)
    params = _params(beta, alpha, logits.device, fn)
    # (the op checks the label values: the CPU kernel as it reads them, the CUDA one separately)
    check_observed(observed, fn, values=False, require_positive=require_positive)
    return _ops.gr_loss_fwd(logits, observed, params, q2, q3, reduction)


# --------------------------------------------------------------------------------------------
# Checks of the registered ops' arguments (fakes and Triton; the CPU kernels check in C++)
# --------------------------------------------------------------------------------------------
def _check_op(logits, observed, params, q2, q3, reduction, fn: str, grad=None, data: bool = False) -> None:
    """Shapes, dtypes, devices and scalars; with ``data``, also the values of params and of the
    observed labels (host syncs; skipped under CUDA-graph capture)."""
    check_tensor(logits, "logits", fn)
    check_float(logits, "logits", fn)
    check_tensor(observed, "observed", fn)
    if observed.shape != logits.shape:
        raise ValueError(
            f"{fn}: observed must have the logits' shape {tuple(logits.shape)}, got {tuple(observed.shape)}"
        )
    if observed.is_complex():
        raise TypeError(f"{fn}: observed must be bool, integer or float, got {observed.dtype}")
    check_tensor(params, "params", fn)
    if params.shape != (4,):
        raise ValueError(f"{fn}: params must have shape (4,) ([w, b, mu, sigma]), got {tuple(params.shape)}")
    if not params.is_floating_point():
        raise TypeError(f"{fn}: params must be floating point, got {params.dtype}")
    check_same_device(fn, logits=logits, observed=observed, params=params)
    for name, q in (("q2", q2), ("q3", q3)):
        if not (math.isfinite(q) and q >= 0):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0 (0: the log limit), got {q}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if grad is not None:
        check_tensor(grad, "grad", fn)
        check_float(grad, "grad", fn)
        check_same_device(fn, logits=logits, grad=grad)
        if reduction == "none" and grad.shape != logits.shape:
            raise ValueError(
                f"{fn}: grad must have the logits' shape {tuple(logits.shape)} for reduction 'none', "
                f"got {tuple(grad.shape)}"
            )
        if reduction != "none" and grad.numel() != 1:
            raise ValueError(f"{fn}: grad must be a scalar for reduction {reduction!r}, got shape {tuple(grad.shape)}")
    if data and not _backend.no_values(params):
        w, b, mu, sigma = params.detach().double().tolist()
        if not all(math.isfinite(v) for v in (w, b, mu)):
            raise ValueError(f"{fn}: params [w, b, mu, sigma] must be finite, got {[w, b, mu, sigma]}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(
                f"{fn}: sigma (params[3], the width of the weight v) must be a finite number > 0, got {sigma}"
            )
    if data:
        check_observed(observed, fn, values=True, require_positive=False)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("pyops::gr_loss_fwd")
def _gr_loss_fwd_fake(logits, observed, params, q2, q3, reduction):
    _check_op(logits, observed, params, q2, q3, reduction, "pyops::gr_loss_fwd")
    shape = logits.shape if reduction == "none" else ()
    return logits.new_empty(shape, dtype=acc_dtype(logits))


@torch.library.register_fake("pyops::gr_loss_bwd")
def _gr_loss_bwd_fake(grad, logits, observed, params, q2, q3, reduction):
    _check_op(logits, observed, params, q2, q3, reduction, "pyops::gr_loss_bwd", grad=grad)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_ctx(ctx, inputs, output):
    logits, observed, params, q2, q3, reduction = inputs
    ctx.save_for_backward(logits, observed, params)
    ctx.q2, ctx.q3, ctx.reduction = q2, q3, reduction


def _backward(ctx, grad):
    logits, observed, params = ctx.saved_tensors
    g = _ops.gr_loss_bwd(grad, logits, observed, params, ctx.q2, ctx.q3, ctx.reduction)
    return g, None, None, None, None, None


torch.library.register_autograd("pyops::gr_loss_fwd", _backward, setup_context=_setup_ctx)
_backend.register_no_double_backward("gr_loss_bwd")


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
    def _gr_pieces(z, w, b, mu, inv_2s2):
        # -log p, -log(1 - p), p, 1 - p, k(p), v(p) from the logit z (logit space, stable)
        e = tl.exp(-tl.abs(z))
        y = 1.0 + e
        inv = 1.0 / y
        l = tl.log(y) + (e - (y - 1.0)) * inv  # log1p(e): log(y) corrected for the rounding of y
        sp_neg = tl.maximum(-z, 0.0) + l
        sp_pos = tl.maximum(z, 0.0) + l
        pos = z >= 0.0
        p = tl.where(pos, inv, e * inv)
        omp = tl.where(pos, e * inv, inv)
        # NaN logits: tl.maximum may drop the NaN, so put it back
        sp_neg = tl.where(z != z, z, sp_neg)
        sp_pos = tl.where(z != z, z, sp_pos)
        k = 1.0 / (1.0 + tl.exp(-(w * p + b)))
        dv = p - mu
        v = tl.exp(-(dv * dv) * inv_2s2)
        return sp_neg, sp_pos, p, omp, k, v

    @triton.jit
    def _gr_gce(s, q, inv_q):
        # (1 - exp(-q s)) / q (q = 0: s), with expm1 by Kahan's trick: (u - 1) x / log(u), u = e^x
        x = -(s * q)
        u = tl.exp(x)
        um1 = u - 1.0
        special = (um1 == 0.0) | (u == 0.0)  # x ~ 0, or x = -inf
        em1 = um1 * x / tl.log(tl.where(special, 0.5, u))
        em1 = tl.where(um1 == 0.0, x, tl.where(u == 0.0, -1.0, em1))
        return tl.where(q > 0.0, -em1 * inv_q, s)

    @triton.jit
    def _gr_block(z_ptr, obs_ptr, params_ptr, n, dt: tl.constexpr, BLOCK: tl.constexpr):
        # this program's entries: offsets, mask, observed flags and the pieces of the loss
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(dt)
        observed = tl.load(obs_ptr + offs, mask=mask, other=0).to(dt) != 0.0
        w = tl.load(params_ptr + 0).to(dt)
        b = tl.load(params_ptr + 1).to(dt)
        mu = tl.load(params_ptr + 2).to(dt)
        sigma = tl.load(params_ptr + 3).to(dt)
        sp_neg, sp_pos, p, omp, k, v = _gr_pieces(z, w, b, mu, 0.5 / (sigma * sigma))
        return offs, mask, observed, sp_neg, sp_pos, p, omp, k, v

    @triton.jit
    def _gr_fwd_kernel(
        z_ptr,
        obs_ptr,
        params_ptr,
        out_ptr,
        n,
        q2,
        q3,
        inv_q2,
        inv_q3,
        PER_ENTRY: tl.constexpr,
        ACC64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
        offs, mask, observed, sp_neg, sp_pos, p, omp, k, v = _gr_block(z_ptr, obs_ptr, params_ptr, n, dt, BLOCK)
        unobs = v * (k * _gr_gce(sp_neg, q2, inv_q2) + (1.0 - k) * _gr_gce(sp_pos, q3, inv_q3))
        loss = tl.where(observed, sp_neg, unobs)
        if PER_ENTRY:
            tl.store(out_ptr + offs, loss, mask=mask)
        else:
            tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))

    @triton.jit
    def _gr_bwd_kernel(
        g_ptr,
        z_ptr,
        obs_ptr,
        params_ptr,
        out_ptr,
        n,
        scale,
        q2,
        q3,
        PER_ENTRY: tl.constexpr,
        ACC64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        dt: tl.constexpr = tl.float64 if ACC64 else tl.float32
        offs, mask, observed, sp_neg, sp_pos, p, omp, k, v = _gr_block(z_ptr, obs_ptr, params_ptr, n, dt, BLOCK)
        p_q2 = tl.exp(-sp_neg * q2)
        omp_q3 = tl.exp(-sp_pos * q3)
        unobs = v * ((1.0 - k) * omp_q3 * p - k * p_q2 * omp)
        d = tl.where(observed, -omp, unobs)
        if PER_ENTRY:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(dt)
        else:
            g = tl.load(g_ptr).to(dt)
        tl.store(out_ptr + offs, (d * g * scale).to(out_ptr.dtype.element_ty), mask=mask)


_TRITON_BLOCK = 1024


def _triton_inputs(logits, observed, params):
    z = logits.contiguous()
    o = observed.contiguous()
    if o.dtype == torch.bool:
        o = o.view(torch.uint8)  # same bytes; triton loads uint8
    return z, o, params.to(torch.float64).contiguous()


def _inv(q: float) -> float:
    return 1.0 / q if q > 0 else 0.0


def triton_gr_loss_fwd(logits, observed, params, q2, q3, reduction):
    """Triton kernel of ``pyops::gr_loss_fwd`` (registered for CUDA)."""
    _check_op(logits, observed, params, q2, q3, reduction, "pyops::gr_loss_fwd", data=True)
    z, o, p = _triton_inputs(logits, observed, params)
    acc = acc_dtype(logits)
    n = z.numel()
    grid = (triton.cdiv(n, _TRITON_BLOCK),)
    per_entry = reduction == "none"
    out = torch.empty(logits.shape if per_entry else grid, dtype=acc, device=logits.device)
    if n > 0:
        with _backend.device_guard(z):
            _gr_fwd_kernel[grid](
                z,
                o,
                p,
                out,
                n,
                q2,
                q3,
                _inv(q2),
                _inv(q3),
                PER_ENTRY=per_entry,
                ACC64=acc == torch.float64,
                BLOCK=_TRITON_BLOCK,
            )
    if per_entry:
        return out
    total = out.sum(dtype=torch.float64)  # block sums added in a fixed order
    if reduction == "mean":
        total = total / n if n > 0 else torch.full((), float("nan"), dtype=torch.float64, device=logits.device)
    return total.to(acc)


def triton_gr_loss_bwd(grad, logits, observed, params, q2, q3, reduction):
    """Triton kernel of ``pyops::gr_loss_bwd`` (registered for CUDA)."""
    _check_op(logits, observed, params, q2, q3, reduction, "pyops::gr_loss_bwd", grad=grad, data=True)
    z, o, p = _triton_inputs(logits, observed, params)
    n = z.numel()
    per_entry = reduction == "none"
    g = grad.contiguous()
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    scale = 1.0 / n if reduction == "mean" and n > 0 else 1.0
    if n > 0:
        with _backend.device_guard(z):
            _gr_bwd_kernel[(triton.cdiv(n, _TRITON_BLOCK),)](
                g,
                z,
                o,
                p,
                out,
                n,
                scale,
                q2,
                q3,
                PER_ENTRY=per_entry,
                ACC64=acc_dtype(logits) == torch.float64,
                BLOCK=_TRITON_BLOCK,
            )
    return out


if triton is not None:
    _backend.register_triton_kernel("gr_loss_fwd", triton_gr_loss_fwd)
    _backend.register_triton_kernel("gr_loss_bwd", triton_gr_loss_bwd)
