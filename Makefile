# The two commands: `make train` and `make test` (`make test-fast` skips the slow tests). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers; whole test files go to one worker (--dist loadfile) so that a module's
# compiled programs and fixtures are built once. Each worker peaks at a few GB. JOBS=0: one process.
JOBS ?= 2
XDIST = $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile)

.PHONY: train test test-fast lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Train the default GPT (configs/gpt_small.yaml) on the stdlib corpus and print a sample.
train: $(STAMP)
	$(VENV)/bin/llm-jax train gpt_small $(ARGS)

## The checks, then the whole test suite on CPU (8 forced host devices).
test: lint $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -W ignore::DeprecationWarning $(XDIST) $(ARGS)

## Style (ruff) and the import direction between packages (import-linter, pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check llm_jax tests scripts experiments launch
	$(VENV)/bin/lint-imports

## The quick loop: every test not marked slow (no process spawning, no long training).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -W ignore::DeprecationWarning -m "not slow" $(XDIST) $(ARGS)

## Throughput of the benchmark GPT on this machine.
bench: $(STAMP)
	$(VENV)/bin/llm-jax bench gpt_bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
