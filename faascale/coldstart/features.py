"""What a model and a start bring to the startup-latency model (``model.py``): ``ModelFeatures``
(a model's metadata, its weight bytes and the parameters a token runs through) and
``StartSetting`` (where and how a start happens), validated at construction (``FeatureError``).
Pure, no numpy; ``model`` re-exports all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MXFP4_BITS_PER_PARAM = 4.25  # 4-bit values + one 8-bit scale per 32


class FeatureError(ValueError):
    """A model feature or a start setting is missing or invalid (the message names it)."""


@dataclass(frozen=True)
class ModelFeatures:
    """What a model brings to a start. Counts are plain numbers; ``params_b`` is in billions.

    ``quantization`` is ``None`` (16-bit weights), ``"mxfp4"`` (MoE experts in MXFP4, the rest
    16-bit, as gpt-oss ships), ``"int8"``/``"fp8"`` (1 byte) or ``"int4"`` (0.5 byte per weight).
    ``weight_bytes_override`` wins when the checkpoint's real size is known.
    """

    name: str
    params_b: float
    layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_mb: float
    compiled_graph_kb: float = 0.0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    ffn_dim: int = 0
    moe_experts: int = 0
    moe_active_experts: int = 0
    moe_active_params_b: float = 0.0
    quantization: str | None = None
    weight_bytes_override: float | None = None

    def __post_init__(self) -> None:
        for name in ("params_b", "tokenizer_mb", "compiled_graph_kb", "moe_active_params_b"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise FeatureError(f"{self.name}: {name} must be a finite number >= 0, got {value!r}")
        for name in ("layers", "hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise FeatureError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.params_b <= 0:
            raise FeatureError(f"{self.name}: params_b must be > 0, got {self.params_b}")
        if self.quantization not in (None, "mxfp4", "int8", "fp8", "int4"):
            raise FeatureError(f"{self.name}: unknown quantization {self.quantization!r} "
                               "(known: mxfp4, int8, fp8, int4, or empty for 16-bit)")

    @property
    def weight_bytes(self) -> float:
        """The checkpoint's weight bytes (what a load moves)."""
        if self.weight_bytes_override:
            return float(self.weight_bytes_override)
        params = self.params_b * 1e9
        if self.quantization == "mxfp4":
            experts = (self.layers * self.moe_experts * 3 * self.hidden_size * self.ffn_dim
                       if self.moe_experts and self.ffn_dim else 0)
            experts = min(experts, params)
            return experts * MXFP4_BITS_PER_PARAM / 8 + (params - experts) * 2
        per_param = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}.get(self.quantization or "", 2.0)
        return params * per_param

    @property
    def active_params_b(self) -> float:
        """Parameters one token runs through (an MoE's active experts only)."""
        return self.moe_active_params_b or self.params_b

    @property
    def vocab_hidden_b(self) -> float:
        """Vocabulary x hidden size, in billions: one embedding (or LM-head) matrix."""
        return self.vocab_size * self.hidden_size / 1e9

    @property
    def body_params_b(self) -> float:
        """Parameters of the decoder layers one token runs through, in billions: from the
        architecture (attention with grouped KV heads, gated MLP) for a dense model whose heads and
        FFN size are known, else the active parameters less one embedding matrix."""
        if not self.moe_experts and self.ffn_dim and self.num_attention_heads:
            h = self.hidden_size
            kv = h * (self.num_key_value_heads or self.num_attention_heads) / self.num_attention_heads
            return self.layers * (2 * h * h + 2 * h * kv + 3 * h * self.ffn_dim) / 1e9
        return max(0.0, self.active_params_b - self.vocab_hidden_b)


@dataclass(frozen=True)
class StartSetting:
    """How and where a start happens: the machine (fit group), the named setting on it, where the
    weights come from, the compile cache, and the number of CUDA-graph capture sizes (0: none)."""

    machine: str
    setting: str
    weights_source: str
    compile_cache: str = "hit"   # hit | miss | none
    capture_sizes: int = 0

    def __post_init__(self) -> None:
        if not self.machine or not self.weights_source:
            raise FeatureError("a start setting needs a machine and a weights source")
        if self.compile_cache not in ("hit", "miss", "none"):
            raise FeatureError(f"compile_cache must be hit, miss or none, got {self.compile_cache!r}")
        if self.capture_sizes < 0:
            raise FeatureError(f"capture_sizes must be >= 0, got {self.capture_sizes}")
