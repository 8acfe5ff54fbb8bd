"""The defense: patch augmentation, the capped cross-view divergence, the entropy band and the
uncertainty-aware sample weights (spec A.3, a reconstruction with switches; the paper's exact
loss is not public).

Per batch, every image is shown twice, as itself (view a, logits z, p = softmax(z / T_s)) and
patch-augmented (view b, z', q = softmax(z' / T_s)), in one forward pass of the doubled batch. On
the answer tokens only (positions whose label is not -100, shifted as in causal LM training)::

    L = CE(z, y) + gamma CE(z', y)
        - lambda_cv * cap( D_i, kappa )                        # push the views apart, capped
        + lambda_h * mean_t [ relu(H(q_t) - tau_hi) + relu(tau_lo - H(p_t)) ]   # entropy band
    D_i = (1/|M_i|) sum_{t in M_i} div(p_t, q_t)               # forward KL(p||q) by default
    cap = sum_i w_i min(D_i, kappa)  ("sample", default)  or  min(sum_i w_i D_i, kappa)  ("batch")
    w_i = softmax_i( -mean_t H(p_t) / T_w )   (detached; confident samples are pushed harder)

`detach` stops the gradient of one view inside the divergence and the band (the CE of the
original view always trains). T_s > 1 keeps the divergence's gradient alive on saturated
(near one-hot) outputs, where KL(p||q) and H(p) are flat.

All per-token quantities (both KLs, both entropies, the CE) come from one call of the fused
`pyops.fused_linear_cross_view` on the answer rows' last hidden states and the LM head: the
vocabulary logits of the two views are never materialised. `eager=True` computes the same
objective with plain PyTorch (the test oracle).

Ablations: ``mode="none"`` (plain fine-tuning: CE on the original view) and ``mode="aug"``
(augmentation only: the mean CE of both views, no cross-view or entropy term).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyops

from .model import VLMAdapter

MODES = ("none", "aug", "crossview")
DETACH = ("none", "original", "augmented")
DIVERGENCES = ("forward", "reverse", "symmetric")
AUG_OPS = ("shuffle", "mask", "swap")


@dataclass
class DefenseConfig:
    mode: str = "crossview"  # none | aug | crossview
    divergence: str = "forward"  # forward KL(p||q) | reverse KL(q||p) | symmetric (mean of both)
    lambda_cv: float = 1.0
    kappa: float = 1.0  # cap, nats per token
    cap: str = "sample"  # sample | batch
    lambda_h: float = 0.1
    tau_lo: float = 0.05  # nats
    tau_hi: Optional[float] = None  # nats; None = 0.9 log V
    weight_temperature: float = 0.1  # T_w of the uncertainty-aware weights
    softmax_temperature: float = 3.0  # T_s: p = softmax(z / T_s) in the divergence and the entropies (CE at 1)
    uncertainty_weights: bool = True  # False: uniform weights
    gamma: float = 0.0  # CE weight of the augmented view
    detach: str = "none"  # none | original | augmented: stop-gradient on that view in the divergence and band
    # patch augmentation
    ops: Tuple[str, ...] = AUG_OPS
    cell: int = 1  # cell side in vision patches
    mask_ratio: float = 0.25
    swaps: int = 2

    def validate(self) -> "DefenseConfig":
        def bad(msg):
            raise ValueError(f"DefenseConfig: {msg}")

        if self.mode not in MODES:
            bad(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.divergence not in DIVERGENCES:
            bad(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.detach not in DETACH:
            bad(f"detach must be one of {DETACH}, got {self.detach!r}")
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
        for name in ("weight_temperature", "softmax_temperature"):
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

    def __init__(self, image_size: int, patch_size: int, cell: int = 1, ops: Sequence[str] = AUG_OPS,
                 mask_ratio: float = 0.25, swaps: int = 2):
        c = patch_size * cell
        if image_size % c:
            raise ValueError(f"PatchAugment: image_size {image_size} is not a multiple of the cell size "
                             f"{c} (= patch_size {patch_size} x cell {cell})")
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
    return ((p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1), -(p * lp).sum(-1), -(q * lq).sum(-1),
            F.cross_entropy(za, y, reduction="none"))


def cross_view_objective(h_a: torch.Tensor, h_b: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], cfg: DefenseConfig, eager: bool = False):
    """The loss of the module doc from the last hidden states of both views (B, L, H), the labels
    (B, L) and the LM head. Returns (loss, stats). A batch without any answer token gives a zero
    loss that still depends on the inputs (so backward works); samples without answer tokens are
    left out of the weights."""
    ra, y, sid, keep = answer_rows(h_a, labels)
    rb = h_b[:, :-1][keep]
    n_rows, n_b = ra.shape[0], h_a.shape[0]
    if n_rows == 0:
        zero = (h_a.sum() + h_b.sum()) * 0.0
        return zero, {"ce": 0.0, "div": 0.0, "div_capped": 0.0, "band": 0.0, "answer_tokens": 0}
    vocab = weight.shape[0]
    pa = ra.detach() if cfg.detach == "original" else ra
    pb = rb.detach() if cfg.detach == "augmented" else rb
    if eager:
        kab, kba, ea, eb, ce = _eager_rows(pa, pb, weight, bias, y, cfg.softmax_temperature)
    else:
        # with the original view detached its CE (computed below) must not come from the detached rows
        target = None if cfg.detach == "original" else y
        out = pyops.fused_linear_cross_view(pa, pb, weight, bias, target=target, temperature=cfg.softmax_temperature)
        kab, kba, ea, eb, ce = out.kl_ab, out.kl_ba, out.entropy_a, out.entropy_b, out.ce_a
    if cfg.detach == "original":  # the CE must still train the original view
        z = F.linear(ra, weight, bias)
        ce = F.cross_entropy(z if z.dtype == torch.float64 else z.float(), y, reduction="none")
    ce_mean = ce.sum() / n_rows
    loss = ce_mean
    if cfg.gamma > 0:
        if eager:
            ce_b = _eager_rows(rb, ra, weight, bias, y)[4]
        else:
            ce_b = pyops.fused_linear_cross_view(rb, ra, weight, bias, target=y).ce_a
        loss = loss + cfg.gamma * ce_b.sum() / n_rows
    div = {"forward": kab, "reverse": kba, "symmetric": 0.5 * (kab + kba)}[cfg.divergence]
    count = torch.zeros(n_b, device=ra.device, dtype=div.dtype).index_add_(0, sid, torch.ones_like(div))
    valid = count > 0
    d_i = torch.zeros_like(count).index_add_(0, sid, div)[valid] / count[valid]
    h_i = torch.zeros_like(count).index_add_(0, sid, ea.detach())[valid] / count[valid]
    if cfg.uncertainty_weights:
        w = torch.softmax(-h_i / cfg.weight_temperature, 0)
    else:
        w = torch.full_like(h_i, 1.0 / h_i.numel())
    if cfg.cap == "sample":
        capped = (w * d_i.clamp(max=cfg.kappa)).sum()
    else:
        capped = (w * d_i).sum().clamp(max=cfg.kappa)
    tau_hi = 0.9 * math.log(vocab) if cfg.tau_hi is None else cfg.tau_hi
    band = (F.relu(eb - tau_hi) + F.relu(cfg.tau_lo - ea)).mean()
    loss = loss - cfg.lambda_cv * capped + cfg.lambda_h * band
    stats = {"ce": float(ce_mean.detach()), "div": float((w * d_i).sum().detach()),
             "div_capped": float(capped.detach()), "band": float(band.detach()), "answer_tokens": int(n_rows),
             "entropy_a": float(ea.detach().mean()), "entropy_b": float(eb.detach().mean())}
    return loss, stats


def _ce_rows(hidden, labels, weight, bias):
    r, y, _, _ = answer_rows(hidden, labels)
    if r.shape[0] == 0:
        return hidden.sum() * 0.0, 0
    return F.cross_entropy(F.linear(r, weight, bias).float(), y), int(r.shape[0])


class CrossViewDefense:
    """The training loss of a `transformers` vision-language model under `cfg` (any mode)."""

    def __init__(self, model, cfg: DefenseConfig = DefenseConfig(), seed: int = 0):
        self.cfg = cfg.validate()
        self.adapter = VLMAdapter(model)
        self.augment = PatchAugment(self.adapter.image_size, self.adapter.patch_size, cfg.cell, cfg.ops,
                                    cfg.mask_ratio, cfg.swaps)
        self.generator = torch.Generator().manual_seed(seed)

    def two_views(self, inputs: Dict[str, torch.Tensor]):
        """Last hidden states of the original and the augmented view, in one forward pass."""
        pv = inputs["pixel_values"]
        self.adapter.check_pixel_values(pv, "CrossViewDefense")
        aug = self.augment(pv, self.generator)
        both = {k: torch.cat([v, v]) for k, v in inputs.items() if k not in ("pixel_values", "labels")}
        h = self.adapter.hidden_states(both, torch.cat([pv, aug]))
        return h[: pv.shape[0]], h[pv.shape[0]:]

    def loss(self, inputs: Dict[str, torch.Tensor], eager: bool = False):
        cfg = self.cfg
        labels = inputs["labels"]
        weight, bias = self.adapter.head()
        if cfg.mode == "none":
            self.adapter.check_pixel_values(inputs["pixel_values"], "CrossViewDefense")
            h = self.adapter.hidden_states(inputs)
            ce, n = _ce_rows(h, labels, weight, bias)
            return ce, {"ce": float(ce.detach()), "answer_tokens": n}
        h_a, h_b = self.two_views(inputs)
        if cfg.mode == "aug":
            ce_a, n = _ce_rows(h_a, labels, weight, bias)
            ce_b, _ = _ce_rows(h_b, labels, weight, bias)
            return 0.5 * (ce_a + ce_b), {"ce": float(ce_a.detach()), "ce_aug": float(ce_b.detach()), "answer_tokens": n}
        return cross_view_objective(h_a, h_b, labels, weight, bias, cfg, eager=eager)


@lru_cache(maxsize=None)
def _trainer_class():
    from transformers import Trainer

    class CrossViewTrainer(Trainer):
        """A `transformers.Trainer` whose `compute_loss` is the defense's loss. Pass
        ``defense=DefenseConfig(...)`` (and ``defense_seed``) to the constructor; batches are dicts
        with input_ids, attention_mask, labels and pixel_values, as `data.collate` makes them."""

        def __init__(self, *args, defense: DefenseConfig = DefenseConfig(), defense_seed: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.defense = CrossViewDefense(self.model, defense, defense_seed)
            self.last_defense_stats: Dict[str, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.defense.adapter.model = model  # the Trainer may have wrapped it
            loss, stats = self.defense.loss(inputs)
            self.last_defense_stats = stats
            return (loss, {"loss": loss}) if return_outputs else loss

    return CrossViewTrainer


def __getattr__(name):  # `CrossViewTrainer` is built on first use: importing this module needs no transformers
    if name == "CrossViewTrainer":
        return _trainer_class()
    raise AttributeError(name)
