"""Replica start: from the autoscaler's intent to a new replica that serves, on warm and cold runtimes.

A real platform (`faascale up`: Ray, Serve, the gateway, our policy) serves SmolLM2-135M (fp32, 6
blocks) with one replica; a burst of concurrent requests makes our policy order a second one. The
time measured is the policy's scale intent (its event's timestamp) to the new replica's ready
(the end of its start: weights in place, engine built, its warm-up prefill and decode done, so
its first request's first token follows at once). Each case runs on a fresh platform:

- runtime: ``warm`` (``--warm-pool 2``: the replica takes a pooled Ray worker that had imported
  torch and the engine and warmed its kernels before the intent) or ``cold`` (``--warm-pool
  off``: Ray starts the worker for it, as Ray Serve does);
- source: ``HOST`` (the first replica left the model in the node's HOST tier) or ``PEER``
  (``FAASCALE_PIPECAST_PREFER_PEERS=1``: PipeCast brings the blocks from the serving replica);
- machine: this one at full CPU, and (full run only, needs root) a 0.35-core emulated GPU node
  (``EmulatedCluster``, the bursty benchmark's node budget; both replicas on that node).

Beside each, in the same run, the weights-only time: the model's bytes ÷ the bandwidth of the
operation the source performs, measured here (HOST: memory read bandwidth, as
``benchmarks/engine.py`` measures it; PEER: a TCP stream over loopback). ``fixed = intent to ready
- weights-only``: what a start costs beyond moving its bytes at the limit.

JSON: ``warm_fixed_s``, ``cold_fixed_s`` (medians, HOST, this machine), ``warm_fixed_emulated_s``
(HOST on the 0.35-core node; null with ``--quick``), ``warm_vs_cold`` (warm intent-to-ready ÷ cold
intent-to-ready, HOST, this machine: below 1 = warm runtimes start faster), per case
``<runtime>_<source>[_emulated]_ready_s``, ``..._fixed_s`` and ``..._first_token_s`` (intent
to the new replica's first streamed token: three clients keep one request waiting at the router,
so the replica gets one as soon as Serve routes to it), ``warm_first_token_s`` and
``cold_first_token_s`` (HOST, this machine), ``idle_runtime_rss_mb`` and
``idle_runtime_rss_anon_mb`` (what one idle warm runtime holds), ``failed_requests`` (target 0)
and ``mislabelled_starts`` (starts that did not run as their case meant: a warm case that found
no warm runtime, or another source; target 0).

    python benchmarks/replica_start.py [--quick] [--reps 2] [--no-report]

``--quick``: HOST only, this machine, one repetition (about 2 minutes).
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures as cf
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (command_line, emit, git_rev, machine,  # noqa: E402
                               release_host_tiers, write_section)

ROOT = Path(__file__).resolve().parents[1]
NAME = "start"
MODEL = "bundled://smollm2-135m-instruct"
EMULATED_NODE_CPUS = 0.35
POOL = 2  # warm runtimes per node in the warm cases


def function_yaml(num_gpus: int) -> str:
    return f"""name: {NAME}
model:
  source: {MODEL}
  dtype: float32
  blocks: 6
engine:
  max_seq_len: 512
  max_batch_size: 4
  num_threads: 1
  device: cpu  # num_gpus places one replica per emulated node: a Ray resource, no GPU
scaling:
  min_replicas: 1
  max_replicas: 2
  target_concurrency: 1
  keep_alive_s: 2
  downscale_delay_s: 1
  cold_start_timeout_s: 300
resources:
  num_cpus: 0
  num_gpus: {num_gpus}
"""


# --- the measurement, run where the gateway is reachable (here, or inside the emulated head) ---

def _client(home: Path) -> Any:
    from faascale.platform.client import PlatformClient
    from faascale.platform.state import StateDir

    return PlatformClient.from_state(StateDir(str(home)), admin=True)


def _pools_ready(status: dict[str, Any], since_s: float) -> bool:
    """Every node's pool holds its target of runtimes that finished their preload (a runtime
    still importing on the node where the replica starts would share its CPUs)."""
    from faascale.platform.warm_runtime import ready_marker

    def ready(pid: int) -> bool:
        try:
            return float(ready_marker(pid).read_text()) > since_s
        except (OSError, ValueError):
            return False

    pools = status.get("warm_pool") or []
    return bool(pools) and all(sum(ready(p) for p in pool["idle_pids"]) >= pool["target"]
                               for pool in pools)


def runtime_rss_mb(status: dict[str, Any]) -> dict[str, float] | None:
    """Resident memory of one idle warm runtime (``VmRSS``; ``RssAnon``: the part no other
    process shares, torch's libraries being file-backed and shared), from /proc."""
    for pool in status.get("warm_pool") or []:
        for pid in pool["idle_pids"]:
            try:
                fields = dict(line.split(":", 1) for line in
                              Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
                return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon")}
            except (OSError, KeyError, ValueError):
                continue
    return None


def _wait(pred: Any, timeout_s: float, what: str, every_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def measure(home: Path, reps: int, warm: bool, since_s: float) -> list[dict[str, Any]]:
    """``reps`` scale-outs 1 -> 2 of the deployed function; one record per new replica."""
    import httpx

    from faascale.platform.registry import Registry
    from faascale.platform.state import StateDir

    client = _client(home)
    registry = Registry(StateDir(home).registry_db)  # the first-token events (same machine)
    url, token = client.url, json.loads((home / "tokens.json").read_text())["invoke"]
    out = []
    for rep in range(reps):
        _wait(lambda: client.status(NAME)["replicas"]["running"] == 1
              and client.status(NAME)["replicas"]["starting"] == 0, 120, "back to one replica")
        if warm:
            # every runtime of the pool ready, none still importing beside the start measured
            _wait(lambda: _pools_ready(client.status(NAME), since_s), 300,
                  "every node's pool of ready runtimes")
            time.sleep(1.5)  # idle for longer than WARM_MIN_IDLE_S
        rss = runtime_rss_mb(client.status(NAME)) if warm else None
        known = {p["replica"] for p in client.startups(NAME, 50)["profiles"]}
        t_load = time.time()
        stop = threading.Event()

        def call(i: int) -> list[str]:
            """Requests until ``stop``; the failures, each as ``status: body`` (the first ends
            the loop)."""
            body = {"model": NAME, "messages": [{"role": "user", "content": f"count {i}"}],
                    "max_tokens": 48, "ignore_eos": True, "temperature": 0}
            with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"}) as h:
                while not stop.is_set():
                    r = h.post(f"{url}/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        return [f"{r.status_code}: {r.text[:300]}"]
            return []

        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(call, i) for i in range(3)]
            try:
                prof = _wait(lambda: next((p for p in client.startups(NAME, 50)["profiles"]
                                           if p["replica"] not in known and p["ok"]), None),
                             300, "the new replica's profile")
                # the load goes on until the new replica answered its first request
                first = _wait(lambda: next((e for e in registry.events(NAME, "first_token", 50)
                                            if e.get("replica") == prof["replica"]), None),
                              120, "the new replica's first token")
            finally:
                stop.set()
            failures = [x for f in futures for x in f.result()]
            failed = len(failures)
        intents = [e for e in client.status(NAME)["scale_events"]
                   if e["at_s"] >= t_load and e.get("to_replicas", 0) > e.get("from_replicas", 0)]
        intent_s = min(e["at_s"] for e in intents) if intents else t_load
        spans = [s for s in prof["spans"] if s["name"] != "first_token"]
        ready_s = max(s["end_s"] for s in spans)
        steps: dict[str, float] = {}
        for s in spans:
            steps[s["name"]] = steps.get(s["name"], 0.0) + s["end_s"] - s["start_s"]
        out.append({"rep": rep, "intent_to_ready_s": ready_s - intent_s,
                    "intent_to_first_token_s": first["at_s"] - intent_s,
                    "intent_found": bool(intents), "source": prof["source"],
                    "warm": bool((prof.get("runtime") or {}).get("warm")),
                    "runtime": prof.get("runtime") or {}, "steps_s": steps,
                    "spans_from_intent_s": [(s["name"], round(s["start_s"] - intent_s, 4),
                                             round(s["end_s"] - intent_s, 4)) for s in spans],
                    "weight_bytes": prof["weight_bytes"], "failed_requests": failed,
                    "failures": failures,
                    "idle_runtime_rss_mb": rss})
    return out


# --- the cases ---------------------------------------------------------------------------------

def _cli(env: dict[str, str], *args: str, timeout_s: float = 300) -> str:
    r = subprocess.run([sys.executable, "-m", "faascale.cli", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"faascale {' '.join(args)}: {r.stdout[-1500:]}{r.stderr[-1500:]}")
    return r.stdout


def run_local(runtime: str, source: str, reps: int, models: Path) -> list[dict[str, Any]]:
    """A fresh local platform (embedded Ray), the function deployed, ``reps`` scale-outs."""
    home = Path(tempfile.mkdtemp(prefix=f"faascale-start-{runtime}-{source}-"))
    (home / "objects").mkdir()
    (home / "objects" / "models").symlink_to(models)  # packed once for every case
    fn = home / "function"
    fn.mkdir()
    (fn / "function.yaml").write_text(function_yaml(0))
    env = {**os.environ, "FAASCALE_HOME": str(home), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "FAASCALE_WARM_POOL": str(POOL) if runtime == "warm" else "off",
           "FAASCALE_PIPECAST_PREFER_PEERS": "1" if source == "PEER" else "0"}
    since = time.time()
    from faascale.platform.server import free_port

    _cli(env, "up", "--port", str(free_port()), timeout_s=300)
    try:
        _cli(env, "deploy", str(fn), timeout_s=600)
        return measure(home, reps, runtime == "warm", since)
    finally:
        subprocess.run([sys.executable, "-m", "faascale.cli", "down"], env=env, cwd=ROOT,
                       capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
        release_host_tiers(home)
        shutil.rmtree(home, ignore_errors=True)  # the run's state and DISK tier: measured


@contextlib.contextmanager
def _released(home: Path) -> Iterator[None]:
    """The emulated platform's shared-memory tiers removed once its cluster is gone."""
    try:
        yield
    finally:
        release_host_tiers(home)
        shutil.rmtree(home, ignore_errors=True)


def run_emulated(runtime: str, reps: int, models: Path) -> list[dict[str, Any]]:
    """The same on a two-host emulated cluster: the head (platform, no GPU) and one GPU node
    with a 0.35-core budget where both replicas run; HOST source."""
    from faascale.pipecast.emulated import EmulatedCluster
    from faascale.platform.warm_pool import head_system_config_args

    home = Path(tempfile.mkdtemp(prefix=f"faascale-start-emu-{runtime}-", dir="/var/tmp"))
    (home / "objects").mkdir()
    (home / "objects" / "models").symlink_to(models)
    fn = home / "function"
    fn.mkdir()
    (fn / "function.yaml").write_text(function_yaml(1))
    temp = Path(tempfile.mkdtemp(prefix="fsr", dir="/tmp"))
    pool = str(POOL) if runtime == "warm" else "off"
    env = {**os.environ, "FAASCALE_HOME": str(home), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "FAASCALE_WARM_POOL": pool, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    ray = str(Path(sys.executable).with_name("ray"))
    with EmulatedCluster(2, rate="1gbit", prefix="fsr") as cluster, _released(home):
        cluster.limit_cpu(2, EMULATED_NODE_CPUS)
        head = cluster.host_address(1)

        def in_host(i: int, argv: list[str], timeout_s: float = 300) -> str:
            p = cluster.run(i, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)
            out, _ = p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:3])} in host {i}: {out[-2000:]}")
            return out

        flags = head_system_config_args(None if runtime == "warm" else 0)
        common = ["--disable-usage-stats", "--object-store-memory", str(200 << 20)]
        in_host(1, [ray, "start", "--head", "--node-ip-address", head, "--port", "6379",
                    "--num-cpus", "4", "--num-gpus", "0", "--include-dashboard=false",
                    "--temp-dir", str(temp), *flags, *common])
        in_host(2, [ray, "start", "--address", f"{head}:6379", "--node-ip-address",
                    cluster.host_address(2), "--num-cpus", "1", "--num-gpus", "2", *common])
        log = (home / "platform.log").open("w")
        cluster.run(1, [sys.executable, "-m", "faascale.platform.server", "--home", str(home),
                        "--host", head, "--port", "8080", "--address", f"{head}:6379"],
                    env=env, stdout=log, stderr=subprocess.STDOUT)
        since = time.time()
        in_host(1, [sys.executable, "-c", "import time\nfrom faascale.platform.client import "
                    "PlatformClient\nfrom faascale.platform.state import StateDir\nfor _ in "
                    "range(240):\n    try:\n        PlatformClient.from_state(StateDir(None))"
                    ".health(); break\n    except Exception: time.sleep(0.5)"])
        in_host(1, [sys.executable, "-m", "faascale.cli", "deploy", str(fn)], 600)
        out = in_host(1, [sys.executable, str(Path(__file__).resolve()), "--measure", str(home),
                          "--reps", str(reps), "--since", str(since)]
                      + (["--warm"] if runtime == "warm" else []), 1200)
        return json.loads(out.strip().splitlines()[-1])


# --- the limits ------------------------------------------------------------------------------

def host_read_gbps() -> float:
    from benchmarks.engine import read_bw_buffer, read_bw_window

    buf = read_bw_buffer()
    return max(read_bw_window(buf) for _ in range(3))


def loopback_gbps(total_bytes: int = 512 << 20) -> float:
    """One TCP stream over loopback, 4 MiB writes, best of 3 (the PEER path's transport)."""
    best = 0.0
    for _ in range(3):
        srv = socket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        got = [0]

        def sink() -> None:
            conn, _ = srv.accept()
            buf = bytearray(4 << 20)
            view = memoryview(buf)
            while got[0] < total_bytes:
                n = conn.recv_into(view)
                if not n:
                    break
                got[0] += n
            conn.close()

        t = threading.Thread(target=sink)
        t.start()
        chunk = bytes(4 << 20)
        with socket.create_connection(("127.0.0.1", port)) as c:
            t0 = time.perf_counter()
            for _ in range(total_bytes // len(chunk)):
                c.sendall(chunk)
            t.join()
            best = max(best, total_bytes / (time.perf_counter() - t0) / 1e9)
        srv.close()
    return best


# --- the run ---------------------------------------------------------------------------------

def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="HOST only, this machine, one repetition")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # inside the emulated head
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--since", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.reps, args.warm, args.since)))
        return
    from faascale.engine.checkpoint import read_manifest
    from faascale.engine.sources import resolve_packed
    from faascale.pipecast.emulated import EmulatedCluster

    reps = 1 if args.quick else args.reps
    models = Path(tempfile.mkdtemp(prefix="faascale-start-models-"))
    atexit.register(shutil.rmtree, models, True)  # packed for this run only (651 MB)
    packed = resolve_packed(MODEL, dtype="float32", num_blocks=6, cache_dir=models)
    weight_bytes = read_manifest(packed).total_bytes
    limits = {"HOST": host_read_gbps(), "PEER": loopback_gbps()}
    print(f"model {weight_bytes / 1e6:.0f} MB; HOST read {limits['HOST']:.1f} GB/s, "
          f"loopback TCP {limits['PEER']:.2f} GB/s", flush=True)
    cases: dict[str, list[dict[str, Any]]] = {}
    sources = ["HOST"] if args.quick else ["HOST", "PEER"]
    for source in sources:
        for runtime in ("warm", "cold"):  # interleaved: warm, cold per source
            key = f"{runtime}_{source}"
            cases[key] = run_local(runtime, source, reps, models)
            print(f"{key}: " + ", ".join(f"{r['intent_to_ready_s']:.2f} s" for r in cases[key]),
                  flush=True)
    ok, why = EmulatedCluster.available()
    if not args.quick and ok:
        for runtime in ("warm", "cold"):
            key = f"{runtime}_HOST_emulated"
            cases[key] = run_emulated(runtime, reps, models)
            print(f"{key}: " + ", ".join(f"{r['intent_to_ready_s']:.2f} s" for r in cases[key]),
                  flush=True)
    elif not args.quick:
        print(f"the emulated node is skipped: {why}", flush=True)
    rows = []
    res: dict[str, Any] = {"quick": args.quick, "reps": reps}
    for key, runs in cases.items():
        source = key.split("_")[1]
        weights_s = weight_bytes / (limits[source] * 1e9)
        ready = [r["intent_to_ready_s"] for r in runs]
        fixed = [x - weights_s for x in ready]
        wrong = [r for r in runs if r["warm"] != key.startswith("warm") or r["source"] != source]
        rows.append((key, median(ready), weights_s, median(fixed), runs, wrong))
        res[f"{key}_ready_s"] = median(ready)
        res[f"{key}_fixed_s"] = median(fixed)
        res[f"{key}_first_token_s"] = median([r["intent_to_first_token_s"] for r in runs])
    res["warm_fixed_s"] = res.get("warm_HOST_fixed_s")
    res["cold_fixed_s"] = res.get("cold_HOST_fixed_s")
    res["warm_fixed_emulated_s"] = res.get("warm_HOST_emulated_fixed_s")
    res["warm_first_token_s"] = res.get("warm_HOST_first_token_s")
    res["cold_first_token_s"] = res.get("cold_HOST_first_token_s")
    if res.get("warm_HOST_ready_s") and res.get("cold_HOST_ready_s"):
        res["warm_vs_cold"] = res["warm_HOST_ready_s"] / res["cold_HOST_ready_s"]
    rss = [r["idle_runtime_rss_mb"] for runs in cases.values() for r in runs
           if r.get("idle_runtime_rss_mb")]
    res["idle_runtime_rss_mb"] = median([x["VmRSS"] for x in rss])
    res["idle_runtime_rss_anon_mb"] = median([x["RssAnon"] for x in rss])
    res["failed_requests"] = sum(r["failed_requests"] for runs in cases.values() for r in runs)
    res["failures"] = {key: [x for r in runs for x in r.get("failures", [])]
                       for key, runs in cases.items() if any(r.get("failures") for r in runs)}
    res["mislabelled_starts"] = sum(len(w) for *_, w in rows)
    if not args.no_report and not args.quick:
        report(rows, limits, weight_bytes, res)
    emit({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})


def constructor_s(run: dict[str, Any]) -> float:
    """Intent to the replica's constructor (its first step, ``spec_tokenizer``): Ray Serve's
    part (the controller's ticks, the actor placed on a worker, its init call)."""
    return min(start for name, start, _ in run["spans_from_intent_s"] if name == "spec_tokenizer")


def failure_text(failures: dict[str, list[str]]) -> str:
    """`` (case: the first failure's status and body; ...)``, or nothing."""
    if not failures:
        return ""
    return " (" + "; ".join(f"{key.replace('_', ' ')} × {len(xs)}: {xs[0][:160]}"
                            for key, xs in failures.items()) + ")"


def report(rows: list[Any], limits: dict[str, float], weight_bytes: int, res: dict[str, Any]) -> None:
    lines = ["| case | intent → ready (s, median) | weights only (s) | fixed part (s) | "
             "process + imports (s) | intent → constructor (s) | intent → first token (s) | "
             "runs (ready / first token) |", "|---|---|---|---|---|---|---|---|"]
    for key, ready, weights_s, fixed, runs, _ in rows:
        pi = median([r["steps_s"].get("process", 0) + r["steps_s"].get("imports", 0)
                     for r in runs])
        ctor = median([constructor_s(r) for r in runs])
        first = median([r["intent_to_first_token_s"] for r in runs])
        each = ", ".join(f"{r['intent_to_ready_s']:.2f} / {r['intent_to_first_token_s']:.2f}"
                         for r in runs)
        lines.append(f"| {key.replace('_', ' ')} | {ready:.2f} | {weights_s:.3f} | {fixed:.2f} | "
                     f"{pi:.2f} | {ctor:.2f} | {first:.2f} | {each} |")
    wf, cf_, we = res.get("warm_fixed_s"), res.get("cold_fixed_s"), res.get("warm_fixed_emulated_s")
    reading = []
    if wf is not None and cf_ is not None:
        reading.append(f"On this machine a warm runtime cuts the fixed part of a HOST start from "
                       f"{cf_:.2f} s to {wf:.2f} s ({wf / cf_:.0%} of cold); the issue's target is "
                       f"0.3 s, which this {'meets' if wf <= 0.3 else 'does not meet'}.")
    warm_rows = [r for r in rows if r[0] == "warm_HOST"]
    if warm_rows:
        runs = warm_rows[0][4]
        ctor, ready = median([constructor_s(r) for r in runs]), warm_rows[0][1]
        first = median([r["intent_to_first_token_s"] for r in runs])
        reading.append(f"Of the warm HOST start, {ctor:.2f} s pass before the replica's "
                       f"constructor runs (Ray Serve placing the actor and calling it), "
                       f"{ready - ctor:.2f} s in the constructor, and {first - ready:.2f} s "
                       "from ready to its first streamed token (Serve marking it running, the "
                       "router learning of it and routing a waiting request, the prefill; the "
                       "warm-up request runs in that gap).")
    if we is not None:
        reading.append(f"On a {EMULATED_NODE_CPUS}-core emulated node the warm fixed part is "
                       f"{we:.2f} s (target 1.5 s: {'met' if we <= 1.5 else 'not met'}).")
    if res.get("idle_runtime_rss_mb"):
        reading.append(f"An idle warm runtime holds {res['idle_runtime_rss_mb']:.0f} MB resident "
                       f"({res['idle_runtime_rss_anon_mb']:.0f} MB of it its own, the rest shared "
                       "libraries) and no model.")
    if res["mislabelled_starts"]:
        reading.append(f"{res['mislabelled_starts']} starts did not run as their case intended "
                       "(a warm case that found no warm runtime, or another source): see the runs.")
    body = f"""## Replica start on warm and cold runtimes (`benchmarks/replica_start.py`)

Intent (our policy's scale-up event) to the new replica ready (its constructor done) and to its
first streamed token (the first request it served, under a load that keeps one waiting), SmolLM2-135M fp32
({weight_bytes / 1e6:.0f} MB), `python benchmarks/replica_start.py --reps {res['reps']}`. Weights
only = bytes ÷ {limits['HOST']:.1f} GB/s memory read bandwidth (HOST) or ÷ {limits['PEER']:.2f} GB/s
loopback TCP (PEER), measured in the same run; fixed part = intent to ready − weights only.

{chr(10).join(lines)}

{' '.join(reading)}
Failed requests during the runs: {res['failed_requests']}{failure_text(res['failures'])}. Machine: {machine()}.
Command: `{command_line()}`; commit {git_rev()}.
"""
    write_section("replica_start", body)


if __name__ == "__main__":
    main()
