"""Learned reconstructions: LPD (2D, framewise), STPDnet (LPD with 3D convolutions over time and
space) and DeepPET (sinogram-to-image encoder-decoder, framewise).

Inputs are *corrected* sinograms in the units of the normalised operator: for frame t,
y_n = (y - r_t) / (c_t a) / ||A|| (``corrected_sinograms``), so that y_n ~ A_n x with
A_n = A / ||A||. Networks work on activity divided by ``ACT_SCALE`` (kBq/ml).

LPD follows Adler & Oktem's reference code (spec B3): primal and dual memories of 5 channels,
per iteration a dual CNN on [h, A_n f_1, y] and a primal CNN on [f, A_n^T h_0], each
conv3x3-PReLU-conv3x3-PReLU-conv3x3 with its own weights, Xavier init; the output is f_0.
STPDnet (spec B4, our reading of the abstract): the same with Conv3d 3x3x3 over (time, image)
in the primal and (time, views, bins) in the dual, all frames of a study at once.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyops.pet import JosephProjector

ACT_SCALE = 20.0  # kBq/ml per network unit


class NormalizedOperator(nn.Module):
    """A_n = A / ||A|| on image stacks (..., n, n) <-> sinogram stacks (..., views, bins)."""

    def __init__(self, A: JosephProjector, views: int, bins: int, norm: Optional[float] = None):
        super().__init__()
        if views * bins != A.num_lines:
            raise ValueError(f"views x bins = {views * bins} but the projector has {A.num_lines} lines")
        self.A = A
        self.views, self.bins = views, bins
        self.n0, self.n1 = A.image_shape[0], A.image_shape[1]
        self.norm = float(A.norm()) if norm is None else float(norm)

    def forward(self, x):  # (..., n0, n1) -> (..., views, bins)
        lead = x.shape[:-2]
        y = self.A(x.reshape(-1, self.n0, self.n1, 1)) / self.norm
        return y.reshape(*lead, self.views, self.bins)

    def adjoint(self, y):  # (..., views, bins) -> (..., n0, n1)
        lead = y.shape[:-2]
        x = self.A.adjoint(y.reshape(-1, self.views * self.bins)) / self.norm
        return x.reshape(*lead, self.n0, self.n1)


def corrected_sinograms(y, att, background, scale, op: NormalizedOperator):
    """(T, views, bins) counts -> attenuation/background/scale-corrected, in A_n units / ACT_SCALE."""
    return (y - background) / (scale[:, None, None] * att) / op.norm / ACT_SCALE


def _block(conv, cin, cout, width):
    layers = nn.Sequential(
        conv(cin, width, 3, padding=1),
        nn.PReLU(width),
        conv(width, width, 3, padding=1),
        nn.PReLU(width),
        conv(width, cout, 3, padding=1),
    )
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return layers


class PrimalDual(nn.Module):
    """Learned primal-dual. ``temporal=False``: LPD, frames are independent images (input
    (B, views, bins) -> (B, n, n)). ``temporal=True``: STPDnet, input (B, T, views, bins) ->
    (B, T, n, n) with 3D convolutions over (T, ., .)."""

    def __init__(
        self,
        op: NormalizedOperator,
        n_iter: int = 10,
        n_primal: int = 5,
        n_dual: int = 5,
        width: int = 32,
        temporal: bool = False,
    ):
        super().__init__()
        if n_iter < 1 or n_primal < 2 or n_dual < 1 or width < 1:
            raise ValueError("n_iter >= 1, n_primal >= 2, n_dual >= 1 and width >= 1 are required")
        self.op = op
        self.temporal = temporal
        self.n_primal, self.n_dual = n_primal, n_dual
        conv = nn.Conv3d if temporal else nn.Conv2d
        self.dual = nn.ModuleList(_block(conv, n_dual + 2, n_dual, width) for _ in range(n_iter))
        self.primal = nn.ModuleList(_block(conv, n_primal + 1, n_primal, width) for _ in range(n_iter))

    def forward(self, y):
        y = y.unsqueeze(1)  # (B, 1, [T,] views, bins)
        lead = y.shape[2:-2]
        f = y.new_zeros(y.shape[0], self.n_primal, *lead, self.op.n0, self.op.n1)
        h = y.new_zeros(y.shape[0], self.n_dual, *y.shape[2:])
        for dual, primal in zip(self.dual, self.primal):
            h = h + dual(torch.cat([h, self.op(f[:, 1:2]), y], 1))
            f = f + primal(torch.cat([f, self.op.adjoint(h[:, 0:1])], 1))
        return f[:, 0]


class DeepPET(nn.Module):
    """Framewise encoder-decoder from a corrected sinogram (B, views, bins) to an image (B, n, n):
    strided convolutions down to a bottleneck, resized to n / 8, then transposed convolutions."""

    def __init__(self, views: int, bins: int, n: int, width: int = 32):
        super().__init__()
        if n % 8:
            raise ValueError(f"DeepPET needs an image size divisible by 8, got {n}")
        self.n = n
        c = width
        act = lambda ch: nn.PReLU(ch)
        self.enc = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            act(c),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            act(c),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            act(2 * c),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1),
            act(2 * c),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1),
            act(4 * c),
            nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1),
            act(4 * c),
        )
        self.dec = nn.Sequential(
            nn.Conv2d(4 * c, 4 * c, 3, padding=1),
            act(4 * c),
            nn.ConvTranspose2d(4 * c, 2 * c, 4, stride=2, padding=1),
            act(2 * c),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            act(2 * c),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1),
            act(c),
            nn.Conv2d(c, c, 3, padding=1),
            act(c),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
            act(c),
            nn.Conv2d(c, 1, 3, padding=1),
        )

    def forward(self, y):
        z = self.enc(y.unsqueeze(1))
        z = F.interpolate(z, size=(self.n // 8, self.n // 8), mode="bilinear", align_corners=False)
        return self.dec(z)[:, 0]


MODELS = ("lpd", "stpdnet", "deeppet")


def make_model(name: str, op: NormalizedOperator, *, n_iter: int = 10, width: int = 32) -> nn.Module:
    if name == "lpd":
        return PrimalDual(op, n_iter=n_iter, width=width, temporal=False)
    if name == "stpdnet":
        return PrimalDual(op, n_iter=n_iter, width=width, temporal=True)
    if name == "deeppet":
        return DeepPET(op.views, op.bins, op.n0, width=width)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def is_temporal(model: nn.Module) -> bool:
    m = getattr(model, "module", model)  # DistributedDataParallel
    return isinstance(m, PrimalDual) and m.temporal


def reconstruct(model: nn.Module, y_corr: torch.Tensor) -> torch.Tensor:
    """(T, views, bins) corrected sinograms of one study -> (T, n, n) activity (kBq/ml).
    `model` may be wrapped in DistributedDataParallel."""
    out = model(y_corr[None])[0] if is_temporal(model) else model(y_corr)
    return out * ACT_SCALE
