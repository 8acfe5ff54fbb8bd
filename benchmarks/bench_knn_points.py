"""Benchmark of pyops.knn: exact k nearest neighbours of point sets (float32, unbatched).

Cases (full sizes; quick mode: M = N = 5000): M = 20000 query points x, N = 20000 database points
y (independent standard normal), D = 32 with k = 16 and D = 3 with k = 5. Variants:

* pyops: ``pyops.knn(x, y, k)``;
* eager / compiled: ``pyops.reference.knn``, the exact pure-PyTorch twin (distances summed one
  coordinate at a time over query chunks, ``topk`` with the lower-index tie rule), eagerly and
  under ``torch.compile``;
* mm_topk: the usual PyTorch idiom, ``|x|^2 + |y|^2 - 2 x y^T`` (one GEMM per query chunk) and
  ``topk``: not exact (cancellation in the expansion, ties in no defined order), for scale;
* faiss: faiss-cpu's exact brute-force ``IndexFlatL2`` (index build counted), when installed;
* keops: KeOps on the CPU, ``((X - Y) ** 2).sum(-1).Kmin_argKmin(k, dim=1)`` on ``LazyTensor``s
  (distances and indices, as pyops returns; its kernel is compiled in the case's setup), when
  pykeops is installed and runs here.

Both anchors are optional (``make bench`` installs them); a missing or failing one is skipped
with the reason printed. Work rate: query-database pairs per second.
"""

from __future__ import annotations

import importlib.util

import torch

import pyops
from pyops import reference

from .common import Case

OP = "knn_points"


def mm_topk(x: torch.Tensor, y: torch.Tensor, k: int):
    """k smallest ``|x|^2 + |y|^2 - 2 x.y`` per query (query chunks of ~2^24 scores), by topk."""
    y_sq = (y * y).sum(-1)
    chunk = max(1, (1 << 24) // max(1, y.shape[0]))
    dists, idxs = [], []
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk]
        scores = torch.addmm((xc * xc).sum(-1, keepdim=True) + y_sq, xc, y.t(), alpha=-2.0)
        d, i = scores.topk(k, dim=-1, largest=False)
        dists.append(d)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def _faiss_variant(x, y, k):
    """faiss-cpu's IndexFlatL2 step, or the reason it is skipped."""
    if importlib.util.find_spec("faiss") is None:
        return None, "faiss-cpu is not installed (pip install faiss-cpu)"
    import faiss

    xn, yn = x.contiguous().numpy(), y.contiguous().numpy()

    def step():
        index = faiss.IndexFlatL2(yn.shape[1])
        index.add(yn)
        return index.search(xn, k)

    return step, None


def _keops_variant(x, y, k):
    """KeOps' LazyTensor argKmin step (its kernel compiled now, on a few points), or the reason
    it is skipped."""
    if importlib.util.find_spec("pykeops") is None:
        return None, "pykeops is not installed (pip install pykeops)"
    try:
        from pykeops.torch import LazyTensor

        def step(x=x, y=y):
            return ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1).Kmin_argKmin(k, dim=1)

        _, small = step(x[:8], y[: max(k, 8)])  # compiles the kernel for this D and k (minutes the first time)
        if not torch.equal(small, reference.knn(x[:8], y[: max(k, 8)], k).idx):
            return None, "pykeops gave other neighbours than the exact reference on a small check"
    except Exception as exc:  # no compiler, broken install, ...
        return None, f"pykeops does not run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return step, None


def point_case(name: str, m: int, n: int, d: int, k: int, *, with_compiled: bool = True) -> Case:
    notes: dict = {}

    def setup(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, d, generator=g).to(device)
        y = torch.randn(n, d, generator=g).to(device)
        variants = {
            "pyops": lambda: pyops.knn(x, y, k),
            "eager": lambda: reference.knn(x, y, k),
        }
        if with_compiled:
            compiled = torch.compile(reference.knn)
            variants["compiled"] = lambda: compiled(x, y, k)
        variants["mm_topk"] = lambda: mm_topk(x, y, k)
        notes["mm_topk"] = "not exact: |x|^2 + |y|^2 - 2 x.y, topk"
        if device != "cpu":
            print(f"[{OP}] {name}: faiss and keops rows are CPU-only here; skipped on {device}", flush=True)
            return variants
        for label, make in (("faiss", _faiss_variant), ("keops", _keops_variant)):
            step, reason = make(x, y, k)
            if step is None:
                print(f"[{OP}] {name}: {label} row skipped: {reason}", flush=True)
            else:
                variants[label] = step
        notes["faiss"] = "IndexFlatL2, built per call"
        notes["keops"] = "LazyTensor Kmin_argKmin (distances and indices)"
        return variants

    params = dict(M=m, N=n, D=d, k=k)
    return Case(name, params, setup, work=float(m) * n, work_unit="pairs", notes=notes)


def cases(quick: bool, device: str) -> list[Case]:
    size = 5000 if quick else 20000
    return [
        point_case(f"M=N={size} D32 k16", size, size, 32, 16),
        point_case(f"M=N={size} D3 k5", size, size, 3, 5),
    ]
