"""ServerlessLLM's documented autoscaling, as a pure decision (``scaling.policy: serverlessllm``).

What ServerlessLLM does (``sllm/serve/routers/roundrobin_router.py``: ``auto_scaler`` and
``_auto_scaler_loop``, read at its main branch): every second its router computes

    desired = ceil(request_count / target), clamped to [min_instances, max_instances]

where ``request_count`` is the model's requests in flight (queued + running) and ``target`` its
``auto_scaling_config.target``. If desired exceeds the instances running or starting it creates
**one** instance that tick; if it is lower, it stops one instance per tick once the model has had
no new request for ``keep_alive`` seconds (its ``idle_time``, reset by every request). Nothing
predicts load and nothing knows how long a start takes. Here ``target`` is the function's
``target_concurrency`` and ``keep_alive`` its ``keep_alive_s``.

Pure: the time comes in the snapshot; the state goes in and comes back out (``SllmState``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from faascale.platform.autoscale import ScalingConfig, ScalingSnapshot

TICK_S = 1.0  # ServerlessLLM's router loop: one scaling step per second
_EPS_REQUESTS = 1e-6


@dataclass(frozen=True)
class SllmState:
    """Carried between calls: when the last tick ran, the in-flight count then (a rise means a
    new request arrived), and ServerlessLLM's ``idle_time``."""

    last_tick_s: float | None = None
    last_requests: float = 0.0
    idle_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SllmState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


def desired_instances(cfg: ScalingConfig, requests_in_flight: float) -> int:
    """ceil(in flight / target), within [min, max]: ServerlessLLM's ``auto_scaler``."""
    want = math.ceil(max(0.0, requests_in_flight - _EPS_REQUESTS) / cfg.target_ongoing_per_replica)
    return min(cfg.max_replicas, max(cfg.min_replicas, want))


def decide_sllm(cfg: ScalingConfig, snap: ScalingSnapshot, state: SllmState
                ) -> tuple[int, SllmState]:
    """The replica count to converge to (running + starting), and the next state.

    One tick per ``TICK_S`` (between ticks the count stays). A tick adds one replica when the
    desired count is higher; when it is lower, it removes one if ``idle_s`` has reached
    ``keep_alive_s`` (and restarts ``idle_s``), else adds the tick to ``idle_s``. A new request
    (the in-flight count rose) restarts ``idle_s``."""
    now, requests = snap.now_s, snap.ongoing_requests
    current = snap.current_replicas + snap.loading_replicas
    idle_s = 0.0 if requests > state.last_requests + _EPS_REQUESTS else state.idle_s
    state = dataclasses.replace(state, last_requests=requests, idle_s=idle_s)
    if state.last_tick_s is not None and now - state.last_tick_s < TICK_S - 1e-9:
        return current, state
    state = dataclasses.replace(state, last_tick_s=now)
    want = desired_instances(cfg, requests)
    if want > current:
        return current + 1, state
    if want < current:
        if idle_s >= cfg.keep_alive_s:
            return current - 1, dataclasses.replace(state, idle_s=0.0)
        return current, dataclasses.replace(state, idle_s=idle_s + TICK_S)
    return current, state
