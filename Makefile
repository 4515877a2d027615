# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv when missing and install what is missing; nothing else is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel. GPU users: install your CUDA build of torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cdgfast-installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench gpu-check install clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cdgfast.train

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# On a CUDA machine: every op and kernel on CUDA against the CPU composite (fp32/bf16/fp16, odd shapes),
# the csrc kernels through the runtime loader, then the benchmarks on CUDA; writes benchmarks/results/gpu/
# and the GPU section of BENCHMARKS.md (< 8 min on one H200). Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
