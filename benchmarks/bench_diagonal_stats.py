"""Benchmark of pyops.diagonal_stats (per-lag mean and unbiased std of the diagonals of T x T
self-similarity maps, forward + backward through both outputs).

Cases: B = 12 maps of T = 300 (issue #12's target size; SSPD / BYHE test clips), and of T = 70
(their training clips); full mode adds T = 1000. Variants:
* pyops: the fused op (CPU: one task per (map, lag), two passes over the diagonal);
* eager: pyops.reference.diagonal_stats (masked gather into (B, T, K), vectorised);
* compiled: torch.compile of that reference;
* loop: pyops.reference.diagonal_stats_loop, the official code's Python double loop (B = 1 map,
  its time multiplied by B in the table's note; forward only, as it is used for readouts).
Targets: pyops >= 3x eager and >= 50x the loop at T = 300, B = 12.
"""

from __future__ import annotations

import time

import torch

import pyops
from pyops import reference

from .common import Case

OP = "diagonal_stats"


def make_maps(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    return (x @ x.transpose(1, 2)).to(device)


def case(B, T, with_loop=False, with_compiled=True):
    def setup(device):
        S = make_maps(B, T, device).requires_grad_()
        g = torch.Generator().manual_seed(1)
        gm, gs = torch.randn(B, T - 1, generator=g).to(device), torch.randn(B, T - 1, generator=g).to(device)

        def step(fn):
            def run():
                S.grad = None
                m, s = fn(S)
                ((m * gm).sum() + (s * gs).sum()).backward()

            return run

        variants = {"pyops": step(pyops.diagonal_stats), "eager": step(reference.diagonal_stats)}
        if with_compiled:
            compiled = torch.compile(reference.diagonal_stats)
            variants["compiled"] = step(compiled)
        notes = {}
        if with_loop:
            one = S.detach()[:1]

            def loop():  # forward of one map; B maps take B times as long
                with torch.no_grad():
                    reference.diagonal_stats_loop(one)

            variants["loop_1map"] = loop
            t0 = time.perf_counter()
            loop()
            notes["loop_1map"] = f"one map, forward only: x{B} maps ~ {B * (time.perf_counter() - t0) * 1e3:.0f} ms"
        case_obj.notes.update(notes)
        return variants

    case_obj = Case(
        f"B{B} T{T}",
        dict(B=B, T=T, pass_="fwd+bwd"),
        setup,
        bytes_moved=3 * B * T * T * 4,
        work=B * T * T / 2,
        work_unit="diagonal entries",
    )
    return case_obj


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        return [case(12, 300, with_loop=True), case(12, 70)]
    return [case(12, 300, with_loop=True), case(12, 70), case(4, 1000, with_compiled=False)]
