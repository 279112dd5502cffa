"""One node's tiered cache of model blocks: HOST (shared memory), DISK (a cache directory), REMOTE.

Every replica on a node asks this store for its blocks; the store serves each from the fastest tier
holding it and leaves a copy in HOST, a file under ``/dev/shm`` that every replica on the node maps
zero-copy. DEVICE residency is the replicas' own tensors (CPU) or device copies (GPU): the store
tracks it as pins. Policies (keep-alive, eviction) are pure (``policy.py``); this module applies
them to files. Thread-safe; several callers asking for one block cause one fetch.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from faascale.engine.checkpoint import BlockId, CorruptBlockError, ModelManifest, verify_block
from faascale.memory_tier.policy import Resident, Tier, TierFullError, choose_evictions, expired_blocks

log = logging.getLogger(__name__)


class RemoteBlocks:
    """Where REMOTE blocks come from: ``locate(manifest) -> (object store, key prefix)``."""

    def __init__(self, locate: Callable[[ModelManifest], tuple[object, str]]) -> None:
        self.locate = locate

    def read_into(self, manifest: ModelManifest, index: int, buffer: memoryview) -> None:
        store, prefix = self.locate(manifest)
        store.get_into(f"{prefix.rstrip('/')}/{manifest.blocks[index].file}", buffer)  # type: ignore[attr-defined]


@dataclass
class _Meta:
    size_bytes: int
    last_used_s: float
    keep_alive_until_s: float
    pins: int = 0


@dataclass(frozen=True)
class FetchResult:
    """Where block ``block`` came from and the HOST (or DISK) file now holding it."""

    block: BlockId
    source: Tier
    path: Path


@dataclass
class TierStats:
    capacity_bytes: int
    used_bytes: int = 0
    blocks: int = 0


@dataclass
class StoreStats:
    tiers: dict[str, TierStats]
    hits: dict[str, int] = field(default_factory=dict)
    corrupt_dropped: int = 0
    evictions: int = 0


class BlockStore:
    """HOST and DISK tiers with capacities in bytes, over a REMOTE source. See module docstring."""

    def __init__(self, host_dir: Path, disk_dir: Path, host_capacity_bytes: int,
                 disk_capacity_bytes: int, remote: RemoteBlocks | None = None,
                 clock: Callable[[], float] = time.time, default_keep_alive_s: float = 300.0,
                 host_read_gbps: float = 10.0, disk_read_gbps: float = 2.0,
                 remote_read_gbps: float = 1.0) -> None:
        self.dirs = {Tier.HOST: Path(host_dir), Tier.DISK: Path(disk_dir)}
        self.capacity = {Tier.HOST: host_capacity_bytes, Tier.DISK: disk_capacity_bytes}
        self.remote = remote
        self.clock = clock
        self.default_keep_alive_s = default_keep_alive_s
        # Re-fetch cost estimates (s/byte) from the tier below, for the eviction policy.
        self._refetch_s_per_byte = {Tier.HOST: 1 / (disk_read_gbps * 1e9),
                                    Tier.DISK: 1 / (remote_read_gbps * 1e9)}
        self._meta: dict[Tier, dict[BlockId, _Meta]] = {Tier.HOST: {}, Tier.DISK: {}}
        self._lock = threading.RLock()
        self._inflight: dict[BlockId, Future[FetchResult]] = {}
        self.hits: Counter[str] = Counter()
        self.corrupt_dropped = 0
        self.evictions = 0
        for tier, d in self.dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            self._scan(tier)

    # ------------------------------------------------------------------ layout

    def _path(self, tier: Tier, block: BlockId) -> Path:
        return self.dirs[tier] / block.model_id / f"block-{block.index:04d}.bin"

    def _scan(self, tier: Tier) -> None:
        """Adopt blocks left by an earlier process (keep-alive restarts from now)."""
        now = self.clock()
        for model_dir in self.dirs[tier].iterdir():
            if not model_dir.is_dir():
                continue
            for f in model_dir.glob("block-*.bin"):
                block = BlockId(model_dir.name, int(f.stem.split("-")[1]))
                self._meta[tier][block] = _Meta(f.stat().st_size, now, now + self.default_keep_alive_s)

    # ------------------------------------------------------------------ queries

    def lookup(self, block: BlockId) -> Tier | None:
        """The fastest local tier holding ``block`` (None: only REMOTE, if anywhere). No mutation."""
        with self._lock:
            for tier in (Tier.HOST, Tier.DISK):
                if block in self._meta[tier]:
                    return tier
        return None

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = {t.name: TierStats(self.capacity[t], sum(m.size_bytes for m in metas.values()),
                                       len(metas)) for t, metas in self._meta.items()}
            return StoreStats(tiers, dict(self.hits), self.corrupt_dropped, self.evictions)

    # ------------------------------------------------------------------ fetch

    def fetch(self, manifest: ModelManifest, index: int, keep_alive_s: float | None = None,
              pin: bool = True) -> FetchResult:
        """Make block ``index`` of ``manifest`` local and return where it is (HOST if it fits).

        Mutates: copies the block up into HOST (and DISK when it came from REMOTE), evicting per
        the policy; pins it when ``pin`` (the caller unpins or demotes later). Concurrent calls
        for one block share one fetch. A copy crossing from DISK or REMOTE is checksummed; a
        corrupt DISK copy is dropped and re-fetched from REMOTE. Raises CorruptBlockError if the
        REMOTE copy is corrupt, the object store's StoreError if REMOTE is unreachable, and
        LookupError if no tier has the block.
        """
        block = manifest.block_id(index)
        with self._lock:
            future = self._inflight.get(block)
            owner = future is None
            if owner:
                future = self._inflight[block] = Future()
        if not owner:
            result = future.result()
        else:
            try:
                result = self._fetch(manifest, index, block)
                future.set_result(result)
            except BaseException as exc:
                future.set_exception(exc)
                raise
            finally:
                with self._lock:
                    self._inflight.pop(block, None)
        with self._lock:
            tier = Tier.HOST if result.path.is_relative_to(self.dirs[Tier.HOST]) else Tier.DISK
            meta = self._meta[tier].get(block)
            if meta is not None:
                now = self.clock()
                meta.last_used_s = now
                meta.keep_alive_until_s = now + (keep_alive_s if keep_alive_s is not None
                                                 else self.default_keep_alive_s)
                if pin:
                    meta.pins += 1
        return result

    def _fetch(self, manifest: ModelManifest, index: int, block: BlockId) -> FetchResult:
        size = manifest.blocks[index].size_bytes
        if self.lookup(block) is Tier.HOST:
            self.hits[Tier.HOST.name] += 1
            return FetchResult(block, Tier.HOST, self._path(Tier.HOST, block))
        data: bytearray | None = None
        source = Tier.DISK
        if self.lookup(block) is Tier.DISK:
            data = _read_file(self._path(Tier.DISK, block), size)
            try:
                verify_block(manifest, index, data)
            except CorruptBlockError as exc:
                log.warning("dropping corrupt DISK copy: %s", exc)
                self.corrupt_dropped += 1
                self._drop(Tier.DISK, block)
                data = None
        if data is None:
            if self.remote is None:
                raise LookupError(f"block {index} of {manifest.model_id!r} is in no tier")
            source = Tier.REMOTE
            data = bytearray(size)
            self.remote.read_into(manifest, index, memoryview(data))
            verify_block(manifest, index, data)  # a corrupt REMOTE copy is the caller's error
            self._store(Tier.DISK, block, data, missing_ok=True)
        self.hits[source.name] += 1
        if self._store(Tier.HOST, block, data, missing_ok=True):
            return FetchResult(block, source, self._path(Tier.HOST, block))
        # HOST is full of pinned blocks: serve from DISK (still local, still zero-copy mapped).
        if self.lookup(block) is not Tier.DISK:
            self._store(Tier.DISK, block, data, missing_ok=False)
        return FetchResult(block, source, self._path(Tier.DISK, block))

    def _store(self, tier: Tier, block: BlockId, data: bytearray, missing_ok: bool) -> bool:
        """Write ``data`` into ``tier`` after evicting per policy; False if it cannot fit."""
        size = len(data)
        with self._lock:
            if block in self._meta[tier]:
                return True
            try:
                victims = choose_evictions(tier, self._residents(tier), self.capacity[tier], size,
                                           self.clock())
            except TierFullError as exc:
                if missing_ok:
                    log.info("%s", exc)
                    return False
                raise
            for victim in victims:
                self._drop(tier, victim)
                self.evictions += 1
            now = self.clock()
            self._meta[tier][block] = _Meta(size, now, now + self.default_keep_alive_s)
        path = self._path(tier, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True

    def _residents(self, tier: Tier) -> list[Resident]:
        per_byte = self._refetch_s_per_byte[tier]
        return [Resident(b, m.size_bytes, m.last_used_s, m.keep_alive_until_s, m.pins > 0,
                         m.size_bytes * per_byte * (0.1 if tier is Tier.HOST and
                                                    b in self._meta[Tier.DISK] else 1.0))
                for b, m in self._meta[tier].items()]

    def _drop(self, tier: Tier, block: BlockId) -> None:
        with self._lock:
            self._meta[tier].pop(block, None)
        self._path(tier, block).unlink(missing_ok=True)

    # ------------------------------------------------------------------ lifecycle

    def unpin(self, block: BlockId) -> None:
        """Release one pin (a replica stopped mapping it). Unknown blocks are ignored."""
        with self._lock:
            for tier in (Tier.HOST, Tier.DISK):
                meta = self._meta[tier].get(block)
                if meta is not None and meta.pins > 0:
                    meta.pins -= 1
                    return

    def demote(self, manifest: ModelManifest, keep_alive_s: float) -> None:
        """A replica of this model retired: unpin its blocks and keep them warm in HOST for
        ``keep_alive_s`` (blocks stay mapped-able; nothing is copied or freed now)."""
        now = self.clock()
        with self._lock:
            for i in range(manifest.num_blocks):
                block = manifest.block_id(i)
                self.unpin(block)
                for tier in (Tier.HOST, Tier.DISK):
                    meta = self._meta[tier].get(block)
                    if meta is not None:
                        meta.keep_alive_until_s = max(meta.keep_alive_until_s, now + keep_alive_s)

    def evict(self, block: BlockId, tier: Tier) -> bool:
        """Drop ``block`` from ``tier`` unless pinned; True if it was dropped."""
        with self._lock:
            meta = self._meta[tier].get(block)
            if meta is None or meta.pins > 0:
                return False
            self._drop(tier, block)
            self.evictions += 1
            return True

    def sweep(self) -> list[BlockId]:
        """Free HOST blocks whose keep-alive expired (DISK keeps them: it is the cheap fallback)."""
        with self._lock:
            gone = expired_blocks(self._residents(Tier.HOST), self.clock())
            for block in gone:
                self._drop(Tier.HOST, block)
            self.evictions += len(gone)
        return gone


def _read_file(path: Path, size_bytes: int) -> bytearray:
    """The file's bytes in one preallocated buffer (readinto: no second copy, no resize).
    A file of another size is returned as read, and the checksum check reports it."""
    data = bytearray(size_bytes)
    with open(path, "rb", buffering=0) as f:
        n = f.readinto(data)
        if n != size_bytes or f.read(1):
            return bytearray(path.read_bytes())
    return data


def map_block(path: Path) -> mmap.mmap:
    """Map a tier file copy-on-write (zero-copy tensor views; writes never reach the file)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
