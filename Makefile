# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv when missing and install what is missing; nothing else is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel. GPU users: install your CUDA build of torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cdgfast-installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench install clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
