"""Loading of the compiled extensions, and the choice of kernel on CUDA devices.

Every op's schema and CPU kernel live in the C++ extension ``pyops._C`` (always built). The
CUDA kernels written in CUDA C++ live in ``pyops._C_cuda`` (built when torch has CUDA and nvcc
is found). Triton kernels are registered from Python for the ``CUDA`` dispatch key.

When an op has both a CUDA C++ and a Triton kernel, one of them serves CUDA tensors:

* ``PYOPS_CUDA_BACKEND=cuda|triton`` (environment, read at import) picks the default; without
  it the CUDA C++ kernel is used when ``pyops._C_cuda`` was built, else Triton;
* ``pyops.set_backend(name)`` changes it, ``with pyops.use_backend(name): ...`` changes it for
  a block (process-wide, not thread-local: benchmarks use it, not concurrent code).

The choice is made through the dispatcher (the Triton kernel is registered over the C++ one
and the registration dropped again), so it holds inside ``torch.compile``d code as well.

The CPU kernels are built for three x86-64 instruction sets (AVX-512, AVX2 + FMA, baseline) and
run the best one the CPU supports. ``PYOPS_CPU_ISA=avx512|avx2|baseline`` (environment, read at
import; ``auto`` or unset: the best) forces one, ``pyops.set_cpu_isa(name)`` changes it; a path
the CPU cannot run is refused with a ``ValueError``. The tests run on every path this way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton")
CPU_ISAS = ("avx512", "avx2", "baseline")  # best first

try:
    from . import _C  # noqa: F401  (registers the schemas and the CPU kernels)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pyops: the C++ extension pyops._C is not built. Build it with "
        "`pip install --no-build-isolation -e .` (or `make test`, which also sets up .venv). "
        f"Original error: {exc}"
    ) from exc

_CUDA_EXT_ERROR: str | None = None
_HAS_CUDA_EXT = False
if torch.version.cuda is not None:
    try:
        from . import _C_cuda  # noqa: F401  (registers the CUDA C++ kernels)

        _HAS_CUDA_EXT = True
    except ImportError as exc:
        _CUDA_EXT_ERROR = str(exc)
else:
    _CUDA_EXT_ERROR = "torch is a CPU-only build"

_TRITON_SPEC = importlib.util.find_spec("triton")
HAS_TRITON = _TRITON_SPEC is not None

# op name (without namespace) -> Python function that launches its Triton kernel(s)
_TRITON_KERNELS: dict[str, Callable] = {}
_triton_lib: torch.library.Library | None = None
_active: str | None = None


def _triton_version() -> str | None:
    if not HAS_TRITON:
        return None
    try:
        return importlib.import_module("triton").__version__
    except Exception as exc:  # a broken install must not break pyops on CPU
        return f"unusable ({exc})"


def backends() -> dict:
    """What was built and what serves each device.

    Returns a dict with ``cpu_extension`` (always True), ``cuda_extension`` (the CUDA C++
    kernels were built and loaded), ``cuda_extension_error`` (why not, if not), ``triton``
    (its version, or None), ``cuda_available`` (a CUDA device is visible), ``cuda_backend``
    (which implementation serves CUDA tensors now), ``triton_kernels`` (ops with a Triton
    kernel), ``cpu_isa`` (the instruction-set path the CPU kernels run now) and
    ``cpu_isa_supported`` (the paths this CPU can run, best first).
    """
    return {
        "torch": torch.__version__,
        "cpu_extension": True,
        "cpu_isa": get_cpu_isa(),
        "cpu_isa_supported": supported_cpu_isas(),
        "cuda_extension": _HAS_CUDA_EXT,
        "cuda_extension_error": _CUDA_EXT_ERROR,
        "triton": _triton_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_backend": _active,
        "triton_kernels": sorted(_TRITON_KERNELS),
    }


def get_cpu_isa() -> str:
    """The instruction-set path the CPU kernels run: "avx512", "avx2" or "baseline"."""
    return _C._cpu_isa()[0]


def supported_cpu_isas() -> list[str]:
    """The paths this CPU can run, best first (always ending with "baseline")."""
    best = _C._cpu_isa()[1]
    return list(CPU_ISAS[CPU_ISAS.index(best) :])


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels' ``name`` build ("avx512", "avx2", "baseline" or "auto" for the best
    this CPU supports), process-wide. A path the CPU cannot run raises ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"pyops.set_cpu_isa: name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        key = _C._cpu_isa()[1]
    if key not in CPU_ISAS:
        raise ValueError(f"pyops.set_cpu_isa: name must be one of {CPU_ISAS} or 'auto', got {name!r}")
    if key not in supported_cpu_isas():
        raise ValueError(
            f"pyops.set_cpu_isa({name!r}): this CPU cannot run the {key} kernels; it supports {supported_cpu_isas()}"
        )
    _C._set_cpu_isa(key)


def _has_cpp_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyops::{op}", "CUDA")


def _register_triton(ops: list[str]) -> None:
    global _triton_lib
    if not ops:
        return
    if _triton_lib is None:
        _triton_lib = torch.library.Library("pyops", "IMPL")
    with warnings.catch_warnings():
        # Registering over the CUDA C++ kernel is the point; torch warns about overrides.
        warnings.simplefilter("ignore")
        for op in ops:
            _triton_lib.impl(op, _TRITON_KERNELS[op], "CUDA")


def _drop_triton() -> None:
    global _triton_lib
    if _triton_lib is not None:
        _triton_lib._destroy()
        _triton_lib = None


def get_backend() -> str | None:
    """The implementation that serves CUDA tensors: "cuda", "triton" or None (neither)."""
    return _active


def set_backend(name: str) -> None:
    """Choose the implementation for CUDA tensors: "cuda" (CUDA C++) or "triton".

    Ops that have only one of the two keep it whatever the choice.
    """
    global _active
    if name not in BACKENDS:
        raise ValueError(f"pyops.set_backend: name must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("pyops.set_backend('triton'): triton is not installed")
    if name == "cuda" and not _HAS_CUDA_EXT:
        raise RuntimeError(
            f"pyops.set_backend('cuda'): the CUDA extension pyops._C_cuda is not available ({_CUDA_EXT_ERROR})"
        )
    _drop_triton()
    _active = name
    if HAS_TRITON:
        _register_triton([op for op in _TRITON_KERNELS if name == "triton" or not _has_cpp_cuda_kernel(op)])


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with pyops.use_backend("triton"): ...`` runs the block with that CUDA implementation."""
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        if previous is None:
            _drop_triton()
            globals()["_active"] = None
        else:
            set_backend(previous)


def register_triton_kernel(op: str, fn: Callable) -> None:
    """Called by an op module for each op that has a Triton kernel (a launcher for CUDA tensors)."""
    _TRITON_KERNELS[op] = fn
    if not HAS_TRITON:
        return
    if _active == "triton" or not _has_cpp_cuda_kernel(op):
        _register_triton([op])


def device_guard(t: torch.Tensor):
    """Context for a Triton launch on t's device (Triton launches on the current CUDA device);
    a no-op for CPU tensors (the Triton interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def capturing(t: torch.Tensor) -> bool:
    """True while t's CUDA stream is being captured into a CUDA graph (no host syncs allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def no_values(t: torch.Tensor) -> bool:
    """True when t's values cannot (or must not) be read on the host: a meta or fake tensor, a
    region being traced by torch.compile, or a CUDA stream being captured. Data checks skip."""
    return (
        t.is_meta
        or torch.compiler.is_compiling()
        or capturing(t)
        or isinstance(t, torch._subclasses.fake_tensor.FakeTensor)
    )


def register_no_double_backward(op: str) -> None:
    """Registers an autograd formula for the backward op ``pyops::op`` that refuses double
    backward with a clear error (instead of silently returning no gradient)."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"pyops::{op}: double backward is not supported")

    torch.library.register_autograd(f"pyops::{op}", backward, setup_context=lambda ctx, inputs, output: None)


def _initial_backend() -> str | None:
    env = os.environ.get("PYOPS_CUDA_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"PYOPS_CUDA_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
        return env
    if _HAS_CUDA_EXT:
        return "cuda"
    return "triton" if HAS_TRITON else None


def _init_cpu_isa() -> None:
    env = os.environ.get("PYOPS_CPU_ISA", "").strip()
    if not env:
        return
    try:
        set_cpu_isa(env)
    except ValueError as exc:
        raise ImportError(f"pyops: PYOPS_CPU_ISA={env!r} cannot be used: {exc}") from None


def _init() -> None:
    global _active
    _init_cpu_isa()
    name = _initial_backend()
    if name is not None:
        set_backend(name)
    else:
        _active = None


_init()
