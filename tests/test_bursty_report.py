"""benchmarks/bursty.py's pure parts: the run plan (interleaved, rotated, sweep, full window),
folding runs into medians and spreads, and text chosen by the numbers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bursty import SYSTEMS, plans, scale_rate  # noqa: E402
from benchmarks.bursty_report import fold_runs, reading, table  # noqa: E402


def run(system: str, kind: str, rep: int, p99: float, replica_s: float = 100.0,
        failed: int = 0) -> dict:
    foms = {"requests": 10, "failed": failed, "ttft_p50_s": p99 / 2, "ttft_p99_s": p99,
            "tbt_p99_s": 0.5, "slo_attainment": 0.5, "replica_s": replica_s, "capacity_s": 20.0,
            "peak_full": 2, "starts": 1, "sources": {"REMOTE": [1, 30.0]}}
    return {"plan": {"system": system, "kind": kind, "rep": rep, "window_s": 60.0,
                     "store_rate": "500mbit"}, "foms": foms, "ttft_s": [p99 / 2, p99],
            "git": "abc1234" if rep else "def5678"}


def test_plan_interleaves_and_rotates_the_systems_then_sweeps_then_runs_the_full_window() -> None:
    systems = list(SYSTEMS)
    todo = plans(systems, 3, 60.0, "500mbit", 4.0, True)
    bursts = [p for p in todo if p.kind == "burst"]
    assert len(bursts) == 3 * len(systems)
    for rep in range(3):  # every system once per repetition, each repetition led by another
        order = [p.system for p in bursts if p.rep == rep]
        assert sorted(order) == sorted(systems) and order[0] == systems[rep]
    sweep = [p for p in todo if p.kind == "store"]
    assert [p.system for p in sweep] == systems and {p.store_rate for p in sweep} == {"2000mbit"}
    assert [p.window_s for p in todo if p.kind == "full"] == [320.0] * len(systems)
    assert not [p for p in plans(systems, 1, 30.0, "500mbit", 1.0, False) if p.kind != "burst"]
    assert scale_rate("1gbit", 2.5) == "2.5gbit"


def test_fold_gives_median_and_spread_per_system_and_kind() -> None:
    runs = [run("faascale", "burst", k, p) for k, p in enumerate((4.0, 2.0, 9.0))]
    runs += [run("serve-default", "burst", k, p, failed=1) for k, p in enumerate((20.0, 30.0, 25.0))]
    runs.append(run("faascale", "store", 0, 1.5))
    folded = fold_runs(runs)
    us = folded["burst"]["faascale"]
    assert us["ttft_p99_s"] == {"median": 4.0, "min": 2.0, "max": 9.0, "n": 3}
    assert us["runs"] == 3 and folded["store"]["faascale"]["runs"] == 1
    assert folded["burst"]["serve-default"]["failed_total"] == 3
    assert folded["burst"]["faascale"]["sources"] == {"REMOTE": (3, 30.0)}
    assert "| faascale | 3 (`abc1234`, `def5678`) | 30 | 0 |" in table(folded["burst"])


def test_reading_follows_the_numbers() -> None:
    low = fold_runs([run("faascale", "burst", k, p) for k, p in enumerate((2.0, 3.0, 4.0))]
                    + [run("no-pipecast", "burst", k, p) for k, p in enumerate((8.0, 9.0, 10.0))])
    text = reading(low["burst"], {})
    assert "Lowest median p99 TTFT over the repetitions: **faascale**" in text
    assert "faascale / no-pipecast p99 TTFT = 0.33x (lower; the spreads do not overlap)" in text
    high = fold_runs([run("faascale", "burst", k, p) for k, p in enumerate((10.0, 12.0, 3.0))]
                     + [run("no-pipecast", "burst", k, p) for k, p in enumerate((8.0, 9.0, 10.0))])
    text = reading(high["burst"], {})
    assert "**no-pipecast**" in text
    assert "= 1.11x (higher; the spreads overlap" in text


def test_each_system_is_folded_from_the_newest_commit_it_was_measured_at() -> None:
    """A system measured again after a change is not folded with its own past; a system not
    measured again keeps its runs; the order of the runs is kept."""
    from benchmarks.bursty_report import newest_per_system

    old = [run("faascale", "burst", 1, p) for p in (30.0, 32.0)]  # at abc1234
    base = [run("serve-default", "burst", 1, 60.0)]
    new = [dict(run("faascale", "burst", 1, p), git="fff0000") for p in (20.0, 22.0)]
    kept = newest_per_system([*old, *base, *new])
    assert kept == [*base, *new]
    assert fold_runs(kept)["burst"]["faascale"]["ttft_p99_s"]["median"] == 21.0
    assert newest_per_system([*new, *old]) == old  # "newest" = measured last


def test_ray_serve_llms_starts_are_read_from_its_replica_counts() -> None:
    """A replica that appears starting is matched, first in first out, with the next one that
    turns running; the replica serving at the first sample is no start; a start still pending
    at the end is not counted."""
    from benchmarks.bursty_serve_llm import starts_from_polls
    from loadtest.workload import ReplicaSample

    polls = [ReplicaSample(0.0, 1, 0, 1), ReplicaSample(1.0, 1, 2, 1), ReplicaSample(2.0, 1, 3, 1),
             ReplicaSample(5.0, 2, 2, 2), ReplicaSample(9.5, 4, 0, 4), ReplicaSample(12.0, 4, 0, 4)]
    starts = starts_from_polls(polls)
    assert [(s["t_s"], s["total_s"], s["source"]) for s in starts] == [
        (1.0, 4.0, "REMOTE"), (1.0, 8.5, "REMOTE"), (2.0, 7.5, "REMOTE")]
    assert starts_from_polls([ReplicaSample(0.0, 1, 1, 1), ReplicaSample(3.0, 1, 1, 1)]) == []


def test_the_floor_is_read_against_the_targets() -> None:
    """provisioned (no start at all) sets the floor; a target under it is said to be out of
    reach for any system that starts replicas, one above it reachable in principle."""
    folded = fold_runs([run("provisioned", "burst", k, p) for k, p in enumerate((19.0, 20.0, 21.0))]
                       + [run("faascale", "burst", k, p) for k, p in enumerate((30.0, 32.0, 34.0))]
                       + [run("serve-default", "burst", k, p) for k, p in enumerate((60.0, 66.0, 70.0))]
                       + [run("serverlessllm-like", "burst", k, p) for k, p in enumerate((44.0, 50.0, 52.0))])
    text = reading(folded["burst"], {})
    assert "p99 TTFT is 20.0 s" in text and "- faascale: 1.60x the floor." in text
    assert "5x below serve-default's is 13.2 s: under the floor (20.0 s)" in text
    assert "2x below serverlessllm-like's is 25.0 s: above the floor (20.0 s)" in text
    assert "the floor" not in reading(fold_runs([run("faascale", "burst", 0, 3.0)])["burst"], {})


def test_the_targets_are_met_or_missed_by_the_numbers_and_a_miss_names_the_start_steps() -> None:
    """Each issue-16 target is read from the medians; a missed TTFT target names the steps of the
    system's starts in the trace (medians; the start before the trace is not on a request's path)."""
    from benchmarks.bursty_report import target_results

    def with_starts(r: dict, *steps: dict) -> dict:
        return r | {"starts": [{"t_s": -30.0, "total_s": 99.0, "steps_s": {"process": 90.0}}]
                    + [{"t_s": 5.0, "total_s": sum(s.values()), "steps_s": s} for s in steps]}

    slow = {"process": 9.0, "weight_fetch": 18.0}
    folded = fold_runs(
        [with_starts(run("faascale", "burst", k, p, replica_s=90.0), slow,
                     {"weight_fetch": 16.0, "imports": 0.4}) for k, p in enumerate((30.0, 32.0, 34.0))]
        + [run("serve-default", "burst", k, p, replica_s=150.0) for k, p in enumerate((60.0, 66.0, 70.0))]
        + [run("serverlessllm-like", "burst", k, p, replica_s=80.0, failed=k)
           for k, p in enumerate((70.0, 80.0, 90.0))])
    steps = folded["burst"]["faascale"]["start_steps"]
    assert steps["count"] == 6 and steps["total_s"] == 21.7  # the pre-trace start left out
    assert steps["steps_s"] == {"weight_fetch": 17.0, "process": 4.5, "imports": 0.2}
    assert target_results(folded["burst"]) == {
        "pass_p99_ttft_5x_below_storage": False,  # 32 > 66 / 5
        "pass_p99_ttft_2x_below_sllm": True,  # 32 <= 80 / 2
        "pass_replica_s_vs_storage": True,  # 90 <= 0.7 x 150
        "pass_replica_s_vs_sllm": False,  # 90 > 80
        "pass_failed_zero": True}
    text = reading(folded["burst"], {})
    assert "- p99 TTFT >= 5x lower than serve-default's (66.0 s; goal <= 13.2 s): 32.0 s, " \
           "0.48x, **missed**" in text
    assert "- p99 TTFT >= 2x lower than serverlessllm-like's (80.0 s; goal <= 40.0 s): 32.0 s, " \
           "0.40x, **met**" in text
    assert "- replica-seconds <= serverlessllm-like's (80.0; goal <= 80.0): 90.0, 1.12x, " \
           "**missed**" in text
    assert ("faascale's 6 starts in the bursts took a median 21.7 s (weight_fetch 17.0 s, "
            "process 4.5 s, imports 0.2 s), 1.6x the 13.2 s goal; weight_fetch alone is longer "
            "than the goal.") in text
    # every TTFT target met: nothing is said to be in the way
    fast = fold_runs([with_starts(run("faascale", "burst", 0, 5.0), slow),
                      run("serve-default", "burst", 0, 66.0)])
    assert "In the way" not in reading(fast["burst"], {})
    assert target_results(fast["burst"])["pass_p99_ttft_5x_below_storage"] is True


def test_starts_shorter_than_a_missed_goal_are_not_said_to_be_in_its_way() -> None:
    """A TTFT target missed although the starts fit in the goal: the sentence says the rest is
    queueing, not that the starts' sum is too long."""
    short = {"t_s": 5.0, "total_s": 3.0, "steps_s": {"weight_fetch": 2.0, "process": 1.0}}
    folded = fold_runs([run("faascale", "burst", 0, 30.0) | {"starts": [short]},
                        run("serve-default", "burst", 0, 66.0)])
    text = reading(folded["burst"], {})
    assert "took a median 3.0 s (weight_fetch 2.0 s, process 1.0 s), 0.2x the 13.2 s goal; " \
           "the starts fit in the goal: the rest is requests waiting behind others." in text
