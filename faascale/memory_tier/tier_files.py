"""A tier's block files, apart from the store's bookkeeping (``block_store.py``): a block written
into a tier file (``write_verified``: preallocated, its mapping populated in one call, filled,
verified, renamed into place), a tier file checked against its manifest block (``check_file``:
one sequential read, read ahead by a thread, hashed as it comes) and a tier file mapped
copy-on-write for zero-copy tensor views (``map_block``); the tier-copy thread's priority
(``lowest_cpu_priority``). Torch-free.

``BlockStore`` calls them through this module's attributes, so ``benchmarks/tiers.py`` times the
checksums by wrapping ``check_file`` and ``block_problem`` here.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from faascale.engine.blockio import hasher_for, preallocate, tagged
from faascale.engine.manifest import CorruptBlockError, ModelManifest, block_problem

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux
log = logging.getLogger(__name__)


def lowest_cpu_priority() -> None:
    """Run the calling thread at nice 19 (Linux: a thread's own priority): the tier copies it
    makes get the CPU nothing else wants and never slow a load, in this process or another."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed: copies still run
        log.debug("tier copies at normal priority: %s", exc)


def write_verified(path: Path, manifest: ModelManifest, index: int,
                   fill: Callable[[memoryview], object]) -> None:
    """Write block ``index`` of ``manifest`` as ``path``: a temporary file beside it,
    preallocated and mapped, ``fill``ed through the mapping, verified, then renamed into place.
    Nothing is left behind on error (CorruptBlockError if the bytes are not the block; OSError,
    e.g. ENOSPC; whatever ``fill`` raises)."""
    block, size = manifest.block_id(index), manifest.blocks[index].size_bytes
    tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w+b") as f:
            if size:
                preallocate(f.fileno(), size)
                # Pages allocated by fallocate, page tables filled in one call: writing
                # through a plain mapping took one fault per 4 KiB page (0.5 s per 650 MB
                # here, against 0.1 s to populate).
                with mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _MAP_POPULATE) as mm:
                    with memoryview(mm) as view:
                        fill(view)
                    problem = block_problem(manifest, index, mm)
            else:
                problem = block_problem(manifest, index, b"")
        if problem is not None:
            raise CorruptBlockError(block, problem)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_file(manifest: ModelManifest, index: int, path: Path) -> str | None:
    """Why ``path`` is not block ``index`` (size, checksum), or None if it is.

    One sequential pass: a reader thread ``readinto``s 8 MiB chunks (three reused buffers) while
    this thread hashes the previous one, so the disk read and the hash overlap. The file's pages
    stay in the page cache for the replica that maps it next. (Hashing through an mmap instead
    let page faults drive the reads: 1.3-1.5x slower with 4 blocks in flight here.)
    """
    info = manifest.blocks[index]
    try:
        size = path.stat().st_size
        if size != info.size_bytes:
            return f"file is {size} bytes, expected {info.size_bytes} (truncated?)"
        hasher = hasher_for(info.checksum)
        for chunk in _read_chunks(path, size):
            hasher.update(chunk)
    except OSError as exc:
        return f"unreadable: {exc}"
    actual = tagged(info.checksum, hasher.hexdigest())
    if actual != info.checksum:
        return f"checksum {actual[:23]}… does not match manifest {info.checksum[:23]}…"
    return None


_CHUNK_BYTES = 8 << 20


def _read_chunks(path: Path, size_bytes: int) -> Iterator[memoryview]:
    """The file's bytes in order, as views of reused buffers (each valid until the next one is
    taken), read ahead by one thread. Raises OSError if the file is shorter than ``size_bytes``."""
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(3):
        free.put(bytearray(_CHUNK_BYTES))
    filled: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()

    def read() -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                done = 0
                while done < size_bytes:
                    buf = free.get()
                    if not isinstance(buf, bytearray):
                        return  # the consumer gave up
                    n = f.readinto(buf)
                    if not n:
                        raise OSError(f"{path}: ends at {done} of {size_bytes} bytes")
                    filled.put((buf, n))
                    done += n
        except BaseException as exc:  # handed to the consumer
            filled.put(exc)

    reader = threading.Thread(target=read, name="tier-read", daemon=True)
    reader.start()
    done = 0
    try:
        while done < size_bytes:
            item = filled.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            with memoryview(buf) as view, view[:n] as chunk:
                yield chunk
            free.put(buf)
            done += n
    finally:
        free.put(None)  # type: ignore[arg-type]  # unblock a reader still waiting for a buffer
        reader.join()


def map_block(path: Path) -> mmap.mmap:
    """Map a tier file copy-on-write (zero-copy tensor views; writes never reach the file)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
