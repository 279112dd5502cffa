"""What a load test sends and when, and what its results mean. Pure (stdlib only: no gevent, no
Locust), so the CLI, the benchmarks and the tests import it next to Ray without harm.

- **Traces.** ``read_llm_trace`` reads an Azure LLM inference trace 2023 CSV (``TIMESTAMP``,
  ``ContextTokens``, ``GeneratedTokens``) into ``TraceRequest``s with arrival times in seconds
  from the first request. ``window`` cuts a time window, ``compress`` divides time by a speed-up,
  ``thin`` keeps a fraction of the requests (scales the rate, keeps the shape), and
  ``fit_lengths`` scales prompt and output lengths to a model's context.
- **Shapes.** Every load shape is an *open-loop arrival schedule* (``Arrival``: when, prompt
  tokens, output tokens): requests go out at their times whatever the responses do, as real users
  do; a closed loop (N users, each waiting for its answer) would hide a burst behind the slow
  answers it causes. ``burst_schedule`` (idle → spike → idle), ``steps_schedule`` (a staircase of
  rates) and ``trace_schedule`` (a trace window, compressed and thinned).
- **Results.** ``summarize`` turns per-request records (TTFT, time between tokens, end-to-end,
  error) into the SLO summary: p50/p90/p99 and the share of requests that met the function's
  TTFT and TBT targets.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from faascale.stats import percentile

TRACES = Path(__file__).resolve().parent / "traces"
# The two bursty windows of the Azure LLM 2023 code trace (../shared/traces/README.md): the scale
# from 173.5 s idle at t = 849.5 s (562 requests in 31 s), and the busy minutes after t = 840 s.
BURSTY_WINDOWS_S = {"code": (840.0, 120.0), "conv": (0.0, 300.0)}


class WorkloadError(ValueError):
    """A trace or a shape parameter is unusable (the message says which)."""


@dataclass(frozen=True)
class TraceRequest:
    t_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Arrival:
    """One request of a schedule: send at ``t_s`` (seconds from the test's start), to
    ``function`` (empty: the test's default function)."""

    t_s: float
    prompt_tokens: int
    output_tokens: int
    function: str = ""


def read_llm_trace(path: str | Path) -> list[TraceRequest]:
    """An Azure LLM inference trace 2023 CSV, arrivals relative to its first request."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read the trace ({exc})") from None
    if not rows or not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(rows[0]):
        raise WorkloadError(f"{path}: not an Azure LLM trace (TIMESTAMP, ContextTokens, "
                            "GeneratedTokens)")
    out = []
    t0 = None
    for i, r in enumerate(rows):
        try:
            stamp = r["TIMESTAMP"].strip()
            # 100 ns resolution: seven fraction digits, which fromisoformat does not take.
            whole, _, frac = stamp.partition(".")
            t = datetime.fromisoformat(whole).timestamp() + float(f"0.{frac or 0}")
            prompt, output = int(r["ContextTokens"]), int(r["GeneratedTokens"])
        except (ValueError, KeyError) as exc:
            raise WorkloadError(f"{path} row {i + 2}: {exc}") from None
        t0 = t if t0 is None else t0
        out.append(TraceRequest(t - t0, prompt, output))
    return out


def trace_path(name: str) -> Path:
    """``code``/``conv`` (the shipped Azure LLM 2023 traces) or a path to such a CSV."""
    if name in ("code", "conv"):
        return TRACES / f"azure_llm_2023_{name}.csv"
    return Path(name)


def window(requests: Sequence[TraceRequest], start_s: float, duration_s: float
           ) -> list[TraceRequest]:
    """The requests in ``[start_s, start_s + duration_s)``, times shifted to start at 0."""
    if duration_s <= 0:
        raise WorkloadError(f"window duration must be > 0, got {duration_s}")
    return [replace(r, t_s=r.t_s - start_s) for r in requests
            if start_s <= r.t_s < start_s + duration_s]


def compress(requests: Sequence[TraceRequest], speedup: float) -> list[TraceRequest]:
    """Divide every time by ``speedup``: rates × speedup, the shape (CV, peak/mean) unchanged."""
    if speedup <= 0:
        raise WorkloadError(f"speedup must be > 0, got {speedup}")
    return [replace(r, t_s=r.t_s / speedup) for r in requests]


def thin(requests: Sequence[TraceRequest], fraction: float, seed: int = 0) -> list[TraceRequest]:
    """Keep each request with probability ``fraction`` (seeded): the rate × fraction."""
    if not 0 < fraction <= 1:
        raise WorkloadError(f"rate scale must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    return [r for r in requests if fraction >= 1 or rng.random() < fraction]


def fit_lengths(requests: Sequence[TraceRequest], max_prompt_tokens: int,
                max_output_tokens: int) -> list[Arrival]:
    """Scale the lengths so the trace's largest request fits the model: prompts by
    ``max_prompt_tokens / max prompt`` (never up), outputs by their own ratio; at least 1 each."""
    if max_prompt_tokens < 1 or max_output_tokens < 1:
        raise WorkloadError("max prompt and output tokens must be >= 1")
    if not requests:
        return []
    kp = min(1.0, max_prompt_tokens / max(r.prompt_tokens for r in requests))
    ko = min(1.0, max_output_tokens / max(r.output_tokens for r in requests))
    return [Arrival(r.t_s, max(1, round(r.prompt_tokens * kp)), max(1, round(r.output_tokens * ko)))
            for r in requests]


def trace_schedule(trace: str, start_s: float, duration_s: float, speedup: float = 1.0,
                   rate_scale: float = 1.0, max_prompt_tokens: int = 256,
                   max_output_tokens: int = 64, seed: int = 0) -> list[Arrival]:
    """A window of a trace, compressed, thinned and fitted to the model."""
    reqs = window(read_llm_trace(trace_path(trace)), start_s, duration_s)
    return fit_lengths(thin(compress(reqs, speedup), rate_scale, seed), max_prompt_tokens,
                       max_output_tokens)


def _poisson_times(rate_per_s: float, start_s: float, end_s: float, rng: random.Random
                   ) -> list[float]:
    out, t = [], start_s
    if rate_per_s <= 0:
        return out
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end_s:
            return out
        out.append(t)


def _lengths(times: Iterable[float], prompt_tokens: int, output_tokens: int) -> list[Arrival]:
    return [Arrival(t, prompt_tokens, output_tokens) for t in times]


def burst_schedule(idle_s: float, spike_s: float, spike_rate: float, after_s: float = 0.0,
                   base_rate: float = 0.0, prompt_tokens: int = 64, output_tokens: int = 32,
                   seed: int = 0) -> list[Arrival]:
    """Idle (``base_rate``) for ``idle_s``, a Poisson spike at ``spike_rate`` req/s for
    ``spike_s``, then ``after_s`` at ``base_rate`` again."""
    for name, v in (("idle_s", idle_s), ("spike_s", spike_s), ("after_s", after_s),
                    ("base_rate", base_rate)):
        if v < 0 or not math.isfinite(v):
            raise WorkloadError(f"{name} must be a finite number >= 0, got {v}")
    if spike_rate <= 0 or spike_s <= 0:
        raise WorkloadError("a burst needs spike_rate > 0 and spike_s > 0")
    rng = random.Random(seed)
    end_spike = idle_s + spike_s
    times = (_poisson_times(base_rate, 0.0, idle_s, rng)
             + _poisson_times(spike_rate, idle_s, end_spike, rng)
             + _poisson_times(base_rate, end_spike, end_spike + after_s, rng))
    return _lengths(times, prompt_tokens, output_tokens)


def steps_schedule(rates: Sequence[float], step_s: float, prompt_tokens: int = 64,
                   output_tokens: int = 32, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at ``rates[i]`` req/s during step i, each ``step_s`` long."""
    if not rates or step_s <= 0 or any(r < 0 for r in rates):
        raise WorkloadError("steps need rates >= 0 and step_s > 0")
    rng = random.Random(seed)
    times: list[float] = []
    for i, rate in enumerate(rates):
        times += _poisson_times(rate, i * step_s, (i + 1) * step_s, rng)
    return _lengths(times, prompt_tokens, output_tokens)


def read_functions_trace(path: str | Path) -> list[tuple[str, list[int]]]:
    """The Azure Functions 2019 per-minute sample (``HashFunction, HashApp, HashOwner,
    minute_1..minute_1440``): ``(function hash, invocations per minute)`` per function."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            if header[:4] != ["HashFunction", "HashApp", "HashOwner", "minute_1"]:
                raise WorkloadError(f"{path}: not the Azure Functions per-minute sample")
            return [(row[0], [int(v) for v in row[3:]]) for row in reader]
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read the trace ({exc})") from None
    except (ValueError, StopIteration) as exc:
        raise WorkloadError(f"{path}: bad row ({exc})") from None


def functions_schedule(path: str | Path, functions: Sequence[str], start_minute: int,
                       minutes: int, speedup: float = 60.0, rate_scale: float = 0.001,
                       prompt_tokens: int = 32, output_tokens: int = 16, seed: int = 0
                       ) -> list[Arrival]:
    """Many functions from the Azure Functions sample: the ``len(functions)`` busiest trace
    functions of minutes ``[start_minute, start_minute + minutes)`` (1-based, as the columns)
    become the deployed ``functions`` (busiest first). Each minute's count is scaled by
    ``rate_scale`` (rounded at random, so the expected count is exact), its arrivals spread
    uniformly over the minute, and a minute lasts ``60 / speedup`` seconds. Functions that are
    idle and then called in the trace scale from zero in the test."""
    if not functions:
        raise WorkloadError("functions: name at least one deployed function")
    if start_minute < 1 or minutes < 1 or start_minute + minutes - 1 > 1440:
        raise WorkloadError("minutes must lie within 1..1440")
    if speedup <= 0 or not 0 < rate_scale <= 1:
        raise WorkloadError("speedup must be > 0 and rate scale in (0, 1]")
    lo, hi = start_minute - 1, start_minute - 1 + minutes
    rows = sorted(read_functions_trace(path), key=lambda r: -sum(r[1][lo:hi]))[:len(functions)]
    rng = random.Random(seed)
    minute_s = 60.0 / speedup
    out = []
    for name, (_, counts) in zip(functions, rows):
        for m, count in enumerate(counts[lo:hi]):
            expected = count * rate_scale
            n = int(expected) + (1 if rng.random() < expected - int(expected) else 0)
            out += [Arrival(m * minute_s + rng.random() * minute_s, prompt_tokens, output_tokens,
                            name) for _ in range(n)]
    return sorted(out, key=lambda a: a.t_s)


def rate_per_window(arrivals: Sequence[Arrival], window_s: float = 1.0) -> list[int]:
    """Arrivals per ``window_s`` bucket (for figures and checks)."""
    if not arrivals:
        return []
    n = int(max(a.t_s for a in arrivals) // window_s) + 1
    counts = [0] * n
    for a in arrivals:
        counts[int(a.t_s // window_s)] += 1
    return counts


# --- results -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestRecord:
    """One request as the load generator saw it. Times in seconds; ``tbt_s`` are the gaps
    between streamed tokens; ``error`` is None for a request that completed."""

    sent_s: float
    ttft_s: float | None
    e2e_s: float | None
    tbt_s: tuple[float, ...] = ()
    output_tokens: int = 0
    error: str | None = None
    function: str = ""


@dataclass(frozen=True)
class SloSummary:
    requests: int
    failed: int
    slo_ttft_s: float
    slo_tbt_s: float
    ttft_s: dict[str, float] = field(default_factory=dict)
    tbt_s: dict[str, float] = field(default_factory=dict)
    e2e_s: dict[str, float] = field(default_factory=dict)
    ttft_attainment: float = math.nan   # share of all requests with TTFT <= target (failed: no)
    tbt_attainment: float = math.nan    # share of completed requests whose p90 gap <= target
    slo_attainment: float = math.nan    # both, over all requests
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pcts(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)} | (
        {"max": max(values), "mean": sum(values) / len(values)} if values else {})


def summarize(records: Sequence[RequestRecord], slo_ttft_s: float, slo_tbt_s: float
              ) -> SloSummary:
    """The SLO summary: percentiles of TTFT, per-token gaps and end-to-end latency over the
    completed requests; attainment over *all* requests (a failed request missed its SLO)."""
    ok = [r for r in records if r.error is None and r.ttft_s is not None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    gaps = [g for r in ok for g in r.tbt_s]
    ttft_ok = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s]
    tbt_ok = [r for r in ok if not r.tbt_s or percentile(r.tbt_s, 90) <= slo_tbt_s]
    both = [r for r in ttft_ok if not r.tbt_s or percentile(r.tbt_s, 90) <= slo_tbt_s]
    n = len(records)
    return SloSummary(
        requests=n, failed=n - len(ok), slo_ttft_s=slo_ttft_s, slo_tbt_s=slo_tbt_s,
        ttft_s=_pcts([r.ttft_s for r in ok if r.ttft_s is not None]), tbt_s=_pcts(gaps),
        e2e_s=_pcts([r.e2e_s for r in ok if r.e2e_s is not None]),
        ttft_attainment=len(ttft_ok) / n if n else math.nan,
        tbt_attainment=len(tbt_ok) / len(ok) if ok else math.nan,
        slo_attainment=len(both) / n if n else math.nan, errors=errors)


def summarize_by_function(records: Sequence[RequestRecord], slo_s: dict[str, tuple[float, float]]
                          ) -> dict[str, SloSummary]:
    """One summary per function, each against its own (TTFT, TBT) targets."""
    names = sorted({r.function for r in records})
    return {n: summarize([r for r in records if r.function == n], *slo_s.get(n, (2.0, 0.2)))
            for n in names}


def summary_markdown(s: SloSummary, title: str = "SLO summary") -> str:
    def row(name: str, d: dict[str, float]) -> str:
        return (f"| {name} | " + " | ".join(f"{d.get(k, math.nan) * 1000:.0f} ms"
                                            for k in ("p50", "p90", "p99", "max")) + " |")
    lines = [f"## {title}", "",
             f"{s.requests} requests, {s.failed} failed. Targets: TTFT ≤ {s.slo_ttft_s * 1000:.0f} "
             f"ms, time between tokens (p90 of each request) ≤ {s.slo_tbt_s * 1000:.0f} ms.", "",
             f"**SLO attainment {s.slo_attainment * 100:.1f} %** (TTFT {s.ttft_attainment * 100:.1f} %, "
             f"TBT {s.tbt_attainment * 100:.1f} %).", "",
             "| | p50 | p90 | p99 | max |", "|---|---|---|---|---|",
             row("TTFT", s.ttft_s), row("time between tokens", s.tbt_s),
             row("end to end", s.e2e_s)]
    if s.errors:
        lines += ["", "Errors: " + ", ".join(f"{k} × {v}" for k, v in s.errors.items())]
    return "\n".join(lines) + "\n"


def prompt_text(tokens: int, seed: int) -> str:
    """A prompt of about ``tokens`` tokens for a BPE tokenizer: common short words, varied by
    ``seed`` so no two requests share a prefix beyond the first word."""
    words = ("time", "data", "model", "user", "code", "test", "line", "word", "file", "page",
             "note", "list", "task", "plan", "rule", "text")
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(max(1, tokens)))


@dataclass(frozen=True)
class ReplicaSample:
    """A function's replicas at ``t_s`` (seconds from the test's start): serving, and started but
    not serving yet (loading: it holds its GPU all the same)."""

    t_s: float
    running: int
    starting: int = 0
    full: int | None = None  # serving replicas that hold the whole model (None: all of them)

    @property
    def num_full(self) -> int:
        return self.running if self.full is None else min(self.full, self.running)


def replica_seconds(samples: Sequence[ReplicaSample], end_s: float, start_s: float = 0.0) -> float:
    """The cost: serving + starting replicas integrated over [start_s, end_s], each sample held
    until the next (the last one until ``end_s``). Samples need not be sorted."""
    pts = sorted(samples, key=lambda p: p.t_s)
    total = 0.0
    for p, nxt in zip(pts, [*pts[1:], None]):
        lo, hi = max(start_s, p.t_s), min(end_s, nxt.t_s if nxt else end_s)
        if hi > lo:
            total += (p.running + p.starting) * (hi - lo)
    return total


def time_to_replicas(samples: Sequence[ReplicaSample], from_s: float, replicas: int) -> float:
    """Seconds from ``from_s`` until at least ``replicas`` replicas serve holding the whole model
    (a replica serving through a temporary pipeline is not capacity yet; ``math.inf``: never)."""
    for p in sorted(samples, key=lambda p: p.t_s):
        if p.t_s >= from_s and p.num_full >= replicas:
            return p.t_s - from_s
    return math.inf
