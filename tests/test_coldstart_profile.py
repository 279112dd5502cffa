"""Startup profiles: the recorder and summary (fake clock), and real cold starts of tiny-llama in
fresh processes from each tier (HOST, DISK with its pages evicted, REMOTE)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faascale.coldstart.probe import ProbeError, run_profiles
from faascale.coldstart.profile import (STEPS, Span, StartupProfile, StartupRecorder,
                                        process_started_at_s, source_of, summarize)
from faascale.engine.checkpoint import read_manifest


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recorder_spans_and_the_profile_round_trip() -> None:
    clock = FakeClock()
    rec = StartupRecorder(clock)
    rec.add("process", 998.0, 999.5)
    with rec.span("spec_tokenizer"):
        clock.now += 0.25
    with rec.span("weight_fetch", bytes=100) as attrs:
        clock.now += 2.0
        attrs["tier"] = {"DISK": 4}
    with rec.span("warmup"):
        clock.now += 0.5
    rec.add("first_token", clock.now, clock.now + 0.1)
    with pytest.raises(ValueError, match="before it starts"):
        rec.add("kv_cache", 5.0, 4.0)
    p = rec.finish(function="f", replica="r", model_id="m", source=source_of({"DISK": 4}),
                   weight_bytes=100, machine={"hostname": "box"}, model={"layers": 2},
                   runtime={"warm": False, "preloaded": False})
    assert p.source == "DISK" and p.started_at_s == 998.0 and not p.warm
    # Not bytes: process 1.5 + spec_tokenizer 0.25 + warmup 0.5.
    assert p.fixed_s == pytest.approx(2.25)
    assert list(p.steps()) == ["process", "spec_tokenizer", "weight_fetch", "warmup",
                               "first_token"]
    assert p.step_s("weight_fetch") == pytest.approx(2.0)
    assert p.step_s("cuda_graphs") == 0.0
    # Order to ready: 998.0 -> 1002.75; the first token comes after ready and is not counted.
    assert p.total_s == pytest.approx(4.75)
    back = StartupProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and back.runtime == {"warm": False, "preloaded": False}
    old = p.to_dict()
    del old["runtime"]  # a profile stored before runtimes were recorded
    assert StartupProfile.from_dict(old).runtime == {} and not StartupProfile.from_dict(old).warm
    assert back.spans[2] == Span("weight_fetch", 1000.25, 1002.25, {"bytes": 100,
                                                                     "tier": {"DISK": 4}})
    assert source_of({"HOST": 2, "DISK": 2}) == "MIXED" and source_of({"HOST": 3}) == "HOST"


def test_summary_is_mean_and_p90_per_step_over_successful_starts() -> None:
    def prof(fetch_s: float, ok: bool = True) -> StartupProfile:
        return StartupProfile("f", "r", "m", 0.0, "HOST", 1, (Span("spec_tokenizer", 0, 1),
                                                             Span("weight_fetch", 1, 1 + fetch_s)),
                              ok=ok)
    rows = {r.step: r for r in summarize([prof(f) for f in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
                                         + [prof(100, ok=False)])}
    assert rows["weight_fetch"].n == 10 and rows["weight_fetch"].mean_s == pytest.approx(5.5)
    assert rows["weight_fetch"].p90_s == pytest.approx(9.1)  # linear between the 9th and 10th
    assert rows["total"].mean_s == pytest.approx(6.5)
    assert list(rows) == ["spec_tokenizer", "weight_fetch", "total"]


def test_process_start_time_is_this_process() -> None:
    born = process_started_at_s()
    import time

    assert born is not None and 0 < time.time() - born < 3600


@pytest.mark.parametrize("tier", ["HOST", "DISK", "REMOTE"])
def test_a_real_start_from_each_tier_in_a_fresh_process(tiny_packed: Path, tier: str,
                                                        tmp_path: Path) -> None:
    manifest = read_manifest(tiny_packed)
    (p,) = run_profiles(tiny_packed, tier, 1, work_dir=tmp_path)
    assert p.ok and p.source == tier and p.model_id == manifest.model_id
    assert p.weight_bytes == manifest.total_bytes
    fetch = next(s for s in p.spans if s.name == "weight_fetch")
    assert fetch.attrs["tier"] == {tier: manifest.num_blocks}
    assert fetch.attrs["bytes"] == manifest.total_bytes
    steps = p.steps()
    for name in ("process", "imports", "spec_tokenizer", "weight_fetch", "materialize",
                 "kv_cache", "warmup", "first_token"):
        assert name in steps, steps
    assert "cuda_graphs" not in steps  # CPU
    assert set(steps) <= set(STEPS)
    assert p.model["layers"] == manifest.config.num_layers
    assert p.machine["hostname"] and p.machine["cpus"] >= 1
    # The steps of the start tile its total (they run one after another).
    start = [s for s in p.spans if s.name != "first_token"]
    assert sum(s.duration_s for s in start) == pytest.approx(p.total_s, rel=0.05, abs=0.05)


def test_cli_profile_prints_the_table_and_rejects_bad_input(tiny_packed: Path) -> None:
    cmd = [sys.executable, "-m", "faascale.cli", "coldstart", "profile"]
    r = subprocess.run([*cmd, "--model-dir", str(tiny_packed), "--runs", "2", "--tier", "host",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    profiles = json.loads(r.stdout)
    assert [p["source"] for p in profiles] == ["HOST", "HOST"]
    assert profiles[0]["replica"] != profiles[1]["replica"]  # two processes
    table = subprocess.run([*cmd, "--model-dir", str(tiny_packed), "--runs", "1"],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "from DISK" in table.stdout and "weight_fetch" in table.stdout
    for bad, message in ((["--model-dir", "/nonexistent", "--runs", "1"], "not a packed model"),
                         (["--model-dir", str(tiny_packed), "--tier", "GPU"], "tier must be"),
                         ([], "one of them")):
        r = subprocess.run([*cmd, *bad], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    with pytest.raises(ProbeError, match="runs"):
        run_profiles(tiny_packed, "HOST", 0)
