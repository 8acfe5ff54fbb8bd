"""KEM-ST: kernel EM with a spatial x temporal kernel (after Wang & Qi 2015, Wang 2019).

The frames are represented as x_t = K_s (sum_u K_t[t, u] alpha_u): K_s a k-nearest-neighbour
spatial kernel built from composite-image features, K_t a Gaussian temporal kernel between
neighbouring frames. EM on alpha keeps the Poisson likelihood of the data model of recon.py:

    alpha <- alpha / (K^T A_c^T 1) * K^T A_c^T (y / (A_c K alpha + r)),   A_c = c_t a A.

Spatial kernel: features f(j) = the 3 x 3 patches around pixel j of three composite images
(MLEM of the early, middle and late thirds of the scan, each scaled to unit mean inside the
body); the k nearest neighbours of every pixel within a w x w window (``pyops.knn_patch_search``,
dense patches on the reflect-padded image) get weights exp(-|f_i - f_j|^2 / (2 sigma^2 var f)),
rows normalised.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pyops

from .recon import _check, forward_model, mlem


@dataclass
class KemConfig:
    k: int = 20
    window: int = 7
    sigma: float = 1.0
    temporal_sigma: float = 1.0  # in frames
    composite_iters: int = 20


def spatial_kernel(features: torch.Tensor, k: int, window: int, sigma: float):
    """features (C, n, n) -> (idx (N, k), w (N, k)) with N = n * n, rows summing to 1."""
    C, n0, n1 = features.shape
    f = F.pad(features[None], (1, 1, 1, 1), mode="replicate")
    dist, idx = pyops.knn_patch_search(f, f, k, patch_size=3, stride=1, window=window)
    dist, idx = dist[0], idx[0]
    scale = 2 * sigma**2 * features.var(dim=(1, 2)).sum().clamp_min(1e-12) * 9
    w = torch.exp(-dist / scale)
    return idx, w / w.sum(1, keepdim=True)


def temporal_kernel(T: int, sigma: float) -> torch.Tensor:
    t = torch.arange(T, dtype=torch.float32)
    K = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (2 * sigma**2))
    K = K * ((t[:, None] - t[None, :]).abs() <= 2)
    return K / K.sum(1, keepdim=True)


def _apply_spatial(idx, w, img):  # img (T, N)
    return (img[:, idx] * w).sum(-1)


def _apply_spatial_t(idx, w, img):  # transpose
    out = torch.zeros_like(img)
    out.index_add_(1, idx.reshape(-1), (img[:, :, None] * w).reshape(img.shape[0], -1))
    return out


def kem_st(y, A, att, background, scale, n_iter: int = 50, cfg: KemConfig = KemConfig()):
    """KEM-ST reconstruction of all frames, (T, n, n)."""
    _check(y, att, background, scale, tuple(att.shape))
    T = y.shape[0]
    n0, n1, _ = A.image_shape
    # composite images: MLEM of the summed counts of three parts of the scan
    parts = torch.tensor_split(torch.arange(T), 3)
    comp = []
    for p in parts:
        if len(p) == 0:
            continue
        yc = y[p].sum(0, keepdim=True)
        xc = mlem(yc, A, att, background[p].sum(0, keepdim=True), scale[p].sum().reshape(1), cfg.composite_iters)[0]
        comp.append(xc / xc[xc > 0].mean().clamp_min(1e-12) if (xc > 0).any() else xc)
    idx, w = spatial_kernel(torch.stack(comp), cfg.k, cfg.window, cfg.sigma)
    Kt = temporal_kernel(T, cfg.temporal_sigma)

    def K(a):  # (T, N) -> (T, N)
        return _apply_spatial(idx, w, Kt @ a)

    def Kt_(b):
        return Kt.t() @ _apply_spatial_t(idx, w, b)

    def Ac(x):
        return forward_model(A, x.reshape(T, n0, n1), att, background, scale)

    def AcT(r):
        return (scale[:, None, None] * A.adjoint((att * r).reshape(T, -1))[..., 0]).reshape(T, -1)

    sens = Kt_(AcT(torch.ones_like(y)))
    valid = sens > 1e-12 * sens.max()
    alpha = valid.to(y.dtype)
    for _ in range(n_iter):
        ybar = Ac(K(alpha))
        ratio = torch.where(ybar > 0, y / ybar, torch.zeros_like(y))
        alpha = torch.where(valid, alpha * Kt_(AcT(ratio)) / sens.clamp_min(1e-30), torch.zeros_like(alpha))
    return K(alpha).reshape(T, n0, n1)
