"""Warm runtimes for real: `faascale up` with a warm pool, a function scaled 1 -> 3 on one node; the
new replicas start in pooled Ray workers (process and imports done before they were ordered); with
the pool off the same scale-out starts cold."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_platform import Platform, free_port, tiny_doc

pytestmark = pytest.mark.slow


def _up(tmp: Path, pool: str) -> Platform:
    p = Platform(tmp, free_port())
    p.env["FAASCALE_WARM_POOL"] = pool
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return p


def _ready(pid: int, since_s: float) -> bool:
    from faascale.platform.warm_runtime import ready_marker

    try:
        return float(ready_marker(pid).read_text()) > since_s
    except (OSError, ValueError):
        return False


def _wait_pool_ready(p: Platform, name: str, idle: int, since_s: float, timeout_s: float) -> None:
    """Until the node's pool holds ``idle`` runtimes that finished their preload."""
    deadline = time.monotonic() + timeout_s
    while True:
        pools = p.status(name)["warm_pool"]
        pids = [pid for pool in pools for pid in pool["idle_pids"]]
        if len(pids) >= idle and sum(_ready(pid, since_s) for pid in pids) >= idle:
            return
        assert time.monotonic() < deadline, f"the pool never got {idle} ready runtimes: {pools}"
        time.sleep(0.5)


def _wait_prepared(p: Platform, name: str, timeout_s: float) -> None:
    """Until every idle runtime has prepared the function's model (``model_prep.py``)."""
    from faascale.platform.warm_runtime import prepared_marker

    location = p.status(name)["model_dir"]
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [pid for pool in p.status(name)["warm_pool"] for pid in pool["idle_pids"]]
        done = []
        for pid in pids:
            try:
                done.append(location in prepared_marker(pid).read_text().split())
            except OSError:
                done.append(False)
        if done and all(done):
            return
        assert time.monotonic() < deadline, f"not prepared by every idle runtime: {pids} {done}"
        time.sleep(0.5)


def _spec_step(profile: dict[str, Any]) -> dict[str, Any]:
    """The attrs of the start's metadata-and-tokenizer span (the one with the breakdown)."""
    return next(s["attrs"] for s in profile["spans"]
                if s["name"] == "spec_tokenizer" and "tokenizer_s" in s["attrs"])


def _ok_profiles(p: Platform, name: str) -> list[dict[str, Any]]:
    return [x for x in p.http().get(f"/v1/functions/{name}/startups").json()["profiles"] if x["ok"]]


def _scale_out_profiles(p: Platform, name: str) -> list[dict[str, Any]]:
    """1 -> 3 replicas; the profiles of the two new replicas. The serving replica stays: a scale
    is a new target count, not a new version of the replicas (Serve rolled every replica over
    to a new one before ``serve_app.replica_version``: 4 starts for 1 -> 3)."""
    (first,) = [x["replica"] for x in _ok_profiles(p, name)]
    r = p.cli("scale", name, "--min", "3", "--max", "3")
    assert r.returncode == 0, r.stderr
    p.wait_replicas(name, lambda r: r["running"] == 3, 240)
    deadline = time.monotonic() + 30
    while True:  # the profiles reach the registry through the events actor
        profiles = _ok_profiles(p, name)
        if len(profiles) >= 3:
            break
        assert time.monotonic() < deadline, profiles
        time.sleep(0.5)
    time.sleep(3)  # a rolling replacement would add a fourth start by now
    profiles = _ok_profiles(p, name)
    assert len(profiles) == 3 and first in [x["replica"] for x in profiles], \
        [(x["replica"], x["started_at_s"]) for x in profiles]
    assert p.status(name)["replicas"]["running"] == 3
    return [x for x in profiles if x["replica"] != first]


def _steps(profile: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for span in profile["spans"]:
        out[span["name"]] = out.get(span["name"], 0.0) + span["end_s"] - span["start_s"]
    return out


def test_scale_out_on_warm_runtimes_and_cold_without_the_pool(tmp_path_factory: Any) -> None:
    since = time.time()
    warm = _up(tmp_path_factory.mktemp("warm-home"), "3")
    try:
        warm.deploy(tiny_doc("tiny-pool", min_replicas=1, max_replicas=3))
        warm.wait_replicas("tiny-pool", lambda r: r["running"] == 1, 240)
        _wait_pool_ready(warm, "tiny-pool", 3, since, 180)
        _wait_prepared(warm, "tiny-pool", 60)
        time.sleep(1.5)  # idle for longer than WARM_MIN_IDLE_S
        new = _scale_out_profiles(warm, "tiny-pool")
        for prof in new:
            steps = _steps(prof)
            assert prof["runtime"]["warm"] is True, prof["runtime"]
            assert steps["process"] + steps["imports"] <= 0.1, steps
            assert "kernel_warmup" not in steps, steps
            # the model's warm-up request runs after ready, while Serve routes to the replica
            assert "warmup" not in steps and prof["runtime"]["warmup"] == "background", prof
            # the metadata and the parsed tokenizer came from the runtime, read while it waited
            assert _spec_step(prof)["prepared_ahead"] is True, _spec_step(prof)
            # and every module the start uses was imported before it was ordered (Serve's
            # controller class, the source choice, the store clients: tens of ms each when not)
            assert prof["runtime"]["imported"] == [], prof["runtime"]
        status = warm.cli("status", "tiny-pool")
        assert "warm runtimes on" in status.stdout and "warm runtime, fixed part" in status.stdout, \
            status.stdout
        metrics = warm.http().get("/metrics").text
        assert "faascale_warm_runtimes_target{" in metrics and "faascale_warm_runtimes_idle{" in metrics
        # The pool refills what the replicas took.
        _wait_pool_ready(warm, "tiny-pool", 3, since, 180)
        pools = warm.status("tiny-pool")["warm_pool"]
        assert sum(pool["taken_total"] for pool in pools) >= 2, pools
    finally:
        warm.cli("down", timeout=120)

    cold = _up(tmp_path_factory.mktemp("cold-home"), "off")
    try:
        cold.deploy(tiny_doc("tiny-nopool", min_replicas=1, max_replicas=3))
        cold.wait_replicas("tiny-nopool", lambda r: r["running"] == 1, 240)
        assert cold.status("tiny-nopool")["warm_pool"] == []
        for prof in _scale_out_profiles(cold, "tiny-nopool"):
            steps = _steps(prof)
            runtime = {k: v for k, v in prof["runtime"].items() if k != "imported"}
            assert runtime == {"preloaded": False, "warm": False,
                               "warmup": "background"}, prof["runtime"]
            # the worker's start and the imports (torch, the engine: where Ray's worker start
            # ends and the replica module's imports begin varies) were on this start's path
            assert steps.get("process", 0.0) + steps.get("imports", 0.0) > 0.5, steps
            assert _spec_step(prof)["prepared_ahead"] is False, _spec_step(prof)
    finally:
        cold.cli("down", timeout=120)
