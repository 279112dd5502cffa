"""Bursty load end to end: faascale vs Ray Serve as commonly deployed vs ServerlessLLM-style
host caching, on one emulated multi-node cluster, under one window of a real trace.

The cluster (``EmulatedCluster``: network namespaces, every link shaped to ``--rate`` in and
out) is a real multi-node Ray cluster, one ``ray start`` per host:

- host 1, the head: Ray's head node, the faascale platform (gateway, Serve controller, PipeCast
  coordinator, events), and the load generator (Locust, through ``faascale loadtest``);
- host 2, the object store: a real S3 server (Ceph RGW) on its own link (``--store-rate``);
- hosts 3..N+2, the GPU nodes: one Ray node each with one (emulated) GPU, so at most one replica
  per node, as with one GPU per replica. There is no GPU here: replicas compute on the shared CPU.

Each system runs on a fresh Ray cluster and platform (empty HOST and DISK tiers everywhere; the
store keeps the packed model), deploys the same function (SmolLM2-135M, fp32: 651 MB of blocks), starts
with one warm replica (``min_replicas: 1``) and then gets the same trace window: the Azure LLM
2023 code trace from t = 840 s (idle 173 s before, then 562 requests in 31 s, a calmer stretch,
130 s idle and a second burst), time-compressed by ``--speedup`` and thinned by ``--rate-scale``
to fit this 2-core machine, with prompt and output lengths scaled to the function. Systems:

1. **faascale**: our policy (cold-start-aware, scale-ahead, keep-alive), PipeCast (new replicas
   take blocks from the serving replicas by multicast and serve through temporary pipelines
   while they load), warm HOST tier (a node that served keeps the blocks in RAM);
2. **storage**: every new replica loads from the object store; Ray Serve's default queue-length
   policy with its default delays (``scaling.policy: serve``); no PipeCast;
3. **hostcache** (ServerlessLLM-style): a replica loads from its node's host cache where present,
   else from the store; no multicast, no execute-while-load; our policy (so the difference to
   faascale is the loading alone).

Per system: TTFT p50/p99, TBT p99, SLO attainment (the function's TTFT and TBT targets), failed
requests, replica-seconds (running + starting replicas integrated over the same window: a
loading replica holds its GPU too), time from the burst's start to all N replicas serving, and
where each replica's weights came from. Figures: replicas over time under the request rate, and
TTFT CDFs. Writes the ``bursty`` section of docs/benchmarks.md.

    python benchmarks/bursty.py [--quick] [--nodes 4] [--rate 500mbit] [--store-rate RATE] [--node-cpus C]
                                [--speedup 1] [--rate-scale 0.08] [--systems faascale,storage,hostcache]

``--quick``: 2 GPU nodes, the first 60 s of the window, 2x faster, no report (about 6 min: three
Ray clusters boot, one after the other). Needs root (network namespaces),
Ceph (``scripts/ensure-ceph.sh``) and Locust (the dev extras).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FIGURES, ROOT, command_line, emit, git_rev, machine, write_section  # noqa: E402
from loadtest.report import load_records, load_replicas  # noqa: E402
from loadtest.workload import (ReplicaSample, RequestRecord, percentile,  # noqa: E402
                               replica_seconds, summarize, time_to_replicas, trace_schedule)

HEAD, STORE, FIRST_NODE = 1, 2, 3
RAY_PORT, GATEWAY_PORT, S3_PORT = 6379, 8080, 7480
BUCKET = "faascale-bench"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
           "AWS_DEFAULT_REGION": "us-east-1"}
MODEL = "bundled://smollm2-135m-instruct"
SYSTEMS = {  # name -> the function's scaling settings that make it that system
    "faascale": {"policy": "faascale", "pipecast": True},
    "storage": {"policy": "serve", "pipecast": False},
    "hostcache": {"policy": "faascale", "pipecast": False},
}
LABELS = {"faascale": "faascale", "storage": "storage (Ray Serve default)",
          "hostcache": "host cache (ServerlessLLM-style)"}
COLORS = {"faascale": "tab:blue", "storage": "tab:red", "hostcache": "tab:orange"}
WINDOW_START_S, WINDOW_S = 840.0, 320.0  # the code trace: both bursts and the idle gap between
QUICK_WINDOW_S = 60.0
TAIL_S = 15.0  # the cost window runs this long after the last arrival, for every system
# The GPU nodes together get at most this many of the machine's 2 cores (each its own quota), so
# the head (platform, Locust) and the store keep the rest: a node's work (a replica starting, a
# multicast) never slows another node's replica, as on a real cluster.
GPU_NODES_CPUS = 1.4
READY_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# The cluster: Ray nodes and the S3 store in the emulated hosts


@dataclass
class Setup:
    work: Path
    nodes: int
    rate: str
    store_rate: str
    node_cpus: float  # each GPU node's CPU budget (cores): its own "GPU", not shared
    speedup: float
    rate_scale: float
    window_s: float
    max_prompt_tokens: int = 128
    max_output_tokens: int = 32
    # Targets for this emulated node (a 0.35-core "GPU": warm TTFT about 1 s, about 0.3 s a token)
    slo_ttft_ms: float = 3000.0
    slo_tbt_ms: float = 1000.0
    target_concurrency: int = 2

    @property
    def num_hosts(self) -> int:
        return self.nodes + 2


def base_env(s: Setup, cluster: Any) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "FAASCALE_S3_ENDPOINT": f"http://{cluster.host_address(STORE)}:{S3_PORT}",
            "FAASCALE_S3_BUCKET": BUCKET, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **S3_KEYS}


def in_host(cluster: Any, i: int, argv: Sequence[str], env: dict[str, str], timeout_s: float,
            log_file: Path | None = None) -> str:
    """Run argv to completion inside host i (within its CPU budget, if it has one); returns its
    output; raises with the output if it fails."""
    p = cluster.run(i, list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise RuntimeError(f"{' '.join(argv[:4])}... in host {i} took over {timeout_s:.0f} s: "
                           f"{out[-2000:]}") from None
    if log_file is not None:
        with log_file.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n{out}\n")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... in host {i} exited {p.returncode}: "
                           f"{out[-2000:]}")
    return out


def start_store(s: Setup, cluster: Any) -> Path:
    """Ceph RGW on host 2, the bucket created; returns its state directory."""
    d = s.work / "rgw"
    env = {**base_env(s, cluster), "RGW_HOST": cluster.host_address(STORE),
           "AK": S3_KEYS["AWS_ACCESS_KEY_ID"], "SK": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
           "MEMSTORE_BYTES": str(3 << 30)}
    in_host(cluster, STORE, ["bash", str(ROOT / "scripts" / "ceph-rgw.sh"), "up", str(d),
                             str(S3_PORT)], env, 240, s.work / "rgw.log")
    code = ("import boto3, os; boto3.client('s3', endpoint_url=os.environ['FAASCALE_S3_ENDPOINT'])"
            f".create_bucket(Bucket={BUCKET!r})")
    in_host(cluster, HEAD, [sys.executable, "-c", code], base_env(s, cluster), 60)
    return d


def stop_host(cluster: Any, i: int, grace_s: float = 5.0) -> None:
    """Every process in host i (all of them ours: Ray's daemons, the platform, replicas)."""
    out = subprocess.run(["ip", "netns", "pids", cluster.namespace(i)], capture_output=True,
                         text=True, check=False).stdout.split()
    pids = [int(p) for p in out if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def start_ray(s: Setup, cluster: Any, temp: Path, log_file: Path) -> None:
    """The head on host 1 (no GPU: replicas never land there), one GPU node per other host."""
    env = base_env(s, cluster)
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--disable-usage-stats", "--object-store-memory", str(200 << 20)]
    in_host(cluster, HEAD, [ray, "start", "--head", "--node-ip-address", cluster.host_address(HEAD),
                            "--port", str(RAY_PORT), "--num-cpus", "4", "--num-gpus", "0",
                            "--include-dashboard=false", "--temp-dir", str(temp), *common],
            env, 120, log_file)
    address = f"{cluster.host_address(HEAD)}:{RAY_PORT}"
    # One at a time: nodes on one machine share the head's session directory, and two starting
    # at once time out (their raylets race for it).
    for i in range(FIRST_NODE, s.num_hosts + 1):
        in_host(cluster, i, [ray, "start", "--address", address, "--node-ip-address",
                             cluster.host_address(i), "--num-cpus", "1", "--num-gpus", "1",
                             *common], env, 120, log_file)


# ---------------------------------------------------------------------------------------------
# One system


@dataclass
class Result:
    system: str
    records: list[RequestRecord]
    started_epoch_s: float
    polls: list[ReplicaSample]  # t_s from started_epoch_s
    cold_starts: list[dict[str, Any]]  # replica starts: {"t_s", "source", "load_s", ...}
    arrivals_s: list[float]
    window_end_s: float
    loadtest_rc: int


def function_spec(s: Setup, system: str) -> str:
    cfg = SYSTEMS[system]
    return f"""name: bursty
description: SmolLM2-135M-Instruct as {LABELS[system]}
model:
  source: {MODEL}
  dtype: float32
  blocks: 6
engine:
  max_seq_len: 512
  max_batch_size: {2 * s.target_concurrency}
  num_threads: 1
scaling:
  min_replicas: 1
  max_replicas: {s.nodes}
  target_concurrency: {s.target_concurrency}
  keep_alive_s: 10
  downscale_delay_s: 20
  pipecast: {str(cfg['pipecast']).lower()}
  policy: {cfg['policy']}
  cold_start_timeout_s: 300
slo:
  ttft_ms: {s.slo_ttft_ms:g}
  tbt_ms: {s.slo_tbt_ms:g}
resources:
  num_cpus: 0
  num_gpus: 1
"""


def run_system(s: Setup, cluster: Any, system: str, objects: Path) -> Result:
    d = s.work / system
    home = d / "home"
    home.mkdir(parents=True)
    (home / "objects").symlink_to(objects)  # the packed model: packed once, uploaded once
    fn = d / "function"
    fn.mkdir()
    (fn / "function.yaml").write_text(function_spec(s, system))
    env = {**base_env(s, cluster), "FAASCALE_HOME": str(home)}
    faascale = str(Path(sys.executable).with_name("faascale"))
    logf = d / "bench.log"
    temp = Path(tempfile.mkdtemp(prefix="fsb", dir="/tmp"))  # Ray's sockets: keep the path short
    try:
        t0 = time.monotonic()
        start_ray(s, cluster, temp, logf)
        log(f"{system}: Ray up ({s.nodes} GPU nodes) in {time.monotonic() - t0:.0f} s")
        server_log = (d / "platform.log").open("w")
        cluster.run(HEAD, [sys.executable, "-m", "faascale.platform.server", "--home", str(home),
                           "--host", cluster.host_address(HEAD), "--port", str(GATEWAY_PORT),
                           "--address", f"{cluster.host_address(HEAD)}:{RAY_PORT}"],
                    env=env, stdout=server_log, stderr=subprocess.STDOUT)
        _wait(lambda: _running(cluster, env) >= 0, 120, "the platform")
        in_host(cluster, HEAD, [faascale, "deploy", str(fn)], env, READY_TIMEOUT_S, logf)
        _wait(lambda: _running(cluster, env) >= 1, READY_TIMEOUT_S, "the first replica")
        in_host(cluster, HEAD, [faascale, "invoke", "bursty", "Hello", "--max-tokens", "4"], env,
                120, logf)
        log(f"{system}: deployed, one replica serving, {time.monotonic() - t0:.0f} s")
        arrivals = schedule(s)
        window_end_s = arrivals[-1] + TAIL_S
        out = d / "loadtest"
        lt = subprocess.run(["ip", "netns", "exec", cluster.namespace(HEAD), faascale, "loadtest",
                             "bursty", "--shape", "trace", "--trace", "code",
                             "--window-start-s", str(WINDOW_START_S), "--window-s",
                             str(s.window_s), "--speedup", str(s.speedup), "--rate-scale",
                             str(s.rate_scale), "--max-prompt-tokens", str(s.max_prompt_tokens),
                             "--max-output-tokens", str(s.max_output_tokens), "--out", str(out),
                             "--tail-s", str(TAIL_S)],
                            env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=s.window_s / s.speedup + 900)
        (d / "loadtest.log").write_text(lt.stdout + lt.stderr)
        started = float(json.loads((out / "slo.json").read_text())["started_epoch_s"])
        records = load_records(out / "slo")
        polls = load_replicas(out / "slo", started)  # recorded by `faascale loadtest`
        log(f"{system}: {len(records)} requests, loadtest exit {lt.returncode}")
        return Result(system, records, started, polls, cold_starts(home, started), arrivals,
                      window_end_s, lt.returncode)
    finally:
        stop_host(cluster, HEAD)
        for i in range(FIRST_NODE, s.num_hosts + 1):
            stop_host(cluster, i)
        shutil.rmtree(temp, ignore_errors=True)
        from faascale.memory_tier.node import TierConfig

        tiers = TierConfig.for_state_dir(home)  # this system's HOST tier is RAM: give it back
        shutil.rmtree(tiers.host_dir, ignore_errors=True)
        shutil.rmtree(f"{tiers.host_dir}-pipecast", ignore_errors=True)


PROBE = """
import json, sys
from faascale.platform.auth import load_or_create_tokens
from faascale.platform.client import PlatformClient
from faascale.platform.state import StateDir
state = StateDir(None)
info = state.read_platform()
client = PlatformClient(info.url, load_or_create_tokens(state.tokens_file).invoke, timeout_s=10)
names = {f["name"]: f["replicas"]["running"] for f in client.list()}
print(json.dumps(names))
"""


def _running(cluster: Any, env: dict[str, str]) -> int:
    """Serving replicas of the benchmark's function (0 while the platform is not up)."""
    done = subprocess.run(["ip", "netns", "exec", cluster.namespace(HEAD), sys.executable, "-c",
                           PROBE], env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return -1
    return int(json.loads(done.stdout.strip().splitlines()[-1]).get("bursty", 0))


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")
        time.sleep(1.0)


def schedule(s: Setup) -> list[float]:
    """The arrival times (s from the load test's start) the load test sends: the same call."""
    arrivals = trace_schedule("code", WINDOW_START_S, s.window_s, s.speedup, s.rate_scale,
                              s.max_prompt_tokens, s.max_output_tokens, 0)
    return [a.t_s for a in arrivals]


def cold_starts(home: Path, started_epoch_s: float) -> list[dict[str, Any]]:
    """Every replica start the platform recorded (its ``StartupProfile``): when, from the load
    test's start; where its weights came from; how long it took to serve."""
    from faascale.coldstart.profile import StartupProfile
    from faascale.platform.registry import STARTUP_PROFILE, Registry

    out = []
    for event in Registry(home / "registry.db").events_of_kind(STARTUP_PROFILE):
        p = StartupProfile.from_dict(event["profile"])
        out.append({"t_s": p.started_at_s - started_epoch_s, "total_s": p.total_s,
                    "source": p.source})
    return sorted(out, key=lambda c: c["t_s"])


# ---------------------------------------------------------------------------------------------
# Figures of merit


def figures_of_merit(r: Result, s: Setup) -> dict[str, Any]:
    summary = summarize(r.records, s.slo_ttft_ms / 1000, s.slo_tbt_ms / 1000)
    ttfts = [x.ttft_s for x in r.records if x.error is None and x.ttft_s is not None]
    gaps = [g for x in r.records if x.error is None for g in x.tbt_s]
    sources: dict[str, int] = {}
    start_s: dict[str, list[float]] = {}
    for c in r.cold_starts:
        if c["t_s"] >= 0:  # the starts during the run, not the deploy's first replica
            sources[c["source"]] = sources.get(c["source"], 0) + 1
            start_s.setdefault(c["source"], []).append(float(c["total_s"] or math.nan))
    return {"requests": len(r.records), "failed": summary.failed,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tbt_p99_s": percentile(gaps, 99), "slo_attainment": summary.slo_attainment,
            "ttft_attainment": summary.ttft_attainment, "tbt_attainment": summary.tbt_attainment,
            "replica_s": replica_seconds(r.polls, r.window_end_s),
            "capacity_s": time_to_replicas(r.polls, r.arrivals_s[0], s.nodes),
            "peak_replicas": max((p.running for p in r.polls), default=0),
            "starts": sum(1 for c in r.cold_starts if c["t_s"] >= 0),
            "sources": sources, "loadtest_rc": r.loadtest_rc,
            "start_s_p50": {k: percentile(v, 50) for k, v in start_s.items()}}


def figure(results: Sequence[Result], s: Setup, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = plt.figure(figsize=(11, 2.4 * len(results) + 3.2))
    grid = fig.add_gridspec(len(results) + 1, 1, height_ratios=[1] * len(results) + [1.3])
    end = max(r.window_end_s for r in results)
    for k, r in enumerate(results):
        ax = fig.add_subplot(grid[k])
        bins = [i * 1.0 for i in range(int(end) + 2)]
        ax2 = ax.twinx()
        ax2.hist(r.arrivals_s, bins=bins, color="0.85", label="requests sent / s")
        ax2.set_ylabel("req/s", fontsize=8)
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        pts = sorted(r.polls, key=lambda p: p.t_s)
        ax.step([p.t_s for p in pts], [p.running for p in pts], where="post",
                color=COLORS[r.system], label="serving")
        ax.step([p.t_s for p in pts], [p.running + p.starting for p in pts],
                where="post", color=COLORS[r.system], linestyle="--", alpha=0.7,
                label="serving + starting")
        ax.set_ylim(0, s.nodes + 0.5)
        ax.set_xlim(0, end)
        ax.set_ylabel("replicas")
        ax.set_title(LABELS[r.system], fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right")
    ax = fig.add_subplot(grid[-1])
    for r in results:
        xs = sorted(x.ttft_s for x in r.records if x.error is None and x.ttft_s is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                    color=COLORS[r.system], label=LABELS[r.system])
    ax.axvline(s.slo_ttft_ms / 1000, color="0.4", linestyle=":", label="TTFT target")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def fmt_s(v: float) -> str:
    return "never" if math.isinf(v) else ("n/a" if math.isnan(v) else f"{v:.2f}")


def table(foms: dict[str, dict[str, Any]]) -> str:
    rows = ["| system | requests | failed | TTFT p50 (s) | TTFT p99 (s) | TBT p99 (ms) | SLO "
            "attainment | replica-s | to all replicas (s) | replica starts: weights from (median start) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, f in foms.items():
        src = ", ".join(f"{k} {v} ({f['start_s_p50'][k]:.0f} s)"
                        for k, v in sorted(f["sources"].items())) or "-"
        rows.append(f"| {LABELS[name]} | {f['requests']} | {f['failed']} | "
                    f"{fmt_s(f['ttft_p50_s'])} | {fmt_s(f['ttft_p99_s'])} | "
                    f"{f['tbt_p99_s'] * 1000:.0f} | {f['slo_attainment'] * 100:.0f} % | "
                    f"{f['replica_s']:.0f} | {fmt_s(f['capacity_s'])} | {f['starts']} ({src}) |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 GPU nodes, 60 s of the window at 2x")
    ap.add_argument("--nodes", type=int, default=None, help="GPU nodes (default 4; quick 2)")
    ap.add_argument("--rate", default="500mbit", help="every host's link (tc units)")
    ap.add_argument("--store-rate", default=None, help="the object store's link (default --rate)")
    ap.add_argument("--node-cpus", type=float, default=None,
                    help=f"each GPU node's CPU budget in cores (default {GPU_NODES_CPUS:g} / "
                         "nodes, at most 0.5)")
    ap.add_argument("--speedup", type=float, default=None,
                    help="trace time compression (default 1: real time; quick 2)")
    ap.add_argument("--rate-scale", type=float, default=0.08, help="share of requests kept")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    from faascale.engine.sources import resolve_packed
    from faascale.pipecast.emulated import EmulatedCluster

    ok, why = EmulatedCluster.available()
    if not ok:
        raise SystemExit(f"the emulated cluster is unavailable here: {why}")
    if shutil.which("radosgw") is None:
        raise SystemExit("Ceph RGW is not installed: run scripts/ensure-ceph.sh")
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in SYSTEMS for x in systems):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}")
    nodes = args.nodes or (2 if args.quick else 4)
    t_start = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="faascale-bursty-", dir="/var/tmp"))
    node_cpus = args.node_cpus or round(min(0.5, GPU_NODES_CPUS / nodes), 2)
    speedup = args.speedup or (2.0 if args.quick else 1.0)
    s = Setup(work, nodes, args.rate, args.store_rate or args.rate, node_cpus, speedup,
              args.rate_scale, QUICK_WINDOW_S if args.quick else WINDOW_S)
    objects = work / "objects"
    (objects / "models").mkdir(parents=True)
    packed = resolve_packed(MODEL, dtype="float32", num_blocks=6, cache_dir=objects / "models")
    log(f"model packed at {packed}; work in {work}")
    results: list[Result] = []
    try:
        with EmulatedCluster(s.num_hosts, rate=s.rate) as cluster:
            if s.store_rate != s.rate:
                cluster.set_rate(STORE, s.store_rate)
            for i in range(FIRST_NODE, s.num_hosts + 1):
                cluster.limit_cpu(i, s.node_cpus)
            start_store(s, cluster)
            log(f"S3 (Ceph RGW) up on host {STORE}")
            for system in systems:
                results.append(run_system(s, cluster, system, objects))
    finally:
        log(f"logs in {work}")
    elapsed = time.perf_counter() - t_start
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    foms = {r.system: figures_of_merit(r, s) for r in results}
    text = table(foms)
    print(text)
    res: dict[str, Any] = {"quick": args.quick, "nodes": nodes, "rate": s.rate,
                           "failed_requests": sum(f["failed"] for f in foms.values()),
                           "elapsed_s": round(elapsed, 1)}
    for name, f in foms.items():
        res |= {f"{name}_ttft_p99_s": f["ttft_p99_s"], f"{name}_replica_s": f["replica_s"],
                f"{name}_slo_attainment": f["slo_attainment"]}
    us = foms.get("faascale")
    for other, key in (("storage", "storage"), ("hostcache", "hostcache")):
        if us and other in foms:
            res[f"p99_ttft_vs_{key}"] = us["ttft_p99_s"] / foms[other]["ttft_p99_s"]
            res[f"replica_s_vs_{key}"] = us["replica_s"] / foms[other]["replica_s"]
    if not args.quick and not args.no_report:  # a quick run checks the pipeline: no report
        fig = FIGURES / "bursty.png"
        has_fig = figure(results, s, fig)
        report(s, foms, res, text, elapsed, load_before, load_after, has_fig, fig)
    emit({k: round(v, 3) if isinstance(v, float) and math.isfinite(v) else v
          for k, v in res.items()})


def report(s: Setup, foms: dict[str, dict[str, Any]], res: dict[str, Any], text: str,
           elapsed: float, load_before: str, load_after: str, has_fig: bool, fig: Path) -> None:
    from ray.serve.config import AutoscalingConfig

    serve = AutoscalingConfig()  # the storage system's delays: Ray Serve's defaults
    n = len(schedule(s))
    write_section("bursty", f"""## Bursty load end to end (`benchmarks/bursty.py`)

Command: `{command_line()}` at `{git_rev()}`,
{time.strftime('%Y-%m-%d')}, {elapsed:.0f} s. Machine: {machine()}.
Load average {load_before} before, {load_after} after.

A real Ray cluster of {s.nodes + 1} nodes in network namespaces (`faascale/pipecast/emulated.py`),
links {s.rate} in and out: the head (platform, Locust), the object store (Ceph RGW, link
{s.store_rate}) and {s.nodes} GPU nodes with one emulated GPU each (one replica per node) and a
CPU budget of {s.node_cpus:g} cores each (a cgroup quota: the replica computes there, and a node
starting a replica never slows another node down). SmolLM2-135M fp32 (651 MB of blocks), one warm
replica at the start, at most {s.nodes}. Trace: Azure LLM 2023 code, {s.window_s:.0f} s from
t = {WINDOW_START_S:.0f} s, {s.speedup:g}x faster, {s.rate_scale:g} of the requests kept
({n} requests), prompts ≤ {s.max_prompt_tokens} and outputs ≤ {s.max_output_tokens} tokens.
Targets: TTFT ≤ {s.slo_ttft_ms:.0f} ms, TBT ≤ {s.slo_tbt_ms:.0f} ms. Replica-seconds = serving +
starting replicas over the same window for every system (last arrival
+ {TAIL_S:.0f} s). "To all replicas" = from the burst's first request until {s.nodes} replicas
serve.

{text}

{verdicts(res)}
{"" if not has_fig else chr(10) + f"![bursty: replicas over time and TTFT CDFs](figures/{fig.name})" + chr(10)}
Top: replicas serving (solid) and serving + starting (dashed) per system, over the requests sent
per second (grey). Bottom: TTFT CDFs (log scale).

{starts_text(foms)}

Reading it: the trace's first burst (about 40 requests in 7 s after minutes of quiet) meets one
warm replica in every system; its p99 TTFT is how long that replica's queue lasts, which is how
soon new replicas serve. Ray Serve's default policy waits {serve.upscale_delay_s:.0f} s of
sustained load before it adds any, then every new replica pulls the model from the store over
the store's one link, together. The host-cache system orders replicas at once (our policy), but
on nodes that never served the model it loads from the store the same way; its cache pays off
only when a node served the model before (the second burst: HOST and DISK starts). faascale's
new replicas copy the blocks from the replica already serving (PipeCast), their multicast
independent of the store, and serve through temporary pipelines before each holds the whole
model. A start has a fixed part no loading removes (the replica's process and imports, the
tokenizer: the "HOST" median above is about that part alone), at a {s.node_cpus:g}-core budget,
and it bounds what any system gains here. Storage keeps its replicas ({serve.downscale_delay_s:.0f}
s downscale delay), which makes its second burst fast and its replica-seconds high. The 3x target against storage is out of reach on this emulation: the first burst's
tail is one replica's queue until help arrives, and here help cannot arrive sooner than the
start's fixed part (about 13 s) plus one model copy over one link (651 MB at the link rate),
while storage's own tail is bounded by how fast its single replica drains the same queue.
""")


def verdicts(res: dict[str, Any]) -> str:
    """The issue's targets, each with its measured ratio and pass/fail."""
    def line(key: str, target: str, ok: bool | None) -> str:
        value = res.get(key)
        shown = "n/a" if value is None else f"{value:.2f}x"
        mark = "n/a" if ok is None else ("**pass**" if ok else "**miss**")
        return f"| {key} | {shown} | {target} | {mark} |"

    def check(key: str, limit: float) -> bool | None:
        v = res.get(key)
        return None if v is None or not math.isfinite(v) else v <= limit

    rows = ["| ratio (faascale / baseline) | measured | target | |", "|---|---:|---|---|",
            line("p99_ttft_vs_storage", "≤ 0.33 (3x lower)", check("p99_ttft_vs_storage", 1 / 3)),
            line("p99_ttft_vs_hostcache", "< 1", check("p99_ttft_vs_hostcache", 0.999)),
            line("replica_s_vs_storage", "≤ 1", check("replica_s_vs_storage", 1.0)),
            line("replica_s_vs_hostcache", "≤ 1", check("replica_s_vs_hostcache", 1.0))]
    failed = res["failed_requests"]
    return "\n".join(rows) + f"\n\nFailed requests, all systems: **{failed}** (target 0: " \
        f"{'pass' if failed == 0 else 'miss'})."


def starts_text(foms: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, f in foms.items():
        srcs = ", ".join(f"{v} from {k} (median {f['start_s_p50'][k]:.0f} s)"
                         for k, v in sorted(f["sources"].items()))
        parts.append(f"{LABELS[name]}: {srcs or 'no new replica'}")
    return ("Replica starts during the run (from the replica's process start to serving, its "
            "own `StartupProfile`): " + "; ".join(parts) + ".")


if __name__ == "__main__":
    main()
