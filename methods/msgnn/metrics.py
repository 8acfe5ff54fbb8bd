"""SSIM (the training loss is -SSIM) and PSNR on RGB images in [0, 1], per image.

SSIM as the official code's ``pytorch_ssim``: an 11 x 11 Gaussian window (sigma 1.5) per
channel, zero padding of 5, C1 = 0.01^2, C2 = 0.03^2, mean of the SSIM map over channels and
pixels. PSNR with peak 1 on the RGB image (not the Y channel), as the official evaluation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=8)
def _window(size: int, sigma: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype=dtype, device=device)


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: x and y must be (B, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    w = _window(window, sigma, x.dtype, str(x.device)).expand(c, 1, window, window)
    pad = window // 2
    mu_x = F.conv2d(x, w, padding=pad, groups=c)
    mu_y = F.conv2d(y, w, padding=pad, groups=c)
    sxx = F.conv2d(x * x, w, padding=pad, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, padding=pad, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, padding=pad, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,)."""
    return ssim_map(x, y).mean((1, 2, 3))


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-SSIM averaged over the batch (the official training loss)."""
    return -ssim_map(x, y).mean()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, peak 1), (B,); x is clamped to [0, 1] first."""
    mse = (x.clamp(0, 1) - y).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


__all__ = ["psnr", "ssim", "ssim_loss", "ssim_map"]
