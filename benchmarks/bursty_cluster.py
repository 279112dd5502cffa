"""The bursty benchmark's emulated cluster, shared by every system it runs (``bursty.py``: the
faascale platform's systems; ``bursty_serve_llm.py``: Ray Serve LLM): the setup, the hosts (the
head, the S3 store, the GPU nodes), Ray on them, and the figures of merit of one run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT  # noqa: E402
from faascale.coldstart.vllm_run import process_alive  # noqa: E402
from faascale.stats import percentile  # noqa: E402
from loadtest.workload import (replica_seconds, summarize, time_to_replicas,  # noqa: E402
                               trace_schedule)

HEAD, STORE, FIRST_NODE = 1, 2, 3
RAY_PORT, GATEWAY_PORT, S3_PORT = 6379, 8080, 7480
BUCKET = "faascale-bench"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
           "AWS_DEFAULT_REGION": "us-east-1"}
WINDOW_START_S, WINDOW_S = 840.0, 320.0  # the code trace: both bursts and the idle gap between
TAIL_S = 15.0  # the cost window runs this long after the last arrival, for every system
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
        while time.monotonic() < deadline and any(process_alive(p) for p in pids):
            time.sleep(0.1)



def start_ray(s: Setup, cluster: Any, temp: Path, log_file: Path, warm: bool = False,
              python: str = sys.executable, env: dict[str, str] | None = None,
              node_num_cpus: int = 1) -> None:
    """The head on host 1 (no GPU: replicas never land there), one GPU node per other host;
    ``warm``: every worker preloads the warm runtime (the head's system config). ``python``:
    the interpreter whose Ray runs the cluster (its workers too: Ray Serve LLM's is
    ``.venv-vllm``'s). Besides CPUs and GPUs, the head has ``bench_head`` and each GPU node one
    ``bench_gpu`` (what Ray Serve LLM's placement asks for: its bundles name no GPU).
    ``node_num_cpus``: the CPUs a GPU node tells Ray it has (a count for placement only: the
    node's real budget is its cgroup quota, the same for every system)."""
    from faascale.platform.warm_pool import head_system_config_args

    env = env or base_env(s, cluster)
    ray = str(Path(python).with_name("ray"))
    common = ["--disable-usage-stats", "--object-store-memory", str(200 << 20)]
    in_host(cluster, HEAD, [ray, "start", "--head", "--node-ip-address", cluster.host_address(HEAD),
                            "--port", str(RAY_PORT), "--num-cpus", "4", "--num-gpus", "0",
                            "--resources", '{"bench_head": 100}',
                            "--include-dashboard=false", "--temp-dir", str(temp), *common,
                            *(head_system_config_args() if warm else [])],
            env, 120, log_file)
    address = f"{cluster.host_address(HEAD)}:{RAY_PORT}"
    # One at a time: nodes on one machine share the head's session directory, and two starting
    # at once time out (their raylets race for it).
    for i in range(FIRST_NODE, s.num_hosts + 1):
        in_host(cluster, i, [ray, "start", "--address", address, "--node-ip-address",
                             cluster.host_address(i), "--num-cpus", str(node_num_cpus),
                             "--num-gpus", "1",
                             "--resources", '{"bench_gpu": 1}', *common], env, 120, log_file)




def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")
        time.sleep(1.0)



def schedule(window_s: float, s: Setup) -> list[float]:
    """The arrival times (s from the load test's start) the load test sends: the same call."""
    arrivals = trace_schedule("code", WINDOW_START_S, window_s, 1.0, s.rate_scale,
                              s.max_prompt_tokens, s.max_output_tokens, 0)
    return [a.t_s for a in arrivals]



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


