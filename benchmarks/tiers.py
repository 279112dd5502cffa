"""Load time from each tier of the memory hierarchy: ours vs the physical limit vs safetensors.

"Loaded" means resident and usable: ``LLM.from_blocks`` over the block tensors, and every weight
byte touched once (``tensor.sum()`` over every tensor). The touch is applied identically to every
path, baselines included, so a lazy mmap cannot look free. Per model (SmolLM2-135M fp32, 6 blocks,
and a synthetic ~1 GB random Llama) and per tier, side by side in one run, best of N each:

- HOST: blocks in a BlockStore's HOST dir (/dev/shm), fetched (HOST hit), mapped, wrapped, built,
  touched. The operation is a zero-copy map plus one read of every byte, so the limit is the
  touched bytes / memory *read* bandwidth, measured as ``benchmarks/engine.py`` measures it
  (``sum`` over a 1 GiB buffer for one-second windows), one window per repetition, best of N.
  Baseline: ``safetensors.torch.load_file`` of the same weights as one file in /dev/shm.
- DISK: blocks only in the DISK dir, page cache dropped before every run; ``fetch_model`` verifies
  each block file in place (one pipelined sequential read + blake3: this is the read) and serves it; the HOST copy
  is made behind the load. Limit: ``readinto`` of the same block files, cache dropped, the faster
  of one file at a time and 4 at once. Baseline: ``load_file`` of a safetensors file in that dir.
- REMOTE: blocks only in S3 (Ceph RGW on loopback, started here), fresh BlockStore each run:
  parallel ranged GETs straight into HOST files, verified there; the DISK copy behind the load.
  Limit: the faster of two clients' ranged GETs of the same objects, same concurrency and part
  size, into preallocated buffers, no verify: plain boto3 (``readinto``), and presigned GETs
  received with ``recv_into`` (``s3_direct``, the reader ours uses). Baseline: ``download_fileobj`` of the safetensors file into
  memory + ``safetensors.torch.load``.

Every column (ours, limit, baseline) gets the same N repetitions, interleaved, and the best of N
is kept for each (N = 2 with ``--quick``, 3 otherwise). The memcpy bandwidth (pre-faulted and
fresh destination) is printed and emitted for context only; it is not a limit.

JSON keys (unprefixed: the synthetic model; ``smollm2_``: SmolLM2), each a ratio of times:
- ``host_vs_read_bw``, ``disk_vs_raw_read``, ``remote_vs_raw_get``: limit time / our time
  (1 = at the physical limit; below 1 = slower than it; above 1 = faster than the measured
  limit: noise between the runs, or a limit that measures a different operation);
- ``host_vs_safetensors``, ``disk_vs_safetensors``, ``remote_vs_safetensors``: safetensors time /
  our time (above 1 = ours faster).

The tokenizer is parsed once, outside every timing (the baseline has none; a replica parses it
while its blocks arrive); its parse time is printed.

    python benchmarks/tiers.py [--quick] [--s3 rgw|moto] [--no-report] [--verbose]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (FIGURES, command_line, emit, git_rev, machine,  # noqa: E402
                               write_section)
from benchmarks.engine import READ_BW_BYTES, read_bw_buffer, read_bw_window  # noqa: E402
from benchmarks.tiers_measure import (BUCKET, GB, PARALLEL_BLOCKS, S3_CONCURRENCY,  # noqa: E402
                                      S3_PART_BYTES, MiB, S3Server, Sample, best, checksum,
                                      collect, drop_caches, fs_of, instrument, instrument_verify,
                                      memcpy_gbps, ours, raw_direct_gets, raw_gets, raw_read,
                                      remote_blocks, safetensors_file, safetensors_s3)
from benchmarks.tiers_report import (TIERS, breakdown, figure, markdown_table,  # noqa: E402
                                     report_tier, table)
from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json  # noqa: E402
from faascale.engine.manifest import ModelManifest  # noqa: E402
from faascale.engine.random_model import pack_random, random_hf_state_dict, tiny_config  # noqa: E402
from faascale.engine.sources import resolve_packed  # noqa: E402
from faascale.engine.tokenizer import Tokenizer  # noqa: E402
from faascale.memory_tier.block_store import BlockStore  # noqa: E402
from faascale.memory_tier.packed import upload_packed  # noqa: E402
from faascale.memory_tier.policy import Tier  # noqa: E402
from faascale.memory_tier.s3_direct import DirectRangedGets  # noqa: E402
from faascale.memory_tier.s3_store import S3Store  # noqa: E402


# TinyLlama's shape scaled down to ~1 GB of fp32 (hidden 2048, 12 layers, intermediate 5632, vocab
# 32000 would be 2.6 GB even with 4 KV heads):
# 16 layers x 11.3 M params + 2 x 32000 x 1024 (embeddings, untied head) = 246 M params = 0.98 GB.
SYNTH_FULL = dict(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16,
                  num_kv_heads=4, head_dim=64, vocab_size=32000)
# --quick: 8 x 6.3 M + 2 x 16000 x 768 = 75 M params = 0.30 GB.
SYNTH_QUICK = dict(hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                   num_kv_heads=4, head_dim=64, vocab_size=16000)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class Model:
    key: str  # "smollm2" or "synthetic"
    label: str
    packed: Path
    manifest: ModelManifest
    tokenizer_json: str
    st_tensors: Callable[[], dict[str, torch.Tensor]]  # the same weights, for the safetensors file

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes


def smollm2_model() -> Model:
    packed = resolve_packed("bundled://smollm2-135m-instruct", dtype="float32", num_blocks=6)
    manifest = read_manifest(packed)

    def tensors() -> dict[str, torch.Tensor]:  # no HF checkpoint at hand (GGUF): the packed blocks
        out: dict[str, torch.Tensor] = {}
        for i in range(manifest.num_blocks):
            out.update({n: t.clone() for n, t in load_block(packed, manifest, i).items()})
        return out

    return Model("smollm2", "SmolLM2-135M (fp32)", packed, manifest,
                 read_tokenizer_json(packed, manifest), tensors)


def synthetic_model(workdir: Path, quick: bool) -> Model:
    cfg = tiny_config(**(SYNTH_QUICK if quick else SYNTH_FULL))
    packed = workdir / "synthetic-packed"
    manifest = pack_random(packed, seed=0, num_blocks=8, name="synthetic-llama", config=cfg)
    label = (f"synthetic Llama (hidden {cfg.hidden_size}, {cfg.num_layers} layers, intermediate "
             f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, fp32)")
    return Model("synthetic", label, packed, manifest, read_tokenizer_json(packed, manifest),
                 lambda: random_hf_state_dict(cfg, seed=0))  # Hugging Face names, same bytes


# ---------------------------------------------------------------------------------------------
# One model through the three tiers


@dataclass
class TierResult:
    label: str
    ours: Sample
    limit_s: float
    baseline_s: float
    limit_sequential_s: float | None = None  # DISK: one file at a time
    limit_parallel_s: float | None = None  # DISK: PARALLEL_BLOCKS files read at once
    read_bw_gbps: float | None = None  # HOST: the read bandwidth the limit is computed from

    @property
    def vs_limit(self) -> float:
        return self.limit_s / self.ours.seconds

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.ours.seconds


@dataclass
class Local:
    """A model's files for the local tiers: DISK dir with its blocks, safetensors beside them."""

    model: Model
    disk_dir: Path
    host_dir: Path
    st_disk: Path
    prefix: str = ""  # REMOTE: where its blocks are in the bucket
    st_key: str = ""


def prepare(model: Model, work: Path, shm: Path) -> Local:
    """Blocks in a DISK dir (as an earlier process left them: the store adopts them) and the same
    weights as one safetensors file in that dir. Nothing in /dev/shm yet: on this kernel a tmpfs
    file present when the page cache is dropped loses fault-around for good (16x more page faults
    when touched), so HOST files are made just before their model's HOST runs."""
    m = model.manifest
    disk_dir = work / f"{model.key}-disk"
    (disk_dir / m.model_id).mkdir(parents=True)
    for b in m.blocks:
        shutil.copyfile(model.packed / b.file, disk_dir / m.model_id / f"block-{b.index:04d}.bin")
    from safetensors.torch import save_file

    st_disk = disk_dir / "model.safetensors"
    tensors = model.st_tensors()
    save_file(tensors, str(st_disk))
    # Same weights on both sides: the float64 sum of every tensor matches (names differ for the
    # synthetic model: Hugging Face's q/k/v and gate/up are fused in our blocks).
    theirs = checksum(tensors.values())
    del tensors
    ours_sum = checksum(t for i in range(m.num_blocks)
                        for t in load_block(model.packed, m, i, verify=False).values())
    assert abs(theirs - ours_sum) <= 1e-6 * (1 + abs(ours_sum)), (theirs, ours_sum)
    collect()
    return Local(model, disk_dir, shm / f"{model.key}-host", st_disk)


def upload(local: Local, s3store: S3Store) -> None:
    m = local.model.manifest
    local.prefix = f"models/{m.model_id}"
    upload_packed(s3store, local.model.packed, local.prefix)
    local.st_key = f"safetensors/{local.model.key}.safetensors"
    s3store.put_file(local.st_key, local.st_disk)


def verbose(on: bool, tier: str, rep: int, **samples: Sample) -> None:
    if on:
        parts = []
        for name, smp in samples.items():
            ph = ", ".join(f"{k} {v:.3f}" for k, v in breakdown(smp).items()) \
                if smp.phases else ""
            detail = ", ".join(x for x in (ph, f"{smp.faults} faults" if smp.faults else "") if x)
            parts.append(f"{name} {smp.seconds:.3f}" + (f" ({detail})" if detail else ""))
        print(f"    {tier} run {rep}: " + " | ".join(parts), flush=True)


def touched_bytes(m: ModelManifest) -> int:
    """The bytes ``touch`` reads on the HOST path: every tensor of every block."""
    return sum(t.nbytes for b in m.blocks for t in b.tensors.values())


def run_model(local: Local, work: Path, shm: Path, s3: S3Server, runs: int,
              can_drop: bool, loud: bool) -> dict[str, TierResult]:
    model, m = local.model, local.model.manifest
    print(f"\n== {model.label}: {m.num_blocks} blocks, {model.nbytes / GB:.3f} GB "
          f"({model.nbytes / 2**30:.3f} GiB); safetensors file "
          f"{local.st_disk.stat().st_size / GB:.3f} GB",
          flush=True)
    t = time.perf_counter()
    tok = Tokenizer(model.tokenizer_json, m.tokenizer)
    print(f"  tokenizer parsed in {time.perf_counter() - t:.3f} s (outside every timing)")
    st_shm = shm / f"{model.key}.safetensors"
    shutil.copyfile(local.st_disk, st_shm)
    store = instrument(BlockStore(local.host_dir, local.disk_dir, 64 << 30, 256 << 30))
    assert all(store.lookup(m.block_id(i)) is Tier.DISK for i in range(m.num_blocks))
    ours(store, m, tok)  # warm: DISK -> HOST, and the first-call costs of every step
    safetensors_file(st_shm)
    out: dict[str, TierResult] = {}

    # HOST: HOST hits (map + one read of every byte); limit = the touched bytes at the memory
    # read bandwidth, one read-bandwidth window per repetition, interleaved with the other columns.
    samples, base, bws = [], [], []
    bw_buf = read_bw_buffer()
    for rep in range(runs):
        samples.append(ours(store, m, tok))
        bws.append(read_bw_window(bw_buf))
        base.append(safetensors_file(st_shm))
        verbose(loud, "HOST", rep, ours=samples[-1],
                limit=Sample(touched_bytes(m) / (bws[-1] * GB)), safetensors=base[-1])
    del bw_buf
    collect()
    bw = max(bws)
    out["HOST"] = TierResult("HOST", best(samples), touched_bytes(m) / (bw * GB), best(base).seconds,
                             read_bw_gbps=bw)
    report_tier(out["HOST"])
    st_shm.unlink()

    # DISK: HOST evicted, page cache dropped before every run.
    block_paths = [local.disk_dir / m.model_id / f"block-{b.index:04d}.bin" for b in m.blocks]
    read_bufs = [bytearray(b.size_bytes) for b in m.blocks]
    for buf in read_bufs:
        buf[::4096] = b"\1" * len(buf[::4096])  # faulted in before timing

    def evict_host() -> None:
        for i in range(m.num_blocks):
            assert store.evict(m.block_id(i), Tier.HOST)

    samples, limits, limits4, base = [], [], [], []
    for rep in range(runs):
        evict_host()
        drop_caches()
        samples.append(ours(store, m, tok))
        drop_caches()
        limits.append(raw_read(block_paths, read_bufs))
        drop_caches()
        limits4.append(raw_read(block_paths, read_bufs, PARALLEL_BLOCKS))
        collect()
        drop_caches()
        base.append(safetensors_file(local.st_disk))
        verbose(loud, "DISK", rep, ours=samples[-1], limit=limits[-1], limit_4_readers=limits4[-1],
                safetensors=base[-1])
    del read_bufs
    seq_s, par_s = best(limits).seconds, best(limits4).seconds
    out["DISK"] = TierResult("DISK" if can_drop else "DISK (page cache)", best(samples),
                             min(seq_s, par_s), best(base).seconds, seq_s, par_s)
    report_tier(out["DISK"])
    evict_host()
    store.close()
    collect()

    # REMOTE: blocks and the safetensors file in S3; a fresh, empty BlockStore per run.
    s3store, client = s3.store(), s3.client()
    direct = DirectRangedGets(client, BUCKET, 10.0, 60.0)
    keys_sizes = [(f"{local.prefix}/{b.file}", b.size_bytes) for b in m.blocks]
    get_bufs = [bytearray(n) for _, n in keys_sizes]
    for buf in get_bufs:
        buf[::4096] = b"\1" * len(buf[::4096])

    def fresh_ours(rep: int) -> Sample:
        tag = f"{model.key}-remote-{rep}"
        dirs = (shm / f"{tag}-host", work / f"{tag}-disk")
        store = instrument(BlockStore(dirs[0], dirs[1], 64 << 30, 256 << 30,
                                      remote=remote_blocks(s3store, local.prefix)))
        sample = ours(store, m, tok)
        store.close()
        collect()
        for d in dirs:
            shutil.rmtree(d)
        return sample

    samples, limits, base = [], [], []
    with ThreadPoolExecutor(S3_CONCURRENCY, thread_name_prefix="raw-get") as pool:
        # Warm both sides' connections alike (untimed): the limit's client and ours' S3Store.
        raw_gets(client, keys_sizes, get_bufs, pool)
        raw_direct_gets(direct, keys_sizes, get_bufs, pool)
        warm = remote_blocks(s3store, local.prefix)
        for i, buf in enumerate(get_bufs):
            with memoryview(buf) as view:
                warm.read_into(m, i, view)
        for rep in range(runs):
            samples.append(fresh_ours(rep))
            limits.append(min(raw_gets(client, keys_sizes, get_bufs, pool),
                              raw_direct_gets(direct, keys_sizes, get_bufs, pool),
                              key=lambda x: x.seconds))
            base.append(safetensors_s3(client, local.st_key))
            verbose(loud, "REMOTE", rep, ours=samples[-1], limit=limits[-1], safetensors=base[-1])
    del get_bufs
    direct.close()
    s3store.close()
    out["REMOTE"] = TierResult("REMOTE", best(samples), best(limits).seconds, best(base).seconds)
    report_tier(out["REMOTE"])
    shutil.rmtree(local.disk_dir)
    shutil.rmtree(local.host_dir, ignore_errors=True)
    return out


def free_page_reporting() -> bool:
    """Whether a virtio balloon reports free pages to the host (feature bit 5): freed guest memory
    is then handed back, and touching it again costs a host-side fault as well."""
    for f in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        bits = f.read_text().strip()
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~300 MB synthetic model, best of 2 (< 2 min)")
    ap.add_argument("--s3", choices=["rgw", "moto"], default="rgw",
                    help="S3 server for REMOTE (moto is in-process: much slower, labelled)")
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--verbose", action="store_true", help="print every run, not just the best")
    args = ap.parse_args()
    runs = 2 if args.quick else 3
    instrument_verify()
    t_start = time.perf_counter()
    load_before = loadavg()

    work = Path(tempfile.mkdtemp(prefix="faascale-tiers-", dir="/var/tmp"))
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    shm = Path(tempfile.mkdtemp(prefix="faascale-tiers-", dir=shm_root))
    s3 = S3Server(work, args.s3, memstore_bytes=(3 if args.quick else 6) << 30)
    booting = None
    try:
        can_drop = drop_caches()
        if not can_drop:
            print("WARNING: could not drop the page cache (not root?): DISK numbers are page-cache reads")
        # The S3 server boots (~15 s, mostly waiting) while the models are packed and laid out;
        # nothing is measured until it is up.
        booting = threading.Thread(target=s3.start, name="s3-boot", daemon=True)
        booting.start()
        t = time.perf_counter()
        models = [smollm2_model(), synthetic_model(work, args.quick)]
        locals_ = [prepare(m, work, shm) for m in models]
        print(f"models packed and laid out in {time.perf_counter() - t:.1f} s", flush=True)
        booting.join()
        if not s3.endpoint:
            raise SystemExit("no S3 server could be started")
        s3.client().create_bucket(Bucket=BUCKET)
        t = time.perf_counter()
        with s3.store() as s3store:
            for local in locals_:
                upload(local, s3store)
        print(f"S3: {s3.label} at {s3.endpoint}, up in {s3.boot_s:.1f} s; uploads "
              f"{time.perf_counter() - t:.1f} s")
        print(f"HOST dir {shm} on {fs_of(shm)}; DISK dir {work} on {fs_of(work)}")
        memcpy, memcpy_fresh = memcpy_gbps(runs)
        print(f"memcpy (context, not a limit) {memcpy:.2f} GB/s into a faulted buffer, "
              f"{memcpy_fresh:.2f} GB/s into a fresh empty_like buffer")
        results = {local.model.key: run_model(local, work, shm, s3, runs, can_drop, args.verbose)
                   for local in locals_}
    finally:
        if booting is not None:
            booting.join()  # a boot still under way must finish registering its pids
        s3.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load_after = loadavg()

    print()
    for m in models:
        print("\n".join(table(m, results[m.key])))
        print()
    bw_text = ", ".join(f"{m.key} {results[m.key]['HOST'].read_bw_gbps:.2f}" for m in models)
    print(f"best of {runs} for every column; touch = one tensor.sum() per tensor on every path; "
          f"limits: HOST = touched bytes / read bandwidth (sum over {READ_BW_BYTES >> 30} GiB, GB/s: "
          f"{bw_text}), DISK = readinto of the block files (cache dropped; best of 1 "
          f"and {PARALLEL_BLOCKS} readers), "
          f"REMOTE = raw ranged GETs, the faster of boto3 and recv_into ({S3_CONCURRENCY} x "
          f"{S3_PART_BYTES // MiB} MiB in flight)")
    print(f"S3 server: {s3.label}; load average {load_before} before, {load_after} after; "
          f"{elapsed:.0f} s total")

    res: dict[str, Any] = {"quick": args.quick, "runs": runs, "memcpy_gbps": round(memcpy, 3),
                           "memcpy_fresh_gbps": round(memcpy_fresh, 3),
                           "read_bw_gbps": max(results[m.key]["HOST"].read_bw_gbps or 0.0
                                               for m in models),
                           "s3_server": "ceph-rgw" if s3.moto is None else "moto",
                           "page_cache_dropped": can_drop, "elapsed_s": round(elapsed, 1)}
    for m in models:
        r = results[m.key]
        pre = "smollm2_" if m.key == "smollm2" else ""
        res[f"{pre}bytes"] = m.nbytes
        res[f"{pre}host_vs_read_bw"] = r["HOST"].vs_limit
        res[f"{pre}disk_vs_raw_read"] = r["DISK"].vs_limit
        res[f"{pre}remote_vs_raw_get"] = r["REMOTE"].vs_limit
        for t in TIERS:
            res[f"{pre}{t.lower()}_vs_safetensors"] = r[t].speedup
            res[f"{pre}{t.lower()}_s"] = r[t].ours.seconds
        res[f"{pre}disk_raw_read_s"] = r["DISK"].limit_sequential_s
        res[f"{pre}disk_raw_read_{PARALLEL_BLOCKS}readers_s"] = r["DISK"].limit_parallel_s

    if not args.quick and not args.no_report:
        reporting = (" (page faults and zeroing; this VM's balloon reports freed pages to the host, "
                     "so reused memory is faulted in twice)") if free_page_reporting() else \
            " (page faults and zeroing)"
        fig = FIGURES / "tiers.png"
        has_fig = figure(models, results, fig)
        tables = "\n\n".join(
            f"**{m.label}**, {m.manifest.num_blocks} blocks, {m.nbytes / GB:.3f} GB:\n\n"
            f"{markdown_table(m, results[m.key])}\n\nDISK raw read: one file at a time "
            f"{results[m.key]['DISK'].limit_sequential_s:.3f} s, {PARALLEL_BLOCKS} files at once "
            f"{results[m.key]['DISK'].limit_parallel_s:.3f} s (the limit is the faster)."
            for m in models)
        write_section("tiers", f"""## Model load time from each tier (`benchmarks/tiers.py`)

Command: `{command_line()}` at `{git_rev()}`, {time.strftime('%Y-%m-%d')}, {elapsed:.0f} s.
Machine: {machine()}. Load average {load_before} before, {load_after} after (others' tests may run).
HOST = /dev/shm ({fs_of(Path('/dev/shm'))}); DISK = {fs_of(Path('/var/tmp'))}, page cache
{'dropped before every DISK run' if can_drop else 'NOT dropped (not root): DISK = page-cache reads'};
REMOTE = {s3.label}, {S3_CONCURRENCY} ranged GETs of {S3_PART_BYTES // MiB} MiB in flight.

"Loaded" = `LLM.from_blocks` over the block tensors and one `tensor.sum()` over every tensor (every
weight byte read once), the same touch on every path. Every column gets {runs} repetitions,
interleaved, and the best of {runs} is shown for each. Ours =
`BlockStore.fetch_model` ({PARALLEL_BLOCKS} blocks in flight, as `NodeBlocks.fetch_model` does) +
`map_block` + `block_tensors` + `from_blocks` + touch. A DISK hit is verified in place (one
sequential read, 8 MiB chunks, hashed by blake3 while the next chunk is read: that pass is the
disk read) and mapped from the page cache it left; a
REMOTE block is fetched straight into its HOST file and verified there. The copy into the other
tier (DISK -> HOST, REMOTE -> DISK) is made behind the load, in the background; the last column
is how long it ran on after the model was loaded. The tokenizer is parsed outside every timing
(the baseline has none; a replica parses it while its blocks arrive).
Limits: HOST = the touched bytes / memory read bandwidth (one `sum` over a
{READ_BW_BYTES >> 30} GiB buffer for one-second windows, as `benchmarks/engine.py` measures it; one
window per repetition; {bw_text} GB/s), since a HOST hit is a zero-copy map plus one read of every
byte; DISK = `readinto` of the same block files, cache dropped, the faster of one file at a
time and {PARALLEL_BLOCKS} at once; REMOTE = ranged GETs of the same objects into pre-faulted
buffers, same concurrency, no verify, the faster of two clients: plain boto3 (`readinto`) and
presigned GETs whose bodies `recv_into` receives in place (the reader ours uses). Baselines: `safetensors.torch.load_file` of one
file in the same place (HOST, DISK); `download_fileobj` into memory + `safetensors.torch.load`
(REMOTE). ours / limit = limit time / our time; speedup = safetensors time / our time.

The breakdown is wall seconds per step; `(get)` and `(verify)` are thread-seconds inside `fetch`,
summed over its {PARALLEL_BLOCKS} threads (`verify` on DISK is the pipelined read + hash of the
file, so it includes the disk read); `faults` counts minor page faults in the run. For context,
not as a limit: memcpy into a fresh buffer ran at {memcpy_fresh:.1f} GB/s in this run, into a
pre-faulted one at {memcpy:.1f} GB/s ({memcpy_fresh / memcpy:.2f}x){reporting}; a REMOTE load lands
in new memory, the REMOTE limit's buffers are reused.

{tables}
{"" if not has_fig else chr(10) + "![tiers benchmark](figures/tiers.png)" + chr(10)}""")
    emit({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})


if __name__ == "__main__":
    main()
