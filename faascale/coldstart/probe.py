"""Real cold starts in fresh processes, from a chosen tier: ``faascale coldstart profile``.

``run_profiles`` prepares the tier (HOST: the blocks in a host-memory tier directory; DISK: in a
disk tier directory with their pages evicted from the page cache before every start; REMOTE:
empty tiers) and starts ``python -m faascale.coldstart.probe`` once per run. The probe reads the
model's manifest and tokenizer, and for REMOTE its blocks, from the object store at
``location``: by default the packed directory itself (a local store, its files evicted from the
page cache too), or ``s3://bucket/prefix`` where the same packed model was uploaded
(``memory_tier.packed.upload_packed``), e.g. a Ceph RGW; the probe's ``env`` then carries the
endpoint (``FAASCALE_S3_ENDPOINT``) and the credentials (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``). A probe does what a replica's start does through its node's block
store (``platform.replica``: spec and tokenizer, ``BlockStore`` fetch, materialization, and the
engine and warm-up of ``start_steps``), then serves one real request for its first token, and
prints its ``StartupProfile`` as JSON on the last line of stdout. It runs without Ray or Serve
(coldstart never imports the platform): its ``imports`` step is the engine's and the tiers'
imports (torch dominates), not PipeCast's or the platform's, which a replica also imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from faascale.coldstart.profile import StartupProfile

TIERS = ("HOST", "DISK", "REMOTE")
PROBE_TIMEOUT_S = 600.0


class ProbeError(RuntimeError):
    """A probe start failed or the tier could not be prepared (the message says which)."""


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (``POSIX_FADV_DONTNEED``; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _host_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file())


def prepare_tier(tier: str, model_dir: Path, host_dir: Path, disk_dir: Path) -> None:
    """Put the model's blocks where a start from ``tier`` finds them (and nowhere faster)."""
    from faascale.engine.checkpoint import read_manifest

    manifest = read_manifest(model_dir)
    for d in (host_dir, disk_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    if tier in ("HOST", "DISK"):
        target = (host_dir if tier == "HOST" else disk_dir) / manifest.model_id
        target.mkdir(parents=True)
        for i, info in enumerate(manifest.blocks):
            shutil.copyfile(model_dir / info.file, target / f"block-{i:04d}.bin")
        if tier == "DISK":
            evict_from_page_cache(sorted(target.iterdir()))
    if tier in ("DISK", "REMOTE"):
        evict_from_page_cache(_model_files(model_dir))
    os.sync()  # the copies (and an earlier start's background tier copy) are not written back
    # while the next start runs


def run_probe(location: str | Path, tier: str, host_dir: Path, disk_dir: Path,
              max_seq_len: int | None = None, timeout_s: float = PROBE_TIMEOUT_S,
              env: Mapping[str, str] | None = None) -> StartupProfile:
    """One start in a fresh process (``env`` added to this process's environment); its profile.
    ``location``: where the packed model is, a directory or ``s3://bucket/prefix``."""
    cmd = [sys.executable, "-m", "faascale.coldstart.probe", "--model-dir", str(location),
           "--tier", tier, "--host-dir", str(host_dir), "--disk-dir", str(disk_dir)]
    if max_seq_len:
        cmd += ["--max-seq-len", str(max_seq_len)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"a start from {tier} took longer than {timeout_s:.0f} s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"the probe start from {tier} failed: {tail}")
    return StartupProfile.from_dict(json.loads(lines[-1]))


def run_profiles(model_dir: str | Path, tier: str, runs: int, work_dir: str | Path | None = None,
                 max_seq_len: int | None = None, *, location: str | None = None,
                 env: Mapping[str, str] | None = None) -> list[StartupProfile]:
    """``runs`` cold starts of the packed model at ``model_dir`` from ``tier``, each in a fresh
    process, the tier prepared before each. ``location`` (default ``model_dir``) is the object
    store the probe reads the model from, e.g. ``s3://bucket/models/m`` holding the same model
    (its manifest must name the same model id); ``env``: extra environment for the probe (the S3
    endpoint and credentials). Raises ProbeError, FileNotFoundError."""
    from faascale.engine.checkpoint import read_manifest

    tier = tier.upper()
    if tier not in TIERS:
        raise ProbeError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if runs < 1:
        raise ProbeError(f"runs must be >= 1, got {runs}")
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a packed model (no manifest.json)")
    model_id = read_manifest(model_dir).model_id  # a corrupt manifest fails here, with its error
    base = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="faascale-probe-"))
    host_dir = _host_root() / f"faascale-probe-{os.getpid()}" / "host"
    disk_dir = base / "disk"
    try:
        out = []
        for _ in range(runs):
            prepare_tier(tier, model_dir, host_dir, disk_dir)
            profile = run_probe(location or model_dir, tier, host_dir, disk_dir, max_seq_len,
                                env=env)
            if profile.model_id != model_id:
                raise ProbeError(f"{location} holds model {profile.model_id}, not {model_id} "
                                 f"of {model_dir}")
            out.append(profile)
        return out
    finally:
        shutil.rmtree(host_dir.parent, ignore_errors=True)
        if not work_dir:
            shutil.rmtree(base, ignore_errors=True)


# --- the probe process -------------------------------------------------------------------------

def _probe(args: argparse.Namespace) -> dict[str, Any]:
    imports_started_s = time.time()  # the heavy imports (torch, the engine, the tiers) below
    from faascale.coldstart.profile import (StartupRecorder, machine_facts, model_facts,
                                            source_of)
    from faascale.coldstart.start_steps import build_engine_loop, cold_process_spans, materialize
    from faascale.engine.checkpoint import block_tensors
    from faascale.engine.config import EngineConfig
    from faascale.engine.sampling import SamplingParams
    from faascale.engine.tokenizer import Tokenizer
    from faascale.memory_tier.block_store import BlockStore, RemoteBlocks
    from faascale.memory_tier.device import DeviceLoader
    from faascale.memory_tier.node import split_location
    from faascale.memory_tier.packed import read_packed_metadata
    from faascale.memory_tier.store import open_store
    from faascale.memory_tier.tier_files import map_block

    imports_s = (imports_started_s, time.time())
    rec = StartupRecorder()
    cold_process_spans(rec, time.time(), imports_s)
    with rec.span("spec_tokenizer"):
        store_uri, prefix = split_location(args.model_dir)
        store = open_store(store_uri)
        manifest, tokenizer_json = read_packed_metadata(store, prefix)
        tokenizer = Tokenizer(tokenizer_json, manifest.tokenizer)
        cfg = EngineConfig(**({"max_seq_len": args.max_seq_len} if args.max_seq_len else {}))
    blocks = BlockStore(Path(args.host_dir), Path(args.disk_dir), 64 << 30, 64 << 30,
                        RemoteBlocks(lambda m: (store, prefix)))
    with rec.span("weight_fetch", bytes=manifest.total_bytes) as attrs:
        placed = blocks.fetch_model(manifest, 60.0)
        tiers: dict[str, int] = {}
        for r in placed:
            tiers[r.source.name] = tiers.get(r.source.name, 0) + 1
        attrs["tier"] = tiers
    loader = DeviceLoader(cfg.device)
    llm = materialize(rec, manifest, tokenizer, lambda: [
        block_tensors(info, map_block(Path(r.path))) for info, r in zip(manifest.blocks, placed)],
        cfg, loader)
    loop = build_engine_loop(llm, rec, "engine-probe")
    ready = time.time()
    first = None
    for _ in loop.submit(llm.prompt_ids("What is a cold start?"),
                         SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)):
        first = first or time.time()
    rec.add("first_token", ready, first or time.time())
    loop.stop()
    profile = rec.finish(function=args.function, replica=f"probe-{os.getpid()}",
                         model_id=manifest.model_id, source=source_of(tiers),
                         weight_bytes=manifest.total_bytes, machine=machine_facts(),
                         model=model_facts(manifest, len(tokenizer_json.encode())),
                         device=str(loader.device))
    return profile.to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one profiled cold start (prints its profile JSON)")
    ap.add_argument("--model-dir", required=True,
                    help="the packed model's location: a directory or s3://bucket/prefix")
    ap.add_argument("--tier", choices=TIERS, required=True)
    ap.add_argument("--host-dir", required=True)
    ap.add_argument("--disk-dir", required=True)
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--function", default="")
    args = ap.parse_args(argv)
    print(json.dumps(_probe(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
