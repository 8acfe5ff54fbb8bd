"""Triton kernels on the CPU under the Triton interpreter.

Run in a process of its own: `TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py -m
triton_interpreter` (`make test` does it); the variable must be set before triton is imported,
so in the main test run this module is skipped. Small grids; fp32 and fp16 (bf16 is loaded and
cast to fp32 in the kernels, which the interpreter supports) and fp64.
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton is imported"),
]

triton = pytest.importorskip("triton")

import pyops  # noqa: E402,F401  (registers the ops)
from pyops import cross_view_kl as cvk  # noqa: E402
from pyops import reference  # noqa: E402

FIELDS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")


@pytest.fixture(params=[None, 64], ids=["block=auto", "block=64"])
def block(request, monkeypatch):
    """block=64 forces several blocks per row, exercising the online rescaling."""
    if request.param is not None:
        monkeypatch.setattr(cvk, "_triton_launch_config", lambda vocab: (request.param, 4))
    return request.param


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_target", [False, True])
def test_triton_kernels_match_reference(block, shape, dtype, temperature, with_target):
    n, vocab = shape
    a = (torch.randn(shape) * 3).to(dtype)
    b = (a.float() + torch.randn(shape)).to(dtype)
    t = None
    if with_target:
        t = torch.randint(0, vocab, (n,))
        t[0] = -100
    kl_ab, kl_ba, ent_a, ent_b, ce, lse = cvk.triton_cross_view_kl_entropy_fwd(a, b, t, temperature, -100)
    out = dict(kl_ab=kl_ab, kl_ba=kl_ba, entropy_a=ent_a, entropy_b=ent_b, ce_a=ce if t is not None else None)
    ref = reference.cross_view_kl_entropy(a, b, t, temperature=temperature)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name in FIELDS:
        r = getattr(ref, name)
        if r is None:
            continue
        torch.testing.assert_close(out[name], r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))
    # backward with random upstream gradients against autograd through the reference
    grads = [torch.randn(n, dtype=kl_ab.dtype) for _ in range(5)]
    if t is None:
        grads[4] = None
    ga, gb = cvk.triton_cross_view_kl_entropy_bwd(*grads, a, b, t, kl_ab, kl_ba, ent_a, ent_b, lse, temperature, -100)
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    r2 = reference.cross_view_kl_entropy(a2, b2, t, temperature=temperature)
    loss = sum((o * g).sum() for o, g in zip(r2, grads) if g is not None)
    ra, rb = torch.autograd.grad(loss, (a2, b2))
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, r in ((ga, ra), (gb, rb)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=gtol, atol=gtol * max(1.0, r.float().abs().max().item()))


def test_triton_large_magnitude_and_nan_rows(block):
    a = torch.randn(4, 200) * 2500
    b = a + torch.randn(4, 200) * 100 + 1e4
    a[2, 5] = float("nan")
    kl_ab, kl_ba, ent_a, ent_b, _, _ = cvk.triton_cross_view_kl_entropy_fwd(a, b, None, 1.0, -100)
    ref = reference.cross_view_kl_entropy(a.double(), b.double())
    ok = torch.tensor([True, True, False, True])
    assert torch.isnan(kl_ab[2]) and torch.isnan(ent_a[2]) and torch.isfinite(ent_b).all()
    torch.testing.assert_close(kl_ab[ok].double(), ref.kl_ab[ok], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(ent_a[ok].double(), ref.entropy_a[ok], rtol=1e-4, atol=1e-3)


def test_triton_launcher_checks_target_range():
    a = torch.randn(3, 10)
    with pytest.raises(ValueError, match="target\\[2\\] = 10 is out of range"):
        cvk.triton_cross_view_kl_entropy_fwd(a, a, torch.tensor([0, 1, 10]), 1.0, -100)


def test_triton_empty_rows():
    a = torch.randn(0, 10)
    outs = cvk.triton_cross_view_kl_entropy_fwd(a, a, None, 1.0, -100)
    assert outs[0].shape == (0,)
