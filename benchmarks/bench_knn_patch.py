"""Benchmark of pyops.knn_patch_search and pyops.patch_aggregate (float32, B = 1, k = 5).

Cases (issue #3; full sizes, quick mode uses smaller maps):
* global: C = 32, 321 x 481 map, 3x3 non-overlapping patches (~17k x 17k patches of dim 288),
  against the eager and compiled reference and two exact CPU anchors (issue #29), when installed:
  faiss-cpu's brute-force ``IndexFlatL2`` (its patch extraction, index build and search counted)
  and KeOps' ``LazyTensor`` squared distances with ``Kmin_argKmin(K, dim=1)`` (the same F.unfold
  patches; distances and indices, as pyops returns). KeOps compiles its formula on first use:
  the warm-up run does it (minutes the first time, cached on disk afterwards). On the avx512
  path pyops screens the global search with AMX bf16 tiles where the CPU has them (exact all the
  same: see csrc/knn_patch/knn_patch_cpu.cpp); the row "pyops fp32" is the same search with the
  float32 screen (PYOPS_KNN_SCREEN=fp32), what CPUs without AMX run. The note says the screen;
* windowed: the same map, window = 30;
* dense: 3-channel 256 x 256 image, 7x7 patches, stride 1, window = 21, exclude_self;
* aggregate: patch_aggregate forward + backward on the global case's neighbours, against
  gather + fold in PyTorch.
Targets: global >= 3x eager, >= 1.5x faiss and ahead of keops (quick and full), peak <= 5% of
eager; windowed and dense >= 5x eager; aggregate >= 3x eager.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

import pyops
from pyops import reference

from .common import Case

OP = "knn_patch"
K = 5


def _search_variants(q, d, with_compiled, **kw):
    variants = {
        "pyops": lambda: pyops.knn_patch_search(q, d, K, **kw),
        "eager": lambda: reference.knn_patch_search(q, d, K, **kw),
    }
    if with_compiled:
        compiled_fn = torch.compile(reference.knn_patch_search)
        variants["compiled"] = lambda: compiled_fn(q, d, K, **kw)
    return variants


def _screen():
    """The screen of pyops' global float32 search here (csrc/knn_patch/screens.h)."""
    return pyops._C._knn_screens()[0] if pyops.get_cpu_isa() == "avx512" else "BLAS"


def _fp32_screen_step(q, d, **kw):
    def step():
        old = os.environ.get("PYOPS_KNN_SCREEN")
        os.environ["PYOPS_KNN_SCREEN"] = "fp32"
        try:
            return pyops.knn_patch_search(q, d, K, **kw)
        finally:
            if old is None:
                del os.environ["PYOPS_KNN_SCREEN"]
            else:
                os.environ["PYOPS_KNN_SCREEN"] = old

    return step


def _faiss_step(q, d, patch_size, stride):
    """faiss-cpu's exact IndexFlatL2 on the unfolded patches (built per call), or the reason it
    is skipped."""
    if importlib.util.find_spec("faiss") is None:
        return None, "faiss-cpu is not installed (pip install faiss-cpu)"
    import faiss

    def step():
        xq = F.unfold(q, patch_size, stride=stride)[0].t().contiguous().numpy()
        xb = F.unfold(d, patch_size, stride=stride)[0].t().contiguous().numpy()
        index = faiss.IndexFlatL2(xb.shape[1])
        index.add(xb)
        return index.search(xq, K)

    return step, None


def _keops_step(q, d, patch_size, stride):
    """KeOps (CPU) on the same unfolded patches: LazyTensor squared distances, the K smallest
    and their indices (``Kmin_argKmin``), or the reason it is skipped. The formula is compiled
    on the first call (the benchmark's warm-up), then cached."""
    if importlib.util.find_spec("pykeops") is None:
        return None, "pykeops is not installed (pip install pykeops)"
    try:
        from pykeops.torch import LazyTensor
    except Exception as exc:  # noqa: BLE001 - no compiler, broken install, ...
        return None, f"pykeops does not import here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def step():
        xq = F.unfold(q, patch_size, stride=stride)[0].t().contiguous()
        xb = F.unfold(d, patch_size, stride=stride)[0].t().contiguous()
        sq = ((LazyTensor(xq[:, None, :]) - LazyTensor(xb[None, :, :])) ** 2).sum(-1)
        return sq.Kmin_argKmin(K, dim=1)

    return step, None


def search_case(
    name,
    shape,
    db_shape=None,
    *,
    patch_size=3,
    stride=None,
    window=None,
    exclude_self=False,
    with_anchors=False,
    same_map=False,
    with_compiled=True,
):
    def setup(device):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(shape, generator=g).to(device)
        d = q if same_map else torch.randn(db_shape or shape, generator=g).to(device)
        kw = dict(patch_size=patch_size, stride=stride, window=window, exclude_self=exclude_self)
        variants = _search_variants(q, d, with_compiled, **kw)
        if with_anchors and device == "cpu":
            if _screen() not in ("fp32", "BLAS"):
                variants["pyops fp32"] = _fp32_screen_step(q, d, **kw)
            s = stride or patch_size
            for label, make in (("faiss", _faiss_step), ("keops", _keops_step)):
                step, reason = make(q, d, patch_size, s)
                if step is None:
                    print(f"[{OP}] {name}: {label} row skipped: {reason}", flush=True)
                else:
                    variants[label] = step
        return variants

    params = dict(
        shape=list(shape), patch=patch_size, stride=stride or patch_size, window=window, exclude_self=exclude_self, k=K
    )
    notes = (
        {
            "pyops": f"screen: {_screen()}",
            "pyops fp32": "screen: fp32",
            "faiss": "IndexFlatL2: unfold + build + search",
            "keops": "LazyTensor Kmin_argKmin",
        }
        if with_anchors
        else {}
    )
    return Case(name, params, setup, notes=notes)


def aggregate_case(name, shape):
    def setup(device):
        g = torch.Generator().manual_seed(1)
        q = torch.randn(shape, generator=g).to(device)
        d = torch.randn(shape, generator=g).to(device)
        _, idx = pyops.knn_patch_search(q, d, K)
        values = torch.randn(shape, generator=g).to(device).requires_grad_()
        weights = torch.softmax(torch.randn(idx.shape, generator=g), -1).to(device).requires_grad_()
        out_size = tuple(shape[-2:])
        grad = torch.randn(shape, generator=g).to(device)

        def step(fn):
            def run():
                out = fn(values, idx, weights, patch_size=3, output_size=out_size)
                return torch.autograd.grad((out * grad).sum(), (values, weights))

            return run

        return {
            "pyops": step(pyops.patch_aggregate),
            "eager": step(reference.patch_aggregate),
            "compiled": step(torch.compile(reference.patch_aggregate)),
        }

    return Case(name, dict(shape=list(shape), patch=3, k=K), setup)


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        return [
            search_case("global 32x161x241 p3", (1, 32, 161, 241), with_anchors=True),
            search_case("window30 32x161x241 p3", (1, 32, 161, 241), window=30),
            search_case(
                "dense 3x128x128 p7 s1 w21",
                (1, 3, 128, 128),
                patch_size=7,
                stride=1,
                window=21,
                exclude_self=True,
                same_map=True,
            ),
            aggregate_case("aggregate fwd+bwd 32x161x241", (1, 32, 161, 241)),
        ]
    return [
        search_case("global 32x321x481 p3", (1, 32, 321, 481), with_anchors=True),
        search_case("window30 32x321x481 p3", (1, 32, 321, 481), window=30),
        # The reference's windowed search loops over ~230 query chunks here; torch.compile unrolls
        # the loop and compiles for tens of minutes, so the compiled reference is measured on the
        # quick mode's 128 x 128 image only.
        search_case(
            "dense 3x256x256 p7 s1 w21",
            (1, 3, 256, 256),
            patch_size=7,
            stride=1,
            window=21,
            exclude_self=True,
            same_map=True,
            with_compiled=False,
        ),
        aggregate_case("aggregate fwd+bwd 32x321x481", (1, 32, 321, 481)),
    ]
