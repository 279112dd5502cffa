"""The ``faascale-events`` actor: where scale intents and replica start-ups are reported.

The autoscaling policy (in Serve's controller), the replicas and the gateway all report here; the
actor writes each event into the registry, so ``status`` and ``/metrics`` read one place. It runs
on the head node, beside the state directory. PipeCast's coordinator consumes the same intents.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from faascale.platform.registry import Registry

ACTOR_NAME = "faascale-events"
NAMESPACE = "faascale"
log = logging.getLogger(__name__)


class EventSink:
    """Records events (dicts with ``function`` and an optional ``kind``) into the registry."""

    def __init__(self, registry_path: str) -> None:
        self.registry = Registry(Path(registry_path))

    def record(self, event: dict[str, Any]) -> None:
        event = dict(event)
        function = str(event.pop("function", "") or "?")
        kind = str(event.pop("kind", "scale_intent"))
        at_s = float(event.pop("at_s", None) or time.time())
        self.registry.add_event(function, kind, event, at_s)
        more = int(event.get("to_replicas", 0) or 0) - int(event.get("from_replicas", 0) or 0)
        if kind == "scale_intent" and more > 0:  # PipeCast plans before the replicas exist
            from faascale.platform.pipecast_actor import pipecast_actor

            coordinator = pipecast_actor()
            if coordinator is not None:
                coordinator.expect.remote(function, more)


def start_event_sink(registry_path: Path) -> Any:
    """Create (or find) the sink actor, pinned to this node so it writes the local registry."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(EventSink).options(
        name=ACTOR_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=1, get_if_exists=True,
    ).remote(str(registry_path))


def report(event: dict[str, Any]) -> None:
    """Fire-and-forget an event to the sink from any Ray process; never raises.

    The actor is looked up per event (~1 ms; events come only with start-ups and scale changes),
    so a restarted sink is picked up. Without a Ray connection or without the actor the event is
    dropped: autoscaling and serving must not depend on anyone listening.
    """
    try:
        if not ray.is_initialized():  # never start a Ray instance just to report
            log.debug("no Ray connection; dropped event %s", event)
            return
        ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).record.remote(event)
    except Exception as exc:  # no sink (tests, a replica outside the platform): drop it
        log.debug("event not reported (%s): %s", exc, event)
