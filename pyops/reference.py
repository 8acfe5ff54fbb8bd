"""Pure-PyTorch baselines of every pyops op: same signatures, written as a careful PyTorch user
would write them. They are the test oracle and the benchmark baseline (eager, and under
``torch.compile``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import CrossViewOutput

__all__ = ["cross_view_kl_entropy", "fused_linear_cross_view"]


def cross_view_kl_entropy(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> CrossViewOutput:
    """Per-row KL(p_a||p_b), KL(p_b||p_a), H(p_a), H(p_b) with p = softmax(logits / T), and the
    cross-entropy of logits_a (temperature 1) against target. Computed in float32 (float64 for
    float64 logits)."""
    acc = torch.float64 if logits_a.dtype == torch.float64 else torch.float32
    a, b = logits_a.to(acc), logits_b.to(acc)
    log_p = torch.log_softmax(a / temperature, dim=-1)
    log_q = torch.log_softmax(b / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    kl_ab = (p * (log_p - log_q)).sum(-1)
    kl_ba = (q * (log_q - log_p)).sum(-1)
    entropy_a = -(p * log_p).sum(-1)
    entropy_b = -(q * log_q).sum(-1)
    ce_a = None
    if target is not None:
        vocab = a.shape[-1]
        ce_a = F.cross_entropy(
            a.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index, reduction="none"
        ).reshape(target.shape)
    return CrossViewOutput(kl_ab, kl_ba, entropy_a, entropy_b, ce_a)


def fused_linear_cross_view(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> CrossViewOutput:
    """``cross_view_kl_entropy`` of the logits ``hidden @ weight.T + bias`` of both views (the
    logits of all rows are materialised; ``chunk_size`` is accepted and ignored)."""
    del chunk_size
    logits_a = F.linear(hidden_a, weight, bias)
    logits_b = F.linear(hidden_b, weight, bias)
    return cross_view_kl_entropy(
        logits_a, logits_b, target, temperature=temperature, ignore_index=ignore_index
    )
