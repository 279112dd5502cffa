"""The Ray Serve adapter: hand-built ``AutoscalingContext`` and a capturing sink (no cluster), then
one real Serve run that bursts a deployment up through our policy and back down to zero."""

from __future__ import annotations

import inspect
import json
import threading
import time
from typing import Any

import pytest
import ray
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from faascale.coldstart.start_source import ColdStartEstimate
from faascale.platform.autoscale import PolicyState, ScalingConfig
from faascale.platform.serve_policy import FaascalePolicy, autoscaling_config, policy_kwargs
from faascale.platform.server import free_port

CFG = ScalingConfig(min_replicas=0, max_replicas=3, target_ongoing_per_replica=1.0,
                    keep_alive_s=3.0, downscale_delay_s=1.0)


def make_ctx(*, running: int, target: int, requests: float, queued: float = 0.0,
             state: dict[str, Any] | None = None, now: float | None = 100.0,
             bounds: tuple[int, int] = (0, 3),
             config: AutoscalingConfig | None = None) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="fn", app_name="app"), deployment_name="fn",
        app_name="app", current_num_replicas=running, target_num_replicas=target,
        running_replicas=[], total_num_requests=requests, total_queued_requests=queued,
        aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=bounds[0],
        capacity_adjusted_max_replicas=bounds[1], policy_state=dict(state or {}),
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


def intent(frm: int, to: int, reason: str, at_s: float, ongoing: float) -> dict[str, Any]:
    return {"kind": "scale_intent", "function": "fn", "from_replicas": frm, "to_replicas": to,
            "reason": reason, "at_s": at_s, "ongoing_requests": ongoing, "source": "",
            "expected_ready_s": None, "lead_s": 0.0}


def new_policy(events: list[dict[str, Any]]) -> FaascalePolicy:
    return FaascalePolicy(sink=events.append, **policy_kwargs(CFG, "fn"))


def test_call_returns_count_and_json_state_and_sends_the_intent() -> None:
    events: list[dict[str, Any]] = []
    policy = new_policy(events)
    # 1 running, 6 ongoing (5 queued), 1 per replica -> 6 wanted, max 3.
    n, state = policy(make_ctx(running=1, target=1, requests=6.0, queued=5.0))
    assert (type(n), n) == (int, 3)
    assert PolicyState.from_dict(json.loads(json.dumps(state))).to_dict() == state
    assert events == [intent(1, 3, "queue", 100.0, 6.0)]

    # Next tick: Serve hands the state back with its own keys merged in; 2 replicas still load.
    state = {**state, "__decision_counters": 0, "__decision_timestamp": None}
    n, state2 = policy(make_ctx(running=1, target=3, requests=6.0, queued=3.0, state=state,
                                now=100.1))
    assert n == 3 and len(events) == 1  # loading replicas count: nothing re-ordered
    assert state2["last_busy_s"] == 100.1


def test_the_intent_source_follows_the_estimates_the_policy_is_given() -> None:
    """Literal estimates and a fake clock: the source named in each intent is the fastest
    available one at that moment, and a slow source makes the policy order ahead of the load."""
    events: list[dict[str, Any]] = []
    current: list[ColdStartEstimate] = [ColdStartEstimate("HOST", 1.0),
                                        ColdStartEstimate("PEER", 3.0),
                                        ColdStartEstimate("REMOTE", 8.0)]
    policy = FaascalePolicy(sink=events.append, estimator=lambda fn: list(current),
                            **policy_kwargs(ScalingConfig(max_replicas=6, keep_alive_s=60.0,
                                                          slo_ttft_s=2.0), "fn"))
    state: dict[str, Any] = {}
    n, state = policy(make_ctx(running=1, target=1, requests=2.0, now=10.0, bounds=(0, 6)))
    assert n == 2 and events[-1]["source"] == "HOST" and events[-1]["expected_ready_s"] == 1.0
    # The HOST copy was evicted: the next replica comes from a peer.
    current[0] = ColdStartEstimate("HOST", 1.0, available=False)
    n, state = policy(make_ctx(running=2, target=2, requests=3.0, now=11.0, state=state,
                               bounds=(0, 6)))
    assert n == 3 and (events[-1]["source"], events[-1]["reason"]) == ("PEER", "burst")
    # Only the store is left (8 s start, 6 s beyond the 2 s SLO): a load rising 1/s is met
    # 6 s ahead, 4 + 6 = 10 requests -> 10 replicas, clamped to 6, while 4 ongoing need only 4.
    current[:] = [ColdStartEstimate("REMOTE", 8.0)]
    n, state = policy(make_ctx(running=3, target=3, requests=4.0, now=12.0, state=state,
                               bounds=(0, 6)))
    assert n == 6 and events[-1]["source"] == "REMOTE" and events[-1]["lead_s"] == 6.0
    assert events[-1]["reason"] == "burst"  # 4 ongoing already exceed 3 replicas
    assert [e["source"] for e in events] == ["HOST", "PEER", "REMOTE"]


def test_missing_time_uses_the_wall_clock_in_the_wrapper_only() -> None:
    policy = new_policy([])
    before = time.time()
    _, state = policy(make_ctx(running=1, target=1, requests=1.0, now=None))
    assert before <= state["last_decision_s"] <= time.time()


def test_serve_capacity_bounds_narrow_the_decision() -> None:
    events: list[dict[str, Any]] = []
    # target_capacity 50 % of max 3 -> Serve clamps to 2; the intent must say 2, not 3.
    n, _ = new_policy(events)(make_ctx(running=1, target=1, requests=6.0, bounds=(0, 2)))
    assert n == 2 and events[0]["to_replicas"] == 2


def test_a_broken_or_missing_sink_never_breaks_autoscaling() -> None:
    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("sink down")

    policy = FaascalePolicy(sink=broken, **policy_kwargs(CFG, "fn"))
    assert policy(make_ctx(running=1, target=1, requests=6.0))[0] == 3
    # The default sink (the faascale-events actor) without a Ray connection: dropped, and it
    # must not start a Ray instance on its own.
    assert not ray.is_initialized()
    assert FaascalePolicy(**policy_kwargs(CFG, "fn"))(make_ctx(running=1, target=1,
                                                               requests=6.0))[0] == 3
    assert not ray.is_initialized()


def test_autoscaling_config_uses_our_policy_and_fast_settings() -> None:
    cfg = autoscaling_config(CFG, "fn")
    assert isinstance(cfg, AutoscalingConfig)
    assert not cfg.policy.is_default_policy_function()
    assert cfg.policy.policy_function == "faascale.platform.serve_policy.FaascalePolicy"
    assert cfg.policy.policy_kwargs == {"function": "fn", **CFG.to_dict()}
    json.dumps(cfg.policy.policy_kwargs)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas) == (0, 3, 0)
    assert cfg.target_ongoing_requests == 1.0
    assert cfg.metrics_interval_s == 0.5 and cfg.look_back_period_s == 2.0
    assert cfg.upscale_delay_s == 0 and cfg.downscale_delay_s == 0
    assert cfg.downscale_to_zero_delay_s == 0
    assert cfg.get_upscaling_factor() == 1.0 and cfg.get_downscaling_factor() == 1.0

    # What the controller does: unpickle the class, instantiate it with the kwargs, call it.
    cls = cfg.policy.get_policy()
    assert inspect.isclass(cls) and cls.__name__ == "FaascalePolicy"
    events: list[dict[str, Any]] = []
    policy = cls(sink=events.append, **cfg.policy.policy_kwargs)
    assert policy(make_ctx(running=1, target=1, requests=2.0, config=cfg))[0] == 2
    assert events == [intent(1, 2, "burst", 100.0, 2.0)]


def test_scaling_policy_serve_is_serves_default_policy() -> None:
    """``scaling.policy: serve`` (the "storage" baseline of the bursty benchmark): Serve's own
    queue-length policy and its default delays, our bounds, target and push interval."""
    from faascale.platform.serve_app import scaling_config
    from faascale.platform.serve_policy import serve_default_autoscaling_config
    from faascale.platform.spec import SpecError, parse_function_spec

    doc = {"name": "fn", "model": {"source": "random://tiny-llama"},
           "scaling": {"policy": "serve", "max_replicas": 3, "target_concurrency": 4}}
    spec = parse_function_spec(doc)
    cfg = serve_default_autoscaling_config(scaling_config(spec))
    assert cfg.policy.is_default_policy_function()
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (0, 3, 4.0)
    assert cfg.upscale_delay_s == 30.0 and cfg.downscale_delay_s == 600.0
    assert cfg.metrics_interval_s == 0.5
    assert parse_function_spec({**doc, "scaling": {}}).scaling.policy == "faascale"
    with pytest.raises(SpecError, match="policy"):
        parse_function_spec({**doc, "scaling": {"policy": "k8s-hpa"}})


def test_the_replica_version_ignores_what_only_the_policy_reads() -> None:
    """A scale (min/max) keeps the deployment's version, so Serve changes the target count and
    keeps the serving replicas; anything a replica is built from changes it (a rollover). The
    real scale is in ``test_platform_warm.py`` (the first replica survives a 1 -> 3)."""
    from faascale.platform.serve_app import replica_version
    from faascale.platform.spec import parse_function_spec

    doc = {"name": "fn", "model": {"source": "random://tiny-llama"},
           "scaling": {"min_replicas": 1, "max_replicas": 3}}
    v = replica_version(parse_function_spec(doc), "/m", {"host_dir": "/dev/shm/x"})
    scaled = {**doc, "scaling": {"min_replicas": 3, "max_replicas": 8}}
    assert replica_version(parse_function_spec(scaled), "/m", {"host_dir": "/dev/shm/x"}) == v
    for other in ({**doc, "engine": {"max_batch_size": 4}},
                  {**doc, "scaling": {**doc["scaling"], "keep_alive_s": 5}},
                  {**doc, "model": {"source": "random://tiny-llama", "blocks": 2}}):
        assert replica_version(parse_function_spec(other), "/m", {"host_dir": "/dev/shm/x"}) != v
    assert replica_version(parse_function_spec(doc), "/m2", {"host_dir": "/dev/shm/x"}) != v
    assert replica_version(parse_function_spec(doc), "/m", None) != v
    # the same location holding another model (redeployed: a new manifest digest) rolls replicas
    assert replica_version(parse_function_spec(doc), "/m", {"host_dir": "/dev/shm/x"},
                           "sha256:" + "1" * 64) != v


def test_serve_wrapping_skips_us_from_zero_and_floors_downscale_at_one() -> None:
    """Serve 2.60's own wrapper around a custom policy, run in-process (documents the module
    docstring's findings; if Ray changes them this test says so)."""
    cfg = autoscaling_config(CFG, "fn")
    instance = _resolve_policy_callable(cfg.policy)  # instantiated with policy_kwargs
    events: list[dict[str, Any]] = []
    instance.sink = events.append
    serve_policy = _apply_autoscaling_config(instance)

    # From zero with load: Serve answers 1 replica by itself; our policy is not called.
    n, state = serve_policy(make_ctx(running=0, target=0, requests=5.0, config=cfg))
    assert (n, state, events) == (1, {}, [])
    # First replica running: our policy sees the queue and orders 3 with no delay from Serve.
    n, state = serve_policy(make_ctx(running=1, target=1, requests=6.0, queued=5.0, state=state,
                                     now=102.0, config=cfg))
    assert n == 3 and events == [intent(1, 3, "queue", 102.0, 6.0)]
    assert "__decision_counters" in state  # Serve merged its keys into ours
    # Idle past keep-alive: we say 0, Serve floors N -> 1 first, then 1 -> 0 on the next tick.
    n, state = serve_policy(make_ctx(running=3, target=3, requests=0.0, state=state, now=110.0,
                                     config=cfg))
    assert n == 1 and events[-1] == intent(3, 0, "keep-alive expired", 110.0, 0.0)
    n, state = serve_policy(make_ctx(running=1, target=1, requests=0.0, state=state, now=110.1,
                                     config=cfg))
    assert n == 0 and events[-1] == intent(1, 0, "keep-alive expired", 110.1, 0.0)


# --- one real Serve run ------------------------------------------------------------------------

@pytest.fixture
def serve_instance():
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"port": free_port()})
        yield serve
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _make_events_actor():
    """Defined in a function so it is pickled by value (workers cannot import this test file)."""

    @ray.remote(num_cpus=0)
    class Events:
        def __init__(self) -> None:
            self._events: list[dict] = []

        def record(self, event: dict) -> None:
            self._events.append(event)

        def events(self) -> list[dict]:
            return list(self._events)

    return Events.options(name="faascale-events", namespace="faascale").remote()


def _make_sleeper(serve, config: AutoscalingConfig):
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1,
                      autoscaling_config=config, graceful_shutdown_timeout_s=2.0,
                      graceful_shutdown_wait_loop_s=0.5)
    class Sleeper:
        async def __call__(self, seconds: float) -> str:
            import asyncio

            await asyncio.sleep(seconds)
            return "ok"

    return Sleeper


def _replicas(serve, app: str, deployment: str, states: tuple[str, ...]) -> int:
    overview = serve.status().applications[app].deployments[deployment]
    return sum(n for s, n in overview.replica_states.items() if str(getattr(s, "value", s)) in
               states)


def _wait_for(predicate, timeout_s: float, step_s: float = 0.2) -> float | None:
    """Seconds until ``predicate()`` held, or None at the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(step_s)
    return None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_serve_bursts_up_through_our_policy_and_back_to_zero(serve_instance) -> None:
    serve = serve_instance
    events_actor = _make_events_actor()
    assert ray.get(events_actor.events.remote()) == []

    app, dep = "autoscale-it", "Sleeper"
    handle = serve.run(_make_sleeper(serve, autoscaling_config(CFG, "sleeper")).bind(), name=app,
                       route_prefix=None)
    live = ("STARTING", "UPDATING", "RECOVERING", "RUNNING")
    assert _replicas(serve, app, dep, live) == 0  # min 0: deployed cold

    t0 = time.monotonic()
    responses = [handle.remote(2.0) for _ in range(6)]
    up_s = _wait_for(lambda: _replicas(serve, app, dep, live) > 1, timeout_s=45)
    assert up_s is not None, "never scaled beyond 1 replica"
    assert [r.result(timeout_s=60) for r in responses] == ["ok"] * 6
    burst_s = time.monotonic() - t0

    def intents() -> list[dict]:
        return [e for e in ray.get(events_actor.events.remote()) if e["kind"] == "scale_intent"]

    ups = [e for e in intents() if e["to_replicas"] > 1]
    assert ups and ups[0]["function"] == "sleeper" and ups[0]["from_replicas"] >= 1

    # Down to zero: peak load leaves the 2 s look-back, then 3 s keep-alive, then the stop.
    zero_s = _wait_for(lambda: _replicas(serve, app, dep, live + ("STOPPING",)) == 0,
                       timeout_s=CFG.keep_alive_s + 20)
    assert zero_s is not None, f"not scaled to zero; intents: {intents()}"
    assert any(e["to_replicas"] == 0 and e["reason"] == "keep-alive expired" for e in intents())
    print(f"\nreplicas>1 after {up_s:.1f} s; burst done in {burst_s:.1f} s; "
          f"zero {zero_s:.1f} s after the burst; intents: "
          f"{[(e['from_replicas'], e['to_replicas'], e['reason']) for e in intents()]}")


@pytest.mark.timeout(120)
def test_reading_counts_while_a_deploy_builds_its_config_does_not_collide(serve_instance,
                                                                          monkeypatch) -> None:
    """Serve registers a module with cloudpickle's process-wide pickle-by-value set while it
    builds a config (a deployment's, and each one inside ``serve.status()``), then unregisters it;
    the poller's ``serve.status()`` unregistering it first made a ``scale`` fail with HTTP 500.
    The deploy's window is widened here, so without the backend's lock the poller's status reads
    land inside it."""
    from ray import cloudpickle

    from faascale.platform.registry import FunctionRecord
    from faascale.platform.serve_app import DEPLOYMENT, ServeBackend
    from faascale.platform.spec import parse_function_spec

    serve = serve_instance

    @serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self) -> str:
            return "ok"

    serve.run(Echo.bind(), name="echo", route_prefix=None)  # status() then builds its config
    backend = ServeBackend()
    spec = parse_function_spec({"name": "fn", "model": {"source": "random://tiny-llama"},
                                "resources": {"num_cpus": 0}})
    record = FunctionRecord(spec, "/nonexistent", "m", 0.0, 0.0)
    register = cloudpickle.register_pickle_by_value
    def slow_register(module) -> None:
        register(module)
        if threading.current_thread().name == "builder":  # only the deploy's window is widened
            time.sleep(0.05)

    monkeypatch.setattr(cloudpickle, "register_pickle_by_value", slow_register)
    errors: list[BaseException] = []
    reads = []

    def build() -> None:
        # at least 5 builds, and on until the poller has read 3 times while they ran (a loaded
        # machine's status() can take longer than 5 builds)
        for i in range(200):
            if i >= 5 and len(reads) >= 3:
                return
            try:
                backend.application(record)
            except Exception as e:  # noqa: BLE001 - the test reports whatever was raised
                errors.append(e)

    def poll() -> None:
        while builder.is_alive():
            reads.append(backend.counts()["echo"].running)

    builder = threading.Thread(target=build, name="builder")
    poller = threading.Thread(target=poll)
    builder.start()
    poller.start()
    builder.join(60)
    poller.join(60)
    assert errors == []
    assert len(reads) >= 2 and set(reads) == {1}
