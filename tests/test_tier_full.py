"""A full HOST tier (``/dev/shm``): blocks land in DISK instead, nothing is left half-written,
and the platform serves every request.

The block store's accounting says HOST has room (4 GiB by default), but its file system may not:
a tmpfs smaller than that (Docker's /dev/shm is 64 MiB), or one that other files filled. Its
``fallocate`` then fails with ENOSPC, and the block goes to DISK. The unit test makes HOST's
``fallocate`` fail; the platform test runs ``faascale up`` with its HOST tier on a real 512 KiB
tmpfs (``FAASCALE_SHM_DIR``: room for one block of tiny-llama's four) and its DISK tier on a
2 MiB one, under a steady stream of plain and streamed requests from a scale from zero, then
scales to two replicas; then a second model, for which neither tier has room, gets a clear 503
while the first keeps serving.
"""

from __future__ import annotations

import errno
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import require
from test_faults_actors import Load, counts
from test_platform import Platform, free_port, tiny_doc

from faascale.engine.checkpoint import read_manifest
from faascale.memory_tier import tier_files
from faascale.memory_tier.block_store import BlockStore, NoRoomError, RemoteBlocks
from faascale.memory_tier.local_store import LocalDirStore
from faascale.memory_tier.node import SHM_DIR_ENV, TierConfig
from faascale.memory_tier.packed import upload_packed
from faascale.memory_tier.policy import Tier

SHM_BYTES = 512 << 10  # one block of tiny-llama (345-412 KiB each) and the owner marks


def _store_whose_fallocate_fails(tiny_packed: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, fails: Any
                                 ) -> tuple[Any, tuple[Path, Path], BlockStore]:
    """A ``BlockStore`` (HOST ``tmp_path/shm``, DISK ``tmp_path/disk``) over a local object store
    holding ``tiny_packed``, where preallocating a file whose resolved path ``fails`` accepts
    raises ENOSPC. Returns the manifest, (host, disk) and the store."""
    store = LocalDirStore(tmp_path / "remote")
    manifest = read_manifest(tiny_packed)
    upload_packed(store, tiny_packed, "m")
    host, disk = tmp_path / "shm", tmp_path / "disk"
    tiers = BlockStore(host, disk, 1 << 30, 1 << 30, RemoteBlocks(lambda m: (store, "m")))
    real = tier_files.preallocate

    def preallocate(fd: int, size: int) -> None:
        if fails(Path(f"/proc/self/fd/{fd}").resolve()):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, size)

    monkeypatch.setattr(tier_files, "preallocate", preallocate)
    return manifest, (host, disk), tiers


def test_a_block_that_finds_no_room_in_hosts_file_system_lands_in_disk(
        tiny_packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOST's ``fallocate`` fails with ENOSPC for blocks 1 and 3: those land in DISK (verified,
    served from there), the others in HOST; the failed HOST reservations are released and no
    temporary file stays behind. Without the fallback the fetch raised ENOSPC."""
    host = tmp_path / "shm"
    manifest, _, tiers = _store_whose_fallocate_fails(
        tiny_packed, tmp_path, monkeypatch, lambda path: path.is_relative_to(host) and (
            "block-0001" in path.name or "block-0003" in path.name))
    results = tiers.fetch_model(manifest)
    tiers.wait_idle()
    where = [r.path.parent.parent.name for r in results]
    assert where == ["shm", "disk", "shm", "disk"], [str(r.path) for r in results]
    assert all(r.source.name == "REMOTE" for r in results)
    for r, b in zip(results, manifest.blocks):
        assert r.path.read_bytes() == (tiny_packed / b.file).read_bytes()
    assert tiers.host_full == 2
    stats = tiers.stats().tiers
    assert stats["HOST"].blocks == 2 and stats["HOST"].used_bytes == sum(
        b.size_bytes for b in manifest.blocks[::2])
    assert stats["DISK"].blocks == 4  # the HOST blocks' DISK copies, made in the background
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


DISK_BYTES = 2 << 20  # tiny-llama's four blocks (<= 1.65 MiB) and less than one more model


def test_a_block_that_finds_no_room_in_either_file_system_is_a_clear_error(
        tiny_packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 2 finds HOST's and DISK's file systems full: the fetch raises ``NoRoomError`` (an
    ENOSPC ``OSError``) naming the block, the model and DISK's directory; nothing of it stays
    reserved or half-written, the blocks that fitted stay served, and it is counted. With room
    again, the same fetch completes."""
    full = [True]
    manifest, (host, disk), tiers = _store_whose_fallocate_fails(
        tiny_packed, tmp_path, monkeypatch, lambda path: full[0] and "block-0002" in path.name)
    with pytest.raises(NoRoomError) as info:
        tiers.fetch_model(manifest)
    tiers.wait_idle()
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"block 2 of model {manifest.model_id!r}" in msg and str(disk) in msg, msg
    assert "HOST's file system and DISK's" in msg and "no room" in msg, msg
    left = [p for d in (host, disk) for p in d.rglob("*")
            if ".tmp" in p.name or "block-0002" in p.name]
    assert not left, left
    stats = tiers.stats()
    assert (stats.host_full, stats.disk_full) == (1, 1)
    held = {b.index for t in ("HOST", "DISK") for b in tiers._meta[getattr(Tier, t)]}
    assert 2 not in held and held <= {0, 1, 3}, held  # no reservation left behind
    full[0] = False
    results = tiers.fetch_model(manifest)  # room again: the fetch completes
    assert [r.path.read_bytes() for r in results] == [
        (tiny_packed / b.file).read_bytes() for b in manifest.blocks]


@contextmanager
def tmpfs(d: Path, size_bytes: int) -> Iterator[Path]:
    """A ``size_bytes`` tmpfs mounted on ``d`` (made if missing) while the block runs."""
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(d)], check=True)


@pytest.fixture()
def small_shm(tmp_path: Path) -> Iterator[Path]:
    """A ``SHM_BYTES`` tmpfs, mounted for the test."""
    with tmpfs(tmp_path / "shm", SHM_BYTES) as d:
        yield d


@pytest.mark.slow
def test_a_platform_whose_shm_is_full_serves_every_request(small_shm: Path,
                                                             tmp_path: Path) -> None:
    """The replicas' blocks go to DISK where HOST's tmpfs has no room; requests sent while the
    first replica starts from zero, and while a second one starts, are all answered with the
    engine's own tokens: sent = completed, failed 0, lost 0, duplicated 0. Then a model that
    fits in neither tier (DISK's file system is full too) gets a 503 naming the cause, within its
    bounds, while the first function's requests go on unharmed. The tmpfs's hold only complete
    blocks (no temporary file), and ``faascale down`` leaves HOST's empty."""
    p = Platform(tmp_path / "home", free_port())
    p.env[SHM_DIR_ENV] = str(small_shm)
    tiers = TierConfig.for_state_dir(p.home, p.env)
    host = Path(tiers.host_dir)
    assert host.parent == small_shm
    with tmpfs(Path(tiers.disk_dir), DISK_BYTES) as disk_fs:
        r = p.cli("up", "--port", str(p.port), timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        _serve_with_both_tiers_small(p, small_shm, disk_fs, host)
    assert not [f for f in small_shm.rglob("*")], list(small_shm.rglob("*"))


def _serve_with_both_tiers_small(p: Platform, small_shm: Path, disk_fs: Path, host: Path) -> None:
    try:
        name = "tiny-fullshm"
        p.deploy(tiny_doc(name, max_replicas=2))
        with Load(p, name) as load:  # from zero: the first requests wait for the start
            wait_until(lambda: load.done() >= 8, 180, lambda: load.results)
        c = counts(p, load.results)
        first = p.status(name)["cold_starts"]
        print(f"full /dev/shm, from zero: {dict(c)}; cold starts {[x['sources'] for x in first]}")
        assert (c["failed"], c["lost"], c["duplicated"]) == (0, 0, 0), (c, load.results[:2])
        assert [x["sources"] for x in first] == [{"REMOTE": 4}], first
        with Load(p, name, tag="second ") as more:
            r = p.cli("scale", name, "--min", "2")
            assert r.returncode == 0, r.stdout + r.stderr
            p.wait_replicas(name, lambda r: r["running"] == 2 and r["stopping"] == 0, 180)
            done = more.done()
            wait_until(lambda: more.done() >= done + 4, 60, lambda: more.results)
        c += counts(p, more.results)
        colds = [x["sources"] for x in p.status(name)["cold_starts"]]
        print(f"full /dev/shm, and a second start: {dict(c)}; cold starts {colds}")
        assert (c["failed"], c["lost"], c["duplicated"]) == (0, 0, 0), c
        assert c["completed"] == c["sent"] > 12, c

        files = [f for f in small_shm.rglob("*") if f.is_file() and not f.is_symlink()]
        assert not [f for f in files if ".tmp" in f.name], files  # nothing half-written
        blocks = [f for f in files if f.name.startswith("block-")]
        assert 0 < len(blocks) < 4, files  # what fit; the rest went to DISK
        assert all(f.is_relative_to(host) for f in blocks), blocks
        on_disk = {f.name for f in disk_fs.rglob("block-*.bin")}
        assert on_disk == {f"block-{i:04d}.bin" for i in range(4)}, on_disk
        (node,) = p.status(name)["nodes"].values()  # the fault was seen, and counted
        assert node["host_full"] >= 4 - len(blocks) and node["tiers"]["HOST"]["used_bytes"] == \
            sum(f.stat().st_size for f in blocks), node

        # A second model: HOST's file system is full and DISK's has room for at most one of its
        # blocks. Its start fails; the request gets a 503 that says why, in bounded time; the
        # first function serves on (its replicas map their blocks; nothing of theirs is evicted).
        full = "tiny-nospace"
        doc = tiny_doc(full, cold_start_timeout_s=120)
        doc["model"]["seed"] = 5  # other weights: nothing of it is on this node
        p.deploy(doc)
        with Load(p, name, tag="third ") as third:
            t0 = time.monotonic()
            with p.http() as h:
                refused = h.post(f"/v1/functions/{full}/invoke", json={"prompt": "x"})
            waited_s = time.monotonic() - t0
            done = third.done()
            wait_until(lambda: third.done() >= done + 4, 60, lambda: third.results)
        print(f"no room in HOST or DISK: {refused.status_code} after {waited_s:.1f} s: "
              f"{refused.text[:300]}")
        assert refused.status_code == 503, refused.text
        err = refused.json()["error"]
        assert err["type"] == "start_failed" and "no room" in err["message"], err
        assert "Traceback" not in err["message"] and len(err["message"]) < 600, err
        assert refused.headers.get("retry-after"), refused.headers
        assert waited_s < 60, waited_s
        c3 = counts(p, third.results)
        print(f"the first function meanwhile: {dict(c3)}")
        assert (c3["failed"], c3["lost"], c3["duplicated"]) == (0, 0, 0), c3
        assert c3["completed"] == c3["sent"] >= 4, c3
        (node,) = p.status(full)["nodes"].values()
        assert node["disk_full"] >= 1, node  # counted where an operator looks
        metrics = httpx.get(p.url + "/metrics", timeout=30).text
        no_room = re.search(r'faascale_tier_no_room_blocks\{node="[^"]+",tier="DISK"\} (\S+)',
                            metrics)
        assert no_room and float(no_room.group(1)) >= 1, metrics[-2000:]
        for fs in (small_shm, disk_fs):  # nothing half-written, in either tier
            assert not [f for f in fs.rglob("*") if ".tmp" in f.name], list(fs.rglob("*"))
        assert p.status(name)["replicas"]["running"] == 2  # nothing of the first was touched
    finally:
        down = p.cli("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr


def wait_until(pred: Any, timeout_s: float, what: Any) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)
