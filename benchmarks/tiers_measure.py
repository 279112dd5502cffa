"""The measuring parts of ``benchmarks/tiers.py`` (its docstring says what is measured and how
the figures read): the timing plumbing that splits a load into its steps, the physical limits
(memory copy, file read, S3 GETs), our load through a ``BlockStore`` and the safetensors
baselines, and the S3 server (Ceph RGW, or moto when asked)."""

from __future__ import annotations

import gc
import io
import os
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

import faascale.memory_tier.tier_files as tier_files_mod
from benchmarks.common import ROOT
from faascale.engine.checkpoint import block_tensors
from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.manifest import ModelManifest
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.block_store import BlockStore, RemoteBlocks
from faascale.memory_tier.node import FETCH_PARALLEL_BLOCKS
from faascale.memory_tier.s3_direct import DirectRangedGets
from faascale.memory_tier.s3_store import S3Store
from faascale.memory_tier.tier_files import map_block
from faascale.platform.server import free_port

MiB = 1 << 20
GB = 1e9
S3_CONCURRENCY = 8  # S3Store's defaults: 8 parts in flight, 8 MiB each; the limit uses the same
S3_PART_BYTES = 8 * MiB
AK, SK, REGION, BUCKET = "testkey", "testsecret", "us-east-1", "tiers"
PARALLEL_BLOCKS = FETCH_PARALLEL_BLOCKS  # blocks a node fetches at once; also the 2nd DISK limit


# ---------------------------------------------------------------------------------------------
# Timing plumbing


PHASES: Counter[str] = Counter()  # seconds per phase inside the current "ours" run


@contextmanager
def phase(name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] += time.perf_counter() - t


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its time added to PHASES[name] (instrumentation only; behaviour unchanged)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with phase(name):
            return fn(*args, **kwargs)
    return wrapper


def instrument_verify() -> None:
    """Time the checksums of DISK/REMOTE fetches (thread-seconds; the module's globals are wrapped).

    A DISK hit is checked by ``tier_files.check_file`` (the pipelined read + hash of the file:
    its time is the disk read too); a REMOTE block landing in a tier file by
    ``tier_files.block_problem`` (the hash over the filled mapping)."""
    tier_files_mod.check_file = timed("verify", tier_files_mod.check_file)
    tier_files_mod.block_problem = timed("verify", tier_files_mod.block_problem)


def instrument(store: BlockStore) -> BlockStore:
    """Time this store's REMOTE reads (thread-seconds; an instance attribute wraps the method)."""
    if store.remote is not None:
        store.remote.read_into = timed("get", store.remote.read_into)  # type: ignore[method-assign]
    return store


@dataclass
class Sample:
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    faults: int = 0  # minor page faults in this process during the run
    background_s: float = 0.0  # after the load: until the store's tier copies behind it finished


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best(samples: Sequence[Sample]) -> Sample:
    return min(samples, key=lambda s: s.seconds)


def touch(tensors: Iterable[torch.Tensor]) -> float:
    """Read every byte once: one ``sum`` per tensor, torch's threads (the HOST limit's operation)."""
    total = 0.0
    for t in tensors:
        total += float(t.sum())
    return total


def checksum(tensors: Iterable[torch.Tensor]) -> float:
    return sum(float(t.sum(dtype=torch.float64)) for t in tensors)


def collect() -> None:
    """Drop the previous run's tensors and close its mmaps before the next run starts."""
    gc.collect()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True, timeout=120)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def fs_of(path: Path) -> str:
    """'device (fstype)' of the mount holding ``path``."""
    best_mount, label = "", "?"
    p = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, *_ = line.split()
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best_mount):
            best_mount, label = mnt, fstype if dev == fstype else f"{dev} ({fstype})"
    return label


# ---------------------------------------------------------------------------------------------
# Physical limits


def memcpy_gbps(runs: int, nbytes: int = 512 * MiB, window_s: float = 0.5) -> tuple[float, float]:
    """(memcpy GB/s into an already-faulted buffer, GB/s into a fresh ``empty_like`` buffer).

    512 MiB (16x the L3 cache), copied repeatedly for ``window_s``; best of ``runs`` windows (one
    30 ms copy swings 2x on this VM; a window is steadier). Context only, not a limit (a copy
    reads and writes; the HOST path only reads): the second adds the page faults and zeroing of
    new memory, which a REMOTE load pays and the REMOTE limit's reused buffers do not.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def window(copy: Callable[[], Any]) -> float:
        n, t = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t) < window_s:
            copy()
            n += 1
        return n * nbytes / elapsed / GB

    warm = max(window(lambda: dst.copy_(src)) for _ in range(runs))
    fresh = max(window(lambda: torch.empty_like(src).copy_(src)) for _ in range(runs))
    return warm, fresh


def read_file_into(path: Path, buf: bytearray) -> None:
    """``readinto`` the whole file (one call, looped on short reads) into the front of ``buf``."""
    with open(path, "rb", buffering=0) as f, memoryview(buf) as view:
        size = os.fstat(f.fileno()).st_size
        done = 0
        while done < size:
            with view[done:size] as rest:
                n = f.readinto(rest)
            if not n:
                raise RuntimeError(f"{path}: short read")
            done += n


def raw_read(paths: Sequence[Path], bufs: Sequence[bytearray], workers: int = 1) -> Sample:
    """Every file read into its own preallocated buffer: in order, or ``workers`` files at once."""
    t = time.perf_counter()
    if workers == 1:
        for p, b in zip(paths, bufs):
            read_file_into(p, b)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="raw-read") as pool:
            list(pool.map(read_file_into, paths, bufs))
    return Sample(time.perf_counter() - t)


def _timed_parts(part: Callable[[int, int, int], None], keys_sizes: Sequence[tuple[str, int]],
                 pool: ThreadPoolExecutor) -> Sample:
    """``part(object index, offset, length)`` for every S3_PART_BYTES part of every object,
    on ``pool`` (S3_CONCURRENCY in flight), timed from the first submit to the last result."""
    t = time.perf_counter()
    futures = [pool.submit(part, i, off, min(S3_PART_BYTES, size - off))
               for i, (_, size) in enumerate(keys_sizes) for off in range(0, size, S3_PART_BYTES)]
    for f in futures:
        f.result()
    return Sample(time.perf_counter() - t)


def raw_gets(client: Any, keys_sizes: Sequence[tuple[str, int]], bufs: Sequence[bytearray],
             pool: ThreadPoolExecutor) -> Sample:
    """Every part of every object as a ranged GET, S3_CONCURRENCY in flight, into ``bufs``."""
    def part(i: int, off: int, n: int) -> None:
        resp = client.get_object(Bucket=BUCKET, Key=keys_sizes[i][0], Range=f"bytes={off}-{off + n - 1}")
        with resp["Body"] as body, memoryview(bufs[i]) as view, view[off:off + n] as dst:
            done = 0
            while done < n:  # 1 MiB socket reads, like S3Store
                with dst[done:done + MiB] as chunk:
                    got = body.readinto(chunk)
                if not got:
                    raise RuntimeError("short body")
                done += got

    return _timed_parts(part, keys_sizes, pool)


def raw_direct_gets(direct: DirectRangedGets, keys_sizes: Sequence[tuple[str, int]],
                    bufs: Sequence[bytearray], pool: ThreadPoolExecutor) -> Sample:
    """The same parts as ``raw_gets``, each a presigned GET whose body the kernel copies
    straight into ``bufs`` (``recv_into``; the reader ``S3Store`` uses, with no verify and no
    landing file): the other client the REMOTE limit takes the faster of."""
    def part(i: int, off: int, n: int) -> None:
        with memoryview(bufs[i]) as view, view[off:off + n] as dst:
            direct.get_range_into(keys_sizes[i][0], off, dst, lambda _total, _length: None)

    return _timed_parts(part, keys_sizes, pool)


def remote_blocks(store: S3Store, prefix: str) -> RemoteBlocks:
    """REMOTE = this one store and key prefix, whatever the model."""
    return RemoteBlocks(lambda _m: (store, prefix))


# ---------------------------------------------------------------------------------------------
# Ours: through the BlockStore, the way a replica loads (NodeBlocks.fetch_model, then map)


def ours(store: BlockStore, manifest: ModelManifest, tokenizer: Tokenizer) -> Sample:
    """``fetch_model`` (every block, as ``NodeBlocks.fetch_model`` does) + map + views +
    ``from_blocks`` + touch. Then, untimed for the load, the wait for the copies behind it."""
    collect()
    PHASES.clear()
    faults = minflt()
    t = time.perf_counter()
    with phase("fetch"):
        results = store.fetch_model(manifest, parallel_blocks=PARALLEL_BLOCKS)
    with phase("map"):
        blocks = [block_tensors(manifest.blocks[i], map_block(r.path)) for i, r in enumerate(results)]
    with phase("from_blocks"):
        llm = LLM.from_blocks(manifest, tokenizer, blocks, EngineConfig(dtype="float32"))
    with phase("touch"):
        touch(t for b in blocks for t in b.values())
    seconds = time.perf_counter() - t
    faults = minflt() - faults
    assert llm.shards and all(r.source.name for r in results)
    phases = dict(PHASES)
    t = time.perf_counter()
    store.wait_idle()
    background_s = time.perf_counter() - t
    for i in range(manifest.num_blocks):  # the replica retires: blocks stay, unpinned
        store.unpin(manifest.block_id(i))
    del llm, blocks, results
    return Sample(seconds, phases, faults, background_s)


def safetensors_file(path: Path) -> Sample:
    from safetensors.torch import load_file

    collect()
    faults, t = minflt(), time.perf_counter()
    tensors = load_file(str(path))
    touch(tensors.values())
    return Sample(time.perf_counter() - t, faults=minflt() - faults)


def safetensors_s3(client: Any, key: str) -> Sample:
    from boto3.s3.transfer import TransferConfig
    from safetensors.torch import load

    cfg = TransferConfig(multipart_threshold=S3_PART_BYTES, multipart_chunksize=S3_PART_BYTES,
                         max_concurrency=S3_CONCURRENCY, use_threads=True)
    collect()
    faults, t = minflt(), time.perf_counter()
    buf = io.BytesIO()
    client.download_fileobj(BUCKET, key, buf, Config=cfg)
    tensors = load(buf.getvalue())
    del buf
    touch(tensors.values())
    return Sample(time.perf_counter() - t, faults=minflt() - faults)


# ---------------------------------------------------------------------------------------------
# S3 server: Ceph RGW (scripts/ceph-rgw.sh), or moto with --s3 moto


class S3Server:
    """Ceph RGW on a free loopback port (stopped by ``close``), or moto's server when asked."""

    def __init__(self, workdir: Path, kind: str, memstore_bytes: int) -> None:
        self.workdir, self.kind, self.memstore_bytes = workdir, kind, memstore_bytes
        self.rgw_dirs: list[Path] = []
        self.moto: Any = None
        self.endpoint = ""
        self.label = ""
        self.boot_s = 0.0

    def start(self) -> None:
        t = time.perf_counter()
        why = "--s3 moto"
        if self.kind == "rgw":
            # No silent fallback: the REMOTE figures claim a real S3 server, so a failed boot
            # fails the run (``--s3 moto`` asks for moto, and the report says so).
            self.endpoint = self._rgw()
            self.label = "Ceph RGW (memstore OSD, loopback)"
        if not self.endpoint:
            from moto.server import ThreadedMotoServer

            port = free_port()
            self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self.moto.start()
            self.endpoint = f"http://127.0.0.1:{port}"
            self.label = f"moto ThreadedMotoServer, in this process ({why})"
        self.boot_s = time.perf_counter() - t

    def _rgw(self) -> str:
        script = ROOT / "scripts" / "ceph-rgw.sh"
        env = {**os.environ, "AK": AK, "SK": SK, "OWNER_PID": str(os.getpid()),
               "MEMSTORE_BYTES": str(self.memstore_bytes)}
        err = ""
        for attempt in range(3):  # a free port can be taken before radosgw binds it
            d = self.workdir / f"ceph-rgw-{attempt}"
            self.rgw_dirs.append(d)  # registered before `up`: a half-booted cluster is stopped too
            try:
                up = subprocess.run(["bash", str(script), "up", str(d), str(free_port())], env=env,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=300)
            except subprocess.TimeoutExpired:
                raise RuntimeError("scripts/ceph-rgw.sh up took over 300 s") from None
            if up.returncode == 0:
                return (d / "endpoint").read_text().strip()
            lines = (up.stderr or up.stdout).strip().splitlines()
            last = lines[-1] if lines else f"exit {up.returncode}"
            err = next((ln for ln in lines if "error" in ln), last)
            if "in use" not in up.stderr and "was taken" not in up.stderr:
                break
        raise RuntimeError(err)

    def close(self) -> None:
        script = ROOT / "scripts" / "ceph-rgw.sh"
        for d in self.rgw_dirs:
            if (d / "pids").exists():
                subprocess.run(["bash", str(script), "down", str(d)], capture_output=True, timeout=120)
        if self.moto is not None:
            self.moto.stop()

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=AK,
                            aws_secret_access_key=SK, region_name=REGION,
                            config=Config(max_pool_connections=2 * S3_CONCURRENCY + 2,
                                          s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          retries={"max_attempts": 4, "mode": "standard"}))

    def store(self) -> S3Store:
        return S3Store(BUCKET, endpoint_url=self.endpoint, access_key=AK, secret_key=SK,
                       region=REGION, max_concurrency=S3_CONCURRENCY, part_size_bytes=S3_PART_BYTES)
