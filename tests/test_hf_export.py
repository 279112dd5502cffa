"""A packed model exported to a Hugging Face folder (``faascale.engine.hf_export``): packing it
again gives the same model, transformers loads it and computes our logits, its tokenizer encodes
and renders chats like ours, the CLI's ``export-hf``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faascale.engine.checkpoint import load_block, pack_hf_dir, read_manifest, read_tokenizer_json
from faascale.engine.config import ConfigError, EngineConfig
from faascale.engine.hf_export import (WEIGHTS_FILE, export_hf, exported_hf_dir, hf_state_dict,
                                       unfuse_to_hf)
from faascale.engine.llm import LLM
from faascale.engine.manifest import CheckpointError
from faascale.engine.model import ForwardBatch
from faascale.engine.random_model import pack_random, tiny_config
from faascale.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "llama3": dict(),  # Llama 3 RoPE scaling, GQA, untied head
    "qwen2-tied": dict(architecture="Qwen2ForCausalLM", attention_bias=True,
                       tie_word_embeddings=True, rope_scaling=None, rope_theta=1e6),
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=12, num_kv_heads=1,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama2-bias": dict(num_kv_heads=4, attention_bias=True, mlp_bias=True, rope_scaling=None),
}
TEXTS = ["hello world", "  two  spaces\nand a newline", "<|im_start|>user\nhi<|im_end|>",
         "ünïcödé ✓ 日本語 🙂", "0123456789 x=y+1;", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def _packed(tmp_path: Path, variant: str, num_blocks: int = 3) -> Path:
    out = tmp_path / f"packed-{variant}"
    pack_random(out, seed=7, num_blocks=num_blocks, config=tiny_config(**VARIANTS[variant]),
                name="tiny-llama")
    return out


def _all_tensors(packed: Path) -> dict[str, torch.Tensor]:
    m = read_manifest(packed)
    return {f"{i}:{k}": v for i in range(m.num_blocks) for k, v in load_block(packed, m, i).items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_then_pack_gives_the_same_model(tmp_path: Path, variant: str) -> None:
    packed = _packed(tmp_path, variant)
    hf = export_hf(packed, tmp_path / "hf")
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json", "generation_config.json", WEIGHTS_FILE, "tokenizer.json",
        "tokenizer_config.json"]
    again = pack_hf_dir(hf, tmp_path / "again", num_blocks=3, name="tiny-llama")
    first = read_manifest(packed)
    # Same config, same block bytes, same tokenizer: the content-addressed id is the same.
    assert again.config == first.config and again.dtype == first.dtype == "float32"
    assert again.tokenizer == first.tokenizer
    assert [b.checksum for b in again.blocks] == [b.checksum for b in first.blocks]
    assert again.model_id == first.model_id
    a, b = _all_tensors(packed), _all_tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_are_stored_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    packed = _packed(tmp_path, "qwen2-tied")
    assert "lm_head.weight" in read_manifest(packed).blocks[-1].tensors  # the last block's copy
    hf = export_hf(packed, tmp_path / "hf")
    with safe_open(str(hf / WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    assert "model.layers.0.self_attn.q_proj.bias" in names  # Qwen2's q/k/v bias, split back
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_export_in_another_dtype(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama3")
    hf = export_hf(packed, tmp_path / "hf", dtype="bfloat16")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    saved = load_file(str(hf / WEIGHTS_FILE))
    ref = hf_state_dict(packed)
    assert saved.keys() == ref.keys()
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], ref[k].to(torch.bfloat16))
               for k in ref)
    assert pack_hf_dir(hf, tmp_path / "again", num_blocks=2).dtype == "bfloat16"


def test_unfuse_names_every_hf_tensor_once(tmp_path: Path) -> None:
    from faascale.engine.random_model import random_hf_state_dict

    cfg = tiny_config(**VARIANTS["llama2-bias"])
    packed = _packed(tmp_path, "llama2-bias", num_blocks=1)
    merged = load_block(packed, read_manifest(packed), 0)
    ref = random_hf_state_dict(cfg, seed=7)
    ours = unfuse_to_hf(cfg, merged)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", ["llama3", "qwen2-tied", "mistral"])
def test_transformers_loads_the_export_and_computes_our_logits(tmp_path: Path, variant: str) -> None:
    import transformers

    packed = _packed(tmp_path, variant)
    hf_dir = export_hf(packed, tmp_path / "hf")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.float32
    llm = LLM.load(packed, EngineConfig())
    vocab = llm.manifest.config.vocab_size
    ids = torch.randint(0, vocab, (1, 20), generator=torch.Generator().manual_seed(3))
    shard = llm.shards[0]
    ours = shard.forward(ids, ForwardBatch((0,), (0,), 20), shard.new_kv_cache(1), all_logits=True)[0]
    with torch.no_grad():
        ref = model.eval()(ids).logits[0]
    assert ref.abs().max() > 1.0
    assert (ours - ref).abs().max() <= 1e-4


def _tokenizers(packed: Path, hf_dir: Path):
    import transformers

    m = read_manifest(packed)
    return Tokenizer(read_tokenizer_json(packed, m), m.tokenizer), \
        transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_the_exported_tokenizer_encodes_and_renders_like_ours(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama3")
    ours, theirs = _tokenizers(packed, export_hf(packed, tmp_path / "hf"))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
    assert theirs.eos_token == ours.info.eos_token and theirs.bos_token == ours.info.bos_token
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 256, "eos_token_id": 258}


def test_exported_hf_dir_exports_once_per_dtype(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama3")
    a = exported_hf_dir(packed, tmp_path / "cache")
    mtime = (a / WEIGHTS_FILE).stat().st_mtime_ns
    assert exported_hf_dir(packed, tmp_path / "cache") == a
    assert (a / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    b = exported_hf_dir(packed, tmp_path / "cache", dtype="bf16")
    assert b != a and b.name.endswith("-bfloat16") and a.name.endswith("-float32")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == \
        sorted([a.name, b.name])


def test_bad_input_raises_typed_errors(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(packed, tmp_path / "full")
    with pytest.raises(CheckpointError, match="not a packed model"):
        export_hf(tmp_path / "full", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown dtype"):
        export_hf(packed, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_cli_export_hf(tmp_path: Path) -> None:
    packed = _packed(tmp_path, "llama3")
    env = {**os.environ, "FAASCALE_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "faascale.cli", "export-hf", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)

    ok = cli(str(packed), str(tmp_path / "hf"), "--dtype", "bfloat16")
    assert ok.returncode == 0, ok.stderr
    assert "exported tiny-llama" in ok.stdout and (tmp_path / "hf" / "config.json").is_file()
    for args, message in [((str(packed), str(tmp_path / "hf")), "not empty"),
                          (("/does/not/exist", str(tmp_path / "x")), "does not exist"),
                          ((str(packed), str(tmp_path / "y"), "--dtype", "int8"), "unknown dtype")]:
        bad = cli(*args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        last = bad.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last


@pytest.mark.slow
def test_smollm2_export_matches_our_engine_and_tokenizer(tmp_path: Path, smollm2_packed: Path,
                                                         smollm2_llm: LLM) -> None:
    import transformers

    hf_dir = export_hf(smollm2_packed, tmp_path / "hf")
    ours_tok, theirs_tok = _tokenizers(smollm2_packed, hf_dir)
    for text in TEXTS + ["The capital of France is"]:
        assert theirs_tok(text)["input_ids"] == ours_tok.encode(text), text
    chat = theirs_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == ours_tok.apply_chat_template(MESSAGES)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([ours_tok.encode(chat)])
    shard = smollm2_llm.shards[0]
    n = ids.shape[1]
    ours = shard.forward(ids, ForwardBatch((0,), (0,), n), shard.new_kv_cache(1), all_logits=True)[0]
    with torch.no_grad():
        ref = model(ids).logits[0]
    assert (ours - ref).abs().max() <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
