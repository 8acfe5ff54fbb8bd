"""GR loss and the single-positive multi-label (SPML) baselines, all behind one interface.

Every loss is an ``nn.Module`` called as ``loss(logits, observed, index)``:

* ``logits``: (B, C) raw scores; ``observed``: (B, C) 0/1 single-positive labels (1 = the
  observed positive); ``index``: (B,) row numbers of the batch in the training set (losses that
  keep per-sample state use it: ROLE's label estimator, EM+APL's pseudo-labels, LL-Cp's
  corrected label matrix);
* ``start_epoch(epoch)`` before an epoch's batches (epochs count from 1), ``end_epoch(epoch,
  train_probs)`` after them (``train_probs``: (N, C) sigmoid outputs on the whole training set,
  computed by the trainer only for losses with ``needs_train_probs``);
* ``param_groups(lr)``: extra parameters to optimise (ROLE's estimator), with their lr;
* the state (schedules, estimator, label matrices) is in ``state_dict`` (checkpoints).

Baselines as the official code computes them (``elijahcole/single-positive-multi-label``
losses.py; ``Correr-Zhou/SPML-AckTheUnknown``; ``snucml/LargeLossMatters``): in probability
space with ``-log(x + 1e-5)``, the loss matrix summed over B x C and divided by B * C, plus the
regulariser where there is one; LL-* work on logits with BCE, as theirs. The probability-space
functions (``an_loss`` ...) are public too and check that ``preds`` lie in [0, 1].

GR (``GRLoss``): ``pyops.nn.GRLoss``, i.e. ``pyops.gr_loss`` (fused, logit space) with the per-epoch
linear schedules of k-hat(p; beta) and v(p; alpha) of the reference ``train.py`` (its off-by-one
included), behind the common interface.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

import pyops
from pyops.gr_loss import check_observed as check_labels

LOG_EPSILON = 1e-5  # Cole et al.'s neg_log(x) = -log(x + 1e-5)

# GR's defaults (the reference's VOC setting) are pyops.nn.GRLoss's: the method takes them from there
GR_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(pyops.nn.GRLoss.__init__).parameters.items()
    if k in ("beta", "alpha", "q", "epochs", "linear_init")
}

DEFAULTS = {  # per-loss settings (spec A.4; EM, APL and LL: their COCO / NUS-WIDE values)
    "an-ls": {"ls_coef": 0.1},
    "em": {"alpha": 0.1},
    "em-apl": {"alpha": 0.1, "beta": 0.2, "warmup_frac": 0.4},
    # LL's delta is a fraction here (the authors' CLI takes percent: .4 / .2 / .2 -> 0.004 ...)
    "ll-r": {"delta": 0.004},
    "ll-ct": {"delta": 0.002},
    "ll-cp": {"delta": 0.002},
    "hill": {"lam": 1.5},
}

LOSSES = ("full", "an", "an-ls", "wan", "epr", "role", "em", "em-apl", "ll-r", "ll-ct", "ll-cp", "hill", "gr")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_preds(preds: torch.Tensor, fn: str) -> None:
    if not isinstance(preds, torch.Tensor) or not preds.is_floating_point():
        raise TypeError(f"{fn}: preds must be a floating-point tensor of probabilities")
    if preds.numel() and not torch.compiler.is_compiling():
        lo, hi = float(preds.detach().min()), float(preds.detach().max())
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
            raise ValueError(f"{fn}: preds must be probabilities in [0, 1], got values in [{lo}, {hi}]")


def check_observed(observed: torch.Tensor, shape, fn: str) -> None:
    """0/1 labels of the given shape with a positive in every row (the values and rows are
    checked by ``pyops.gr_loss``'s label check)."""
    if not isinstance(observed, torch.Tensor):
        raise TypeError(f"{fn}: observed must be a tensor, got {type(observed).__name__}")
    if tuple(observed.shape) != tuple(shape):
        raise ValueError(f"{fn}: observed must have shape {tuple(shape)}, got {tuple(observed.shape)}")
    check_labels(observed, fn, values=True, require_positive=True)


def neg_log(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(x + LOG_EPSILON)


def expected_positive_regularizer(preds: torch.Tensor, expected_num_pos: float) -> torch.Tensor:
    """(mean over the batch of sum_c p - E[#positives])^2 (Cole et al.'s EPR, squared norm)."""
    return (preds.sum(1).mean(0) - expected_num_pos) ** 2


# --------------------------------------------------------------------------------------------
# Probability-space baselines (official semantics): loss matrix sum / (B C) (+ regulariser)
# --------------------------------------------------------------------------------------------
def _mean(loss_mtx: torch.Tensor) -> torch.Tensor:
    return loss_mtx.sum() / max(1, loss_mtx.numel())


def full_bce_loss(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE against the full labels (the upper bound; not an SPML method)."""
    check_preds(preds, "full_bce_loss")
    return _mean(torch.where(labels == 1, neg_log(preds), neg_log(1 - preds)))


def an_loss(preds: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """AN: every unobserved label assumed negative."""
    check_preds(preds, "an_loss")
    return _mean(torch.where(observed == 1, neg_log(preds), neg_log(1 - preds)))


def an_ls_loss(
    preds: torch.Tensor, observed: torch.Tensor, ls_coef: float = DEFAULTS["an-ls"]["ls_coef"]
) -> torch.Tensor:
    """AN with label smoothing eps on both the positives and the assumed negatives."""
    check_preds(preds, "an_ls_loss")
    if not 0 <= ls_coef <= 1:
        raise ValueError(f"an_ls_loss: ls_coef must be in [0, 1], got {ls_coef}")
    pos = (1 - ls_coef) * neg_log(preds) + ls_coef * neg_log(1 - preds)
    neg = (1 - ls_coef) * neg_log(1 - preds) + ls_coef * neg_log(preds)
    return _mean(torch.where(observed == 1, pos, neg))


def wan_loss(preds: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Weak AN: the assumed negatives weighted 1 / (C - 1)."""
    check_preds(preds, "wan_loss")
    C = preds.shape[-1]
    return _mean(torch.where(observed == 1, neg_log(preds), neg_log(1 - preds) / max(1, C - 1)))


def epr_loss(preds: torch.Tensor, observed: torch.Tensor, expected_num_pos: float) -> torch.Tensor:
    """Observed positives only, plus the expected-positive regulariser / C^2."""
    check_preds(preds, "epr_loss")
    C = preds.shape[-1]
    pos = torch.where(observed == 1, neg_log(preds), torch.zeros_like(preds))
    return _mean(pos) + expected_positive_regularizer(preds, expected_num_pos) / C**2


def role_loss(preds: torch.Tensor, observed: torch.Tensor, estimated: torch.Tensor, expected_num_pos: float):
    """ROLE: classifier and label estimator (probabilities ``estimated``) each fit the observed
    positives and the other's (detached) outputs, with EPR on both; all halved."""
    check_preds(preds, "role_loss")
    check_preds(estimated, "role_loss (estimated)")
    C = preds.shape[-1]
    zero = torch.zeros_like(preds)
    pos1 = torch.where(observed == 1, neg_log(preds), zero)
    pos2 = torch.where(observed == 1, neg_log(estimated), zero)
    est_d, preds_d = estimated.detach(), preds.detach()
    cross1 = est_d * neg_log(preds) + (1 - est_d) * neg_log(1 - preds)
    cross2 = preds_d * neg_log(estimated) + (1 - preds_d) * neg_log(1 - estimated)
    reg = (
        0.5
        * (
            expected_positive_regularizer(preds, expected_num_pos)
            + expected_positive_regularizer(estimated, expected_num_pos)
        )
        / C**2
    )
    return _mean(0.5 * (pos1 + pos2) + 0.5 * (cross1 + cross2)) + reg


def em_loss(preds: torch.Tensor, observed: torch.Tensor, alpha: float = DEFAULTS["em"]["alpha"]) -> torch.Tensor:
    """EM (Zhou et al., ECCV'22): entropy maximisation on the unobserved labels, -alpha H(p)."""
    check_preds(preds, "em_loss")
    ent = preds * neg_log(preds) + (1 - preds) * neg_log(1 - preds)
    return _mean(torch.where(observed == 1, neg_log(preds), -alpha * ent))


def em_apl_loss(
    preds: torch.Tensor,
    observed: torch.Tensor,
    alpha: float = DEFAULTS["em-apl"]["alpha"],
    beta: float = DEFAULTS["em-apl"]["beta"],
) -> torch.Tensor:
    """EM + asymmetric pseudo-labels: entries ``observed < 0`` are pseudo-negatives with the soft
    target ``-observed`` (the prediction they had when labelled), fitted by beta * BCE."""
    check_preds(preds, "em_apl_loss")
    ent = preds * neg_log(preds) + (1 - preds) * neg_log(1 - preds)
    soft = (-observed).clamp(min=0)
    pseudo = beta * (soft * neg_log(preds) + (1 - soft) * neg_log(1 - preds))
    loss = torch.where(observed == 1, neg_log(preds), torch.where(observed < 0, pseudo, -alpha * ent))
    return _mean(loss)


def hill_loss(preds: torch.Tensor, observed: torch.Tensor, lam: float = DEFAULTS["hill"]["lam"]) -> torch.Tensor:
    """Hill (Zhang et al. 2021): (lam - p) p^2 on the unobserved labels."""
    check_preds(preds, "hill_loss")
    return _mean(torch.where(observed == 1, neg_log(preds), (lam - preds) * preds**2))


# --------------------------------------------------------------------------------------------
# Modules with the common interface
# --------------------------------------------------------------------------------------------
class SPMLLoss(nn.Module):
    name = "base"
    needs_train_probs = False
    # what follows the --epochs budget (for the log of a run continued with a larger budget)
    budget_schedules = ""

    def start_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self, epoch: int, train_probs: torch.Tensor | None = None) -> None:
        pass

    def param_groups(self, lr: float) -> list[dict]:
        return []

    def schedule(self) -> dict[str, float]:
        """Per-epoch quantities worth logging (GR's w, b, mu, sigma; LL's clean rate ...)."""
        return {}

    @staticmethod
    def _check_logits(logits, fn):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(
                f"{fn}: logits must be a (B, C) tensor, got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
            )

    def _check(self, logits, observed, fn):
        self._check_logits(logits, fn)
        check_observed(observed, logits.shape, fn)


class ProbLoss(SPMLLoss):
    """A probability-space baseline: sigmoid, then ``fn(preds, observed, **kw)``."""

    def __init__(self, name: str, fn, **kw):
        super().__init__()
        self.name, self.fn, self.kw = name, fn, kw

    def forward(self, logits, observed, index=None):
        self._check(logits, observed, self.name)
        return self.fn(torch.sigmoid(logits), observed, **self.kw)


class FullBCE(SPMLLoss):
    """Upper bound: BCE against the full labels (``observed`` here is the full label matrix)."""

    name = "full"

    def forward(self, logits, labels, index=None):
        return full_bce_loss(torch.sigmoid(logits), labels)


class ROLELoss(SPMLLoss):
    """ROLE with its label estimator: a logit per training entry, observed positives initialised
    at sigmoid^-1(0.995), the others uniformly in sigmoid^-1(0.5 +- 0.1); trained with
    ``lr * lr_mult``."""

    name = "role"

    def __init__(
        self,
        observed_train: torch.Tensor,
        expected_num_pos: float,
        lr_mult: float = 10.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        N, C = observed_train.shape
        q = math.log(0.6 / 0.4)
        init = q * (2 * torch.rand(N, C, generator=generator) - 1)
        init[observed_train == 1] = math.log(0.995 / 0.005)
        self.estimator = nn.Parameter(init)
        self.expected_num_pos, self.lr_mult = float(expected_num_pos), float(lr_mult)

    def param_groups(self, lr):
        return [{"params": [self.estimator], "lr": lr * self.lr_mult}]

    def forward(self, logits, observed, index):
        self._check(logits, observed, self.name)
        estimated = torch.sigmoid(self.estimator[index.to(self.estimator.device)])
        return role_loss(torch.sigmoid(logits), observed, estimated, self.expected_num_pos)


class EMAPLLoss(SPMLLoss):
    """EM + APL: EM until ``warmup`` epochs are done; then after every epoch, per class, the
    lowest-scored ``0.9 * #unobserved / (T - warmup)`` still-unlabelled unobserved entries
    become soft pseudo-negatives (target: their prediction then), stored in a label matrix."""

    name = "em-apl"
    needs_train_probs = True
    budget_schedules = "EM+APL's warm-up and pseudo-negatives per epoch"

    def __init__(
        self,
        observed_train: torch.Tensor,
        epochs: int,
        alpha: float = DEFAULTS["em-apl"]["alpha"],
        beta: float = DEFAULTS["em-apl"]["beta"],
        warmup: int = 2,
    ):
        super().__init__()
        if not 0 <= warmup < epochs:
            raise ValueError(f"em-apl: warmup must be in [0, epochs), got {warmup} with {epochs} epochs")
        self.register_buffer("labels", observed_train.float().clone())
        self.epochs, self.alpha, self.beta, self.warmup = epochs, alpha, beta, warmup
        self.per_class = (0.9 * (observed_train == 0).sum(0).float() / (epochs - warmup)).floor().long()

    def forward(self, logits, observed, index):
        self._check(logits, observed, self.name)
        return em_apl_loss(torch.sigmoid(logits), self.labels[index.to(self.labels.device)], self.alpha, self.beta)

    @torch.no_grad()
    def end_epoch(self, epoch, train_probs=None):
        if epoch < self.warmup or epoch >= self.epochs:
            return
        p = train_probs.to(self.labels.device, torch.float32)
        free = self.labels == 0
        for c in range(self.labels.shape[1]):
            cand = free[:, c].nonzero().squeeze(1)
            k = min(int(self.per_class[c]), cand.numel())
            if k == 0:
                continue
            low = cand[torch.topk(p[cand, c], k, largest=False).indices]
            self.labels[low, c] = -p[low, c].clamp(min=1e-6)  # < 0 marks a pseudo-negative

    def schedule(self):
        return {"pseudo_negatives": int((self.labels < 0).sum())}


class LargeLossLoss(SPMLLoss):
    """LL-R / LL-Ct / LL-Cp (Kim et al., CVPR'22): BCE with logits against the AN targets, except
    the k largest losses among the unobserved entries of the batch: rejected (LL-R, loss 0),
    corrected to target 1 for this batch (LL-Ct) or permanently in the label matrix (LL-Cp).
    k = ceil(B C (1 - clean_rate)) (LL-Cp: ceil(B C delta)); clean_rate = 1 in epoch 1 and
    drops by delta after every epoch."""

    def __init__(self, scheme: str, delta: float, observed_train: torch.Tensor | None = None):
        super().__init__()
        if scheme not in ("ll-r", "ll-ct", "ll-cp"):
            raise ValueError(f"scheme must be ll-r, ll-ct or ll-cp, got {scheme!r}")
        if not 0 < delta < 1:
            raise ValueError(f"{scheme}: delta must be in (0, 1), got {delta}")
        self.name, self.delta = scheme, float(delta)
        self.clean_rate = 1.0
        if scheme == "ll-cp":
            if observed_train is None:
                raise ValueError("ll-cp needs the training label matrix")
            self.register_buffer("labels", observed_train.float().clone())

    def start_epoch(self, epoch):
        self.clean_rate = 1.0 - self.delta * (epoch - 1)

    def schedule(self):
        out = {"clean_rate": self.clean_rate}
        if self.name == "ll-cp":
            out["corrected"] = int(self.labels.sum() - self.labels.shape[0])
        return out

    def forward(self, logits, observed, index=None):
        self._check(logits, observed, self.name)
        if self.name == "ll-cp":
            observed = self.labels[index.to(self.labels.device)]
        target = (observed == 1).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.clean_rate >= 1.0:
            return loss.mean()
        B, C = logits.shape
        frac = self.delta if self.name == "ll-cp" else 1.0 - self.clean_rate
        k = min(math.ceil(B * C * frac), B * C)
        unobs_loss = torch.where(target == 0, loss.detach(), torch.zeros_like(loss))
        if k == 0:
            return loss.mean()
        thresh = torch.topk(unobs_loss.flatten(), k).values[-1]
        large = (unobs_loss > thresh) & (target == 0)  # strictly above the k-th, as the reference
        if self.name == "ll-r":
            final = torch.where(large, torch.zeros_like(loss), loss)
        else:
            corrected = F.binary_cross_entropy_with_logits(logits, torch.ones_like(target), reduction="none")
            final = torch.where(large, corrected, loss)
            if self.name == "ll-cp":
                rows, cols = large.nonzero(as_tuple=True)
                self.labels[index.to(self.labels.device)[rows], cols] = 1.0
        return final.mean()


class GRLoss(pyops.nn.GRLoss, SPMLLoss):
    """``pyops.nn.GRLoss`` (the GR loss with the reference's per-epoch schedules of k-hat and v,
    spec A.2; the epoch is the checkpointed extra state) with the common interface:
    ``loss(logits, observed, index)`` on (B, C) logits, every row needing an observed positive.

    Args: ``beta = (w0, wT, b0, bT)``, ``alpha = (mu0, sigma0, muT, sigmaT)``, ``q = (q2, q3)``
    in the reference CLI's order; ``epochs`` = T; ``linear_init`` = n. Defaults: those of
    ``pyops.nn.GRLoss`` (the reference's VOC setting), ``GR_DEFAULTS``.
    """

    name = "gr"
    budget_schedules = "GR's linear k-hat and v schedules"

    def __init__(
        self,
        beta=GR_DEFAULTS["beta"],
        alpha=GR_DEFAULTS["alpha"],
        q=GR_DEFAULTS["q"],
        epochs: int = GR_DEFAULTS["epochs"],
        linear_init: int = GR_DEFAULTS["linear_init"],
    ):
        super().__init__(beta, alpha, q, epochs, linear_init, reduction="mean", require_positive=True)

    def forward(self, logits, observed, index=None):
        self._check_logits(logits, self.name)
        # the op checks the labels' shape and values (on the CPU inside its kernel) and the rows
        return super().forward(logits, observed)


# The losses that cannot train under torchrun, and why. The others are means of per-entry terms
# whose state, if any, every process updates alike (GR's epoch; EM+APL's pseudo-labels, from the
# whole training set's predictions): each process's mean over its share of the global batch,
# averaged by DDP, is the single-process loss.
_LL = "its k largest losses are picked over the whole batch"
DDP_REFUSALS = {
    "epr": "its regulariser squares a mean over the whole batch",
    "role": "its label estimator is a per-sample parameter outside the DDP model, and its EPR term squares a "
    "mean over the whole batch",
    "ll-r": _LL,
    "ll-ct": _LL,
    "ll-cp": _LL + " and rewrite its per-sample label matrix",
}


def build_loss(
    name: str,
    *,
    observed_train: torch.Tensor,
    expected_num_pos: float,
    epochs: int,
    gr_kwargs: dict | None = None,
    seed: int = 0,
    overrides: dict | None = None,
) -> SPMLLoss:
    """The loss ``name`` (one of LOSSES) set up for a training set (its observed label matrix,
    the expected number of positives per sample, the number of epochs)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")
    kw = {**DEFAULTS.get(name, {}), **(overrides or {})}
    if name == "full":
        return FullBCE()
    if name == "an":
        return ProbLoss(name, an_loss)
    if name == "an-ls":
        return ProbLoss(name, an_ls_loss, ls_coef=kw["ls_coef"])
    if name == "wan":
        return ProbLoss(name, wan_loss)
    if name == "epr":
        return ProbLoss(name, epr_loss, expected_num_pos=expected_num_pos)
    if name == "role":
        return ROLELoss(observed_train, expected_num_pos, generator=torch.Generator().manual_seed(seed))
    if name == "em":
        return ProbLoss(name, em_loss, alpha=kw["alpha"])
    if name == "em-apl":
        warmup = max(1, round(kw["warmup_frac"] * epochs)) if epochs > 1 else 0
        return EMAPLLoss(observed_train, epochs, alpha=kw["alpha"], beta=kw["beta"], warmup=min(warmup, epochs - 1))
    if name in ("ll-r", "ll-ct", "ll-cp"):
        return LargeLossLoss(name, kw["delta"], observed_train if name == "ll-cp" else None)
    if name == "hill":
        return ProbLoss(name, hill_loss, lam=kw["lam"])
    return GRLoss(epochs=epochs, **(gr_kwargs or {}))
