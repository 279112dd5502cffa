"""Locust: open-loop replay of a workload against a faascale function, streaming, with the
numbers a user judges an LLM service by.

Run it as its own process (Locust patches the standard library with gevent: never import it
next to Ray or boto3), headless, one dispatching user::

    FAASCALE_TOKEN=... python -m locust -f loadtest/locustfile.py --headless -u 1 -r 1 \\
        --host http://127.0.0.1:8080 --function tiny-llama --shape burst --spike-rate 4 \\
        --csv out/locust --html out/locust.html --summary-out out/slo

(``faascale loadtest NAME ...`` does exactly this.) The one user sends every request of the
schedule (``loadtest/workload.py``: burst, steps or trace replay) at its arrival time in its own
greenlet, so a slow answer never delays the next request. Each request is a streaming
``POST /v1/chat/completions``; Locust gets, besides the request itself (time to headers):

- ``SSE ttft``: time to the first streamed token,
- ``SSE tbt``: every gap between two streamed tokens,
- ``SSE e2e``: the whole request (a failure, with its reason, if it did not complete).

At the end the per-request records become the SLO summary (``--summary-out PREFIX``:
``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.records.json``). Locust exits 1 if any request failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Group
from locust import HttpUser, constant, events, stats, task
from requests.adapters import HTTPAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.workload import (Arrival, RequestRecord, WorkloadError,  # noqa: E402
                               burst_schedule, functions_schedule, prompt_text,
                               steps_schedule, summarize, summarize_by_function,
                               summary_markdown, trace_schedule)

RECORDS: list[RequestRecord] = []
STARTED_EPOCH_S: list[float] = []  # wall clock at the schedule's t = 0 (records' sent_s count from it)


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    g = parser.add_argument_group("faascale workload")
    g.add_argument("--function", default=os.environ.get("FAASCALE_FUNCTION", ""),
                   help="the function (the OpenAI model name)")
    g.add_argument("--shape", choices=("burst", "steps", "trace", "functions"), default="burst")
    g.add_argument("--functions", default="", help="functions: deployed functions, comma-separated")
    g.add_argument("--functions-trace", default="", help="functions: the Azure Functions CSV")
    g.add_argument("--start-minute", type=int, default=1100, help="functions: first minute")
    g.add_argument("--minutes", type=int, default=10, help="functions: minutes to replay")
    g.add_argument("--idle-s", type=float, default=5.0, help="burst: quiet time before the spike")
    g.add_argument("--spike-s", type=float, default=10.0, help="burst: spike length")
    g.add_argument("--spike-rate", type=float, default=4.0, help="burst: requests/s in the spike")
    g.add_argument("--after-s", type=float, default=5.0, help="burst: quiet time after it")
    g.add_argument("--base-rate", type=float, default=0.0, help="burst: requests/s when quiet")
    g.add_argument("--rates", default="1,2,4", help="steps: requests/s per step")
    g.add_argument("--step-s", type=float, default=10.0, help="steps: seconds per step")
    g.add_argument("--trace", default="code", help="trace: code, conv or a CSV path")
    g.add_argument("--window-start-s", type=float, default=840.0)
    g.add_argument("--window-s", type=float, default=120.0)
    g.add_argument("--speedup", type=float, default=1.0, help="trace: time compression")
    g.add_argument("--rate-scale", type=float, default=1.0, help="trace: keep this fraction")
    g.add_argument("--prompt-tokens", type=int, default=64, help="burst/steps prompt length")
    g.add_argument("--output-tokens", type=int, default=32, help="burst/steps output length")
    g.add_argument("--max-prompt-tokens", type=int, default=256, help="trace: scale prompts")
    g.add_argument("--max-output-tokens", type=int, default=64, help="trace: scale outputs")
    g.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    g.add_argument("--slo-tbt-ms", type=float, default=200.0)
    g.add_argument("--request-timeout-s", type=float, default=300.0)
    g.add_argument("--summary-out", default="", help="write PREFIX.json/.md/.records.json")
    g.add_argument("--seed", type=int, default=0)


def schedule(o: Any) -> list[Arrival]:
    if o.shape == "burst":
        return burst_schedule(o.idle_s, o.spike_s, o.spike_rate, o.after_s, o.base_rate,
                              o.prompt_tokens, o.output_tokens, o.seed)
    if o.shape == "steps":
        return steps_schedule([float(r) for r in o.rates.split(",") if r.strip()], o.step_s,
                              o.prompt_tokens, o.output_tokens, o.seed)
    if o.shape == "functions":
        names = [f for f in o.functions.split(",") if f.strip()]
        return functions_schedule(o.functions_trace, names, o.start_minute, o.minutes,
                                  o.speedup, o.rate_scale, o.prompt_tokens, o.output_tokens,
                                  o.seed)
    return trace_schedule(o.trace, o.window_start_s, o.window_s, o.speedup, o.rate_scale,
                          o.max_prompt_tokens, o.max_output_tokens, o.seed)


class Replay(HttpUser):
    """The dispatcher: sends the whole schedule, then stops the test."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.client.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=1024))
        token = os.environ.get("FAASCALE_TOKEN", "")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @task
    def replay(self) -> None:
        o = self.environment.parsed_options
        try:
            arrivals = schedule(o)
        except WorkloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            self.environment.process_exit_code = 2
            self.environment.runner.quit()
            return
        start = time.monotonic()
        STARTED_EPOCH_S.append(time.time())
        group = Group()
        for i, a in enumerate(arrivals):
            delay = start + a.t_s - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self.one, a, i, time.monotonic() - start)
        group.join()
        # Locust's CSV files are rewritten every CSV_STATS_INTERVAL_SEC and not again at quit:
        # wait one interval so they count the last requests too.
        gevent.sleep(stats.CSV_STATS_INTERVAL_SEC + 0.5)
        self.environment.runner.quit()

    def _fire(self, name: str, seconds: float, exc: BaseException | None = None,
              length: int = 0) -> None:
        events.request.fire(request_type="SSE", name=name, response_time=seconds * 1000,
                            response_length=length, exception=exc, context={})

    def one(self, a: Arrival, i: int, sent_s: float) -> None:
        o = self.environment.parsed_options
        function = a.function or o.function
        body = {"model": function, "stream": True, "temperature": 0.0, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "max_tokens": a.output_tokens,
                "messages": [{"role": "user", "content": prompt_text(a.prompt_tokens, o.seed + i)}]}
        t0 = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        tokens = 0
        error = None
        try:
            with self.client.post("/v1/chat/completions", json=body, headers=self.headers,
                                  stream=True, catch_response=True, name="chat/completions",
                                  timeout=o.request_timeout_s) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}"
                    resp.failure(f"{error}: {resp.text[:200]}")
                else:
                    for line in resp.iter_lines():
                        if not line or not line.startswith(b"data: "):
                            continue
                        data = line[6:]
                        if data == b"[DONE]":
                            break
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            error = f"stream error: {chunk['error'].get('type', '?')}"
                            break
                        if chunk.get("usage"):
                            tokens = int(chunk["usage"].get("completion_tokens") or tokens)
                        choices = chunk.get("choices") or [{}]
                        # A token is a chunk with text, or the final chunk when the last tokens
                        # had none to show (a partial character); the role chunk is not one.
                        if choices[0].get("delta", {}).get("content") or (
                                first is None and choices[0].get("finish_reason")):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                    if error is None and first is None:
                        error = "no token streamed"
                    resp.success() if error is None else resp.failure(error)
        except Exception as exc:  # noqa: BLE001 - a request that died is a failed request
            error = f"{type(exc).__name__}"
        end = time.perf_counter()
        if first is not None:
            self._fire("ttft", first - t0)
        for g in gaps:
            self._fire("tbt", g)
        self._fire("e2e", end - t0, RuntimeError(error) if error else None, tokens)
        RECORDS.append(RequestRecord(sent_s=sent_s, ttft_s=None if first is None else first - t0,
                                     e2e_s=end - t0, tbt_s=tuple(gaps), output_tokens=tokens,
                                     error=error, function=function))


@events.quitting.add_listener
def _write_summary(environment: Any, **_: Any) -> None:
    o = environment.parsed_options
    if not o or not o.summary_out:
        return
    summary = summarize(RECORDS, o.slo_ttft_ms / 1000, o.slo_tbt_ms / 1000)
    prefix = Path(o.summary_out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # started_epoch_s: when the schedule's t = 0 was, on the wall clock (a benchmark lines the
    # records up with what it saw the platform do)
    Path(f"{prefix}.json").write_text(json.dumps(
        {**summary.to_dict(), "started_epoch_s": STARTED_EPOCH_S[0] if STARTED_EPOCH_S else None},
        indent=1))
    Path(f"{prefix}.md").write_text(summary_markdown(summary, f"{o.function}: {o.shape}"))
    Path(f"{prefix}.records.json").write_text(json.dumps([asdict(r) for r in RECORDS]))
    if len({r.function for r in RECORDS}) > 1:  # several functions: one summary each too
        targets = (o.slo_ttft_ms / 1000, o.slo_tbt_ms / 1000)
        per = summarize_by_function(RECORDS, {r.function: targets for r in RECORDS})
        Path(f"{prefix}.functions.json").write_text(
            json.dumps({n: v.to_dict() for n, v in per.items()}, indent=1))
    if summary.failed:
        environment.process_exit_code = 1
