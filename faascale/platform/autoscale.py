"""The autoscaling decision: load snapshot + state in, target replica count + state (+ intent) out.

Pure: no Ray, no wall clock (the time comes in the snapshot), no I/O. The Ray Serve adapter is
``serve_policy.py``; the ``ScaleIntent`` it forwards is what the PipeCast coordinator plans from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from faascale.coldstart.start_source import ColdStartEstimate, choose_source

# Elapsed-time comparisons tolerate float drift: 0.1 + 0.2 s of fake clock is 0.30000000000000004.
_EPS_S = 1e-6
# Serve's aggregated load is a float (a window mean or peak); 2.0000001 requests is 2, not 3.
_EPS_REQUESTS = 1e-6

REASON_BURST = "burst"               # up: ongoing demand exceeds the capacity serving or loading
REASON_QUEUE = "queue"               # up: as burst, and requests are already waiting in a queue
REASON_IDLE = "idle"                 # down: load stayed lower for downscale_delay_s
REASON_KEEP_ALIVE = "keep-alive expired"  # down to zero: no request for keep_alive_s
REASON_MIN = "min"                   # up to min_replicas (e.g. after min was raised)
REASON_MAX = "max"                   # down to max_replicas (e.g. after max was lowered)
REASON_STEADY = "steady"             # no change: the capacity matches the demand
REASON_PENDING = "downscale pending"  # no change yet: load is lower, the delay has not elapsed
REASON_WARM = "keep-alive"           # no change: idle, but the last replica is kept warm
REASON_PREDICTED = "predicted"       # up: the load trend crosses capacity within the cold start

MAX_HISTORY = 64


@dataclass(frozen=True)
class ScalingConfig:
    """How one function scales. Validated here; everything below trusts it.

    ``target_ongoing_per_replica`` is the concurrency one replica should carry (its engine's max
    batch: 16 for SmolLM2 on 2 cores). ``keep_alive_s`` defaults to 60 s: in the Azure LLM 2023
    code trace 12 idle gaps last longer than 60 s (longest 217 s) and 73 % of 1 s windows are
    empty, so a function idles for minutes between bursts; PipeCast makes the next cold start
    cheap, so minutes of warm GPU are not worth buying. ``downscale_delay_s`` defaults to 5 s: in
    the same trace a burst's 1 s counts dip and recover within seconds (11, 13, 7, 2, 5, 16, ...),
    and a replica removed in such a dip must be reloaded a second later. Serve's own default
    (600 s) would hold the peak's replicas for ten minutes.
    """

    min_replicas: int = 0
    max_replicas: int = 1
    target_ongoing_per_replica: float = 1.0
    keep_alive_s: float = 60.0
    downscale_delay_s: float = 5.0
    upscale_headroom: float = 1.0
    slo_ttft_s: float = 2.0
    predictive: bool = True
    trend_window_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas: must be >= 1, got {self.max_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas: must be >= min_replicas ({self.min_replicas}), "
                             f"got {self.max_replicas}")
        _check_number("target_ongoing_per_replica", self.target_ongoing_per_replica, 0.0,
                      inclusive=False)
        _check_number("keep_alive_s", self.keep_alive_s, 0.0)
        _check_number("downscale_delay_s", self.downscale_delay_s, 0.0)
        _check_number("upscale_headroom", self.upscale_headroom, 1.0)
        _check_number("slo_ttft_s", self.slo_ttft_s, 0.0)
        _check_number("trend_window_s", self.trend_window_s, 0.0, inclusive=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_number(name: str, value: object, low: float, inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if value < low or (value == low and not inclusive):
        raise ValueError(f"{name}: must be {'>=' if inclusive else '>'} {low}, got {value}")


def load_trend_per_s(history: tuple[tuple[float, float], ...]) -> float:
    """Least-squares slope of ongoing requests over time (requests per second); 0 when fewer
    than three samples or no time spread."""
    if len(history) < 3:
        return 0.0
    n = len(history)
    mt = sum(t for t, _ in history) / n
    ml = sum(v for _, v in history) / n
    var = sum((t - mt) ** 2 for t, _ in history)
    if var <= _EPS_S:
        return 0.0
    return sum((t - mt) * (v - ml) for t, v in history) / var


@dataclass(frozen=True)
class ScalingSnapshot:
    """The deployment's load at ``now_s`` (seconds, any epoch; only differences are used).

    ``current_replicas`` serve; ``loading_replicas`` were started but do not serve yet. Their sum is
    the capacity already ordered. ``ongoing_requests`` counts running plus queued requests over the
    whole deployment (a float: Serve reports a window aggregate).
    """

    now_s: float
    current_replicas: int
    ongoing_requests: float
    queued_requests: float = 0.0
    loading_replicas: int = 0
    estimates: tuple[ColdStartEstimate, ...] = ()

    @property
    def ordered_replicas(self) -> int:
        return self.current_replicas + self.loading_replicas


@dataclass(frozen=True)
class PolicyState:
    """What ``decide`` remembers between calls; plain JSON values (Serve keeps it in a dict).

    ``last_busy_s``: the last time ``ongoing_requests > 0`` (or the first time replicas were seen
    idle, when no busy time is known). ``below_since_s``: since when the wanted count has stayed
    below the ordered count (None: it has not). ``below_high_water_replicas``: the most replicas
    wanted since ``below_since_s``; a downscale goes there, not to the last tick's dip.
    ``last_ordered_replicas`` / ``last_target_replicas``: the ordered count seen and the target
    returned by the previous call (to notice replicas started without us).
    """

    last_busy_s: float | None = None
    below_since_s: float | None = None
    below_high_water_replicas: int = 0
    last_ordered_replicas: int | None = None
    last_target_replicas: int | None = None
    last_reason: str = ""
    last_decision_s: float | None = None
    history: tuple[tuple[float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PolicyState:
        """Rebuild from ``to_dict`` output; keys it does not know (Serve adds its own) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (data or {}).items() if k in names}
        if "history" in values:  # JSON turns the pairs into lists
            values["history"] = tuple((float(t), float(v)) for t, v in values["history"])
        return cls(**values)


@dataclass(frozen=True)
class ScaleIntent:
    """A change of a function's replica count, raised when decided, before any replica exists."""

    function: str
    from_replicas: int
    to_replicas: int
    reason: str
    at_s: float
    ongoing_requests: float
    source: str = ""                 # the fastest available source (empty: no estimate known)
    expected_ready_s: float | None = None
    lead_s: float = 0.0              # how far ahead of the predicted SLO breach it was ordered

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScaleIntent:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ScaleDecision:
    """The replica count to converge to; ``intent`` is set iff it differs from the ordered count."""

    target_replicas: int
    reason: str
    intent: ScaleIntent | None = None


def replicas_needed(cfg: ScalingConfig, ongoing_requests: float) -> int:
    """ceil(ongoing * headroom / target per replica), unclamped; 0 requests need 0 replicas."""
    demand = max(0.0, ongoing_requests) * cfg.upscale_headroom
    return max(0, math.ceil(demand / cfg.target_ongoing_per_replica - _EPS_REQUESTS))


def decide(cfg: ScalingConfig, snap: ScalingSnapshot, state: PolicyState | None,
           *, function: str = "") -> tuple[ScaleDecision, PolicyState]:
    """Decide how many replicas the function should have now. Pure; mutates nothing.

    Compared against the *ordered* count (serving + loading), so replicas on the way count as
    capacity and a burst is not ordered twice while its replicas load:

    - **Up, at once**: to ``ceil(ongoing * upscale_headroom / target_ongoing_per_replica)``,
      clamped to ``[min_replicas, max_replicas]``. A replica takes seconds to load (more with a
      cold model), so any delay here adds straight to the burst's time to first token.
    - **Down, after ``downscale_delay_s``**: only once the wanted count has stayed below the
      ordered count that long, and then to the most replicas wanted during that window (never to
      a momentary dip). A tick at or above the ordered count restarts the window.
    - **Keep-alive**: while a replica exists and the last request was less than ``keep_alive_s``
      ago, at least 1 replica is kept. When no busy time is known yet (first call, or a replica
      Serve started without asking us), the keep-alive counts from the first idle observation.
    - **To zero**: only if ``min_replicas == 0`` and there was no ongoing request for
      ``keep_alive_s``; this transition is not delayed further by ``downscale_delay_s``.
    - **Bounds**: the result is always within ``[min_replicas, max_replicas]``; an ordered count
      outside them (a config change) is clamped at once with reason "min" or "max"; any further
      downscale below max then waits as usual.
    - **Ahead of the breach** (``predictive``): a replica ordered now serves after the chosen
      source's ``ready_s``; a request waiting that long breaks the TTFT SLO unless ``ready_s <=
      slo_ttft_s``. So the policy looks ``lead_s = ready_s - slo_ttft_s`` ahead: the load trend
      (least squares over the last ``trend_window_s`` of snapshots) extrapolated ``lead_s`` from
      now; if that load needs more replicas than are ordered, they are ordered now (reason
      "predicted"). Only a rising trend counts; a falling one never removes replicas early.
    - **Source**: ``snap.estimates`` (one ``ColdStartEstimate`` per source) choose the fastest
      available way to add a replica; the intent carries it (``source``, ``expected_ready_s``)
      so the replicas are loaded that way.

    Time is ``snap.now_s`` in seconds; the decision depends on elapsed seconds, never on how
    often it is called. ``state=None`` means a fresh start. ``function`` only names the intent.
    Returns the decision and the next state (pass it back on the next call).
    """
    state = state or PolicyState()
    now_s = snap.now_s
    ordered = snap.ordered_replicas

    last_busy_s = state.last_busy_s
    # More replicas than we saw and than we wanted last time: someone else ordered them (Serve's
    # scale-from-zero, which skips the policy) for requests we never saw. Keep them warm for a
    # full keep-alive instead of trusting a stale busy time. (A count that fell but not as far as
    # we asked, e.g. Serve's N -> 1 -> 0 stepping, is not that.)
    started_without_us = (state.last_ordered_replicas is not None
                          and ordered > state.last_ordered_replicas
                          and ordered > (state.last_target_replicas or 0))
    if snap.ongoing_requests > 0 or (ordered > 0 and (last_busy_s is None or started_without_us)):
        last_busy_s = now_s
    warm = (ordered > 0 and last_busy_s is not None
            and now_s - last_busy_s + _EPS_S < cfg.keep_alive_s)

    history = tuple((t, v) for t, v in state.history if now_s - t < cfg.trend_window_s - _EPS_S)
    history = (history + ((now_s, float(snap.ongoing_requests)),))[-MAX_HISTORY:]
    source = choose_source(snap.estimates)
    lead_s = max(0.0, source.ready_s - cfg.slo_ttft_s) if source is not None else 0.0
    needed = replicas_needed(cfg, snap.ongoing_requests)
    ahead = needed
    if cfg.predictive and lead_s > 0:
        trend = load_trend_per_s(history)
        if trend > 0:
            ahead = replicas_needed(cfg, snap.ongoing_requests + trend * lead_s)
    predicted = ahead > needed
    needed = max(needed, ahead)
    wanted = min(cfg.max_replicas, max(cfg.min_replicas, needed, 1 if warm else 0))

    below_since_s: float | None = None
    high_water = 0
    if ordered < cfg.min_replicas:
        target, reason = wanted, REASON_MIN if needed <= cfg.min_replicas else _up_reason(snap)
    elif ordered > cfg.max_replicas:
        target, reason = cfg.max_replicas, REASON_MAX
    elif wanted > ordered:
        up_now = min(cfg.max_replicas, replicas_needed(cfg, snap.ongoing_requests)) > ordered
        target, reason = wanted, (REASON_PREDICTED if predicted and not up_now else _up_reason(snap))
    elif wanted == ordered:
        target, reason = ordered, (REASON_WARM if warm and needed == 0 else REASON_STEADY)
    elif wanted == 0:
        # Zero is reachable only when keep-alive expired (else `warm` keeps 1) and min is 0.
        target, reason = 0, REASON_KEEP_ALIVE
    else:
        below_since_s = state.below_since_s if state.below_since_s is not None else now_s
        high_water = max(state.below_high_water_replicas, wanted)
        if now_s - below_since_s + _EPS_S >= cfg.downscale_delay_s:
            target, reason = high_water, REASON_IDLE
            below_since_s, high_water = None, 0
        else:
            target, reason = ordered, REASON_PENDING

    intent = None
    if target != ordered:
        up = target > ordered
        intent = ScaleIntent(function=function, from_replicas=ordered, to_replicas=target,
                             reason=reason, at_s=now_s, ongoing_requests=snap.ongoing_requests,
                             source=source.source if up and source is not None else "",
                             expected_ready_s=source.ready_s if up and source is not None else None,
                             lead_s=lead_s if up else 0.0)
    next_state = PolicyState(last_busy_s=last_busy_s, below_since_s=below_since_s,
                             below_high_water_replicas=high_water, last_ordered_replicas=ordered,
                             last_target_replicas=target, last_reason=reason,
                             last_decision_s=now_s, history=history)
    return ScaleDecision(target_replicas=target, reason=reason, intent=intent), next_state


def _up_reason(snap: ScalingSnapshot) -> str:
    return REASON_QUEUE if snap.queued_requests > 0 else REASON_BURST
