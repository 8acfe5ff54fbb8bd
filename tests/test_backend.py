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
