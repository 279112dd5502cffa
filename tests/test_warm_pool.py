"""The warm runtime pool's pure parts (settings, the prestart decision, the keeper's tick against a
simulated raylet), and the raylet calls it relies on against a real local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faascale.platform.warm_pool import (NodeInfo, NodePoolState, PoolSettingError, WarmPool,
                                         parse_pool_setting, plan_prestarts, pool_enabled,
                                         ray_system_config, summary, target_size)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [(None, None), ("", None), ("auto", None), ("AUTO", None),
                                           ("off", 0), ("0", 0), ("3", 3), (2, 2)])
def test_parse_pool_setting(text: object, expected: int | None) -> None:
    assert parse_pool_setting(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1", "many", "1.5"])
def test_bad_pool_setting_is_a_typed_error(text: str) -> None:
    with pytest.raises(PoolSettingError, match="warm pool: expected auto, off or a number"):
        parse_pool_setting(text)


def test_target_and_system_config() -> None:
    assert target_size(None, free_gpus=0) == 1  # auto, a node without GPUs: one
    assert target_size(None, free_gpus=4, total_gpus=8) == 4  # auto: one per free GPU
    assert target_size(None, free_gpus=0, total_gpus=1) == 0  # every GPU serves: none
    assert target_size(2, free_gpus=8) == 2
    assert ray_system_config(None) == {"preload_python_modules": ["faascale.platform.warm_runtime"]}
    assert ray_system_config(0) == {} and not pool_enabled(0)


def test_plan_orders_the_deficit_one_at_a_time_and_settles_pending_orders() -> None:
    d = plan_prestarts([], target=2, state=NodePoolState(), now_s=0.0)
    assert d.order == 1 and d.state.pending_s == (0.0,)
    # Still starting: nothing new is ordered while the order is pending.
    d = plan_prestarts([], target=2, state=d.state, now_s=1.0)
    assert d.order == 0 and len(d.state.pending_s) == 1
    # It arrived: it settles the order, and the next one goes out.
    d = plan_prestarts(["w1"], target=2, state=d.state, now_s=2.0)
    assert d.order == 1 and d.state.pending_s == (2.0,)
    d = plan_prestarts(["w1", "w2"], target=2, state=d.state, now_s=3.0)
    assert d.order == 0 and d.state.pending_s == ()
    # A replica took w1: one is ordered to refill, and the take is counted.
    d = plan_prestarts(["w2"], target=2, state=d.state, now_s=4.0)
    assert d.order == 1 and d.state.taken_total == 1 and d.state.ordered_total == 3
    # With more allowed at once, the whole deficit goes out in one tick.
    assert plan_prestarts([], target=3, state=NodePoolState(), now_s=0.0, max_starting=4).order == 3


def test_plan_waits_before_refilling_after_a_take() -> None:
    d = plan_prestarts(["w1", "w2"], target=2, state=NodePoolState(seen=frozenset({"w1", "w2"})),
                       now_s=0.0)
    d = plan_prestarts(["w2"], 2, d.state, now_s=10.0, refill_delay_s=5.0)
    assert d.order == 0 and d.state.last_taken_s == 10.0  # the replica is starting: not now
    assert plan_prestarts(["w2"], 2, d.state, now_s=13.0, refill_delay_s=5.0).order == 0
    assert plan_prestarts(["w2"], 2, d.state, now_s=15.5, refill_delay_s=5.0).order == 1


def test_plan_gives_up_orders_that_never_started() -> None:
    d = plan_prestarts([], target=1, state=NodePoolState(), now_s=0.0, startup_timeout_s=10)
    assert d.order == 1
    assert plan_prestarts([], 1, d.state, now_s=5.0, startup_timeout_s=10).order == 0
    assert plan_prestarts([], 1, d.state, now_s=11.0, startup_timeout_s=10).order == 1


class SimulatedRaylet:
    """A raylet whose ordered workers register one tick after the order (pure logic fake)."""

    def __init__(self) -> None:
        self.idle: dict[str, int] = {}
        self.starting = 0
        self.orders: list[int] = []
        self.next_pid = 100
        self.fail = False

    def idle_workers(self) -> dict[str, int]:
        if self.fail:
            raise ConnectionError("raylet down")
        for _ in range(self.starting):
            self.next_pid += 1
            self.idle[f"w{self.next_pid}"] = self.next_pid
        self.starting = 0
        return dict(self.idle)

    def prestart(self, n: int, keep_alive_s: int) -> None:
        self.orders.append(n)
        self.starting += n

    def close(self) -> None:
        pass


def test_keeper_refills_each_node_and_reports_errors_per_node() -> None:
    raylets = {"a:1": SimulatedRaylet(), "b:1": SimulatedRaylet()}
    nodes = [NodeInfo("A", "a:1", free_gpus=0), NodeInfo("B", "b:1", free_gpus=2, total_gpus=2)]
    idle_reports: list[int] = []
    pool = WarmPool(None, nodes=lambda: nodes, client=raylets.__getitem__,
                    on_idle_change=idle_reports.append, refill_delay_s=0.0)
    pool.tick()
    assert raylets["a:1"].orders == [1] and raylets["b:1"].orders == [1]
    pool.tick()
    pool.tick()
    assert raylets["a:1"].orders == [1] and raylets["b:1"].orders == [1, 1]
    by_node = {p["node"]: p for p in pool.status()}
    assert by_node["A"]["idle"] == 1 and by_node["B"]["idle"] == 2 and by_node["B"]["target"] == 2
    assert summary(pool.status())["idle"] == 3 and idle_reports == [0, 2, 3]
    raylets["b:1"].idle.popitem()  # a replica took one of B's runtimes
    raylets["a:1"].fail = True
    pool.tick()
    by_node = {p["node"]: p for p in pool.status()}
    assert raylets["b:1"].orders == [1, 1, 1] and by_node["B"]["taken_total"] == 1
    assert "raylet down" in by_node["A"]["error"]
    assert raylets["a:1"].orders == [1], "no order without an answer"


def test_raylet_prestart_and_idle_workers_on_a_real_ray(tmp_path: Path, tiny_packed: Path) -> None:
    """The two raylet calls against a real local Ray with the preload on: ordered workers appear
    as idle, never-used workers; they prepare the published model while they wait (through Ray's
    internal KV, in a worker that has no job); an actor created afterwards runs in one of them,
    warm, and takes that model's metadata and parsed tokenizer instead of reading them."""
    script = textwrap.dedent("""
        import json, sys, time
        t_start = time.time()
        import ray
        from faascale.platform import model_prep
        from faascale.platform.warm_pool import RayletClient, ray_nodes, ray_system_config
        ray.init(address="local", include_dashboard=False, num_cpus=1,
                 _system_config=ray_system_config(None))
        location = sys.argv[1]
        model_prep.publish("tiny", location)
        assert model_prep.published_locations() == [location]
        node = ray_nodes()[0]
        client = RayletClient(node.address)
        deadline = time.monotonic() + 120
        before = client.idle_workers()
        for _ in range(2):  # one at a time, as the keeper orders them
            n = len(client.idle_workers())
            client.prestart(1, keep_alive_s=300)
            while len(client.idle_workers()) < n + 1 and time.monotonic() < deadline:
                time.sleep(0.2)
        idle = client.idle_workers()
        from faascale.platform.warm_runtime import prepared_marker, ready_marker
        def ready(pid):  # written by the runtime itself, this start's (not an older same pid's)
            try:
                return (float(ready_marker(pid).read_text()) > t_start
                        and location in prepared_marker(pid).read_text().split())
            except (OSError, ValueError):
                return False
        while not all(ready(p) for p in idle.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # idle for longer than WARM_MIN_IDLE_S

        @ray.remote(num_cpus=0)
        class Probe:
            def __init__(self):
                from faascale.platform import warm_runtime
                import os
                self.out = {"pid": os.getpid(), **warm_runtime.runtime_state(time.time())}
                from faascale.platform import model_prep
                got = model_prep.take(location, wait_s=0)
                self.out["prepared"] = got is not None and got.tokenizer.encode("hi") != []
            def get(self):
                return self.out
        got = ray.get(Probe.remote().get.remote(), timeout=120)
        print(json.dumps({"before": len(before), "idle": sorted(idle.values()), "probe": got}))
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, "-c", script, str(tiny_packed)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["idle"]) >= out["before"] + 2, out
    assert out["probe"]["pid"] in out["idle"], f"the actor got a pooled worker: {out}"
    assert out["probe"]["warm"] is True and out["probe"]["warmup_error"] is None, out["probe"]
    assert out["probe"]["prepared"] is True, out["probe"]


def test_a_runtime_is_warm_only_if_it_was_ready_before_the_replica_was_ordered() -> None:
    from faascale.platform import warm_runtime as w

    assert w.WARMUP_ERROR is None  # the kernel warm-up ran on the tiny Llama
    ready = w.READY_S
    assert w.runtime_state(ready + 5, ordered_s=ready + 1)["warm"] is True
    late = w.runtime_state(ready + 5, ordered_s=ready - 1)  # still importing when ordered
    assert late["warm"] is False and late["ready_before_order_s"] == -1.0
    assert w.runtime_state(ready + 0.2)["warm"] is False  # no order: idle too briefly
    assert w.runtime_state(ready + 5)["warm"] is True
    stale = w.runtime_state(ready + 5, ordered_s=ready - 1000)  # an old order: not this start's
    assert stale["basis"].startswith("idle") and stale["warm"] is True
