"""A full HOST tier (``/dev/shm``): blocks land in DISK instead, nothing is left half-written,
and the platform serves every request.

The block store's accounting says HOST has room (4 GiB by default), but its file system may not:
a tmpfs smaller than that (Docker's /dev/shm is 64 MiB), or one that other files filled. Its
``fallocate`` then fails with ENOSPC, and the block goes to DISK. The unit test makes HOST's
``fallocate`` fail; the platform test runs ``faascale up`` with its HOST tier on a real 512 KiB
tmpfs (``FAASCALE_SHM_DIR``: room for one block of tiny-llama's four), under a steady stream of
plain and streamed requests from a scale from zero, then scales to two replicas.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import require
from test_faults_actors import Load, counts
from test_platform import Platform, free_port, tiny_doc

from faascale.engine.checkpoint import read_manifest
from faascale.memory_tier import tier_files
from faascale.memory_tier.block_store import BlockStore, RemoteBlocks
from faascale.memory_tier.local_store import LocalDirStore
from faascale.memory_tier.node import SHM_DIR_ENV, TierConfig
from faascale.memory_tier.packed import upload_packed

SHM_BYTES = 512 << 10  # one block of tiny-llama (345-412 KiB each) and the owner marks


def test_a_block_that_finds_no_room_in_hosts_file_system_lands_in_disk(
        tiny_packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOST's ``fallocate`` fails with ENOSPC for blocks 1 and 3: those land in DISK (verified,
    served from there), the others in HOST; the failed HOST reservations are released and no
    temporary file stays behind. Without the fallback the fetch raised ENOSPC."""
    store = LocalDirStore(tmp_path / "remote")
    manifest = read_manifest(tiny_packed)
    upload_packed(store, tiny_packed, "m")
    host, disk = tmp_path / "shm", tmp_path / "disk"
    tiers = BlockStore(host, disk, 1 << 30, 1 << 30, RemoteBlocks(lambda m: (store, "m")))
    real = tier_files.preallocate

    def preallocate(fd: int, size: int) -> None:
        path = Path(f"/proc/self/fd/{fd}").resolve()
        if path.is_relative_to(host) and ("block-0001" in path.name or "block-0003" in path.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, size)

    monkeypatch.setattr(tier_files, "preallocate", preallocate)
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


@pytest.fixture()
def small_shm(tmp_path: Path) -> Iterator[Path]:
    """A ``SHM_BYTES`` tmpfs, mounted for the test."""
    d = tmp_path / "shm"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SHM_BYTES}", "tmpfs", str(d)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(d)], check=True)


@pytest.mark.slow
def test_a_platform_whose_shm_is_full_serves_every_request(small_shm: Path,
                                                             tmp_path: Path) -> None:
    """The replicas' blocks go to DISK where HOST's tmpfs has no room; requests sent while the
    first replica starts from zero, and while a second one starts, are all answered with the
    engine's own tokens: sent = completed, failed 0, lost 0, duplicated 0. The tmpfs holds only
    complete blocks (no temporary file), and ``faascale down`` leaves it empty."""
    p = Platform(tmp_path / "home", free_port())
    p.env[SHM_DIR_ENV] = str(small_shm)
    host = Path(TierConfig.for_state_dir(p.home, p.env).host_dir)
    assert host.parent == small_shm
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
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
        disk = TierConfig.for_state_dir(p.home, p.env).disk_dir
        on_disk = {f.name for f in Path(disk).rglob("block-*.bin")}
        assert on_disk == {f"block-{i:04d}.bin" for i in range(4)}, on_disk
        (node,) = p.status(name)["nodes"].values()  # the fault was seen, and counted
        assert node["host_full"] >= 4 - len(blocks) and node["tiers"]["HOST"]["used_bytes"] == \
            sum(f.stat().st_size for f in blocks), node
    finally:
        down = p.cli("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [f for f in small_shm.rglob("*")], list(small_shm.rglob("*"))


def wait_until(pred: Any, timeout_s: float, what: Any) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)
