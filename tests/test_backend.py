"""pyops.backends() and the choice of CUDA implementation (what can be checked without a GPU)."""

import importlib.util

import pytest
import torch

import pyops

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_backends_report():
    info = pyops.backends()
    assert info["cpu_extension"] is True
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    if torch.version.cuda is None:
        assert info["cuda_extension"] is False and "CPU-only" in info["cuda_extension_error"]
    if HAS_TRITON:
        assert info["triton"] is not None
        assert "cross_view_kl_entropy_fwd" in info["triton_kernels"]
    assert info["cuda_backend"] in (None, "cuda", "triton")


def test_every_op_has_a_cpu_kernel_and_a_fake():
    for op in ("cross_view_kl_entropy_fwd", "cross_view_kl_entropy_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyops::{op}", "CPU"), op
    for op in ("fused_linear_cross_view_fwd", "fused_linear_cross_view_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyops::{op}", "CompositeExplicitAutograd"), op


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="must be one of"):
        pyops.set_backend("opencl")


@pytest.mark.skipif(pyops.backends()["cuda_extension"], reason="the CUDA extension is built here")
def test_cuda_backend_needs_the_cuda_extension():
    with pytest.raises(RuntimeError, match="pyops._C_cuda is not available"):
        pyops.set_backend("cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_use_backend_registers_triton_for_cuda_and_restores():
    before = pyops.get_backend()
    with pyops.use_backend("triton"):
        assert pyops.get_backend() == "triton"
        assert torch._C._dispatch_has_kernel_for_dispatch_key("pyops::cross_view_kl_entropy_fwd", "CUDA")
    assert pyops.get_backend() == before


# ---- the CPU kernels' instruction-set path (PYOPS_CPU_ISA / pyops.set_cpu_isa) ---------------
def _import_with_isa(value):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYOPS_CPU_ISA": value}
    code = "import pyops; print(pyops.backends()['cpu_isa'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_cpu_isa_report_and_switch():
    info = pyops.backends()
    supported = info["cpu_isa_supported"]
    assert supported[-1] == "baseline" and supported == [i for i in ("avx512", "avx2", "baseline") if i in supported]
    assert info["cpu_isa"] in supported
    before = pyops.get_cpu_isa()
    try:
        for isa in supported:
            pyops.set_cpu_isa(isa)
            assert pyops.get_cpu_isa() == isa == pyops.backends()["cpu_isa"]
            # the kernels run on every path (their results are tested on every path by `make test`)
            a, b = torch.randn(3, 77), torch.randn(3, 77)
            out = pyops.cross_view_kl_entropy(a, b)
            ref = pyops.reference.cross_view_kl_entropy(a, b)
            torch.testing.assert_close(out.kl_ab, ref.kl_ab, rtol=1e-4, atol=1e-5)
        pyops.set_cpu_isa("auto")
        assert pyops.get_cpu_isa() == supported[0]
    finally:
        pyops.set_cpu_isa(before)


def test_cpu_isa_bad_names():
    with pytest.raises(ValueError, match="must be one of"):
        pyops.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="must be a str"):
        pyops.set_cpu_isa(2)
    unsupported = [i for i in ("avx512", "avx2") if i not in pyops.backends()["cpu_isa_supported"]]
    for isa in unsupported:  # only on a CPU without AVX-512 (or AVX2)
        with pytest.raises(ValueError, match="this CPU cannot run"):
            pyops.set_cpu_isa(isa)


def test_cpu_isa_environment_variable():
    ok = _import_with_isa("baseline")
    assert ok.returncode == 0 and ok.stdout.strip() == "baseline", ok.stderr
    bad = _import_with_isa("avx1024")
    assert bad.returncode != 0 and "PYOPS_CPU_ISA='avx1024' cannot be used" in bad.stderr
    for isa in ("avx512", "avx2"):
        if isa not in pyops.backends()["cpu_isa_supported"]:
            res = _import_with_isa(isa)
            assert res.returncode != 0 and "this CPU cannot run" in res.stderr
