"""Backbones for rPPG from face video (B, C=3, T, H, W):

* ``TSCANLike``: the two-branch (appearance / motion) 3-D CNN of the BYHE / DOHA code
  ("Ultimate_model", spec 1.3): appearance from the frames, motion from normalised frame
  differences, the appearance branch's sigmoid attention masks gating the motion branch (Fuse1
  and Fuse2: ``motion * H W m / (2 |m|_1)`` per frame), output features (B, 8, T - 15) and the
  Fuse1 mask (for BYHE's skin-mask loss); 0.34 M parameters (``shrink`` divides the widths).
* ``TSCANWave``: TSCANLike with a 1x1 head to a pulse wave (B, T - 15), for wave losses;
* ``PhysNet``: the 3-D CNN encoder-decoder of Yu et al. (BMVC 2019), output a wave (B, T).

Both work for any input size from 32 x 32 (TSCANLike) / 16 x 16 (PhysNet) up.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def diff_normalized(video: torch.Tensor) -> torch.Tensor:
    """(I_{t+1} - I_t) / (I_{t+1} + I_t + 1e-7), divided by its std: (B, C, T - 1, H, W)."""
    a, b = video[:, :, :-1], video[:, :, 1:]
    d = (b - a) / (b + a + 1e-7)
    return d / d.flatten(1).std(1).clamp(min=1e-7)[:, None, None, None, None]


def _attention(feat: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """Per-frame sigmoid mask from the channel-projected features, scaled to mean 1/2 over the
    frame (H W m / (2 |m|_1)): (B, 1, T, H, W)."""
    m = torch.sigmoid(proj(feat.movedim(1, -1)).movedim(-1, 1))
    H, W = m.shape[-2:]
    return H * W * m / (2 * m.abs().sum((-2, -1), keepdim=True).clamp(min=1e-7)), m


DROPOUT = 0.15  # the code's dropout in the motion branch


class TSCANLike(nn.Module):
    def __init__(self, shrink: int = 1, dropout: float = DROPOUT):
        """``shrink``: divide the hidden widths (64, 32, 16) by it (at least 4 channels each);
        ``dropout``: of the motion branch (0 turns it off)."""
        super().__init__()
        if shrink < 1:
            raise ValueError(f"shrink must be >= 1, got {shrink}")
        c64, c32, c16 = (max(4, c // shrink) for c in (64, 32, 16))
        self.app1 = nn.Sequential(
            nn.Conv3d(3, c64, (2, 8, 8), padding=(0, 2, 2)),
            nn.BatchNorm3d(c64),
            nn.ReLU(),
            nn.AvgPool3d((1, 2, 2)),
            nn.Conv3d(c64, c32, (1, 5, 5), padding=(0, 2, 2)),
            nn.BatchNorm3d(c32),
            nn.ReLU(),
        )
        self.mot1 = nn.Sequential(
            nn.Conv3d(3, c32, (1, 8, 8), padding=(0, 2, 2)),
            nn.BatchNorm3d(c32),
            nn.Tanh(),
            nn.AvgPool3d((1, 2, 2)),
            nn.Conv3d(c32, c16, (1, 5, 5), padding=(0, 2, 2)),
            nn.Dropout(dropout),
            nn.BatchNorm3d(c16),
            nn.Tanh(),
        )
        self.fuse1 = nn.Linear(c32, 1)
        self.app2 = nn.Sequential(
            nn.Conv3d(c32, c64, 3, padding=(0, 1, 1)),
            nn.BatchNorm3d(c64),
            nn.ReLU(),
            nn.AvgPool3d((1, 2, 2)),
            nn.Conv3d(c64, 8, 3, padding=(0, 1, 1)),
            nn.BatchNorm3d(8),
            nn.ReLU(),
        )
        self.mot2 = nn.Sequential(
            nn.Conv3d(c16, c32, 3, padding=(0, 1, 1)),
            nn.BatchNorm3d(c32),
            nn.Tanh(),
            nn.AvgPool3d((1, 2, 2)),
            nn.Conv3d(c32, c64, 3, padding=(0, 1, 1)),
            nn.Dropout(dropout),
            nn.BatchNorm3d(c64),
            nn.Tanh(),
        )
        self.fuse2 = nn.Linear(8, 1)
        self.mot3 = nn.Sequential(
            nn.Conv3d(c64, c32, (5, 3, 3)),
            nn.BatchNorm3d(c32),
            nn.Tanh(),
            nn.Conv3d(c32, 8, (7, 3, 3)),
            nn.Dropout(dropout),
            nn.BatchNorm3d(8),
            nn.Tanh(),
            nn.AvgPool3d((1, 2, 2)),
        )
        gain = nn.init.calculate_gain("tanh")
        for mod in list(self.mot1) + list(self.mot2) + list(self.mot3) + [self.fuse1, self.fuse2]:
            if isinstance(mod, (nn.Conv3d, nn.Linear)):
                nn.init.xavier_normal_(mod.weight, gain=gain)

    def forward(self, video: torch.Tensor):
        """video (B, 3, T, H, W) -> features (B, 8, T - 15), Fuse1 mask (B, T - 1, H1, W1)."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"TSCANLike: video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        if video.shape[2] < 17 or min(video.shape[-2:]) < 32:
            raise ValueError(
                f"TSCANLike: needs T >= 17 frames and frames of at least 32 x 32, got {tuple(video.shape)}"
            )
        app = self.app1(video)  # (B, c32, T - 1, H1, W1)
        mot = self.mot1(diff_normalized(video))
        scale1, mask1 = _attention(app, self.fuse1)
        mot = mot * scale1
        app = self.app2(app)
        mot = self.mot2(mot)
        scale2, _ = _attention(app, self.fuse2)
        mot = mot * F.interpolate(scale2, size=mot.shape[-3:], mode="nearest")
        out = self.mot3(mot)
        return out.mean((-2, -1)), mask1[:, 0]


WAVE_OFFSET = 8  # TSCANLike's output j sees frames j..j+15: its wave is aligned with label[j + 8]


class TSCANWave(nn.Module):
    """TSCANLike with a 1x1 projection of its 8 feature channels to a pulse wave: (B, 3, T, H, W)
    -> wave (B, T - 15) aligned with the label's samples WAVE_OFFSET..WAVE_OFFSET + T - 16, and
    the Fuse1 mask. The wave-loss baselines (negative Pearson, MCC) train this."""

    def __init__(self, shrink: int = 1, dropout: float = DROPOUT):
        super().__init__()
        self.backbone = TSCANLike(shrink=shrink, dropout=dropout)
        self.head = nn.Conv1d(8, 1, 1)

    def forward(self, video: torch.Tensor):
        feats, mask = self.backbone(video)
        return self.head(feats)[:, 0], mask


class PhysNet(nn.Module):
    """PhysNet (3-D CNN encoder-decoder): (B, 3, T, H, W) -> wave (B, T); T divisible by 4."""

    def __init__(self, width: int = 64):
        super().__init__()

        def block(cin, cout, k, p):
            return nn.Sequential(nn.Conv3d(cin, cout, k, padding=p), nn.BatchNorm3d(cout), nn.ReLU())

        h = width // 2
        self.enc = nn.Sequential(
            block(3, h // 2, (1, 5, 5), (0, 2, 2)),
            nn.MaxPool3d((1, 2, 2)),
            block(h // 2, h, (3, 3, 3), 1),
            block(h, width, (3, 3, 3), 1),
            nn.MaxPool3d((2, 2, 2)),
            block(width, width, (3, 3, 3), 1),
            block(width, width, (3, 3, 3), 1),
            nn.MaxPool3d((2, 2, 2)),
            block(width, width, (3, 3, 3), 1),
            block(width, width, (3, 3, 3), 1),
        )
        self.dec = nn.Sequential(
            nn.ConvTranspose3d(width, width, (4, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)),
            nn.BatchNorm3d(width),
            nn.ELU(),
            nn.ConvTranspose3d(width, width, (4, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)),
            nn.BatchNorm3d(width),
            nn.ELU(),
        )
        self.out = nn.Conv3d(width, 1, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"PhysNet: video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        T = video.shape[2]
        if T % 4 or T < 4 or min(video.shape[-2:]) < 16:
            raise ValueError(
                f"PhysNet: needs T divisible by 4 and frames of at least 16 x 16, got {tuple(video.shape)}"
            )
        x = self.dec(self.enc(video))
        x = F.adaptive_avg_pool3d(x, (T, 1, 1))
        return self.out(x)[:, 0, :, 0, 0]
