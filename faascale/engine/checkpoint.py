"""Blocked checkpoints: a model packed as ``manifest.json`` + ``tokenizer.json`` + one file per block.

A block is a contiguous group of decoder layers; block 0 also holds the token embeddings and the
last block also holds the final norm and the LM head (a copy of the embeddings when they are tied
and there is more than one block, so every block is self-contained and a pipeline stage never
needs another stage's file). Each block is one contiguous file whose tensors sit at 64-byte aligned
offsets, so a block moves as one buffer and maps zero-copy (mmap -> tensor views).

Tensor names inside blocks are ours, not Hugging Face's: q/k/v are fused into ``qkv`` and gate/up
into ``gate_up`` at pack time, so the engine runs one GEMM where transformers runs three, without
copying at load.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Protocol

import torch

from faascale.engine.blockio import DEFAULT_PIECE_BYTES, checksum, hasher_for, piece_checksums
from faascale.engine.config import ConfigError, ModelConfig, dtype_name, parse_dtype
from faascale.engine.manifest import (FORMAT_VERSION, MANIFEST_FILE, TOKENIZER_FILE, BlockInfo,
                                      CheckpointError, CorruptBlockError, ModelManifest,
                                      TensorInfo, TokenizerInfo, verify_block, verify_tokenizer)

ALIGN_BYTES = 64


# ---------------------------------------------------------------------------------------------
# Packing


class TensorSource(Protocol):
    """Tensors in Hugging Face naming (``model.layers.0.self_attn.q_proj.weight``), read lazily."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, name: str) -> torch.Tensor: ...


def split_layers(num_layers: int, num_blocks: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` layer ranges, sizes differing by at most one (earlier ones larger)."""
    if not 1 <= num_blocks <= num_layers:
        raise ConfigError(f"blocks: must be between 1 and the number of layers ({num_layers}), "
                          f"got {num_blocks}")
    base, extra = divmod(num_layers, num_blocks)
    ranges, start = [], 0
    for i in range(num_blocks):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _layer_tensors(cfg: ModelConfig, src: TensorSource, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    out = {
        f"layers.{i}.input_norm.weight": src[p + "input_layernorm.weight"],
        f"layers.{i}.qkv.weight": torch.cat([src[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        f"layers.{i}.o.weight": src[p + "self_attn.o_proj.weight"],
        f"layers.{i}.post_norm.weight": src[p + "post_attention_layernorm.weight"],
        f"layers.{i}.gate_up.weight": torch.cat([src[p + "mlp.gate_proj.weight"],
                                                 src[p + "mlp.up_proj.weight"]]),
        f"layers.{i}.down.weight": src[p + "mlp.down_proj.weight"],
    }
    if cfg.attention_bias:
        out[f"layers.{i}.qkv.bias"] = torch.cat([src[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        if cfg.architecture != "Qwen2ForCausalLM":
            out[f"layers.{i}.o.bias"] = src[p + "self_attn.o_proj.bias"]
    if cfg.mlp_bias:
        out[f"layers.{i}.gate_up.bias"] = torch.cat([src[p + "mlp.gate_proj.bias"],
                                                     src[p + "mlp.up_proj.bias"]])
        out[f"layers.{i}.down.bias"] = src[p + "mlp.down_proj.bias"]
    return out


def _block_tensors(cfg: ModelConfig, src: TensorSource, start: int, end: int, first: bool,
                   last: bool, num_blocks: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if first:
        out["embed.weight"] = src["model.embed_tokens.weight"]
    for i in range(start, end):
        out.update(_layer_tensors(cfg, src, i))
    if last:
        out["norm.weight"] = src["model.norm.weight"]
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = src["lm_head.weight"]
        elif num_blocks > 1:
            out["lm_head.weight"] = src["model.embed_tokens.weight"]
    return out


def _write_block(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype
                 ) -> tuple[int, str, dict[str, TensorInfo]]:
    index: dict[str, TensorInfo] = {}
    digest = hasher_for("blake3:")
    offset = 0
    with open(path, "wb") as f:
        for name, tensor in tensors.items():
            pad = (-offset) % ALIGN_BYTES
            if pad:
                f.write(b"\0" * pad)
                digest.update(b"\0" * pad)
                offset += pad
            t = tensor.detach().to(dtype).contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            f.write(raw)
            digest.update(raw)
            index[name] = TensorInfo(dtype_name(dtype), tuple(t.shape), offset, len(raw))
            offset += len(raw)
        f.flush()
        os.fsync(f.fileno())
    return offset, "blake3:" + digest.hexdigest(), index


def pack(out_dir: str | os.PathLike, *, name: str, config: ModelConfig, tensors: TensorSource,
         tokenizer_json: str, num_blocks: int, dtype: str = "float32", chat_template: str | None = None,
         bos_token: str | None = None, eos_token: str | None = None, add_bos_token: bool = False,
         source: str = "", progress: Callable[[int, int], None] | None = None,
         piece_bytes: int = DEFAULT_PIECE_BYTES) -> ModelManifest:
    """Write a packed model into ``out_dir`` (created; must be empty or absent).

    Each block's pieces of ``piece_bytes`` get their own checksum (0: none; the block then moves
    between nodes whole).
    ``tensors`` is read one block at a time, so peak memory is about one block. The manifest is
    written last and atomically: a directory with a manifest is a complete model.
    Raises ConfigError for a bad ``num_blocks``/``dtype`` and CheckpointError for missing tensors.
    """
    out = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    ranges = split_layers(config.num_layers, num_blocks)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tok_bytes = tokenizer_json.encode()
    (out / TOKENIZER_FILE).write_bytes(tok_bytes)
    blocks = []
    for idx, (start, end) in enumerate(ranges):
        try:
            block = _block_tensors(config, tensors, start, end, idx == 0, idx == num_blocks - 1,
                                   num_blocks)
        except KeyError as exc:
            raise CheckpointError(f"source checkpoint has no tensor {exc.args[0]!r}") from None
        fname = f"block-{idx:04d}.bin"
        size, sha, index = _write_block(out / fname, block, torch_dtype)
        blocks.append(BlockInfo(idx, fname, start, end, idx == 0, idx == num_blocks - 1,
                                size, sha, index, *_pieces_of(out / fname, piece_bytes)))
        if progress:
            progress(idx + 1, num_blocks)
    ident = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for b in blocks:
        ident.update(b.checksum.encode())
    ident.update(hashlib.sha256(tok_bytes).digest())
    manifest = ModelManifest(
        model_id=f"{name}-{ident.hexdigest()[:12]}", name=name, config=config, dtype=dtype_name(torch_dtype),
        blocks=tuple(blocks),
        tokenizer=TokenizerInfo(TOKENIZER_FILE, checksum(tok_bytes), chat_template,
                                bos_token, eos_token, add_bos_token, config.eos_token_ids),
        source=source,
    )
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out / MANIFEST_FILE)
    return manifest


def _pieces_of(path: Path, piece_bytes: int) -> tuple[int, tuple[str, ...]]:
    """(piece_bytes, piece checksums) of a block file; (0, ()) for no pieces."""
    if piece_bytes < 0:
        raise ConfigError(f"piece_bytes must be >= 0, got {piece_bytes}")
    size = path.stat().st_size
    if piece_bytes == 0 or size == 0:
        return 0, ()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return piece_bytes, piece_checksums(mm, piece_bytes)


def with_pieces(packed_dir: str | os.PathLike, piece_bytes: int = DEFAULT_PIECE_BYTES
                ) -> ModelManifest:
    """Rewrite a packed model's manifest with piece checksums of ``piece_bytes`` (0: none),
    hashing its block files (each first verified against its block checksum). The model id and
    the blocks stay as they are. Raises CheckpointError, CorruptBlockError."""
    manifest = read_manifest(packed_dir)
    blocks = []
    for b in manifest.blocks:
        map_block_file(packed_dir, manifest, b.index).close()  # verified before it is trusted
        size_pieces = _pieces_of(Path(packed_dir) / b.file, piece_bytes)
        blocks.append(dataclass_replace(b, piece_bytes=size_pieces[0], pieces=size_pieces[1]))
    out = dataclass_replace(manifest, blocks=tuple(blocks), format_version=FORMAT_VERSION)
    tmp = Path(packed_dir) / (MANIFEST_FILE + ".tmp")
    tmp.write_text(out.to_json())
    os.replace(tmp, Path(packed_dir) / MANIFEST_FILE)
    return out


# ---------------------------------------------------------------------------------------------
# Reading


def is_packed(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(packed_dir: str | os.PathLike) -> ModelManifest:
    """Parse ``manifest.json``; raises CheckpointError if absent or malformed."""
    p = Path(packed_dir) / MANIFEST_FILE
    if not p.is_file():
        raise CheckpointError(f"{packed_dir}: not a packed model (no {MANIFEST_FILE})")
    return ModelManifest.from_json(p.read_text())


def map_block_file(packed_dir: str | os.PathLike, manifest: ModelManifest, index: int,
                   verify: bool = True) -> mmap.mmap:
    """Map block ``index`` copy-on-write (pages load on touch; writes never reach the file).

    Raises CheckpointError if the file is missing and CorruptBlockError on a size or checksum
    mismatch (when ``verify``; the size is always checked).
    """
    info = manifest.blocks[index]
    path = Path(packed_dir) / info.file
    if not path.is_file():
        raise CheckpointError(f"block {index} of model {manifest.model_id!r}: file {path} is missing")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != info.size_bytes:
            raise CorruptBlockError(manifest.block_id(index),
                                    f"file is {size} bytes, expected {info.size_bytes} (truncated?)")
        if size == 0:
            return mmap.mmap(-1, 1)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if verify:
        verify_block(manifest, index, mm)
    return mm


def block_tensors(info: BlockInfo, buffer: Any) -> dict[str, torch.Tensor]:
    """Tensor views over ``buffer`` (mmap, bytearray, pinned host tensor's storage...); no copy.

    The tensors keep ``buffer`` alive. ``buffer`` must be writable (mmap ACCESS_COPY, bytearray)
    for torch to wrap it without a warning.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in info.tensors.items():
        dtype = parse_dtype(t.dtype)
        count = t.nbytes // dtype.itemsize
        if count == 0:
            out[name] = torch.empty(t.shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=t.offset).view(t.shape)
    return out


def load_block(packed_dir: str | os.PathLike, manifest: ModelManifest, index: int,
               verify: bool = True) -> dict[str, torch.Tensor]:
    """Map and verify block ``index``, returning its tensors as zero-copy views."""
    return block_tensors(manifest.blocks[index], map_block_file(packed_dir, manifest, index, verify))


def read_tokenizer_json(packed_dir: str | os.PathLike, manifest: ModelManifest) -> str:
    p = Path(packed_dir) / manifest.tokenizer.file
    if not p.is_file():
        raise CheckpointError(f"{packed_dir}: tokenizer file {manifest.tokenizer.file} is missing")
    return verify_tokenizer(manifest, p.read_bytes(), str(p))


# ---------------------------------------------------------------------------------------------
# Sources: Hugging Face safetensors directories


class SafetensorsDir:
    """A Hugging Face checkpoint directory (``*.safetensors`` + ``config.json``), read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        return self._where[name].get_tensor(name)

    def config(self) -> ModelConfig:
        p = self.path / "config.json"
        if not p.is_file():
            raise CheckpointError(f"{self.path}: config.json is missing")
        return ModelConfig.from_hf(json.loads(p.read_text()))


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def pack_hf_dir(src: str | os.PathLike, out_dir: str | os.PathLike, *, num_blocks: int,
                dtype: str | None = None, name: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> ModelManifest:
    """Pack a Hugging Face safetensors directory (with ``tokenizer.json``)."""
    src = Path(src)
    st = SafetensorsDir(src)
    cfg = st.config()
    hf_cfg = json.loads((src / "config.json").read_text())
    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{src}: tokenizer.json is missing (only fast tokenizers are supported)")
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    template = tok_cfg.get("chat_template")
    tmpl_file = src / "chat_template.jinja"
    if template is None and tmpl_file.is_file():
        template = tmpl_file.read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if dtype is None:
        dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            str(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")), "float32")
    return pack(out_dir, name=name or re.sub(r"[^a-z0-9-]+", "-", src.name.lower()).strip("-"),
                config=cfg, tensors=st, tokenizer_json=tok_path.read_text(), num_blocks=num_blocks,
                dtype=dtype, chat_template=template, bos_token=_token_content(tok_cfg.get("bos_token")),
                eos_token=_token_content(tok_cfg.get("eos_token")),
                add_bos_token=bool(tok_cfg.get("add_bos_token", False)), source=str(src),
                progress=progress)


def copy_packed(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a packed model directory file by file (manifest last)."""
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in [manifest.tokenizer.file] + [b.file for b in manifest.blocks]:
        shutil.copyfile(src / name, dst / name)
    shutil.copyfile(src / MANIFEST_FILE, dst / MANIFEST_FILE)


__all__ = [
    "block_tensors", "copy_packed", "is_packed", "load_block", "map_block_file", "pack",
    "pack_hf_dir", "read_manifest", "read_tokenizer_json", "split_layers", "with_pieces",
]
