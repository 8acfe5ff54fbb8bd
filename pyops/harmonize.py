"""Batched gradient harmonization: FedGH and PCGrad projections, computed in Gram space.

Where each piece lives:

* schemas (and the Gram-space argument): ``csrc/harmonize/harmonize.cpp``
* CPU kernels: ``csrc/harmonize/harmonize_cpu.cpp``
* CUDA: float64 matmuls over column chunks (this module, registered for the CUDA key); the
  K x K projection loop always runs on the CPU (it is O(K^3) on K x K numbers)
* fake kernels, input validation, public function: this module
* pure-PyTorch reference: ``pyops/reference.py`` (``harmonize_gradients``: the pair-by-pair
  loop on the flattened vectors, and ``pcgrad_visit_orders``)

Each harmonized row is ``g_i = sum_j C[i, j] G_j`` with ``C`` from the projection loop run on
``Gamma = G G^T``; the Gram matrix takes one pass over the gradients and the result one more,
instead of about four passes per conflicting pair.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from ._validation import check_same_device, check_tensor

__all__ = ["harmonize_gradients", "HarmonizeStats"]

_ops = torch.ops.pyops
_MODES = ("fedgh", "pcgrad")
_REDUCTIONS = ("sum", "none")


class HarmonizeStats(NamedTuple):
    num_conflicts: int  # pairs i < j with <g_i, g_j> < 0 (original gradients)
    cosine: torch.Tensor  # (K, K) float64 cosine similarities of the original gradients (0 for a zero row)


def _blocks(grads, fn):
    if isinstance(grads, torch.Tensor):
        blocks, single = [grads], True
    elif isinstance(grads, (list, tuple)) and len(grads) > 0:
        blocks, single = list(grads), False
    else:
        raise TypeError(
            f"{fn}: grads must be a (K, D) tensor or a non-empty list of (K, D_l) tensors, got {type(grads).__name__}"
        )
    for l, b in enumerate(blocks):
        name = "grads" if single else f"grads[{l}]"
        check_tensor(b, name, fn)
        if b.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{fn}: {name} must be float32 or float64, got {b.dtype}")
        if b.dim() != 2:
            raise ValueError(f"{fn}: {name} must have shape (K, D), got {tuple(b.shape)}")
        if b.shape[0] != blocks[0].shape[0]:
            raise ValueError(f"{fn}: {name} has K = {b.shape[0]} rows but grads[0] has {blocks[0].shape[0]}")
        if b.dtype != blocks[0].dtype:
            raise TypeError(f"{fn}: {name} has dtype {b.dtype} but grads[0] has {blocks[0].dtype}")
        if b.device != blocks[0].device:
            raise ValueError(
                f"{fn}: {name} is on {b.device} but grads[0] is on {blocks[0].device}; all blocks must be on one device"
            )
    return blocks, single


def _weights(weights, K, fn) -> torch.Tensor:
    """(K,) float64 CPU weights; their finiteness is a value check (``_check_values``)."""
    if weights is None:
        return torch.full((K,), 1.0 / K if K else 0.0, dtype=torch.float64)
    w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if w.shape != (K,):
        raise ValueError(f"{fn}: weights must have shape (K,) = ({K},), got {tuple(w.shape)}")
    return w


def _order(order, K, fn) -> torch.Tensor:
    if order is None:
        return torch.arange(K)
    o = torch.as_tensor(order).detach().to("cpu")
    if o.dtype.is_floating_point or o.dtype.is_complex or o.dtype == torch.bool:
        raise TypeError(f"{fn}: order must be a permutation of 0..K-1 (K = {K}) as K ints, got dtype {o.dtype}")
    if o.shape != (K,):
        raise ValueError(f"{fn}: order must be a permutation of 0..K-1 (K = {K}) as K ints, got {order!r}")
    o = o.long()
    # A value check: skipped while torch.compile traces (no host values there), where
    # pyops::harmonize_coefficients checks the same before it reads anything through order.
    if not torch.compiler.is_compiling() and not torch.equal(o.sort().values, torch.arange(K)):
        raise ValueError(f"{fn}: order must be a permutation of 0..K-1 (K = {K}), got {o.tolist()}")
    return o


def _visit_orders(K: int, order: torch.Tensor, generator) -> torch.Tensor:
    """``pyops.reference.pcgrad_visit_orders(K, order, generator)``, the same draws, without a
    boolean mask (whose size depends on values, which torch.compile cannot trace): row i is
    ``order`` without the entry i, permuted by ``torch.randperm(K - 1, generator=generator)``.
    Every index stays in range whatever ``order`` holds (pyops::harmonize_coefficients refuses
    an ``order`` that is not a permutation)."""
    if K == 0:
        return torch.empty(0, 0, dtype=torch.long)
    ar = torch.arange(K)
    where = (order[None, :] == ar[:, None]).long().argmax(1)  # position of i in order
    col = torch.arange(K - 1)[None, :]
    others = order[col + (col >= where[:, None]).long()]  # (K, K - 1)
    perms = torch.stack([torch.randperm(K - 1, generator=generator) for _ in range(K)])
    return others.gather(1, perms)


def _value_errors(gram: torch.Tensor, weights: torch.Tensor, fn: str) -> None:
    """The checks that read values: a finite Gram matrix (finite gradients whose products do not
    overflow) and finite weights."""
    diag = gram.diagonal()
    bad = ~torch.isfinite(diag)
    if bad.any() or not torch.isfinite(gram).all():
        row = int(bad.nonzero()[0, 0]) if bad.any() else int((~torch.isfinite(gram)).nonzero()[0, 0])
        raise ValueError(
            f"{fn}: the gradients contain NaN or inf (or overflow float64 in their products); first bad row: {row}"
        )
    if not torch.isfinite(weights).all():
        raise ValueError(f"{fn}: weights must be finite")


def _check_values_args(gram, weights, fn: str) -> None:
    check_tensor(gram, "gram", fn)
    check_tensor(weights, "weights", fn)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{fn}: gram must have shape (K, K), got {tuple(gram.shape)}")
    if weights.shape != (gram.shape[0],):
        raise ValueError(f"{fn}: weights must have shape (K,) = ({gram.shape[0]},), got {tuple(weights.shape)}")
    for name, t in (("gram", gram), ("weights", weights)):
        if t.dtype != torch.float64:
            raise TypeError(f"{fn}: {name} must be float64, got {t.dtype}")
    check_same_device(fn, gram=gram, weights=weights)


@torch.library.impl("pyops::harmonize_check_values", "CPU")
def _check_values_op(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``_value_errors`` as an op, so that torch.compile'd code runs it on the values: raises the
    same ValueError, else returns a copy of gram (the caller goes on with the copy, so the check
    stays in the graph). gram (K, K) and weights (K,), float64."""
    _check_values_args(gram, weights, "pyops::harmonize_check_values")
    _value_errors(gram, weights, "harmonize_gradients")
    return gram.clone()


@torch.library.register_fake("pyops::harmonize_check_values")
def _check_values_fake(gram, weights):
    _check_values_args(gram, weights, "pyops::harmonize_check_values")
    return torch.empty_like(gram)


def _check_values(gram: torch.Tensor, weights: torch.Tensor, fn: str) -> torch.Tensor:
    """gram, after the value checks (eagerly on the host; as the op pyops::harmonize_check_values
    while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return torch.ops.pyops.harmonize_check_values(gram, weights)
    _value_errors(gram, weights, fn)
    return gram


def harmonize_gradients(
    grads: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    weights=None,
    mode: str = "fedgh",
    order=None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "sum",
    return_stats: bool = False,
):
    """Project every gradient onto the normal plane of the gradients it conflicts with.

    Args:
        grads: (K, D) float32 or float64 (one row per client, task or instance), or a list of
            (K, D_l) blocks (e.g. one per parameter; nothing is flattened or copied).
        weights: (K,) aggregation weights for ``reduction="sum"`` (default 1/K each).
        mode: ``"fedgh"``: the conflict set of i is {j != i: <G_i, G_j> < 0} on the original
            gradients; g_i is projected in turn, in ``order``, onto the normal plane of each
            original G_j of its set: ``g_i <- g_i - <g_i, G_j> / |G_j|^2 G_j`` (spec variant A).
            ``"pcgrad"``: i visits the others in its own random order (``generator``; see
            ``pyops.reference.pcgrad_visit_orders``) and projects when the current
            ``<g_i, G_j> < 0`` (Yu et al. 2020).
        generator: the ``torch.Generator`` of pcgrad's orders (default: torch's default one).
            torch.compile cannot trace a Generator object: with ``fullgraph=True`` leave it
            None (the compiled code then draws the same orders as eager code after the same
            ``torch.manual_seed``); a Generator there stops the compilation with this
            function's TypeError in the message (without ``fullgraph`` the call runs eagerly).
        order: a permutation of 0..K-1 (default ascending): fedgh's visiting order (pcgrad: the
            order the random permutations permute). Nothing else (e.g. arrival order) matters.
        reduction: ``"sum"``: the weighted sum of the harmonized rows, (D,) or a list of (D_l,);
            ``"none"``: all harmonized rows, (K, D) or a list of (K, D_l).
        return_stats: also return ``HarmonizeStats(num_conflicts, cosine)``.

    Zero gradients are allowed (never projected onto); D < K and rank-deficient inputs are exact
    (no inverse is involved). Non-finite gradients raise a ValueError naming a bad row (also in
    torch.compile'd code, where the op pyops::harmonize_check_values runs that check). The Gram
    matrix and all coefficients are float64 (float32 gradients on the CPU: products summed in
    float32 over runs of 64 per lane, the runs in float64); outputs have the gradients' dtype.
    """
    fn = "harmonize_gradients"
    blocks, single = _blocks(grads, fn)
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode must be one of {_MODES}, got {mode!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    K = blocks[0].shape[0]
    w = _weights(weights, K, fn)
    o = _order(order, K, fn)
    if mode == "pcgrad" and generator is not None and torch.compiler.is_compiling():
        raise TypeError(
            f"{fn}: torch.compile cannot trace a torch.Generator; under torch.compile pcgrad draws "
            "its visiting orders from the default generator (generator=None, seeded by torch.manual_seed)"
        )
    visit = _visit_orders(K, o, generator) if mode == "pcgrad" else torch.empty(0, 0, dtype=torch.long)
    if blocks[0].is_meta:  # shapes only: the coefficients come from values (a host step)
        if return_stats:
            raise ValueError(f"{fn}: return_stats needs the gradients' values; meta tensors have none")
        outs = [b.new_empty((1, b.shape[1]) if reduction == "sum" else b.shape) for b in blocks]
        outs = [t[0] for t in outs] if reduction == "sum" else outs
        return outs[0] if single else outs

    gram = _check_values(_ops.harmonize_gram(blocks).cpu(), w, fn)
    diag = gram.diagonal()
    coef = _ops.harmonize_coefficients(gram, o, visit, mode)
    device = blocks[0].device
    rows = (coef.t() @ w)[None] if reduction == "sum" else coef
    outs = _ops.harmonize_combine(blocks, rows.to(device))
    if reduction == "sum":
        outs = [t[0] for t in outs]
    result = outs[0] if single else outs
    if not return_stats:
        return result
    norms = diag.sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    num_conflicts = int((gram.triu(1) < 0).sum())
    return result, HarmonizeStats(num_conflicts, cosine)


# --------------------------------------------------------------------------------------------
# Checks of the registered ops' arguments (fakes, CUDA kernels; the CPU kernels check in C++)
# --------------------------------------------------------------------------------------------
def _check_op_blocks(blocks, fn: str) -> None:
    if not isinstance(blocks, (list, tuple)) or len(blocks) == 0:
        raise ValueError(f"{fn}: blocks must hold at least one (K, D) tensor, got an empty list")
    b0 = blocks[0]
    for l, b in enumerate(blocks):
        check_tensor(b, f"blocks[{l}]", fn)
        if b.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{fn}: blocks[{l}] must be float32 or float64, got {b.dtype}")
        if b.dim() != 2:
            raise ValueError(f"{fn}: blocks[{l}] must have shape (K, D), got {tuple(b.shape)}")
        if b.shape[0] != b0.shape[0]:
            raise ValueError(f"{fn}: blocks[{l}] has K = {b.shape[0]} rows but blocks[0] has {b0.shape[0]}")
        if b.dtype != b0.dtype:
            raise TypeError(f"{fn}: blocks[{l}] has dtype {b.dtype} but blocks[0] has {b0.dtype}")
        if b.device != b0.device:
            raise ValueError(f"{fn}: blocks[{l}] is on {b.device} but blocks[0] is on {b0.device}")


def _check_op_coefficients(gram, order, visit, mode, fn: str) -> None:
    """Metadata checks of harmonize_coefficients (the permutation checks read the data: C++)."""
    check_tensor(gram, "gram", fn)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{fn}: gram must have shape (K, K), got {tuple(gram.shape)}")
    if gram.dtype != torch.float64:
        raise TypeError(f"{fn}: gram must be float64 (harmonize_gram's output), got {gram.dtype}")
    K = gram.shape[0]
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode must be 'fedgh' or 'pcgrad', got {mode!r}")
    check_tensor(order, "order", fn)
    if order.dtype != torch.int64:
        raise TypeError(f"{fn}: order must be int64, got {order.dtype}")
    if order.shape != (K,):
        raise ValueError(f"{fn}: order must have shape (K,) = ({K},), got {tuple(order.shape)}")
    check_tensor(visit, "visit", fn)
    check_same_device(fn, gram=gram, order=order, visit=visit)
    if mode == "pcgrad":  # (visit's values are not used in fedgh mode)
        if visit.dtype != torch.int64:
            raise TypeError(f"{fn}: visit must be int64, got {visit.dtype}")
        if visit.shape != (K, max(K - 1, 0)):
            raise ValueError(
                f"{fn}: visit must have shape (K, K - 1) = ({K}, {max(K - 1, 0)}) in pcgrad mode, "
                f"got {tuple(visit.shape)}"
            )


def _check_op_combine(blocks, coef, fn: str) -> None:
    _check_op_blocks(blocks, fn)
    check_tensor(coef, "coef", fn)
    K = blocks[0].shape[0]
    if coef.dim() != 2 or coef.shape[1] != K:
        raise ValueError(f"{fn}: coef must have shape (R, K) with K = {K}, got {tuple(coef.shape)}")
    if coef.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: coef must be float32 or float64, got {coef.dtype}")
    check_same_device(fn, **{"blocks[0]": blocks[0], "coef": coef})


# --------------------------------------------------------------------------------------------
# Fake kernels
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("pyops::harmonize_gram")
def _gram_fake(blocks):
    _check_op_blocks(blocks, "pyops::harmonize_gram")
    K = blocks[0].shape[0]
    return blocks[0].new_empty((K, K), dtype=torch.float64)


def _gram_without_kernel(blocks):
    """harmonize_gram on an empty list (no tensor to dispatch on) or on a device without a kernel."""
    _check_op_blocks(blocks, "pyops::harmonize_gram")
    raise ValueError(f"pyops::harmonize_gram: no kernel for blocks on {blocks[0].device}")


_fallback_lib = torch.library.Library("pyops", "IMPL")
_fallback_lib.impl("harmonize_gram", _gram_without_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("pyops::harmonize_coefficients")
def _coef_fake(gram, order, visit, mode):
    _check_op_coefficients(gram, order, visit, mode, "pyops::harmonize_coefficients")
    return gram.new_empty(gram.shape, dtype=torch.float64)


@torch.library.register_fake("pyops::harmonize_combine")
def _combine_fake(blocks, coef):
    _check_op_combine(blocks, coef, "pyops::harmonize_combine")
    return [b.new_empty((coef.shape[0], b.shape[1])) for b in blocks]


# --------------------------------------------------------------------------------------------
# CUDA: float64 matmuls over column chunks (no float64 copy of a whole block)
# --------------------------------------------------------------------------------------------
_CUDA_CHUNK = 1 << 22  # elements of a block converted to float64 at a time


def _cuda_gram(blocks):
    _check_op_blocks(blocks, "pyops::harmonize_gram")
    K = blocks[0].shape[0]
    gram = torch.zeros(K, K, dtype=torch.float64, device=blocks[0].device)
    for b in blocks:
        step = max(1, _CUDA_CHUNK // max(1, K))
        for c0 in range(0, b.shape[1], step):
            x = b[:, c0 : c0 + step].double()
            gram += x @ x.t()
    return gram


def _cuda_combine(blocks, coef):
    _check_op_combine(blocks, coef, "pyops::harmonize_combine")
    coef = coef.to(blocks[0].device, torch.float64)
    outs = []
    for b in blocks:
        out = b.new_empty((coef.shape[0], b.shape[1]))
        step = max(1, _CUDA_CHUNK // max(1, b.shape[0]))
        for c0 in range(0, b.shape[1], step):
            out[:, c0 : c0 + step] = (coef @ b[:, c0 : c0 + step].double()).to(b.dtype)
        outs.append(out)
    return outs


torch.library.register_kernel("pyops::harmonize_gram", "cuda", _cuda_gram)
torch.library.register_kernel("pyops::harmonize_combine", "cuda", _cuda_combine)
