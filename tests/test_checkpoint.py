"""Blocked checkpoints: layout, zero-copy mapping, integrity, Hugging Face directory packing."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace as dataclass_replace
from pathlib import Path

import pytest
import torch

from faascale.engine.checkpoint import (ALIGN_BYTES, load_block, map_block_file, pack_hf_dir,
                                        read_manifest, split_layers)
from faascale.engine.config import ConfigError, EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.manifest import CheckpointError, CorruptBlockError, manifest_problem
from faascale.engine.random_model import (byte_tokenizer_json, pack_random, random_hf_state_dict,
                                          tiny_config)
from faascale.engine.sampling import SamplingParams


def test_split_layers_is_contiguous_and_balanced() -> None:
    assert split_layers(30, 6) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)]
    assert split_layers(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_layers(5, 1) == [(0, 5)]
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="blocks: must be between 1 and the number of layers"):
            split_layers(8, bad)


def test_block_layout(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    assert m.num_blocks == 4 and m.model_id.startswith("tiny-llama-")
    first, last = m.blocks[0], m.blocks[-1]
    assert first.has_embed and "embed.weight" in first.tensors and "norm.weight" not in first.tensors
    assert last.has_head and {"norm.weight", "lm_head.weight"} <= set(last.tensors)
    assert [(b.layer_start, b.layer_end) for b in m.blocks] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for b in m.blocks:
        assert (tiny_packed / b.file).stat().st_size == b.size_bytes
        offsets = sorted((t.offset, t.nbytes) for t in b.tensors.values())
        assert all(o % ALIGN_BYTES == 0 for o, _ in offsets)
        assert all(a + n <= b2 for (a, n), (b2, _) in zip(offsets, offsets[1:]))  # no overlap
        layers = {int(n.split(".")[1]) for n in b.tensors if n.startswith("layers.")}
        assert layers == set(range(b.layer_start, b.layer_end))


def test_same_seed_same_model_id(tmp_path: Path) -> None:
    a = pack_random(tmp_path / "a", seed=3, num_blocks=2)
    b = pack_random(tmp_path / "b", seed=3, num_blocks=2)
    c = pack_random(tmp_path / "c", seed=4, num_blocks=2)
    assert a.model_id == b.model_id != c.model_id
    assert (tmp_path / "a" / "block-0001.bin").read_bytes() == (tmp_path / "b" / "block-0001.bin").read_bytes()


def test_blocks_map_zero_copy(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    mm = map_block_file(tiny_packed, m, 1)
    from faascale.engine.checkpoint import block_tensors

    tensors = block_tensors(m.blocks[1], mm)
    t = tensors["layers.2.qkv.weight"]
    info = m.blocks[1].tensors["layers.2.qkv.weight"]
    before = t[0, 0].item()
    mm[info.offset:info.offset + 4] = torch.tensor([42.0]).view(torch.uint8).numpy().tobytes()
    assert t[0, 0].item() == 42.0 != before  # the tensor is a view of the mapping, not a copy
    assert load_block(tiny_packed, m, 1)["layers.2.qkv.weight"][0, 0].item() == before  # COW


def test_tied_embeddings_copy_the_head_into_the_last_block(tmp_path: Path) -> None:
    cfg = tiny_config(tie_word_embeddings=True)
    m = pack_random(tmp_path / "tied", num_blocks=2, config=cfg)
    assert "lm_head.weight" in m.blocks[-1].tensors  # the last stage is self-contained
    one = pack_random(tmp_path / "one", num_blocks=1, config=cfg)
    assert "lm_head.weight" not in one.blocks[0].tensors  # one block: stored once, shared
    a = LLM.load(tmp_path / "tied").generate("hi", SamplingParams(max_tokens=8, temperature=0))
    b = LLM.load(tmp_path / "one").generate("hi", SamplingParams(max_tokens=8, temperature=0))
    assert a[0].token_ids == b[0].token_ids


def test_one_corrupt_byte_is_caught_naming_the_block(tiny_packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_packed, bad)
    m = read_manifest(bad)
    path = bad / m.blocks[2].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockError, match=r"block 2 of model 'tiny-llama-\w+' is corrupt: checksum blake3:") as err:
        LLM.load(bad)
    assert err.value.block_id.index == 2
    load_block(bad, m, 1)  # the other blocks are fine


def test_format_1_manifests_with_sha256_still_load_and_verify(tiny_packed: Path, tmp_path: Path) -> None:
    """Models packed before blake3 (format 1: bare sha256 fields) keep working, checks included."""
    import hashlib
    import json

    old = tmp_path / "v1"
    shutil.copytree(tiny_packed, old)
    d = json.loads((old / "manifest.json").read_text())
    d["format_version"] = 1
    for entry in [d["tokenizer"], *d["blocks"]]:
        del entry["checksum"]
        entry["sha256"] = hashlib.sha256((old / entry["file"]).read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(d))
    m = read_manifest(old)
    assert m.blocks[0].checksum.startswith("sha256:")
    p = SamplingParams(max_tokens=6, temperature=0)
    assert LLM.load(old).generate("hi", p)[0].token_ids == LLM.load(tiny_packed).generate("hi", p)[0].token_ids
    path = old / m.blocks[1].file
    data = bytearray(path.read_bytes())
    data[7] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockError, match="block 1 .*checksum sha256:"):
        LLM.load(old)


def test_pieces_are_listed_checked_and_added_to_older_packs(tiny_packed: Path,
                                                             tmp_path: Path) -> None:
    """Format 3: each block lists the blake3 of its pieces, which together are the block's bytes;
    a format 2 pack (no pieces) still reads (one piece per block) and ``with_pieces`` adds them
    without changing the model id; a piece list that does not fit the block is refused."""
    import blake3

    from faascale.engine.checkpoint import with_pieces
    from faascale.engine.manifest import FORMAT_VERSION

    m = read_manifest(tiny_packed)
    assert m.format_version == FORMAT_VERSION == 3
    old = tmp_path / "v2"
    shutil.copytree(tiny_packed, old)
    d = json.loads((old / "manifest.json").read_text())
    d["format_version"] = 2
    for entry in d["blocks"]:
        del entry["pieces"], entry["piece_bytes"]
    (old / "manifest.json").write_text(json.dumps(d))
    assert all(b.pieces == () for b in read_manifest(old).blocks)

    piece = 40_000  # not a power of two: the last piece of each block is shorter
    upgraded = with_pieces(old, piece)
    assert upgraded.model_id == m.model_id and read_manifest(old) == upgraded
    for b in upgraded.blocks:
        data = (old / b.file).read_bytes()
        assert b.piece_bytes == piece and len(b.pieces) == -(-len(data) // piece) > 1
        assert list(b.pieces) == ["blake3:" + blake3.blake3(data[o:o + piece]).hexdigest()
                                  for o in range(0, len(data), piece)]

    d = json.loads((old / "manifest.json").read_text())
    d["blocks"][1]["pieces"] = d["blocks"][1]["pieces"][:-1]
    (old / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="block 1: .* piece checksums for"):
        read_manifest(old)
    bad = old / m.blocks[2].file
    flipped = bytearray(bad.read_bytes())
    flipped[-1] ^= 0x01
    bad.write_bytes(bytes(flipped))
    (old / "manifest.json").write_text(upgraded.to_json())
    with pytest.raises(CorruptBlockError, match="block 2"):
        with_pieces(old, piece)  # a block is verified before its pieces are trusted


def test_truncated_and_missing_blocks(tiny_packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_packed, bad)
    m = read_manifest(bad)
    path = bad / m.blocks[3].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptBlockError, match=r"block 3 .*expected \d+ \(truncated\?\)"):
        load_block(bad, m, 3, verify=False)  # size is checked even without the checksum
    path.unlink()
    with pytest.raises(CheckpointError, match="block 3 .* is missing"):
        LLM.load(bad)


def test_bad_manifests_are_clear_errors(tmp_path: Path, tiny_packed: Path) -> None:
    with pytest.raises(CheckpointError, match="not a packed model"):
        read_manifest(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_packed, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        read_manifest(bad)
    d = json.loads((tiny_packed / "manifest.json").read_text())
    d["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_manifest(bad)


def _write_hf_dir(path: Path, cfg_overrides: dict, seed: int = 5) -> None:
    from safetensors.torch import save_file

    cfg = tiny_config(**cfg_overrides)
    path.mkdir()
    sd = random_hf_state_dict(cfg, seed)
    half = len(sd) // 2  # a sharded checkpoint: two files
    keys = list(sd)
    save_file({k: sd[k].to(torch.bfloat16) for k in keys[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k].to(torch.bfloat16) for k in keys[half:]}, str(path / "model-00002-of-00002.safetensors"))
    index = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (path / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}))
    (path / "tokenizer.json").write_text(byte_tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
        "eos_token": "<|im_end|>", "bos_token": {"content": "<|endoftext|>"}}))


def test_pack_hugging_face_dir_matches_transformers(tmp_path: Path) -> None:
    import transformers

    src = tmp_path / "Qwen2-Tiny"
    _write_hf_dir(src, dict(architecture="Qwen2ForCausalLM", attention_bias=True,
                            tie_word_embeddings=True, rope_scaling=None))
    m = pack_hf_dir(src, tmp_path / "packed", num_blocks=3)
    assert m.name == "qwen2-tiny" and m.dtype == "bfloat16"  # dtype follows the checkpoint
    assert m.tokenizer.chat_template and m.tokenizer.eos_token == "<|im_end|>"
    ours = LLM.load(tmp_path / "packed", EngineConfig(dtype="float32"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(0))
    from faascale.engine.model import ForwardBatch

    shard = ours.shards[0]
    got = shard.forward(ids, ForwardBatch((0,), (0,), 16), shard.new_kv_cache(1), all_logits=True)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (got - ref).abs().max() <= 1e-4


def test_pack_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        pack_hf_dir(tmp_path, tmp_path / "out", num_blocks=2)
    src = tmp_path / "m"
    _write_hf_dir(src, {})
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        pack_hf_dir(src, tmp_path / "out", num_blocks=2)


def test_corrupt_block_error_survives_pickling() -> None:
    import pickle

    from faascale.engine.blockio import BlockId

    err = pickle.loads(pickle.dumps(CorruptBlockError(BlockId("m-1", 3), "sha256 mismatch")))
    assert isinstance(err, CorruptBlockError) and err.block_id == BlockId("m-1", 3)
    assert str(err) == "block 3 of model 'm-1' is corrupt: sha256 mismatch"


def _tampered(packed: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``packed`` whose manifest.json ``edit(doc)`` changed."""
    out = tmp_path / "tampered"
    shutil.copytree(packed, out)
    doc = json.loads((out / "manifest.json").read_text())
    edit(doc)
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


def _set(path: str, value):
    def edit(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return edit


@pytest.mark.parametrize(("edit", "named"), [
    (_set("model_id", "../../escaped"), "model_id"),
    (_set("model_id", ".hidden"), "model_id"),
    (_set("blocks.1.file", "../block-0001.bin"), "blocks[1].file"),
    (_set("blocks.0.file", "/etc/passwd"), "blocks[0].file"),
    (_set("tokenizer.file", "sub/tokenizer.json"), "tokenizer.file"),
    (_set("blocks.1.file", "block-0000.bin"), "one name"),
    (_set("blocks.1.file", "manifest.json"), "one name"),
    (_set("blocks.1.index", 7), "blocks[1]: index is 7"),
    (_set("blocks.1.layer_start", 0), "do not follow layer"),
    (_set("blocks.0.size_bytes", 0), "out of range"),
    (lambda d: d["blocks"][0].update(size_bytes=1 << 50, pieces=[], piece_bytes=0),
     "out of range"),
    (_set("blocks.0.size_bytes", True), "must be integers"),
    (lambda d: d["blocks"].pop(), "the blocks cover"),
    (lambda d: d["blocks"][0]["tensors"]["embed.weight"].update(offset=1 << 30), "does not fit"),
    (lambda d: d["blocks"][0]["tensors"]["embed.weight"].update(nbytes=8), "does not fit"),
    (lambda d: d["blocks"][0]["tensors"]["embed.weight"].update(offset=-64), "bad dtype"),
    (lambda d: d["blocks"][0]["tensors"]["embed.weight"].update(dtype="int64"), "bad dtype"),
])
def test_a_manifest_that_could_reach_outside_its_directory_is_refused(
        tiny_packed: Path, tmp_path: Path, edit, named: str) -> None:
    bad = _tampered(tiny_packed, tmp_path, edit)
    with pytest.raises(CheckpointError, match="not a valid packed model") as err:
        read_manifest(bad)
    assert named in str(err.value)
    with pytest.raises(CheckpointError):
        LLM.load(bad)
    assert not (tmp_path / "escaped").exists()


def test_the_packed_manifest_itself_is_valid(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    assert manifest_problem(m) is None
    assert manifest_problem(dataclass_replace(m, dtype="int4")) == \
        "dtype 'int4' is not one of ['bfloat16', 'float16', 'float32']"
