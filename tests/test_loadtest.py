"""The load-test workload (pure: schedules, trace windows, the SLO summary). Locust itself runs
only as its own process (in test_platform.py's end-to-end test), never inside pytest: it
monkey-patches the standard library with gevent."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.workload import (Arrival, ReplicaSample, RequestRecord, TraceRequest,  # noqa: E402
                               WorkloadError, replica_seconds, time_to_replicas,
                               burst_schedule, compress, fit_lengths,
                               rate_per_window, read_llm_trace, steps_schedule, summarize, thin,
                               trace_path, trace_schedule, window)
from faascale.stats import percentile  # noqa: E402
from support import requires, shared_prerequisite  # noqa: E402

SHARED_TRACES = ROOT.parent / "shared" / "traces"


def test_locust_is_not_imported_here() -> None:
    assert "gevent" not in sys.modules and "locust" not in sys.modules


def test_burst_is_quiet_then_a_poisson_spike_then_quiet() -> None:
    arr = burst_schedule(idle_s=10, spike_s=20, spike_rate=5, after_s=10, base_rate=0.2, seed=3)
    spike = [a for a in arr if 10 <= a.t_s < 30]
    quiet = [a for a in arr if a.t_s < 10 or a.t_s >= 30]
    assert 70 <= len(spike) <= 130          # 5/s x 20 s = 100 expected
    assert len(quiet) <= 12                 # 0.2/s x 20 s = 4 expected
    assert all(0 <= a.t_s < 40 for a in arr) and arr == sorted(arr, key=lambda a: a.t_s)
    assert burst_schedule(10, 20, 5, 10, 0.2, seed=3) == arr      # seeded: reproducible
    assert not [a for a in burst_schedule(5, 5, 2, 5, 0.0) if a.t_s < 5 or a.t_s >= 10]
    with pytest.raises(WorkloadError, match="spike"):
        burst_schedule(1, 0, 5)


def test_steps_follow_their_rates() -> None:
    counts = rate_per_window(steps_schedule([0, 10, 2], step_s=10, seed=1), 10.0)
    assert counts[0] == 0 and 70 <= counts[1] <= 130 and counts[2] <= 40
    with pytest.raises(WorkloadError):
        steps_schedule([1, -1], 5)


def test_trace_window_compress_thin_and_fit() -> None:
    reqs = [TraceRequest(t, 100 * (i + 1), 10 * (i + 1)) for i, t in enumerate([0.0, 5.0, 10.0, 15.0])]
    w = window(reqs, 5.0, 10.0)
    assert [r.t_s for r in w] == [0.0, 5.0]
    assert [r.t_s for r in compress(w, 2.0)] == [0.0, 2.5]
    assert thin(reqs, 1.0) == reqs and len(thin(reqs * 250, 0.1, seed=2)) in range(60, 141)
    fitted = fit_lengths(w, max_prompt_tokens=150, max_output_tokens=1000)
    assert fitted == [Arrival(0.0, 100, 20), Arrival(5.0, 150, 30)]  # 300 -> 150: halved
    with pytest.raises(WorkloadError):
        compress(w, 0)


def test_shipped_code_trace_holds_the_burst_and_replays_it() -> None:
    code = read_llm_trace(trace_path("code"))
    assert len(code) == 8819 and code[0].t_s == 0.0
    assert (code[0].prompt_tokens, code[0].output_tokens) == (4808, 10)
    # The README's scale-from-idle event: nothing in (676.0, 849.5), 562 requests in 31 s after.
    assert not [r for r in code if 676.1 < r.t_s < 849.4]
    assert len([r for r in code if 849.0 <= r.t_s < 880.0]) == 562
    sched = trace_schedule("code", 845.0, 40.0, speedup=2.0, rate_scale=1.0,
                           max_prompt_tokens=128, max_output_tokens=16)
    assert len(sched) == len(window(code, 845.0, 40.0))
    assert max(a.t_s for a in sched) < 20.0
    assert max(a.prompt_tokens for a in sched) == 128 and max(a.output_tokens for a in sched) <= 16


def test_summary_percentiles_and_attainment_by_hand() -> None:
    recs = [RequestRecord(0.0, 0.1, 1.0, (0.01, 0.02)),
            RequestRecord(1.0, 0.5, 1.5, (0.01, 0.30)),   # TBT p90 0.271 > 0.2: TBT miss
            RequestRecord(2.0, 3.0, 4.0, (0.01,)),        # TTFT miss
            RequestRecord(3.0, None, 0.2, (), 0, "HTTP 429")]
    s = summarize(recs, slo_ttft_s=1.0, slo_tbt_s=0.2)
    assert (s.requests, s.failed, s.errors) == (4, 1, {"HTTP 429": 1})
    assert s.ttft_attainment == 0.5            # 2 of 4 (the failed one missed)
    assert s.tbt_attainment == pytest.approx(2 / 3)
    assert s.slo_attainment == 0.25            # only the first met both
    assert s.ttft_s["p50"] == 0.5 and s.ttft_s["max"] == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([1.0], 99) == 1.0
    assert math.isnan(percentile([], 50))
    empty = summarize([], 1.0, 0.2)
    assert empty.requests == 0 and math.isnan(empty.slo_attainment)


@requires(*shared_prerequisite(SHARED_TRACES / "azure_llm_2023_code.csv",
                               SHARED_TRACES / "azure_llm_2023_conv.csv"))
def test_shipped_traces_are_byte_identical_to_the_shared_ones() -> None:
    for name in ("code", "conv"):
        assert trace_path(name).read_bytes() == (SHARED_TRACES / f"azure_llm_2023_{name}.csv").read_bytes()


@requires(*shared_prerequisite(SHARED_TRACES / "azure_functions_2019_sample1000_per_minute.csv"))
def test_many_functions_replay_the_spike_scaled_down() -> None:
    from loadtest.workload import functions_schedule, read_functions_trace

    path = SHARED_TRACES / "azure_functions_2019_sample1000_per_minute.csv"
    rows = read_functions_trace(path)
    assert len(rows) == 1000 and all(len(c) == 1440 for _, c in rows)
    # Minutes 1107-1110 (1-based): the spike function first, then the next busiest.
    sched = functions_schedule(path, ["big", "second"], 1107, 4, speedup=60.0,
                               rate_scale=0.001, seed=1)
    by = {n: [a for a in sched if a.function == n] for n in ("big", "second")}
    spike = max(rows, key=lambda r: sum(r[1][1106:1110]))
    expected = sum(spike[1][1106:1110]) * 0.001                    # about 105
    assert abs(len(by["big"]) - expected) <= 4 + 0.1 * expected
    assert len(by["big"]) > len(by["second"]) > 0
    assert all(0 <= a.t_s < 4.0 for a in sched)                   # 4 minutes at 60x = 4 s
    # The spike function was idle in minute 1106 and is called 16,658 times in 1107: from zero.
    assert spike[1][1105] == 0 and spike[1][1106] > 10000
    with pytest.raises(WorkloadError):
        functions_schedule(path, [], 1, 1)


def test_replica_seconds_integrate_serving_and_starting_replicas() -> None:
    # 1 replica for 2 s, then 1 serving + 2 loading for 3 s, then 3 serving until the end (5 s):
    # 2 + 9 + 15 = 26 replica-seconds; loading replicas cost like serving ones.
    samples = [ReplicaSample(5.0, 3, 0), ReplicaSample(0.0, 1, 0), ReplicaSample(2.0, 1, 2)]
    assert replica_seconds(samples, end_s=10.0) == pytest.approx(26.0)
    # A window that starts late and ends early cuts the steps it overlaps.
    assert replica_seconds(samples, end_s=6.0, start_s=1.0) == pytest.approx(1 + 9 + 3)
    assert replica_seconds([], end_s=10.0) == 0.0
    # Samples after the end add nothing.
    assert replica_seconds([*samples, ReplicaSample(12.0, 9, 0)], end_s=10.0) == pytest.approx(26.0)


def test_time_to_replicas_counts_only_serving_replicas_after_the_start() -> None:
    samples = [ReplicaSample(0.0, 3, 0), ReplicaSample(4.0, 1, 2), ReplicaSample(9.5, 2, 1),
               ReplicaSample(12.0, 3, 0)]
    assert time_to_replicas(samples, from_s=3.0, replicas=3) == pytest.approx(9.0)  # not t = 0
    assert time_to_replicas(samples, from_s=3.0, replicas=2) == pytest.approx(6.5)
    assert time_to_replicas(samples, from_s=3.0, replicas=4) == math.inf


def test_time_to_replicas_waits_for_replicas_that_hold_the_whole_model() -> None:
    """A replica serving through a temporary pipeline (running, not full) is not capacity."""
    samples = [ReplicaSample(0.0, 1, 1, 1), ReplicaSample(5.0, 2, 0, 1),
               ReplicaSample(8.0, 2, 0, 2)]
    assert time_to_replicas(samples, from_s=0.0, replicas=2) == pytest.approx(8.0)
    assert ReplicaSample(1.0, 2, 0).num_full == 2 and ReplicaSample(1.0, 1, 0, 3).num_full == 1


def test_full_replicas_leaves_out_members_serving_through_a_pipeline() -> None:
    from faascale.cli.loadtest import full_replicas

    pipecast = {"blocks_needed": 6, "members": {
        "a": {"blocks": 6, "route": "full"}, "b": {"blocks": 3, "route": "pipeline"},
        "c": {"blocks": 0, "route": "loading"}}}  # c: still starting, not counted as running
    assert full_replicas(2, pipecast) == 1
    assert full_replicas(3, None) == 3 and full_replicas(0, pipecast) == 0


def test_report_reads_the_replicas_of_all_functions_per_poll(tmp_path) -> None:
    from loadtest.report import load_replicas

    lines = [{"epoch_s": 100.0, "function": "a", "running": 1, "starting": 0},  # no "full": old
             {"epoch_s": 100.0, "function": "b", "running": 0, "starting": 1},
             {"epoch_s": 100.5, "function": "a", "running": 1, "starting": 1, "full": 0},
             {"epoch_s": 100.5, "function": "b", "running": 1, "starting": 0, "full": 1}]
    path = tmp_path / "slo.replicas.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"epoch_s": 101.0, "func')
    samples = load_replicas(tmp_path / "slo", started_epoch_s=99.0)
    # cut line skipped; a record without "full" counts every serving replica as full
    assert samples == [ReplicaSample(1.0, 1, 1, 1), ReplicaSample(1.5, 2, 1, 1)]
    assert load_replicas(tmp_path / "slo", started_epoch_s=None) == []
    assert load_replicas(tmp_path / "none", started_epoch_s=99.0) == []
