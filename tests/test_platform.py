"""The platform for real: `faascale up` (local Ray + Serve + gateway), the CLI, HTTP, the openai client.

One platform per module (Ray start-up is ~10 s); every test uses its own function names.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from faascale.platform.server import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Platform:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "FAASCALE_HOME": str(home), "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "faascale.cli", *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if "see the platform log" in r.stderr:  # a 500: the failing assertion shows its cause
            log = self.home / "logs" / "platform.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            r.stderr += f"\n--- {log} (tail) ---\n{tail}"
        return r

    @property
    def tokens(self) -> dict[str, str]:
        return json.loads((self.home / "tokens.json").read_text())

    def http(self, token: str | None = "invoke") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)

    def deploy(self, doc: dict[str, Any]) -> dict[str, Any]:
        r = self.http("admin").post("/v1/functions", json={**doc, "base_dir": str(ROOT)})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def status(self, name: str) -> dict[str, Any]:
        r = self.http().get(f"/v1/functions/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_replicas(self, name: str, predicate: Any, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status(name)
            if predicate(s["replicas"]):
                return s
            assert time.monotonic() < deadline, f"timed out; last replicas {s['replicas']}"
            time.sleep(0.25)


def tiny_doc(name: str, **scaling: Any) -> dict[str, Any]:
    return {"name": name, "model": {"source": "random://tiny-llama", "blocks": 4},
            "engine": {"max_seq_len": 4096, "max_batch_size": 8},
            "scaling": {"keep_alive_s": 60, **scaling}, "resources": {"num_cpus": 0}}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-home"), free_port())
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert p.url in r.stdout and p.tokens["admin"] in r.stdout
    assert oct((p.home / "tokens.json").stat().st_mode & 0o777) == "0o600"
    yield p
    p.cli("down", timeout=120)


@pytest.fixture(scope="module")
def tiny_deployed(platform: Platform) -> str:
    # The bundled tiny-llama, deployed the way a user does it; num_cpus 0 so bursts fit 2 cores.
    r = platform.cli("deploy", "functions/tiny-llama")
    assert r.returncode == 0, r.stderr
    assert "deployed tiny-llama" in r.stdout
    return "tiny-llama"


def expected_chat_text(platform: Platform, prompt: str, max_tokens: int) -> str:
    """What the engine itself answers, greedy, for the same chat message."""
    from faascale.engine.llm import LLM
    from faascale.engine.sampling import SamplingParams
    from faascale.engine.sources import resolve_packed
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(ROOT / "functions" / "tiny-llama")
    packed = resolve_packed(spec.resolved_source(), num_blocks=spec.model.blocks,
                            cache_dir=platform.home / "objects" / "models")
    llm = LLM.load(packed, spec.engine_config())
    return llm.generate([[{"role": "user", "content": prompt}]],
                        SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


def test_every_node_gets_its_block_store_before_any_replica(platform: Platform) -> None:
    # The first test of the module: nothing is deployed yet, yet the node's block store runs (and
    # reports its tiers), so a replica's first start does not wait for its process to start.
    deadline = time.monotonic() + 60
    while True:
        metrics = platform.http(None).get("/metrics").text
        lines = [x for x in metrics.splitlines()
                 if x.startswith("faascale_tier_capacity_bytes{") and 'tier="HOST"' in x]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert lines, "no node reported its block store within 60 s of `faascale up`"
    assert float(lines[0].rsplit(" ", 1)[1]) > 0
    assert platform.http().get("/v1/functions").json()["functions"] == []


def test_invoke_over_http_streaming_and_not(platform: Platform, tiny_deployed: str) -> None:
    expected = expected_chat_text(platform, "hello there", 12)
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
            "temperature": 0}
    with platform.http() as h:
        r = h.post(f"/v1/functions/{tiny_deployed}/invoke", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["text"] == expected
        assert out["usage"]["completion_tokens"] <= 12 and out["usage"]["prompt_tokens"] > 3
        with h.stream("POST", f"/v1/functions/{tiny_deployed}/invoke", json={**body, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert len(chunks) > 1 and chunks[-1]["finished"]
    assert "".join(c["text"] for c in chunks) == expected
    cli = platform.cli("invoke", tiny_deployed, "hello there", "-n", "12", "-t", "0", "--stream")
    assert cli.returncode == 0 and cli.stdout.rstrip("\n") == expected


def test_openai_client(platform: Platform, tiny_deployed: str) -> None:
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=platform.url + "/v1", api_key=platform.tokens["invoke"])
    assert tiny_deployed in [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model=tiny_deployed, messages=messages, max_tokens=12,
                                          temperature=0)
    assert full.choices[0].message.content == expected_chat_text(platform, "hello there", 12)
    assert full.usage.completion_tokens == 12 or full.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=tiny_deployed, messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == full.choices[0].message.content
    assert usage is not None and usage.total_tokens == full.usage.total_tokens
    comp = client.completions.create(model=tiny_deployed, prompt="abc", max_tokens=5, temperature=0)
    assert comp.usage.prompt_tokens == 3  # byte tokenizer: one token per byte
    with pytest.raises(NotFoundError, match="not deployed"):
        client.completions.create(model="no-such-function", prompt="x")
    with pytest.raises(BadRequestError, match="does not fit the context of 512 tokens"):
        client.completions.create(model=tiny_deployed, prompt="x" * 5000)
    two = client.completions.create(model=tiny_deployed, prompt="abc", n=2, max_tokens=5,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert {c.text for c in two.choices} == {comp.choices[0].text}  # greedy: both the same
    with pytest.raises(BadRequestError, match="tools: tool and function calling"):
        client.chat.completions.create(model=tiny_deployed, messages=messages, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_scale_from_zero_and_back_to_zero(platform: Platform) -> None:
    name = "tiny-zero"
    platform.deploy(tiny_doc(name, keep_alive_s=3, downscale_delay_s=1))
    assert platform.status(name)["replicas"]["running"] == 0
    t0 = time.monotonic()
    r = platform.http().post(f"/v1/functions/{name}/invoke", json={"prompt": "hi", "max_tokens": 4})
    first_token_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    s = platform.status(name)
    assert s["replicas"]["running"] == 1
    assert any(e["reason"] == "request at zero" and e["to_replicas"] == 1 for e in s["scale_events"])
    s = platform.wait_replicas(name, lambda r: r["running"] == 0 and r["starting"] == 0, 40)
    assert s["cold_starts"], "the replica reported its start-up"
    print(f"scale-from-zero first token in {first_token_s:.1f} s")


def test_burst_scales_out(platform: Platform) -> None:
    name = "tiny-burst"
    # Replicas stay 20 s after the burst (downscale delay), so each surface gets to see them.
    platform.deploy(tiny_doc(name, target_concurrency=1, max_replicas=3, keep_alive_s=5,
                             downscale_delay_s=20))

    def call(i: int) -> int:
        with platform.http() as h:
            return h.post(f"/v1/functions/{name}/invoke",
                          json={"prompt": f"burst {i}", "max_tokens": 1200, "ignore_eos": True,
                                "temperature": 0}).status_code

    # Each surface (status, the CLI, /metrics) is a snapshot taken at its own moment (/metrics
    # serves its last view when Serve's controller, busy scaling, answers slowly): each must show
    # more than one running replica at some moment.
    peak = cli_peak = metric_peak = 0.0
    cli_out, metrics = "", ""
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            peak = max(peak, platform.status(name)["replicas"]["running"])
            if peak <= 1 and all(f.done() for f in futures):
                break  # the burst is over on one replica
            if peak > 1 and cli_peak <= 1:
                cli_out = platform.cli("status", name).stdout
                cli_peak = max(cli_peak, int(re.search(r"(\d+) running", cli_out).group(1)))
            if peak > 1 and metric_peak <= 1:
                metrics = httpx.get(platform.url + "/metrics").text
                metric = re.search(
                    rf'faascale_replicas{{function="{name}",state="running"}} (\S+)', metrics)
                assert metric, metrics
                metric_peak = max(metric_peak, float(metric.group(1)))
            if cli_peak > 1 and metric_peak > 1:
                break
            time.sleep(0.3)
        codes = [f.result() for f in futures]
    assert codes == [200] * 8
    assert peak > 1, "the burst never ran on more than one replica"
    assert cli_peak > 1, cli_out
    assert metric_peak > 1, metrics
    assert re.search(rf'faascale_scale_events_total{{direction="up",function="{name}"', metrics)


def test_bad_input_gets_clear_4xx(platform: Platform, tiny_deployed: str) -> None:
    url = f"/v1/functions/{tiny_deployed}/invoke"
    with platform.http(None) as anon:
        r = anon.post(url, json={"prompt": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = anon.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "invalid bearer token" in r.json()["error"]["message"]
        r = anon.post(url, json={"prompt": "x"}, headers={"Authorization": b"Bearer caf\xe9"})
        assert r.status_code == 401, r.text  # a non-ASCII byte is an unknown token, not a 500
        assert anon.get("/healthz").status_code == 200
        health = anon.get("/health")  # vLLM's probe, as guidellm sends it before a run
        assert health.status_code == 200 and health.content == b""
    with platform.http("invoke") as h:
        r = h.post("/v1/functions", json=tiny_doc("x"))
        assert r.status_code == 403 and "admin token" in r.json()["error"]["message"]
        r = h.post("/v1/chat/completions", content=b'{"model": "\\ud800", "messages": '
                   b'[{"role": "user", "content": "hi"}]}',
                   headers={"Content-Type": "application/json"})  # a lone surrogate
        assert r.status_code == 404 and "DNS labels" in r.json()["error"]["message"], r.text
        r = h.post("/v1/functions/nope/invoke", json={"prompt": "x"})
        assert r.status_code == 404 and "'nope' is not deployed" in r.json()["error"]["message"]
        r = h.post(url, json={"prompt": "x" * 5000})
        assert r.status_code == 400 and "does not fit the context" in r.json()["error"]["message"]
        r = h.post(url, json={"prompt": "x", "max_tokens": 100_000_000})  # as vLLM: not a cut
        assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"
        assert re.search(r"max_tokens: this model's maximum context length is \d+ tokens; the "
                         r"request asks for 100000001 \(1 in the prompt", r.json()["error"]["message"])
        r = h.post(url, json={"prompt": "x", "temperature": 7})
        assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]
        r = h.post(url, content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = h.post(url, json={"prompt": "x" * (2 << 20)})
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
        r = h.post(url, json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
        assert r.status_code == 400 and "exactly one of" in r.json()["error"]["message"]
    with platform.http("admin") as admin:
        bad = tiny_doc("Bad_Name")
        bad["model"]["blocks"] = 0
        r = admin.post("/v1/functions", json=bad)
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and "name" in msg and "model.blocks" in msg
        r = admin.post("/v1/functions", json={**tiny_doc("nomodel"), "model": {"source": "/nowhere"}})
        assert r.status_code == 422 and "does not exist" in r.json()["error"]["message"]
        assert admin.delete("/v1/functions/nope").status_code == 404


def test_too_many_queued_requests_get_429(platform: Platform) -> None:
    name = "tiny-narrow"  # capacity: 1 replica x 2 x target 1 + 0 queued = 2 in flight
    platform.deploy(tiny_doc(name, target_concurrency=1, max_replicas=1, max_queued_requests=0))
    long = {"prompt": "x", "max_tokens": 2500, "ignore_eos": True, "temperature": 0}
    with cf.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(platform.http().post, f"/v1/functions/{name}/invoke", json=long)
                for _ in range(2)]
        deadline = time.monotonic() + 60
        while platform.status(name)["gateway"]["in_flight"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = platform.http().post(f"/v1/functions/{name}/invoke", json={"prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "in flight" in r.json()["error"]["message"]
        assert [f.result().status_code for f in busy] == [200, 200]


def test_cli_management_and_errors(platform: Platform, tiny_deployed: str) -> None:
    ls = platform.cli("ls")
    assert ls.returncode == 0 and tiny_deployed in ls.stdout
    r = platform.cli("scale", tiny_deployed, "--max", "2")
    assert r.returncode == 0 and "replicas 0..2" in r.stdout
    logs = platform.cli("logs", tiny_deployed, "--tail", "50")
    assert logs.returncode == 0
    r = platform.cli("status", "no-such-function")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not deployed" in r.stderr
    assert "Traceback" not in r.stderr
    r = platform.cli("scale", tiny_deployed, "--min", "5", "--max", "2")
    assert r.returncode == 2 and "min_replicas (5) must not exceed max_replicas (2)" in r.stderr


def test_restart_keeps_functions(platform: Platform, tiny_deployed: str) -> None:
    """A restart restores every function, and one bad row (a spec that no longer parses, an
    event whose data is not JSON) or a registry another process holds locked for a while does
    not stop it: the platform starts, serves the rest, names the bad one, and can delete it."""
    import sqlite3
    import threading

    assert platform.cli("down").returncode == 0
    assert platform.cli("ls").returncode == 2  # not running: one clear error line
    db_path = platform.home / "registry.db"
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO functions (name, spec, base_dir, model_dir, model_id, created_s, "
                   "updated_s) VALUES ('broken', ?, '/', '/nowhere', 'id', 0, 0)",
                   ('{"name": 5}',))
        db.execute("INSERT INTO events (function, kind, data, at_s) VALUES (?, 'cold_start', "
                   "'{not json', 0)", (tiny_deployed,))
    locked = threading.Event()

    def hold_lock(seconds: float) -> None:
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_lock, args=(3.0,))
    holder.start()
    locked.wait(10)
    r = platform.cli("up", "--port", str(platform.port), timeout=240)
    holder.join()
    assert r.returncode == 0, r.stderr
    names = {f["name"] for f in platform.http().get("/v1/functions").json()["functions"]}
    assert tiny_deployed in names and "broken" not in names
    r = platform.http().post(f"/v1/functions/{tiny_deployed}/invoke",
                             json={"prompt": "again", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert platform.status(tiny_deployed)["name"] == tiny_deployed  # its bad event left out
    bad = platform.http().post("/v1/functions/broken/invoke", json={"prompt": "x"})
    assert bad.status_code == 503 and "'broken'" in bad.json()["error"]["message"]
    assert platform.http("admin").delete("/v1/functions/broken").status_code == 200
    assert platform.cli("delete", tiny_deployed).returncode == 0
    names = {f["name"] for f in platform.http().get("/v1/functions").json()["functions"]}
    assert tiny_deployed not in names and "tiny-zero" in names


def test_handler_preprocesses_requests(platform: Platform) -> None:
    r = platform.cli("deploy", "tests/data/handler-fn")
    assert r.returncode == 0, r.stderr
    with platform.http() as h:
        out = h.post("/v1/functions/tiny-handler/invoke", json={"prompt": "hi", "max_tokens": 50})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
        bad = h.post("/v1/functions/tiny-handler/invoke", json={"prompt": "forbidden words"})
        assert bad.status_code == 422 and "this prompt is not allowed" in bad.json()["error"]["message"]


def test_retired_replica_leaves_its_model_warm_in_host(platform: Platform) -> None:
    name = "tiny-warm"
    # keep_alive_s is also how long HOST keeps the retired replica's blocks: long enough that
    # the tier's sweep (every 30 s) cannot drop them between the retirement and the next start
    doc = tiny_doc(name, keep_alive_s=10, downscale_delay_s=1)
    doc["model"]["seed"] = 7  # weights no other test deploys: this node has never seen them
    platform.deploy(doc)
    invoke = {"prompt": "hi", "max_tokens": 2}
    assert platform.http().post(f"/v1/functions/{name}/invoke", json=invoke).status_code == 200
    first = platform.status(name)["cold_starts"][0]
    assert first["sources"] == {"REMOTE": 4}  # a new node: every block from the object store
    # Gone, not only retiring: a replica still stopping is a live PipeCast member holding the
    # model, which the estimates may rightly pick (PEER) before its blocks are demoted to HOST.
    platform.wait_replicas(name, lambda r: r["running"] == 0 and r["starting"] == 0
                           and r["stopping"] == 0, 40)
    assert platform.http().post(f"/v1/functions/{name}/invoke", json=invoke).status_code == 200
    status = platform.status(name)
    colds = status["cold_starts"]
    assert len(colds) == 2 and colds[0]["sources"] == {"HOST": 4}, (  # demoted, then a HOST hit
        colds[0], status["estimates"])
    cli = platform.cli("status", name)
    assert re.search(r"node \w+: HOST [\d.]+ MiB of \d+ GiB \(\d+ blocks\), DISK", cli.stdout), cli.stdout
    metrics = httpx.get(platform.url + "/metrics").text
    host_hits = re.search(r'faascale_tier_hits{node="\w+",tier="HOST"} (\S+)', metrics)
    assert host_hits and float(host_hits.group(1)) >= 4
    assert re.search(r'faascale_tier_used_bytes{node="\w+",tier="HOST"} [1-9]', metrics)


def test_loadtest_burst_end_to_end(platform: Platform, tmp_path: Path) -> None:
    """The CI-sized load test: `faascale loadtest` runs Locust headless (its own process) with a
    short burst against tiny-llama; Locust exits 0, nothing fails, TTFT is recorded, and the SLO
    summary and the report are written."""
    import csv
    import json

    sys.path.insert(0, str(ROOT))
    from loadtest.workload import burst_schedule

    name = "tiny-lt"
    platform.deploy(tiny_doc(name, max_replicas=2))
    out = tmp_path / "lt"
    args = {"--idle-s": "0.5", "--spike-s": "5", "--spike-rate": "3", "--after-s": "0.5",
            "--prompt-tokens": "16", "--output-tokens": "8", "--seed": "7"}
    r = platform.cli("loadtest", name, "--shape", "burst", "--out", str(out), "--tail-s", "1",
                     *(x for kv in args.items() for x in kv), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sent = len(burst_schedule(0.5, 5, 3, 0.5, 0.0, 16, 8, seed=7))
    summary = json.loads((out / "slo.json").read_text())
    assert summary["requests"] == sent > 5 and summary["failed"] == 0
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"] <= summary["e2e_s"]["max"]
    assert summary["slo_ttft_s"] == 2.0 and 0 <= summary["slo_attainment"] <= 1
    rows = {row["Name"]: row for row in csv.DictReader((out / "locust_stats.csv").open())}
    assert int(rows["ttft"]["Request Count"]) == sent and int(rows["ttft"]["Failure Count"]) == 0
    assert int(rows["chat/completions"]["Request Count"]) == sent
    report = (out / "slo.report.md").read_text()
    assert "SLO attainment" in report and "![load and TTFT](slo.png)" in report
    assert (out / "slo.png").stat().st_size > 1000 and (out / "locust.html").exists()
    assert "SLO attainment" in r.stdout
    # The replicas were recorded while the test ran (and 1 s after): the function served.
    polls = [json.loads(line) for line in (out / "slo.replicas.jsonl").read_text().splitlines()]
    assert len(polls) >= 8 and {p["function"] for p in polls} == {name}
    assert max(p["running"] for p in polls) >= 1
    assert polls[-1]["epoch_s"] - summary["started_epoch_s"] >= 6.0 + 1.0  # the test, then the tail
    assert "replica-seconds" in report
