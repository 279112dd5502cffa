"""The autoscaling decision is pure: literal snapshots and a fake clock (plain numbers) in.

Expected counts are worked out by hand in the comments, from the contract in ``decide``'s
docstring, not copied from its output.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from faascale.coldstart.start_source import ColdStartEstimate, choose_source
from faascale.platform.autoscale import (
    PolicyState,
    ScaleDecision,
    ScaleIntent,
    ScalingConfig,
    ScalingSnapshot,
    decide,
    load_trend_per_s,
)

# 4 concurrent requests per replica, up to 8 replicas, 30 s keep-alive, 5 s downscale delay.
CFG = ScalingConfig(min_replicas=0, max_replicas=8, target_ongoing_per_replica=4.0,
                    keep_alive_s=30.0, downscale_delay_s=5.0)


def snap(now_s: float, current: int, ongoing: float, queued: float = 0.0,
         loading: int = 0) -> ScalingSnapshot:
    return ScalingSnapshot(now_s=now_s, current_replicas=current, ongoing_requests=ongoing,
                           queued_requests=queued, loading_replicas=loading)


class Run:
    """Feeds decisions back as state, the way Serve does; the clock is whatever we pass."""

    def __init__(self, cfg: ScalingConfig = CFG, state: PolicyState | None = None) -> None:
        self.cfg, self.state = cfg, state

    def __call__(self, s: ScalingSnapshot) -> ScaleDecision:
        decision, self.state = decide(self.cfg, s, self.state, function="fn")
        return decision


# --- scale up --------------------------------------------------------------------------------

def test_burst_scale_up_is_immediate_and_proportional() -> None:
    # 12 ongoing / 4 per replica = 3 replicas, on the very first call (no delay, no history).
    d = Run()(snap(100.0, current=1, ongoing=12))
    assert (d.target_replicas, d.reason) == (3, "burst")
    # 13 ongoing -> ceil(13/4) = 4; 20 -> 5; 4 -> 1 (no change from 1).
    assert Run()(snap(100.0, current=1, ongoing=13)).target_replicas == 4
    assert Run()(snap(100.0, current=1, ongoing=20)).target_replicas == 5
    assert Run()(snap(100.0, current=1, ongoing=4)).intent is None


def test_queued_requests_make_the_reason_queue() -> None:
    d = Run()(snap(7.0, current=1, ongoing=10, queued=6))  # ceil(10/4) = 3
    assert (d.target_replicas, d.reason) == (3, "queue")


def test_headroom_multiplies_demand() -> None:
    cfg = ScalingConfig(max_replicas=8, target_ongoing_per_replica=4.0, upscale_headroom=1.5)
    # 10 * 1.5 = 15 -> ceil(15/4) = 4 (without headroom it would be 3).
    assert Run(cfg)(snap(0.0, current=1, ongoing=10)).target_replicas == 4


def test_float_load_from_serve_is_not_over_ordered() -> None:
    # Serve aggregates load as floats; 8.0000001 requests need 2 replicas of 4, not 3.
    assert Run()(snap(0.0, current=1, ongoing=8.0000001)).target_replicas == 2
    assert Run()(snap(0.0, current=1, ongoing=8.01)).target_replicas == 3


def test_scale_up_is_clamped_to_max() -> None:
    d = Run()(snap(0.0, current=2, ongoing=100))  # 25 wanted, max 8
    assert d.target_replicas == 8
    assert d.intent == ScaleIntent("fn", 2, 8, "burst", 0.0, 100)
    # Already at max under a larger burst: no change, no intent.
    assert Run()(snap(1.0, current=8, ongoing=1000)).intent is None


def test_loading_replicas_count_as_capacity_on_the_way() -> None:
    # 1 serving + 2 loading = 3 ordered; 12 ongoing need 3: nothing more to order.
    d = Run()(snap(0.0, current=1, loading=2, ongoing=12, queued=8))
    assert (d.target_replicas, d.intent) == (3, None)
    # 16 ongoing need 4: one more, from 3 (ordered), not from 1 (serving).
    d = Run()(snap(0.0, current=1, loading=2, ongoing=16, queued=12))
    assert d.intent == ScaleIntent("fn", 3, 4, "queue", 0.0, 16)


# --- scale down ------------------------------------------------------------------------------

def test_downscale_waits_the_delay_then_goes_to_the_windows_peak() -> None:
    run = Run()
    assert run(snap(0.0, current=4, ongoing=16)).target_replicas == 4  # steady
    # From t=1 the load needs fewer replicas: 6 -> 2, 10 -> 3, 4 -> 1. Hold 4 for 5 s.
    for t, ongoing in [(1.0, 6), (3.0, 10), (5.9, 4)]:
        d = run(snap(t, current=4, ongoing=ongoing))
        assert (d.target_replicas, d.reason, d.intent) == (4, "downscale pending", None)
    # t=6.0 is 5 s after t=1: scale down to the most wanted in the window (3), not to 1.
    d = run(snap(6.0, current=4, ongoing=4))
    assert d.intent == ScaleIntent("fn", 4, 3, "idle", 6.0, 4)
    # A new window opens at 6.5; 5 s later the load (1 replica's worth) decides.
    assert run(snap(6.5, current=3, ongoing=4)).target_replicas == 3
    assert run(snap(11.4, current=3, ongoing=4)).target_replicas == 3
    d = run(snap(11.5, current=3, ongoing=4))
    assert (d.target_replicas, d.reason) == (1, "idle")


def test_a_tick_at_full_load_restarts_the_downscale_delay() -> None:
    run = Run()
    run(snap(0.0, current=4, ongoing=16))
    assert run(snap(1.0, current=4, ongoing=4)).reason == "downscale pending"
    assert run(snap(2.0, current=4, ongoing=16)).reason == "steady"  # window closed
    assert run(snap(6.0, current=4, ongoing=4)).target_replicas == 4  # window reopens at 6
    assert run(snap(10.9, current=4, ongoing=4)).target_replicas == 4
    assert run(snap(11.0, current=4, ongoing=4)).target_replicas == 1


def test_delay_is_counted_in_seconds_not_calls() -> None:
    # The same load drop observed every 0.1 s, 0.5 s or 2.5 s downscales at the same second.
    for dt in (0.1, 0.5, 2.5):
        run = Run()
        run(snap(0.0, current=4, ongoing=16))
        first_down = None
        for i in range(200):
            t = round(1.0 + i * dt, 9)
            if run(snap(t, current=4, ongoing=4)).target_replicas < 4:
                first_down = t
                break
        assert first_down == 6.0, dt


# --- keep-alive and zero ---------------------------------------------------------------------

def test_scale_to_zero_only_after_keep_alive_without_requests() -> None:
    run = Run()
    run(snap(0.0, current=1, ongoing=1))  # last busy at t=0
    for t in (0.5, 10.0, 29.9):
        d = run(snap(t, current=1, ongoing=0))
        assert (d.target_replicas, d.reason, d.intent) == (1, "keep-alive", None)
    d = run(snap(30.0, current=1, ongoing=0))
    assert d.intent == ScaleIntent("fn", 1, 0, "keep-alive expired", 30.0, 0)
    # At zero with no load it stays at zero.
    d = run(snap(31.0, current=0, ongoing=0))
    assert (d.target_replicas, d.intent) == (0, None)


def test_a_request_during_keep_alive_restarts_it() -> None:
    run = Run()
    run(snap(0.0, current=1, ongoing=1))
    assert run(snap(20.0, current=1, ongoing=0.5)).target_replicas == 1  # busy again at 20
    assert run(snap(30.0, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(49.9, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(50.0, current=1, ongoing=0)).target_replicas == 0


def test_idle_replicas_shrink_to_one_then_zero() -> None:
    run = Run()
    run(snap(0.0, current=3, ongoing=12))
    assert run(snap(1.0, current=3, ongoing=0)).target_replicas == 3  # pending
    d = run(snap(6.0, current=3, ongoing=0))  # delay over; keep-alive keeps 1
    assert d.intent == ScaleIntent("fn", 3, 1, "idle", 6.0, 0)
    assert run(snap(29.0, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(30.0, current=1, ongoing=0)).target_replicas == 0


def test_keep_alive_shorter_than_downscale_delay_goes_straight_to_zero() -> None:
    cfg = ScalingConfig(max_replicas=8, target_ongoing_per_replica=4.0, keep_alive_s=2.0,
                        downscale_delay_s=5.0)
    run = Run(cfg)
    run(snap(0.0, current=3, ongoing=12))
    assert run(snap(1.0, current=3, ongoing=0)).target_replicas == 3
    d = run(snap(2.0, current=3, ongoing=0))
    assert d.intent == ScaleIntent("fn", 3, 0, "keep-alive expired", 2.0, 0)


def test_keep_alive_counts_from_first_sight_when_no_busy_time_is_known() -> None:
    # Fresh state, one idle replica at t=50: kept until t=80, not dropped at once.
    run = Run()
    assert run(snap(50.0, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(79.9, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(80.0, current=1, ongoing=0)).target_replicas == 0


def test_a_replica_started_without_us_gets_a_full_keep_alive() -> None:
    # We scaled to zero at t=30 (last busy t=0). At t=500 Serve's from-zero path starts a replica
    # for a request we never saw; by the time we are called the load reads 0. The stale busy
    # time (t=0) must not kill the new replica.
    state = PolicyState(last_busy_s=0.0, last_ordered_replicas=0, last_target_replicas=0,
                        last_reason="steady", last_decision_s=499.9)
    run = Run(state=state)
    assert run(snap(500.0, current=0, loading=1, ongoing=0)).target_replicas == 1
    assert run(snap(529.9, current=1, ongoing=0)).target_replicas == 1
    assert run(snap(530.0, current=1, ongoing=0)).target_replicas == 0


def test_a_downscale_stepped_through_one_is_not_a_new_replica() -> None:
    # We asked 3 -> 0 at t=30; Serve applies it as 3 -> 1 -> 0. At 1 we must still say 0,
    # not mistake the remaining replica for one somebody started (and keep it 30 s more).
    run = Run()
    run(snap(0.0, current=3, ongoing=12))
    run(snap(1.0, current=3, ongoing=0))
    assert run(snap(30.0, current=3, ongoing=0)).target_replicas == 0
    d = run(snap(30.1, current=1, ongoing=0))
    assert d.intent == ScaleIntent("fn", 1, 0, "keep-alive expired", 30.1, 0)


def test_min_replicas_is_never_undercut() -> None:
    cfg = ScalingConfig(min_replicas=2, max_replicas=8, target_ongoing_per_replica=4.0,
                        keep_alive_s=30.0, downscale_delay_s=5.0)
    run = Run(cfg)
    run(snap(0.0, current=4, ongoing=16))
    assert run(snap(1.0, current=4, ongoing=0)).target_replicas == 4
    d = run(snap(6.0, current=4, ongoing=0))
    assert d.intent == ScaleIntent("fn", 4, 2, "idle", 6.0, 0)
    for t in (31.0, 1000.0, 1e6):
        assert run(snap(t, current=2, ongoing=0)).target_replicas == 2


def test_below_min_is_raised_at_once_with_reason_min() -> None:
    cfg = ScalingConfig(min_replicas=1, max_replicas=4, target_ongoing_per_replica=4.0)
    d = Run(cfg)(snap(0.0, current=0, ongoing=0))
    assert d.intent == ScaleIntent("fn", 0, 1, "min", 0.0, 0)
    # Above max (max was lowered): clamp to max at once, no delay.
    cfg = ScalingConfig(min_replicas=0, max_replicas=2, target_ongoing_per_replica=4.0)
    d = Run(cfg)(snap(0.0, current=5, ongoing=20))
    assert d.intent == ScaleIntent("fn", 5, 2, "max", 0.0, 20)


def test_never_outside_min_max() -> None:
    rng = random.Random(0)
    for _ in range(300):
        lo = rng.randint(0, 3)
        cfg = ScalingConfig(min_replicas=lo, max_replicas=rng.randint(max(lo, 1), 6),
                            target_ongoing_per_replica=rng.choice([0.5, 1.0, 4.0]),
                            keep_alive_s=rng.choice([0.0, 3.0, 30.0]),
                            downscale_delay_s=rng.choice([0.0, 5.0]),
                            upscale_headroom=rng.choice([1.0, 2.0]))
        run, t = Run(cfg), 0.0
        for _ in range(20):
            t += rng.choice([0.1, 1.0, 10.0])
            s = snap(t, current=rng.randint(0, 9), loading=rng.randint(0, 3),
                     ongoing=rng.choice([0, 0, 0.4, 3, 17, 100]))
            d = run(s)
            assert cfg.min_replicas <= d.target_replicas <= cfg.max_replicas
            assert (d.intent is not None) == (d.target_replicas != s.ordered_replicas)


# --- state, intents, config ------------------------------------------------------------------

def test_intent_carries_everything_the_coordinator_needs() -> None:
    d, _ = decide(CFG, snap(12.5, current=2, ongoing=30, queued=22), None, function="smollm2")
    assert d.intent == ScaleIntent(function="smollm2", from_replicas=2, to_replicas=8,
                                   reason="queue", at_s=12.5, ongoing_requests=30)
    assert ScaleIntent.from_dict(json.loads(json.dumps(d.intent.to_dict()))) == d.intent


def test_state_round_trips_through_json_and_ignores_serve_keys() -> None:
    run = Run()
    run(snap(0.0, current=4, ongoing=16))
    run(snap(1.0, current=4, ongoing=6))  # opens a downscale window: every field is set
    state = run.state
    assert state == PolicyState(last_busy_s=1.0, below_since_s=1.0, below_high_water_replicas=2,
                                last_ordered_replicas=4, last_target_replicas=4,
                                last_reason="downscale pending", last_decision_s=1.0,
                                history=((0.0, 16.0), (1.0, 6.0)))
    data = json.loads(json.dumps(state.to_dict()))
    assert PolicyState.from_dict(data) == state
    data.update({"__decision_counters": -3, "__decision_timestamp": 123.0})
    assert PolicyState.from_dict(data) == state
    assert PolicyState.from_dict({}) == PolicyState() == PolicyState.from_dict(None)
    # A restored state continues the same window: 5 s after t=1 it scales down to 2.
    d, _ = decide(CFG, snap(6.0, current=4, ongoing=6), PolicyState.from_dict(data))
    assert d.target_replicas == 2


@pytest.mark.parametrize("field, value", [
    ("min_replicas", -1),
    ("min_replicas", 1.5),
    ("max_replicas", 0),
    ("max_replicas", 1),  # below min_replicas=2
    ("target_ongoing_per_replica", 0),
    ("target_ongoing_per_replica", math.nan),
    ("keep_alive_s", -1.0),
    ("keep_alive_s", math.inf),
    ("downscale_delay_s", -0.5),
    ("upscale_headroom", 0.9),
    ("upscale_headroom", "2"),
])
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"min_replicas": 2, "max_replicas": 4}
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"^{field}: "):
        ScalingConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_valid_and_json() -> None:
    cfg = ScalingConfig()
    assert (cfg.min_replicas, cfg.keep_alive_s, cfg.downscale_delay_s) == (0, 60.0, 5.0)
    assert ScalingConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- cold-start estimates: which source, and how far ahead -----------------------------------

def est(source: str, ready_s: float, available: bool = True) -> ColdStartEstimate:
    return ColdStartEstimate(source=source, ready_s=ready_s, available=available)


def test_the_fastest_available_source_is_chosen_and_named_in_the_intent() -> None:
    many = (est("REMOTE", 9.0), est("DISK", 4.0), est("HOST", 1.5), est("PEER", 3.0))
    assert choose_source(many).source == "HOST"
    # The HOST copy is gone (evicted): the peers' multicast is now fastest.
    gone = (est("REMOTE", 9.0), est("DISK", 4.0), est("HOST", 1.5, available=False),
            est("PEER", 3.0))
    assert choose_source(gone).source == "PEER"
    assert choose_source((est("HOST", 1.0, available=False),)) is None
    assert choose_source(()) is None
    # A tie goes to the narrower band, then to the peer before the store.
    tie = (ColdStartEstimate("REMOTE", 5.0, high_s=6.0), ColdStartEstimate("PEER", 5.0, high_s=9.0))
    assert choose_source(tie).source == "REMOTE"
    assert choose_source((est("REMOTE", 5.0), est("PEER", 5.0))).source == "PEER"
    with pytest.raises(ValueError, match="source"):
        est("GPU", 1.0)

    s = ScalingSnapshot(now_s=10.0, current_replicas=1, ongoing_requests=12, estimates=gone)
    d = Run()(s)
    assert d.target_replicas == 3
    assert (d.intent.source, d.intent.expected_ready_s) == ("PEER", 3.0)
    # Without estimates the intent names no source (the replica decides, as before).
    assert Run()(snap(10.0, current=1, ongoing=12)).intent.source == ""


def test_trend_is_the_least_squares_slope() -> None:
    assert load_trend_per_s(((0.0, 0.0), (1.0, 2.0), (2.0, 4.0))) == pytest.approx(2.0)
    assert load_trend_per_s(((0.0, 4.0), (1.0, 2.0), (2.0, 0.0))) == pytest.approx(-2.0)
    assert load_trend_per_s(((0.0, 1.0), (1.0, 5.0))) == 0.0  # two points: no trend yet


def ramp(cfg: ScalingConfig, estimates: tuple[ColdStartEstimate, ...]) -> list[tuple[float, int, str]]:
    """Load rising 1 request/s from 1 at t=0, replicas appear when ordered (current = ordered)."""
    run, current, out = Run(cfg), 1, []
    for i in range(12):
        t = float(i)
        d = run(ScalingSnapshot(now_s=t, current_replicas=current, ongoing_requests=1.0 + t,
                                estimates=estimates))
        if d.target_replicas != current:
            out.append((t, d.target_replicas, d.reason))
            current = d.target_replicas
    return out


def test_a_slow_source_scales_ahead_of_the_breach_by_its_start_time() -> None:
    slow = (est("REMOTE", 6.0),)           # 6 s start - 2 s SLO = 4 s ahead
    cfg = ScalingConfig(max_replicas=8, target_ongoing_per_replica=4.0, slo_ttft_s=2.0)
    # Reactive: load 5 (t=4) needs a 2nd replica, load 9 (t=8) a 3rd.
    reactive = ramp(ScalingConfig(max_replicas=8, target_ongoing_per_replica=4.0,
                                  predictive=False), slow)
    assert reactive == [(4.0, 2, "burst"), (8.0, 3, "burst")]
    # Predictive: from t=2 the trend is 1/s (three samples); at t=2, 3 + 4 s x 1/s = 7 > 4:
    # the 2nd replica is ordered at t=2 instead of t=4; the 3rd when 1 + t + 4 > 8, at t=4
    # instead of t=8; the 4th when 1 + t + 4 > 12, at t=8 (reactive: t=12, after the ramp).
    ahead = ramp(cfg, slow)
    assert ahead == [(2.0, 2, "predicted"), (4.0, 3, "predicted"), (8.0, 4, "predicted")]
    # A source that starts within the SLO needs no lead: reactive timing.
    fast = ramp(cfg, (est("HOST", 1.5),))
    assert fast == reactive
    # The intent says how far ahead it ordered.
    d, _ = decide(cfg, ScalingSnapshot(now_s=2.0, current_replicas=1, ongoing_requests=3.0,
                                       estimates=slow),
                  PolicyState(history=((0.0, 1.0), (1.0, 2.0))), function="fn")
    assert (d.reason, d.intent.lead_s, d.intent.source) == ("predicted", 4.0, "REMOTE")


def test_a_falling_trend_never_removes_replicas_early() -> None:
    cfg = ScalingConfig(max_replicas=8, target_ongoing_per_replica=4.0, slo_ttft_s=0.0)
    run = Run(cfg)
    slow = (est("REMOTE", 20.0),)
    for i, load in enumerate([16.0, 14.0, 12.0, 10.0]):
        d = run(ScalingSnapshot(now_s=float(i), current_replicas=4, ongoing_requests=load,
                                estimates=slow))
    # 10 ongoing needs 3 of the 4 replicas; the downscale waits for its delay as always.
    assert (d.target_replicas, d.reason) == (4, "downscale pending")
    # History older than the trend window is forgotten (and is bounded).
    assert all(3.0 - t < cfg.trend_window_s for t, _ in run.state.history)
