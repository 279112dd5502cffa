"""The warm runtime pool: on every node, Ray workers that did a replica start's fixed part ahead of need.

A replica is a Ray Serve replica, i.e. a Ray actor, i.e. a Ray worker process. Ray keeps idle
workers and hands a new actor an idle worker that fits it (never-used workers fit any job and any
actor). Two Ray mechanisms make those idle workers *warm runtimes*:

- ``preload_python_modules`` (a cluster-wide system config, set where the head starts): every
  worker imports ``faascale.platform.warm_runtime`` as it starts: torch, the engine, the replica
  module, a kernel warm-up (``warm_runtime.py``);
- the raylet's ``PrestartWorkers`` call starts workers before any task asks for one, kept alive
  for ``keep_alive_s`` even when idle beyond Ray's soft limit.

``WarmPool`` (a thread in the platform process) keeps each alive node's count of idle, never-used
Python workers at its target: it reads every raylet's worker list (``GetNodeStats``) every
``interval_s`` and orders the missing ones. The decision is pure (``plan_prestarts``): orders not yet
seen as idle workers count as pending for ``startup_timeout_s``, so a slow start is not ordered
twice; one worker starts at a time per node, and none within ``refill_delay_s`` (10 s) of a replica
taking one there (its start and the refill's imports would share the node's CPUs).

The size per node (``FAASCALE_WARM_POOL`` or ``faascale up --warm-pool``): ``auto`` (default) is one
per free GPU on a GPU node (none while all its GPUs serve), one on a node without GPUs; a number; ``0`` turns the pool off (no preload, no
prestarts: every replica starts cold, as Ray Serve starts them). A replica that finds no warm
runtime still starts, cold, and its profile says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)
PRELOAD_MODULE = "faascale.platform.warm_runtime"
POOL_ENV = "FAASCALE_WARM_POOL"
AUTO = "auto"


class PoolSettingError(ValueError):
    """``--warm-pool`` / ``FAASCALE_WARM_POOL`` is not ``auto``, ``off`` or a count >= 0."""


def parse_pool_setting(value: str | int | None) -> int | None:
    """``auto``/None -> None (``target_size`` decides per node); ``off`` -> 0; else the count."""
    if value is None or str(value).strip().lower() in ("", AUTO):
        return None
    text = str(value).strip().lower()
    if text == "off":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise PoolSettingError(f"warm pool: expected auto, off or a number >= 0, got {value!r}") from None
    if n < 0:
        raise PoolSettingError(f"warm pool: expected auto, off or a number >= 0, got {value!r}")
    return n


def pool_enabled(setting: int | None) -> bool:
    return setting is None or setting > 0


def ray_system_config(setting: int | None) -> dict[str, Any]:
    """What ``ray.init(_system_config=...)`` (or ``ray start --head --system-config``) needs."""
    return {"preload_python_modules": [PRELOAD_MODULE]} if pool_enabled(setting) else {}


def head_system_config_args(setting: int | None = None) -> list[str]:
    """The ``ray start --head`` arguments a cluster's head needs for warm runtimes."""
    import json

    return ["--system-config", json.dumps(ray_system_config(setting))] if pool_enabled(setting) else []


def target_size(setting: int | None, free_gpus: float, total_gpus: float = 0.0) -> int:
    """Warm runtimes a node keeps: the setting, or (auto) one per free GPU on a GPU node (none
    while every GPU serves: no replica can start there, and a refill would only take CPU from
    the replicas serving), one on a node without GPUs."""
    if setting is not None:
        return setting
    return int(free_gpus) if total_gpus > 0 else 1


@dataclass(frozen=True)
class NodePoolState:
    """What the keeper knows about one node's pool between ticks."""

    seen: frozenset[str] = frozenset()  # idle worker ids already counted
    pending_s: tuple[float, ...] = ()  # when each order not yet seen as an idle worker was made
    ordered_total: int = 0
    taken_total: int = 0  # idle workers that left the pool (a replica or task took them, or died)
    last_taken_s: float = float("-inf")


@dataclass(frozen=True)
class PrestartDecision:
    order: int  # workers to order now
    state: NodePoolState


def plan_prestarts(idle_ids: Sequence[str], target: int, state: NodePoolState, now_s: float,
                   startup_timeout_s: float = 30.0, max_starting: int = 1,
                   refill_delay_s: float = 0.0) -> PrestartDecision:
    """Order up to ``target - idle - pending`` workers, at most ``max_starting`` starting at once
    (the raylet starts as many workers at a time as the node has CPUs and drops the rest of an
    order; and a runtime's start is CPU work that competes with serving), and none within
    ``refill_delay_s`` of a runtime leaving the pool (the replica that took it is starting on
    the same CPUs). A new idle worker settles one pending order (the oldest); orders older than
    ``startup_timeout_s`` are given up (their workers failed to start, or the raylet dropped
    them)."""
    idle = frozenset(idle_ids)
    new = len(idle - state.seen)
    taken = len(state.seen - idle)
    last_taken_s = now_s if taken else state.last_taken_s
    pending = sorted(t for t in state.pending_s if now_s - t < startup_timeout_s)[new:]
    order = max(0, min(target - len(idle) - len(pending), max_starting - len(pending)))
    if now_s - last_taken_s < refill_delay_s:
        order = 0
    return PrestartDecision(order, NodePoolState(
        seen=idle, pending_s=tuple(pending) + (now_s,) * order,
        ordered_total=state.ordered_total + order, taken_total=state.taken_total + taken,
        last_taken_s=last_taken_s))


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str  # the raylet's gRPC address, host:port
    free_gpus: float = 0.0
    total_gpus: float = 0.0


@dataclass
class NodePool:
    """One node's pool as ``faascale status`` and ``/metrics`` show it."""

    node_id: str
    target: int
    idle: int = 0
    pending: int = 0
    ordered_total: int = 0
    taken_total: int = 0
    idle_pids: list[int] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node_id, "target": self.target, "idle": self.idle,
                "pending": self.pending, "ordered_total": self.ordered_total,
                "taken_total": self.taken_total, "idle_pids": list(self.idle_pids),
                "error": self.error}


class RayletClient:
    """The two raylet calls the pool needs, over Ray's own gRPC channel (auth included)."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        self.timeout_s = timeout_s
        self._channel = init_grpc_channel(address)
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(self._channel)

    def idle_workers(self) -> dict[str, int]:
        """Never-used idle Python workers: worker id -> pid (no actor, no task executed)."""
        from ray.core.generated import common_pb2, node_manager_pb2

        reply = self._stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(
            include_memory_info=False), timeout=self.timeout_s)
        nil_actor = b"\xff" * 16
        return {w.worker_id.hex(): int(w.pid) for w in reply.core_workers_stats
                if w.worker_type == common_pb2.WORKER and w.language == common_pb2.PYTHON
                and w.actor_id in (b"", nil_actor) and w.num_executed_tasks == 0
                and w.num_running_tasks == 0}

    def prestart(self, num_workers: int, keep_alive_s: int) -> None:
        """Start ``num_workers`` Python workers for no job, with no runtime env (what a replica
        asks for), kept alive when idle for ``keep_alive_s``."""
        from ray.core.generated import common_pb2, node_manager_pb2, runtime_environment_pb2

        self._stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON,
            runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env="{}"),
            keep_alive_duration_secs=keep_alive_s, num_workers=num_workers),
            timeout=self.timeout_s)

    def close(self) -> None:
        self._channel.close()


def ray_nodes() -> list[NodeInfo]:
    """Alive nodes of the connected Ray cluster, with their free GPUs."""
    import ray
    from ray._private import state

    free = state.available_resources_per_node()
    return [NodeInfo(n["NodeID"], f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}",
                     float(free.get(n["NodeID"], {}).get("GPU", 0.0)),
                     float((n.get("Resources") or {}).get("GPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")]


class WarmPool:
    """Keeps every node's warm runtimes at their target (a daemon thread; ``tick`` for tests)."""

    def __init__(self, setting: int | None, *, interval_s: float = 0.5,
                 keep_alive_s: int = 3600, startup_timeout_s: float = 30.0,
                 refill_delay_s: float = 10.0,
                 nodes: Callable[[], list[NodeInfo]] = ray_nodes,
                 client: Callable[[str], Any] = RayletClient,
                 clock: Callable[[], float] = time.monotonic,
                 on_idle_change: Callable[[int], None] | None = None) -> None:
        self.setting = setting
        self.interval_s = interval_s
        self.keep_alive_s = keep_alive_s
        self.startup_timeout_s = startup_timeout_s
        self.refill_delay_s = refill_delay_s
        self._nodes, self._client, self._clock = nodes, client, clock
        self._clients: dict[str, Any] = {}
        self._on_idle_change = on_idle_change
        self._idle_total: int | None = None
        self._state: dict[str, NodePoolState] = {}
        self._pools: dict[str, NodePool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return pool_enabled(self.setting)

    def tick(self) -> None:
        """One pass over the alive nodes: count, decide, order. A node that does not answer is
        reported with its error and retried next tick."""
        try:
            nodes = self._nodes()
        except Exception as exc:  # noqa: BLE001 - Ray restarting: next tick
            log.warning("warm pool: cannot list nodes: %s", exc)
            return
        pools = {}
        for node in nodes:
            target = target_size(self.setting, node.free_gpus, node.total_gpus)
            pool = NodePool(node.node_id, target)
            try:
                client = self._clients.get(node.address)
                if client is None:
                    client = self._clients[node.address] = self._client(node.address)
                idle = client.idle_workers()
                decision = plan_prestarts(sorted(idle), target,
                                          self._state.get(node.node_id, NodePoolState()),
                                          self._clock(), self.startup_timeout_s,
                                          refill_delay_s=self.refill_delay_s)
                if decision.order:
                    client.prestart(decision.order, self.keep_alive_s)
                self._state[node.node_id] = decision.state
                pool = replace(pool, idle=len(idle), pending=len(decision.state.pending_s),
                               ordered_total=decision.state.ordered_total,
                               taken_total=decision.state.taken_total,
                               idle_pids=sorted(idle.values()))
            except Exception as exc:  # noqa: BLE001 - one node's raylet down must not stop the rest
                self._clients.pop(node.address, None)
                pool = replace(pool, error=f"{type(exc).__name__}: {exc}")
            pools[node.node_id] = pool
        with self._lock:
            self._pools = pools
        idle_total = sum(p.idle for p in pools.values())
        if self._on_idle_change is not None and idle_total != self._idle_total:
            try:
                self._on_idle_change(idle_total)
                self._idle_total = idle_total
            except Exception as exc:  # noqa: BLE001 - advice for the estimates only
                log.warning("warm pool: could not report the idle count: %s", exc)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [p.to_dict() for p in self._pools.values()]

    def start(self) -> WarmPool:
        if not self.enabled or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="warm-pool", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for client in self._clients.values():
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


def setting_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    return parse_pool_setting(environ.get(POOL_ENV))


def summary(pools: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Totals over nodes for ``faascale status``."""
    return {k: sum(int(p.get(k) or 0) for p in pools)
            for k in ("target", "idle", "pending", "ordered_total", "taken_total")}
