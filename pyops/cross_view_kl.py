"""Fused cross-view KL + entropy (+ CE) over logits, and the same fused with an LM head.

Where each piece lives:

* schemas: ``csrc/cross_view_kl/cross_view_kl.cpp``
* CPU kernels: ``csrc/cross_view_kl/cross_view_kl_cpu.cpp``
* CUDA kernels: ``csrc/cross_view_kl/cross_view_kl_kernel.cuh`` (device code) and
  ``cross_view_kl_cuda.cu`` (launcher); Triton kernels: this module (section "Triton")
* fake kernels, autograd, input validation, the public functions and the chunked LM-head
  composition: this module
* pure-PyTorch reference: ``pyops/reference.py``

Maths, per row, with u = a / T, w = b / T, p = softmax(u), q = softmax(w):
``KL(p||q) = E_p[u - w] - (lse(u) - lse(w))``, ``H(p) = lse(u) - E_p[u]``, and the gradients
``dKL(p||q)/du = p (log p - log q - KL)``, ``dKL(p||q)/dw = q - p``, ``dH(p)/du = -p (log p + H)``,
``dCE/da = softmax(a) - onehot(y)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _backend
from ._validation import acc_dtype, check_float, check_same_device, check_tensor
from .types import CrossViewOutput

__all__ = ["cross_view_kl_entropy", "fused_linear_cross_view", "fused_linear_cross_view_loss", "CrossViewOutput"]

_ops = torch.ops.pyops


# --------------------------------------------------------------------------------------------
# Input validation (shared by the public functions and the Triton launchers)
# --------------------------------------------------------------------------------------------
def _check_scalars(temperature, ignore_index, fn: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{fn}: temperature must be a Python float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target(target: Optional[torch.Tensor], lead_shape: Sequence[int], fn: str) -> None:
    if target is None:
        return
    check_tensor(target, "target", fn)
    if target.dtype != torch.int64:
        raise TypeError(f"{fn}: target must be int64 (torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(
            f"{fn}: target must have the logits' leading shape {tuple(lead_shape)}, got {tuple(target.shape)}"
        )


def _validate_logits(logits_a, logits_b, target, temperature, ignore_index, fn: str) -> None:
    check_tensor(logits_a, "logits_a", fn)
    check_tensor(logits_b, "logits_b", fn)
    check_float(logits_a, "logits_a", fn)
    check_float(logits_b, "logits_b", fn)
    if logits_a.dim() < 1:
        raise ValueError(f"{fn}: logits_a must have shape (..., V), got a 0-d tensor")
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"{fn}: logits_a and logits_b must have the same shape, got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    if logits_a.dtype != logits_b.dtype:
        raise TypeError(
            f"{fn}: logits_a and logits_b must have the same dtype, got {logits_a.dtype} and {logits_b.dtype}"
        )
    if logits_a.shape[-1] == 0:
        raise ValueError(f"{fn}: the vocabulary size V = logits_a.shape[-1] must be > 0, got 0")
    _check_target(target, logits_a.shape[:-1], fn)
    check_same_device(fn, logits_a=logits_a, logits_b=logits_b, target=target)
    _check_scalars(temperature, ignore_index, fn)


def _check_target_range(target: Optional[torch.Tensor], vocab: int, ignore_index: int, fn: str) -> None:
    """Data check of the target (one host sync); used by the GPU launchers. The CPU kernel
    checks each row as it goes."""
    if target is None or target.numel() == 0:
        return
    if _backend.no_values(target):
        return  # no host sync in CUDA-graph capture (the kernels never index with a bad target), no data on meta
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: target[{idx}] = {int(target[idx])} is out of range [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def _check_row_op(logits_a, logits_b, target, temperature, ignore_index, fn: str) -> None:
    """The registered row ops' tensor arguments (2-D logits, (N,) target); metadata only."""
    check_tensor(logits_a, "logits_a", fn)
    if logits_a.dim() != 2:
        raise ValueError(f"{fn}: logits_a must have shape (N, V), got {tuple(logits_a.shape)}")
    _validate_logits(logits_a, logits_b, target, temperature, ignore_index, fn)


def _check_bwd_rows(fn: str, ref: torch.Tensor, ref_name: str, lse, per_row: dict) -> None:
    """The backward ops' per-row gradients and statistics ((N,), floating) and lse ((N, 3)), on
    the device of ref (the logits or hidden states, N rows)."""
    n_rows = ref.shape[0]
    for name, t in {**per_row, "lse": lse}.items():
        if t is None:
            continue
        check_tensor(t, name, fn)
        if name != "lse" and t.shape != (n_rows,):
            raise ValueError(f"{fn}: {name} must have shape (N,) = ({n_rows},), got {tuple(t.shape)}")
        check_float(t, name, fn)
        check_same_device(fn, **{ref_name: ref, name: t})
    if lse.shape != (n_rows, 3):
        raise ValueError(f"{fn}: lse must have shape (N, 3) = ({n_rows}, 3), got {tuple(lse.shape)}")


def _check_grad_ce(g_ce, target, fn: str) -> None:
    if g_ce is not None and target is None:
        raise ValueError(f"{fn}: grad_ce_a needs a target (target is None)")


def _check_chunk_size(chunk_size, fn: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: chunk_size must be a positive int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size}")


def _validate_linear(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, fn: str) -> None:
    """The LM-head composition's arguments, hidden states of shape (..., H)."""
    for name, t in (("hidden_a", hidden_a), ("hidden_b", hidden_b), ("weight", weight)):
        check_tensor(t, name, fn)
        check_float(t, name, fn)
    if hidden_a.dim() < 1 or hidden_a.shape != hidden_b.shape:
        raise ValueError(
            f"{fn}: hidden_a and hidden_b must have the same shape (..., H), got "
            f"{tuple(hidden_a.shape)} and {tuple(hidden_b.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden_a.shape[-1]:
        raise ValueError(
            f"{fn}: weight must have shape (V, H) with H = hidden_a.shape[-1] = {hidden_a.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{fn}: the vocabulary size V = weight.shape[0] must be > 0, got 0")
    dtypes = {hidden_a.dtype, hidden_b.dtype, weight.dtype}
    if bias is not None:
        check_tensor(bias, "bias", fn)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        dtypes.add(bias.dtype)
    if len(dtypes) != 1:
        raise TypeError(
            f"{fn}: hidden_a, hidden_b, weight and bias must share one dtype, got {sorted(map(str, dtypes))}"
        )
    _check_target(target, hidden_a.shape[:-1], fn)
    check_same_device(fn, hidden_a=hidden_a, hidden_b=hidden_b, weight=weight, bias=bias, target=target)
    _check_scalars(temperature, ignore_index, fn)


def _check_linear_op(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size, fn) -> None:
    """The registered LM-head ops' arguments (2-D hidden states); metadata only."""
    check_tensor(hidden_a, "hidden_a", fn)
    if hidden_a.dim() != 2:
        raise ValueError(f"{fn}: hidden_a must have shape (N, H), got {tuple(hidden_a.shape)}")
    _validate_linear(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, fn)
    _check_chunk_size(chunk_size, fn)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def cross_view_kl_entropy(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> CrossViewOutput:
    """Fused per-row cross-view divergences, entropies and cross-entropy of two sets of logits.

    Args:
        logits_a, logits_b: ``(..., V)`` float32/float16/bfloat16 (or float64) logits of the two
            views, same shape and dtype.
        target: ``(...)`` int64 class indices, or None. Rows equal to ``ignore_index`` get
            ``ce_a = 0`` and no CE gradient.
        temperature: T > 0; ``p = softmax(logits / T)`` for the KL and entropy terms (the CE uses
            temperature 1).

    Returns:
        ``CrossViewOutput(kl_ab, kl_ba, entropy_a, entropy_b, ce_a)``, each float32 of shape
        ``(...)`` (float64 for float64 logits); ``ce_a`` is None without a target. Every output
        is differentiable w.r.t. both logits. A NaN or infinite logit makes that row's outputs
        non-finite (NaN, or +inf where a KL really is infinite) and leaves the other rows alone.
    """
    fn = "cross_view_kl_entropy"
    _validate_logits(logits_a, logits_b, target, temperature, ignore_index, fn)
    lead, vocab = logits_a.shape[:-1], logits_a.shape[-1]
    t2 = None if target is None else target.reshape(-1)
    kl_ab, kl_ba, ent_a, ent_b, ce, _ = _ops.cross_view_kl_entropy_fwd(
        logits_a.reshape(-1, vocab), logits_b.reshape(-1, vocab), t2, float(temperature), int(ignore_index)
    )
    return CrossViewOutput(
        kl_ab.view(lead),
        kl_ba.view(lead),
        ent_a.view(lead),
        ent_b.view(lead),
        None if target is None else ce.view(lead),
    )


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk of ``fused_linear_cross_view``: about 64 MiB of float32 logits per view."""
    return max(1, min(n_rows, (64 << 20) // (4 * max(vocab, 1))))


def fused_linear_cross_view(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> CrossViewOutput:
    """``cross_view_kl_entropy`` of the logits ``hidden @ weight.T + bias`` of two views that
    share an LM head, computed ``chunk_size`` rows at a time: the logits never exist for all
    rows at once (forward or backward). Gradients flow to ``hidden_a``, ``hidden_b``,
    ``weight`` and ``bias``.

    Args:
        hidden_a, hidden_b: ``(..., H)`` hidden states of the two views (same shape and dtype).
        weight: ``(V, H)``; bias: ``(V,)`` or None; target: ``(...)`` int64 or None.
        chunk_size: rows per chunk; default ``default_chunk_size(N, V)`` (~64 MiB of logits).
    """
    fn = "fused_linear_cross_view"
    _validate_linear(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, fn)
    lead, hid = hidden_a.shape[:-1], hidden_a.shape[-1]
    n_rows = math.prod(lead)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, weight.shape[0])
    else:
        _check_chunk_size(chunk_size, fn)
    t2 = None if target is None else target.reshape(-1)
    kl_ab, kl_ba, ent_a, ent_b, ce, _ = _ops.fused_linear_cross_view_fwd(
        hidden_a.reshape(-1, hid),
        hidden_b.reshape(-1, hid),
        weight,
        bias,
        t2,
        float(temperature),
        int(ignore_index),
        int(chunk_size),
    )
    return CrossViewOutput(
        kl_ab.view(lead),
        kl_ba.view(lead),
        ent_a.view(lead),
        ent_b.view(lead),
        None if target is None else ce.view(lead),
    )


_TERM_WEIGHTS = ("kl_ab_weight", "kl_ba_weight", "entropy_a_weight", "entropy_b_weight", "ce_weight")
_LOSS_REDUCTIONS = ("mean", "sum")


def _check_term_weights(term_weights, has_target: bool, fn: str) -> list[float]:
    ws = list(term_weights)
    if len(ws) != 5:
        raise ValueError(f"{fn}: term_weights must have 5 entries ({', '.join(_TERM_WEIGHTS)}), got {len(ws)}")
    for name, w in zip(_TERM_WEIGHTS, ws):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"{fn}: {name} must be a real number (int or float), got {type(w).__name__}")
        if not math.isfinite(w):
            raise ValueError(f"{fn}: {name} must be finite, got {w}")
    if not any(ws):
        raise ValueError(f"{fn}: every term weight ({', '.join(_TERM_WEIGHTS)}) is 0; the loss would be 0")
    if ws[4] != 0 and not has_target:
        raise ValueError(f"{fn}: ce_weight = {ws[4]} needs a target; got target=None")
    return [float(w) for w in ws]


def _check_loss_reduction(reduction, fn: str) -> None:
    if reduction not in _LOSS_REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be one of {_LOSS_REDUCTIONS}, got {reduction!r} (per-row values: "
            "fused_linear_cross_view)"
        )


def fused_linear_cross_view_loss(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    *,
    kl_ab_weight: float = 0.5,
    kl_ba_weight: float = 0.5,
    entropy_a_weight: float = 0.0,
    entropy_b_weight: float = 0.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    return_terms: bool = False,
):
    """A weighted loss of the terms of ``fused_linear_cross_view`` (logits ``hidden @ weight.T +
    bias`` of two views sharing an LM head), with its gradients computed during the forward.

    ``loss = kl_ab_weight * R(KL(p_a||p_b)) + kl_ba_weight * R(KL(p_b||p_a)) + entropy_a_weight *
    R(H(p_a)) + entropy_b_weight * R(H(p_b)) + ce_weight * R(CE(a, target))``, where ``R`` is the
    reduction over the rows that count (every row without a target, else those whose target is
    not ``ignore_index``): ``"mean"`` (NaN when no row counts) or ``"sum"``; ``p = softmax(logits /
    temperature)`` for the KL and entropy terms, temperature 1 for the CE. Terms of weight 0 add
    nothing to the loss.

    Because the weights are fixed before the forward, each chunk of ``chunk_size`` rows (default
    ``default_chunk_size(N, V)``: about 64 MiB of float32 logits per view) has its
    logits computed once, overwritten by their gradients in the same pass over the rows, and
    turned into the gradients of ``hidden_a``, ``hidden_b``, ``weight`` and ``bias`` right away
    (the approach of Liger-Kernel's fused linear cross-entropy): two matmuls fewer than
    ``fused_linear_cross_view`` + backward, and no logits kept. The backward only scales those
    gradients (kept from the forward: the size of the hidden states and of the weight) by the
    loss's upstream gradient. Gradients are computed for the inputs that require them when grad
    mode is on; double backward is not supported.

    For arbitrary upstream gradients of the per-row values use ``fused_linear_cross_view``.

    Returns:
        the loss (0-d, float32; float64 for float64 inputs), or with ``return_terms=True``
        ``(loss, terms)``, ``terms`` a ``CrossViewOutput`` of every term reduced the same way
        (detached; ``ce_a`` None without a target), so that ``loss == sum(weight * term)``.
    """
    fn = "fused_linear_cross_view_loss"
    _validate_linear(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, fn)
    weights = _check_term_weights(
        (kl_ab_weight, kl_ba_weight, entropy_a_weight, entropy_b_weight, ce_weight), target is not None, fn
    )
    _check_loss_reduction(reduction, fn)
    lead, hid = hidden_a.shape[:-1], hidden_a.shape[-1]
    n_rows = math.prod(lead)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, weight.shape[0])
    else:
        _check_chunk_size(chunk_size, fn)
    grad_on = torch.is_grad_enabled()
    mask = [
        grad_on and hidden_a.requires_grad,
        grad_on and hidden_b.requires_grad,
        grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)),
    ]
    loss, terms, *_ = _ops.fused_linear_cross_view_loss(
        hidden_a.reshape(-1, hid),
        hidden_b.reshape(-1, hid),
        weight,
        bias,
        None if target is None else target.reshape(-1),
        weights,
        float(temperature),
        int(ignore_index),
        reduction,
        int(chunk_size),
        mask,
    )
    if not return_terms:
        return loss
    t = terms.detach()
    return loss, CrossViewOutput(t[0], t[1], t[2], t[3], t[4] if target is not None else None)


# --------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------
def _row_outputs_like(x: torch.Tensor, n_rows, has_target: bool):
    dt = acc_dtype(x)
    rows = [x.new_empty((n_rows,), dtype=dt) for _ in range(4)]
    ce = x.new_empty((n_rows if has_target else 0,), dtype=dt)
    return (*rows, ce, x.new_empty((n_rows, 3), dtype=dt))


def _check_row_bwd_op(
    g_kab,
    g_kba,
    g_ha,
    g_hb,
    g_ce,
    logits_a,
    logits_b,
    target,
    kl_ab,
    kl_ba,
    ent_a,
    ent_b,
    lse,
    temperature,
    ignore_index,
    fn,
) -> None:
    _check_row_op(logits_a, logits_b, target, temperature, ignore_index, fn)
    _check_bwd_rows(
        fn,
        logits_a,
        "logits_a",
        lse,
        dict(
            grad_kl_ab=g_kab,
            grad_kl_ba=g_kba,
            grad_entropy_a=g_ha,
            grad_entropy_b=g_hb,
            grad_ce_a=g_ce,
            kl_ab=kl_ab,
            kl_ba=kl_ba,
            entropy_a=ent_a,
            entropy_b=ent_b,
        ),
    )
    _check_grad_ce(g_ce, target, fn)


def _check_linear_bwd_op(
    g_kab,
    g_kba,
    g_ha,
    g_hb,
    g_ce,
    hidden_a,
    hidden_b,
    weight,
    bias,
    target,
    kl_ab,
    kl_ba,
    ent_a,
    ent_b,
    lse,
    temperature,
    ignore_index,
    chunk_size,
    fn,
) -> None:
    _check_linear_op(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size, fn)
    _check_bwd_rows(
        fn,
        hidden_a,
        "hidden_a",
        lse,
        dict(
            grad_kl_ab=g_kab,
            grad_kl_ba=g_kba,
            grad_entropy_a=g_ha,
            grad_entropy_b=g_hb,
            grad_ce_a=g_ce,
            kl_ab=kl_ab,
            kl_ba=kl_ba,
            entropy_a=ent_a,
            entropy_b=ent_b,
        ),
    )
    _check_grad_ce(g_ce, target, fn)


@torch.library.register_fake("pyops::cross_view_kl_entropy_fwd")
def _cross_view_kl_entropy_fwd_fake(logits_a, logits_b, target, temperature, ignore_index):
    _check_row_op(logits_a, logits_b, target, temperature, ignore_index, "pyops::cross_view_kl_entropy_fwd")
    return _row_outputs_like(logits_a, logits_a.shape[0], target is not None)


@torch.library.register_fake("pyops::cross_view_kl_entropy_bwd")
def _cross_view_kl_entropy_bwd_fake(*args):
    _check_row_bwd_op(*args, fn="pyops::cross_view_kl_entropy_bwd")
    logits_a, logits_b = args[5], args[6]
    # contiguous, as every kernel returns them (empty_like would keep strided logits' layout)
    return logits_a.new_empty(logits_a.shape), logits_b.new_empty(logits_b.shape)


@torch.library.register_fake("pyops::fused_linear_cross_view_fwd")
def _fused_linear_cross_view_fwd_fake(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size):
    _check_linear_op(
        hidden_a,
        hidden_b,
        weight,
        bias,
        target,
        temperature,
        ignore_index,
        chunk_size,
        "pyops::fused_linear_cross_view_fwd",
    )
    return _row_outputs_like(hidden_a, hidden_a.shape[0], target is not None)


@torch.library.register_fake("pyops::fused_linear_cross_view_bwd")
def _fused_linear_cross_view_bwd_fake(
    g_kab,
    g_kba,
    g_ha,
    g_hb,
    g_ce,
    hidden_a,
    hidden_b,
    weight,
    bias,
    target,
    kl_ab,
    kl_ba,
    ent_a,
    ent_b,
    lse,
    temperature,
    ignore_index,
    chunk_size,
    output_mask,
):
    _check_linear_bwd_op(
        g_kab,
        g_kba,
        g_ha,
        g_hb,
        g_ce,
        hidden_a,
        hidden_b,
        weight,
        bias,
        target,
        kl_ab,
        kl_ba,
        ent_a,
        ent_b,
        lse,
        temperature,
        ignore_index,
        chunk_size,
        "pyops::fused_linear_cross_view_bwd",
    )
    need_ha, need_hb, need_w = output_mask
    empty = hidden_a.new_empty((0,))
    return (
        torch.empty_like(hidden_a) if need_ha else empty,
        torch.empty_like(hidden_b) if need_hb else empty.clone(),
        weight.new_empty(weight.shape) if need_w else empty.clone(),  # contiguous, as _fused_linear_bwd_impl's
        bias.new_empty(bias.shape) if (need_w and bias is not None) else empty.clone(),
    )


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _check_fwd_bwd_op(logits_a, logits_b, target, g_kab, g_kba, g_ha, g_hb, g_ce, temperature, ignore_index, fn):
    _check_row_op(logits_a, logits_b, target, temperature, ignore_index, fn)
    n_rows = logits_a.shape[0]
    grads = dict(grad_kl_ab=g_kab, grad_kl_ba=g_kba, grad_entropy_a=g_ha, grad_entropy_b=g_hb, grad_ce_a=g_ce)
    for name, t in grads.items():
        if t is None:
            continue
        check_tensor(t, name, fn)
        if t.shape != (n_rows,):
            raise ValueError(f"{fn}: {name} must have shape (N,) = ({n_rows},), got {tuple(t.shape)}")
        check_float(t, name, fn)
        check_same_device(fn, logits_a=logits_a, **{name: t})
    _check_grad_ce(g_ce, target, fn)
    if not (logits_a.is_contiguous() and logits_b.is_contiguous()):
        raise ValueError(f"{fn}: logits_a and logits_b must be contiguous (their gradients are written in place)")


@torch.library.register_fake("pyops::cross_view_kl_entropy_fwd_bwd_")
def _cross_view_kl_entropy_fwd_bwd_fake(*args):
    _check_fwd_bwd_op(*args, fn="pyops::cross_view_kl_entropy_fwd_bwd_")
    logits_a, target = args[0], args[2]
    return _row_outputs_like(logits_a, logits_a.shape[0], target is not None)[:5]


def _check_loss_op(
    hidden_a, hidden_b, weight, bias, target, term_weights, temperature, ignore_index, reduction, chunk_size, fn
) -> list[float]:
    _check_linear_op(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size, fn)
    _check_loss_reduction(reduction, fn)
    return _check_term_weights(term_weights, target is not None, fn)


@torch.library.register_fake("pyops::fused_linear_cross_view_loss")
def _fused_linear_cross_view_loss_fake(
    hidden_a, hidden_b, weight, bias, target, term_weights, temperature, ignore_index, reduction, chunk_size, mask
):
    _check_loss_op(
        hidden_a,
        hidden_b,
        weight,
        bias,
        target,
        term_weights,
        temperature,
        ignore_index,
        reduction,
        chunk_size,
        "pyops::fused_linear_cross_view_loss",
    )
    dt = acc_dtype(hidden_a)
    empty = hidden_a.new_empty((0,))
    return (
        hidden_a.new_empty((), dtype=dt),
        hidden_a.new_empty((5,), dtype=dt),
        hidden_a.new_empty(hidden_a.shape) if mask[0] else empty,
        hidden_b.new_empty(hidden_b.shape) if mask[1] else empty.clone(),
        weight.new_empty(weight.shape) if mask[2] else empty.clone(),
        bias.new_empty(bias.shape) if (mask[2] and bias is not None) else empty.clone(),
    )


def _setup_row_ctx(ctx, inputs, output):
    logits_a, logits_b, target, temperature, ignore_index = inputs
    kl_ab, kl_ba, ent_a, ent_b, _ce, lse = output
    ctx.save_for_backward(logits_a, logits_b, target, kl_ab, kl_ba, ent_a, ent_b, lse)
    ctx.temperature, ctx.ignore_index, ctx.has_target = temperature, ignore_index, target is not None
    ctx.set_materialize_grads(False)


def _row_backward(ctx, g_kab, g_kba, g_ha, g_hb, g_ce, _g_lse):
    logits_a, logits_b, target, kl_ab, kl_ba, ent_a, ent_b, lse = ctx.saved_tensors
    if not ctx.has_target:
        g_ce = None
    if all(g is None for g in (g_kab, g_kba, g_ha, g_hb, g_ce)):
        return None, None, None, None, None
    grad_a, grad_b = _ops.cross_view_kl_entropy_bwd(
        g_kab,
        g_kba,
        g_ha,
        g_hb,
        g_ce,
        logits_a,
        logits_b,
        target,
        kl_ab,
        kl_ba,
        ent_a,
        ent_b,
        lse,
        ctx.temperature,
        ctx.ignore_index,
    )
    return (
        grad_a if ctx.needs_input_grad[0] else None,
        grad_b if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


def _setup_linear_ctx(ctx, inputs, output):
    hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size = inputs
    kl_ab, kl_ba, ent_a, ent_b, _ce, lse = output
    ctx.save_for_backward(hidden_a, hidden_b, weight, bias, target, kl_ab, kl_ba, ent_a, ent_b, lse)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.has_target, ctx.has_bias = target is not None, bias is not None
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, g_kab, g_kba, g_ha, g_hb, g_ce, _g_lse):
    hidden_a, hidden_b, weight, bias, target, kl_ab, kl_ba, ent_a, ent_b, lse = ctx.saved_tensors
    if not ctx.has_target:
        g_ce = None
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] or (ctx.has_bias and need[3])]
    if all(g is None for g in (g_kab, g_kba, g_ha, g_hb, g_ce)) or not any(mask):
        return (None,) * 8
    gha, ghb, gw, gbias = _ops.fused_linear_cross_view_bwd(
        g_kab,
        g_kba,
        g_ha,
        g_hb,
        g_ce,
        hidden_a,
        hidden_b,
        weight,
        bias,
        target,
        kl_ab,
        kl_ba,
        ent_a,
        ent_b,
        lse,
        ctx.temperature,
        ctx.ignore_index,
        ctx.chunk_size,
        mask,
    )
    return (
        gha if need[0] else None,
        ghb if need[1] else None,
        gw if need[2] else None,
        gbias if (ctx.has_bias and need[3]) else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("pyops::cross_view_kl_entropy_fwd", _row_backward, setup_context=_setup_row_ctx)
torch.library.register_autograd("pyops::fused_linear_cross_view_fwd", _linear_backward, setup_context=_setup_linear_ctx)
for _name in ("cross_view_kl_entropy_bwd", "fused_linear_cross_view_bwd"):
    _backend.register_no_double_backward(_name)


def _setup_loss_ctx(ctx, inputs, output):
    _loss, terms, gha, ghb, gw, gbias = output
    ctx.mark_non_differentiable(terms, gha, ghb, gw, gbias)
    ctx.save_for_backward(gha, ghb, gw, gbias)
    ctx.output_mask = list(inputs[10])
    ctx.has_bias = inputs[3] is not None


def _loss_backward(ctx, g_loss, *_unused):
    fn = "pyops::fused_linear_cross_view_loss"
    if torch.is_grad_enabled():
        raise NotImplementedError(f"{fn}: double backward is not supported (the gradients come from the forward)")
    need = ctx.needs_input_grad
    wanted = [need[0], need[1], need[2] or (ctx.has_bias and need[3])]
    for i, name in enumerate(("hidden_a", "hidden_b", "weight and bias")):
        if wanted[i] and not ctx.output_mask[i]:
            raise RuntimeError(
                f"{fn}: a gradient w.r.t. {name} is needed but output_mask[{i}] was False in the forward, so it "
                "was not computed (call pyops.fused_linear_cross_view_loss, which sets output_mask)"
            )
    if g_loss is None:
        return (None,) * 11
    gha, ghb, gw, gbias = ctx.saved_tensors
    # An upstream gradient of exactly 1 (loss.backward()) returns the forward's gradients as they
    # are; no pass over the weight-sized gradient.
    # (plain tensors only: not while traced, where the values are not there)
    one = type(g_loss) is torch.Tensor and not _backend.no_values(g_loss) and bool(g_loss == 1)

    def scaled(g):
        return g if one else g * g_loss.to(g.dtype)

    return (
        scaled(gha) if need[0] else None,
        scaled(ghb) if need[1] else None,
        scaled(gw) if need[2] else None,
        scaled(gbias) if (ctx.has_bias and need[3]) else None,
    ) + (None,) * 7


torch.library.register_autograd("pyops::fused_linear_cross_view_loss", _loss_backward, setup_context=_setup_loss_ctx)


# --------------------------------------------------------------------------------------------
# LM-head composition (device-generic: matmuls + the row op, chunk by chunk)
# --------------------------------------------------------------------------------------------
def _slice(t: Optional[torch.Tensor], s: int, e: int) -> Optional[torch.Tensor]:
    return None if t is None else t[s:e]


def _chunk_logits(hidden_a, hidden_b, weight, bias, chunk_size):
    """Yields ``(s, e, h2, logits)`` per chunk of rows [s, e): ``h2`` the stacked hidden states
    [h_a[s:e]; h_b[s:e]] (2n, H) and ``logits`` both views' logits (2n, V) by one matmul of
    ``h2``, in one buffer reused by every chunk (overwritten by the next one)."""
    n_rows, vocab = hidden_a.shape[0], weight.shape[0]
    chunk = min(chunk_size, max(n_rows, 1))
    buf = hidden_a.new_empty((2 * chunk, vocab))
    wt = weight.t()
    for s in range(0, n_rows, chunk):
        e = min(n_rows, s + chunk)
        h2 = torch.cat((hidden_a[s:e], hidden_b[s:e]))
        logits = buf[: 2 * (e - s)]
        if bias is None:
            torch.mm(h2, wt, out=logits)
        else:
            torch.addmm(bias, h2, wt, out=logits)
        yield s, e, h2, logits


def _fused_linear_fwd_impl(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size):
    fn = "pyops::fused_linear_cross_view_fwd"
    _check_linear_op(hidden_a, hidden_b, weight, bias, target, temperature, ignore_index, chunk_size, fn)
    _check_target_range(target, weight.shape[0], ignore_index, fn)
    n_rows = hidden_a.shape[0]
    outs = _row_outputs_like(hidden_a, n_rows, target is not None)
    for s, e, _h2, logits in _chunk_logits(hidden_a, hidden_b, weight, bias, chunk_size):
        n = e - s
        res = _ops.cross_view_kl_entropy_fwd(logits[:n], logits[n:], _slice(target, s, e), temperature, ignore_index)
        for out, r in zip(outs, res):
            if out.shape[0]:
                out[s:e] = r
    return outs


def _fused_linear_bwd_impl(
    g_kab,
    g_kba,
    g_ha,
    g_hb,
    g_ce,
    hidden_a,
    hidden_b,
    weight,
    bias,
    target,
    kl_ab,
    kl_ba,
    ent_a,
    ent_b,
    lse,
    temperature,
    ignore_index,
    chunk_size,
    output_mask,
):
    fn = "pyops::fused_linear_cross_view_bwd"
    _check_linear_bwd_op(
        g_kab,
        g_kba,
        g_ha,
        g_hb,
        g_ce,
        hidden_a,
        hidden_b,
        weight,
        bias,
        target,
        kl_ab,
        kl_ba,
        ent_a,
        ent_b,
        lse,
        temperature,
        ignore_index,
        chunk_size,
        fn,
    )
    if g_ce is not None:
        _check_target_range(target, weight.shape[0], ignore_index, fn)
    if hidden_a.device.type == "cpu":
        # the in-place forward + backward row kernel: each chunk's recomputed logits are read
        # once and overwritten by their gradients (the forward values it recomputes are those saved)
        g = [g_kab, g_kba, g_ha, g_hb, g_ce]
        return _head_chunks(
            hidden_a, hidden_b, weight, bias, target, g, temperature, ignore_index, chunk_size, output_mask
        )
    need_ha, need_hb, need_w = output_mask
    n_rows = hidden_a.shape[0]
    empty = hidden_a.new_empty((0,))
    grad_ha = torch.empty_like(hidden_a) if need_ha else empty
    grad_hb = torch.empty_like(hidden_b) if need_hb else empty.clone()
    # Weight gradients accumulate over chunks in at least float32.
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_w and bias is not None else None
    for s in range(0, n_rows, chunk_size):
        e = min(n_rows, s + chunk_size)
        ha, hb = hidden_a[s:e], hidden_b[s:e]
        logits_a = F.linear(ha, weight, bias)
        logits_b = F.linear(hb, weight, bias)
        dla, dlb = _ops.cross_view_kl_entropy_bwd(
            _slice(g_kab, s, e),
            _slice(g_kba, s, e),
            _slice(g_ha, s, e),
            _slice(g_hb, s, e),
            _slice(g_ce, s, e),
            logits_a,
            logits_b,
            _slice(target, s, e),
            kl_ab[s:e],
            kl_ba[s:e],
            ent_a[s:e],
            ent_b[s:e],
            lse[s:e],
            temperature,
            ignore_index,
        )
        del logits_a, logits_b
        if need_ha:
            torch.mm(dla, weight, out=grad_ha[s:e])
        if need_hb:
            torch.mm(dlb, weight, out=grad_hb[s:e])
        if need_w:
            if dla.dtype == acc:
                grad_w.addmm_(dla.t(), ha).addmm_(dlb.t(), hb)
            else:
                grad_w += (dla.t() @ ha).to(acc)
                grad_w += (dlb.t() @ hb).to(acc)
            if grad_bias is not None:
                grad_bias += dla.sum(0, dtype=acc)
                grad_bias += dlb.sum(0, dtype=acc)
    return (
        grad_ha,
        grad_hb,
        grad_w.to(weight.dtype) if need_w else empty.clone(),
        grad_bias.to(bias.dtype) if grad_bias is not None else empty.clone(),
    )


def _fwd_bwd_composite(logits_a, logits_b, target, g_kab, g_kba, g_ha, g_hb, g_ce, temperature, ignore_index):
    """``pyops::cross_view_kl_entropy_fwd_bwd_`` on devices without a fused kernel (CUDA): the
    forward and backward row ops, the gradients copied into the logits."""
    fn = "pyops::cross_view_kl_entropy_fwd_bwd_"
    _check_fwd_bwd_op(logits_a, logits_b, target, g_kab, g_kba, g_ha, g_hb, g_ce, temperature, ignore_index, fn)
    kl_ab, kl_ba, ent_a, ent_b, ce, lse = _ops.cross_view_kl_entropy_fwd(
        logits_a, logits_b, target, temperature, ignore_index
    )
    ga, gb = _ops.cross_view_kl_entropy_bwd(
        g_kab, g_kba, g_ha, g_hb, g_ce, logits_a, logits_b, target, kl_ab, kl_ba, ent_a, ent_b, lse,
        temperature, ignore_index,
    )  # fmt: skip
    logits_a.copy_(ga)
    logits_b.copy_(gb)
    return kl_ab, kl_ba, ent_a, ent_b, ce


def _head_chunks(
    hidden_a, hidden_b, weight, bias, target, row_grads, temperature, ignore_index, chunk_size, mask, on_values=None
):
    """The chunk loop shared by the loss and the per-row op's backward: per chunk of n rows, the
    logits of both views by one matmul of the stacked hidden states [h_a; h_b] (2n, H), the
    in-place forward + backward row op (the logits become d/d logits of sum_r g[r] . values[r]
    for the per-row upstream gradients ``row_grads``), then d/dh = dl W and d/dW += dl^T h, each
    one matmul of 2n rows. One logits buffer serves every chunk. ``on_values(s, e, values)`` gets
    each chunk's forward values. Returns the gradients asked for by ``mask`` (empty tensors for
    the others)."""
    need_ha, need_hb, need_w = (bool(m) for m in mask)
    need_grad = need_ha or need_hb or need_w
    n_rows, vocab = hidden_a.shape[0], weight.shape[0]
    acc = acc_dtype(hidden_a)
    dev = hidden_a.device
    empty = hidden_a.new_empty((0,))
    grad_ha = torch.empty_like(hidden_a) if need_ha else empty
    grad_hb = torch.empty_like(hidden_b) if need_hb else empty.clone()
    # (float32 / float64 weights: the first chunk writes it, bfloat16 / float16: accumulated)
    alloc = torch.empty if weight.dtype == acc and n_rows > 0 else torch.zeros
    grad_w = alloc(weight.shape, dtype=acc, device=dev) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=dev) if need_w and bias is not None else None
    first = True
    for s, e, h2, logits in _chunk_logits(hidden_a, hidden_b, weight, bias, chunk_size):
        n = e - s
        la, lb = logits[:n], logits[n:]
        t = _slice(target, s, e)
        if need_grad:
            g = [_slice(x, s, e) for x in row_grads]
            values = _ops.cross_view_kl_entropy_fwd_bwd_(la, lb, t, *g, temperature, ignore_index)
        else:
            values = _ops.cross_view_kl_entropy_fwd(la, lb, t, temperature, ignore_index)[:5]
        if on_values is not None:
            on_values(s, e, values)
        if not need_grad:
            continue
        # logits now hold d/d logits
        if need_ha and need_hb:
            gh = torch.mm(logits, weight)
            grad_ha[s:e] = gh[:n]
            grad_hb[s:e] = gh[n:]
        elif need_ha:
            torch.mm(la, weight, out=grad_ha[s:e])
        elif need_hb:
            torch.mm(lb, weight, out=grad_hb[s:e])
        if need_w:
            if logits.dtype != acc:
                grad_w += (logits.t() @ h2).to(acc)
            elif first:
                torch.mm(logits.t(), h2, out=grad_w)
            else:
                grad_w.addmm_(logits.t(), h2)
            if grad_bias is not None:
                grad_bias += logits.sum(0, dtype=acc)
        first = False
    return (
        grad_ha,
        grad_hb,
        grad_w.to(weight.dtype) if need_w else empty.clone(),
        grad_bias.to(bias.dtype) if grad_bias is not None else empty.clone(),
    )


def _fused_linear_loss_impl(
    hidden_a, hidden_b, weight, bias, target, term_weights, temperature, ignore_index, reduction, chunk_size, mask
):
    fn = "pyops::fused_linear_cross_view_loss"
    ws = _check_loss_op(
        hidden_a, hidden_b, weight, bias, target, term_weights, temperature, ignore_index, reduction, chunk_size, fn
    )
    _check_target_range(target, weight.shape[0], ignore_index, fn)
    n_rows = hidden_a.shape[0]
    acc = acc_dtype(hidden_a)
    dev = hidden_a.device
    # the rows that count, and each row's factor in the reduction (0 for the others; 1 / count
    # for "mean"): the per-row upstream gradients of the reduced loss are weight * factor
    valid = None if target is None else target != ignore_index
    if valid is None:
        count = torch.tensor(float(n_rows), dtype=acc, device=dev)
    else:
        count = valid.sum(dtype=acc)
    if reduction == "mean":
        factor = torch.full((n_rows,), 1.0, dtype=acc, device=dev) / count
    else:
        factor = torch.ones(n_rows, dtype=acc, device=dev)
    if valid is not None:
        factor = torch.where(valid, factor, 0.0)
    row_grads = [None if w == 0 else factor * w for w in ws]
    if target is None:
        row_grads[4] = None
    sums = torch.zeros(5, dtype=acc, device=dev)

    def add_values(s, e, values):
        for k, v in enumerate(values):
            if k == 4 and target is None:
                continue
            if valid is not None:
                v = torch.where(valid[s:e], v, 0.0)
            sums[k] += v.sum()

    grads = _head_chunks(
        hidden_a, hidden_b, weight, bias, target, row_grads, temperature, ignore_index, chunk_size, mask, add_values
    )
    terms = sums / count if reduction == "mean" else sums
    loss = sum(w * terms[k] for k, w in enumerate(ws) if w != 0)
    return (loss, terms, *grads)


_impl_lib = torch.library.Library("pyops", "IMPL")
_impl_lib.impl("fused_linear_cross_view_fwd", _fused_linear_fwd_impl, "CompositeExplicitAutograd")
_impl_lib.impl("fused_linear_cross_view_bwd", _fused_linear_bwd_impl, "CompositeExplicitAutograd")
_impl_lib.impl("fused_linear_cross_view_loss", _fused_linear_loss_impl, "CompositeExplicitAutograd")
_impl_lib.impl("cross_view_kl_entropy_fwd_bwd_", _fwd_bwd_composite, "CUDA")


# --------------------------------------------------------------------------------------------
# Triton (CUDA tensors; also runs on CPU tensors under TRITON_INTERPRET=1 for the tests)
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or unusable: the CPU and CUDA C++ kernels still work
    triton = None

if triton is not None:

    @triton.jit
    def _cv_fwd_kernel(
        a_ptr,
        b_ptr,
        t_ptr,
        kab_ptr,
        kba_ptr,
        ha_ptr,
        hb_ptr,
        ce_ptr,
        lse_ptr,
        V,
        inv_t,
        ignore_index,
        HAS_TARGET: tl.constexpr,
        UNIT_T: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * V
        b_row = b_ptr + row * V
        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        # Online state per view: running max (scalar) and lane-wise sums of
        # e = exp(u - m), e * (u - m) and e * (u - w).
        m_a = tl.full([], neg_inf, ACC)
        m_b = tl.full([], neg_inf, ACC)
        m_1 = tl.full([], neg_inf, ACC)
        s_a = tl.zeros([BLOCK], ACC)
        t_a = tl.zeros([BLOCK], ACC)
        x_a = tl.zeros([BLOCK], ACC)
        s_b = tl.zeros([BLOCK], ACC)
        t_b = tl.zeros([BLOCK], ACC)
        x_b = tl.zeros([BLOCK], ACC)
        s_1 = tl.zeros([BLOCK], ACC)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mask = idx < V
            a = tl.load(a_row + idx, mask=mask, other=0.0).to(ACC)
            b = tl.load(b_row + idx, mask=mask, other=0.0).to(ACC)
            u = a * inv_t
            w = b * inv_t
            new_a = tl.maximum(m_a, tl.max(tl.where(mask, u, neg_inf), 0))
            new_b = tl.maximum(m_b, tl.max(tl.where(mask, w, neg_inf), 0))
            sh_a = tl.where(m_a == neg_inf, 0.0, m_a - new_a)
            sh_b = tl.where(m_b == neg_inf, 0.0, m_b - new_b)
            c_a = tl.exp(sh_a)
            c_b = tl.exp(sh_b)
            t_a = c_a * (t_a + s_a * sh_a)
            s_a = c_a * s_a
            x_a = c_a * x_a
            t_b = c_b * (t_b + s_b * sh_b)
            s_b = c_b * s_b
            x_b = c_b * x_b
            m_a = new_a
            m_b = new_b
            d_a = u - m_a
            d_b = w - m_b
            e_a = tl.where(mask, tl.exp(d_a), 0.0)
            e_b = tl.where(mask, tl.exp(d_b), 0.0)
            diff = u - w
            s_a += e_a
            t_a += e_a * d_a
            x_a += e_a * diff
            s_b += e_b
            t_b += e_b * d_b
            x_b -= e_b * diff
            if HAS_TARGET and not UNIT_T:
                new_1 = tl.maximum(m_1, tl.max(tl.where(mask, a, neg_inf), 0))
                sh_1 = tl.where(m_1 == neg_inf, 0.0, m_1 - new_1)
                s_1 = tl.exp(sh_1) * s_1
                m_1 = new_1
                s_1 += tl.where(mask, tl.exp(a - m_1), 0.0)
        sa = tl.sum(s_a, 0)
        sb = tl.sum(s_b, 0)
        log_sa = tl.log(sa)
        log_sb = tl.log(sb)
        lse_u = m_a + log_sa
        lse_w = m_b + log_sb
        tl.store(kab_ptr + row, tl.sum(x_a, 0) / sa - (lse_u - lse_w))
        tl.store(kba_ptr + row, tl.sum(x_b, 0) / sb - (lse_w - lse_u))
        tl.store(ha_ptr + row, log_sa - tl.sum(t_a, 0) / sa)
        tl.store(hb_ptr + row, log_sb - tl.sum(t_b, 0) / sb)
        lse_a1 = lse_u
        if HAS_TARGET:
            if not UNIT_T:
                lse_a1 = m_1 + tl.log(tl.sum(s_1, 0))
            y = tl.load(t_ptr + row)
            valid = y != ignore_index
            # The launcher rejects out-of-range targets; should one get here anyway (CUDA-graph
            # capture skips that check), it gives NaN and is never used as an address.
            in_range = (y >= 0) & (y < V)
            a_y = tl.load(a_row + tl.where(valid & in_range, y, 0)).to(ACC)
            ce = tl.where(in_range, lse_a1 - a_y, float("nan"))
            tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
        tl.store(lse_ptr + 3 * row, lse_u)
        tl.store(lse_ptr + 3 * row + 1, lse_w)
        tl.store(lse_ptr + 3 * row + 2, lse_a1)

    @triton.jit
    def _cv_bwd_kernel(
        a_ptr,
        b_ptr,
        ga_ptr,
        gb_ptr,
        t_ptr,
        gkab_ptr,
        gkba_ptr,
        gha_ptr,
        ghb_ptr,
        gce_ptr,
        kab_ptr,
        kba_ptr,
        ha_ptr,
        hb_ptr,
        lse_ptr,
        V,
        inv_t,
        ignore_index,
        HAS_GKAB: tl.constexpr,
        HAS_GKBA: tl.constexpr,
        HAS_GHA: tl.constexpr,
        HAS_GHB: tl.constexpr,
        HAS_GCE: tl.constexpr,
        UNIT_T: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * V
        b_row = b_ptr + row * V
        offs = tl.arange(0, BLOCK)
        g_kab = tl.zeros([], ACC)
        g_kba = tl.zeros([], ACC)
        g_ha = tl.zeros([], ACC)
        g_hb = tl.zeros([], ACC)
        g_ce = tl.zeros([], ACC)
        y = tl.full([], -1, tl.int64)
        if HAS_GKAB:
            g_kab = tl.load(gkab_ptr + row).to(ACC)
        if HAS_GKBA:
            g_kba = tl.load(gkba_ptr + row).to(ACC)
        if HAS_GHA:
            g_ha = tl.load(gha_ptr + row).to(ACC)
        if HAS_GHB:
            g_hb = tl.load(ghb_ptr + row).to(ACC)
        if HAS_GCE:
            y = tl.load(t_ptr + row)
            g_ce = tl.where(y != ignore_index, tl.load(gce_ptr + row).to(ACC), 0.0)
        kl_ab = tl.load(kab_ptr + row).to(ACC)
        kl_ba = tl.load(kba_ptr + row).to(ACC)
        h_a = tl.load(ha_ptr + row).to(ACC)
        h_b = tl.load(hb_ptr + row).to(ACC)
        lse_u = tl.load(lse_ptr + 3 * row).to(ACC)
        lse_w = tl.load(lse_ptr + 3 * row + 1).to(ACC)
        lse_a1 = tl.load(lse_ptr + 3 * row + 2).to(ACC)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mask = idx < V
            a = tl.load(a_row + idx, mask=mask, other=0.0).to(ACC)
            b = tl.load(b_row + idx, mask=mask, other=0.0).to(ACC)
            lp = a * inv_t - lse_u
            lq = b * inv_t - lse_w
            p = tl.exp(lp)
            q = tl.exp(lq)
            d = lp - lq
            gu = p * (g_kab * (d - kl_ab) + g_kba - g_ha * (lp + h_a)) - g_kba * q
            gw = q * (g_kab - g_kba * (d + kl_ba) - g_hb * (lq + h_b)) - g_kab * p
            ga = gu * inv_t
            if HAS_GCE:
                if UNIT_T:
                    sm = p
                else:
                    sm = tl.exp(a - lse_a1)
                ga += g_ce * (sm - tl.where(idx == y, 1.0, 0.0))
            tl.store(ga_ptr + row * V + idx, ga.to(ga_ptr.dtype.element_ty), mask=mask)
            tl.store(gb_ptr + row * V + idx, (gw * inv_t).to(gb_ptr.dtype.element_ty), mask=mask)


def _triton_launch_config(vocab: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(vocab), 2048)
    return block, (4 if block <= 1024 else 8)


def _tl_acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def triton_cross_view_kl_entropy_fwd(logits_a, logits_b, target, temperature, ignore_index):
    """Triton kernel of ``pyops::cross_view_kl_entropy_fwd`` (registered for CUDA)."""
    fn = "pyops::cross_view_kl_entropy_fwd"
    _check_row_op(logits_a, logits_b, target, temperature, ignore_index, fn)
    n_rows, vocab = logits_a.shape
    _check_target_range(target, vocab, ignore_index, fn)
    a, b = logits_a.contiguous(), logits_b.contiguous()
    outs = _row_outputs_like(a, n_rows, target is not None)
    if n_rows == 0:
        return outs
    block, warps = _triton_launch_config(vocab)
    kl_ab, kl_ba, ent_a, ent_b, ce, lse = outs
    with _backend.device_guard(a):
        _cv_fwd_kernel[(n_rows,)](
            a,
            b,
            target if target is not None else a,
            kl_ab,
            kl_ba,
            ent_a,
            ent_b,
            ce if target is not None else kl_ab,
            lse,
            vocab,
            1.0 / temperature,
            ignore_index,
            HAS_TARGET=target is not None,
            UNIT_T=temperature == 1.0,
            ACC=_tl_acc(a),
            BLOCK=block,
            num_warps=warps,
        )
    return outs


def triton_cross_view_kl_entropy_bwd(
    g_kab,
    g_kba,
    g_ha,
    g_hb,
    g_ce,
    logits_a,
    logits_b,
    target,
    kl_ab,
    kl_ba,
    ent_a,
    ent_b,
    lse,
    temperature,
    ignore_index,
):
    """Triton kernel of ``pyops::cross_view_kl_entropy_bwd`` (registered for CUDA)."""
    fn = "pyops::cross_view_kl_entropy_bwd"
    _check_row_bwd_op(
        g_kab,
        g_kba,
        g_ha,
        g_hb,
        g_ce,
        logits_a,
        logits_b,
        target,
        kl_ab,
        kl_ba,
        ent_a,
        ent_b,
        lse,
        temperature,
        ignore_index,
        fn,
    )
    n_rows, vocab = logits_a.shape
    if g_ce is not None:
        _check_target_range(target, vocab, ignore_index, fn)
    a, b = logits_a.contiguous(), logits_b.contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    if n_rows == 0:
        return grad_a, grad_b
    acc = acc_dtype(a)

    def rows(t):
        return None if t is None else t.to(device=a.device, dtype=acc).contiguous()

    gs = [rows(g) for g in (g_kab, g_kba, g_ha, g_hb, g_ce)]
    fw = [rows(t) for t in (kl_ab, kl_ba, ent_a, ent_b)]
    lse = lse.to(acc).contiguous()
    block, warps = _triton_launch_config(vocab)
    with _backend.device_guard(a):
        _cv_bwd_kernel[(n_rows,)](
            a,
            b,
            grad_a,
            grad_b,
            target if target is not None else a,
            *[g if g is not None else fw[0] for g in gs],
            *fw,
            lse,
            vocab,
            1.0 / temperature,
            ignore_index,
            HAS_GKAB=gs[0] is not None,
            HAS_GKBA=gs[1] is not None,
            HAS_GHA=gs[2] is not None,
            HAS_GHB=gs[3] is not None,
            HAS_GCE=gs[4] is not None,
            UNIT_T=temperature == 1.0,
            ACC=_tl_acc(a),
            BLOCK=block,
            num_warps=warps,
        )
    return grad_a, grad_b


if triton is not None:
    _backend.register_triton_kernel("cross_view_kl_entropy_fwd", triton_cross_view_kl_entropy_fwd)
    _backend.register_triton_kernel("cross_view_kl_entropy_bwd", triton_cross_view_kl_entropy_bwd)
