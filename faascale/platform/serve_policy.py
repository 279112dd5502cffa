"""Ray Serve adapter for ``autoscale.decide``: context -> snapshot, state dict <-> ``PolicyState``,
intents to the ``faascale-events`` actor. Thin: the decision itself is pure and lives elsewhere.

What Ray Serve 2.60 does around a custom policy (read from ``ray/serve/_private/autoscaling_state.py``
and ``ray/serve/autoscaling_policy.py``):

- **Instantiation.** ``AutoscalingPolicy(policy_function=FaascalePolicy, policy_kwargs=...)``
  cloudpickles the class *by value* (its module is registered by value; ``autoscale`` is pickled
  by reference, so ``faascale`` must be importable in the Serve controller). The controller
  instantiates the class once per (re)deploy with ``policy_kwargs`` (``_resolve_policy_callable``)
  and calls ``instance(ctx)`` every control-loop tick (``RAY_SERVE_CONTROL_LOOP_INTERVAL_S``,
  0.1 s). It must return ``(num_replicas, policy_state: dict)``; a float count is ceiled. The
  returned dict comes back as ``ctx.policy_state`` next tick (it is reset to ``{}`` on redeploy).
- **Serve still wraps the policy** (``_apply_autoscaling_config``):
  1. *From zero it does not call us.* If no replica is RUNNING and ``total_num_requests > 0``,
     Serve returns ``max(ceil(upscaling_factor), target_num_replicas)`` (1 replica) and our
     policy is skipped until the first replica runs. So the from-zero ``ScaleIntent`` is the
     gateway's job; our first call after a cold start sees 1 running replica and the full queue.
  2. ``upscaling_factor``/``downscaling_factor`` are applied to our output relative to the
     running count; we set both to 1.0, which makes them the identity.
  3. Serve's own delay logic (``upscale_delay_s``, ``downscale_delay_s``,
     ``downscale_to_zero_delay_s``, wall-clock based, against ``target_num_replicas``) runs on
     our output. We set all three to 0 so the only delays are the policy's. Even at 0 delay,
     Serve floors a downscale from N > 1 at 1 (``max(1, desired)``): our N -> 0 becomes N -> 1
     then 1 -> 0 on the next tick, 0.1 s later (two intents).
  4. Serve merges its own keys (``__decision_counters``, ``__decision_timestamp``) into our state
     dict; ``PolicyState.from_dict`` ignores them.
  5. Finally ``apply_bounds`` clamps to ``[min_replicas, max_replicas]`` adjusted by
     ``target_capacity`` (``ctx.capacity_adjusted_*``). We decide within those same bounds so an
     intent states the count Serve will really use.
- **Context.** ``ctx.current_num_replicas`` counts RUNNING replicas; ``ctx.target_num_replicas`` is
  the count Serve is converging to, so ``target - running`` replicas are loading.
  ``ctx.total_num_requests`` (running + queued) and ``ctx.total_queued_requests`` are aggregated
  over ``look_back_period_s`` with ``aggregation_function``. ``ctx.current_time`` is
  ``time.time()`` in the controller (None only in hand-built contexts).
- ``metrics_interval_s`` is deprecated in 2.60 but still sets how often handles and replicas push
  load to the controller (default 10 s, far too slow for bursts); a non-default value warns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from faascale.coldstart.start_source import ColdStartEstimate
from faascale.platform import events
from faascale.platform.autoscale import (
    PolicyState,
    ScaleIntent,
    ScalingConfig,
    ScalingSnapshot,
    decide,
)
from faascale.platform.sllm_policy import SllmState, decide_sllm

logger = logging.getLogger(__name__)

INTENT_EVENT = "scale_intent"

Sink = Callable[[dict[str, Any]], None]
Estimator = Callable[[str], "list[ColdStartEstimate] | tuple[ColdStartEstimate, ...]"]
ESTIMATE_REFRESH_S = 2.0


def intent_event(intent: ScaleIntent) -> dict[str, Any]:
    """The message the events actor receives: ``{"kind": "scale_intent", **intent fields}``."""
    return {"kind": INTENT_EVENT, **intent.to_dict()}


class FaascalePolicy:
    """A class-callable Serve autoscaling policy: ``FaascalePolicy(function=..., **ScalingConfig)``.

    ``sink`` receives one ``intent_event`` dict per replica-count change; it defaults to the
    ``faascale-events`` actor and is replaced in tests. A sink that raises is logged and ignored.

    ``estimator(function)`` gives the cold-start estimates per source that go into each snapshot
    (tests pass literal ones). By default they come from the events actor without ever blocking
    the control loop: a request is kept in flight and its answer used when it has arrived, at
    most every ``ESTIMATE_REFRESH_S``; until then the last answer (none at first) is used.
    """

    def __init__(self, function: str, sink: Sink | None = None,
                 estimator: Estimator | None = None, **scaling: Any) -> None:
        self.function = function
        self.config = ScalingConfig(**scaling)
        self.sink: Sink = sink if sink is not None else events.report
        self.estimator = estimator
        self._estimates: tuple[ColdStartEstimate, ...] = ()
        self._pending: Any = None
        self._next_refresh_s = 0.0

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        snap = dataclasses.replace(snapshot_from_context(ctx), estimates=self._current_estimates())
        state = PolicyState.from_dict(ctx.policy_state)
        decision, next_state = decide(_within_serve_bounds(self.config, ctx), snap, state,
                                      function=self.function)
        if decision.intent is not None:
            self._send(intent_event(decision.intent))
        return decision.target_replicas, next_state.to_dict()

    def _current_estimates(self) -> tuple[ColdStartEstimate, ...]:
        try:
            if self.estimator is not None:
                return tuple(self.estimator(self.function))
            return self._actor_estimates()
        except Exception as exc:  # noqa: BLE001 - advice only: decide without it
            logger.debug("cold-start estimates unavailable (%s)", exc)
            return self._estimates

    def _actor_estimates(self) -> tuple[ColdStartEstimate, ...]:
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                ref, self._pending = self._pending, None
                self._estimates = tuple(ColdStartEstimate.from_dict(e) for e in ray.get(ref))
        now = time.monotonic()
        if self._pending is None and now >= self._next_refresh_s:
            self._next_refresh_s = now + ESTIMATE_REFRESH_S
            sink = events.sink()
            if sink is not None:
                self._pending = sink.estimates.remote(self.function)
        return self._estimates

    def _send(self, event: dict[str, Any]) -> None:
        try:
            self.sink(event)
        except Exception as exc:  # noqa: BLE001
            logger.debug("scale-intent sink failed (%s); dropped event %s", exc, event)


class ServerlessLLMPolicy:
    """ServerlessLLM's autoscaling (``sllm_policy.decide_sllm``) as a Serve class-callable
    policy: ``ServerlessLLMPolicy(function=..., **ScalingConfig)``. It sends no intents (nothing
    plans ahead of its replicas) and uses no cold-start estimates."""

    def __init__(self, function: str, **scaling: Any) -> None:
        self.function = function
        self.config = ScalingConfig(**scaling)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        target, state = decide_sllm(_within_serve_bounds(self.config, ctx),
                                    snapshot_from_context(ctx), SllmState.from_dict(ctx.policy_state))
        return target, state.to_dict()


def snapshot_from_context(ctx: AutoscalingContext) -> ScalingSnapshot:
    """Serve's context as our snapshot; the wall clock is read here only if Serve gave no time."""
    running = int(ctx.current_num_replicas)
    target = int(ctx.target_num_replicas)
    now_s = ctx.current_time if ctx.current_time is not None else time.time()
    return ScalingSnapshot(
        now_s=float(now_s),
        # Replicas beyond the target are draining: not capacity.
        current_replicas=min(running, target),
        loading_replicas=max(0, target - running),
        ongoing_requests=float(ctx.total_num_requests or 0.0),
        queued_requests=float(ctx.total_queued_requests or 0.0),
    )


def _within_serve_bounds(cfg: ScalingConfig, ctx: AutoscalingContext) -> ScalingConfig:
    """Narrow min/max to Serve's capacity-adjusted bounds (``target_capacity``), when valid."""
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    if (low, high) == (cfg.min_replicas, cfg.max_replicas):
        return cfg
    try:
        return dataclasses.replace(cfg, min_replicas=int(low), max_replicas=int(high))
    except (TypeError, ValueError):  # e.g. target_capacity 0 gives max 0: Serve's clamp decides
        return cfg


def policy_kwargs(cfg: ScalingConfig, function: str) -> dict[str, Any]:
    """The JSON-serializable constructor arguments Serve passes to ``FaascalePolicy``."""
    return {"function": function, **cfg.to_dict()}


def serve_default_autoscaling_config(cfg: ScalingConfig, metrics_interval_s: float = 0.5
                                    ) -> AutoscalingConfig:
    """Ray Serve's own queue-length policy (``scaling.policy: serve``), as commonly deployed:
    its default policy, delays (30 s up, 600 s down) and look-back, with the function's bounds
    and target concurrency; only the load push interval is ours, so it sees load as fast."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*",
                                category=DeprecationWarning)
        return AutoscalingConfig(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                                 initial_replicas=cfg.min_replicas,
                                 target_ongoing_requests=cfg.target_ongoing_per_replica,
                                 metrics_interval_s=metrics_interval_s)


def autoscaling_config(cfg: ScalingConfig, function: str, metrics_interval_s: float = 0.5,
                       policy_class: type = FaascalePolicy) -> AutoscalingConfig:
    """The full Serve ``AutoscalingConfig`` for one function, with ``FaascalePolicy`` deciding.

    Load is pushed every ``metrics_interval_s`` (0.5 s, vs Serve's 10 s default) and aggregated as
    the *peak* over a 2 s look-back: a burst is seen on its first push, and a dip shorter than 2 s
    does not count as idle (the policy's own downscale delay and keep-alive start after it).
    Serve's delays are 0 and its scaling factors 1.0, so ``autoscale.decide`` alone sets the
    pace; Serve's min/max are the same as the policy's. ``policy_class=ServerlessLLMPolicy``
    gives the same plumbing to ServerlessLLM's decision (``scaling.policy: serverlessllm``).
    """
    look_back_period_s = max(2.0, 4 * metrics_interval_s)
    policy = AutoscalingPolicy(policy_function=policy_class,
                               policy_kwargs=policy_kwargs(cfg, function))
    with warnings.catch_warnings():
        # metrics_interval_s is deprecated (to become an env var) but is still honoured in 2.60.
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*",
                                category=DeprecationWarning)
        return AutoscalingConfig(
            min_replicas=cfg.min_replicas,
            max_replicas=cfg.max_replicas,
            initial_replicas=cfg.min_replicas,
            target_ongoing_requests=cfg.target_ongoing_per_replica,
            metrics_interval_s=metrics_interval_s,
            look_back_period_s=look_back_period_s,
            aggregation_function="max",
            upscale_delay_s=0.0,
            downscale_delay_s=0.0,
            downscale_to_zero_delay_s=0.0,
            upscaling_factor=1.0,
            downscaling_factor=1.0,
            policy=policy,
        )
