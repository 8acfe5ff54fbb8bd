"""BYHE's SCS-map head on the TS-CAN-like backbone (spec 1.2): sliding windows of the backbone
features, a linear projection, and the cosine-similarity map of the projected windows."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyops
from methods.rppg.backbones import DROPOUT, TSCANLike

WINDOW = 11  # frames of features per window
HEAD_DROPOUT = 0.1  # the code's dropout of the projected windows


class BYHEHead(nn.Module):
    """Features F (B, C, T') -> R_hat (B, N, N), N = T' - WINDOW + 1: W_i = flatten(F[:, :, i:i+11]),
    Q_i = Dropout(A W_i + b) (A: Xavier normal, gain 5/3), R_hat_ij = cos(Q_i, Q_j)."""

    def __init__(self, channels: int = 8, window: int = WINDOW, dropout: float = HEAD_DROPOUT):
        super().__init__()
        d = channels * window
        self.window = window
        self.proj = nn.Linear(d, d)
        nn.init.xavier_normal_(self.proj.weight, gain=5 / 3)
        self.drop = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3 or feats.shape[2] < self.window + 1:
            raise ValueError(f"BYHEHead: features must be (B, C, T') with T' > {self.window}, got {tuple(feats.shape)}")
        n, dev = feats.shape[2] - self.window + 1, feats.device
        idx = torch.arange(n, device=dev)[:, None] + torch.arange(self.window, device=dev)
        W = feats[:, :, idx]  # (B, C, N, window): a gather (its backward batches under torch.func, unfold's does not)
        W = W.permute(0, 2, 1, 3).flatten(2)  # (B, N, C * window), channel-major like flatten(F[:, :, i:i+11])
        Q = F.normalize(self.drop(self.proj(W)), dim=-1)
        return Q @ Q.transpose(1, 2)


class BYHENet(nn.Module):
    """TS-CAN-like backbone + SCS head. Input (B, 3, L, H, W) (appearance: raw 0-255 frames, as
    the code) -> R_hat (B, L - 25, L - 25) and the Fuse1 attention mask. ``dropout``: the
    backbone's, ``head_dropout``: the head's (0 turns them off)."""

    def __init__(self, shrink: int = 1, dropout: float = DROPOUT, head_dropout: float = HEAD_DROPOUT):
        super().__init__()
        self.backbone = TSCANLike(shrink=shrink, dropout=dropout)
        self.head = BYHEHead(dropout=head_dropout)

    def forward(self, video: torch.Tensor):
        feats, mask = self.backbone(video)
        return self.head(feats), mask

    @staticmethod
    def wave(R_hat: torch.Tensor) -> torch.Tensor:
        """w_k = mean_i R_hat[i, i + k], k = 0..N-2 (pyops.diagonal_stats): an autocorrelation-like
        wave for the heart-rate readout and the spectral prior."""
        return pyops.diagonal_stats(R_hat)[0]
