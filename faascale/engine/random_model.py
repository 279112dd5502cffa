"""Deterministic random-weight Llama models with a byte-level tokenizer, for fast tests.

Same seed, same config -> bit-identical weights and therefore an identical packed model id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from faascale.engine.checkpoint import pack
from faascale.engine.config import ModelConfig
from faascale.engine.manifest import ModelManifest

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

TINY_LLAMA: dict[str, Any] = {
    "architecture": "LlamaForCausalLM",
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_layers": 8,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    # Llama 3's RoPE scaling, so the tiny model exercises it (factors from Llama 3.1).
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_ids": (258,),  # <|im_end|>
}


def tiny_config(**overrides: Any) -> ModelConfig:
    return ModelConfig(**{**TINY_LLAMA, **overrides})


def random_hf_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face-named fp32 weights drawn from ``seed`` (std 0.1 so activations are not tiny)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + rand(cfg.hidden_size, std=0.05)

    h, i = cfg.hidden_size, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": rand(cfg.vocab_size, h, std=1.0)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
        sd[p + "self_attn.q_proj.weight"] = rand(cfg.q_size, h)
        sd[p + "self_attn.k_proj.weight"] = rand(cfg.kv_size, h)
        sd[p + "self_attn.v_proj.weight"] = rand(cfg.kv_size, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, cfg.q_size)
        if cfg.attention_bias:
            for x, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                sd[p + f"self_attn.{x}_proj.bias"] = rand(size)
            if cfg.architecture != "Qwen2ForCausalLM":
                sd[p + "self_attn.o_proj.bias"] = rand(h)
        sd[p + "mlp.gate_proj.weight"] = rand(i, h)
        sd[p + "mlp.up_proj.weight"] = rand(i, h)
        sd[p + "mlp.down_proj.weight"] = rand(h, i)
        if cfg.mlp_bias:
            sd[p + "mlp.gate_proj.bias"] = rand(i)
            sd[p + "mlp.up_proj.bias"] = rand(i)
            sd[p + "mlp.down_proj.bias"] = rand(h)
    sd["model.norm.weight"] = norm()
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = rand(cfg.vocab_size, h)
    return sd


def byte_tokenizer_json() -> str:
    """A byte-level tokenizer: one token per byte (ids 0-255) plus the ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # Order the 256 byte symbols by the byte they stand for, so id == byte value.
    byte_to_symbol = {b: s for b, s in zip(range(256), bytes_to_unicode())}
    assert set(byte_to_symbol.values()) == set(alphabet)
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable-unicode table, in byte order (the ByteLevel alphabet; the
    synthetic tokenizers of benchmarks/vllm_models.py use it too)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def pack_random(out_dir: str | os.PathLike, *, seed: int = 0, num_blocks: int = 4,
                dtype: str = "float32", name: str = "tiny-llama", config: ModelConfig | None = None,
                progress: Callable[[int, int], None] | None = None) -> ModelManifest:
    """Pack a random model (``config`` defaults to :data:`TINY_LLAMA`) with the byte tokenizer."""
    cfg = config or tiny_config()
    if cfg.vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {BYTE_VOCAB_SIZE} for the byte tokenizer")
    return pack(out_dir, name=name, config=cfg, tensors=random_hf_state_dict(cfg, seed),
                tokenizer_json=byte_tokenizer_json(), num_blocks=num_blocks, dtype=dtype,
                chat_template=CHATML_TEMPLATE, bos_token=SPECIAL_TOKENS[0],
                eos_token=SPECIAL_TOKENS[2], source=f"random://{name}?seed={seed}",
                progress=progress)
