"""A packed model back to a Hugging Face folder that transformers and vLLM load.

``export_hf`` writes ``config.json`` (``ModelConfig.to_hf`` plus the dtype), ``model.safetensors``
(Hugging Face tensor names: the fused ``qkv`` and ``gate_up`` split back into q/k/v and gate/up;
no ``lm_head.weight`` when the embeddings are tied, as Hugging Face checkpoints store them),
``tokenizer.json`` (byte for byte the packed one), ``tokenizer_config.json`` (chat template, BOS/EOS
tokens, ``add_bos_token``) and ``generation_config.json`` (BOS/EOS ids). Packing the folder again
(``checkpoint.pack_hf_dir``) gives the same tensors, config and tokenizer.

``unfuse_to_hf`` is the one copy of our-names -> Hugging Face-names mapping (the parity tests and
the engine benchmark build their transformers model from it). ``exported_hf_dir`` exports once
into a cache keyed by the model id and dtype (the vLLM row of ``benchmarks/engine.py``).

The safetensors file is written one tensor at a time from the blocks' mmap views, so peak memory
is one tensor (the largest, the embeddings: 113 MB of SmolLM2 in fp32), not the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import ModelConfig, dtype_name, parse_dtype
from faascale.engine.manifest import CheckpointError, ModelManifest
from faascale.engine.sources import build_once

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # written last: a folder with config.json is a complete export
# safetensors' dtype tags (https://github.com/huggingface/safetensors: the format's header)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
HEADER_ALIGN_BYTES = 8


def unfuse_to_hf(cfg: ModelConfig, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our block tensors (all blocks merged) -> Hugging Face names, q/k/v and gate/up split again.

    Views, no copy (the splits share the fused tensor's storage). ``lm_head.weight`` only when the
    embeddings are not tied (a tied model's last block holds a copy; Hugging Face stores none).
    Raises KeyError naming a tensor the blocks lack."""
    sd = {"model.embed_tokens.weight": w["embed.weight"]}
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "input_layernorm.weight"] = w[q + "input_norm.weight"]
        for kind in ("weight", "bias"):
            if q + f"qkv.{kind}" in w:
                qw, kw, vw = w[q + f"qkv.{kind}"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
                sd[p + f"self_attn.q_proj.{kind}"] = qw
                sd[p + f"self_attn.k_proj.{kind}"] = kw
                sd[p + f"self_attn.v_proj.{kind}"] = vw
            if q + f"o.{kind}" in w:
                sd[p + f"self_attn.o_proj.{kind}"] = w[q + f"o.{kind}"]
        sd[p + "post_attention_layernorm.weight"] = w[q + "post_norm.weight"]
        for kind in ("weight", "bias"):
            if q + f"gate_up.{kind}" in w:
                g, u = w[q + f"gate_up.{kind}"].chunk(2)
                sd[p + f"mlp.gate_proj.{kind}"] = g
                sd[p + f"mlp.up_proj.{kind}"] = u
            if q + f"down.{kind}" in w:
                sd[p + f"mlp.down_proj.{kind}"] = w[q + f"down.{kind}"]
    sd["model.norm.weight"] = w["norm.weight"]
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w["lm_head.weight"]
    return sd


def hf_state_dict(packed_dir: str | os.PathLike, manifest: ModelManifest | None = None
                  ) -> dict[str, torch.Tensor]:
    """The packed model's weights in Hugging Face names, as views over its mapped blocks (each
    verified against its checksum). Raises CheckpointError, CorruptBlockError."""
    m = manifest or read_manifest(packed_dir)
    merged: dict[str, torch.Tensor] = {}
    for i in range(m.num_blocks):
        for name, tensor in load_block(packed_dir, m, i).items():
            merged.setdefault(name, tensor)
    try:
        return unfuse_to_hf(m.config, merged)
    except KeyError as exc:
        raise CheckpointError(f"{packed_dir}: the blocks have no tensor {exc.args[0]!r}") from None


def hf_config(manifest: ModelManifest, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json``: the architecture (``ModelConfig.to_hf``) and the weights' dtype, under both
    names transformers has used for it (``torch_dtype`` until 4.56, ``dtype`` since)."""
    cfg = manifest.config
    out = cfg.to_hf()
    if cfg.architecture == "Qwen2ForCausalLM":  # Qwen2 reads sliding_window only with this flag
        out["use_sliding_window"] = cfg.sliding_window is not None
    name = dtype_name(dtype)
    return {**out, "torch_dtype": name, "dtype": name, "use_cache": True}


def tokenizer_config(manifest: ModelManifest) -> dict[str, Any]:
    """``tokenizer_config.json``: a plain fast tokenizer over ``tokenizer.json`` (not the
    architecture's own class, which may add a BOS the packed model does not), its special tokens
    and chat template."""
    tok = manifest.tokenizer
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": manifest.config.max_position_embeddings,
    }
    if tok.bos_token:
        out["bos_token"] = tok.bos_token
    if tok.eos_token:
        out["eos_token"] = tok.eos_token
        out["pad_token"] = tok.eos_token  # batched generate needs one; ours pads nothing
    if tok.chat_template:
        out["chat_template"] = tok.chat_template
    return out


def generation_config(manifest: ModelManifest) -> dict[str, Any]:
    """``generation_config.json``: the BOS and EOS ids (vLLM and ``generate`` stop on them)."""
    cfg = manifest.config
    eos = list(manifest.tokenizer.eos_token_ids or cfg.eos_token_ids)
    out: dict[str, Any] = {}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Write ``tensors`` converted to ``dtype`` as one safetensors file, one tensor at a time;
    returns the file's size in bytes."""
    tag = SAFETENSORS_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * dtype.itemsize
        header[name] = {"dtype": tag, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN_BYTES)  # the format pads the header with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            data = t.detach().to(dtype).contiguous()
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def export_hf(packed_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              dtype: str | None = None) -> Path:
    """Write the packed model in ``packed_dir`` as a Hugging Face folder ``out_dir`` (created; must
    be absent or empty), weights in ``dtype`` (default: the packed dtype). ``config.json`` is
    written last. Raises CheckpointError (not a packed model, a corrupt block, ``out_dir`` not
    empty) and ConfigError (an unknown dtype)."""
    manifest = read_manifest(packed_dir)
    torch_dtype = parse_dtype(dtype or manifest.dtype)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output directory is not empty")
    tokenizer_json = read_tokenizer_json(packed_dir, manifest)
    weights = hf_state_dict(packed_dir, manifest)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, weights, torch_dtype)
    del weights
    (out / "tokenizer.json").write_text(tokenizer_json)
    for name, content in (("tokenizer_config.json", tokenizer_config(manifest)),
                          ("generation_config.json", generation_config(manifest)),
                          (CONFIG_FILE, hf_config(manifest, torch_dtype))):
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out


def exported_hf_dir(packed_dir: str | os.PathLike, cache_root: str | os.PathLike, *,
                    dtype: str | None = None) -> Path:
    """The Hugging Face export of ``packed_dir`` under ``cache_root`` (``<model id>-<dtype>``),
    exported on the first call only. Concurrent callers export once (a file lock); a failed export
    leaves nothing behind. Raises what ``export_hf`` raises."""
    manifest = read_manifest(packed_dir)
    name = f"{manifest.model_id}-{dtype_name(parse_dtype(dtype or manifest.dtype))}"
    return build_once(Path(cache_root) / name, lambda t: (t / CONFIG_FILE).is_file(),
                      lambda out: export_hf(packed_dir, out, dtype=dtype))


__all__ = ["export_hf", "exported_hf_dir", "generation_config", "hf_config", "hf_state_dict",
           "tokenizer_config", "unfuse_to_hf", "write_safetensors"]
