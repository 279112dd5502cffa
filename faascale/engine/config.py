"""Model architecture config (from a Hugging Face ``config.json``) and engine settings.

Both are frozen dataclasses parsed and validated at the edge; everything below them trusts them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch


class ConfigError(ValueError):
    """A model or engine configuration is invalid; the message names the field."""


class DeviceUnavailableError(ConfigError):
    """A well-formed device this machine does not have (``cuda`` where torch sees no GPU, or an
    index past the GPUs it sees). Raised when the device is resolved, on the machine that computes:
    a gateway without a GPU still accepts ``device: cuda`` for its GPU workers."""


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... -> torch dtype; raises ConfigError on an unknown name."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"dtype: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


DEVICE_NAMES = ("cpu", "cuda", "cuda:N", "auto")
_DEVICE_RE = re.compile(r"cpu|auto|cuda(:[0-9]+)?")


def check_device_name(name: str) -> str:
    """``name`` if it is a device the engine runs on (``DEVICE_NAMES``); ConfigError otherwise
    (``meta``, ``mps``, ``cuda:-1``, ...). Reads no hardware."""
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ConfigError(f"device: {name!r} is not supported; use one of "
                          f"{', '.join(DEVICE_NAMES)} (auto: cuda when torch sees a GPU, "
                          f"else cpu)")
    return name


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``name`` means on this machine, with its index (``cuda`` -> ``cuda:0``, the
    current GPU, so that ``tensor.device == resolved`` holds for tensors already there).
    ConfigError for a name the engine does not run on; DeviceUnavailableError for a GPU this
    machine does not have."""
    name = check_device_name(str(name))
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceUnavailableError(
            f"device: {name!r} needs a CUDA GPU, but torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, {build}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    index = int(name.partition(":")[2]) if ":" in name else torch.cuda.current_device()
    if index >= count:
        raise DeviceUnavailableError(f"device: {name!r} but torch sees {count} GPU(s) "
                                     f"(cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"dtype: unsupported torch dtype {dtype}")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v (not on o_proj)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide "
                f"num_attention_heads {self.num_heads}"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type: {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict; raises ConfigError naming the field."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        }.get(hf.get("model_type", ""), str(hf.get("model_type")))
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            qwen = arch == "Qwen2ForCausalLM"
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                rope_scaling=hf.get("rope_scaling"),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", qwen)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=(hf.get("sliding_window") if hf.get("use_sliding_window", not qwen)
                                else None),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ConfigError(f"{exc.args[0]}: missing from config.json") from None

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face config dict (for transformers parity tests and export)."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.architecture != "LlamaForCausalLM":
            out["sliding_window"] = self.sliding_window
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config: unknown fields {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs a model: device, compute dtype, batch and length limits,
    threads. ``device`` is checked here (a name the engine runs on) and resolved on the machine
    that computes (``resolve_device``: whether it has the GPU)."""

    dtype: str = "float32"
    device: str = "cpu"  # "cpu", "cuda", "cuda:N", "auto" (cuda when torch sees a GPU, else cpu)
    max_batch_size: int = 16
    max_seq_len: int = 2048
    max_prefill_tokens_per_step: int = 2048
    num_threads: int | None = None  # None: leave torch's default
    kv_block_tokens: int = 256  # the KV cache grows in chunks of this many positions

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        check_device_name(self.device)
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len: must be >= 2, got {self.max_seq_len}")
        if self.max_prefill_tokens_per_step < 1:
            raise ConfigError("max_prefill_tokens_per_step: must be >= 1")
        if self.kv_block_tokens < 1:
            raise ConfigError("kv_block_tokens: must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def resolve_device(self) -> torch.device:
        """``device`` on this machine (``resolve_device``); raises DeviceUnavailableError."""
        return resolve_device(self.device)
