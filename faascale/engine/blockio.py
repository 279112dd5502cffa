"""Block files without torch: block ids, tagged checksums and space preallocation.

Shared by the engine's checkpoints, the node's block store and its eviction policy, the object
store and the PipeCast agent, which starts in a fresh process per host and must not import torch
(2.4 s here).

A checksum is ``"<algorithm>:<hex>"``: ``blake3`` (format 2; all cores, 7.9 GB/s on this 2-core
VM against 1.8 GB/s for sha256, so verifying a block as it crosses a tier costs a fraction of
reading it, and still cryptographic) or ``sha256`` (format 1, still read).
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import blake3

ALGORITHMS = ("blake3", "sha256")
# A block moves between nodes as pieces of this size (format 3 lists each piece's blake3), so a
# node forwards a piece as soon as it has it: a hop costs a piece, not a block. 4 MiB is 34 ms at
# 1 Gbit/s; the scale-out benchmark's piece-size sweep is where it was chosen.
DEFAULT_PIECE_BYTES = 4 << 20


@dataclass(frozen=True, order=True)
class BlockId:
    """One block of a packed model: ``index`` 0 holds the embeddings, the last the final norm and
    LM head (``manifest.ModelManifest.block_id``)."""

    model_id: str
    index: int


def algorithm_of(tagged: str) -> str:
    """The algorithm of a tagged checksum; ValueError if it is not one we verify."""
    algorithm = tagged.partition(":")[0]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} in {tagged[:40]!r}")
    return algorithm


def hasher_for(expected: str) -> Any:
    """An incremental hasher (``update``, ``hexdigest``) of ``expected``'s algorithm; compare its
    result with ``tagged(expected, hasher.hexdigest())``. ValueError for an unknown algorithm."""
    if algorithm_of(expected) == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return hashlib.sha256()


def tagged(expected: str, hexdigest: str) -> str:
    """``hexdigest`` tagged with ``expected``'s algorithm."""
    return f"{algorithm_of(expected)}:{hexdigest}"


def checksum(data: Any) -> str:
    """The tagged blake3 checksum of ``data`` (bytes, bytearray, memoryview, mmap)."""
    return "blake3:" + blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


def matches(expected: str, data: Any) -> tuple[bool, str]:
    """Whether ``data`` has checksum ``expected`` (either algorithm); also the actual one."""
    hasher = hasher_for(expected)
    hasher.update(data)
    actual = tagged(expected, hasher.hexdigest())
    return actual == expected, actual


def piece_count(size_bytes: int, piece_bytes: int) -> int:
    """``len(piece_spans(size_bytes, piece_bytes))`` without listing them (a manifest's size is
    checked against its piece checksums before it is trusted)."""
    if piece_bytes <= 0 or size_bytes <= piece_bytes:
        return 1
    return -(-size_bytes // piece_bytes)


def piece_spans(size_bytes: int, piece_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each piece of a ``size_bytes`` block; one piece when ``piece_bytes``
    is 0 (a manifest without pieces) or the block is empty."""
    if piece_bytes <= 0 or size_bytes <= piece_bytes:
        return [(0, size_bytes)]
    return [(o, min(piece_bytes, size_bytes - o)) for o in range(0, size_bytes, piece_bytes)]


def piece_checksums(data: Any, piece_bytes: int) -> tuple[str, ...]:
    """The tagged blake3 of each piece of ``data`` (a block's bytes)."""
    view = memoryview(data).cast("B")
    return tuple("blake3:" + blake3.blake3(view[o:o + n]).hexdigest()
                 for o, n in piece_spans(view.nbytes, piece_bytes))


def preallocate(fd: int, size_bytes: int) -> None:
    """Reserve a file's space: a full tmpfs or disk fails here with ENOSPC, not later as SIGBUS in
    a mapping. A filesystem without fallocate gets a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.ftruncate(fd, size_bytes)
