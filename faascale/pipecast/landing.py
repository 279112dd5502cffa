"""The agent's block files: received blocks landed in preallocated, mapped part files and verified
before the rename into place; local-tier blocks copied and hashed; block files mapped read-only for
zero-copy sends."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faascale.engine.blockio import hasher_for, preallocate
from faascale.pipecast.plan_io import BlockCatalog, BlockFile
from faascale.pipecast.transport import Header

COPY_CHUNK_BYTES = 16 << 20  # local loads read in chunks: one syscall per 16 MiB, little memory
PART_SUFFIX = ".part"
# Part files made ahead and not yet receiving hold at most this much (one block always may be):
# fresh pages cost CPU to allocate and clear, and a whole model's worth made at once, at the
# plan, took that CPU from the loads that come first (from zero, four members on this
# project's 2-core VM: first servable 12-20 s, against 3.5-3.7 s with this bound). Making a
# part (~1 GB/s here) is ~7x faster than a 1 Gbit link fills it: two blocks ahead are enough.
AHEAD_BYTES = 128 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: page tables filled in one call
log = logging.getLogger(__name__)


class Refused(Exception):
    """A frame or file refused before use. ``corrupt``: its bytes are not the block."""

    def __init__(self, why: str, block: int | None = None, sender: str = "",
                 corrupt: bool = False, piece: int = 0) -> None:
        super().__init__(why)
        self.block, self.sender, self.corrupt, self.piece = block, sender, corrupt, piece


class Unlanded(Exception):
    """Block ``block``'s part file could not be made (ENOSPC, EDQUOT, EIO...): the block is lost
    on this node (nothing of it is left behind); the receive goes on with the others."""

    def __init__(self, why: str, block: int) -> None:
        super().__init__(why)
        self.block = block


@dataclass
class Landing:
    """Part files of blocks being received: preallocated, mapped, filled piece by piece (each
    verified as it lands), renamed into place once complete. The receive thread lands; the part
    files may be made ahead by ``prepare`` (before the plan runs) or by a thread of its own
    (``prepare_ahead``, while earlier blocks land); a block's part is made once, whichever comes
    first, and one whose first piece comes before its turn is made by the receive thread. A
    forwarding sender reads the part file through its own mapping (``source``), never these."""

    dir: Path
    catalog: BlockCatalog
    parts: dict[int, mmap.mmap] = field(default_factory=dict)
    landed: dict[int, set[int]] = field(default_factory=dict)  # verified pieces per part
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _making: set[int] = field(default_factory=set, repr=False)  # part files being made now
    _settled: set[int] = field(default_factory=set, repr=False)  # put in place or given up
    _closed: bool = field(default=False, repr=False)
    _ahead: threading.Thread | None = field(default=None, repr=False)
    _started: set[int] = field(default_factory=set, repr=False)  # a frame of it was opened
    _made_ahead: dict[int, int] = field(default_factory=dict, repr=False)  # not started: bytes

    def part_path(self, block: int) -> Path:
        return self.dir / (self.catalog.blocks[block].file + PART_SUFFIX)

    def open(self, header: Header) -> Any:
        """``recv``'s ``into``: where piece ``header.meta['piece']`` (0 if absent) of block
        ``header.meta['index']`` goes, a view of the block's part file. Raises Refused for a
        frame that is not a piece of this model (``corrupt``: its size or digest is not the
        manifest's, so its bytes would not be the piece); Unlanded if its part file cannot be
        made (removed again)."""
        index, model = header.meta.get("index"), header.meta.get("model_id")
        piece = header.meta.get("piece", 0)
        if header.kind != "block" or model != self.catalog.model_id or type(index) is not int \
                or not 0 <= index < self.catalog.num_blocks:
            raise Refused(f"dropped a {header.kind} frame from {header.sender!r} for "
                           f"{model!r} block {index!r}: not a block of {self.catalog.model_id}")
        info = self.catalog.blocks[index]
        if type(piece) is not int or not 0 <= piece < info.num_pieces:
            raise Refused(f"block {index} from {header.sender!r}: no piece {piece!r} (it has "
                           f"{info.num_pieces})", index, header.sender, corrupt=True)
        offset, length = info.span(piece)
        if header.payload_bytes != length \
                or digest_matches(info.piece_checksum(piece), header.digest) is False:
            raise Refused(f"block {index} piece {piece} from {header.sender!r}: "
                           f"{header.payload_bytes} bytes, digest {header.digest.hex()[:16]}… "
                           f"(manifest: {length} bytes, {info.piece_checksum(piece)[:23]}…)",
                           index, header.sender, corrupt=True, piece=piece)
        if index not in self._started:  # its first frame: a part made ahead no longer waits
            with self._cond:
                self._started.add(index)
                if self._made_ahead.pop(index, None) is not None:
                    self._cond.notify_all()
        part = self.parts.get(index)  # a prepared (or earlier) part
        if part is None:
            try:
                part = self.prepare(index)
            except OSError as e:
                raise Unlanded(f"block {index} from {header.sender!r}: cannot make its part "
                               f"file: {e}", index) from e
        return memoryview(part)[offset:offset + length]

    def prepare(self, block: int) -> mmap.mmap:
        """Block ``block``'s part file: preallocated, mapped, its pages faulted in (made now, or
        waited for if ``prepare_ahead`` is making it). Raises OSError if it cannot be made (a
        full file system: nothing is left of it), or once the landing is closed."""
        part = self._make(block)
        if part is None:
            raise OSError(f"block {block}: the landing is closed or the block settled")
        return part

    def prepare_ahead(self, blocks: Sequence[int], ahead_bytes: int = AHEAD_BYTES) -> None:
        """Make the part files of ``blocks`` in this order on a thread of its own, while earlier
        blocks land: fresh pages cost time to allocate and fault in (0.6-0.7 s per 651 MB of
        tmpfs on this project's VM, idle), which the receive thread would otherwise spend
        between a block's first frame and its bytes. At most ``ahead_bytes`` of parts wait
        ahead (made, no frame of them opened yet, not settled); one always may. A block whose
        part cannot be made is left to the receive thread (which reports it); ``close`` stops
        the thread."""
        def run() -> None:
            for block in blocks:
                size = self.catalog.blocks[block].size_bytes
                with self._cond:
                    while not self._closed and self._made_ahead \
                            and sum(self._made_ahead.values()) + size > ahead_bytes:
                        self._cond.wait()
                    if self._closed:
                        return
                try:
                    self.prepare(block)
                except OSError as exc:
                    log.debug("block %d: no part file ahead (%s)", block, exc)
                    continue
                with self._cond:
                    if block not in self._started and block not in self._settled:
                        self._made_ahead[block] = size
        self._ahead = threading.Thread(target=run, daemon=True, name="landing-ahead")
        self._ahead.start()

    def _make(self, block: int) -> mmap.mmap | None:
        """The part's mapping, made here unless it exists or another thread makes it (then its
        result); None once closed or the block is settled."""
        with self._cond:
            while block in self._making:
                self._cond.wait()
            if self._closed or block in self._settled:
                return None
            if block in self.parts:
                return self.parts[block]
            self._making.add(block)
        size = self.catalog.blocks[block].size_bytes
        mapping = None
        try:
            with open(self.part_path(block), "w+b") as f:  # the mapping keeps its own fd
                preallocate(f.fileno(), size)
                mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        finally:
            with self._cond:
                self._making.discard(block)
                self._cond.notify_all()
                keep = mapping is not None and not self._closed and block not in self._settled
                if keep:
                    self.parts[block] = mapping
                    self.landed[block] = set()
            if not keep:
                if mapping is not None:
                    close_mapping(mapping)
                self.part_path(block).unlink(missing_ok=True)
        return mapping

    def land(self, block: int, piece: int) -> bool:
        """Piece ``piece`` of ``block`` is in its part file and verified (``open`` checked the
        frame's size and digest against the manifest, the transport the bytes against the
        digest). True once every piece of the block is."""
        got = self.landed.setdefault(block, set())
        got.add(piece)
        return len(got) == self.catalog.blocks[block].num_pieces

    def close(self) -> None:
        """Drop every part file not put in place (the thread making them ahead stops first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._ahead is not None:
            self._ahead.join()
        for block in list(self.parts):
            self.drop(block)

    def commit(self, block: int, sender: str) -> None:
        """Put a complete block in place. Its pieces were verified as they landed; a manifest
        that is not blake3 (packing format 1: one piece) is checked here by hashing the block.
        Raises Refused (corrupt: nothing put in place) or OSError."""
        info = self.catalog.blocks[block]
        with self._cond:
            part = self.parts.pop(block, None)
            self.landed.pop(block, None)
            self._settled.add(block)
            if self._made_ahead.pop(block, None) is not None:
                self._cond.notify_all()
        if part is None:  # a zero-byte payload: recv never called into()
            self.part_path(block).write_bytes(b"")
        algorithm, _, expected = info.checksum.partition(":")
        try:
            if part is None or (algorithm != "blake3" and not info.pieces):
                hasher = hasher_for(info.checksum)
                hasher.update(b"" if part is None else part)
                if info.size_bytes != (0 if part is None else len(part)) \
                        or hasher.hexdigest() != expected:
                    raise Refused(f"block {block} from {sender!r} does not match the "
                                   f"manifest's {algorithm}", block, sender, corrupt=True)
        except BaseException:
            self.part_path(block).unlink(missing_ok=True)
            raise
        finally:
            if part is not None:
                close_mapping(part)
        try:
            os.replace(self.part_path(block), self.dir / info.file)
        except OSError:
            self.part_path(block).unlink(missing_ok=True)
            raise

    def drop(self, block: int) -> None:
        """Give block ``block``'s part file up (its receive failed)."""
        with self._cond:
            part = self.parts.pop(block, None)
            self.landed.pop(block, None)
            self._settled.add(block)
            if self._made_ahead.pop(block, None) is not None:
                self._cond.notify_all()
        if part is not None:
            close_mapping(part)
        self.part_path(block).unlink(missing_ok=True)


@dataclass(frozen=True)
class PieceRef:
    """What a frame claims to carry: ``piece`` of ``block`` (None: not one of ours)."""

    block: int | None
    piece: int

    @classmethod
    def of(cls, header: Header) -> PieceRef:
        index, piece = header.meta.get("index"), header.meta.get("piece", 0)
        return cls(index if type(index) is int else None, piece if type(piece) is int else 0)


def close_mapping(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view of it is still alive somewhere: the GC unmaps it later
        pass


def digest_matches(checksum: str, digest: bytes) -> bool | None:
    """Whether a frame's blake3 digest (checked against its payload by the transport) is the
    manifest checksum; None if the manifest uses another algorithm (the bytes must be hashed)."""
    algorithm, _, hexdigest = checksum.partition(":")
    return digest.hex() == hexdigest if algorithm == "blake3" else None


def copy_verified(src: Path, dst: Path, info: BlockFile) -> None:
    """Copy a local-tier block file to ``dst`` through a part file, hashing it on the way; rename
    only if it matches the manifest. Raises OSError or Refused (corrupt or wrong size)."""
    part = dst.with_name(dst.name + PART_SUFFIX)
    expected = info.checksum.partition(":")[2]
    hasher = hasher_for(info.checksum)
    try:
        with open(src, "rb") as f, open(part, "wb") as out:
            if os.fstat(f.fileno()).st_size != info.size_bytes:
                raise Refused(f"{src} is not {info.size_bytes} bytes")
            buf = bytearray(min(COPY_CHUNK_BYTES, max(1, info.size_bytes)))
            view = memoryview(buf)
            while n := f.readinto(buf):
                hasher.update(view[:n])
                out.write(view[:n])
        if hasher.hexdigest() != expected:
            raise Refused(f"{src} does not match the manifest checksum", corrupt=True)
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def mapped(*paths: Path) -> Iterator[memoryview]:
    """A read-only view of a block file (zero copy for the transport): the first of ``paths``
    that exists (a block being received is read from its part file until it is renamed; a
    mapping outlives the rename). Raises FileNotFoundError if none does."""
    f = None
    for path in paths:
        try:
            f = open(path, "rb")
            break
        except FileNotFoundError:
            continue
    if f is None:
        raise FileNotFoundError(f"none of {[str(p) for p in paths]}")
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        # Page tables filled in one call: a block forwarded from this mapping would otherwise
        # take a page fault per 4 KiB (a quarter million per GB) on the sender's CPU.
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                       prot=mmap.PROT_READ)
    try:
        yield memoryview(mm)
    finally:  # after a failed send the transport's views may live on in a traceback
        close_mapping(mm)


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
