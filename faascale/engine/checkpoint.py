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
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any, Protocol

import torch

from faascale.engine.blockio import (DEFAULT_PIECE_BYTES, BlockId, algorithm_of, checksum,
                                    hasher_for, matches, piece_checksums, piece_count)
from faascale.engine.config import DTYPES, ConfigError, ModelConfig, dtype_name, parse_dtype

FORMAT = "faascale-blocks"
# 3: each block also lists its pieces' blake3 (``piece_bytes``, ``pieces``), so PipeCast forwards
# a verified piece before its block is complete; 2: blake3 checksums ("blake3:<hex>"); 1: sha256.
# All three are read (a block without pieces moves as one piece).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
ALIGN_BYTES = 64


class CheckpointError(Exception):
    """A packed model is missing, malformed or inconsistent with its manifest."""


class CorruptBlockError(CheckpointError):
    """A block's bytes do not match the manifest (checksum or size)."""

    def __init__(self, block_id: BlockId, reason: str) -> None:
        self.block_id, self.reason = block_id, reason
        super().__init__(f"block {block_id.index} of model {block_id.model_id!r} is corrupt: {reason}")

    def __reduce__(self) -> tuple:  # Ray ships exceptions between processes
        return (CorruptBlockError, (self.block_id, self.reason))


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlockInfo:
    index: int
    file: str
    layer_start: int  # first decoder layer in this block
    layer_end: int  # one past the last decoder layer
    has_embed: bool
    has_head: bool
    size_bytes: int
    checksum: str  # "blake3:<hex>" (or "sha256:<hex>" in format 1)
    tensors: dict[str, TensorInfo]
    piece_bytes: int = 0  # format 3: the block moves as pieces of this size (the last shorter)
    pieces: tuple[str, ...] = ()  # their tagged blake3, in order; () = one piece, the block

    def __post_init__(self) -> None:
        if self.pieces and len(self.pieces) != piece_count(self.size_bytes, self.piece_bytes):
            raise ValueError(f"block {self.index}: {len(self.pieces)} piece checksums for "
                             f"{self.size_bytes} bytes in pieces of {self.piece_bytes}")
        if any(algorithm_of(c) != "blake3" for c in self.pieces):
            raise ValueError(f"block {self.index}: piece checksums must be blake3")


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    checksum: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelManifest:
    """A packed model: architecture, tokenizer and its blocks. Immutable once written."""

    model_id: str
    name: str
    config: ModelConfig
    dtype: str
    blocks: tuple[BlockInfo, ...]
    tokenizer: TokenizerInfo
    source: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def total_bytes(self) -> int:
        return sum(b.size_bytes for b in self.blocks)

    def block_id(self, index: int) -> BlockId:
        return BlockId(self.model_id, index)

    def blocks_for_layers(self, layer_start: int, layer_end: int) -> list[BlockInfo]:
        return [b for b in self.blocks if b.layer_start < layer_end and b.layer_end > layer_start]

    def to_json(self) -> str:
        return json.dumps(_manifest_to_dict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelManifest":
        try:
            return _manifest_from_dict(json.loads(text))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"manifest.json is malformed: {exc}") from None


def _manifest_to_dict(m: ModelManifest) -> dict[str, Any]:
    return {
        "format": m.format,
        "format_version": m.format_version,
        "model_id": m.model_id,
        "name": m.name,
        "source": m.source,
        "dtype": m.dtype,
        "config": m.config.to_dict(),
        "tokenizer": {**m.tokenizer.__dict__, "eos_token_ids": list(m.tokenizer.eos_token_ids)},
        "blocks": [
            {**{k: v for k, v in b.__dict__.items() if k not in ("tensors", "pieces")},
             "pieces": list(b.pieces),
             "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                             "nbytes": t.nbytes} for n, t in b.tensors.items()}}
            for b in m.blocks
        ],
    }


def _manifest_from_dict(d: dict[str, Any]) -> ModelManifest:
    if d.get("format") != FORMAT:
        raise CheckpointError(f"manifest.json: format is {d.get('format')!r}, expected {FORMAT!r}")
    if d.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"manifest.json: format_version {d.get('format_version')} "
                              f"is not supported (this faascale reads {READABLE_VERSIONS})")
    tok = _v1_checksum(dict(d["tokenizer"]))
    tok["eos_token_ids"] = tuple(tok.get("eos_token_ids") or ())
    blocks = tuple(
        BlockInfo(**{**{k: v for k, v in _v1_checksum(b).items() if k != "tensors"},
                     "pieces": tuple(b.get("pieces") or ()),
                     "tensors": {n: TensorInfo(t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                                 for n, t in b["tensors"].items()}})
        for b in d["blocks"]
    )
    manifest = ModelManifest(
        model_id=d["model_id"], name=d["name"], config=ModelConfig.from_dict(d["config"]),
        dtype=d["dtype"], blocks=blocks, tokenizer=TokenizerInfo(**tok), source=d.get("source", ""),
    )
    problem = manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"manifest.json is not a valid packed model: {problem}")
    return manifest


# A name the manifest gives a file or directory: one path component that cannot climb out of
# (``..``), hide in (``.x``) or reach outside (``/``) the directory it is joined to.
SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_BLOCK_BYTES = 1 << 40


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_problem(m: ModelManifest) -> str | None:
    """Why ``m`` cannot be trusted as a packed model (None if it can): every name a manifest
    joins to a tier or cache directory must be a safe path component; files distinct; blocks
    numbered in order, covering the model's layers once; every tensor inside its block, with the
    byte count its dtype and shape imply. A manifest comes from disk, the object store or a peer:
    a crafted one must not write, map or link anything outside the directory it describes."""
    names = {"model_id": m.model_id, "name": m.name, "tokenizer.file": m.tokenizer.file}
    names |= {f"blocks[{i}].file": b.file for i, b in enumerate(m.blocks)}
    for field, value in names.items():
        if not isinstance(value, str) or not SAFE_COMPONENT.fullmatch(value):
            return f"{field} {str(value)[:80]!r} is not a plain file name ([A-Za-z0-9._-], " \
                   "starting with a letter or digit, at most 200)"
    files = [m.tokenizer.file] + [b.file for b in m.blocks]
    if len(set(files)) != len(files) or MANIFEST_FILE in files:
        return "two files of the model have one name (or one is named manifest.json)"
    if m.dtype not in DTYPES:
        return f"dtype {m.dtype!r} is not one of {sorted(DTYPES)}"
    if not m.blocks:
        return "no blocks"
    layer = 0
    for i, b in enumerate(m.blocks):
        where = f"blocks[{i}]"
        if not all(_int(v) for v in (b.index, b.layer_start, b.layer_end, b.size_bytes,
                                     b.piece_bytes)):
            return f"{where}: index, layers, size_bytes and piece_bytes must be integers"
        if b.index != i:
            return f"{where}: index is {b.index}"
        if (b.layer_start, b.layer_end >= b.layer_start) != (layer, True):
            return f"{where}: layers [{b.layer_start}, {b.layer_end}) do not follow layer {layer}"
        layer = b.layer_end
        if not 0 < b.size_bytes <= MAX_BLOCK_BYTES or b.piece_bytes < 0:
            return f"{where}: size_bytes {b.size_bytes} (or piece_bytes {b.piece_bytes}) is out " \
                   f"of range"
        for name, t in b.tensors.items():
            if t.dtype not in DTYPES or not all(_int(v) and v >= 0
                                                for v in (t.offset, t.nbytes, *t.shape)):
                return f"{where}: tensor {name[:80]!r} has a bad dtype, shape or range"
            count = 1
            for dim in t.shape:
                count *= dim
            if t.nbytes != count * DTYPES[t.dtype].itemsize or t.offset + t.nbytes > b.size_bytes:
                return f"{where}: tensor {name[:80]!r} ({t.nbytes} bytes at {t.offset}) does " \
                       f"not fit its shape or the block's {b.size_bytes} bytes"
    if layer != m.config.num_layers:
        return f"the blocks cover {layer} layers, the model has {m.config.num_layers}"
    return None


def _v1_checksum(d: dict[str, Any]) -> dict[str, Any]:
    """Format 1 stored a bare ``sha256`` hex field; format 2 an algorithm-tagged ``checksum``."""
    if "sha256" in d:
        d = {k: v for k, v in d.items() if k != "sha256"} | {"checksum": f"sha256:{d['sha256']}"}
    algorithm_of(d["checksum"])  # ValueError (a malformed manifest) for one we cannot verify
    return d


def verify_tokenizer(manifest: "ModelManifest", data: bytes, where: str) -> str:
    """``data`` decoded if it is the manifest's tokenizer; CheckpointError naming ``where`` if not."""
    if not matches(manifest.tokenizer.checksum, data)[0]:
        raise CheckpointError(f"{where}: tokenizer checksum does not match the manifest (corrupt)")
    return data.decode()


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


def verify_block(manifest: ModelManifest, index: int, buffer: memoryview | bytes | mmap.mmap) -> None:
    """Raise CorruptBlockError if ``buffer`` is not exactly block ``index`` (size, then checksum)."""
    info = manifest.blocks[index]
    view = memoryview(buffer)
    if view.nbytes != info.size_bytes:
        raise CorruptBlockError(manifest.block_id(index),
                                f"size {view.nbytes} bytes, expected {info.size_bytes} (truncated?)")
    ok, actual = matches(info.checksum, view)
    if not ok:
        raise CorruptBlockError(manifest.block_id(index),
                                f"checksum {actual[:23]}… does not match manifest {info.checksum[:23]}…")


def block_problem(manifest: ModelManifest, index: int, buffer: Any) -> str | None:
    """Why ``buffer`` is not block ``index`` (``verify_block``'s reason), or None if it is.

    Returned, not raised: a live traceback would keep verify_block's view of an mmap alive, and
    the mmap could not close.
    """
    try:
        verify_block(manifest, index, buffer)
    except CorruptBlockError as exc:
        return exc.reason
    return None


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
    "BlockInfo", "CheckpointError", "CorruptBlockError", "ModelManifest", "TensorInfo",
    "TokenizerInfo", "block_tensors", "copy_packed", "is_packed", "load_block", "map_block_file",
    "pack", "pack_hf_dir", "read_manifest", "read_tokenizer_json", "split_layers", "verify_block",
]
