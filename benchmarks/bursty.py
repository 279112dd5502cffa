"""Bursty load end to end: faascale against four baselines that each isolate one claim, on one
emulated multi-node cluster, under the same window of a real trace, repeated.

The cluster (``EmulatedCluster``: network namespaces, every link shaped to ``--rate`` in and
out) is a real multi-node Ray cluster, one ``ray start`` per host:

- host 1, the head: Ray's head node, the faascale platform (gateway, Serve controller, PipeCast
  coordinator, events), and the load generator (Locust, through ``faascale loadtest``);
- host 2, the object store: a real S3 server (Ceph RGW) on its own link (``--store-rate``);
- hosts 3..N+2, the GPU nodes: one Ray node each with one (emulated) GPU, so at most one replica
  per node, and its own CPU budget (a cgroup quota). Replicas compute on the CPU.

Every run is a fresh Ray cluster and platform (empty HOST and DISK tiers; the store keeps the
packed model), deploys the same function (SmolLM2-135M fp32, 651 MB of blocks) with one warm
replica, sends no warm-up request (nothing reaches a policy's trend before the trace), and then
gets the same trace window (Azure LLM 2023 code, from t = 840 s: a burst, a busy stretch, a long
idle gap and a second burst), thinned by ``--rate-scale``. Systems (``scaling`` settings of the
same platform; see ``SYSTEMS``):

1. ``faascale``: our policy (cold-start-aware, scale-ahead, keep-alive), PipeCast (multicast
   from every holder, temporary pipelines while loading), loads through the HOST/DISK tiers;
2. ``serve-default``: Ray Serve's default autoscaling policy and delays (30 s up, 600 s down);
   every replica downloads the model from the object store (``load_from: store``: no node tier
   is read or filled), as Ray Serve LLM loads from S3;
3. ``store-only``: our policy, store-only loads (isolates loading from policy);
4. ``no-pipecast``: our policy, HOST/DISK/REMOTE tiers, no multicast, no execute-while-load;
5. ``serverlessllm-like``: what ServerlessLLM does: the checkpoint pre-staged on every node's
   DISK tier before the run (its ``sllm-store save``; ``NodeBlocks.stage_model``), fast local
   loading from there, its autoscaling (desired = ceil(in flight / target), one replica a second,
   down after ``keep_alive_s`` = the function's 10 s without a new request;
   ``faascale/platform/sllm_policy.py``); every node holds the checkpoint, so every placement
   is local (its storage-aware placement has nothing to choose); no multicast;
6. ``faascale-warm``: ``faascale`` with warm runtimes (``platform/warm_pool.py``: every Ray
   worker preloads torch and the engine, one idle worker kept per node), so a new replica skips
   the process start and imports. The other systems (``faascale`` included) start their
   replicas' processes on demand (``FAASCALE_WARM_POOL=off``), as Ray Serve does.

Runs: ``--reps`` repetitions of a window around the first burst (``--rep-window-s``), the systems
interleaved in a rotated order each repetition; one repetition with the store's link at
``--store-factor`` times a node's (an S3 that serves many clients at line rate); and, with
``--full``, one run per system over the whole 320 s window. Every run is appended to
``--runs`` (JSON lines) as it finishes; ``--report-only`` rebuilds the report from that file.

Per run: TTFT p50/p99, TBT p99, SLO attainment, failed requests, replica-seconds (serving +
starting, over the same window), time from the burst's first request until N replicas serve
*holding the whole model* (a replica serving through a temporary pipeline is not capacity yet),
the replica starts and their sources, and the scale-ups ordered before the trace (must be 0).
Reported: the median over the repetitions and the min-max spread.

JSON keys (each ours ÷ theirs over the medians of the burst repetitions; < 1 = faascale lower,
i.e. better for TTFT and cheaper for replica-seconds): ``p99_ttft_vs_storage`` (vs
``serve-default``), ``p99_ttft_vs_store_only``, ``p99_ttft_vs_no_pipecast``, ``p99_ttft_vs_sllm``,
``replica_s_vs_storage``, ``replica_s_vs_sllm``; ``p99_ttft_warm_vs_cold`` and
``replica_s_warm_vs_cold`` (faascale-warm ÷ faascale: < 1 = the warm runtimes lower it);
``failed_requests`` (all runs, target 0);
``pre_trace_scaleups`` (all runs, must be 0).

    python benchmarks/bursty.py [--quick] [--reps 3] [--full] [--append] [--nodes 4]
                                [--rate 500mbit] [--store-factor 4]
                                [--systems faascale,serve-default,...]

``--quick``: 2 GPU nodes, one repetition of a 30 s window, every system, no sweep, no report
(about 8 min: five Ray clusters boot one after the other). Needs root (network namespaces),
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

from benchmarks.bursty_report import SYSTEM_KEYS, fold_runs, newest_per_system, report  # noqa: E402
from benchmarks.common import ROOT, emit, git_rev, release_host_tiers  # noqa: E402
from loadtest.report import load_records, load_replicas  # noqa: E402
from faascale.stats import percentile  # noqa: E402
from loadtest.workload import (replica_seconds, summarize, time_to_replicas,  # noqa: E402
                               trace_schedule)

HEAD, STORE, FIRST_NODE = 1, 2, 3
RAY_PORT, GATEWAY_PORT, S3_PORT = 6379, 8080, 7480
BUCKET = "faascale-bench"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
           "AWS_DEFAULT_REGION": "us-east-1"}
MODEL = "bundled://smollm2-135m-instruct"
SYSTEMS = {  # name -> the function's scaling settings that make it that system
    "faascale": {"policy": "faascale", "pipecast": True, "load_from": "tiers"},
    "serve-default": {"policy": "serve", "pipecast": False, "load_from": "store"},
    "store-only": {"policy": "faascale", "pipecast": False, "load_from": "store"},
    "no-pipecast": {"policy": "faascale", "pipecast": False, "load_from": "tiers"},
    "serverlessllm-like": {"policy": "serverlessllm", "pipecast": False, "load_from": "tiers",
                           "stage_disk": True},
    # faascale with warm runtimes (warm_pool.py: Ray workers preloaded, one kept idle per node);
    # every other system starts its replicas' processes on demand, as Ray Serve does
    "faascale-warm": {"policy": "faascale", "pipecast": True, "load_from": "tiers",
                      "warm_pool": True},
}
WINDOW_START_S, WINDOW_S = 840.0, 320.0  # the code trace: both bursts and the idle gap between
REP_WINDOW_S, QUICK_WINDOW_S = 60.0, 30.0  # the first burst and the start of the busy stretch
TAIL_S = 15.0  # the cost window runs this long after the last arrival, for every system
# The GPU nodes together get at most this many of the machine's 2 cores (each its own quota), so
# the head (platform, Locust) and the store keep the rest: a node's work (a replica starting, a
# multicast) never slows another node's replica, as on a real cluster.
GPU_NODES_CPUS = 1.4
READY_TIMEOUT_S = 300.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Setup:
    work: Path
    nodes: int
    rate: str
    node_cpus: float  # each GPU node's CPU budget (cores): its own "GPU", not shared
    rate_scale: float
    max_prompt_tokens: int = 128
    max_output_tokens: int = 32
    # Targets for this emulated node (a 0.35-core "GPU": warm TTFT about 1 s, about 0.3 s a token)
    slo_ttft_ms: float = 3000.0
    slo_tbt_ms: float = 1000.0
    target_concurrency: int = 2

    @property
    def num_hosts(self) -> int:
        return self.nodes + 2


@dataclass(frozen=True)
class RunPlan:
    """One run: a system, over a window, with the store's link at a rate."""

    system: str
    kind: str  # "burst" (a repetition), "store" (the store-rate sweep), "full" (the whole window)
    rep: int
    window_s: float
    store_rate: str


def base_env(s: Setup, cluster: Any) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "FAASCALE_S3_ENDPOINT": f"http://{cluster.host_address(STORE)}:{S3_PORT}",
            "FAASCALE_S3_BUCKET": BUCKET, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "FAASCALE_WARM_POOL": "off", **S3_KEYS}


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


def start_ray(s: Setup, cluster: Any, temp: Path, log_file: Path, warm: bool = False) -> None:
    """The head on host 1 (no GPU: replicas never land there), one GPU node per other host;
    ``warm``: every worker preloads the warm runtime (the head's system config)."""
    from faascale.platform.warm_pool import head_system_config_args

    env = base_env(s, cluster)
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--disable-usage-stats", "--object-store-memory", str(200 << 20)]
    in_host(cluster, HEAD, [ray, "start", "--head", "--node-ip-address", cluster.host_address(HEAD),
                            "--port", str(RAY_PORT), "--num-cpus", "4", "--num-gpus", "0",
                            "--include-dashboard=false", "--temp-dir", str(temp), *common,
                            *(head_system_config_args() if warm else [])],
            env, 120, log_file)
    address = f"{cluster.host_address(HEAD)}:{RAY_PORT}"
    # One at a time: nodes on one machine share the head's session directory, and two starting
    # at once time out (their raylets race for it).
    for i in range(FIRST_NODE, s.num_hosts + 1):
        in_host(cluster, i, [ray, "start", "--address", address, "--node-ip-address",
                             cluster.host_address(i), "--num-cpus", "1", "--num-gpus", "1",
                             *common], env, 120, log_file)


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


# ---------------------------------------------------------------------------------------------
# One run


def function_spec(s: Setup, system: str) -> str:
    cfg = SYSTEMS[system]
    return f"""name: bursty
description: SmolLM2-135M-Instruct as {system}
model:
  source: {MODEL}
  dtype: float32
  blocks: 6
engine:
  max_seq_len: 512
  max_batch_size: {2 * s.target_concurrency}
  num_threads: 1
  device: cpu  # num_gpus places one replica per emulated node: a Ray resource, no GPU
scaling:
  min_replicas: 1
  max_replicas: {s.nodes}
  target_concurrency: {s.target_concurrency}
  keep_alive_s: 10
  downscale_delay_s: 20
  pipecast: {str(cfg['pipecast']).lower()}
  load_from: {cfg['load_from']}
  policy: {cfg['policy']}
  cold_start_timeout_s: 300
slo:
  ttft_ms: {s.slo_ttft_ms:g}
  tbt_ms: {s.slo_tbt_ms:g}
resources:
  num_cpus: 0
  num_gpus: 1
"""


STAGE = """
import json, os, sys
from pathlib import Path
import ray
from faascale.memory_tier.node import TierConfig, split_location, stage_everywhere
from faascale.memory_tier.packed import read_packed_metadata
from faascale.memory_tier.store import open_store
ray.init(address=sys.argv[1], namespace="faascale", logging_level="ERROR")
location = sys.argv[2]
store_uri, prefix = split_location(location)
manifest, _ = read_packed_metadata(open_store(store_uri), prefix)
tiers = TierConfig.for_state_dir(Path(os.environ["FAASCALE_HOME"]))
print(json.dumps(stage_everywhere(tiers, manifest.to_json(), location)))
"""


def run_one(s: Setup, cluster: Any, plan: RunPlan, objects: Path) -> dict[str, Any]:
    """A fresh Ray cluster and platform, the function deployed (one warm replica, staged for
    the systems that stage), the load test; returns the run's record (JSON-able)."""
    d = s.work / f"{plan.kind}{plan.rep}-{plan.system}"
    home = d / "home"
    home.mkdir(parents=True)
    (home / "objects").symlink_to(objects)  # the packed model: packed once, uploaded once
    fn = d / "function"
    fn.mkdir()
    (fn / "function.yaml").write_text(function_spec(s, plan.system))
    warm = bool(SYSTEMS[plan.system].get("warm_pool"))
    env = {**base_env(s, cluster), "FAASCALE_HOME": str(home),
           **({"FAASCALE_WARM_POOL": "auto"} if warm else {})}
    faascale = str(Path(sys.executable).with_name("faascale"))
    logf = d / "bench.log"
    temp = Path(tempfile.mkdtemp(prefix="fsb", dir="/tmp"))  # Ray's sockets: keep the path short
    address = f"{cluster.host_address(HEAD)}:{RAY_PORT}"
    try:
        t0 = time.monotonic()
        start_ray(s, cluster, temp, logf, warm=warm)
        server_log = (d / "platform.log").open("w")
        cluster.run(HEAD, [sys.executable, "-m", "faascale.platform.server", "--home", str(home),
                           "--host", cluster.host_address(HEAD), "--port", str(GATEWAY_PORT),
                           "--address", address],
                    env=env, stdout=server_log, stderr=subprocess.STDOUT)
        _wait(lambda: _running(cluster, env) >= 0, 120, "the platform")
        in_host(cluster, HEAD, [faascale, "deploy", str(fn)], env, READY_TIMEOUT_S, logf)
        _wait(lambda: _running(cluster, env) >= 1, READY_TIMEOUT_S, "the first replica")
        staged = None
        if SYSTEMS[plan.system].get("stage_disk"):
            location = _status(cluster, env)["model_dir"]
            out = in_host(cluster, HEAD, [sys.executable, "-c", STAGE, address, location], env,
                          READY_TIMEOUT_S, logf)
            staged = json.loads(out.strip().splitlines()[-1])
        log(f"{plan.system} ({plan.kind} {plan.rep}): deployed, one replica serving"
            f"{', staged on every node' if staged else ''}, {time.monotonic() - t0:.0f} s")
        ready_epoch_s = time.time()
        arrivals = schedule(plan.window_s, s)
        out_dir = d / "loadtest"
        lt = subprocess.run(["ip", "netns", "exec", cluster.namespace(HEAD), faascale, "loadtest",
                             "bursty", "--shape", "trace", "--trace", "code",
                             "--window-start-s", str(WINDOW_START_S), "--window-s",
                             str(plan.window_s), "--speedup", "1", "--rate-scale",
                             str(s.rate_scale), "--max-prompt-tokens", str(s.max_prompt_tokens),
                             "--max-output-tokens", str(s.max_output_tokens), "--out",
                             str(out_dir), "--tail-s", str(TAIL_S)],
                            env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=plan.window_s + 900)
        (d / "loadtest.log").write_text(lt.stdout + lt.stderr)
        started = float(json.loads((out_dir / "slo.json").read_text())["started_epoch_s"])
        records = load_records(out_dir / "slo")
        polls = load_replicas(out_dir / "slo", started)
        log(f"{plan.system}: {len(records)} requests, loadtest exit {lt.returncode}")
        starts = cold_starts(home, started)
        return {"plan": plan.__dict__, "git": git_rev(), "at": time.strftime("%Y-%m-%d %H:%M"),
                "loadtest_rc": lt.returncode, "arrivals_s": arrivals,
                "window_end_s": arrivals[-1] + TAIL_S, "staged": staged,
                # nothing may scale before the trace: intents (our policy) and, for every
                # policy, replicas beyond the warm one at the load test's first poll
                "pre_trace_scaleups": _scaleups(home, ready_epoch_s, started) + max(
                    0, (polls[0].running + polls[0].starting - 1) if polls and polls[0].t_s < 2 else 0),
                "ttft_s": [r.ttft_s for r in records if r.error is None and r.ttft_s is not None],
                "tbt_s": [g for r in records if r.error is None for g in r.tbt_s],
                "foms": figures_of_merit(records, polls, starts, arrivals, s),
                "polls": [[round(p.t_s, 2), p.running, p.starting, p.num_full] for p in polls],
                "starts": starts, "intents": intents(home, started)}
    finally:
        stop_host(cluster, HEAD)
        for i in range(FIRST_NODE, s.num_hosts + 1):
            stop_host(cluster, i)
        shutil.rmtree(temp, ignore_errors=True)
        release_host_tiers(home)  # this run's HOST tier is RAM: give it back


def _status(cluster: Any, env: dict[str, str]) -> dict[str, Any]:
    code = PROBE.replace("print(json.dumps(names))", "print(json.dumps(client.status('bursty')))")
    done = subprocess.run(["ip", "netns", "exec", cluster.namespace(HEAD), sys.executable, "-c",
                           code], env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scaleups(home: Path, from_epoch_s: float, to_epoch_s: float) -> int:
    """Scale-ups the policy ordered after the function was ready and before the trace began."""
    from faascale.platform.registry import Registry

    n = 0
    for e in Registry(home / "registry.db").events_of_kind("scale_intent"):
        at = float(e.get("at_s") or 0.0)
        if from_epoch_s <= at < to_epoch_s and int(e.get("to_replicas", 0)) > int(e.get("from_replicas", 0)):
            n += 1
    return n


def intents(home: Path, started_epoch_s: float) -> list[list[float]]:
    """The policy's scale intents: [s from the load test's start, from replicas, to replicas]."""
    from faascale.platform.registry import Registry

    return sorted([round(float(e.get("at_s") or 0.0) - started_epoch_s, 2),
                   int(e.get("from_replicas", 0)), int(e.get("to_replicas", 0))]
                  for e in Registry(home / "registry.db").events_of_kind("scale_intent"))


def schedule(window_s: float, s: Setup) -> list[float]:
    """The arrival times (s from the load test's start) the load test sends: the same call."""
    arrivals = trace_schedule("code", WINDOW_START_S, window_s, 1.0, s.rate_scale,
                              s.max_prompt_tokens, s.max_output_tokens, 0)
    return [a.t_s for a in arrivals]


def cold_starts(home: Path, started_epoch_s: float) -> list[dict[str, Any]]:
    """Every replica start the platform recorded (its ``StartupProfile``): when, from the load
    test's start; where its weights came from; how long it took to serve; whether it found a
    warm runtime; its steps (seconds each)."""
    from faascale.coldstart.profile import StartupProfile
    from faascale.platform.registry import STARTUP_PROFILE, Registry

    out = []
    for event in Registry(home / "registry.db").events_of_kind(STARTUP_PROFILE):
        p = StartupProfile.from_dict(event["profile"])
        out.append({"t_s": round(p.started_at_s - started_epoch_s, 2), "total_s": p.total_s,
                    "source": p.source, "warm": p.warm, "replica": p.replica,
                    "steps_s": {k: round(v, 3) for k, v in p.steps().items()}})
    return sorted(out, key=lambda c: c["t_s"])


def figures_of_merit(records: Sequence[Any], polls: Sequence[Any], starts: Sequence[dict],
                     arrivals: Sequence[float], s: Setup) -> dict[str, Any]:
    summary = summarize(records, s.slo_ttft_ms / 1000, s.slo_tbt_ms / 1000)
    ttfts = [x.ttft_s for x in records if x.error is None and x.ttft_s is not None]
    gaps = [g for x in records if x.error is None for g in x.tbt_s]
    during = [c for c in starts if c["t_s"] >= 0]  # not the deploy's first replica
    sources: dict[str, list[float]] = {}
    for c in during:
        sources.setdefault(c["source"], []).append(float(c["total_s"] or math.nan))
    return {"requests": len(records), "failed": summary.failed,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tbt_p99_s": percentile(gaps, 99), "slo_attainment": summary.slo_attainment,
            "replica_s": replica_seconds(polls, arrivals[-1] + TAIL_S),
            "capacity_s": time_to_replicas(polls, arrivals[0], s.nodes),
            "peak_full": max((p.num_full for p in polls), default=0),
            "starts": len(during),
            "sources": {k: [len(v), percentile(v, 50)] for k, v in sorted(sources.items())}}


# ---------------------------------------------------------------------------------------------


def scale_rate(rate: str, factor: float) -> str:
    """``500mbit`` x 4 -> ``2000mbit`` (tc units)."""
    digits = rate.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return f"{float(digits) * factor:g}{rate[len(digits):]}"


def plans(systems: Sequence[str], reps: int, window_s: float, rate: str, store_factor: float,
          full: bool) -> list[RunPlan]:
    """The repetitions, systems interleaved and rotated (rep k starts at system k), then the
    store sweep (one repetition), then the full-window runs."""
    out = []
    for rep in range(reps):
        order = list(systems[rep % len(systems):]) + list(systems[:rep % len(systems)])
        out += [RunPlan(x, "burst", rep, window_s, rate) for x in order]
    if store_factor and store_factor != 1:
        out += [RunPlan(x, "store", 0, window_s, scale_rate(rate, store_factor)) for x in systems]
    if full:
        out += [RunPlan(x, "full", 0, WINDOW_S, rate) for x in systems]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"2 GPU nodes, one repetition of {QUICK_WINDOW_S:.0f} s, no sweep, no report")
    ap.add_argument("--nodes", type=int, default=None, help="GPU nodes (default 4; quick 2)")
    ap.add_argument("--rate", default="500mbit", help="every host's link (tc units)")
    ap.add_argument("--store-factor", type=float, default=4.0,
                    help="the sweep's store link as a multiple of --rate (1: no sweep)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the burst window")
    ap.add_argument("--rep-window-s", type=float, default=REP_WINDOW_S)
    ap.add_argument("--full", action="store_true", help="also one full-window run per system")
    ap.add_argument("--node-cpus", type=float, default=None,
                    help=f"each GPU node's CPU budget in cores (default {GPU_NODES_CPUS:g} / "
                         "nodes, at most 0.5)")
    ap.add_argument("--rate-scale", type=float, default=0.08, help="share of requests kept")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--runs", type=Path, default=ROOT / "docs" / "data" / "bursty-runs.jsonl",
                    help="where every run is appended (JSON lines)")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in --runs and report over all of them (e.g. "
                         "--reps 0 --store-factor 1 --full adds the whole-window runs)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from --runs")
    args = ap.parse_args()
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    if not systems or any(x not in SYSTEMS for x in systems):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}")
    nodes = args.nodes or (2 if args.quick else 4)
    node_cpus = args.node_cpus or round(min(0.5, GPU_NODES_CPUS / nodes), 2)
    if args.report_only:
        runs = [json.loads(x) for x in args.runs.read_text().splitlines() if x.strip()]
        return finish(runs, args, nodes, node_cpus, write=True)
    from faascale.engine.sources import resolve_packed
    from faascale.pipecast.emulated import EmulatedCluster

    ok, why = EmulatedCluster.available()
    if not ok:
        raise SystemExit(f"the emulated cluster is unavailable here: {why}")
    if shutil.which("radosgw") is None:
        raise SystemExit("Ceph RGW is not installed: run scripts/ensure-ceph.sh")
    work = Path(tempfile.mkdtemp(prefix="faascale-bursty-", dir="/var/tmp"))
    s = Setup(work, nodes, args.rate, node_cpus, args.rate_scale)
    todo = (plans(systems, 1, QUICK_WINDOW_S, args.rate, 1, False) if args.quick else
            plans(systems, args.reps, args.rep_window_s, args.rate, args.store_factor, args.full))
    objects = work / "objects"
    (objects / "models").mkdir(parents=True)
    packed = resolve_packed(MODEL, dtype="float32", num_blocks=6, cache_dir=objects / "models")
    log(f"model packed at {packed}; work in {work}; {len(todo)} runs")
    runs: list[dict[str, Any]] = []
    if not args.quick:
        args.runs.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.runs.exists():
            runs = [json.loads(x) for x in args.runs.read_text().splitlines() if x.strip()]
        else:
            args.runs.write_text("")  # this invocation's runs only
    try:
        with EmulatedCluster(s.num_hosts, rate=s.rate) as cluster:
            for i in range(FIRST_NODE, s.num_hosts + 1):
                cluster.limit_cpu(i, s.node_cpus)
            start_store(s, cluster)
            log(f"S3 (Ceph RGW) up on host {STORE}")
            for plan in todo:
                cluster.set_rate(STORE, plan.store_rate)
                run = run_one(s, cluster, plan, objects)
                run["setup"] = {"nodes": nodes, "rate": s.rate, "node_cpus": node_cpus,
                                "rate_scale": s.rate_scale, "slo_ttft_ms": s.slo_ttft_ms,
                                "slo_tbt_ms": s.slo_tbt_ms}
                runs.append(run)
                if not args.quick:
                    with args.runs.open("a") as f:
                        f.write(json.dumps(run) + "\n")
    finally:
        log(f"logs in {work}")
    finish(runs, args, nodes, node_cpus, write=not args.quick)


def finish(runs: list[dict[str, Any]], args: Any, nodes: int, node_cpus: float,
           write: bool) -> None:
    runs = newest_per_system(runs)
    folded = fold_runs(runs)
    res: dict[str, Any] = {"quick": args.quick, "nodes": nodes, "runs": len(runs),
                           "failed_requests": sum(r["foms"]["failed"] for r in runs),
                           "pre_trace_scaleups": sum(r["pre_trace_scaleups"] for r in runs)}
    burst = folded.get("burst", {})
    us = burst.get("faascale")
    for other, key in SYSTEM_KEYS.items():
        if us and other in burst:
            res[f"p99_ttft_vs_{key}"] = us["ttft_p99_s"]["median"] / burst[other]["ttft_p99_s"]["median"]
            if key in ("storage", "sllm"):
                res[f"replica_s_vs_{key}"] = us["replica_s"]["median"] / burst[other]["replica_s"]["median"]
    warm = burst.get("faascale-warm")
    if us and warm:  # the warm runtimes' effect: faascale-warm / faascale
        res["p99_ttft_warm_vs_cold"] = warm["ttft_p99_s"]["median"] / us["ttft_p99_s"]["median"]
        res["replica_s_warm_vs_cold"] = warm["replica_s"]["median"] / us["replica_s"]["median"]
    if write:
        report(runs, folded, res, node_cpus)
    emit({k: round(v, 3) if isinstance(v, float) and math.isfinite(v) else v
          for k, v in res.items()})


if __name__ == "__main__":
    main()
