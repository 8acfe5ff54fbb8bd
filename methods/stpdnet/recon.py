"""Classical reconstruction: MLEM with attenuation, per-frame scale and an additive background.

Model of frame t: ybar_t = c_t * a * (A x_t) + r_t (c_t = Study.scale[t], a = attenuation factors,
r_t = randoms + scatter). MLEM: x <- x / (c_t A^T a) * c_t A^T(a y_t / ybar_t), which keeps x >= 0
and increases the Poisson log-likelihood sum(y log ybar - ybar) at every iteration.
"""

from typing import Callable, Optional

import torch


def _check(y, att, background, scale, views_bins):
    if y.dim() != 3:
        raise ValueError(f"sinograms must be (T, views, bins), got {tuple(y.shape)}")
    if tuple(y.shape[1:]) != views_bins:
        raise ValueError(
            f"sinograms are {tuple(y.shape[1:])} per frame but the projector has {views_bins} "
            "(views, bins): image/geometry mismatch"
        )
    if not torch.isfinite(y).all():
        raise ValueError("sinograms contain NaN or inf")
    if (y < 0).any():
        raise ValueError("sinograms must be >= 0 (counts)")
    if tuple(att.shape) != views_bins or tuple(background.shape) != tuple(y.shape) or scale.shape != (y.shape[0],):
        raise ValueError(
            "attenuation (views, bins), background (T, views, bins) and scale (T,) must match the sinograms"
        )
    if not (background >= 0).all() or not (scale > 0).all() or not ((att > 0) & (att <= 1)).all():
        raise ValueError("background must be >= 0, scale > 0 and attenuation factors in (0, 1]")


def forward_model(A, x, att, background, scale):
    """ybar (T, views, bins) for images x (T, n, n)."""
    T = x.shape[0]
    proj = A(x[..., None]).reshape(T, *att.shape)
    return scale[:, None, None] * att * proj + background


def poisson_loglik(y, ybar):
    return (torch.xlogy(y, ybar) - ybar).sum((1, 2))


def mlem(
    y,
    A,
    att,
    background,
    scale,
    n_iter: int = 50,
    x0: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """MLEM of every frame at once; returns (T, n, n). `callback(iteration, x)` after each iteration."""
    _check(y, att, background, scale, tuple(att.shape))
    if A.num_lines != att.numel():
        raise ValueError(f"the projector has {A.num_lines} lines but the sinograms have {att.numel()} bins per frame")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    T = y.shape[0]
    n0, n1, _ = A.image_shape
    sens = scale[:, None, None] * A.adjoint(att.reshape(1, -1).expand(T, -1).contiguous())[..., 0]  # (T, n, n)
    valid = sens > 1e-12 * sens.max()
    x = torch.ones(T, n0, n1, dtype=y.dtype) if x0 is None else x0.clone()
    x = x * valid
    for it in range(n_iter):
        ybar = forward_model(A, x, att, background, scale)
        ratio = torch.where(ybar > 0, y / ybar, torch.zeros_like(y))
        back = scale[:, None, None] * A.adjoint((att * ratio).reshape(T, -1))[..., 0]
        x = torch.where(valid, x * back / sens.clamp_min(1e-30), torch.zeros_like(x))
        if callback is not None:
            callback(it, x)
    return x
