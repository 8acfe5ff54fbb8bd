"""SSIM (the training loss is -SSIM) and PSNR on RGB images in [0, 1], per image.

SSIM as the official code's ``pytorch_ssim``: an 11 x 11 Gaussian window (sigma 1.5) per
channel, zero padding of 5, C1 = 0.01^2, C2 = 0.03^2, mean of the SSIM map over channels and
pixels. PSNR with peak 1 on the RGB image (not the Y channel), as the official evaluation.

``--metric y`` (`psnr_y`, `ssim_y`): the convention of the MATLAB scripts that most deraining papers
report Rain100/Rain200/Rain1400 numbers with (PReNet's ``statistic/*.m``, for one): the output saved
as 8 bits (rounded), the luma of ``rgb2ycbcr``, PSNR with peak 1, and ``ssim(x*255, y*255)``, taken
to be Wang et al.'s ``ssim.m`` (PReNet does not ship the one it calls; MATLAB's built-in differs).
"""

from __future__ import annotations

import functools
import math

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


# ------------------------------------------------------------------------------------------
# The Y-channel convention of the deraining literature's MATLAB scripts
# ------------------------------------------------------------------------------------------
METRICS = ("rgb", "y")
METRIC_HELP = (
    "rgb: PSNR/SSIM on the RGB image in [0, 1], as the official MSGNN evaluation (the default); y: on the "
    "luma of MATLAB's rgb2ycbcr of the 8-bit output, with the ssim.m of Wang et al. (the Rain100/Rain1400 "
    "evaluation scripts of PReNet, RCDNet, ...)"
)
_YCBCR_Y = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr, first row; offset 16 (on 0-255)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma as MATLAB's ``rgb2ycbcr`` of a double image:
    ``(16 + 65.481 R + 128.553 G + 24.966 B) / 255`` (in [16/255, 235/255])."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y needs (B, 3, H, W), got {tuple(x.shape)}")
    w = torch.tensor(_YCBCR_Y, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (16.0 + (x * w).sum(1, keepdim=True)) / 255.0


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """What saving as an 8-bit image and reading it back gives: clamp to [0, 1], round to k / 255."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def ssim_downsample_factor(h: int, w: int) -> int:
    """ssim.m's automatic scale: ``f = max(1, round(min(H, W) / 256))`` (MATLAB rounds halves up)."""
    return max(1, int(math.floor(min(h, w) / 256 + 0.5)))


def _symmetric_index(n: int, before: int, after: int, device) -> torch.Tensor:
    i = torch.arange(-before, n + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - i - 1, i)


def _matlab_downsample(x: torch.Tensor, f: int) -> torch.Tensor:
    """``imfilter(x, ones(f)/f^2, 'symmetric', 'same')`` then ``x(1:f:end, 1:f:end)``."""
    before = (f + 1) // 2 - 1  # MATLAB's kernel centre: floor((f + 1) / 2), 1-based
    after = f - 1 - before
    h, w = x.shape[-2:]
    x = x.index_select(-2, _symmetric_index(h, before, after, x.device))
    x = x.index_select(-1, _symmetric_index(w, before, after, x.device))
    return F.avg_pool2d(x, f, stride=1)[..., ::f, ::f]


def ssim_matlab(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of one-channel (B, 1, H, W) images on 0-255, as ``ssim.m`` (Wang et al.) with
    its defaults: the automatic ↓f (above), an 11 x 11 Gaussian window (sigma 1.5), K = (0.01,
    0.03), L = 255, the map over the 'valid' region only, its mean. In float64."""
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(
            f"ssim_matlab: x and y must be (B, 1, H, W) of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x, y = x.double(), y.double()
    f = ssim_downsample_factor(*x.shape[-2:])
    if f > 1:
        x, y = _matlab_downsample(x, f), _matlab_downsample(y, f)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim_matlab: images of {tuple(x.shape[-2:])} after the ↓{f} are smaller than the window")
    win = _window(11, 1.5, torch.float64, str(x.device))[None, None]
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return m.mean((1, 2, 3))


def psnr_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of the luma: ``x`` (an output) is first saved as 8 bits, ``y`` (the
    clean image) taken as it is (it was read from an 8-bit file), both through `rgb_to_y`, peak 1."""
    a, b = rgb_to_y(quantize8(x).double()), rgb_to_y(y.double())
    mse = (a - b).pow(2).mean((1, 2, 3))
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-20))).to(x.dtype)


def ssim_y(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of the luma on 0-255 (`ssim_matlab`), ``x`` saved as 8 bits first."""
    a, b = rgb_to_y(quantize8(x).double()), rgb_to_y(y.double())
    return ssim_matlab(a * 255, b * 255).to(x.dtype)


def metric_fns(metric: str):
    """(psnr, ssim) per image for ``--metric``: ``rgb`` (`psnr`, `ssim`) or ``y`` (`psnr_y`, `ssim_y`)."""
    if metric == "rgb":
        return psnr, ssim
    if metric == "y":
        return psnr_y, ssim_y
    raise ValueError(f"--metric must be one of {METRICS}, got {metric!r}")


__all__ = [
    "METRICS",
    "METRIC_HELP",
    "metric_fns",
    "psnr",
    "psnr_y",
    "quantize8",
    "rgb_to_y",
    "ssim",
    "ssim_downsample_factor",
    "ssim_loss",
    "ssim_map",
    "ssim_matlab",
    "ssim_y",
]
