"""Pure-PyTorch baselines of every pyops op: same signatures, written as a careful PyTorch user
would write them. They are the test oracle and the benchmark baseline (eager, and under
``torch.compile``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import CrossViewOutput

__all__ = [
    "cross_view_kl_entropy",
    "fused_linear_cross_view",
    "patch_grid",
    "window_candidates",
    "knn_patch_search",
    "patch_aggregate",
]


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


# ---------------------------------------------------------------------------------------------
# k-NN patch search and patch aggregation
# ---------------------------------------------------------------------------------------------
def patch_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the grid of patch_size x patch_size patches taken every stride pixels at
    every position where a whole patch fits (no padding)."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def _window_starts(n_query: int, n_db: int, window: int, device) -> tuple[torch.Tensor, int]:
    """First database row (or column) of each query row's window, and the window length."""
    if window >= n_db:
        return torch.zeros(n_query, dtype=torch.long, device=device), n_db
    i = torch.arange(n_query, device=device)
    if n_query > 1:  # round(i * (n_db - 1) / (n_query - 1)), halves rounded up, exactly
        centre = (2 * i * (n_db - 1) + (n_query - 1)) // (2 * (n_query - 1))
    else:
        centre = torch.full_like(i, (n_db - 1) // 2)
    return (centre - window // 2).clamp(0, n_db - window), window


def window_candidates(query_grid, db_grid, window, device="cpu") -> torch.Tensor:
    """(Hq*Wq, wh*ww) row-major database grid positions searched by each query position."""
    (hq, wq), (hd, wd) = query_grid, db_grid
    r0, wh = _window_starts(hq, hd, window, device)
    c0, ww = _window_starts(wq, wd, window, device)
    rows = r0[:, None] + torch.arange(wh, device=device)  # (Hq, wh)
    cols = c0[:, None] + torch.arange(ww, device=device)  # (Wq, ww)
    pos = rows[:, None, :, None] * wd + cols[None, :, None, :]  # (Hq, Wq, wh, ww)
    return pos.reshape(hq * wq, wh * ww)


def knn_patch_search(
    query: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    patch_size: int = 3,
    stride: int | None = None,
    window: int | None = None,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest database patches of every query patch (squared L2), as IGNN/MSGNN do it in
    PyTorch: unfold both maps, distances ``|q|^2 + |d|^2 - 2 q.d`` by a matmul, ``topk``. For a
    windowed search the distances of each query chunk are gathered to its window candidates.

    Returns ``dist`` (B, Hq*Wq, k) float32 ascending and ``idx`` (B, Hq*Wq, k) int64 row-major
    positions in the database patch grid. (``topk`` leaves the order of exact ties unspecified.)
    """
    stride = patch_size if stride is None else stride
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = F.unfold(query.to(acc), patch_size, stride=stride).transpose(1, 2)  # (B, Lq, e)
    d = F.unfold(database.to(acc), patch_size, stride=stride).transpose(1, 2)  # (B, Ld, e)
    qgrid = patch_grid(query.shape[-2], query.shape[-1], patch_size, stride)
    dgrid = patch_grid(database.shape[-2], database.shape[-1], patch_size, stride)
    q_sq = (q * q).sum(-1, keepdim=True)  # (B, Lq, 1)
    d_sq = (d * d).sum(-1).unsqueeze(1)  # (B, 1, Ld)
    n_query = q.shape[1]
    if window is None or (window >= dgrid[0] and window >= dgrid[1]):
        dist = q_sq + d_sq - 2 * q @ d.transpose(1, 2)
        if exclude_self:
            dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        return dist.topk(k, dim=-1, largest=False, sorted=True)
    cand = window_candidates(qgrid, dgrid, window, query.device)  # (Lq, c)
    self_pos = torch.arange(n_query, device=query.device)[:, None]
    chunk = max(1, (1 << 24) // max(1, d.shape[1]))  # query rows per (chunk x Ld) distance block
    dists, idxs = [], []
    for s in range(0, n_query, chunk):
        e = min(n_query, s + chunk)
        full = q_sq[:, s:e] + d_sq - 2 * q[:, s:e] @ d.transpose(1, 2)  # (B, chunk, Ld)
        c = cand[s:e].expand(full.shape[0], -1, -1)
        dc = full.gather(2, c)
        if exclude_self:
            dc = dc.masked_fill(c == self_pos[s:e], float("inf"))
        dv, di = dc.topk(k, dim=-1, largest=False, sorted=True)
        dists.append(dv)
        idxs.append(c.gather(2, di))
    return torch.cat(dists, 1), torch.cat(idxs, 1)


def patch_aggregate(
    values: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    *,
    patch_size: int = 3,
    stride: int | None = None,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """For every query position l: sum_j weights[b, l, j] * (patch idx[b, l, j] of values),
    placed at query patch l of an (H, W) = output_size map; overlaps are summed. Gather + fold."""
    stride = patch_size if stride is None else stride
    v = F.unfold(values, patch_size, stride=stride).transpose(1, 2)  # (B, Ld, C'pp)
    n_b, n_q, k = idx.shape
    g = v.gather(1, idx.reshape(n_b, n_q * k, 1).expand(-1, -1, v.shape[-1])).view(n_b, n_q, k, -1)
    agg = (g * weights.unsqueeze(-1).to(g.dtype)).sum(2)  # (B, L, C'pp)
    return F.fold(agg.transpose(1, 2), output_size, patch_size, stride=stride)
