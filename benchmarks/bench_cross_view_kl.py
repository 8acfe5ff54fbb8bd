"""Benchmark of pyops.cross_view_kl_entropy, pyops.fused_linear_cross_view and
pyops.fused_linear_cross_view_loss.

Step = forward + backward through all five outputs (each weighted by a fixed random per-row
upstream gradient), float32; the loss case: forward + backward of a weighted, mean-reduced loss of
the five terms (fixed weights: pyops computes its gradients in the forward). Variants: the pyops op, the eager reference (pyops.reference) and
``torch.compile`` of the reference; on CUDA the pyops op runs once per available backend
(CUDA C++ and Triton), and the fused linear case adds Liger-Kernel's fused linear cross-entropy
(``liger_flce``) where it is installed.

Targets (issue #2): CPU, N=4096, V=32000: >= 3x the eager and >= 1.5x the compiled reference,
peak memory <= 40% of eager; fused linear (N=4096, H=1024, V=32000): peak <= 25% of the eager
``hidden @ weight.T`` + reference path, at no loss of speed. Issue #29: the loss case >= 1.2x the
compiled reference and >= 2x eager, peak memory <= 25% of eager's.
"""

from __future__ import annotations

import torch

import pyops
from pyops import reference

from .common import Case

OP = "cross_view_kl"


def _step(fn, inputs, grads, wrt):
    def run():
        out = fn(*inputs)
        loss = sum((o * g).sum() for o, g in zip(out, grads))
        return torch.autograd.grad(loss, wrt)

    return run


def _variants(native, ref, device):
    """{name: fn} with the pyops op once per CUDA backend available."""
    compiled = torch.compile(ref)
    variants = {}
    if device.startswith("cuda"):
        info = pyops.backends()
        names = [b for b, ok in (("cuda", info["cuda_extension"]), ("triton", info["triton"] is not None)) if ok]
        for b in names:

            def with_backend(*args, _b=b):
                with pyops.use_backend(_b):
                    return native(*args)

            variants["pyops" if b == names[0] else f"pyops[{b}]"] = with_backend
    else:
        variants["pyops"] = native
    variants["eager"] = ref
    variants["compiled"] = compiled
    return variants


def _row_inputs(n_rows: int, vocab: int, device):
    """Two views' logits (the second a noisy copy of the first) and CE targets."""
    a = torch.randn(n_rows, vocab, device=device)
    b = a + torch.randn_like(a)
    t = torch.randint(0, vocab, (n_rows,), device=device)
    return a, b, t


def row_case(n_rows: int, vocab: int) -> Case:
    def setup(device):
        a, b, t = _row_inputs(n_rows, vocab, device)
        a.requires_grad_()
        b.requires_grad_()
        grads = [torch.randn(n_rows, device=device) for _ in range(5)]
        variants = _variants(pyops.cross_view_kl_entropy, reference.cross_view_kl_entropy, device)
        return {k: _step(fn, (a, b, t), grads, (a, b)) for k, fn in variants.items()}

    # forward reads a and b; backward reads them again and writes both gradients; two exps per
    # element and pass (p and q; T = 1, so the CE's softmax is p)
    return Case(
        f"row N={n_rows} V={vocab}",
        dict(N=n_rows, V=vocab),
        setup,
        bytes_moved=6 * n_rows * vocab * 4,
        exps=4 * n_rows * vocab,
    )


def row_forward_case(n_rows: int, vocab: int) -> Case:
    """The forward alone (no gradient: evaluation, logging): pyops vs the reference."""

    def setup(device):
        a, b, t = _row_inputs(n_rows, vocab, device)
        variants = _variants(pyops.cross_view_kl_entropy, reference.cross_view_kl_entropy, device)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn(a, b, t)

            return run

        return {k: no_grad(fn) for k, fn in variants.items()}

    return Case(
        f"row forward N={n_rows} V={vocab}",
        dict(N=n_rows, V=vocab),
        setup,
        bytes_moved=2 * n_rows * vocab * 4,
        exps=2 * n_rows * vocab,
    )


def row_fused_case(n_rows: int, vocab: int) -> Case:
    """The in-place forward + backward row kernel of fused_linear_cross_view_loss
    (pyops::cross_view_kl_entropy_fwd_bwd_) alone: its exp rate and bandwidth. Each step overwrites
    its logits with their gradients, which the next step reads as logits (the kernel is
    branch-free: its time does not depend on the values)."""

    def setup(device):
        a, b, t = _row_inputs(n_rows, vocab, device)
        g = [torch.randn(n_rows, device=device) for _ in range(5)]
        return {"pyops": lambda: torch.ops.pyops.cross_view_kl_entropy_fwd_bwd_(a, b, t, *g, 1.0, -100)}

    return Case(
        f"row fused fwd+bwd in place N={n_rows} V={vocab}",
        dict(N=n_rows, V=vocab),
        setup,
        bytes_moved=4 * n_rows * vocab * 4,
        exps=4 * n_rows * vocab,
    )


def liger_flce(device: str):
    """Liger-Kernel's fused linear cross-entropy (sum over rows), on CUDA where it is installed
    (``make gpu-wheels`` carries its wheel to a GPU machine), else None."""
    if not device.startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


LIGER_NOTE = (
    "Liger-Kernel's fused linear cross-entropy of view a alone: the CE term only (no view b, KL or entropy), "
    "the fused LM-head loss a user would otherwise reach for; less work than the pyops step"
)


def linear_case(n_rows: int, hidden: int, vocab: int) -> Case:
    notes: dict = {}

    def setup(device):
        ha = torch.randn(n_rows, hidden, device=device, requires_grad=True)
        hb = (ha.detach() + 0.3 * torch.randn_like(ha)).requires_grad_()
        w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_()
        t = torch.randint(0, vocab, (n_rows,), device=device)
        grads = [torch.randn(n_rows, device=device) for _ in range(5)]
        variants = _variants(pyops.fused_linear_cross_view, reference.fused_linear_cross_view, device)
        steps = {
            k: _step(lambda ha, hb, w, t, _f=fn: _f(ha, hb, w, None, t), (ha, hb, w, t), grads, (ha, hb, w))
            for k, fn in variants.items()
        }
        liger = liger_flce(device)
        if liger is not None:
            steps["liger_flce"] = lambda: torch.autograd.grad(liger(w, ha, t), (ha, w))
            notes["liger_flce"] = LIGER_NOTE
        return steps

    return Case(f"linear N={n_rows} H={hidden} V={vocab}", dict(N=n_rows, H=hidden, V=vocab), setup, notes=notes)


LOSS_WEIGHTS = dict(kl_ab_weight=0.5, kl_ba_weight=0.5, entropy_a_weight=0.1, entropy_b_weight=0.1, ce_weight=1.0)


def loss_case(n_rows: int, hidden: int, vocab: int) -> Case:
    """The weighted, mean-reduced loss of all five terms (1 in 8 targets ignored): pyops'
    fused_linear_cross_view_loss (gradients computed in the forward) against the same loss
    through the reference, eager and compiled."""
    notes: dict = {}

    def setup(device):
        ha = torch.randn(n_rows, hidden, device=device, requires_grad=True)
        hb = (ha.detach() + 0.3 * torch.randn_like(ha)).requires_grad_()
        w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_()
        t = torch.randint(0, vocab, (n_rows,), device=device)
        t[::8] = -100
        variants = _variants(pyops.fused_linear_cross_view_loss, reference.fused_linear_cross_view_loss, device)
        steps = {
            k: (lambda _f=fn: torch.autograd.grad(_f(ha, hb, w, None, t, **LOSS_WEIGHTS), (ha, hb, w)))
            for k, fn in variants.items()
        }
        liger = liger_flce(device)
        if liger is not None:
            steps["liger_flce"] = lambda: torch.autograd.grad(liger(w, ha, t), (ha, w))
            notes["liger_flce"] = LIGER_NOTE
        return steps

    params = dict(N=n_rows, H=hidden, V=vocab)
    return Case(f"loss N={n_rows} H={hidden} V={vocab}", params, setup, notes=notes)


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        return [
            row_case(1024, 32000),
            row_forward_case(1024, 32000),
            row_fused_case(1024, 32000),
            linear_case(512, 1024, 32000),
            loss_case(512, 1024, 32000),
        ]
    return [
        row_case(4096, 32000),
        row_forward_case(4096, 32000),
        row_fused_case(4096, 32000),
        row_case(64, 256000),
        linear_case(4096, 1024, 32000),
        loss_case(4096, 1024, 32000),
    ]
