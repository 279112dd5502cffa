"""One node's tiered cache of model blocks: HOST (shared memory), DISK (a cache directory), REMOTE.

Every replica on a node asks this store for its blocks; the store serves each from the fastest tier
holding it, a file every replica on the node maps zero-copy, and leaves a copy in HOST (a file under
``/dev/shm``) behind the load, in the background: once no fetch is in flight (at most
``COPY_DEFER_MAX_S``), at nice 19, so it never takes CPU from a load a replica waits for (15 % of
a node's CPU during a store load here). DEVICE residency is the replicas' own tensors (CPU) or
device copies (GPU): the store tracks it as pins. Policies (keep-alive, eviction) are pure
(``policy.py``); this module applies them to files (``tier_files.py`` writes, checks and maps
each file). Thread-safe; several callers asking for one block cause one fetch.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from faascale.engine.blockio import BlockId
from faascale.engine.manifest import ModelManifest
from faascale.memory_tier import tier_files
from faascale.memory_tier.policy import Resident, Tier, TierFullError, choose_evictions, expired_blocks

log = logging.getLogger(__name__)

COPY_DEFER_MAX_S = 30.0  # a background tier copy waits this long at most for fetches to end


class NoRoomError(OSError):
    """A block's file system has no room (ENOSPC, EDQUOT) in the last tier it could land in,
    whatever the tier's accounting said: the message names the block, the tier and what to do."""


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
    ready: bool = True  # False while its file is being written (reserved space, not servable)
    copying: bool = False  # the source of a background copy to the other tier: not evictable


@dataclass(frozen=True)
class FetchResult:
    """Where block ``block`` came from and the HOST (or DISK) file now holding it."""

    block: BlockId
    source: Tier
    path: Path


@dataclass(frozen=True)
class ModelCopy:
    """A complete copy of a model in one tier of this node (``BlockStore.model_copy``)."""

    tier: str  # HOST or DISK
    directory: Path  # block-NNNN.bin files
    pinned: bool  # a replica on this node maps it


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
    host_full: int = 0  # blocks landed in DISK because HOST's file system had no room
    disk_full: int = 0  # blocks that found no room in DISK's file system either (not landed)


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
        self._fetches_done = threading.Condition(self._lock)  # notified when _inflight shrinks
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="tier-copy",
                                          initializer=tier_files.lowest_cpu_priority)
        self._background: list[Future[None]] = []
        self.hits: Counter[str] = Counter()
        self.corrupt_dropped = 0
        self.evictions = 0
        self.host_full = 0  # blocks that went to DISK because HOST's file system was full
        self.disk_full = 0  # ... and that DISK's file system had no room for either
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
                meta = self._meta[tier].get(block)
                if meta is not None and meta.ready:
                    return tier
        return None

    def holds(self, block: BlockId, tier: Tier) -> bool:
        """Whether ``tier`` holds a complete copy of ``block`` (not one being written)."""
        with self._lock:
            meta = self._meta[tier].get(block)
            return meta is not None and meta.ready

    def model_copy(self, manifest: ModelManifest) -> ModelCopy | None:
        """Where this node holds a complete copy of the model: one tier holding every block
        (HOST first), its directory (files named as the packed model names them) and whether a
        replica maps it now (a block pinned). None without a complete copy in one tier."""
        with self._lock:
            for tier in (Tier.HOST, Tier.DISK):
                metas = [self._meta[tier].get(manifest.block_id(i))
                         for i in range(manifest.num_blocks)]
                if all(m is not None and m.ready for m in metas):
                    return ModelCopy(tier.name, self.dirs[tier] / manifest.model_id,
                                     any(m.pins > 0 for m in metas if m is not None))
        return None

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = {t.name: TierStats(self.capacity[t], sum(m.size_bytes for m in metas.values()),
                                       len(metas)) for t, metas in self._meta.items()}
            return StoreStats(tiers, dict(self.hits), self.corrupt_dropped, self.evictions,
                              self.host_full, self.disk_full)

    # ------------------------------------------------------------------ fetch

    def fetch(self, manifest: ModelManifest, index: int, keep_alive_s: float | None = None,
              pin: bool = True) -> FetchResult:
        """Make block ``index`` of ``manifest`` local and return where it is (HOST if it fits).

        Mutates: a REMOTE block is written straight into a HOST file (a DISK file if HOST is full
        of pinned blocks, or its file system has no room: ENOSPC) and verified there before it
        becomes visible; a DISK hit is verified in place and served from the DISK file. The copy
        into the other tier (REMOTE -> DISK, DISK -> HOST) is made in the background
        (``wait_idle`` waits for it). Evicts per the policy; pins the block when ``pin`` (the
        caller unpins or demotes later). Concurrent calls for one block share one fetch. A
        corrupt DISK copy is dropped and re-fetched from REMOTE. Raises CorruptBlockError if the
        REMOTE copy is corrupt, the object store's StoreError if REMOTE is unreachable,
        TierFullError if neither HOST nor DISK can make room, and LookupError if no tier has the
        block.
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
                    self._fetches_done.notify_all()
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

    def fetch_model(self, manifest: ModelManifest, keep_alive_s: float | None = None,
                    parallel_blocks: int = 4) -> list[FetchResult]:
        """``fetch`` (pinned) of every block, ``parallel_blocks`` at a time; results in block order.

        Blocks in flight together overlap one block's network wait or disk read with another's
        checksum. Raises the first error any block raised (blocks already fetched stay pinned:
        the caller releases the model with ``demote``).
        """
        if parallel_blocks <= 1 or manifest.num_blocks <= 1:
            return [self.fetch(manifest, i, keep_alive_s) for i in range(manifest.num_blocks)]
        with ThreadPoolExecutor(min(parallel_blocks, manifest.num_blocks),
                                thread_name_prefix="fetch") as pool:
            return list(pool.map(lambda i: self.fetch(manifest, i, keep_alive_s),
                                 range(manifest.num_blocks)))

    def _fetch(self, manifest: ModelManifest, index: int, block: BlockId) -> FetchResult:
        # Critical path = the one pass the bytes need; tier copies happen behind it (background).
        if self.lookup(block) is Tier.HOST:
            self.hits[Tier.HOST.name] += 1
            return FetchResult(block, Tier.HOST, self._path(Tier.HOST, block))
        if self.lookup(block) is Tier.DISK:
            # Verifying the DISK file reads it into the page cache (one pipelined sequential read
            # and hash): the replica then maps those pages. The HOST copy is made later from them.
            path = self._path(Tier.DISK, block)
            problem = tier_files.check_file(manifest, index, path)
            if problem is None:
                self.hits[Tier.DISK.name] += 1
                self._copy_later(Tier.HOST, block, path)
                return FetchResult(block, Tier.DISK, path)
            log.warning("dropping corrupt DISK copy of block %d of %r: %s", index,
                        manifest.model_id, problem)
            self.corrupt_dropped += 1
            self._drop(Tier.DISK, block)
        if self.remote is None:
            raise LookupError(f"block {index} of {manifest.model_id!r} is in no tier")
        # REMOTE lands straight in a HOST file (DISK if HOST is full of pinned blocks): the
        # object store writes into its mapping, verified there before anyone can see it.
        size = manifest.blocks[index].size_bytes
        tier = Tier.HOST if self._reserve(Tier.HOST, block, size, missing_ok=True) else Tier.DISK
        if tier is Tier.DISK:
            self._reserve(Tier.DISK, block, size, missing_ok=False)  # TierFullError: no room anywhere
        try:
            path = self._land_remote(tier, manifest, index)
        except OSError as exc:
            if not _no_space(exc):
                raise
            if tier is Tier.DISK:  # HOST's accounting was full of pinned blocks
                raise self._no_room(manifest, index, exc, host_full=False) from exc
            # HOST's file system is fuller than its accounting says (a tmpfs smaller than the
            # capacity, other files in /dev/shm): this block lands in DISK instead.
            log.warning("no room in HOST for block %d of %r (%s); landing it in DISK", index,
                        manifest.model_id, exc)
            self.host_full += 1
            tier = Tier.DISK
            self._reserve(Tier.DISK, block, size, missing_ok=False)
            try:
                path = self._land_remote(tier, manifest, index)
            except OSError as disk_exc:
                if not _no_space(disk_exc):
                    raise
                raise self._no_room(manifest, index, disk_exc, host_full=True) from disk_exc
        self.hits[Tier.REMOTE.name] += 1
        if tier is Tier.HOST:
            self._copy_later(Tier.DISK, block, path)
        return FetchResult(block, Tier.REMOTE, path)

    def _no_room(self, manifest: ModelManifest, index: int, exc: OSError,
                 host_full: bool) -> "NoRoomError":
        """The error for a block whose DISK landing found its file system full."""
        self.disk_full += 1
        where = "HOST's file system and DISK's" if host_full else "DISK's file system"
        return NoRoomError(exc.errno or errno.ENOSPC, (
            f"no room on this node for block {index} of model {manifest.model_id!r} "
            f"({manifest.blocks[index].size_bytes} bytes): {where} ({self.dirs[Tier.DISK]}) "
            f"{'are' if host_full else 'is'} full ({exc.strerror or exc}); free space there or "
            f"give the tiers more room"))

    def _land_remote(self, tier: Tier, manifest: ModelManifest, index: int) -> Path:
        """``_land`` a reserved block from REMOTE; its reservation is released if that fails."""
        try:
            return self._land(tier, manifest, index,
                              lambda view: self.remote.read_into(manifest, index, view))  # type: ignore[union-attr]
        except BaseException:
            self._unreserve(tier, manifest.block_id(index))
            raise

    def _reserve(self, tier: Tier, block: BlockId, size: int, missing_ok: bool) -> bool:
        """Make room for ``block`` in ``tier`` (evicting per policy) and account it as not yet
        ready (invisible to lookup, never evicted). False, or TierFullError unless
        ``missing_ok``, if it cannot fit. False also if ``tier`` already holds it."""
        with self._lock:
            if block in self._meta[tier]:
                return False
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
            self._meta[tier][block] = _Meta(size, now, now + self.default_keep_alive_s, ready=False)
            return True

    def _unreserve(self, tier: Tier, block: BlockId) -> None:
        with self._lock:
            meta = self._meta[tier].get(block)
            if meta is not None and not meta.ready:
                del self._meta[tier][block]

    def _commit(self, tier: Tier, block: BlockId) -> None:
        with self._lock:
            meta = self._meta[tier].get(block)
            if meta is not None:
                meta.ready = True

    def _land(self, tier: Tier, manifest: ModelManifest, index: int,
              fill: Callable[[memoryview], object]) -> Path:
        """Create ``tier``'s file for a reserved block (``tier_files.write_verified``:
        preallocate, map, ``fill`` the mapping, verify it, rename into place), then commit it.
        Nothing is left behind on error (CorruptBlockError if the bytes are not the block)."""
        block = manifest.block_id(index)
        path = self._path(tier, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tier_files.write_verified(path, manifest, index, fill)
        self._commit(tier, block)
        return path

    def _copy_later(self, tier: Tier, block: BlockId, src: Path) -> None:
        """Copy a just-verified local file into ``tier`` in the background, if it fits there
        (a full tier only means no copy, logged). Space is reserved now, and the source stays
        unevictable until the copy is done, so the block never drops out of both tiers."""
        source_tier = Tier.DISK if tier is Tier.HOST else Tier.HOST
        size = src.stat().st_size
        if not self._reserve(tier, block, size, missing_ok=True):
            return
        self._set_copying(source_tier, block, True)

        def copy() -> None:
            with self._lock:  # behind every fetch in flight: the copy is not on anyone's path
                self._fetches_done.wait_for(lambda: not self._inflight, timeout=COPY_DEFER_MAX_S)
            path = self._path(tier, block)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp)  # sendfile: a kernel copy, no user-space page faults
                os.replace(tmp, path)
                self._commit(tier, block)
            except Exception as exc:  # the block stays where it is; the copy is an optimization
                tmp.unlink(missing_ok=True)
                self._unreserve(tier, block)
                log.warning("could not copy block %s to %s: %s", block, tier.name, exc)
            finally:
                self._set_copying(source_tier, block, False)

        with self._lock:
            self._background = [f for f in self._background if not f.done()]
            self._background.append(self._copier.submit(copy))

    def _set_copying(self, tier: Tier, block: BlockId, on: bool) -> None:
        with self._lock:
            meta = self._meta[tier].get(block)
            if meta is not None:
                meta.copying = on

    def wait_idle(self, timeout_s: float | None = None) -> None:
        """Wait until the background tier copies queued so far are done (tests, benchmarks)."""
        with self._lock:
            pending = list(self._background)
        for future in pending:
            future.result(timeout=timeout_s)

    def close(self) -> None:
        """Finish background copies and stop the copier thread."""
        self._copier.shutdown(wait=True)

    def _residents(self, tier: Tier) -> list[Resident]:
        per_byte = self._refetch_s_per_byte[tier]
        return [Resident(b, m.size_bytes, m.last_used_s, m.keep_alive_until_s, m.pins > 0 or not m.ready or m.copying,
                         m.size_bytes * per_byte * (0.1 if tier is Tier.HOST and
                                                    b in self._meta[Tier.DISK] else 1.0))
                for b, m in self._meta[tier].items()]

    def adopt(self, manifest: ModelManifest, index: int, path: Path,
              keep_alive_s: float | None = None) -> bool:
        """Put a verified block file made elsewhere on this node (PipeCast landed it in a
        replica's directory on the HOST file system) into HOST under a second name (a hard
        link: no copy, the replica's name stays valid), pinned. False if HOST holds it already
        (that copy is pinned instead) or has no room (nothing changes then). Raises OSError if ``path`` cannot be linked."""
        block, size = manifest.block_id(index), manifest.blocks[index].size_bytes
        with self._lock:
            held = self._meta[Tier.HOST].get(block)
            if held is not None:  # pinned for this replica all the same: release() balances it
                held.pins += 1
                return False
        if not self._reserve(Tier.HOST, block, size, missing_ok=True):
            return False
        dst = self._path(Tier.HOST, block)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            os.link(path, dst)
        except BaseException:
            self._unreserve(Tier.HOST, block)
            raise
        self._commit(Tier.HOST, block)
        with self._lock:
            meta = self._meta[Tier.HOST][block]
            meta.pins += 1
            meta.keep_alive_until_s = self.clock() + (keep_alive_s if keep_alive_s is not None
                                                      else self.default_keep_alive_s)
        return True

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
            if meta is None or meta.pins > 0 or not meta.ready or meta.copying:
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
