"""The tiered block store: keep-alive and eviction on a fake clock, integrity, races, tier full."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support import FakeClock as Clock

from faascale.engine.blockio import BlockId
from faascale.engine.checkpoint import read_manifest
from faascale.engine.manifest import CorruptBlockError
from faascale.memory_tier import block_store
from faascale.memory_tier.block_store import BlockStore, RemoteBlocks
from faascale.memory_tier.local_store import LocalDirStore
from faascale.memory_tier.packed import upload_packed
from faascale.memory_tier.policy import (Resident, Tier, TierFullError, choose_evictions,
                                         eviction_order)


def r(name: str, size: int = 100, used: float = 0.0, until: float = 1e9, pinned: bool = False,
      refetch: float = 1.0) -> Resident:
    return Resident(BlockId(name, 0), size, used, until, pinned, refetch)


# ----------------------------------------------------------------------------- pure policy

def test_eviction_prefers_expired_then_cheap_then_least_recent() -> None:
    now = 50.0
    residents = [r("fresh-expensive", refetch=9.0, used=1), r("fresh-cheap", refetch=1.0, used=2),
                 r("fresh-cheap-older", refetch=1.0, used=1), r("expired", until=10, refetch=9.0),
                 r("pinned", pinned=True, until=0)]
    order = [x.block.model_id for x in eviction_order(residents, now)]
    assert order == ["expired", "fresh-cheap-older", "fresh-cheap", "fresh-expensive"]


def test_choose_evictions_frees_just_enough() -> None:
    residents = [r("a", used=1), r("b", used=2), r("c", used=3)]
    assert choose_evictions(Tier.HOST, residents, 400, 100, 0) == []  # 100 free already
    assert [b.model_id for b in choose_evictions(Tier.HOST, residents, 300, 150, 0)] == ["a", "b"]


def test_pinned_blocks_are_never_evicted() -> None:
    residents = [r("a", pinned=True), r("b", pinned=True), r("c")]
    with pytest.raises(TierFullError, match="HOST tier is full: need 250 bytes, 100 free after "
                                            r"evicting everything unpinned \(200 bytes pinned\)"):
        choose_evictions(Tier.HOST, residents, 300, 250, 0)


# ----------------------------------------------------------------------------- the store

class CountingStore(LocalDirStore):
    """A real local object store that counts whole-object reads (to see single-flight)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0
        self._count_lock = threading.Lock()

    def get_into(self, key: str, buffer: memoryview) -> int:
        with self._count_lock:
            self.reads += 1
        return super().get_into(key, buffer)


@pytest.fixture()
def remote(tiny_packed: Path, tmp_path: Path) -> tuple[CountingStore, RemoteBlocks]:
    store = CountingStore(tmp_path / "remote")
    manifest = read_manifest(tiny_packed)
    upload_packed(store, tiny_packed, f"models/{manifest.model_id}")
    return store, RemoteBlocks(lambda m: (store, f"models/{m.model_id}"))


def make_store(tmp_path: Path, remote: RemoteBlocks, clock: Clock, host_bytes: int = 1 << 30,
               disk_bytes: int = 1 << 30) -> BlockStore:
    return BlockStore(tmp_path / "shm", tmp_path / "disk", host_bytes, disk_bytes, remote, clock)


def test_fetch_from_remote_then_host_hits(tmp_path: Path, tiny_packed: Path, remote) -> None:
    counting, blocks = remote
    m = read_manifest(tiny_packed)
    store = make_store(tmp_path, blocks, Clock())
    first = store.fetch(m, 1)
    assert first.source is Tier.REMOTE and store.lookup(m.block_id(1)) is Tier.HOST
    assert first.path.read_bytes() == (tiny_packed / m.blocks[1].file).read_bytes()
    again = store.fetch(m, 1)
    assert again.source is Tier.HOST and counting.reads == 1
    store.wait_idle()  # the DISK copy is written behind the load
    stats = store.stats()
    assert stats.hits == {"REMOTE": 1, "HOST": 1}
    assert stats.tiers["HOST"].used_bytes == stats.tiers["DISK"].used_bytes == m.blocks[1].size_bytes


def test_corrupt_disk_copy_is_dropped_and_refetched(tmp_path: Path, tiny_packed: Path, remote) -> None:
    counting, blocks = remote
    m = read_manifest(tiny_packed)
    clock = Clock()
    store = make_store(tmp_path, blocks, clock)
    store.fetch(m, 2, pin=False)
    store.wait_idle()
    assert store.evict(m.block_id(2), Tier.HOST)  # now only DISK (and REMOTE) hold it
    disk_file = tmp_path / "disk" / m.model_id / "block-0002.bin"
    data = bytearray(disk_file.read_bytes())
    data[100] ^= 0xFF
    disk_file.write_bytes(bytes(data))
    got = store.fetch(m, 2)
    assert got.source is Tier.REMOTE and store.stats().corrupt_dropped == 1
    assert got.path.read_bytes() == (tiny_packed / m.blocks[2].file).read_bytes()
    store.wait_idle()
    assert disk_file.read_bytes() == got.path.read_bytes()  # DISK holds a good copy again
    assert counting.reads == 2


def test_corrupt_remote_copy_is_an_error_not_a_model(tmp_path: Path, tiny_packed: Path, remote) -> None:
    counting, blocks = remote
    m = read_manifest(tiny_packed)
    key = f"models/{m.model_id}/{m.blocks[0].file}"
    counting.put(key, b"\0" * m.blocks[0].size_bytes)
    store = make_store(tmp_path, blocks, Clock())
    with pytest.raises(CorruptBlockError, match="block 0"):
        store.fetch(m, 0)
    assert store.lookup(m.block_id(0)) is None  # nothing corrupt was cached


def test_racing_replicas_cause_one_fetch(tmp_path: Path, tiny_packed: Path, remote) -> None:
    counting, blocks = remote
    m = read_manifest(tiny_packed)
    store = make_store(tmp_path, blocks, Clock())
    barrier = threading.Barrier(8)
    results = []

    def replica() -> None:
        barrier.wait()
        results.append(store.fetch(m, 3))

    threads = [threading.Thread(target=replica) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.reads == 1 and len({x.path for x in results}) == 1 and len(results) == 8


def test_keep_alive_and_sweep_on_a_fake_clock(tmp_path: Path, tiny_packed: Path, remote) -> None:
    _, blocks = remote
    m = read_manifest(tiny_packed)
    clock = Clock()
    store = make_store(tmp_path, blocks, clock)
    for i in range(m.num_blocks):
        store.fetch(m, i)
    store.wait_idle()
    store.demote(m, keep_alive_s=10)  # the replica retired: unpinned, warm for 10 s
    clock.now_s += 5
    assert store.sweep() == []
    clock.now_s += 295  # past the fetch's default keep-alive (300 s) too
    gone = store.sweep()
    assert sorted(gone) == [m.block_id(i) for i in range(m.num_blocks)]
    assert all(store.lookup(m.block_id(i)) is Tier.DISK for i in range(m.num_blocks))
    disk_hit = store.fetch(m, 0)
    assert disk_hit.source is Tier.DISK and disk_hit.path.is_relative_to(tmp_path / "disk")
    store.wait_idle()  # a DISK hit is copied back up to HOST behind the load
    assert store.lookup(m.block_id(0)) is Tier.HOST and store.fetch(m, 0).source is Tier.HOST


def test_full_host_tier_evicts_or_falls_back_to_disk(tmp_path: Path, tiny_packed: Path, remote) -> None:
    _, blocks = remote
    m = read_manifest(tiny_packed)
    sizes = [b.size_bytes for b in m.blocks]
    clock = Clock()
    store = make_store(tmp_path, blocks, clock, host_bytes=sizes[0] + sizes[1])
    store.fetch(m, 0)  # pinned
    store.fetch(m, 1, pin=False)
    store.wait_idle()  # until its DISK copy exists, a HOST block is not evictable (else lost)
    clock.now_s += 1
    third = store.fetch(m, 2)  # evicts the unpinned block 1, not the pinned block 0
    store.wait_idle()
    assert store.lookup(m.block_id(1)) is Tier.DISK and store.lookup(m.block_id(0)) is Tier.HOST
    assert sizes[2] == sizes[1] and third.path.is_relative_to(tmp_path / "shm")
    # HOST holds only pinned blocks and block 3 (with the LM head) is bigger than any of them:
    # it is served from DISK, never a crash.
    fourth = store.fetch(m, 3)
    assert fourth.path.is_relative_to(tmp_path / "disk")
    assert fourth.path.read_bytes() == (tiny_packed / m.blocks[3].file).read_bytes()


def test_a_block_is_not_evicted_while_its_only_other_copy_is_being_written(
        tmp_path: Path, tiny_packed: Path, remote, monkeypatch: pytest.MonkeyPatch) -> None:
    _, blocks = remote
    m = read_manifest(tiny_packed)
    gate = threading.Event()
    real_copy = block_store.shutil.copyfile

    def held_copy(src: Path, dst: Path) -> object:
        assert gate.wait(10)
        return real_copy(src, dst)

    monkeypatch.setattr(block_store.shutil, "copyfile", held_copy)
    store = make_store(tmp_path, blocks, Clock(), host_bytes=m.blocks[1].size_bytes)
    store.fetch(m, 1, pin=False)  # in HOST, unpinned; its DISK copy waits at the gate
    assert not store.evict(m.block_id(1), Tier.HOST)
    second = store.fetch(m, 2)  # HOST is full of a block being copied: lands in DISK instead
    assert second.path.is_relative_to(tmp_path / "disk")
    assert second.path.read_bytes() == (tiny_packed / m.blocks[2].file).read_bytes()
    gate.set()
    store.wait_idle()
    assert (tmp_path / "disk" / m.model_id / m.blocks[1].file).read_bytes() == \
        (tiny_packed / m.blocks[1].file).read_bytes()
    assert store.evict(m.block_id(1), Tier.HOST)  # now it has a DISK copy: evictable
    assert store.lookup(m.block_id(1)) is Tier.DISK


def test_tier_config_for_node_gives_every_node_its_own_directories(tmp_path) -> None:
    from faascale.memory_tier.node import TierConfig

    base = TierConfig(str(tmp_path / "host"), str(tmp_path / "disk"), 1 << 20, 2 << 20)
    a, b = base.for_node("198.18.0.3"), base.for_node("198.18.0.4")
    assert a.host_dir == str(tmp_path / "host" / "198.18.0.3")
    assert a.disk_dir == str(tmp_path / "disk" / "198.18.0.3")
    assert {a.host_dir, a.disk_dir}.isdisjoint({b.host_dir, b.disk_dir})
    assert (a.host_capacity_bytes, a.disk_capacity_bytes) == (1 << 20, 2 << 20)
    assert base.for_node("198.18.0.3") == a  # stable: a restarted node finds its DISK tier
    # An IPv6 address or a hostile name stays one directory below the base.
    odd = base.for_node("../x:y/z")
    assert Path(odd.host_dir).parent == tmp_path / "host" and "/" not in Path(odd.host_dir).name
    assert Path(base.for_node("..").host_dir).parent == tmp_path / "host"


def test_stage_model_puts_the_model_in_disk_only_and_a_start_reads_it_there(
        tmp_path: Path, tiny_packed: Path) -> None:
    """``NodeBlocks.stage_model`` (ServerlessLLM's ``sllm-store save``): every block in the
    node's DISK tier and none left in HOST, so the next replica's fetch is all DISK hits."""
    from faascale.memory_tier.node import NodeBlocks, TierConfig

    nb = NodeBlocks(TierConfig(str(tmp_path / "host"), str(tmp_path / "disk")).to_dict())
    manifest = read_manifest(tiny_packed)
    n = manifest.num_blocks
    assert nb.model_tiers(manifest.to_json()) == {"HOST": 0, "DISK": 0, "blocks": n}
    assert nb.stage_model(manifest.to_json(), str(tiny_packed)) == {"HOST": 0, "DISK": n,
                                                                     "blocks": n}
    assert len(list((tmp_path / "disk").rglob("*.bin"))) == n
    placed = nb.fetch_model(manifest.to_json(), str(tiny_packed), 10.0)
    assert [source for _, source in placed] == ["DISK"] * n
    assert nb.stats()["hits"] == {"REMOTE": n, "DISK": n}


def test_model_copy_names_the_one_tier_holding_every_block_and_whether_it_is_mapped(
        tmp_path: Path, tiny_packed: Path, remote) -> None:
    from faascale.pipecast.plan_io import BlockCatalog

    _, blocks = remote
    m = read_manifest(tiny_packed)
    store = make_store(tmp_path, blocks, Clock())
    assert store.model_copy(m) is None  # nothing here
    store.fetch(m, 0)
    assert store.model_copy(m) is None  # one block is not a copy
    store.fetch_model(m)
    store.wait_idle()
    copy = store.model_copy(m)
    assert copy is not None and copy.tier == "HOST" and copy.pinned  # a replica maps it
    assert copy.directory == tmp_path / "shm" / m.model_id
    catalog = BlockCatalog.of(m)  # files named as the packed model names them (a source's dir)
    assert all((copy.directory / b.file).stat().st_size == b.size_bytes for b in catalog.blocks)
    store.demote(m, keep_alive_s=10)
    store.unpin(m.block_id(0))  # the fetch of block 0 above pinned it twice
    assert store.model_copy(m).pinned is False
    assert store.evict(m.block_id(3), Tier.HOST)
    copy = store.model_copy(m)
    assert copy.tier == "DISK" and copy.directory == tmp_path / "disk" / m.model_id


def test_tier_copies_wait_until_no_fetch_is_in_flight(tmp_path: Path, tiny_packed: Path,
                                                       remote) -> None:
    """The DISK copy of a fetched block is written only once no fetch is in flight: it never
    competes with a load that a replica waits for."""
    counting, _ = remote
    m = read_manifest(tiny_packed)
    entered, gate = threading.Event(), threading.Event()

    class HeldStore:  # block 2's read waits at the gate; every other read goes through
        def get_into(self, key: str, buffer: memoryview) -> int:
            if key.endswith(m.blocks[2].file):
                entered.set()
                assert gate.wait(10)
            return counting.get_into(key, buffer)

    store = make_store(tmp_path, RemoteBlocks(lambda _m: (HeldStore(), f"models/{m.model_id}")),
                       Clock())
    disk_copy = tmp_path / "disk" / m.model_id / m.blocks[1].file
    held = threading.Thread(target=store.fetch, args=(m, 2))
    held.start()
    try:
        assert entered.wait(10)
        store.fetch(m, 1)  # landed in HOST; its DISK copy is queued behind block 2's fetch
        time.sleep(0.5)
        assert not [p for p in (tmp_path / "disk").rglob("*") if p.is_file()]  # no copy begun
    finally:
        gate.set()
    held.join(10)
    store.wait_idle(timeout_s=10)
    assert disk_copy.read_bytes() == (tiny_packed / m.blocks[1].file).read_bytes()
    assert store.lookup(m.block_id(1)) is Tier.HOST and store.lookup(m.block_id(2)) is Tier.HOST
    copier = next(t for t in threading.enumerate() if t.name.startswith("tier-copy"))
    stat = Path(f"/proc/self/task/{copier.native_id}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[16]) == 19  # nice: it gets only idle CPU
    store.close()
