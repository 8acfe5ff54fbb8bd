"""Build of the pyops C++ (and, where possible, CUDA) extensions.

`pip install --no-build-isolation -e .` always builds `pyops._C` (the operator schemas and the
CPU kernels). `pyops._C_cuda` (the CUDA kernels) is built too when the installed torch has CUDA
(`torch.version.cuda`) and nvcc is found; `PYOPS_NO_CUDA=1` skips it and `PYOPS_FORCE_CUDA=1`
builds it regardless (it then needs a CUDA build of torch to link against).

`PYOPS_SANITIZE=1` builds the C++ extension with AddressSanitizer and UndefinedBehaviorSanitizer
(no CUDA; `make test-asan` builds it into build/asan and runs the op tests on it).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def build_cuda() -> bool:
    if os.environ.get("PYOPS_NO_CUDA") == "1":
        return False
    if os.environ.get("PYOPS_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


# no FP traps or errno: lets comparisons and selects on floats vectorise (torch builds the same way)
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
link_flags = ["-fopenmp"]
SANITIZE = os.environ.get("PYOPS_SANITIZE") == "1"
if SANITIZE:
    # every finding is fatal (no recovery), with frames to read; -O1 keeps the kernels' loops
    # (and their vectorisation) close to the release build's
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    cxx_flags = [f for f in cxx_flags if f != "-O3"] + ["-O1"] + san
    link_flags += san
ext_modules = [
    CppExtension(
        "pyops._C",
        _rel([os.path.join(HERE, "csrc", "pyops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "*", "*.cpp"))),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
]
if build_cuda() and not SANITIZE:
    ext_modules.append(
        CUDAExtension(
            "pyops._C_cuda",
            _rel([os.path.join(HERE, "csrc", "pyops_cuda.cpp")] + glob.glob(os.path.join(HERE, "csrc", "*", "*.cu"))),
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
