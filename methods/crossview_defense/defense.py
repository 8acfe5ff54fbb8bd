"""The defense: patch augmentation, the capped cross-view divergence acting on the original view,
suspicion weights that single out abnormally invariant (or confident) samples relative to their
batch, a CE weight that shrinks on suspects, and an entropy band at temperature 1. The paper's
loss is not public (spec A.3 is a reconstruction); every choice below is ours and has a switch.

Per batch, every image is shown twice, as itself (view a, logits z, p = softmax(z / T_s)) and
patch-augmented (view b, z', q = softmax(z' / T_s)), in one forward pass of the doubled batch. On
the answer tokens only (positions whose label is not -100, shifted as in causal LM training)::

    L = sum_t (1 - beta u_i(t)) CE(z_t, y_t) / N  +  gamma CE(z', y)
        - lambda_cv * sum_i w_i min(D_i, kappa)                 # push the original view away, capped
        + lambda_h * mean_t [ relu(H1(q_t) - tau_hi) + relu(tau_lo - H1(p_t)) ]   # band, at T = 1
    D_i = (1/|M_i|) sum_{t in M_i} KL(p_t || sg(q_t))           # detach="augmented": q is a fixed target
    u_i = sigmoid((-z_i - suspect_z) / width),  z_i = robust z-score of s_i within the batch
    s_i = a log H_i + b log S_i    (S_i = max (score="max") or mean of the sample's per-token KL;
                                    (a, b) = (0, 1) "invariance", (1, 0) "confidence",
                                    (1, 1) "confident-invariant", (1, -1) "confident-sensitive")
    w_i = u_i / B   (weighting "entropy": softmax_i(-H_i / T_w), the first reconstruction; "uniform": 1 / B)

* **Which view moves.** With ``detach="augmented"`` (default) the divergence's gradient reaches
  only the original view: a triggered original input cannot meet the objective by changing its
  augmented copy. ``"none"`` lets both views move, ``"original"`` only the augmented one.
* **Temperature.** The divergence is at T_s = 1 by default; the band's thresholds are nats at
  T = 1, so the band is always computed there (a second fused pass when T_s != 1).
* **Suspects.** The paper's signal is abnormal invariance of backdoor outputs under a
  non-semantic perturbation: ``weighting="invariance"`` flags samples whose divergence is low
  relative to the batch. The other weightings are the alternatives the acceptance ablates.
* **CE on suspects.** ``ce_suppress`` beta in [0, 2]: beta = 1 removes a certain suspect's CE,
  beta > 1 turns it into gradient ascent, stopped per token at ``ascent_ceiling`` nats.
* **Memory.** ``memory="max"`` with ``sample_ids`` (our training loop passes them) keeps each
  training sample's largest suspicion so far.

Gradient accumulation: the CE terms and the band are means over the batch's answer tokens, the
capped divergence a mean over its samples. `token_total` / `sample_total` (the answer tokens and
the samples with an answer token of the whole accumulated batch) make a micro-batch's loss its
share of the accumulated batch's: token terms summed over the micro-batch's answer tokens divided
by token_total, the capped term times (samples with answer tokens here) / sample_total, so the
micro-batches' gradients add up to the full batch's. That is exact for modes "none" and "aug" and
for "crossview" with uniform weights and cap="sample"; weights computed from the batch (the
invariance weights' median and MAD, which also weight the CE, and the entropy weights' softmax)
and cap="batch" (a clamp of the batch's weighted mean) couple the samples of a batch and cannot
be split: there each micro-batch uses its own weights, and its capped term is weighted by its
share of the samples (an approximation).

DDP (torchrun; `BatchGroup`): every process holds an equal shard of the global batch, and here
the coupling is exact. The weights need only detached per-sample values (the suspicion statistic,
the entropies, the answer-token counts; no gradient flows through u_i or the entropy weights), so
each process all-gathers them and computes the weights of the whole global batch (median and MAD,
softmax, the number of samples), the memory's floor and update for every sample of the global
batch, and the token count of the global batch; cap="batch" sums the weighted divergence over the
shards and passes this shard's gradient where the global mean is below kappa (the clamp's
gradient). Each process's loss is then its share of the global batch's loss (the shares add up to
it); the training loop multiplies it by the number of processes, since DDP averages the
gradients. The augmented images are drawn for the global batch (`two_views(augmented=...)`), so
every sample gets the op it gets in one process.

All per-token quantities (both KLs, both entropies, the CE) come from one call of the fused
`pyops.fused_linear_cross_view` on the answer rows' last hidden states and the LM head: the
vocabulary logits of the two views are never materialised. `eager=True` computes the same
objective with plain PyTorch (the test oracle).

Baselines: ``mode="none"`` (plain fine-tuning: CE on the original view) and ``mode="aug"``
(augmentation only: the mean CE of both views, no cross-view or entropy term).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyops
from methods.common.config import arg

from .model import VLMAdapter

MODES = ("none", "aug", "crossview")
DETACH = ("none", "original", "augmented")
DIVERGENCES = ("forward", "reverse", "symmetric")
AUG_OPS = ("shuffle", "mask", "swap")
SCORES = ("max", "mean", "tv")
WEIGHTINGS = ("invariance", "confidence", "confident-invariant", "confident-sensitive", "entropy", "uniform")


# the CLI's --defense names (plain fine-tuning, augmentation only, the full defense) -> DefenseConfig.mode
DEFENSE_NAMES = {"plain": "none", "aug": "aug", "crossview": "crossview"}


def _mode(s: str) -> str:
    """--defense plain|aug|crossview (or a mode none|aug|crossview, as a run's config.json holds it) -> mode."""
    mode = DEFENSE_NAMES.get(s, s)
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected plain, aug or crossview, got {s!r}")
    return mode


@dataclass
class DefenseConfig:
    """The defense's switches (module doc). Every field is a flag of the CLI's train command
    (``--lambda-cv`` for ``lambda_cv``), except ``mode``, whose flag is ``--defense`` with the
    names of `DEFENSE_NAMES` (plain -> none); a config file may give it as ``mode: plain`` or
    ``mode: none``."""

    mode: str = arg(
        "crossview",
        "plain fine-tuning (CE on the original view; mode none), augmentation only (the mean CE of both "
        "views) or the full cross-view defense",
        flag="--defense",
        choices=MODES,
        metavar="{plain,aug,crossview}",
        type=_mode,
    )
    divergence: str = arg(
        "forward", "forward KL(p||q), reverse KL(q||p) or symmetric (their mean)", choices=DIVERGENCES
    )
    lambda_cv: float = arg(1.0, "weight of the push (the capped divergence of the weighted samples)")
    kappa: float = arg(1.0, "cap of the divergence, nats per token")
    cap: str = arg("sample", "cap each sample's divergence, or the batch's weighted mean", choices=("sample", "batch"))
    lambda_h: float = arg(0.1, "weight of the entropy band")
    tau_lo: float = arg(0.05, "lower entropy bound of the original view, nats at temperature 1")
    tau_hi: Optional[float] = arg(
        None, "upper entropy bound of the augmented view, nats at temperature 1 (none: 0.9 log V)", metavar="NATS"
    )
    weighting: str = arg(
        "invariance",
        "which samples are suspects (pushed, CE suppressed), relative to the batch: abnormally invariant "
        "(invariance), confident (confidence), both, confident but sensitive; or the first reconstruction's "
        "softmax(-H / T_w) (entropy), or all alike (uniform)",
        choices=WEIGHTINGS,
    )
    weight_temperature: float = arg(0.1, "T_w of the entropy weighting softmax(-H / T_w)")
    score: str = arg(
        "max",
        "a sample's invariance score: max or mean of its per-token divergence, or its largest per-token total "
        "variation 0.5 |p - q|_1 at T = 1 (tv; computed without gradient, in row chunks)",
        choices=SCORES,
    )
    suspect_z: float = arg(1.0, "robust z-score below the batch median where a sample's invariance weight is 1/2")
    suspect_width: float = arg(0.5, "width of the invariance weight's sigmoid, in z units")
    ce_suppress: float = arg(
        1.0, "beta in [0, 2]: a sample's CE is weighted 1 - beta * (its suspicion weight)", metavar="BETA"
    )
    memory: str = arg(
        "none",
        "max: a training sample keeps the largest suspicion it has had (needs sample ids)",
        choices=("none", "max"),
    )
    ascent_ceiling: float = arg(2.0, "nats: gradient ascent on a suspect's CE (--ce-suppress > 1) stops there")
    softmax_temperature: float = arg(
        1.0, "T_s: temperature of p and q in the divergence (the CE and the entropy band stay at 1)"
    )
    gamma: float = arg(0.0, "CE weight of the augmented view")
    detach: str = arg(
        "augmented", "stop-gradient on that view inside the divergence and the entropy band", choices=DETACH
    )
    # patch augmentation
    ops: Tuple[str, ...] = arg(AUG_OPS, "the augmentation ops (one drawn per image)", choices=AUG_OPS)
    cell: int = arg(1, "augmentation cell side, in vision patches")
    mask_ratio: float = arg(0.25, "share of the cells the mask op fills with the image mean")
    swaps: int = arg(2, "neighbouring-cell swaps of the swap op")

    def validate(self) -> "DefenseConfig":
        def bad(msg):  # the message starts with the field's name; the CLI's flag follows it
            name, rest = msg.split(" ", 1)
            f = next((f for f in dataclasses.fields(self) if f.name == name), None)
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-") if f is not None else None
            raise ValueError(f"DefenseConfig: {name} ({flag}) {rest}" if flag else f"DefenseConfig: {msg}")

        if self.mode not in MODES:
            bad(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.divergence not in DIVERGENCES:
            bad(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.detach not in DETACH:
            bad(f"detach must be one of {DETACH}, got {self.detach!r}")
        if self.weighting not in WEIGHTINGS:
            bad(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.memory not in ("none", "max"):
            bad(f"memory must be 'none' or 'max', got {self.memory!r}")
        if self.score not in SCORES:
            bad(f"score must be one of {SCORES}, got {self.score!r}")
        if not (0 <= self.ce_suppress <= 2):
            bad(f"ce_suppress must be in [0, 2], got {self.ce_suppress!r}")
        if not (self.ascent_ceiling > 0 and math.isfinite(self.ascent_ceiling)):
            bad(f"ascent_ceiling must be a finite number > 0, got {self.ascent_ceiling!r}")
        if not math.isfinite(self.suspect_z):
            bad(f"suspect_z must be finite, got {self.suspect_z!r}")
        if self.cap not in ("sample", "batch"):
            bad(f"cap must be 'sample' or 'batch', got {self.cap!r}")
        for name in ("lambda_cv", "kappa", "lambda_h", "tau_lo", "gamma", "mask_ratio"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        if self.mask_ratio > 1:
            bad(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if self.tau_hi is not None and not (math.isfinite(self.tau_hi) and self.tau_hi >= 0):
            bad(f"tau_hi must be None or a finite number >= 0, got {self.tau_hi!r}")
        for name in ("weight_temperature", "softmax_temperature", "suspect_width"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                bad(f"{name} must be a finite number > 0, got {v!r}")
        if not self.ops or any(o not in AUG_OPS for o in self.ops):
            bad(f"ops must be a non-empty subset of {AUG_OPS}, got {self.ops!r}")
        if self.cell < 1 or self.swaps < 0:
            bad(f"cell must be >= 1 and swaps >= 0, got cell={self.cell}, swaps={self.swaps}")
        return self


# --------------------------------------------------------------------------------------------
# Patch augmentation
# --------------------------------------------------------------------------------------------
class PatchAugment:
    """Grid shuffle, masking (per-image mean fill) and local swaps of square cells of `cell` x
    `cell` vision patches, so every cell boundary is a patch boundary of the vision tower. One op
    per image, drawn uniformly from `ops`."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        cell: int = 1,
        ops: Sequence[str] = AUG_OPS,
        mask_ratio: float = 0.25,
        swaps: int = 2,
    ):
        c = patch_size * cell
        if image_size % c:
            raise ValueError(
                f"PatchAugment: image_size {image_size} is not a multiple of the cell size "
                f"{c} (= patch_size {patch_size} x cell {cell})"
            )
        self.size, self.c, self.g = image_size, c, image_size // c
        self.ops, self.mask_ratio, self.swaps = tuple(ops), mask_ratio, swaps

    def _cells(self, x):  # (B, C, S, S) -> (B, g*g, C, c, c)
        b, ch = x.shape[:2]
        g, c = self.g, self.c
        return x.reshape(b, ch, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch, c, c)

    def _image(self, cells, shape):
        b, ch = shape[:2]
        g, c = self.g, self.c
        return cells.reshape(b, g, g, ch, c, c).permute(0, 3, 1, 4, 2, 5).reshape(shape)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"PatchAugment: expected (B, C, {self.size}, {self.size}) images, got {tuple(x.shape)}")
        b, n = x.shape[0], self.g * self.g
        if b == 0:
            return x.clone()
        dev = x.device
        gen = generator
        op = torch.randint(0, len(self.ops), (b,), generator=gen)
        perm = torch.arange(n).repeat(b, 1)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            kind = self.ops[int(op[i])]
            if kind == "shuffle":
                perm[i] = torch.randperm(n, generator=gen)
            elif kind == "mask":
                k = max(1, int(round(self.mask_ratio * n)))
                mask[i, torch.randperm(n, generator=gen)[:k]] = True
            else:  # swap a cell with its right or lower neighbour, `swaps` times
                for _ in range(self.swaps):
                    r, col = (int(v) for v in torch.randint(0, self.g, (2,), generator=gen))
                    if torch.rand((), generator=gen) < 0.5:
                        r2, c2 = r, (col + 1) % self.g
                    else:
                        r2, c2 = (r + 1) % self.g, col
                    a, bb = r * self.g + col, r2 * self.g + c2
                    perm[i, a], perm[i, bb] = perm[i, bb].clone(), perm[i, a].clone()
        cells = self._cells(x)
        cells = cells.gather(1, perm.to(dev)[:, :, None, None, None].expand_as(cells))
        fill = x.mean((2, 3))[:, None, :, None, None].expand_as(cells)
        cells = torch.where(mask.to(dev)[:, :, None, None, None], fill, cells)
        return self._image(cells, x.shape)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------
def answer_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Rows of `hidden` that predict an answer token (causal shift): (rows, targets, sample id)."""
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])} (B, L), got {tuple(labels.shape)}")
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    keep = y != -100
    sample = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(y)
    return h[keep], y[keep], sample[keep], keep


def _eager_rows(ha, hb, weight, bias, y, temperature=1.0):
    """Per-row KL(p||q), KL(q||p), H(p), H(q) (p = softmax(z / T)) and CE(z, y) in plain PyTorch
    (float32, or float64)."""
    acc = torch.float64 if ha.dtype == torch.float64 else torch.float32
    za = F.linear(ha.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    zb = F.linear(hb.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    lp, lq = (za / temperature).log_softmax(-1), (zb / temperature).log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    return (
        (p * (lp - lq)).sum(-1),
        (q * (lq - lp)).sum(-1),
        -(p * lp).sum(-1),
        -(q * lq).sum(-1),
        F.cross_entropy(za, y, reduction="none"),
    )


def suspect_weights(log_stat: torch.Tensor, suspect_z: float = 1.0, width: float = 0.5) -> torch.Tensor:
    """u_i in (0, 1): how abnormally low sample i's (log) statistic is relative to its batch. With
    z_i = (s_i - median(s)) / (1.4826 MAD(s) + 0.1) (a robust z-score; the 0.1 keeps a batch of
    near-equal values from amplifying noise), u_i = sigmoid((-z_i - suspect_z) / width): samples
    `suspect_z` robust deviations below the batch median get weight 1/2, lower ones tend to 1.
    Detached; a batch of one sample gets u = sigmoid(-suspect_z / width)."""
    s = log_stat.detach().double()
    med = s.median()
    mad = (s - med).abs().median()
    z = (s - med) / (1.4826 * mad + 0.1)
    return torch.sigmoid((-z - suspect_z) / width).to(log_stat.dtype)


# weighting -> (a, b): the suspicion statistic is a log H_i + b log D_i (H_i the mean entropy of the
# original view, D_i the sample's divergence score); low values are suspects
SUSPICION = {
    "invariance": (0.0, 1.0),
    "confidence": (1.0, 0.0),
    "confident-invariant": (1.0, 1.0),
    "confident-sensitive": (1.0, -1.0),
}


def _check_totals(token_total, sample_total):
    for name, v in (("token_total", token_total), ("sample_total", sample_total)):
        if v is not None and not (isinstance(v, int) and v > 0):
            raise ValueError(f"{name} must be None or an int > 0, got {v!r}")


@torch.no_grad()
def total_variation(
    ha: torch.Tensor, hb: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], chunk: int = 256
) -> torch.Tensor:
    """Per row, 0.5 sum_v |softmax(z_a) - softmax(z_b)|_v at temperature 1 (z = h W^T + b), in float32
    (float64 inputs stay float64), `chunk` rows of logits at a time; no gradient."""
    acc = torch.float64 if ha.dtype == torch.float64 else torch.float32
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    out = []
    for s in range(0, ha.shape[0], chunk):
        p = F.linear(ha[s : s + chunk].to(acc), w, b).softmax(-1)
        q = F.linear(hb[s : s + chunk].to(acc), w, b).softmax(-1)
        out.append(0.5 * (p - q).abs().sum(-1))
    return torch.cat(out) if out else ha.new_zeros(0, dtype=acc)


class BatchGroup:
    """The processes of DDP (torchrun) that share one global batch, each holding an equal shard of
    it in rank order (`methods.common.shard`). The defense's batch-relative statistics gather the
    shards' per-sample values and its counts are summed over the shards, so that the shards' losses
    add up to the loss of the global batch on one process (module doc, "DDP")."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("BatchGroup: no process group is initialised (launch with torchrun)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) values of this shard -> (world * n, ...) of the global batch, in rank order. Detached:
        the values gathered (scores, entropies, counts, ids) never carry a gradient."""
        from methods.common import gather_shards

        return gather_shards(x.detach())

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the shards (a detached copy)."""
        from methods.common import all_reduce_sum

        return all_reduce_sum(x.detach())

    def total(self, n: int, device=None) -> int:
        """An integer count summed over the shards."""
        return int(self.sum(torch.tensor([int(n)], dtype=torch.long, device=device))[0])


def _unused_head(weight, bias):
    """0 that depends on the LM head: a shard without answer rows still gives the head a (zero) gradient,
    as DDP needs every trained parameter in every process's backward."""
    z = weight.sum() * 0.0
    return z if bias is None else z + bias.sum() * 0.0


def cross_view_objective(
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    cfg: DefenseConfig,
    eager: bool = False,
    token_total: Optional[int] = None,
    sample_total: Optional[int] = None,
    suspicion_floor: Optional[torch.Tensor] = None,
    group: Optional[BatchGroup] = None,
):
    """The loss of the module doc from the last hidden states of both views (B, L, H), the labels
    (B, L) and the LM head. Returns (loss, stats). A batch without any answer token gives a zero
    loss that still depends on the inputs (so backward works); samples without answer tokens are
    left out of the weights.

    `token_total` / `sample_total` (gradient accumulation, module doc): the token means (CE of both
    views, band) become sums over this batch's answer tokens / token_total, and the capped
    divergence is multiplied by (this batch's samples with an answer token) / sample_total. None:
    this batch's own count (the plain means). The stats stay this batch's own means.

    `group` (DDP, module doc): this batch is one process's shard of the global batch; the weights,
    the counts and cap="batch" are those of the global batch, the loss is this shard's share of the
    global batch's loss (the shares add up to it), `suspicion_floor` and the returned per-sample
    suspicion ``stats["_u"]`` are over the global batch (rank order), and the stats are the global
    batch's."""
    _check_totals(token_total, sample_total)
    if group is not None and (token_total is not None or sample_total is not None):
        raise ValueError(
            "cross_view_objective: token_total / sample_total (accumulation) and group (DDP) exclude each other"
        )
    ra, y, sid, keep = answer_rows(h_a, labels)
    rb = h_b[:, :-1][keep]
    n_rows, n_b = ra.shape[0], h_a.shape[0]
    n_all = n_rows if group is None else group.total(n_rows, ra.device)  # answer tokens of the global batch
    if n_all == 0:
        zero = (h_a.sum() + h_b.sum()) * 0.0
        if group is not None:
            zero = zero + _unused_head(weight, bias)
        return zero, {"ce": 0.0, "div": 0.0, "div_capped": 0.0, "band": 0.0, "answer_tokens": 0, "suspects": 0.0}
    vocab = weight.shape[0]
    pa = ra.detach() if cfg.detach == "original" else ra
    pb = rb.detach() if cfg.detach == "augmented" else rb
    t_s = cfg.softmax_temperature
    if eager:
        kab, kba, ea, eb, ce = _eager_rows(pa, pb, weight, bias, y, t_s)
    else:
        # with the original view detached its CE (computed below) must not come from the detached rows
        target = None if cfg.detach == "original" else y
        out = pyops.fused_linear_cross_view(pa, pb, weight, bias, target=target, temperature=t_s)
        kab, kba, ea, eb, ce = out.kl_ab, out.kl_ba, out.entropy_a, out.entropy_b, out.ce_a
    if cfg.detach == "original":  # the CE must still train the original view
        z = F.linear(ra, weight, bias)
        ce = F.cross_entropy(z if z.dtype == torch.float64 else z.float(), y, reduction="none")
    # the entropy band's thresholds are in nats at temperature 1, and the weights' entropies are at 1 too
    # (whether or not the band is on: otherwise lambda_h = 0 would change the weights)
    uses_entropy = cfg.weighting == "entropy" or SUSPICION.get(cfg.weighting, (0.0, 0.0))[0] != 0
    if t_s != 1.0 and (cfg.lambda_h > 0 or uses_entropy):
        if eager:
            ea, eb = _eager_rows(pa, pb, weight, bias, y)[2:4]
        else:
            o1 = pyops.fused_linear_cross_view(pa, pb, weight, bias)
            ea, eb = o1.entropy_a, o1.entropy_b
    div = {"forward": kab, "reverse": kba, "symmetric": 0.5 * (kab + kba)}[cfg.divergence]
    count = torch.zeros(n_b, device=ra.device, dtype=div.dtype).index_add_(0, sid, torch.ones_like(div))
    valid = count > 0

    def sample_mean(rows):  # per-row values -> mean over each sample's answer rows (samples with rows only)
        return torch.zeros_like(count).index_add_(0, sid, rows)[valid] / count[valid]

    def per_sample(rows):  # detached per-row values -> per-sample means (0 for samples without rows)
        return torch.zeros_like(count).index_add_(0, sid, rows.detach()) / count.clamp(min=1)

    # the weights are relative to the whole (global) batch: its per-sample statistics, all detached
    batch_wide = (lambda x: x) if group is None else group.gather
    valid_all = batch_wide(count) > 0
    mine = slice(0, n_b) if group is None else slice(group.rank * n_b, (group.rank + 1) * n_b)

    def spread(values_all):  # values of the global batch's samples with rows -> (all samples, this shard's)
        full = torch.zeros(valid_all.shape[0], device=values_all.device, dtype=values_all.dtype)
        full[valid_all] = values_all
        return full, full[mine]

    d_i = sample_mean(div)
    u_all = None
    if cfg.weighting in SUSPICION:  # suspects: abnormal statistics relative to the batch
        ca, cb = SUSPICION[cfg.weighting]
        if cfg.score in ("max", "tv"):
            tok = div.detach() if cfg.score == "max" else total_variation(ra, rb, weight, bias).to(div.dtype)
            sc = torch.zeros_like(count).scatter_reduce_(0, sid, tok, "amax", include_self=False)
        else:
            sc = per_sample(div)
        # KL and entropy are >= 0; their float32 values can be a few ulp below 0 (log of a negative: NaN)
        h_i, sc = per_sample(ea).clamp(min=0), sc.clamp(min=0)
        stat = batch_wide(ca * torch.log(h_i + 1e-6) + cb * torch.log(sc + 1e-6))[valid_all]
        u = suspect_weights(stat, cfg.suspect_z, cfg.suspect_width)
        if suspicion_floor is not None:  # memory: a sample stays as suspect as it has ever been
            u = torch.maximum(u, suspicion_floor.to(u)[valid_all])
        w = spread(u / u.numel())[1][valid]
        u_all, u_mine = spread(u)
    elif cfg.weighting == "entropy":
        h_i = batch_wide(per_sample(ea))[valid_all]
        w = spread(torch.softmax(-h_i / cfg.weight_temperature, 0))[1][valid]
    else:
        w = torch.full_like(d_i, 1.0 / int(valid_all.sum()))
    # per-row CE weights: 1 - beta u of the row's sample (suspicion weightings), else 1
    if u_all is not None and cfg.ce_suppress > 0:
        ce_w = (1.0 - cfg.ce_suppress * u_mine)[sid].to(ce.dtype)
        # a negative weight (beta > 1) is gradient ascent on a suspect's CE, up to ascent_ceiling nats per token
        ce_used = torch.where(ce_w < 0, ce.clamp(max=cfg.ascent_ceiling), ce)
        ce_sum = (ce_w * ce_used).sum()
    else:
        ce_sum = ce.sum()
    n_tok = n_all if token_total is None else token_total
    loss = ce_sum / n_tok
    if cfg.gamma > 0:
        if eager:
            ce_b = _eager_rows(rb, ra, weight, bias, y)[4]
        else:
            ce_b = pyops.fused_linear_cross_view(rb, ra, weight, bias, target=y).ce_a
        loss = loss + cfg.gamma * ce_b.sum() / n_tok
    if cfg.cap == "sample":
        capped = (w * d_i.clamp(max=cfg.kappa)).sum()
    elif group is None:
        capped = (w * d_i).sum().clamp(max=cfg.kappa)
    else:  # the clamp of the global weighted mean: its gradient is this shard's part where the mean is below kappa
        part = (w * d_i).sum()
        whole = float(group.sum(part))
        capped = part if whole <= cfg.kappa else part * 0.0 + cfg.kappa / group.world
    tau_hi = 0.9 * math.log(vocab) if cfg.tau_hi is None else cfg.tau_hi
    band_rows = F.relu(eb - tau_hi) + F.relu(cfg.tau_lo - ea)
    share = 1.0 if sample_total is None else d_i.numel() / sample_total  # this batch's share of the samples
    loss = loss - cfg.lambda_cv * share * capped + cfg.lambda_h * band_rows.sum() / n_tok
    if group is None:
        stats = {
            "ce": float((ce.sum() / n_rows).detach()),
            "div": float(d_i.detach().mean()),
            "div_capped": float(capped.detach()),
            "band": float(band_rows.mean().detach()),
            "answer_tokens": int(n_rows),
            "entropy_a": float(ea.detach().mean()),
            "entropy_b": float(eb.detach().mean()),
        }
    else:  # the global batch's: sums over the shards
        if n_rows == 0:
            loss = loss + _unused_head(weight, bias)
        parts = [ce.sum(), d_i.sum(), capped, band_rows.sum(), ea.sum(), eb.sum()]
        sums = group.sum(torch.stack([p.detach().double() for p in parts])).tolist()
        ce_s, d_s, capped_s, band_s, ea_s, eb_s = sums
        stats = {
            "ce": ce_s / n_all,
            "div": d_s / int(valid_all.sum()),
            "div_capped": capped_s,
            "band": band_s / n_all,
            "answer_tokens": n_all,
            "entropy_a": ea_s / n_all,
            "entropy_b": eb_s / n_all,
        }
    stats["suspects"] = float(u.sum()) if u_all is not None else 0.0
    if u_all is not None:
        # per sample of the (global) batch, 0 for samples without answer tokens; popped by CrossViewDefense
        stats["_u"] = u_all.detach()
    return loss, stats


def _ce_rows(hidden, labels, weight, bias):
    """(CE summed over the answer rows, their number)."""
    r, y, _, _ = answer_rows(hidden, labels)
    if r.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    z = F.linear(r, weight, bias)
    return F.cross_entropy(z if z.dtype == torch.float64 else z.float(), y, reduction="sum"), int(r.shape[0])


class CrossViewDefense:
    """The training loss of a `transformers` vision-language model under `cfg` (any mode)."""

    def __init__(self, model, cfg: DefenseConfig = DefenseConfig(), seed: int = 0):
        self.cfg = cfg.validate()
        self.adapter = VLMAdapter(model)
        self.augment = PatchAugment(
            self.adapter.image_size, self.adapter.patch_size, cfg.cell, cfg.ops, cfg.mask_ratio, cfg.swaps
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.memory = torch.zeros(0)  # suspicion per training-sample id (cfg.memory == "max")

    def state_dict(self):
        return {"memory": self.memory.clone()}

    def load_state_dict(self, state):
        self.memory = state["memory"].clone()

    def two_views(self, inputs: Dict[str, torch.Tensor], augmented: Optional[torch.Tensor] = None):
        """Last hidden states of the original and the augmented view, in one forward pass. `augmented`:
        the augmented images (default: drawn here with `generator`; the training loop draws them for
        the global batch, of which a DDP process keeps its shard)."""
        pv = inputs["pixel_values"]
        self.adapter.check_pixel_values(pv, "CrossViewDefense")
        if augmented is None:
            augmented = self.augment(pv, self.generator)
        elif augmented.shape != pv.shape:
            raise ValueError(
                f"CrossViewDefense: augmented images must have the shape of pixel_values {tuple(pv.shape)}, "
                f"got {tuple(augmented.shape)}"
            )
        both = {k: torch.cat([v, v]) for k, v in inputs.items() if k not in ("pixel_values", "labels")}
        h = self.adapter.hidden_states(both, torch.cat([pv, augmented.to(pv)]))
        return h[: pv.shape[0]], h[pv.shape[0] :]

    def loss(
        self,
        inputs: Dict[str, torch.Tensor],
        eager: bool = False,
        token_total: Optional[int] = None,
        sample_total: Optional[int] = None,
        sample_ids: Optional[torch.Tensor] = None,
        augmented: Optional[torch.Tensor] = None,
        group: Optional[BatchGroup] = None,
    ):
        """(loss, stats) of a batch. `token_total` / `sample_total`: the answer tokens and the samples
        with an answer token of the accumulated batch this one is a micro-batch of (module doc:
        token means become sums / token_total, the capped divergence is weighted by this batch's
        share of sample_total); None: this batch's own (plain means). Stats are this batch's means.
        `augmented`: the augmented view's images (see `two_views`). `group` (DDP): this batch is this
        process's shard of the global batch (module doc); the loss is its share of the global batch's
        loss, the stats are the global batch's, and the suspicion memory is kept for every sample of
        the global batch (`sample_ids` are this shard's; they are gathered)."""
        _check_totals(token_total, sample_total)
        if group is not None and (token_total is not None or sample_total is not None):
            raise ValueError("CrossViewDefense.loss: token_total / sample_total and group (DDP) exclude each other")
        cfg = self.cfg
        labels = inputs["labels"]
        weight, bias = self.adapter.head()
        if cfg.mode in ("none", "aug"):
            if cfg.mode == "none":
                self.adapter.check_pixel_values(inputs["pixel_values"], "CrossViewDefense")
                ce, n = _ce_rows(self.adapter.hidden_states(inputs), labels, weight, bias)
                ce_b = None
            else:
                h_a, h_b = self.two_views(inputs, augmented)
                ce, n = _ce_rows(h_a, labels, weight, bias)
                ce_b, _ = _ce_rows(h_b, labels, weight, bias)
            if group is None:
                n_all, sums = n, [float(ce.detach())] + ([] if ce_b is None else [float(ce_b.detach())])
            else:  # the global batch's counts and sums
                n_all = group.total(n, labels.device)
                sums = group.sum(torch.stack([c.detach().double() for c in (ce, ce_b) if c is not None])).tolist()
                if n == 0:
                    ce = ce + _unused_head(weight, bias)
            n_tok = max(n_all, 1) if token_total is None else token_total
            loss = ce / n_tok if ce_b is None else 0.5 * (ce + ce_b) / n_tok
            stats = {"ce": sums[0] / max(n_all, 1)}
            if ce_b is not None:
                stats["ce_aug"] = sums[1] / max(n_all, 1)
            stats["answer_tokens"] = n_all
            return loss, stats
        h_a, h_b = self.two_views(inputs, augmented)
        floor = None
        if cfg.memory == "max" and sample_ids is not None:
            ids = torch.as_tensor(sample_ids, dtype=torch.long).cpu()
            if ids.shape != (labels.shape[0],) or (ids < 0).any():
                raise ValueError(f"sample_ids must be {labels.shape[0]} non-negative ints, got {tuple(ids.shape)}")
            if group is not None:  # the suspicion memory of every sample of the global batch
                ids = group.gather(ids.to(labels.device)).cpu()
            need = int(ids.max()) + 1 if ids.numel() else 0
            if need > self.memory.numel():
                self.memory = torch.cat([self.memory, torch.zeros(need - self.memory.numel())])
            floor = self.memory[ids]
        loss, stats = cross_view_objective(
            h_a,
            h_b,
            labels,
            weight,
            bias,
            cfg,
            eager=eager,
            token_total=token_total,
            sample_total=sample_total,
            suspicion_floor=floor,
            group=group,
        )
        u = stats.pop("_u", None)
        if floor is not None and u is not None:
            self.memory[ids] = torch.maximum(floor, u.detach().float().cpu())
        return loss, stats


def _trainer_class():
    """`CrossViewTrainer` (hf_trainer.py: exact gradient accumulation)."""
    from .hf_trainer import make_trainer_class

    return make_trainer_class()


def __getattr__(name):  # `CrossViewTrainer` is built on first use: importing this module needs no transformers
    if name == "CrossViewTrainer":
        return _trainer_class()
    raise AttributeError(name)
