"""What the gateway costs, and how long a function takes from zero replicas to its first token.

Side by side in one run, on an embedded platform started for the run (`faascale up`):
- the same one-token request (tiny-llama, a warm replica) sent through the gateway over HTTP
  (keep-alive connection, auth, validation, metrics, SSE) and sent straight to the function's Serve
  deployment handle from a driver attached to the same Ray cluster (the floor the gateway adds to);
- scale-from-zero time to first token, streaming through the gateway, for tiny-llama and SmolLM2
  (each sample a freshly deployed function, so a replica really starts); each sample names the
  tier its weights came from (the replica's own ``StartupProfile``): the first start of a model
  on the node reads the object store (here the local directory store), later ones its HOST tier.

- one streamed SmolLM2 answer (greedy, 128 tokens, EOS ignored) decoded through the platform
  (gateway, Serve, the replica's engine) against the same model decoded by the engine alone in
  a process of its own, same dtype, same torch threads (the replica's: its ``num_cpus``),
  alternating, best of the repetitions for each.

JSON keys: ``gateway_vs_handle_p50`` = gateway p50 ÷ handle p50 (> 1: the gateway adds that
factor); ``gateway_added_*_ms`` = gateway − handle; ``stream_vs_engine`` = streamed decode
tokens/s through the platform ÷ the engine's own (< 1: the platform's per-token cost; the
target is ≥ 0.9).

    python benchmarks/gateway.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, command_line, emit, git_rev, machine, write_section  # noqa: E402
from faascale.stats import percentile  # noqa: E402


class Bench:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "FAASCALE_HOME": str(home), "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "faascale.cli", *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise SystemExit(f"faascale {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def token(self, kind: str) -> str:
        return json.loads((self.home / "tokens.json").read_text())[kind]

    def status(self, name: str) -> dict[str, Any]:
        import httpx

        r = httpx.get(f"{self.url}/v1/functions/{name}", timeout=60,
                      headers={"Authorization": f"Bearer {self.token('invoke')}"})
        r.raise_for_status()
        return r.json()

    def deploy(self, doc: dict[str, Any]) -> None:
        import httpx

        r = httpx.post(self.url + "/v1/functions", json={**doc, "base_dir": str(ROOT)}, timeout=600,
                       headers={"Authorization": f"Bearer {self.token('admin')}"})
        r.raise_for_status()


def tiny(name: str, min_replicas: int) -> dict[str, Any]:
    return {"name": name, "model": {"source": "random://tiny-llama", "blocks": 4},
            "engine": {"max_seq_len": 512, "max_batch_size": 8},
            "scaling": {"min_replicas": min_replicas, "max_replicas": 1, "keep_alive_s": 600},
            "resources": {"num_cpus": 0}}


def smollm2(name: str) -> dict[str, Any]:
    return {"name": name, "model": {"source": "bundled://smollm2-135m-instruct", "blocks": 6},
            "engine": {"max_seq_len": 2048, "max_batch_size": 8},
            "scaling": {"min_replicas": 0, "max_replicas": 1, "keep_alive_s": 600},
            "resources": {"num_cpus": 1}}


def latency_pairs(gcs: str, url: str, token: str, name: str, n: int) -> tuple[list[float], list[float]]:
    """The same one-token request, alternately through the gateway (HTTP) and straight to the
    Serve handle, from one process, so both see the same machine load (2 cores drift a lot)."""
    import httpx
    import ray
    from ray import serve

    ray.init(address=gcs, namespace="faascale", log_to_driver=False)
    handle = serve.get_deployment_handle("replica", app_name=name).options(stream=True)
    payload = {"prompt": "hi", "params": {"max_tokens": 1, "temperature": 0}}
    body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}

    async def run() -> tuple[list[float], list[float]]:
        gw, direct = [], []
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as h:
            for i in range(n + 10):
                t = time.perf_counter()
                r = await h.post(f"/v1/functions/{name}/invoke", json=body)
                t_gw = time.perf_counter() - t
                assert r.status_code == 200, r.text
                t = time.perf_counter()
                chunks = [c async for c in handle.generate.remote(payload)]
                t_direct = time.perf_counter() - t
                assert chunks and chunks[-1]["finished"], chunks
                if i >= 10:  # warm-up
                    gw.append(t_gw * 1e3)
                    direct.append(t_direct * 1e3)
        return gw, direct

    try:
        return asyncio.run(run())
    finally:
        ray.shutdown()


def latency_pairs_in_subprocess(b: Bench, gcs: str, name: str, n: int) -> tuple[list[float], list[float]]:
    """Run the probe as its own driver process: Serve's handle keeps background tasks that would
    outlive ``ray.shutdown()`` in this one and auto-start a stray local Ray."""
    r = subprocess.run([sys.executable, __file__, "--probe", gcs, b.url, b.token("invoke"), name,
                        str(n)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if r.returncode:
        raise SystemExit(f"latency probe failed: {r.stderr[-2000:]}")
    gw, direct = json.loads(r.stdout.strip().splitlines()[-1])
    return gw, direct


def first_token_s(b: Bench, doc: dict[str, Any]) -> tuple[float, str, int]:
    """Seconds from the request to its first streamed token, with the start's source tier and
    weight bytes (from the replica's startup profile, as ``faascale status`` shows it)."""
    import httpx

    b.deploy(doc)
    t = time.perf_counter()
    with httpx.stream("POST", f"{b.url}/v1/functions/{doc['name']}/invoke", timeout=600,
                      headers={"Authorization": f"Bearer {b.token('invoke')}"},
                      json={"prompt": "Hello", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        elapsed = None
        for line in r.iter_lines():
            if line.startswith("data: {") and elapsed is None:
                elapsed = time.perf_counter() - t
    status = httpx.get(f"{b.url}/v1/functions/{doc['name']}", timeout=60,
                       headers={"Authorization": f"Bearer {b.token('invoke')}"}).json()
    last = status["coldstart"]["last"] or {}
    cold = status["cold_starts"][0] if status["cold_starts"] else {}
    # Free the replica (and its CPU) for the next sample.
    httpx.delete(f"{b.url}/v1/functions/{doc['name']}", timeout=120,
                 headers={"Authorization": f"Bearer {b.token('admin')}"}).raise_for_status()
    assert elapsed is not None, "no token"
    return elapsed, str(last.get("source", "?")), int(cold.get("bytes", 0))


STREAM_TOKENS = 128
STREAM_PROMPT = "Write a long story about a lighthouse keeper."


def stream_rate(b: Bench, name: str) -> float:
    """Decode tokens/s of one streamed completion through the gateway: (completion tokens - 1)
    over the time from the first streamed token to the last (prefill excluded)."""
    import httpx

    times, usage = [], {}
    with httpx.stream("POST", f"{b.url}/v1/completions", timeout=600,
                      headers={"Authorization": f"Bearer {b.token('invoke')}"},
                      json={"model": name, "prompt": STREAM_PROMPT, "max_tokens": STREAM_TOKENS,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"] is not None:
                times.append(time.perf_counter())
    assert usage.get("completion_tokens") == STREAM_TOKENS, usage
    return (STREAM_TOKENS - 1) / (times[-1] - times[0])


def engine_rate(packed: str, threads: int) -> float:
    """The same completion decoded by the engine alone (its loop thread, as in a replica), in a
    fresh process with ``threads`` torch threads."""
    r = subprocess.run([sys.executable, __file__, "--engine-probe", packed, str(threads)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"engine probe failed: {r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def engine_probe(packed: str, threads: int) -> float:
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM
    from faascale.engine.loop import EngineLoop
    from faascale.engine.sampling import SamplingParams

    llm = LLM.load(packed, EngineConfig(max_batch_size=16, max_seq_len=2048, num_threads=threads))
    loop = EngineLoop(llm.new_engine())
    params = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True)
    for _ in loop.submit(llm.prompt_ids("Hello"), SamplingParams(max_tokens=4)):
        pass  # warm-up, as a replica's
    times = [time.perf_counter() for _ in loop.submit(llm.prompt_ids(STREAM_PROMPT), params)]
    loop.stop()
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--engine-probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_probe:
        print(engine_probe(args.engine_probe[0], int(args.engine_probe[1])))
        return
    if args.probe:
        gcs, url, token, app, count = args.probe
        print(json.dumps(latency_pairs(gcs, url, token, app, int(count))))
        return
    n = 60 if args.quick else 300
    samples = 1 if args.quick else 3

    from faascale.platform.server import free_port

    with tempfile.TemporaryDirectory(prefix="faascale-bench-") as home:
        b = Bench(Path(home), free_port())
        b.cli("up", "--port", str(b.port))
        try:
            b.deploy(tiny("warm", 1))
            gcs = json.loads((Path(home) / "platform.json").read_text())["ray_address"]
            gw, direct = latency_pairs_in_subprocess(b, gcs, "warm", n)
            smol = {**smollm2("smol-stream"), "scaling": {**smollm2("")["scaling"],
                                                           "min_replicas": 1}}
            b.deploy(smol)
            stream_rate(b, "smol-stream")  # the replica's first request (waits for its start)
            packed = b.status("smol-stream")["model_dir"]  # the store's packed copy
            threads = smol["resources"]["num_cpus"]  # Ray's OMP_NUM_THREADS for the replica
            via_platform, alone = [], []
            for _ in range(2 if args.quick else 3):
                via_platform.append(stream_rate(b, "smol-stream"))
                alone.append(engine_rate(packed, threads))
            b.cli("delete", "smol-stream")
            tiny_runs = [first_token_s(b, tiny(f"cold-tiny-{i}", 0)) for i in range(samples)]
            smol_runs = [first_token_s(b, smollm2(f"cold-smol-{i}")) for i in range(samples)]
        finally:
            b.cli("down")

    tiny_cold, smol_cold = [x[0] for x in tiny_runs], [x[0] for x in smol_runs]
    res = {
        "gateway_p50_ms": statistics.median(gw), "gateway_p99_ms": percentile(gw, 99),
        "handle_p50_ms": statistics.median(direct), "handle_p99_ms": percentile(direct, 99),
        "scale_from_zero_first_token_s": statistics.median(tiny_cold),
        "smollm2_scale_from_zero_first_token_s": statistics.median(smol_cold),
    }
    res["gateway_added_p50_ms"] = res["gateway_p50_ms"] - res["handle_p50_ms"]
    res["gateway_added_p99_ms"] = res["gateway_p99_ms"] - res["handle_p99_ms"]
    res["gateway_vs_handle_p50"] = res["gateway_p50_ms"] / res["handle_p50_ms"]
    res["stream_tok_s"], res["engine_tok_s"] = max(via_platform), max(alone)
    res["stream_vs_engine"] = res["stream_tok_s"] / res["engine_tok_s"]
    print(f"{'one-token request, ms':28}{'p50':>8}{'p99':>8}")
    print(f"{'through the gateway (HTTP)':28}{res['gateway_p50_ms']:8.2f}{res['gateway_p99_ms']:8.2f}")
    print(f"{'Serve handle directly':28}{res['handle_p50_ms']:8.2f}{res['handle_p99_ms']:8.2f}")
    print(f"{'added by the gateway':28}{res['gateway_added_p50_ms']:8.2f}{res['gateway_added_p99_ms']:8.2f}"
          f"   ({res['gateway_vs_handle_p50']:.2f}x the handle at p50)")
    print(f"streamed decode: {res['stream_tok_s']:.1f} tok/s through the platform, "
          f"{res['engine_tok_s']:.1f} tok/s the engine alone ({threads} thread(s)): "
          f"{res['stream_vs_engine']:.2f}x (runs {', '.join(f'{x:.1f}' for x in via_platform)} / "
          f"{', '.join(f'{x:.1f}' for x in alone)})")
    print(f"scale from zero to first token: tiny-llama {res['scale_from_zero_first_token_s']:.2f} s, "
          f"SmolLM2-135M {res['smollm2_scale_from_zero_first_token_s']:.2f} s "
          f"(median of {samples})")
    if not args.quick and not args.no_report:
        write_section("gateway", f"""## Gateway overhead and scale from zero (`benchmarks/gateway.py`)

Command: `{command_line()}` at `{git_rev()}`, {time.strftime('%Y-%m-%d')}.
Machine: {machine()}. Embedded platform (local Ray, one warm tiny-llama replica), {n} sequential
one-token requests each way, alternating, from one client process.

| one-token request | p50 ms | p99 ms |
|---|---:|---:|
| through the gateway (HTTP keep-alive, auth, metrics) | {res['gateway_p50_ms']:.2f} | {res['gateway_p99_ms']:.2f} |
| Serve deployment handle, directly | {res['handle_p50_ms']:.2f} | {res['handle_p99_ms']:.2f} |
| **added by the gateway** | **{res['gateway_added_p50_ms']:.2f}** | {res['gateway_added_p99_ms']:.2f} |

Streamed decode of SmolLM2 ({STREAM_TOKENS} tokens, greedy, fp32, {threads} torch thread(s) on
both sides, best of {len(alone)} alternating runs): **{res['stream_tok_s']:.1f} tok/s** through the
platform (gateway, Serve, replica) vs **{res['engine_tok_s']:.1f} tok/s** for the engine alone:
**{res['stream_vs_engine']:.2f}x** (target ≥ 0.9: {'pass' if res['stream_vs_engine'] >= 0.9 else 'miss'}).
Runs: platform {', '.join(f'{x:.1f}' for x in via_platform)}; engine {', '.join(f'{x:.1f}' for x in alone)} tok/s.

Scale from zero to the first streamed token (a new function each sample, median of {samples}):
tiny-llama **{res['scale_from_zero_first_token_s']:.2f} s**, SmolLM2-135M
({smol_runs[0][2] / 1e6:.0f} MB of fp32 weights) **{res['smollm2_scale_from_zero_first_token_s']:.2f} s**.
Samples, in order, with the tier each start's weights came from:
tiny {', '.join(f'{t:.2f} s ({src})' for t, src, _ in tiny_runs)};
SmolLM2 {', '.join(f'{t:.2f} s ({src})' for t, src, _ in smol_runs)}.
""")
    emit({k: round(v, 3) for k, v in res.items()})


if __name__ == "__main__":
    main()
