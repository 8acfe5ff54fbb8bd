"""GPU tests: every CUDA implementation (CUDA C++ and Triton) against the reference.

Skipped without a CUDA device. Run on a GPU machine with `PYTHON=python3 make test` or
`python -m pytest tests/test_cuda.py`.
"""

import pytest
import torch

import pyops
from pyops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIELDS = ("kl_ab", "kl_ba", "entropy_a", "entropy_b", "ce_a")


def available_backends():
    info = pyops.backends()
    out = []
    if info["cuda_extension"]:
        out.append("cuda")
    if info["triton"] is not None and not str(info["triton"]).startswith("unusable"):
        out.append("triton")
    return out


BACKENDS = available_backends() if torch.cuda.is_available() else []


@pytest.fixture(params=BACKENDS or [None])
def backend(request):
    if request.param is None:
        pytest.skip("no CUDA implementation was built (neither pyops._C_cuda nor triton)")
    with pyops.use_backend(request.param):
        yield request.param


def _inputs(shape, dtype, scale=3.0):
    a = torch.randn(shape, device="cuda") * scale
    b = a + torch.randn(shape, device="cuda") * scale * 0.5
    t = torch.randint(0, shape[-1], shape[:-1], device="cuda")
    if t.numel() > 1:
        t.view(-1)[::3] = -100
    return a.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 1031), (5, 4099), (2, 3, 32000), (3, 256000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, shape, dtype, temperature):
    a, b, t = _inputs(shape, dtype)
    grads = [torch.randn(shape[:-1], device="cuda") for _ in range(5)]
    res = []
    for f in (pyops.cross_view_kl_entropy, reference.cross_view_kl_entropy):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = f(a1, b1, t, temperature=temperature)
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(out, grads))
        res.append((out, *torch.autograd.grad(loss, (a1, b1))))
    (out, ga, gb), (ref, ra, rb) = res
    tol = 1e-9 if dtype == torch.float64 else 5e-5
    for name in FIELDS:
        r = getattr(ref, name)
        torch.testing.assert_close(getattr(out, name), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))
    gtol = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, r in ((ga, ra), (gb, rb)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=gtol, atol=gtol * max(1.0, r.float().abs().max().item()))


def test_backends_agree():
    if len(BACKENDS) < 2:
        pytest.skip("needs both the CUDA C++ and the Triton kernels")
    a, b, t = _inputs((33, 5003), torch.bfloat16)
    outs = []
    for name in BACKENDS:
        with pyops.use_backend(name):
            outs.append(pyops.cross_view_kl_entropy(a, b, t, temperature=1.3))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(backend):
    a, b, t = _inputs((3, 19), torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tuple(pyops.cross_view_kl_entropy(a, b, t, temperature=0.8)), (a, b))


def test_opcheck(backend):
    a, b, t = _inputs((5, 300), torch.float32)
    torch.library.opcheck(
        torch.ops.pyops.cross_view_kl_entropy_fwd.default, (a.requires_grad_(), b.requires_grad_(), t, 1.0, -100)
    )


def test_compile_fullgraph(backend):
    a, b, t = _inputs((7, 1000), torch.float32)
    f = lambda a, b: pyops.cross_view_kl_entropy(a, b, t).ce_a.sum() + pyops.cross_view_kl_entropy(a, b).kl_ab.sum()
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(a, b), f(a, b))


def test_nan_rows_and_bad_target(backend):
    a, b, t = _inputs((4, 100), torch.float32)
    a[2, 3] = float("nan")
    out = pyops.cross_view_kl_entropy(a, b)
    assert torch.isnan(out.kl_ab[2]) and torch.isfinite(out.kl_ab[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="out of range"):
        pyops.cross_view_kl_entropy(a, b, torch.tensor([0, 1, 100, 2], device="cuda"))


def test_empty(backend):
    a, b, t = _inputs((0, 100), torch.float32)
    out = pyops.cross_view_kl_entropy(a.requires_grad_(), b, t)
    out.kl_ab.sum().backward()
    assert a.grad.shape == (0, 100)


def test_more_than_2_31_elements(backend):
    """int64 offsets: N * V > 2^31 (bf16, about 4.3 GB per view)."""
    n, vocab = 8400, 256000
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    a = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    out = pyops.cross_view_kl_entropy(a, b)
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    ref = reference.cross_view_kl_entropy(a[rows], b[rows])
    for name in ("kl_ab", "entropy_b"):
        torch.testing.assert_close(getattr(out, name)[rows], getattr(ref, name), rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear(backend, dtype):
    n, h, v = 37, 64, 5003
    ha = torch.randn(n, h, device="cuda", dtype=dtype)
    hb = (ha.float() + 0.3 * torch.randn(n, h, device="cuda")).to(dtype)
    w = (torch.randn(v, h, device="cuda") / 8).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    grads = [torch.randn(n, device="cuda") for _ in range(5)]
    res = []
    for f, kw in ((pyops.fused_linear_cross_view, dict(chunk_size=8)), (reference.fused_linear_cross_view, {})):
        leaves = [x.clone().requires_grad_() for x in (ha, hb, w)]
        out = f(*leaves, None, t, **kw)
        loss = sum((o * g).sum() for o, g in zip(out, grads))
        res.append((out, torch.autograd.grad(loss, leaves)))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for x, y in zip(res[0][0], res[1][0]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    for x, y in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * max(1.0, y.float().abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_loss(backend, dtype):
    """fused_linear_cross_view_loss on CUDA: the in-place row op's fallback (forward and backward
    row ops of the backend, gradients copied into the logits) inside the chunked loss."""
    n, h, v = 37, 64, 5003
    ha = torch.randn(n, h, device="cuda", dtype=dtype)
    hb = (ha.float() + 0.3 * torch.randn(n, h, device="cuda")).to(dtype)
    w = (torch.randn(v, h, device="cuda") / 8).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    t[::5] = -100
    kw = dict(kl_ab_weight=0.5, kl_ba_weight=0.5, entropy_a_weight=0.1, ce_weight=1.0, temperature=0.9)
    res = []
    for f, extra in (
        (pyops.fused_linear_cross_view_loss, dict(chunk_size=8)),
        (reference.fused_linear_cross_view_loss, {}),
    ):
        leaves = [x.clone().requires_grad_() for x in (ha, hb, w)]
        loss = f(*leaves, None, t, **kw, **extra)
        res.append((loss, torch.autograd.grad(loss, leaves)))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(res[0][0], res[1][0], rtol=tol, atol=tol)
    for x, y in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * max(1.0, y.float().abs().max().item()))


# ---------------------------------------------------------------------------------------------
# Joseph PET projector (CUDA C++ kernels)
# ---------------------------------------------------------------------------------------------
def _pet_case(dtype, B=3, M=2000, shape=(23, 19, 9)):
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(M, 3, generator=g, dtype=torch.float64) * 60 - 30).to(dtype)
    e = (torch.rand(M, 3, generator=g, dtype=torch.float64) * 60 - 30).to(dtype)
    x = torch.rand(B, *shape, generator=g, dtype=dtype)
    y = torch.rand(B, M, generator=g, dtype=dtype)
    return x, y, s, e, shape, dict(voxel_size=(1.5, 2.0, 2.5), image_origin=(-15.0, -18.0, -10.0))


def _needs_cuda_ext():
    if not pyops.backends()["cuda_extension"]:
        pytest.skip("pyops._C_cuda was not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pet_matches_cpu_and_adjoint(dtype):
    _needs_cuda_ext()
    x, y, s, e, shape, kw = _pet_case(dtype)
    dev = lambda t: t.cuda()
    yc = pyops.joseph_project(dev(x), dev(s), dev(e), **kw)
    xc = pyops.joseph_backproject(dev(y), dev(s), dev(e), image_shape=shape, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(yc.cpu(), pyops.joseph_project(x, s, e, **kw), **tol)
    torch.testing.assert_close(xc.cpu(), pyops.joseph_backproject(y, s, e, image_shape=shape, **kw), **tol)
    lhs, rhs = (yc.double() * dev(y).double()).sum(), (dev(x).double() * xc.double()).sum()
    assert abs(lhs - rhs) <= (1e-5 if dtype == torch.float32 else 1e-12) * abs(lhs)


def test_pet_deterministic_backprojection():
    _needs_cuda_ext()
    x, y, s, e, shape, kw = _pet_case(torch.float32)
    args = (y.cuda(), s.cuda(), e.cuda())
    torch.use_deterministic_algorithms(True)
    try:
        a = pyops.joseph_backproject(*args, image_shape=shape, **kw)
        b = pyops.joseph_backproject(*args, image_shape=shape, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
    torch.testing.assert_close(
        a.cpu(), pyops.joseph_backproject(y, s, e, image_shape=shape, **kw), rtol=1e-5, atol=1e-5
    )


def test_pet_gradcheck_opcheck_compile():
    _needs_cuda_ext()
    x, y, s, e, shape, kw = _pet_case(torch.float64, B=2, M=40, shape=(4, 5, 3))
    x, y, s, e = (t.cuda() for t in (x, y, s, e))
    assert torch.autograd.gradcheck(lambda t: pyops.joseph_project(t, s, e, **kw), (x.requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda t: pyops.joseph_backproject(t, s, e, image_shape=shape, **kw), (y.requires_grad_(),)
    )
    vox, org = list(kw["voxel_size"]), list(kw["image_origin"])
    torch.library.opcheck(torch.ops.pyops.joseph_project, (x.detach().float(), s.float(), e.float(), vox, org))
    torch.library.opcheck(
        torch.ops.pyops.joseph_backproject, (y.detach().float(), s.float(), e.float(), list(shape), vox, org)
    )
    f = lambda t: pyops.joseph_backproject(pyops.joseph_project(t, s, e, **kw), s, e, image_shape=shape, **kw)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x.detach()), f(x.detach()))


def test_pet_empty_and_mixed_devices():
    _needs_cuda_ext()
    s, e = torch.zeros(0, 3, device="cuda"), torch.zeros(0, 3, device="cuda")
    assert pyops.joseph_project(torch.rand(2, 3, 3, 3, device="cuda"), s, e, voxel_size=1.0).shape == (2, 0)
    with pytest.raises(ValueError, match="same device"):
        pyops.joseph_project(torch.rand(1, 3, 3, 3), s, e, voxel_size=1.0)


# ---------------------------------------------------------------------------------------------
# Gradient harmonization (CUDA: float64 matmul kernels registered from Python)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["fedgh", "pcgrad"])
def test_harmonize_matches_cpu(dtype, mode):
    g = torch.Generator().manual_seed(0)
    x = (0.3 * torch.randn(1, 5003, generator=g) + torch.randn(13, 5003, generator=g)).to(dtype)
    x[::3] *= -1
    blocks = [x[:, :2000].contiguous(), x[:, 2000:].contiguous()]
    for reduction in ("sum", "none"):
        kw = dict(mode=mode, reduction=reduction)
        cpu = pyops.harmonize_gradients(blocks, generator=torch.Generator().manual_seed(1), **kw)
        gpu = pyops.harmonize_gradients([b.cuda() for b in blocks], generator=torch.Generator().manual_seed(1), **kw)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for c, d in zip(cpu, gpu):
            assert d.device.type == "cuda"
            torch.testing.assert_close(d.cpu(), c, **tol)
    torch.library.opcheck(torch.ops.pyops.harmonize_gram, ([b.cuda() for b in blocks],))
