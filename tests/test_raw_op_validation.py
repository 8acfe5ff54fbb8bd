"""Every registered op (``torch.ops.pyops.*``, forward and backward) rejects hostile arguments
itself, with a ValueError (bad value or shape) or a TypeError (bad type or dtype) whose message
names the op and the argument: wrong ranks, sizes and dtypes, out-of-range indices, non-finite
scalars, empty and huge sizes. Users and ``torch.compile`` reach these ops without the public
wrappers' checks.

Each case runs on CPU tensors (the C++ kernels) and, unless it depends on tensor values, on meta
tensors (the fake kernels that ``torch.compile`` and ``opcheck`` use); the Triton launchers (the
CUDA kernels) get the same cases under the Triton interpreter
(``tests/test_triton_interpret.py``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pytest
import torch

import pyops  # noqa: F401  (registers the ops)

ops = torch.ops.pyops
INF, NAN = math.inf, math.nan
HUGE = 2**62


class Case(NamedTuple):
    op: str  # registered op name
    name: str  # case id
    args: Callable[[], tuple]  # builds the arguments (CPU tensors)
    exc: type  # ValueError or TypeError
    words: tuple  # words the message must contain (besides the op name)
    data: bool = False  # depends on tensor values: not checkable on meta tensors


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# cross_view_kl_entropy_fwd(logits_a, logits_b, target?, temperature, ignore_index)
# ---------------------------------------------------------------------------------------------
def cv(a=None, b=None, t=None, temperature=1.0, ignore_index=-100):
    a = r(3, 7) if a is None else a
    b = r(*a.shape, dtype=a.dtype) if b is None else b
    return (a, b, t, temperature, ignore_index)


CV = "cross_view_kl_entropy_fwd"
CASES = [
    Case(CV, "a-1d", lambda: cv(r(7), r(7)), ValueError, ("logits_a",)),
    Case(CV, "a-3d", lambda: cv(r(2, 3, 7), r(2, 3, 7)), ValueError, ("logits_a",)),
    Case(CV, "b-shape", lambda: cv(r(3, 7), r(3, 6)), ValueError, ("logits_b",)),
    Case(CV, "b-dtype", lambda: cv(r(3, 7), r(3, 7, dtype=torch.float64)), TypeError, ("logits_b",)),
    Case(
        CV,
        "int-logits",
        lambda: cv(torch.ones(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)),
        TypeError,
        ("logits_a",),
    ),
    Case(
        CV,
        "bool-logits",
        lambda: cv(torch.ones(3, 7, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)),
        TypeError,
        ("logits_a",),
    ),
    Case(CV, "V=0", lambda: cv(r(3, 0), r(3, 0)), ValueError, ("V",)),
    Case(CV, "target-int32", lambda: cv(t=torch.zeros(3, dtype=torch.int32)), TypeError, ("target",)),
    Case(CV, "target-float", lambda: cv(t=torch.zeros(3)), TypeError, ("target",)),
    Case(CV, "target-shape", lambda: cv(t=torch.zeros(4, dtype=torch.long)), ValueError, ("target",)),
    Case(CV, "target-2d", lambda: cv(t=torch.zeros(3, 1, dtype=torch.long)), ValueError, ("target",)),
    Case(CV, "target-high", lambda: cv(t=torch.tensor([0, 7, 1])), ValueError, ("target",), data=True),
    Case(CV, "target-negative", lambda: cv(t=torch.tensor([0, -1, 1])), ValueError, ("target",), data=True),
    Case(CV, "temperature-0", lambda: cv(temperature=0.0), ValueError, ("temperature",)),
    Case(CV, "temperature-neg", lambda: cv(temperature=-1.0), ValueError, ("temperature",)),
    Case(CV, "temperature-inf", lambda: cv(temperature=INF), ValueError, ("temperature",)),
    Case(CV, "temperature-nan", lambda: cv(temperature=NAN), ValueError, ("temperature",)),
]


# cross_view_kl_entropy_bwd(g_kab?, g_kba?, g_ha?, g_hb?, g_ce?, a, b, target?, kl_ab, kl_ba,
#                           entropy_a, entropy_b, lse, temperature, ignore_index)
def cvb(n=3, v=7, grads=None, a=None, b=None, t="auto", stats=None, lse=None, temperature=1.0):
    a = r(n, v) if a is None else a
    b = r(*a.shape, dtype=a.dtype) if b is None else b
    t = torch.zeros(a.shape[0], dtype=torch.long) if isinstance(t, str) else t
    g = [torch.ones(n) for _ in range(5)] if grads is None else grads
    s = [torch.zeros(n) for _ in range(4)] if stats is None else stats
    lse = torch.zeros(n, 3) if lse is None else lse
    return (*g, a, b, t, *s, lse, temperature, -100)


CVB = "cross_view_kl_entropy_bwd"
CASES += [
    Case(CVB, "a-1d", lambda: cvb(a=r(7), b=r(7)), ValueError, ("logits_a",)),
    Case(CVB, "b-shape", lambda: cvb(b=r(3, 6)), ValueError, ("logits_b",)),
    Case(CVB, "b-dtype", lambda: cvb(b=r(3, 7, dtype=torch.float64)), TypeError, ("logits_b",)),
    Case(
        CVB,
        "int-logits",
        lambda: cvb(a=torch.ones(3, 7, dtype=torch.long), b=torch.ones(3, 7, dtype=torch.long)),
        TypeError,
        ("logits_a",),
    ),
    Case(CVB, "grad-rows", lambda: cvb(grads=[torch.ones(4)] + [torch.ones(3)] * 4), ValueError, ("grad_kl_ab",)),
    Case(
        CVB,
        "grad-2d",
        lambda: cvb(grads=[torch.ones(3)] * 2 + [torch.ones(3, 1)] + [torch.ones(3)] * 2),
        ValueError,
        ("grad_entropy_a",),
    ),
    Case(
        CVB,
        "grad-int",
        lambda: cvb(grads=[torch.ones(3)] * 4 + [torch.ones(3, dtype=torch.long)]),
        TypeError,
        ("grad_ce_a",),
    ),
    Case(
        CVB,
        "stat-rows",
        lambda: cvb(stats=[torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3)]),
        ValueError,
        ("kl_ba",),
    ),
    Case(CVB, "lse-shape", lambda: cvb(lse=torch.zeros(3, 2)), ValueError, ("lse",)),
    Case(CVB, "lse-int", lambda: cvb(lse=torch.zeros(3, 3, dtype=torch.long)), TypeError, ("lse",)),
    Case(CVB, "ce-without-target", lambda: cvb(t=None), ValueError, ("grad_ce_a", "target")),
    Case(CVB, "target-shape", lambda: cvb(t=torch.zeros(2, dtype=torch.long)), ValueError, ("target",)),
    Case(CVB, "target-high", lambda: cvb(t=torch.tensor([0, 9, 1])), ValueError, ("target",), data=True),
    Case(CVB, "temperature-inf", lambda: cvb(temperature=INF), ValueError, ("temperature",)),
    Case(CVB, "temperature-0", lambda: cvb(temperature=0.0), ValueError, ("temperature",)),
]


# fused_linear_cross_view_fwd(hidden_a, hidden_b, weight, bias?, target?, temperature,
#                             ignore_index, chunk_size)
def fl(ha=None, hb=None, w=None, bias="auto", t=None, temperature=1.0, chunk=2):
    ha = r(5, 4) if ha is None else ha
    hb = r(*ha.shape, dtype=ha.dtype) if hb is None else hb
    w = r(9, 4, dtype=ha.dtype) if w is None else w
    bias = r(w.shape[0] if w.dim() else 1, dtype=ha.dtype) if isinstance(bias, str) else bias
    return (ha, hb, w, bias, t, temperature, -100, chunk)


FL = "fused_linear_cross_view_fwd"
CASES += [
    Case(FL, "chunk-0", lambda: fl(chunk=0), ValueError, ("chunk_size",)),
    Case(FL, "chunk-neg", lambda: fl(chunk=-1), ValueError, ("chunk_size",)),
    Case(FL, "temperature-inf", lambda: fl(temperature=INF), ValueError, ("temperature",)),
    Case(FL, "temperature-0", lambda: fl(temperature=0.0), ValueError, ("temperature",)),
    Case(FL, "hidden-1d", lambda: fl(ha=r(4), hb=r(4)), ValueError, ("hidden_a",)),
    Case(FL, "hidden-b-shape", lambda: fl(hb=r(5, 3)), ValueError, ("hidden_b",)),
    Case(FL, "weight-1d", lambda: fl(w=r(4), bias=None), ValueError, ("weight",)),
    Case(FL, "weight-H", lambda: fl(w=r(9, 3)), ValueError, ("weight",)),
    Case(FL, "weight-V0", lambda: fl(w=r(0, 4), bias=None), ValueError, ("V",)),
    Case(FL, "bias-shape", lambda: fl(bias=r(8)), ValueError, ("bias",)),
    Case(FL, "bias-2d", lambda: fl(bias=r(1, 9)), ValueError, ("bias",)),
    Case(FL, "dtype-mix", lambda: fl(w=r(9, 4, dtype=torch.float64)), TypeError, ("weight",)),
    Case(
        FL,
        "int-hidden",
        lambda: fl(
            ha=torch.ones(5, 4, dtype=torch.long),
            hb=torch.ones(5, 4, dtype=torch.long),
            w=torch.ones(9, 4, dtype=torch.long),
            bias=None,
        ),
        TypeError,
        ("hidden_a",),
    ),
    Case(FL, "target-shape", lambda: fl(t=torch.zeros(4, dtype=torch.long)), ValueError, ("target",)),
    Case(FL, "target-dtype", lambda: fl(t=torch.zeros(5, dtype=torch.int32)), TypeError, ("target",)),
    Case(FL, "target-high", lambda: fl(t=torch.tensor([0, 1, 9, 2, 3])), ValueError, ("target",), data=True),
]


# fused_linear_cross_view_bwd(g x5, hidden_a, hidden_b, weight, bias?, target?, kl_ab, kl_ba,
#                             entropy_a, entropy_b, lse, temperature, ignore_index, chunk_size, mask)
def flb(n=5, grads=None, ha=None, w=None, t="auto", lse=None, temperature=1.0, chunk=2, mask=(True, True, True)):
    ha = r(n, 4) if ha is None else ha
    w = r(9, 4) if w is None else w
    t = torch.zeros(n, dtype=torch.long) if isinstance(t, str) else t
    g = [torch.ones(n) for _ in range(5)] if grads is None else grads
    lse = torch.zeros(n, 3) if lse is None else lse
    stats = [torch.zeros(n) for _ in range(4)]
    return (*g, ha, r(*ha.shape), w, None, t, *stats, lse, temperature, -100, chunk, list(mask))


FLB = "fused_linear_cross_view_bwd"
CASES += [
    Case(FLB, "chunk-0", lambda: flb(chunk=0), ValueError, ("chunk_size",)),
    Case(FLB, "chunk-neg", lambda: flb(chunk=-3), ValueError, ("chunk_size",)),
    Case(FLB, "temperature-nan", lambda: flb(temperature=NAN), ValueError, ("temperature",)),
    Case(FLB, "weight-H", lambda: flb(w=r(9, 3)), ValueError, ("weight",)),
    Case(
        FLB,
        "grad-rows",
        lambda: flb(grads=[torch.ones(5)] * 3 + [torch.ones(6), torch.ones(5)]),
        ValueError,
        ("grad_entropy_b",),
    ),
    Case(FLB, "lse-shape", lambda: flb(lse=torch.zeros(5, 4)), ValueError, ("lse",)),
    Case(FLB, "ce-without-target", lambda: flb(t=None), ValueError, ("grad_ce_a", "target")),
]


# cross_view_kl_entropy_fwd_bwd_(logits_a!, logits_b!, target?, g x5, temperature, ignore_index)
def cvfb(a=None, b=None, t="auto", grads=None, temperature=1.0):
    a = r(3, 7) if a is None else a
    b = r(*a.shape, dtype=a.dtype) if b is None else b
    t = torch.zeros(a.shape[0], dtype=torch.long) if isinstance(t, str) else t
    g = [torch.ones(a.shape[0] if a.dim() else 1) for _ in range(5)] if grads is None else grads
    return (a, b, t, *g, temperature, -100)


CVFB = "cross_view_kl_entropy_fwd_bwd_"
CASES += [
    Case(CVFB, "a-1d", lambda: cvfb(a=r(7), b=r(7)), ValueError, ("logits_a",)),
    Case(CVFB, "b-shape", lambda: cvfb(b=r(3, 6)), ValueError, ("logits_b",)),
    Case(CVFB, "b-dtype", lambda: cvfb(b=r(3, 7, dtype=torch.float64)), TypeError, ("logits_b",)),
    Case(CVFB, "V=0", lambda: cvfb(a=r(3, 0), b=r(3, 0)), ValueError, ("V",)),
    Case(CVFB, "grad-rows", lambda: cvfb(grads=[torch.ones(4)] + [torch.ones(3)] * 4), ValueError, ("grad_kl_ab",)),
    Case(
        CVFB,
        "grad-int",
        lambda: cvfb(grads=[torch.ones(3)] * 4 + [torch.ones(3, dtype=torch.long)]),
        TypeError,
        ("grad_ce_a",),
    ),
    Case(CVFB, "ce-without-target", lambda: cvfb(t=None), ValueError, ("grad_ce_a", "target")),
    Case(CVFB, "a-strided", lambda: cvfb(a=r(7, 3).t()), ValueError, ("contiguous",)),
    Case(CVFB, "target-high", lambda: cvfb(t=torch.tensor([0, 9, 1])), ValueError, ("target",), data=True),
    Case(CVFB, "temperature-nan", lambda: cvfb(temperature=NAN), ValueError, ("temperature",)),
]


# fused_linear_cross_view_loss(hidden_a, hidden_b, weight, bias?, target?, term_weights, temperature,
#                              ignore_index, reduction, chunk_size, output_mask)
def fll(ha=None, w=None, t="auto", weights=(0.5, 0.5, 0.0, 0.0, 1.0), temperature=1.0, reduction="mean", chunk=2):
    ha = r(5, 4) if ha is None else ha
    w = r(9, 4) if w is None else w
    t = torch.zeros(ha.shape[0] if ha.dim() else 1, dtype=torch.long) if isinstance(t, str) else t
    return (ha, r(*ha.shape), w, None, t, list(weights), temperature, -100, reduction, chunk, [True] * 3)


FLL = "fused_linear_cross_view_loss"
CASES += [
    Case(FLL, "chunk-0", lambda: fll(chunk=0), ValueError, ("chunk_size",)),
    Case(FLL, "temperature-inf", lambda: fll(temperature=INF), ValueError, ("temperature",)),
    Case(FLL, "hidden-1d", lambda: fll(ha=r(4)), ValueError, ("hidden_a",)),
    Case(FLL, "weight-H", lambda: fll(w=r(9, 3)), ValueError, ("weight",)),
    Case(FLL, "reduction-none", lambda: fll(reduction="none"), ValueError, ("reduction",)),
    Case(FLL, "weights-4", lambda: fll(weights=(1.0, 0.0, 0.0, 0.0)), ValueError, ("term_weights",)),
    Case(FLL, "weights-nan", lambda: fll(weights=(NAN, 0.0, 0.0, 0.0, 0.0)), ValueError, ("kl_ab_weight",)),
    Case(FLL, "weights-zero", lambda: fll(weights=(0.0,) * 5), ValueError, ("every term weight",)),
    Case(FLL, "ce-without-target", lambda: fll(t=None), ValueError, ("ce_weight", "target")),
    Case(FLL, "target-high", lambda: fll(t=torch.tensor([0, 1, 9, 2, 3])), ValueError, ("target",), data=True),
]


# ---------------------------------------------------------------------------------------------
# knn_patch_search_fwd(query, database, k, patch_size, stride, window, exclude_self, window_anchor)
# ---------------------------------------------------------------------------------------------
def kn(q=None, d=None, k=2, p=3, s=1, window=-1, ex=False, anchor=()):
    q = r(1, 2, 8, 9) if q is None else q
    d = r(*q.shape, dtype=q.dtype) if d is None else d
    return (q, d, k, p, s, window, ex, list(anchor))


KN = "knn_patch_search_fwd"
A = (1, 0, 2, 1)
CASES += [
    Case(
        KN,
        "int64",
        lambda: kn(torch.ones(1, 2, 8, 9, dtype=torch.long), torch.ones(1, 2, 8, 9, dtype=torch.long)),
        TypeError,
        ("query",),
    ),
    Case(KN, "dtype-mix", lambda: kn(r(1, 2, 8, 9), r(1, 2, 8, 9, dtype=torch.float64)), TypeError, ("database",)),
    Case(KN, "query-3d", lambda: kn(r(2, 8, 9), r(2, 8, 9)), ValueError, ("query",)),
    Case(KN, "batch", lambda: kn(r(1, 2, 8, 9), r(2, 2, 8, 9)), ValueError, ("database",)),
    Case(KN, "channels", lambda: kn(r(1, 2, 8, 9), r(1, 3, 8, 9)), ValueError, ("database",)),
    Case(KN, "k-0", lambda: kn(k=0), ValueError, ("k",)),
    Case(KN, "k-too-many", lambda: kn(k=43), ValueError, ("k",)),
    Case(KN, "k-huge", lambda: kn(k=HUGE), ValueError, ("k",)),
    Case(KN, "patch-0", lambda: kn(p=0), ValueError, ("patch_size",)),
    Case(KN, "patch-larger", lambda: kn(p=9), ValueError, ("patch_size",)),
    Case(KN, "patch-huge", lambda: kn(p=HUGE), ValueError, ("patch_size",)),
    Case(KN, "stride-0", lambda: kn(s=0), ValueError, ("stride",)),
    Case(KN, "window-0", lambda: kn(window=0), ValueError, ("window",)),
    Case(KN, "window-neg", lambda: kn(window=-2), ValueError, ("window",)),
    Case(KN, "anchor-length", lambda: kn(window=3, anchor=(1, 0, 2)), ValueError, ("window_anchor",)),
    Case(KN, "anchor-den-0", lambda: kn(window=3, anchor=(1, 0, 0, 1) + A), ValueError, ("window_anchor",)),
    Case(KN, "anchor-num-neg", lambda: kn(window=3, anchor=A + (-1, 0, 2, 1)), ValueError, ("window_anchor",)),
    Case(KN, "anchor-huge", lambda: kn(window=3, anchor=(HUGE, 0, 1, 0) + A), ValueError, ("window_anchor",)),
    Case(KN, "anchor-global", lambda: kn(window=-1, anchor=A + A), ValueError, ("window_anchor",)),
    Case(KN, "exclude-self-grids", lambda: kn(r(1, 2, 8, 9), r(1, 2, 9, 9), ex=True), ValueError, ("exclude_self",)),
]


# knn_patch_search_bwd(grad_dist, query, database, idx, patch_size, stride)
def knb(gd=None, q=None, d=None, idx=None, p=3, s=1):
    q = r(1, 2, 8, 9) if q is None else q
    d = r(*q.shape, dtype=q.dtype) if d is None else d
    idx = torch.zeros(1, 42, 2, dtype=torch.long) if idx is None else idx
    gd = torch.ones(idx.shape) if gd is None else gd
    return (gd, q, d, idx, p, s)


KNB = "knn_patch_search_bwd"
CASES += [
    Case(KNB, "idx-high", lambda: knb(idx=torch.full((1, 42, 2), 42)), ValueError, ("idx",), data=True),
    Case(KNB, "idx-negative", lambda: knb(idx=torch.full((1, 42, 2), -1)), ValueError, ("idx",), data=True),
    Case(KNB, "idx-int32", lambda: knb(idx=torch.zeros(1, 42, 2, dtype=torch.int32)), TypeError, ("idx",)),
    Case(KNB, "idx-rows", lambda: knb(idx=torch.zeros(1, 41, 2, dtype=torch.long)), ValueError, ("idx",)),
    Case(KNB, "grad-shape", lambda: knb(gd=torch.ones(1, 42, 3)), ValueError, ("grad_dist",)),
    Case(KNB, "grad-int", lambda: knb(gd=torch.ones(1, 42, 2, dtype=torch.long)), TypeError, ("grad_dist",)),
    Case(
        KNB,
        "int64-maps",
        lambda: knb(q=torch.ones(1, 2, 8, 9, dtype=torch.long), d=torch.ones(1, 2, 8, 9, dtype=torch.long)),
        TypeError,
        ("query",),
    ),
    Case(KNB, "dtype-mix", lambda: knb(d=r(1, 2, 8, 9, dtype=torch.float64)), TypeError, ("database",)),
    Case(KNB, "patch-0", lambda: knb(p=0), ValueError, ("patch_size",)),
    Case(KNB, "stride-0", lambda: knb(s=0), ValueError, ("stride",)),
]


# patch_aggregate_fwd(values, idx, weights, patch_size, stride, out_h, out_w)
def ag(v=None, idx=None, w=None, p=3, s=1, oh=8, ow=9):
    v = r(1, 2, 8, 9) if v is None else v
    idx = torch.zeros(1, 42, 2, dtype=torch.long) if idx is None else idx
    w = torch.ones(idx.shape, dtype=v.dtype) if w is None else w
    return (v, idx, w, p, s, oh, ow)


AG = "patch_aggregate_fwd"
CASES += [
    Case(AG, "idx-high", lambda: ag(idx=torch.full((1, 42, 2), 42)), ValueError, ("idx",), data=True),
    Case(AG, "idx-negative", lambda: ag(idx=torch.full((1, 42, 2), -5)), ValueError, ("idx",), data=True),
    Case(AG, "idx-int32", lambda: ag(idx=torch.zeros(1, 42, 2, dtype=torch.int32)), TypeError, ("idx",)),
    Case(AG, "idx-2d", lambda: ag(idx=torch.zeros(42, 2, dtype=torch.long)), ValueError, ("idx",)),
    Case(AG, "idx-batch", lambda: ag(idx=torch.zeros(2, 42, 2, dtype=torch.long)), ValueError, ("idx",)),
    Case(AG, "idx-L", lambda: ag(idx=torch.zeros(1, 40, 2, dtype=torch.long)), ValueError, ("idx",)),
    Case(AG, "weights-shape", lambda: ag(w=torch.ones(1, 42, 3)), ValueError, ("weights",)),
    Case(AG, "weights-dtype", lambda: ag(w=torch.ones(1, 42, 2, dtype=torch.float64)), TypeError, ("weights",)),
    Case(
        AG,
        "int-values",
        lambda: ag(v=torch.ones(1, 2, 8, 9, dtype=torch.long), w=torch.ones(1, 42, 2, dtype=torch.long)),
        TypeError,
        ("values",),
    ),
    Case(AG, "values-3d", lambda: ag(v=r(2, 8, 9)), ValueError, ("values",)),
    Case(AG, "patch-0", lambda: ag(p=0), ValueError, ("patch_size",)),
    Case(AG, "stride-0", lambda: ag(s=0), ValueError, ("stride",)),
    Case(AG, "out-small", lambda: ag(oh=2), ValueError, ("out_h",)),
    Case(AG, "out-huge", lambda: ag(oh=HUGE, ow=HUGE), ValueError, ("out_h",)),
    Case(
        AG,
        "out-huge-empty-batch",
        lambda: ag(
            v=r(0, 2, 8, 9), idx=torch.zeros(0, 42, 2, dtype=torch.long), w=torch.ones(0, 42, 2), oh=2**40, ow=2**40
        ),
        ValueError,
        ("out_h",),
    ),
]


# patch_aggregate_bwd(grad_out, values, idx, weights, patch_size, stride)
def agb(go=None, v=None, idx=None, w=None, p=3, s=1):
    v = r(1, 2, 8, 9) if v is None else v
    idx = torch.zeros(1, 42, 2, dtype=torch.long) if idx is None else idx
    w = torch.ones(idx.shape) if w is None else w
    go = r(1, 2, 8, 9) if go is None else go
    return (go, v, idx, w, p, s)


AGB = "patch_aggregate_bwd"
CASES += [
    Case(AGB, "idx-high", lambda: agb(idx=torch.full((1, 42, 2), 99)), ValueError, ("idx",), data=True),
    Case(AGB, "idx-int32", lambda: agb(idx=torch.zeros(1, 42, 2, dtype=torch.int32)), TypeError, ("idx",)),
    Case(AGB, "grad-channels", lambda: agb(go=r(1, 3, 8, 9)), ValueError, ("grad_out",)),
    Case(AGB, "grad-3d", lambda: agb(go=r(2, 8, 9)), ValueError, ("grad_out",)),
    Case(AGB, "grad-dtype", lambda: agb(go=r(1, 2, 8, 9, dtype=torch.float64)), TypeError, ("grad_out",)),
    Case(AGB, "grad-L", lambda: agb(go=r(1, 2, 7, 9)), ValueError, ("idx",)),
    Case(AGB, "weights-shape", lambda: agb(w=torch.ones(1, 42, 1)), ValueError, ("weights",)),
    Case(AGB, "patch-0", lambda: agb(p=0), ValueError, ("patch_size",)),
]


# ---------------------------------------------------------------------------------------------
# joseph_project(image, lor_start, lor_end, voxel_size, image_origin)
# joseph_backproject(y, lor_start, lor_end, image_shape, voxel_size, image_origin)
# ---------------------------------------------------------------------------------------------
def jp(img=None, s=None, e=None, vox=(1.0, 1.0, 1.0), org=(0.0, 0.0, 0.0)):
    img = r(1, 3, 4, 5) if img is None else img
    s = torch.tensor([[-9.0, 0.1, 0.2], [0.3, -9.0, 0.1]], dtype=img.dtype) if s is None else s
    e = -s if e is None else e
    return (img, s, e, list(vox), list(org))


def jb(y=None, s=None, e=None, shape=(3, 4, 5), vox=(1.0, 1.0, 1.0), org=(0.0, 0.0, 0.0)):
    s = torch.tensor([[-9.0, 0.1, 0.2], [0.3, -9.0, 0.1]]) if s is None else s
    e = -s if e is None else e
    y = torch.ones(1, s.shape[0] if s.dim() else 1, dtype=s.dtype) if y is None else y
    return (y, s, e, list(shape), list(vox), list(org))


JP, JB = "joseph_project", "joseph_backproject"
CASES += [
    Case(JP, "image-3d", lambda: jp(img=r(3, 4, 5)), ValueError, ("image",)),
    Case(
        JP,
        "image-int",
        lambda: jp(img=torch.ones(1, 3, 4, 5, dtype=torch.long), s=torch.zeros(2, 3, dtype=torch.long)),
        TypeError,
        ("image",),
    ),
    Case(JP, "image-half", lambda: jp(img=r(1, 3, 4, 5, dtype=torch.float16)), TypeError, ("image",)),
    Case(JP, "lor-shape", lambda: jp(s=torch.zeros(2, 2)), ValueError, ("lor_start",)),
    Case(JP, "lor-end-shape", lambda: jp(e=torch.zeros(3, 3)), ValueError, ("lor_end",)),
    Case(
        JP,
        "lor-dtype",
        lambda: jp(s=torch.zeros(2, 3, dtype=torch.float64), e=torch.ones(2, 3, dtype=torch.float64)),
        TypeError,
        ("lor_start",),
    ),
    Case(JP, "voxel-2", lambda: jp(vox=(1.0, 1.0)), ValueError, ("voxel_size",)),
    Case(JP, "voxel-0", lambda: jp(vox=(1.0, 0.0, 1.0)), ValueError, ("voxel_size",)),
    Case(JP, "voxel-nan", lambda: jp(vox=(1.0, NAN, 1.0)), ValueError, ("voxel_size",)),
    Case(JP, "voxel-inf", lambda: jp(vox=(INF, 1.0, 1.0)), ValueError, ("voxel_size",)),
    Case(JP, "origin-inf", lambda: jp(org=(0.0, INF, 0.0)), ValueError, ("image_origin",)),
    Case(JP, "origin-4", lambda: jp(org=(0.0, 0.0, 0.0, 0.0)), ValueError, ("image_origin",)),
    Case(JB, "y-1d", lambda: jb(y=torch.ones(2)), ValueError, ("y",)),
    Case(JB, "y-lines", lambda: jb(y=torch.ones(1, 3)), ValueError, ("y",)),
    Case(JB, "y-int", lambda: jb(y=torch.ones(1, 2, dtype=torch.long)), TypeError, ("y",)),
    Case(JB, "shape-2", lambda: jb(shape=(3, 4)), ValueError, ("image_shape",)),
    Case(JB, "shape-neg", lambda: jb(shape=(3, -4, 5)), ValueError, ("image_shape",)),
    Case(JB, "shape-huge", lambda: jb(shape=(HUGE, HUGE, 5)), ValueError, ("image_shape",)),
    Case(JB, "voxel-neg", lambda: jb(vox=(1.0, 1.0, -2.0)), ValueError, ("voxel_size",)),
    Case(JB, "origin-nan", lambda: jb(org=(NAN, 0.0, 0.0)), ValueError, ("image_origin",)),
    Case(JB, "lor-dtype", lambda: jb(y=torch.ones(1, 2, dtype=torch.float64)), TypeError, ("lor_start",)),
]


# ---------------------------------------------------------------------------------------------
# harmonize_gram(blocks), harmonize_coefficients(gram, order, visit, mode), harmonize_combine(blocks, coef)
# ---------------------------------------------------------------------------------------------
def hc(gram=None, order=None, visit=None, mode="fedgh"):
    gram = torch.eye(3, dtype=torch.float64) if gram is None else gram
    K = gram.shape[0] if gram.dim() else 1
    order = torch.arange(K) if order is None else order
    if visit is None:  # row i: the others (pcgrad's visiting orders; unused by fedgh)
        visit = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, K)]) for i in range(K)])
    return (gram, order, visit, mode)


HG, HC, HM = "harmonize_gram", "harmonize_coefficients", "harmonize_combine"
CASES += [
    Case(HG, "empty-list", lambda: ([],), ValueError, ("blocks",)),
    Case(HG, "block-1d", lambda: ([r(5)],), ValueError, ("blocks",)),
    Case(HG, "K-mismatch", lambda: ([r(3, 4), r(2, 4)],), ValueError, ("blocks",)),
    Case(HG, "dtype-mix", lambda: ([r(3, 4), r(3, 4, dtype=torch.float64)],), TypeError, ("blocks",)),
    Case(HG, "int", lambda: ([torch.ones(3, 4, dtype=torch.long)],), TypeError, ("blocks",)),
    Case(HG, "half", lambda: ([r(3, 4, dtype=torch.float16)],), TypeError, ("blocks",)),
    Case(HC, "gram-nonsquare", lambda: hc(gram=torch.zeros(3, 2, dtype=torch.float64)), ValueError, ("gram",)),
    Case(HC, "gram-float32", lambda: hc(gram=torch.eye(3)), TypeError, ("gram",)),
    Case(HC, "order-shape", lambda: hc(order=torch.arange(2)), ValueError, ("order",)),
    Case(HC, "order-dtype", lambda: hc(order=torch.arange(3.0)), TypeError, ("order",)),
    Case(HC, "order-repeat", lambda: hc(order=torch.tensor([0, 0, 1])), ValueError, ("order",), data=True),
    Case(HC, "order-high", lambda: hc(order=torch.tensor([0, 1, 7])), ValueError, ("order",), data=True),
    Case(HC, "order-negative", lambda: hc(order=torch.tensor([0, -1, 2])), ValueError, ("order",), data=True),
    Case(
        HC, "visit-shape", lambda: hc(visit=torch.zeros(3, 3, dtype=torch.long), mode="pcgrad"), ValueError, ("visit",)
    ),
    Case(HC, "visit-dtype", lambda: hc(visit=torch.zeros(3, 2), mode="pcgrad"), TypeError, ("visit",)),
    Case(HC, "visit-high", lambda: hc(visit=torch.full((3, 2), 5), mode="pcgrad"), ValueError, ("visit",), data=True),
    Case(
        HC, "visit-negative", lambda: hc(visit=torch.full((3, 2), -1), mode="pcgrad"), ValueError, ("visit",), data=True
    ),
    Case(
        HC,
        "visit-self",
        lambda: hc(visit=torch.tensor([[0, 1], [0, 2], [0, 1]]), mode="pcgrad"),
        ValueError,
        ("visit",),
        data=True,
    ),
    Case(HC, "mode", lambda: hc(mode="nope"), ValueError, ("mode",)),
    Case(HM, "coef-K", lambda: ([r(3, 4)], torch.zeros(1, 2, dtype=torch.float64)), ValueError, ("coef",)),
    Case(HM, "coef-1d", lambda: ([r(3, 4)], torch.zeros(3, dtype=torch.float64)), ValueError, ("coef",)),
    Case(HM, "coef-int", lambda: ([r(3, 4)], torch.zeros(1, 3, dtype=torch.long)), TypeError, ("coef",)),
    Case(HM, "empty-list", lambda: ([], torch.zeros(1, 3, dtype=torch.float64)), ValueError, ("blocks",)),
    Case(
        HM, "K-mismatch", lambda: ([r(3, 4), r(2, 4)], torch.zeros(1, 3, dtype=torch.float64)), ValueError, ("blocks",)
    ),
    Case(
        HM,
        "int",
        lambda: ([torch.ones(3, 4, dtype=torch.long)], torch.zeros(1, 3, dtype=torch.float64)),
        TypeError,
        ("blocks",),
    ),
]


# harmonize_check_values(gram, weights): harmonize_gradients' value checks in compiled code (its
# value errors name harmonize_gradients, as eagerly: tests/test_compile_wrappers.py)
HV = "harmonize_check_values"
F64 = torch.float64
CASES += [
    Case(HV, "gram-nonsquare", lambda: (torch.zeros(3, 2, dtype=F64), torch.ones(3, dtype=F64)), ValueError, ("gram",)),
    Case(HV, "gram-float32", lambda: (torch.eye(3), torch.ones(3, dtype=F64)), TypeError, ("gram",)),
    Case(HV, "weights-K", lambda: (torch.eye(3, dtype=F64), torch.ones(2, dtype=F64)), ValueError, ("weights",)),
    Case(HV, "weights-float32", lambda: (torch.eye(3, dtype=F64), torch.ones(3)), TypeError, ("weights",)),
]


# ---------------------------------------------------------------------------------------------
# gr_loss_fwd(logits, observed, params, q2, q3, reduction), gr_loss_bwd(grad, ...)
# ---------------------------------------------------------------------------------------------
def gl(z=None, o=None, params=None, q2=0.01, q3=1.0, red="mean"):
    z = r(4, 5) if z is None else z
    o = torch.zeros(z.shape) if o is None else o
    params = torch.tensor([0.0, -2.0, 0.5, 2.0], dtype=torch.float64) if params is None else params
    return (z, o, params, q2, q3, red)


def glb(g=None, **kw):
    args = gl(**kw)
    g = torch.ones(()) if g is None else g
    return (g, *args)


GL, GLB = "gr_loss_fwd", "gr_loss_bwd"
P = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
CASES += [
    Case(GL, "q2-neg", lambda: gl(q2=-0.5), ValueError, ("q2",)),
    Case(GL, "q3-nan", lambda: gl(q3=NAN), ValueError, ("q3",)),
    Case(GL, "q2-inf", lambda: gl(q2=INF), ValueError, ("q2",)),
    Case(GL, "sigma-0", lambda: gl(params=P(0.0, -2.0, 0.5, 0.0)), ValueError, ("sigma",), data=True),
    Case(GL, "sigma-neg", lambda: gl(params=P(0.0, -2.0, 0.5, -1.0)), ValueError, ("sigma",), data=True),
    Case(GL, "param-nan", lambda: gl(params=P(NAN, -2.0, 0.5, 2.0)), ValueError, ("params",), data=True),
    Case(GL, "param-inf", lambda: gl(params=P(0.0, -2.0, INF, 2.0)), ValueError, ("params",), data=True),
    Case(GL, "params-3", lambda: gl(params=P(0.0, -2.0, 0.5)), ValueError, ("params",)),
    Case(GL, "params-int", lambda: gl(params=torch.tensor([0, -2, 1, 2])), TypeError, ("params",)),
    Case(GL, "observed-shape", lambda: gl(o=torch.zeros(4, 4)), ValueError, ("observed",)),
    Case(GL, "observed-complex", lambda: gl(o=torch.zeros(4, 5, dtype=torch.complex64)), TypeError, ("observed",)),
    Case(GL, "observed-2", lambda: gl(o=torch.full((4, 5), 2.0)), ValueError, ("observed",), data=True),
    # (1 + 1e-12 rounds to 1 in float32: the label is checked in its own dtype)
    Case(
        GL,
        "observed-near-1",
        lambda: gl(o=torch.full((4, 5), 1 + 1e-12, dtype=torch.float64)),
        ValueError,
        ("observed",),
        data=True,
    ),
    Case(
        GLB,
        "observed-near-0",
        lambda: glb(o=torch.full((4, 5), 1e-50, dtype=torch.float64)),
        ValueError,
        ("observed",),
        data=True,
    ),
    Case(GL, "logits-int", lambda: gl(z=torch.ones(4, 5, dtype=torch.long)), TypeError, ("logits",)),
    Case(GL, "reduction", lambda: gl(red="max"), ValueError, ("reduction",)),
    Case(GLB, "grad-shape-none", lambda: glb(g=torch.ones(4, 4), red="none"), ValueError, ("grad",)),
    Case(GLB, "grad-scalar", lambda: glb(g=torch.ones(2)), ValueError, ("grad",)),
    Case(GLB, "grad-int", lambda: glb(g=torch.ones((), dtype=torch.long)), TypeError, ("grad",)),
    Case(GLB, "q2-neg", lambda: glb(q2=-1.0), ValueError, ("q2",)),
    Case(GLB, "sigma-0", lambda: glb(params=P(0.0, -2.0, 0.5, 0.0)), ValueError, ("sigma",), data=True),
    Case(GLB, "params-3", lambda: glb(params=P(0.0, -2.0, 0.5)), ValueError, ("params",)),
    Case(GLB, "observed-shape", lambda: glb(o=torch.zeros(5, 4)), ValueError, ("observed",)),
    Case(GLB, "reduction", lambda: glb(red="avg"), ValueError, ("reduction",)),
]


# ---------------------------------------------------------------------------------------------
# diagonal_stats_fwd(maps, num_lags), diagonal_stats_bwd(g_mean?, g_std?, maps, mean, std)
# ---------------------------------------------------------------------------------------------
def dsb(gm="auto", gs="auto", maps=None, mean=None, std=None, K=3):
    maps = r(2, 5, 5) if maps is None else maps
    B = 2
    mk = lambda: torch.ones(B, K)  # noqa: E731
    return (
        mk() if isinstance(gm, str) else gm,
        mk() if isinstance(gs, str) else gs,
        maps,
        mk() if mean is None else mean,
        mk() if std is None else std,
    )


DS, DSB = "diagonal_stats_fwd", "diagonal_stats_bwd"
CASES += [
    Case(DS, "1x1", lambda: (r(2, 1, 1), 0), ValueError, ("maps",)),
    Case(DS, "0x0", lambda: (r(2, 0, 0), 0), ValueError, ("maps",)),
    Case(DS, "nonsquare", lambda: (r(2, 4, 5), 2), ValueError, ("maps",)),
    Case(DS, "2d", lambda: (r(5, 5), 2), ValueError, ("maps",)),
    Case(DS, "int", lambda: (torch.ones(2, 5, 5, dtype=torch.long), 2), TypeError, ("maps",)),
    Case(DS, "lags-neg", lambda: (r(2, 5, 5), -1), ValueError, ("num_lags",)),
    Case(DS, "lags-T", lambda: (r(2, 5, 5), 5), ValueError, ("num_lags",)),
    Case(DS, "lags-huge", lambda: (r(2, 5, 5), HUGE), ValueError, ("num_lags",)),
    Case(DSB, "mean-shape", lambda: dsb(mean=torch.ones(2, 4)), ValueError, ("mean",)),
    Case(DSB, "std-shape", lambda: dsb(std=torch.ones(1, 3)), ValueError, ("std",)),
    Case(DSB, "g-mean-shape", lambda: dsb(gm=torch.ones(2, 2)), ValueError, ("g_mean",)),
    Case(DSB, "g-std-int", lambda: dsb(gs=torch.ones(2, 3, dtype=torch.long)), TypeError, ("g_std",)),
    Case(DSB, "K-too-large", lambda: dsb(K=5), ValueError, ("mean",)),
    Case(DSB, "maps-1x1", lambda: dsb(maps=r(2, 1, 1), K=0), ValueError, ("maps",)),
    Case(DSB, "maps-int", lambda: dsb(maps=torch.ones(2, 5, 5, dtype=torch.long)), TypeError, ("maps",)),
]


def _ids(c: Case) -> str:
    return f"{c.op}-{c.name}"


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list) and x and all(isinstance(t, torch.Tensor) for t in x):
        return [t.to(device) for t in x]
    return x


def check_raises(fn, c: Case, args) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args)
    msg = str(info.value)
    assert isinstance(info.value, c.exc), (
        f"{c.op} {c.name}: {type(info.value).__name__} instead of {c.exc.__name__}: {msg}"
    )
    assert f"pyops::{c.op}" in msg, f"the message does not name the op pyops::{c.op}: {msg}"
    for w in c.words:
        assert w in msg, f"the message does not name {w!r}: {msg}"
    assert "pyops::" not in msg.replace(f"pyops::{c.op}", "", 1), f"doubled prefix: {msg}"


@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_cpu_kernel_rejects(c: Case):
    check_raises(getattr(ops, c.op), c, c.args())


@pytest.mark.parametrize("c", [c for c in CASES if not c.data], ids=_ids)
def test_fake_kernel_rejects(c: Case):
    """Meta tensors run the fake kernels: the same checks, on shapes, dtypes and scalars."""
    check_raises(getattr(ops, c.op), c, tuple(_to(a, "meta") for a in c.args()))


def test_every_registered_op_has_cases():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyops::")}
    assert registered == {c.op for c in CASES}


def test_empty_inputs_are_fine():
    """Empty batches are valid: nothing to compute, shapes as documented."""
    kl = ops.cross_view_kl_entropy_fwd(r(0, 5), r(0, 5), torch.zeros(0, dtype=torch.long), 1.0, -100)
    assert kl[0].shape == (0,) and kl[5].shape == (0, 3)
    out = ops.gr_loss_fwd(r(0, 3), torch.zeros(0, 3), P(0.0, -2.0, 0.5, 2.0), 0.01, 1.0, "none")
    assert out.shape == (0, 3)
    mean, std = ops.diagonal_stats_fwd(r(0, 4, 4), 2)
    assert mean.shape == std.shape == (0, 2)
    y = ops.joseph_project(r(2, 3, 4, 5), torch.zeros(0, 3), torch.zeros(0, 3), [1.0] * 3, [0.0] * 3)
    assert y.shape == (2, 0)
    g = ops.harmonize_gram([r(0, 4)])
    assert g.shape == (0, 0)
    # patches of no channels: every distance is 0, ties go to the lower index
    dist, idx = ops.knn_patch_search_fwd(r(1, 0, 5, 6), r(1, 0, 5, 6), 3, 3, 1, -1, False, [])
    assert torch.equal(dist, torch.zeros(1, 12, 3)) and torch.equal(idx, torch.arange(3).expand(1, 12, 3))
    dist, idx = ops.knn_patch_search_fwd(r(0, 2, 5, 6), r(0, 2, 5, 6), 3, 3, 1, -1, False, [])
    assert dist.shape == idx.shape == (0, 12, 3)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels written in Python get the same cases: the Triton launchers under the Triton
# interpreter (CPU tensors), the harmonize matmul kernels directly.
# ---------------------------------------------------------------------------------------------
def _python_cuda_kernels() -> dict:
    import importlib

    # (pyops.gr_loss and pyops.diagonal_stats are the functions; the modules hold the kernels)
    cross_view_kl, diagonal_stats, gr_loss, harmonize, knn_patch = (
        importlib.import_module(f"pyops.{m}")
        for m in ("cross_view_kl", "diagonal_stats", "gr_loss", "harmonize", "knn_patch")
    )
    kernels = {"harmonize_gram": harmonize._cuda_gram, "harmonize_combine": harmonize._cuda_combine}
    if getattr(cross_view_kl, "triton", None) is not None:
        kernels.update(
            {
                CV: cross_view_kl.triton_cross_view_kl_entropy_fwd,
                CVB: cross_view_kl.triton_cross_view_kl_entropy_bwd,
                KN: knn_patch.triton_knn_patch_search_fwd,
                KNB: knn_patch.triton_knn_patch_search_bwd,
                AG: knn_patch.triton_patch_aggregate_fwd,
                AGB: knn_patch.triton_patch_aggregate_bwd,
                GL: gr_loss.triton_gr_loss_fwd,
                GLB: gr_loss.triton_gr_loss_bwd,
                DS: diagonal_stats.triton_diagonal_stats_fwd,
                DSB: diagonal_stats.triton_diagonal_stats_bwd,
            }
        )
    return kernels


@pytest.mark.parametrize("c", [c for c in CASES if c.op in ("harmonize_gram", "harmonize_combine")], ids=_ids)
def test_python_cuda_kernels_reject(c: Case):
    """harmonize's CUDA kernels (float64 matmuls registered from Python) on CPU tensors."""
    check_raises(_python_cuda_kernels()[c.op], c, c.args())


TRITON_OPS = (CV, CVB, KN, KNB, AG, AGB, GL, GLB, DS, DSB)


@pytest.mark.triton_interpreter
@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"
)
@pytest.mark.parametrize("c", [c for c in CASES if c.op in TRITON_OPS], ids=_ids)
def test_triton_launchers_reject(c: Case):
    pytest.importorskip("triton")
    check_raises(_python_cuda_kernels()[c.op], c, c.args())


def test_public_functions_work_on_meta_tensors():
    """Meta tensors (shapes only) go through every public function: the data checks that read
    values skip them, the outputs have the documented shapes."""
    m = "meta"

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=m)

    out = pyops.cross_view_kl_entropy(t(2, 3, 7), t(2, 3, 7), t(2, 3, dtype=torch.long))
    assert out.kl_ab.shape == out.ce_a.shape == (2, 3) and out.kl_ab.is_meta
    out = pyops.fused_linear_cross_view(t(5, 4), t(5, 4), t(9, 4), t(9), t(5, dtype=torch.long), chunk_size=2)
    assert out.entropy_b.shape == (5,) and out.entropy_b.is_meta
    loss, terms = pyops.fused_linear_cross_view_loss(
        t(5, 4), t(5, 4), t(9, 4), t(9), t(5, dtype=torch.long), ce_weight=1.0, chunk_size=2, return_terms=True
    )
    assert loss.shape == () and loss.is_meta and terms.ce_a.shape == ()
    dist, idx = pyops.knn_patch_search(t(1, 2, 8, 9), t(1, 2, 8, 9), 2, patch_size=3, stride=1, window=3)
    assert dist.shape == idx.shape == (1, 42, 2) and idx.dtype == torch.int64
    agg = pyops.patch_aggregate(t(1, 2, 8, 9), idx, dist, patch_size=3, stride=1, output_size=(8, 9))
    assert agg.shape == (1, 2, 8, 9)
    y = pyops.joseph_project(t(2, 3, 4, 5), t(6, 3), t(6, 3), voxel_size=1.0)
    assert y.shape == (2, 6)
    x = pyops.joseph_backproject(y, t(6, 3), t(6, 3), image_shape=(3, 4, 5), voxel_size=1.0)
    assert x.shape == (2, 3, 4, 5)
    assert pyops.harmonize_gradients(t(3, 10)).shape == (10,)
    assert [g.shape for g in pyops.harmonize_gradients([t(3, 4), t(3, 2)], reduction="none")] == [(3, 4), (3, 2)]
    with pytest.raises(ValueError, match="return_stats needs the gradients' values"):
        pyops.harmonize_gradients(t(3, 10), return_stats=True)
    loss = pyops.gr_loss(
        t(4, 5), t(4, 5), beta=torch.zeros(2, device=m), alpha=torch.ones(2, device=m), require_positive=True
    )
    assert loss.shape == () and loss.is_meta
    mean, std = pyops.diagonal_stats(t(2, 5, 5))
    assert mean.shape == std.shape == (2, 4)


VALID = {  # valid arguments of every registered op (CPU tensors)
    CV: lambda: cv(t=torch.zeros(3, dtype=torch.long)),
    CVB: cvb,
    FL: fl,
    FLB: flb,
    KN: kn,
    KNB: knb,
    AG: ag,
    AGB: agb,
    JP: jp,
    JB: jb,
    HG: lambda: ([r(3, 4), r(3, 2)],),
    HC: lambda: hc(mode="pcgrad"),
    HM: lambda: ([r(3, 4), r(3, 2)], torch.zeros(2, 3, dtype=torch.float64)),
    GL: gl,
    GLB: glb,
    DS: lambda: (r(2, 5, 5), 3),
    DSB: dsb,
    HV: lambda: (torch.eye(3, dtype=F64), torch.ones(3, dtype=F64)),
}


def _tensor_slots(args):
    """(position, list index or None) of every tensor argument."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield i, None
        elif isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a):
            yield from ((i, j) for j in range(len(a)))


@pytest.mark.parametrize("op", sorted(VALID))
def test_one_argument_on_another_device_is_refused(op):
    """Moving any one tensor argument to the meta device (the others on the CPU) sends the call
    to the fake kernel, which must refuse it rather than return uninitialised memory."""
    getattr(ops, op)(*VALID[op]())  # the valid call works
    slots = list(_tensor_slots(VALID[op]()))
    assert slots
    for i, j in slots:
        args = list(VALID[op]())
        if j is None:
            args[i] = args[i].to("meta")
        else:
            args[i] = [t.to("meta") if k == j else t for k, t in enumerate(args[i])]
        if all(isinstance(a, torch.Tensor) and a.is_meta for a in args if isinstance(a, torch.Tensor)):
            continue  # the only tensor: nothing to mix with
        with pytest.raises(ValueError, match=f"pyops::{op}: .* is on") as info:
            getattr(ops, op)(*args)
        assert "meta" in str(info.value) and "cpu" in str(info.value), str(info.value)
