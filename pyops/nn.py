"""``torch.nn`` modules of the pyops ops, for putting them in a model (as ``torchvision.ops`` and
Liger-Kernel do): the options go to the constructor, which checks them; the tensors go to
``forward``, which calls the functional op.

* ``CrossViewKLEntropy``: a weighted loss of the per-row terms of ``cross_view_kl_entropy``
* ``FusedLinearCrossViewLoss``: the same over hidden states and a shared LM head
  (``fused_linear_cross_view``; the logits never exist for all rows at once)
* ``KNNPatchSearch`` / ``PatchAggregate``: ``knn_patch_search`` / ``patch_aggregate``
* ``DiagonalStats``: ``diagonal_stats``
* ``GRLoss``: ``gr_loss`` with the per-epoch schedules of k-hat and v (GR, Chen et al. 2024)
* ``JosephProjector``: re-exported from ``pyops.pet``

``harmonize_gradients`` has no module: it transforms gradients after ``backward`` (an optimiser
step's business, not a layer of a forward pass), keeps no state, and takes a host step (the
projection loop on the K x K Gram matrix), so it would not compile into a model's graph either.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from ._validation import check_bool, check_int
from .cross_view_kl import (
    _check_chunk_size,
    _check_scalars,
    cross_view_kl_entropy,
    fused_linear_cross_view,
    fused_linear_cross_view_loss,
)
from .diagonal_stats import diagonal_stats
from .gr_loss import gr_loss
from .knn_patch import _check_anchor, knn_patch_search, patch_aggregate
from .pet import JosephProjector
from .types import CrossViewOutput

__all__ = [
    "CrossViewKLEntropy",
    "DiagonalStats",
    "FusedLinearCrossViewLoss",
    "GRLoss",
    "JosephProjector",
    "KNNPatchSearch",
    "PatchAggregate",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Argument checks (each error names the class and the argument)
# --------------------------------------------------------------------------------------------
def _check_reduction(reduction, cls: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{cls}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_real(value, name: str, cls: str) -> float:
    """A finite Python int or float, returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cls}: {name} must be a real number (int or float), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{cls}: {name} must be finite, got {value}")
    return float(value)


def _check_optional_int(value, name: str, cls: str, minimum: int) -> int | None:
    return None if value is None else check_int(value, name, cls, minimum)


# --------------------------------------------------------------------------------------------
# Cross-view losses
# --------------------------------------------------------------------------------------------
_TERMS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")
_WEIGHT_ARGS = ("kl_ab_weight", "kl_ba_weight", "entropy_a_weight", "entropy_b_weight", "ce_weight")


class _CrossViewLoss(torch.nn.Module):
    """The weighting and reduction shared by the two cross-view losses."""

    def __init__(self, cls: str, weights: Sequence, temperature, ignore_index, reduction):
        super().__init__()
        ws = [_check_real(w, name, cls) for w, name in zip(weights, _WEIGHT_ARGS)]
        if not any(ws):
            raise ValueError(f"{cls}: every term weight ({', '.join(_WEIGHT_ARGS)}) is 0; the loss would be 0")
        (self.kl_ab_weight, self.kl_ba_weight, self.entropy_a_weight, self.entropy_b_weight, self.ce_weight) = ws
        _check_scalars(temperature, ignore_index, cls)  # the op's own checks
        self.temperature, self.ignore_index = float(temperature), ignore_index
        self.reduction = _check_reduction(reduction, cls)
        self._cls = cls

    @property
    def term_weights(self) -> dict[str, float]:
        """The weight of each term, keyed by the ``CrossViewOutput`` field names."""
        return dict(
            zip(
                _TERMS,
                (self.kl_ab_weight, self.kl_ba_weight, self.entropy_a_weight, self.entropy_b_weight, self.ce_weight),
            )
        )

    def _check_target(self, target: torch.Tensor | None) -> None:
        if target is None and self.ce_weight != 0:
            raise ValueError(f"{self._cls}: ce_weight = {self.ce_weight} needs a target; forward got target=None")

    def _combine(self, out: CrossViewOutput, target: torch.Tensor | None, return_terms: bool):
        valid = None if target is None else target != self.ignore_index
        count = None if valid is None else valid.sum(dtype=out.kl_ab.dtype)

        def reduce(x: torch.Tensor) -> torch.Tensor:
            if valid is not None:
                x = torch.where(valid, x, 0.0)
            if self.reduction == "none":
                return x
            if self.reduction == "sum":
                return x.sum()
            return x.mean() if count is None else x.sum() / count

        weights = self.term_weights
        terms = {}
        loss = None
        for name, value in zip(_TERMS, out):
            if value is None or (weights[name] == 0 and not return_terms):
                continue
            terms[name] = reduce(value)
            if weights[name] != 0:
                part = weights[name] * terms[name]
                loss = part if loss is None else loss + part
        if not return_terms:
            return loss
        return loss, CrossViewOutput(*(terms.get(name) for name in _TERMS))

    def extra_repr(self) -> str:
        parts = [f"{_WEIGHT_ARGS[i]}={w}" for i, w in enumerate(self.term_weights.values()) if w != 0]
        parts += [
            f"temperature={self.temperature}",
            f"ignore_index={self.ignore_index}",
            f"reduction={self.reduction!r}",
        ]
        return ", ".join(parts)


_CROSS_VIEW_DOC = """
    Per row i (a position of the logits' leading shape) the loss is
    ``l_i = kl_ab_weight KL(p_a||p_b) + kl_ba_weight KL(p_b||p_a) + entropy_a_weight H(p_a)
    + entropy_b_weight H(p_b) + ce_weight CE(logits_a, target)``, with ``p = softmax(logits /
    temperature)`` for the KL and entropy terms and temperature 1 for the CE (no ``T^2`` factor is
    applied). The default is the symmetric KL ``(KL(p_a||p_b) + KL(p_b||p_a)) / 2``. Weights are
    any finite numbers (a negative entropy weight rewards entropy); terms of weight 0 are not
    computed into the loss (nor their gradients).

    Rows that count: all rows without a target; with a target, the rows whose target is not
    ``ignore_index`` (for every term, so padding rows add no KL or entropy either: pass a target
    with ``ce_weight=0`` to mask rows of a pure consistency loss).

    Reductions (each term is reduced, then the reduced terms are weighted and added):

    * ``"mean"``: the sum over the rows that count divided by their number (NaN when no row
      counts, as ``torch.nn.CrossEntropyLoss``);
    * ``"sum"``: the sum over the rows that count;
    * ``"none"``: the per-row loss of the leading shape, 0 at ignored rows.

    ``forward(..., return_terms=True)`` returns ``(loss, terms)``: ``terms`` is a
    ``CrossViewOutput`` of every term reduced the same way (``ce_a`` None without a target), so
    ``loss == sum(weight * term)``; the terms are differentiable (detach them for logging).
    The loss is float32 (float64 for float64 inputs).
"""


class CrossViewKLEntropy(_CrossViewLoss):
    __doc__ = (
        "A weighted loss of the fused per-row terms of ``pyops.cross_view_kl_entropy`` over two views' "
        "logits ``(..., V)``.\n" + _CROSS_VIEW_DOC
    )

    def __init__(
        self,
        *,
        kl_ab_weight: float = 0.5,
        kl_ba_weight: float = 0.5,
        entropy_a_weight: float = 0.0,
        entropy_b_weight: float = 0.0,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ):
        super().__init__(
            "CrossViewKLEntropy",
            (kl_ab_weight, kl_ba_weight, entropy_a_weight, entropy_b_weight, ce_weight),
            temperature,
            ignore_index,
            reduction,
        )

    def forward(
        self,
        logits_a: torch.Tensor,
        logits_b: torch.Tensor,
        target: torch.Tensor | None = None,
        return_terms: bool = False,
    ):
        self._check_target(target)
        out = cross_view_kl_entropy(
            logits_a, logits_b, target, temperature=self.temperature, ignore_index=self.ignore_index
        )
        return self._combine(out, target, return_terms)


class FusedLinearCrossViewLoss(_CrossViewLoss):
    __doc__ = (
        "``CrossViewKLEntropy`` of the logits ``hidden @ weight.T + bias`` of two views that share an LM "
        "head, through ``pyops.fused_linear_cross_view``: ``chunk_size`` rows at a time (default about "
        "64 MiB of float32 logits per view), the logits of all rows never exist at once. Called as "
        "``loss(hidden_a, hidden_b, weight, bias=None, target=None)`` with hidden states ``(..., H)``, "
        "``weight`` ``(V, H)`` and ``bias`` ``(V,)``: the head is a forward argument, not a parameter of "
        "this module (as in Liger-Kernel's fused-linear losses); gradients reach the hidden states, "
        "``weight`` and ``bias``.\n\n"
        '    With ``reduction`` ``"mean"`` or ``"sum"`` it is ``pyops.fused_linear_cross_view_loss``: the '
        "gradients are computed during the forward (each chunk's logits once, no recomputation in the "
        'backward), and the terms of ``return_terms=True`` are detached. ``"none"`` goes through '
        "``fused_linear_cross_view`` (per-row values, any upstream gradients).\n" + _CROSS_VIEW_DOC
    )

    def __init__(
        self,
        *,
        kl_ab_weight: float = 0.5,
        kl_ba_weight: float = 0.5,
        entropy_a_weight: float = 0.0,
        entropy_b_weight: float = 0.0,
        ce_weight: float = 0.0,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ):
        cls = "FusedLinearCrossViewLoss"
        super().__init__(
            cls,
            (kl_ab_weight, kl_ba_weight, entropy_a_weight, entropy_b_weight, ce_weight),
            temperature,
            ignore_index,
            reduction,
        )
        if chunk_size is not None:
            _check_chunk_size(chunk_size, cls)
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden_a: torch.Tensor,
        hidden_b: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        return_terms: bool = False,
    ):
        self._check_target(target)
        if self.reduction != "none":
            w = self.term_weights
            return fused_linear_cross_view_loss(
                hidden_a,
                hidden_b,
                weight,
                bias,
                target,
                kl_ab_weight=w["kl_ab"],
                kl_ba_weight=w["kl_ba"],
                entropy_a_weight=w["entropy_a"],
                entropy_b_weight=w["entropy_b"],
                ce_weight=w["ce_a"],
                temperature=self.temperature,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                chunk_size=self.chunk_size,
                return_terms=return_terms,
            )
        out = fused_linear_cross_view(
            hidden_a,
            hidden_b,
            weight,
            bias,
            target,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
        )
        return self._combine(out, target, return_terms)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"


# --------------------------------------------------------------------------------------------
# Patches and diagonals
# --------------------------------------------------------------------------------------------
class KNNPatchSearch(torch.nn.Module):
    """``pyops.knn_patch_search`` as a module: ``search(query, database=None) -> (dist, idx)``.

    ``query`` (B, C, H, W), ``database`` (B, C, H2, W2) or None to search the query map itself
    (a non-local self-similarity search; add ``exclude_self=True`` to skip each patch's own
    position). ``dist`` (B, L, k) ascending squared L2 distances (float32, float64 for float64
    maps), differentiable w.r.t. both maps; ``idx`` (B, L, k) int64 row-major database grid
    positions. The arguments are those of ``pyops.knn_patch_search`` (``stride`` None =
    ``patch_size``, ``window`` None = global search, ``window_anchor``: where windows start).
    """

    def __init__(
        self,
        k: int,
        patch_size: int = 3,
        stride: int | None = None,
        window: int | None = None,
        exclude_self: bool = False,
        window_anchor: tuple | None = None,
    ):
        super().__init__()
        cls = "KNNPatchSearch"
        self.k = check_int(k, "k", cls, 1)
        self.patch_size = check_int(patch_size, "patch_size", cls, 1)
        self.stride = _check_optional_int(stride, "stride", cls, 1)
        self.window = _check_optional_int(window, "window", cls, 1)
        self.exclude_self = check_bool(exclude_self, "exclude_self", cls)
        flat = _check_anchor(window_anchor, self.window, cls)
        self.window_anchor = (tuple(flat[:4]), tuple(flat[4:])) if flat else None

    def forward(self, query: torch.Tensor, database: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return knn_patch_search(
            query,
            query if database is None else database,
            self.k,
            patch_size=self.patch_size,
            stride=self.stride,
            window=self.window,
            exclude_self=self.exclude_self,
            window_anchor=self.window_anchor,
        )

    def extra_repr(self) -> str:
        s = (
            f"k={self.k}, patch_size={self.patch_size}, stride={self.stride}, window={self.window}, "
            f"exclude_self={self.exclude_self}"
        )
        return s if self.window_anchor is None else s + f", window_anchor={self.window_anchor}"


class PatchAggregate(torch.nn.Module):
    """``pyops.patch_aggregate`` as a module: ``aggregate(values, idx, weights, output_size)``.

    The weighted sum of the k database patches ``idx`` (B, L, k) of ``values`` (B, C', H2, W2)
    with ``weights`` (B, L, k) (the values' dtype), placed at every query patch of an
    ``output_size = (H, W)`` map whose patch grid has L positions; overlaps are summed. Returns
    (B, C', H, W), differentiable w.r.t. values and weights. ``stride`` None = ``patch_size``.
    """

    def __init__(self, patch_size: int = 3, stride: int | None = None):
        super().__init__()
        cls = "PatchAggregate"
        self.patch_size = check_int(patch_size, "patch_size", cls, 1)
        self.stride = _check_optional_int(stride, "stride", cls, 1)

    def forward(
        self, values: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, output_size: tuple[int, int]
    ) -> torch.Tensor:
        return patch_aggregate(
            values, idx, weights, patch_size=self.patch_size, stride=self.stride, output_size=tuple(output_size)
        )

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, stride={self.stride}"


class DiagonalStats(torch.nn.Module):
    """``pyops.diagonal_stats`` as a module: ``stats(maps) -> (mean, std)`` of the upper
    diagonals (lags 0..num_lags-1) of ``(B, T, T)`` or ``(T, T)`` maps, each ``(B, K)`` (or
    ``(K,)``); std is Bessel-corrected. ``num_lags`` None = T - 1 (every diagonal with at least
    2 entries); otherwise it must be <= T - 1 of the maps given to ``forward``."""

    def __init__(self, num_lags: int | None = None):
        super().__init__()
        self.num_lags = _check_optional_int(num_lags, "num_lags", "DiagonalStats", 0)

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return diagonal_stats(maps, self.num_lags)

    def extra_repr(self) -> str:
        return f"num_lags={self.num_lags}"


# --------------------------------------------------------------------------------------------
# GR loss with its schedules
# --------------------------------------------------------------------------------------------
def _numbers(x, n: int, name: str, cls: str) -> tuple[float, ...]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or len(x) != n:
        raise ValueError(f"{cls}: {name} must be {n} finite numbers, got {x!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x):
        raise ValueError(f"{cls}: {name} must be {n} finite numbers, got {x!r}")
    return tuple(float(v) for v in x)


class GRLoss(torch.nn.Module):
    """GR loss (``pyops.gr_loss``) of ``(..., C)`` multi-label logits against single-positive
    labels (1 = observed positive, 0 = unobserved), with the per-epoch linear schedules of the
    reference ``train.py`` (GR, Chen et al., IJCAI 2024; its off-by-one included):

    * k-hat(p) = sigmoid(w p + b), (w, b) from (w0, b0) towards (wT, bT):
      ``w_e = w0 + (wT - w0) max(e - n - 1, 0) / (T - n)`` (never quite reaching wT);
    * v(p) = exp(-(p - mu)^2 / (2 sigma^2)), ``mu_e = mu0 + (muT - mu0) max(e - n, 0) / (T - n)``
      (sigma likewise), reaching (muT, sigmaT) at e = T;
    * e = 1..T the epoch, n = ``linear_init``. Call ``start_epoch(e)`` before epoch e's batches
      (the module starts at epoch 1).

    Args:
        beta: ``(w0, wT, b0, bT)``; alpha: ``(mu0, sigma0, muT, sigmaT)``, sigmas > 0;
            q: ``(q2, q3)``, the GCE exponents (>= 0; 0 = the log limit); in the reference
            CLI's order. Defaults: the reference's VOC setting.
        epochs: T >= 1; linear_init: n in [0, T).
        reduction: as ``pyops.gr_loss``: ``"mean"`` over all entries (B x C, the reference's),
            ``"sum"``, or ``"none"`` (per entry).
        require_positive: check that every row has an observed positive (a host sync; skipped
            under ``torch.compile``).

    The epoch is the module's state: ``state_dict()`` holds it as the extra state
    ``{"epoch": e}``, and loading it restores the schedule of that epoch.
    """

    def __init__(
        self,
        beta=(0.0, 2.0, -2.0, -2.0),
        alpha=(0.5, 2.0, 0.8, 0.5),
        q=(0.01, 1.0),
        epochs: int = 8,
        linear_init: int = 0,
        *,
        reduction: str = "mean",
        require_positive: bool = False,
    ):
        super().__init__()
        cls = "GRLoss"
        self.beta = _numbers(beta, 4, "beta (w0, wT, b0, bT)", cls)
        self.alpha = _numbers(alpha, 4, "alpha (mu0, sigma0, muT, sigmaT)", cls)
        self.q = _numbers(q, 2, "q (q2, q3)", cls)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"{cls}: epochs must be an int >= 1, got {epochs!r}")
        if isinstance(linear_init, bool) or not isinstance(linear_init, int) or not 0 <= linear_init < epochs:
            raise ValueError(f"{cls}: linear_init must be an int in [0, epochs), got {linear_init!r}")
        # sigma is linear in the epoch: positive at both ends <=> positive at every epoch
        for which, s in (("sigma0 = alpha[1]", self.alpha[1]), ("sigmaT = alpha[3]", self.alpha[3])):
            if not s > 0:
                raise ValueError(f"{cls}: {which} must be > 0 (v(p) = exp(-(p - mu)^2 / (2 sigma^2))), got {s}")
        if min(self.q) < 0:
            raise ValueError(f"{cls}: q2 and q3 (q) must be >= 0, got {self.q}")
        self.epochs, self.linear_init = epochs, linear_init
        self.reduction = _check_reduction(reduction, cls)
        self.require_positive = check_bool(require_positive, "require_positive", cls)
        # [w, b, mu, sigma] of the current epoch as a float64 tensor that forward passes to the op:
        # under torch.compile a new epoch's values then do not recompile (Python floats would be
        # guarded on). Not persistent: the checkpointed state is the epoch alone.
        self.register_buffer("_schedule", torch.zeros(4, dtype=torch.float64), persistent=False)
        self.start_epoch(1)

    def params_at(self, epoch: int) -> dict[str, float]:
        """The schedule's ``{"w", "b", "mu", "sigma"}`` at ``epoch`` (1-based)."""
        T, n = self.epochs, self.linear_init
        w0, wT, b0, bT = self.beta
        mu0, s0, muT, sT = self.alpha
        fk = max(epoch - n - 1, 0) / (T - n)
        fv = max(epoch - n, 0) / (T - n)
        return {
            "w": w0 + (wT - w0) * fk,
            "b": b0 + (bT - b0) * fk,
            "mu": mu0 + (muT - mu0) * fv,
            "sigma": s0 + (sT - s0) * fv,
        }

    def start_epoch(self, epoch: int) -> None:
        """Switch to the schedule of ``epoch`` (1-based)."""
        if isinstance(epoch, bool):
            raise TypeError("GRLoss: epoch must be an int, got bool")
        if isinstance(epoch, float) and epoch.is_integer():
            epoch = int(epoch)  # as the method's trainer and old checkpoints may hand it
        try:
            self.epoch = operator.index(epoch)
        except TypeError:
            raise TypeError(f"GRLoss: epoch must be an int, got {epoch!r}") from None
        self._p = self.params_at(self.epoch)
        with torch.no_grad():
            self._schedule.copy_(torch.tensor(list(self._p.values()), dtype=torch.float64))

    def schedule(self) -> dict[str, float]:
        """The current epoch's ``{"w", "b", "mu", "sigma"}``."""
        return dict(self._p)

    def k_hat(self, p: torch.Tensor) -> torch.Tensor:
        """The current soft pseudo-label curve sigmoid(w p + b)."""
        return torch.sigmoid(self._p["w"] * p + self._p["b"])

    def v(self, p: torch.Tensor) -> torch.Tensor:
        """The current weight curve exp(-(p - mu)^2 / (2 sigma^2))."""
        return torch.exp(-((p - self._p["mu"]) ** 2) / (2 * self._p["sigma"] ** 2))

    def forward(self, logits: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            s = self._schedule  # a tensor: a new epoch's values do not recompile
            kb, mv = s[:2], s[2:]
        else:  # Python floats: no device copy or host sync per call
            p = self._p
            kb, mv = (p["w"], p["b"]), (p["mu"], p["sigma"])
        return gr_loss(
            logits,
            observed,
            kb,
            mv,
            self.q[0],
            self.q[1],
            reduction=self.reduction,
            require_positive=self.require_positive,
        )

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast floating buffers; the schedule stays exact float64
        super()._apply(fn, recurse)
        if self._schedule.dtype != torch.float64:
            self._schedule = torch.tensor(list(self._p.values()), dtype=torch.float64, device=self._schedule.device)
        return self

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.start_epoch(int(state["epoch"]))

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, alpha={self.alpha}, q={self.q}, epochs={self.epochs}, "
            f"linear_init={self.linear_init}, epoch={self.epoch}, reduction={self.reduction!r}"
        )
