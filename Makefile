# calibprompt — the two commands: `make demo` and `make test`.
# Both create .venv when missing and install what they need into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# Exact PyTorch builds for this workplace's machines; pyproject.toml keeps ranges.
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
TORCH_CONSTRAINTS := torch==2.14.1 torchvision==0.29.1
else ifeq ($(ARCH),aarch64)
TORCH_CONSTRAINTS := torch==2.9.1 torchvision==0.24.1
else
TORCH_CONSTRAINTS :=
endif

.PHONY: test demo lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.constraints.txt: Makefile | $(VENV)/bin/python
	printf '%s\n' $(TORCH_CONSTRAINTS) > $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c $(VENV)/.constraints.txt -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c $(VENV)/.constraints.txt -e .
	touch $@

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/calibprompt demo

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
