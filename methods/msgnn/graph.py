"""The k-NN patch graphs of MSGNN: search (pyops), edge features, attentional aggregation (pyops).

A graph links every 3 x 3 patch of the query image (the rainy input at full resolution) to its
k nearest 3 x 3 patches of a "son" image (the input at scale 1, 1/2, 1/4, or the exemplar), in
an embedded 32-channel feature space (patch vectors of 32 * 9 = 288 values). Patches are
non-overlapping; a map is zero-padded to a multiple of 3 first (floor of the padding on the
top/left, ceil on the bottom/right), as the official code's ``im2patch``.

Two candidate sets:

* ``faithful`` -- the official ``index_neighbours``: window side ``s = min(window, n1, n2)`` (son
  grid n1 x n2), window rows ``[ch, ch + s)`` with ``ch = clamp(i // 2 - s // scale, 0, n1 - s)``
  for query row i, columns likewise. The ``i // 2`` comes from IGNN's x2 super-resolution design,
  so the window is centred only for scale 2 (for scale 1 and the exemplar it ends one patch row
  above ``i // 2``); on 64 x 64 training crops the window is the whole son grid at every scale.
* ``centred`` -- pyops' window: the ``window x window`` block of son positions centred on the
  query position scaled to the son grid, shifted to stay inside it.

Both run in ``pyops.knn_patch_search`` (the faithful window through its ``window_anchor``:
start ``(1 * i + 0) // 2 - s // scale``). ``reference_search`` is the official computation (the
full distance matrix per query chunk, gathered to the candidate set, ``topk``), the test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyops
from pyops import reference as pyref

PATCH = 3


def calc_padding(h: int, w: int, patch: int = PATCH) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that makes (h, w) a multiple of ``patch``."""
    pv, ph = (-(h - patch)) % patch, (-(w - patch)) % patch
    return pv // 2, pv - pv // 2, ph // 2, ph - ph // 2


def pad_to_grid(x: torch.Tensor, patch: int = PATCH):
    t, b, l, r = calc_padding(x.shape[-2], x.shape[-1], patch)
    return F.pad(x, (l, r, t, b)), (t, b, l, r)


def crop_padding(x: torch.Tensor, pad) -> torch.Tensor:
    t, b, l, r = pad
    return x[..., t : x.shape[-2] - b, l : x.shape[-1] - r]


def patch_vectors(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) padded map -> (B, L, C, patch*patch) non-overlapping patch vectors, row-major
    positions, (c, dy, dx) order (the order of ``F.unfold`` and of the pyops search)."""
    b, c, h, w = x.shape
    u = F.pixel_unshuffle(x, patch)  # (B, C*p*p, H/p, W/p), channel index c*p*p + dy*p + dx
    return u.reshape(b, c, patch * patch, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------
# Candidate windows
# ------------------------------------------------------------------------------------------
def faithful_starts(m: int, n: int, s: int, scale: int) -> torch.Tensor:
    """Window start in a son grid axis of length n for each of m query positions (official)."""
    i = torch.arange(m)
    return (i // 2 - s // scale).clamp(0, n - s)


def faithful_candidates(query_grid, son_grid, window: int, scale: int) -> torch.Tensor:
    """(m1*m2, s*s) row-major son positions each query searches (the official index tensor)."""
    (m1, m2), (n1, n2) = query_grid, son_grid
    s = min(window, n1, n2)
    ch = faithful_starts(m1, n1, s, scale)
    cw = faithful_starts(m2, n2, s, scale)
    ar = torch.arange(s)
    rows = ch[:, None, None, None] + ar[None, None, :, None]
    cols = cw[None, :, None, None] + ar[None, None, None, :]
    return (rows * n2 + cols).reshape(m1 * m2, s * s)


def knn_search(
    query_e: torch.Tensor, son_e: torch.Tensor, k: int, *, windows: str, window: int, scale: int
) -> torch.Tensor:
    """Indices (B, m, k) of the k nearest son patches of every query patch (padded maps)."""
    n1, n2 = son_e.shape[-2] // PATCH, son_e.shape[-1] // PATCH
    if windows == "centred":
        w = None if (window >= n1 and window >= n2) else window
        return pyops.knn_patch_search(query_e, son_e, k, patch_size=PATCH, window=w)[1]
    s = min(window, n1, n2)
    a = (1, 0, 2, s // scale)  # window start i // 2 - s // scale, clamped to the grid
    return pyops.knn_patch_search(query_e, son_e, k, patch_size=PATCH, window=s, window_anchor=(a, a))[1]


def reference_search(
    query_e: torch.Tensor, son_e: torch.Tensor, k: int, *, windows: str, window: int, scale: int, chunk: int = 2048
) -> torch.Tensor:
    """The official search in plain PyTorch (the oracle and the timing baseline): patch vectors,
    ``|q|^2 + |d|^2 - 2 q d^T`` per chunk of queries, gathered to the candidate set, ``topk``.
    The faithful candidates come from the official formula (``faithful_candidates``), written
    independently of pyops' ``window_anchor``, so that the test checks the anchor too."""
    if windows == "centred":
        n1, n2 = son_e.shape[-2] // PATCH, son_e.shape[-1] // PATCH
        w = None if (window >= n1 and window >= n2) else window
        return pyref.knn_patch_search(query_e, son_e, k, patch_size=PATCH, window=w)[1]
    qv = patch_vectors(query_e).flatten(2)
    dv = patch_vectors(son_e).flatten(2)
    qgrid = (query_e.shape[-2] // PATCH, query_e.shape[-1] // PATCH)
    sgrid = (son_e.shape[-2] // PATCH, son_e.shape[-1] // PATCH)
    cand = faithful_candidates(qgrid, sgrid, window, scale).to(qv.device)
    d_sq = (dv * dv).sum(-1)
    out = []
    for a in range(0, qv.shape[1], chunk):
        q = qv[:, a : a + chunk]
        dist = (q * q).sum(-1, keepdim=True) + d_sq[:, None, :] - 2 * q @ dv.transpose(1, 2)
        c = cand[a : a + chunk].expand(qv.shape[0], -1, -1)
        dist = dist.gather(2, c) + 1e-5
        j = dist.topk(k, dim=2, largest=False, sorted=True).indices
        out.append(c.gather(2, j))
    return torch.cat(out, 1)


# ------------------------------------------------------------------------------------------
# Edge features and aggregation
# ------------------------------------------------------------------------------------------
def edge_features(query_e: torch.Tensor, son_e: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-channel L1 distance of each query patch to each neighbour, (B, m, k, C):
    ``sum over the 3 x 3 patch of |ye - xe[idx]|`` (padded maps)."""
    yv = patch_vectors(query_e)  # (B, m, C, 9)
    xv = patch_vectors(son_e)  # (B, n, C, 9)
    b, m, k = idx.shape
    nb = xv.gather(1, idx.reshape(b, m * k, 1, 1).expand(-1, -1, xv.shape[2], xv.shape[3]))
    nb = nb.view(b, m, k, xv.shape[2], xv.shape[3])
    return (yv.unsqueeze(2) - nb).abs().sum(-1)


def aggregate(son_feat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, query_size, query_pad) -> torch.Tensor:
    """Weighted sum of the k neighbour patches of the (padded) son features placed at every
    query patch (``pyops.patch_aggregate``), cropped to the query's unpadded size."""
    feat, _ = pad_to_grid(son_feat)
    out = pyops.patch_aggregate(feat, idx, weights.to(feat.dtype), patch_size=PATCH, output_size=tuple(query_size))
    return crop_padding(out, query_pad)


def check_image_sizes(h: int, w: int, k: int, name: str = "image", levels: int = 3) -> None:
    """Each of the ``levels`` pyramid maps of an (h, w) image (scales 1, 1/2, 1/4 by pyrDown; an
    exemplar has one level) needs a patch grid of at least 3 x 3 and at least k patches; raise
    ValueError naming the size otherwise."""
    hh, ww = h, w
    for level in range(levels):
        n1, n2 = -(-hh // PATCH), -(-ww // PATCH)
        if min(n1, n2) < 3 or n1 * n2 < k:
            scales = ", ".join(f"1/{2**i}" if i else "1" for i in range(levels))
            raise ValueError(
                f"{name} of {h} x {w} is too small: its 1/{2**level}-scale map ({hh} x {ww}) has a "
                f"{n1} x {n2} patch grid and MSGNN needs at least 3 x 3 patches of {PATCH} x {PATCH} "
                f"at scale{'s' if levels > 1 else ''} {scales} (images of at least {6 * 2 ** (levels - 1) + 1} x "
                f"{6 * 2 ** (levels - 1) + 1})"
            )
        hh, ww = (hh + 1) // 2, (ww + 1) // 2


__all__ = [
    "aggregate",
    "calc_padding",
    "check_image_sizes",
    "crop_padding",
    "edge_features",
    "faithful_candidates",
    "knn_search",
    "pad_to_grid",
    "patch_vectors",
    "reference_search",
]
