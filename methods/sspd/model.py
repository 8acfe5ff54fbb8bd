"""SSPD's networks (spec 2.2): the 3-D CNN backbone, the rPPG predictor (behind a stop-gradient),
and S3M, the self-similarity module whose three temporal-self-attention (TS) blocks each give a
self-similarity map.

Every backbone conv has no bias and is followed by BatchNorm and tanh; the official convs pad
time only (``spatial_padding=False``), which needs frames of at least 66 x 66 (128 x 128 in the
paper). ``spatial_padding=True`` pads space too, for the small frames a CPU can train on.
``width`` divides the channel widths (8, 16, 32, 64, 256).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(cin: int, cout: int, k, pad) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, k, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.Tanh())


class Backbone(nn.Module):
    """(B, 3, T, H, W) frame differences -> F (B, C, T, h, w) and X = GAP(F) (B, C, T)."""

    def __init__(self, width: int = 1, spatial_padding: bool = False):
        super().__init__()
        c = [max(2, n // width) for n in (8, 16, 16, 32, 32, 64, 256)]
        self.channels = c[-1]
        p5, p3 = ((1, 2, 2), (1, 1, 1)) if spatial_padding else ((1, 0, 0), (1, 0, 0))
        self.min_size = 8 if spatial_padding else 66
        self.net = nn.Sequential(
            nn.BatchNorm3d(3),
            _block(3, c[0], (3, 5, 5), p5),
            _block(c[0], c[1], 3, p3),
            nn.AvgPool3d((1, 2, 2)),
            _block(c[1], c[2], (3, 5, 5), p5),
            _block(c[2], c[3], 3, p3),
            nn.AvgPool3d((1, 2, 2)),
            _block(c[3], c[4], (3, 5, 5), p5),
            _block(c[4], c[5], 3, p3),
            nn.AvgPool3d((1, 2, 2)),
            _block(c[5], c[6], 3, p3),
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"SSPD backbone: input must be (B, 3, T, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"SSPD backbone: frames must be at least {self.min_size} x {self.min_size} "
                f"(spatial_padding={self.min_size == 8}), got {tuple(x.shape[-2:])}"
            )
        f = self.net(x)
        return f, f.mean((-2, -1))


class Predictor(nn.Module):
    """F.detach() (B, C, T, h, w) -> the rPPG wave y (B, T) (T even)."""

    def __init__(self, cin: int = 256, width: int = 1, spatial_padding: bool = False):
        super().__init__()
        c = max(2, 64 // width)
        p = (1, 1, 1) if spatial_padding else (1, 0, 0)
        self.a = _block(cin, c, (3, 1, 1), (1, 0, 0))
        self.pool = nn.AvgPool3d((2, 2, 2), ceil_mode=True)
        self.b = _block(c, c, 3, p)
        self.c = _block(c, c, (3, 1, 1), (1, 0, 0))
        self.out = nn.Conv3d(c, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        T = f.shape[2]
        x = self.b(self.pool(self.a(f)))
        x = F.interpolate(x, size=(T,) + tuple(x.shape[-2:]), mode="nearest")  # x2 in time (back to T)
        x = self.c(x)
        x = F.adaptive_avg_pool3d(x, (T, 1, 1))  # AvgPool(1, 2, 2) down to one pixel
        return self.out(x)[:, 0, :, 0, 0]


class TSBlock(nn.Module):
    """Temporal self-attention: tokens LN(Conv1d_k(x)) (T_k = T - k + 1), per head
    scores = q k^T / T_k (no softmax), h = tanh(Linear(scores v)); returns h (B, T_k, D) and the
    next input nearest_interp(x, T_k) + h^T."""

    def __init__(self, dim: int, kernel: int, heads: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.kernel, self.heads = kernel, heads
        self.conv = nn.Conv1d(dim, dim, kernel)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, D, T = x.shape
        if T < self.kernel:
            raise ValueError(f"TS block: {T} time steps, fewer than its kernel {self.kernel}")
        tok = self.norm(self.conv(x).transpose(1, 2))  # (B, T_k, D)
        Tk = tok.shape[1]

        def split(t):
            return t.view(B, Tk, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T_k, d)

        q, k, v = split(self.q(tok)), split(self.k(tok)), split(self.v(tok))
        a = (q @ k.transpose(-1, -2)) / Tk @ v  # (B, heads, T_k, d)
        h = torch.tanh(self.proj(a.transpose(1, 2).reshape(B, Tk, D)))
        nxt = F.interpolate(x, size=Tk, mode="nearest") + h.transpose(1, 2)
        return h, nxt


def cosine_ssm(h: torch.Tensor) -> torch.Tensor:
    """Row-cosine self-similarity (B, T, T) of (B, T, D) features."""
    hn = F.normalize(h, dim=-1)
    return hn @ hn.transpose(1, 2)


class S3M(nn.Module):
    """Three TS blocks (kernels 9, 7, 5, two heads); returns their self-similarity maps."""

    def __init__(self, dim: int = 256, kernels=(9, 7, 5), heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TSBlock(dim, k, heads) for k in kernels)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = []
        for blk in self.blocks:
            h, x = blk(x)
            maps.append(cosine_ssm(h))
        return maps


class SSPDNet(nn.Module):
    """Backbone + predictor (+ S3M for training). ``forward(x)`` -> (y (B, T), [S_1, S_2, S_3]);
    ``predict(x)`` -> y only (inference: S3M unused). The predictor sees F.detach(): it never
    trains the backbone."""

    def __init__(self, width: int = 1, spatial_padding: bool = False, heads: int = 2):
        super().__init__()
        self.backbone = Backbone(width, spatial_padding)
        C = self.backbone.channels
        self.predictor = Predictor(C, width, spatial_padding)
        self.s3m = S3M(C, heads=heads if C % heads == 0 else 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv1d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm3d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        f, X = self.backbone(x)
        return self.predictor(f.detach()), self.s3m(X)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = self.backbone(x)
        return self.predictor(f)
