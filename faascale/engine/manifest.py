"""A packed model's manifest (``manifest.json``), without torch: a fast-starting process (the
tokenizer, an agent, a policy) reads it without importing the engine.

``ModelManifest`` (the architecture, the tokenizer, the blocks: each one's layers, size, checksum,
pieces and tensor ranges), its JSON round trip (formats 1-3 read, 3 written), ``manifest_problem``
(why a manifest from disk, a store or a peer cannot be trusted) and the checks of bytes against it
(``verify_block``, ``block_problem``, ``verify_tokenizer``). Parsing a manifest's ``ModelConfig``
imports ``engine.config`` (torch) at call time only. Packing and loading: ``checkpoint.py``.
"""

from __future__ import annotations

import json
import mmap
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from faascale.engine.blockio import BlockId, algorithm_of, matches, piece_count

if TYPE_CHECKING:
    from faascale.engine.config import ModelConfig

FORMAT = "faascale-blocks"
# 3: each block also lists its pieces' blake3 (``piece_bytes``, ``pieces``), so PipeCast forwards
# a verified piece before its block is complete; 2: blake3 checksums ("blake3:<hex>"); 1: sha256.
# All three are read (a block without pieces moves as one piece).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


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
        except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
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
    from faascale.engine.config import ModelConfig  # torch: only once a manifest is parsed

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
    from faascale.engine.config import DTYPES  # torch: only once a manifest is checked

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

