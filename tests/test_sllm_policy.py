"""ServerlessLLM's autoscaling (``scaling.policy: serverlessllm``): the pure decision on a fake
clock, then the Serve class-callable built the way the controller builds it."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from faascale.platform.autoscale import ScalingConfig, ScalingSnapshot
from faascale.platform.sllm_policy import SllmState, decide_sllm, desired_instances

CFG = ScalingConfig(min_replicas=0, max_replicas=4, target_ongoing_per_replica=2.0,
                    keep_alive_s=3.0)


def step(state: SllmState, now_s: float, requests: float, replicas: int) -> tuple[int, SllmState]:
    return decide_sllm(CFG, ScalingSnapshot(now_s=now_s, current_replicas=replicas,
                                            ongoing_requests=requests), state)


@pytest.mark.parametrize(("requests", "want"), [(0, 0), (1, 1), (2, 1), (2.0000001, 1), (3, 2),
                                                (8, 4), (50, 4)])
def test_desired_is_ceil_of_in_flight_over_target_within_bounds(requests: float, want: int) -> None:
    assert desired_instances(CFG, requests) == want


def test_one_replica_more_per_second_while_the_load_wants_more() -> None:
    state, replicas, seen = SllmState(), 1, []
    for k in range(40):  # 4 s of 0.1 s ticks with 8 requests in flight: wants 4
        replicas, state = step(state, 100.0 + 0.1 * k, 8.0, replicas)
        seen.append(replicas)
    assert seen[0] == 2  # the first tick steps at once
    assert seen.index(3) == 10 and seen.index(4) == 20  # then one a second
    assert seen[-1] == 4


def test_down_one_at_a_time_each_after_keep_alive_without_a_new_request() -> None:
    state = SllmState()
    replicas, state = step(state, 0.0, 8.0, 4)  # busy: 4 wanted, 4 there
    assert replicas == 4
    times = []
    t = 0.0
    while replicas > 0 and t < 60:
        t += 0.5
        before = replicas
        replicas, state = step(state, t, 0.0, replicas)
        if replicas < before:
            times.append(t)
    # idle_time grows by one tick per tick until it reaches keep_alive (3 s), then one replica
    # goes and idle_time restarts: one replica about every keep_alive + 1 s
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(3.9 <= g <= 4.1 for g in gaps), gaps
    assert 3.0 <= times[0] <= 4.1


def test_a_new_request_restarts_the_idle_time() -> None:
    state = SllmState()
    replicas, state = step(state, 0.0, 1.0, 2)  # wants 1, has 2: idle starts
    for t in (1.0, 2.0):
        replicas, state = step(state, t, 1.0, replicas)
    assert replicas == 2 and state.idle_s == pytest.approx(3.0)
    replicas, state = step(state, 3.0, 2.0, replicas)  # a request arrived: in flight rose
    assert replicas == 2 and state.idle_s == pytest.approx(1.0)  # restarted, then this tick
    replicas, state = step(state, 4.0, 1.0, replicas)
    assert replicas == 2  # idle 0 < 3 s: stays


def test_state_round_trips_through_the_dict_serve_keeps() -> None:
    _, state = step(SllmState(), 5.0, 3.0, 1)
    assert SllmState.from_dict({**state.to_dict(), "__decision_counters": {}}) == state


def test_serve_builds_and_calls_the_serverlessllm_policy() -> None:
    from test_serve_policy import make_ctx

    from faascale.platform.serve_app import _autoscaling
    from faascale.platform.spec import parse_function_spec

    spec = parse_function_spec({"name": "fn", "model": {"source": "random://tiny-llama"},
                                "scaling": {"policy": "serverlessllm", "max_replicas": 3,
                                            "target_concurrency": 2, "keep_alive_s": 3}})
    cfg = _autoscaling(spec)
    assert isinstance(cfg, AutoscalingConfig)
    assert cfg.policy.policy_function == "faascale.platform.serve_policy.ServerlessLLMPolicy"
    assert cfg.upscale_delay_s == 0 and cfg.downscale_delay_s == 0
    cls = cfg.policy.get_policy()
    policy = cls(**cfg.policy.policy_kwargs)
    n, state = policy(make_ctx(running=1, target=1, requests=5.0, config=cfg))
    assert n == 2  # wants ceil(5 / 2) = 3; one step a tick
    n, _ = policy(make_ctx(running=1, target=2, requests=5.0, state=state, now=100.5, config=cfg))
    assert n == 2  # within the second: no step
    n, _ = policy(make_ctx(running=1, target=2, requests=5.0, state=state, now=101.0, config=cfg))
    assert n == 3
