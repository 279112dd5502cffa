"""Random-weight Hugging Face folders made from real architectures' configs, for measuring vLLM
starts of models that cannot be downloaded here (``benchmarks/coldstart_vllm.py``).

A start does not depend on what the weights say, only on their shapes, their bytes and the
tokenizer's size, so a folder with a published architecture's ``config.json`` numbers, weights
drawn with a fixed seed and a tokenizer of the config's vocabulary starts like the real checkpoint
would (the real one's trained tokenizer has other merges but the same kind of size). Each
``Arch`` below cites the Hugging Face ``config.json`` its numbers come from; a ``*-NNl`` name
keeps NN of the original's layers, so that every folder stays under ~1.5 GB on this machine.

A folder holds ``config.json``, ``model.safetensors`` (bf16 unless ``Arch.dtype`` says
otherwise; tied embeddings stored once), ``tokenizer.json`` (``synthetic_tokenizer_json``: a
byte-level BPE with exactly ``vocab_size`` tokens, so ``tokenizer.json`` grows with the vocabulary
as real ones do: Qwen2's 151k vocabulary is a 7 MB file, SmolLM2's 49k one 2 MB),
``tokenizer_config.json`` and ``generation_config.json`` (as ``engine.hf_export`` writes them for
vLLM). ``ensure_model`` writes it once, into a temporary folder renamed into place, and reuses it
afterwards (``.complete`` holds the spec it was made from; a folder made from another spec is
rebuilt).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.engine.random_model import bytes_to_unicode

DEFAULT_ROOT = Path.home() / ".faascale" / "vllm-models"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEIGHT_STD = 0.02  # transformers' initializer_range for these families
COMPLETE = ".complete"


@dataclass(frozen=True)
class Arch:
    """One architecture's numbers (Hugging Face ``config.json`` names), and where they are from."""

    name: str
    architecture: str  # LlamaForCausalLM | Qwen2ForCausalLM | MistralForCausalLM
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    source: str  # the published config this follows (and what was cut)
    sliding_window: int | None = None  # Mistral
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # config.json's rope_scaling, as pairs
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.architecture not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
            raise ValueError(f"{self.name}: unsupported architecture {self.architecture}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.name}: hidden_size is not a multiple of the heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: heads are not a multiple of the KV heads")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"{self.name}: vocab_size must hold the 256 bytes and "
                             f"{len(SPECIAL_TOKENS)} special tokens")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"{self.name}: dtype must be bfloat16 or float32")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "Qwen2ForCausalLM"  # Qwen2 has q/k/v biases, no o bias

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's Hugging Face name and shape, in file order."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (q, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            if self.qkv_bias:
                out[p + "self_attn.q_proj.bias"] = (q,)
                out[p + "self_attn.k_proj.bias"] = (kv,)
                out[p + "self_attn.v_proj.bias"] = (kv,)
            out[p + "self_attn.o_proj.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (i, h)
            out[p + "mlp.up_proj.weight"] = (i, h)
            out[p + "mlp.down_proj.weight"] = (h, i)
        out["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        return out

    @property
    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def weight_bytes(self) -> int:
        return self.num_params * (2 if self.dtype == "bfloat16" else 4)


# The published numbers (each repository's config.json on the Hugging Face Hub).
ARCHS: tuple[Arch, ...] = (
    # JackFram/llama-68m (a Llama draft model): 2 layers of 768, 12 heads, MHA, 32000 vocab
    Arch("llama-68m", "LlamaForCausalLM", hidden_size=768, intermediate_size=3072,
         num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
         max_position_embeddings=2048, source="JackFram/llama-68m"),
    # JackFram/llama-160m (a Llama draft model): 12 layers of 768, 12 heads, MHA, 32000 vocab
    Arch("llama-160m", "LlamaForCausalLM", hidden_size=768, intermediate_size=3072,
         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
         max_position_embeddings=2048, source="JackFram/llama-160m"),
    # HuggingFaceTB/SmolLM2-135M: 30 layers of 576, 9 heads / 3 KV, 49152 vocab, tied
    Arch("smollm2-135m", "LlamaForCausalLM", hidden_size=576, intermediate_size=1536,
         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
         max_position_embeddings=8192, source="HuggingFaceTB/SmolLM2-135M"),
    # HuggingFaceTB/SmolLM2-360M: 32 layers of 960, 15 heads / 5 KV, 49152 vocab, tied
    Arch("smollm2-360m", "LlamaForCausalLM", hidden_size=960, intermediate_size=2560,
         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
         max_position_embeddings=8192, source="HuggingFaceTB/SmolLM2-360M"),
    # Qwen/Qwen2.5-0.5B: 24 layers of 896, 14 heads / 2 KV, q/k/v bias, 151936 vocab, tied
    Arch("qwen2.5-0.5b", "Qwen2ForCausalLM", hidden_size=896, intermediate_size=4864,
         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
         max_position_embeddings=32768, source="Qwen/Qwen2.5-0.5B"),
    # meta-llama/Llama-3.2-1B: 16 layers of 2048, 32 heads / 8 KV, 8192 FFN, 128256 vocab, tied,
    # Llama 3 RoPE scaling; 2 of the 16 layers kept (0.77 GB instead of 2.5 GB)
    Arch("llama-3.2-1b-2l", "LlamaForCausalLM", hidden_size=2048, intermediate_size=8192,
         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
         max_position_embeddings=131072,
         rope_scaling=(("rope_type", "llama3"), ("factor", 32.0), ("low_freq_factor", 1.0),
                       ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)),
         source="meta-llama/Llama-3.2-1B, 2 of 16 layers"),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T: 22 layers of 2048, 32 heads / 4 KV,
    # 5632 FFN, 32000 vocab, untied; 10 of the 22 layers kept (1.1 GB instead of 2.2 GB)
    Arch("tinyllama-1.1b-10l", "LlamaForCausalLM", hidden_size=2048, intermediate_size=5632,
         num_hidden_layers=10, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
         max_position_embeddings=2048,
         source="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, 10 of 22 layers"),
    # mistralai/Mistral-7B-v0.1: 32 layers of 4096, 32 heads / 8 KV, 14336 FFN, 32000 vocab,
    # sliding window 4096, untied; 2 of the 32 layers kept (1.4 GB instead of 14.5 GB)
    Arch("mistral-7b-2l", "MistralForCausalLM", hidden_size=4096, intermediate_size=14336,
         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
         max_position_embeddings=32768, sliding_window=4096,
         source="mistralai/Mistral-7B-v0.1, 2 of 32 layers"),
)
BY_NAME = {a.name: a for a in ARCHS}


def config_json(arch: Arch) -> dict[str, Any]:
    """The folder's ``config.json`` (pure)."""
    cfg: dict[str, Any] = {
        "architectures": [arch.architecture],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                       "MistralForCausalLM": "mistral"}[arch.architecture],
        "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads, "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size, "tie_word_embeddings": arch.tie_word_embeddings,
        "rope_theta": arch.rope_theta, "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position_embeddings, "hidden_act": "silu",
        "initializer_range": WEIGHT_STD, "use_cache": True,
        "bos_token_id": bos_id(arch.vocab_size), "eos_token_id": eos_id(arch.vocab_size),
        "torch_dtype": arch.dtype, "dtype": arch.dtype,
    }
    if arch.architecture == "LlamaForCausalLM":
        cfg.update(attention_bias=False, mlp_bias=False)
    if arch.rope_scaling:
        cfg["rope_scaling"] = dict(arch.rope_scaling)
    if arch.architecture == "Qwen2ForCausalLM":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_hidden_layers)
    if arch.architecture == "MistralForCausalLM":
        cfg["sliding_window"] = arch.sliding_window
    return cfg


def bos_id(vocab_size: int) -> int:
    return vocab_size - len(SPECIAL_TOKENS)  # <|endoftext|>


def eos_id(vocab_size: int) -> int:
    return vocab_size - 1  # <|im_end|>


def synthetic_vocab(vocab_size: int, seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary of ``vocab_size - 3`` tokens (the 3 special tokens come last)
    and its merges (pure, deterministic): the 256 byte symbols, then merged tokens, each the
    concatenation of two tokens already in it (so every merge is valid), drawn with ``seed``."""
    n = vocab_size - len(SPECIAL_TOKENS)
    symbols = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    tokens = list(symbols)
    merges: list[tuple[str, str]] = []
    rng = random.Random(seed)
    while len(vocab) < n:
        a = tokens[rng.randrange(len(tokens))]
        b = symbols[rng.randrange(256)] if rng.random() < 0.5 else tokens[rng.randrange(len(tokens))]
        if len(a) + len(b) > 16 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        tokens.append(a + b)
        merges.append((a, b))
    return vocab, merges


def synthetic_tokenizer_json(vocab_size: int, seed: int = 0) -> str:
    """``tokenizer.json`` of a byte-level BPE with exactly ``vocab_size`` tokens: the
    ``synthetic_vocab`` and the ChatML special tokens (``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``, the last three ids). Needs the ``tokenizers`` library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = synthetic_vocab(vocab_size, seed)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok.to_str()


def tokenizer_config(arch: Arch) -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": arch.max_position_embeddings, "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[2],
            "chat_template": CHATML_TEMPLATE}


def random_weights(arch: Arch, seed: int) -> dict[str, Any]:
    """Every weight, drawn from ``seed`` (one generator, in ``tensor_shapes`` order): N(0, 0.02)
    matrices and biases, norms 1 (as transformers initialises them), in ``arch.dtype``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if arch.dtype == "bfloat16" else torch.float32
    out = {}
    for name, shape in arch.tensor_shapes().items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * WEIGHT_STD).to(dtype)
    return out


def _spec_text(arch: Arch, seed: int) -> str:
    return json.dumps({**dataclasses.asdict(arch), "seed": seed, "format": 1}, sort_keys=True)


def is_complete(folder: Path, arch: Arch, seed: int = 0) -> bool:
    marker = folder / COMPLETE
    return marker.is_file() and marker.read_text() == _spec_text(arch, seed)


def write_model(arch: Arch, folder: str | Path, *, seed: int = 0) -> Path:
    """Write the folder (replacing what is there): weights first into ``<folder>.tmp``, renamed
    into place when complete. Returns the folder."""
    from safetensors.torch import save_file

    out = Path(folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = random_weights(arch, seed)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (tmp / "tokenizer.json").write_text(synthetic_tokenizer_json(arch.vocab_size, seed))
    for name, content in (("config.json", config_json(arch)),
                          ("tokenizer_config.json", tokenizer_config(arch)),
                          ("generation_config.json", {"bos_token_id": bos_id(arch.vocab_size),
                                                      "eos_token_id": eos_id(arch.vocab_size)})):
        (tmp / name).write_text(json.dumps(content, indent=1))
    (tmp / COMPLETE).write_text(_spec_text(arch, seed))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure_model(arch: Arch, root: str | Path = DEFAULT_ROOT, *, seed: int = 0) -> Path:
    """``root/<name>``, written once (``write_model``) and reused while its spec matches."""
    folder = Path(root) / arch.name
    if not is_complete(folder, arch, seed):
        write_model(arch, folder, seed=seed)
    return folder
