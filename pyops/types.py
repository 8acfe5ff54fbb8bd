"""Result types shared by the ops and their references."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class CrossViewOutput(NamedTuple):
    """Per-row results of ``cross_view_kl_entropy`` / ``fused_linear_cross_view``, each of the
    logits' leading shape ``(...)``: float32 (float64 for float64 inputs)."""

    kl_ab: torch.Tensor  # KL(p_a || p_b)
    kl_ba: torch.Tensor  # KL(p_b || p_a)
    entropy_a: torch.Tensor  # H(p_a)
    entropy_b: torch.Tensor  # H(p_b)
    ce_a: Optional[torch.Tensor]  # CE of logits_a (temperature 1) vs target; None without target
