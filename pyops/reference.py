"""Pure-PyTorch baselines of every pyops op: same signatures, written as a careful PyTorch user
would write them. They are the test oracle and the benchmark baseline (eager, and under
``torch.compile``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .knn_patch import KNNResult
from .types import CrossViewOutput

__all__ = [
    "cross_view_kl_entropy",
    "fused_linear_cross_view",
    "fused_linear_cross_view_loss",
    "patch_grid",
    "window_candidates",
    "knn_patch_search",
    "patch_aggregate",
    "knn",
    "joseph_weights",
    "joseph_project",
    "joseph_backproject",
    "pcgrad_visit_orders",
    "harmonize_gradients",
    "gr_loss",
    "diagonal_stats",
    "diagonal_stats_loop",
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
    return cross_view_kl_entropy(logits_a, logits_b, target, temperature=temperature, ignore_index=ignore_index)


def fused_linear_cross_view_loss(
    hidden_a: torch.Tensor,
    hidden_b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    *,
    kl_ab_weight: float = 0.5,
    kl_ba_weight: float = 0.5,
    entropy_a_weight: float = 0.0,
    entropy_b_weight: float = 0.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    return_terms: bool = False,
):
    """The weighted loss of ``fused_linear_cross_view``'s terms, each reduced over the rows that
    count (target != ignore_index; all rows without a target) by ``"mean"`` or ``"sum"``, plain
    autograd through materialised logits (``chunk_size`` is accepted and ignored)."""
    del chunk_size
    out = fused_linear_cross_view(
        hidden_a, hidden_b, weight, bias, target, temperature=temperature, ignore_index=ignore_index
    )
    valid = None if target is None else target != ignore_index
    weights = (kl_ab_weight, kl_ba_weight, entropy_a_weight, entropy_b_weight, ce_weight)
    terms = []
    for value in out:
        if value is None:
            terms.append(None)
            continue
        if valid is not None:
            value = torch.where(valid, value, 0.0)
        total = value.sum()
        if reduction == "mean":
            total = total / (value.numel() if valid is None else valid.sum())
        terms.append(total)
    loss = sum(w * t for w, t in zip(weights, terms) if w != 0)
    if not return_terms:
        return loss
    return loss, CrossViewOutput(*(None if t is None else t.detach() for t in terms))


# ---------------------------------------------------------------------------------------------
# k-NN patch search and patch aggregation
# ---------------------------------------------------------------------------------------------
def patch_grid(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """(rows, cols) of the grid of patch_size x patch_size patches taken every stride pixels at
    every position where a whole patch fits (no padding)."""
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def _window_starts(n_query: int, n_db: int, window: int, device, anchor=None) -> tuple[torch.Tensor, int]:
    """First database row (or column) of each query row's window, and the window length.
    ``anchor = (num, off, den, shift)``: start ``(num * i + off) // den - shift``, clamped."""
    if window >= n_db:
        return torch.zeros(n_query, dtype=torch.long, device=device), n_db
    i = torch.arange(n_query, device=device)
    if anchor:
        num, off, den, shift = anchor
        return ((num * i + off) // den - shift).clamp(0, n_db - window), window
    if n_query > 1:  # round(i * (n_db - 1) / (n_query - 1)), halves rounded up, exactly
        centre = (2 * i * (n_db - 1) + (n_query - 1)) // (2 * (n_query - 1))
    else:
        centre = torch.full_like(i, (n_db - 1) // 2)
    return (centre - window // 2).clamp(0, n_db - window), window


def window_candidates(query_grid, db_grid, window, device="cpu", window_anchor=None) -> torch.Tensor:
    """(Hq*Wq, wh*ww) row-major database grid positions searched by each query position
    (``window_anchor``: see ``pyops.knn_patch_search``)."""
    (hq, wq), (hd, wd) = query_grid, db_grid
    ra, ca = (None, None) if not window_anchor else window_anchor
    r0, wh = _window_starts(hq, hd, window, device, ra)
    c0, ww = _window_starts(wq, wd, window, device, ca)
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
    window_anchor: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest database patches of every query patch (squared L2), as IGNN/MSGNN do it in
    PyTorch: unfold both maps, distances ``|q|^2 + |d|^2 - 2 q.d`` by a matmul, ``topk``. For a
    windowed search the distances of each query chunk are gathered to its window candidates.

    ``window_anchor``: where each window starts (see ``pyops.knn_patch_search``).

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
    cand = window_candidates(qgrid, dgrid, window, query.device, window_anchor)  # (Lq, c)
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


def _smallest_lower_index_first(dist: torch.Tensor, k: int, exclude_self: bool, row0: int):
    """The k smallest entries of each row of dist (..., R, N) (rows row0 ... of the query set),
    ascending, equal values to the lower column, NaN as +inf, the column row0 + r of row r
    never taken with exclude_self: (values, columns). ``topk`` leaves the order of ties
    unspecified, so it only finds the k-th smallest value t; then the columns below t and the
    first columns equal to t are taken, and ordered by value with a stable sort."""
    n = dist.shape[-1]
    key = torch.where(torch.isnan(dist), torch.inf, dist)
    col = torch.arange(n, device=dist.device)
    valid = None
    if exclude_self:
        row = row0 + torch.arange(dist.shape[-2], device=dist.device)[:, None]
        valid = col != row
        key = torch.where(valid, key, torch.inf)  # one +inf more leaves the k-th smallest (k < N) as it was
    kth = key.topk(k, dim=-1, largest=False).values[..., -1:]
    below = key < kth
    tied = key == kth if valid is None else (key == kth) & valid
    take = below | (tied & (tied.cumsum(-1) <= k - below.sum(-1, keepdim=True)))  # exactly k per row
    cols = torch.where(take, col, col + n).topk(k, dim=-1, largest=False).indices  # ascending columns
    order = key.gather(-1, cols).sort(dim=-1, stable=True).indices
    cols = cols.gather(-1, order)
    return dist.gather(-1, cols), cols


def knn(x: torch.Tensor, y: torch.Tensor, k: int, *, exclude_self: bool = False) -> KNNResult:
    """Exact k nearest neighbours of the points x (M, D) or (B, M, D) among y (N, D) or
    (B, N, D), as ``pyops.knn``: squared distances ``sum_d (x_d - y_d)^2`` accumulated over d
    (float32, float64 for float64), k smallest per query point, ties to the lower index, NaN as
    +inf, with ``exclude_self`` never j = i. Query points in chunks of about 2^24 distances,
    each chunk's (chunk, N) distances summed one coordinate at a time (no (chunk, N, D)
    difference tensor, no ``|x|^2 + |y|^2 - 2 x.y`` cancellation). Returns ``KNNResult``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    single = x.dim() == 2
    xb, yb = (x[None], y[None]) if single else (x, y)
    xb, yb = xb.to(acc), yb.to(acc)
    n_b, m, n = xb.shape[0], xb.shape[1], yb.shape[1]
    yt = yb.transpose(1, 2)  # (B, D, N)
    chunk = max(1, (1 << 24) // max(1, n_b * n))
    dists, idxs = [], []
    for s in range(0, m, chunk):
        xc = xb[:, s : s + chunk]  # (B, R, D)
        dist = xc.new_zeros((n_b, xc.shape[1], n))
        for d in range(xb.shape[2]):
            diff = xc[:, :, d, None] - yt[:, None, d, :]
            dist.addcmul_(diff, diff)
        dv, di = _smallest_lower_index_first(dist, k, exclude_self, s)
        dists.append(dv)
        idxs.append(di)
    if dists:
        dist, idx = torch.cat(dists, 1), torch.cat(idxs, 1)
    else:
        link = (xb.sum() + yb.sum()) * 0  # keeps the (empty) result in the autograd graph
        dist, idx = xb.new_zeros((n_b, 0, k)) + link, torch.zeros((n_b, 0, k), dtype=torch.int64, device=x.device)
    return KNNResult(dist[0], idx[0]) if single else KNNResult(dist, idx)


# --------------------------------------------------------------------------------------------
# Joseph PET projector
# --------------------------------------------------------------------------------------------
def _triple(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 entries, got {len(value)}")
    return value


def _centred_origin(image_shape, voxel_size) -> tuple[float, float, float]:
    return tuple(-(n - 1) / 2 * v for n, v in zip(image_shape, voxel_size))


def joseph_weights(lor_start, lor_end, image_shape, voxel_size, image_origin):
    """Joseph's system-matrix entries of some lines, vectorised: (index, weight), each of shape
    (M, P, 4) with P = max(image_shape): the row-major voxel index and the weight of the 4
    bilinear corners at each of the P planes along the line's principal axis (0 where the plane
    or corner is outside the segment or the image). Geometry in float64, as the kernels
    (csrc/pet/pet_geometry.h)."""
    s, e = lor_start.double(), lor_end.double()
    dev = s.device
    n = torch.tensor(image_shape, device=dev)
    vox = torch.tensor(voxel_size, dtype=torch.float64, device=dev)
    org = torch.tensor(image_origin, dtype=torch.float64, device=dev)
    strides = torch.tensor([image_shape[1] * image_shape[2], image_shape[2], 1], device=dev)
    d = e - s
    a = d.abs().argmax(1)  # principal axis, the first on ties
    b = (a == 0).long()  # the other two axes, b < c
    c = 2 - (a == 2).long()
    pick = lambda t, ax: t.gather(-1, ax[:, None])[:, 0] if t.dim() == 2 else t[ax]
    da, sa = pick(d, a), pick(s, a)
    ok = (da.abs() > 0) & torch.isfinite(s).all(1) & torch.isfinite(d).all(1)
    inv = 1.0 / da
    length = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]).sqrt()
    step = pick(vox, a) * length * inv.abs()
    i = torch.arange(max(image_shape), device=dev, dtype=torch.float64)
    lo = torch.ceil((torch.minimum(sa, pick(e, a)) - pick(org, a)) / pick(vox, a)).clamp(min=0)
    hi = torch.floor((torch.maximum(sa, pick(e, a)) - pick(org, a)) / pick(vox, a))
    hi = torch.minimum(hi, (pick(n, a) - 1).double())
    in_seg = ok[:, None] & (i >= lo[:, None]) & (i <= hi[:, None])  # (M, P)
    frac = []
    for x in (b, c):
        f0 = (pick(s, x) + (pick(org, a) - sa) * inv * pick(d, x) - pick(org, x)) / pick(vox, x)
        df = pick(vox, a) * inv * pick(d, x) / pick(vox, x)
        f = f0[:, None] + i * df[:, None]
        fl = torch.floor(f)
        frac.append((fl.long(), f - fl))
    (ib, wb), (ic, wc) = frac
    base = i.long() * pick(strides, a)[:, None]
    index, weight = [], []
    for db_, dc_, w in ((0, 0, (1 - wb) * (1 - wc)), (1, 0, wb * (1 - wc)), (0, 1, (1 - wb) * wc), (1, 1, wb * wc)):
        jb, jc = ib + db_, ic + dc_
        inside = in_seg & (jb >= 0) & (jb < pick(n, b)[:, None]) & (jc >= 0) & (jc < pick(n, c)[:, None])
        idx = base + jb * pick(strides, b)[:, None] + jc * pick(strides, c)[:, None]
        index.append(torch.where(inside, idx, 0))
        weight.append(torch.where(inside, step[:, None] * w, 0.0))
    return torch.stack(index, -1), torch.stack(weight, -1)


def _line_chunks(M: int, per_line: int, budget: int = 1 << 24):
    step = max(1, budget // max(1, per_line))
    return [(m0, min(M, m0 + step)) for m0 in range(0, M, step)]


def joseph_project(image, lor_start, lor_end, *, voxel_size, image_origin=None) -> torch.Tensor:
    """y[b, m] = sum_j A[m, j] image[b, j] with Joseph's weights (see ``joseph_weights``); lines
    in chunks, each a gather of its voxels and a weighted sum."""
    B, shape = image.shape[0], tuple(image.shape[1:])
    vox = _triple(voxel_size, "voxel_size")
    org = _centred_origin(shape, vox) if image_origin is None else _triple(image_origin, "image_origin")
    flat = image.reshape(B, -1)
    M = lor_start.shape[0]
    parts = []
    for m0, m1 in _line_chunks(M, 4 * max(shape) * max(B, 1)):
        idx, w = joseph_weights(lor_start[m0:m1], lor_end[m0:m1], shape, vox, org)
        vals = flat[:, idx.reshape(-1)].reshape(B, m1 - m0, -1)
        parts.append((vals * w.reshape(1, m1 - m0, -1).to(image.dtype)).sum(-1))
    return torch.cat(parts, 1) if parts else image.new_zeros(B, 0)


def joseph_backproject(y, lor_start, lor_end, *, image_shape, voxel_size, image_origin=None) -> torch.Tensor:
    """The transpose of ``joseph_project``: image[b, j] = sum_m A[m, j] y[b, m], by
    ``index_add`` of every line's weighted values into the flattened image, lines in chunks."""
    shape = tuple(int(n) for n in image_shape)
    vox = _triple(voxel_size, "voxel_size")
    org = _centred_origin(shape, vox) if image_origin is None else _triple(image_origin, "image_origin")
    B, M = y.shape
    out = y.new_zeros(B, shape[0] * shape[1] * shape[2])
    for m0, m1 in _line_chunks(M, 4 * max(shape) * max(B, 1)):
        idx, w = joseph_weights(lor_start[m0:m1], lor_end[m0:m1], shape, vox, org)
        src = y[:, m0:m1, None] * w.reshape(1, m1 - m0, -1).to(y.dtype)
        out = out.index_add(1, idx.reshape(-1), src.reshape(B, -1))
    return out.reshape(B, *shape)


# --------------------------------------------------------------------------------------------
# Gradient harmonization (FedGH, PCGrad)
# --------------------------------------------------------------------------------------------
def pcgrad_visit_orders(K: int, order=None, generator=None) -> torch.Tensor:
    """PCGrad's visiting orders, (K, K - 1) int64: row i lists the other rows, taken in
    ``order`` (default ascending) and shuffled by ``torch.randperm(K - 1, generator=generator)``,
    drawn for i = 0, 1, ... in turn."""
    order = torch.arange(K) if order is None else torch.as_tensor(order).long()
    rows = []
    for i in range(K):
        others = order[order != i]
        rows.append(others[torch.randperm(K - 1, generator=generator)])
    return torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)


def harmonize_gradients(
    grads, *, weights=None, mode="fedgh", order=None, generator=None, reduction="sum", return_stats=False
):
    """The pair-by-pair loop on the flattened gradients, as FedGH and PCGrad describe it: for each
    i, for each j (fedgh: in ``order``, when the originals conflict; pcgrad: in i's random order,
    when the current g_i conflicts with the original g_j), ``g_i -= <g_i, g_j> / |g_j|^2 g_j``."""
    single = isinstance(grads, torch.Tensor)
    blocks = [grads] if single else list(grads)
    sizes = [b.shape[1] for b in blocks]
    flat = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]
    K = flat.shape[0]
    orig = flat
    out = flat.clone()
    order_t = torch.arange(K) if order is None else torch.as_tensor(order).long()
    visit = pcgrad_visit_orders(K, order_t, generator) if mode == "pcgrad" else None
    sq = [torch.dot(orig[j], orig[j]) for j in range(K)]
    for i in range(K):
        g = out[i]
        for j in visit[i].tolist() if mode == "pcgrad" else order_t.tolist():
            if j == i or not sq[j] > 0:
                continue
            if mode == "fedgh" and not torch.dot(orig[i], orig[j]) < 0:
                continue
            d = torch.dot(g, orig[j])
            if mode == "pcgrad" and not d < 0:
                continue
            g = g - d / sq[j] * orig[j]
        out[i] = g
    if reduction == "sum":
        w = (
            torch.full((K,), 1.0 / K, dtype=flat.dtype)
            if weights is None
            else torch.as_tensor(weights, dtype=flat.dtype)
        )
        res = (w.to(flat.device)[:, None] * out).sum(0)
        parts = list(res.split(sizes))
    else:
        parts = list(out.split(sizes, dim=1))
    result = parts[0] if single else parts
    if not return_stats:
        return result
    g64 = orig.double()
    gram = g64 @ g64.t()
    n = gram.diagonal().sqrt()
    den = n[:, None] * n[None, :]
    cosine = torch.where(den > 0, gram / torch.where(den > 0, den, 1.0), 0.0)
    return result, (int((gram.triu(1) < 0).sum()), cosine)


# ---------------------------------------------------------------------------------------------
# GR loss (single-positive multi-label learning)
# ---------------------------------------------------------------------------------------------
def gr_loss(
    logits, observed, beta=(0.0, -2.0), alpha=(0.5, 2.0), q2=0.01, q3=1.0, *, reduction="mean", require_positive=True
):
    """GR loss in logit space: ``-log p`` on observed positives, ``v (k L2 + (1 - k) L3)`` on
    unobserved entries, with k = sigmoid(w p + b) and v = exp(-(p - mu)^2 / (2 sigma^2)) from
    the detached p, L2 = (1 - p^q2) / q2 and L3 = (1 - (1 - p)^q3) / q3 (q = 0: the log limit).
    float32 (float64 for float64 logits). ``require_positive`` is accepted and not checked."""
    del require_positive
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    w, b = beta
    mu, sigma = alpha
    log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
    p = torch.sigmoid(z.detach())
    k = torch.sigmoid(w * p + b)
    v = torch.exp(-((p - mu) ** 2) / (2 * sigma**2))
    l2 = -torch.expm1(q2 * log_p) / q2 if q2 > 0 else -log_p
    l3 = -torch.expm1(q3 * log_1mp) / q3 if q3 > 0 else -log_1mp
    loss = torch.where(observed != 0, -log_p, v * (k * l2 + (1 - k) * l3))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


# ---------------------------------------------------------------------------------------------
# Diagonal statistics of T x T maps (rPPG self-similarity maps)
# ---------------------------------------------------------------------------------------------
def diagonal_stats(maps, num_lags=None):
    """Per-lag mean and unbiased std of the upper diagonals S[i, i + k], k < num_lags (default
    T - 1), vectorised: the diagonals gathered into a (B, T, K) tensor, masked sums. float32
    (float64 for float64 maps)."""
    acc = torch.float64 if maps.dtype == torch.float64 else torch.float32
    single = maps.dim() == 2
    S = (maps[None] if single else maps).to(acc)
    T = S.shape[-1]
    K = T - 1 if num_lags is None else num_lags
    i = torch.arange(T, device=S.device)[:, None]
    k = torch.arange(K, device=S.device)[None, :]
    valid = (i + k) < T  # (T, K)
    D = S.gather(-1, (i + k).clamp(max=T - 1).expand(S.shape[0], T, K))  # D[b, i, k] = S[b, i, i + k]
    n = (T - k).to(acc)  # (1, K)
    D = torch.where(valid, D, torch.zeros((), dtype=acc, device=S.device))
    mean = D.sum(1) / n
    dev = torch.where(valid, D - mean[:, None, :], torch.zeros((), dtype=acc, device=S.device))
    var = (dev * dev).sum(1) / (n - 1)
    pos = var > 0
    std = torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))), torch.zeros_like(var))
    return (mean[0], std[0]) if single else (mean, std)  # std's gradient: 0 on a constant diagonal, not NaN


def diagonal_stats_loop(maps, num_lags=None):
    """The same as the official rPPG code computes it (``Turn_map_into_waves`` / ``std_regular``):
    Python loops over the maps and lags, each diagonal's entries stacked one by one. The
    benchmark's slowest baseline."""
    single = maps.dim() == 2
    S = maps[None] if single else maps
    T = S.shape[-1]
    K = T - 1 if num_lags is None else num_lags
    means, stds = [], []
    for b in range(S.shape[0]):
        mb, sb = [], []
        for k in range(K):
            vals = torch.stack([S[b, i, i + k] for i in range(T - k)])
            mb.append(vals.mean())
            sb.append(vals.std())
        means.append(torch.stack(mb))
        stds.append(torch.stack(sb))
    mean, std = torch.stack(means), torch.stack(stds)
    return (mean[0], std[0]) if single else (mean, std)
