"""Test helpers: turn packed (fused) weights back into a transformers model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from faascale.engine.checkpoint import load_block, read_manifest
from faascale.engine.config import ModelConfig
from faascale.engine.model import merge_block_tensors


def unfuse_to_hf(cfg: ModelConfig, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused block tensors -> Hugging Face names (q/k/v and gate/up split again)."""
    sd = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["norm.weight"]}
    if "lm_head.weight" in w:
        sd["lm_head.weight"] = w["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "input_layernorm.weight"] = w[q + "input_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = w[q + "post_norm.weight"]
        for kind in ("weight", "bias"):
            if q + f"qkv.{kind}" in w:
                qw, kw, vw = w[q + f"qkv.{kind}"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
                sd[p + f"self_attn.q_proj.{kind}"] = qw
                sd[p + f"self_attn.k_proj.{kind}"] = kw
                sd[p + f"self_attn.v_proj.{kind}"] = vw
            if q + f"o.{kind}" in w:
                sd[p + f"self_attn.o_proj.{kind}"] = w[q + f"o.{kind}"]
            if q + f"gate_up.{kind}" in w:
                g, u = w[q + f"gate_up.{kind}"].chunk(2)
                sd[p + f"mlp.gate_proj.{kind}"] = g
                sd[p + f"mlp.up_proj.{kind}"] = u
            if q + f"down.{kind}" in w:
                sd[p + f"mlp.down_proj.{kind}"] = w[q + f"down.{kind}"]
    return {k: v.clone().float() for k, v in sd.items()}


def hf_model_from_packed(packed: Path):
    """A transformers CausalLM (fp32, eval) holding exactly the packed weights."""
    import transformers

    m = read_manifest(packed)
    weights = merge_block_tensors([load_block(packed, m, i) for i in range(m.num_blocks)])
    hf_cfg = m.config.to_hf()
    cls = getattr(transformers, m.config.architecture)
    config_cls = getattr(transformers, m.config.architecture.replace("ForCausalLM", "Config"))
    model = cls(config_cls(**hf_cfg)).eval()
    missing, unexpected = model.load_state_dict(unfuse_to_hf(m.config, weights), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if m.config.tie_word_embeddings:
        model.tie_weights()
    return model
