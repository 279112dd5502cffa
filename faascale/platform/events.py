"""The ``faascale-events`` actor: where scale intents and replica start-ups are reported.

The autoscaling policy (in Serve's controller), the replicas and the gateway all report here; the
actor writes each event into the registry, so ``status`` and ``/metrics`` read one place. It runs
on the head node, beside the state directory. PipeCast's coordinator consumes the same intents.

The actor restarts when its process dies (``max_restarts=-1``) and its handles stay valid (most
callers look it up by name per call anyway). What it recorded is in the registry; of what it kept in
memory, the last scale-up of each function is read back from there, the warm pool's idle count
comes with the platform's next report (``server.py``, every few seconds), the estimates are
recomputed, and pinned estimates are forgotten, as a platform restart forgets them. An event
sent while it was down is lost (reports are fire-and-forget: serving never waits on the sink).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from faascale.platform.registry import STARTUP_PROFILE, Registry, UnreadableRecord

ACTOR_NAME = "faascale-events"
NAMESPACE = "faascale"
log = logging.getLogger(__name__)


ESTIMATE_CACHE_S = 2.0
PROFILES_USED = 200  # the newest measured starts the estimates are fitted on
RESTORED_INTENTS = 1000  # scale intents read back at a (re)start for each function's last scale-up


class EventSink:
    """Records events (dicts with ``function`` and an optional ``kind``) into the registry, and
    answers with cold-start estimates made from the recorded starts (``estimates``)."""

    def __init__(self, registry_path: str, clock: Any = time.monotonic) -> None:
        self.registry = Registry(Path(registry_path))
        self.clock = clock
        self._estimates: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._pins: dict[str, list[dict[str, Any]]] = {}
        self._features: dict[str, Any] = {}  # model id -> ModelFeatures from its manifest
        self._manifests: dict[str, str] = {}  # model id -> manifest JSON
        self._warm_idle = 0  # warm runtimes waiting in the pools (the platform's WarmPool says)
        self._last_scale_up_s: dict[str, float] = {}  # function -> when a replica was last ordered
        self._restore()
        # Import what the estimates need now, at platform start, not on the first status call.
        import faascale.coldstart.estimate  # noqa: F401
        import faascale.coldstart.profile  # noqa: F401
        import faascale.memory_tier.packed  # noqa: F401

    def record(self, event: dict[str, Any]) -> None:
        event = dict(event)
        function = str(event.pop("function", "") or "?")
        kind = str(event.pop("kind", "scale_intent"))
        at_s = float(event.pop("at_s", None) or time.time())
        self.registry.add_event(function, kind, event, at_s)
        more = int(event.get("to_replicas", 0) or 0) - int(event.get("from_replicas", 0) or 0)
        if kind == "scale_intent" and more > 0:
            self._last_scale_up_s[function] = max(at_s, self._last_scale_up_s.get(function, 0.0))
        if kind == "scale_intent" and more > 0:  # PipeCast plans before the replicas exist
            from faascale.platform.pipecast_actor import pipecast_actor

            coordinator = pipecast_actor()
            if coordinator is not None:
                coordinator.expect.remote(function, more)

    def _restore(self) -> None:
        """After a restart: each function's last scale-up, from the recorded intents."""
        try:
            intents = self.registry.events_of_kind("scale_intent", RESTORED_INTENTS)
        except Exception as exc:  # noqa: BLE001 - advice only: start without it
            log.warning("could not read the recorded scale intents: %s", exc)
            return
        for e in intents:
            if int(e.get("to_replicas", 0) or 0) > int(e.get("from_replicas", 0) or 0):
                function, at_s = str(e["function"]), float(e["at_s"])
                self._last_scale_up_s[function] = max(at_s, self._last_scale_up_s.get(function, 0))

    def last_scale_up_s(self, function: str) -> float | None:
        """When a replica of ``function`` was last ordered (its scale-up intent), or None: a
        starting replica tells from it whether its runtime was ready before it was ordered."""
        return self._last_scale_up_s.get(function)

    # --- cold-start estimates ------------------------------------------------------------------

    def set_warm_pool(self, idle: int) -> None:
        """Warm runtimes now idle across the nodes: the next start is estimated warm while > 0."""
        if (idle > 0) != (self._warm_idle > 0):
            self._estimates.clear()
        self._warm_idle = int(idle)

    def pin_estimates(self, function: str, estimates: list[dict[str, Any]] | None) -> None:
        """Replace the function's estimates with literal ones (an operator forcing a source, or
        a test); ``None`` unpins. Each dict is a ``ColdStartEstimate``'s fields."""
        from faascale.coldstart.start_source import ColdStartEstimate

        if estimates is None:
            self._pins.pop(function, None)
        else:
            self._pins[function] = [{**ColdStartEstimate.from_dict(e).to_dict(), "basis": "pinned"}
                                    for e in estimates]
        self._estimates.pop(function, None)

    def pinned(self, function: str) -> list[dict[str, Any]]:
        """The function's pinned estimates, [] if none: what a starting replica whose node holds
        the whole model in HOST needs to know (``estimate.needs_estimates``), without computing
        the rest."""
        return list(self._pins.get(function) or [])

    def estimates(self, function: str) -> list[dict[str, Any]]:
        """One ``ColdStartEstimate`` (as a dict) per source for adding a replica of ``function``,
        cached for ``ESTIMATE_CACHE_S``; empty when the function is unknown."""
        now = self.clock()
        cached = self._estimates.get(function)
        if cached is not None and now - cached[0] < ESTIMATE_CACHE_S:
            return cached[1]
        try:
            result = self._pins.get(function) or self._compute_estimates(function)
        except Exception as exc:  # estimates are advice: never break the policy that asks
            log.warning("cold-start estimates for %s failed: %s", function, exc)
            result = []
        if result:  # an empty answer (not registered yet: its first replica starts before
            self._estimates[function] = (now, result)  # the deploy is recorded) is not kept
        return result

    def _compute_estimates(self, function: str) -> list[dict[str, Any]]:
        import socket

        from faascale.coldstart.estimate import estimates_for, manifest_features
        from faascale.coldstart.profile import StartupProfile
        from faascale.memory_tier.node import split_location
        from faascale.memory_tier.packed import read_packed_metadata
        from faascale.memory_tier.store import open_store

        try:
            record = self.registry.get(function)
        except UnreadableRecord:  # the gateway answers for it; no estimates to give
            return []
        if record is None:
            return []
        features = self._features.get(record.model_id)
        if features is None or record.model_id not in self._manifests:
            store_uri, prefix = split_location(record.model_dir)
            manifest, tokenizer_json = read_packed_metadata(open_store(store_uri), prefix)
            features = manifest_features(manifest, len(tokenizer_json.encode()))
            self._features[record.model_id] = features
            self._manifests[record.model_id] = manifest.to_json()
        manifest_json = self._manifests[record.model_id]
        profiles = [StartupProfile.from_dict(e["profile"]) for e in
                    self.registry.events_of_kind(STARTUP_PROFILE, PROFILES_USED)
                    if isinstance(e.get("profile"), dict)]
        observations = profile_observations(profiles)
        machines = [o.setting.machine for o in observations]
        machine = max(set(machines), key=machines.count) if machines else socket.gethostname()
        available = _available_sources(record.model_id, manifest_json)
        return [e.to_dict() for e in estimates_for(features, machine, observations, available,
                                                   warm=self._warm_idle > 0)]


def profile_observations(profiles: list[Any]) -> list[Any]:
    """Measured starts (``StartupProfile``s that succeeded, from a known source) as observations
    of our engine's startup model."""
    from faascale.coldstart.estimate import engine_features, engine_observation
    from faascale.coldstart.start_source import SOURCES

    out = []
    for p in profiles:
        if not p.ok or p.source not in SOURCES:
            continue
        try:
            model = engine_features(p.model_id, p.model)
        except ValueError:
            continue
        machine = str((p.machine or {}).get("hostname") or "?")
        out.append(engine_observation(model, machine, p.source, p.steps(), warm=p.warm))
    return out


def _available_sources(model_id: str, manifest_json: str) -> dict[str, bool]:
    """Which sources could serve a new replica of the model now: PEER when a live PipeCast member
    holds all of it, HOST/DISK when some node's tiers hold all of it."""
    from faascale.memory_tier.node import NAMESPACE as BLOCKS_NAMESPACE
    from faascale.platform.pipecast_actor import pipecast_actor

    available = {"REMOTE": True}
    coordinator = pipecast_actor()
    refs = {}
    if coordinator is not None:
        refs["PEER"] = coordinator.has_source.remote(model_id)
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith("faascale-blocks-"):
            handle = ray.get_actor(name, namespace=BLOCKS_NAMESPACE)
            refs[name] = handle.model_tiers.remote(manifest_json)
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0)
    for key, ref in refs.items():
        if ref not in ready:
            continue
        value = ray.get(ref)
        if key == "PEER":
            available["PEER"] = bool(value)
        else:
            available["HOST"] = available.get("HOST", False) or value["HOST"] == value["blocks"]
            available["DISK"] = available.get("DISK", False) or value["DISK"] == value["blocks"]
    return available


def start_event_sink(registry_path: Path) -> Any:
    """Create (or find) the sink actor, pinned to this node so it writes the local registry; it
    restarts if its process dies."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(EventSink).options(
        name=ACTOR_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=1, get_if_exists=True, max_restarts=-1,
    ).remote(str(registry_path))


def sink() -> Any:
    """The sink actor's handle, looked up now (so a restarted sink is found), or None without a
    Ray connection (never starts one) or without the actor (tests, a replica outside the
    platform); never raises."""
    try:
        if not ray.is_initialized():
            return None
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except Exception as exc:  # noqa: BLE001
        log.debug("no events sink: %s", exc)
        return None


def last_scale_up_ref(function: str) -> Any:
    """``EventSink.last_scale_up_s`` as an ObjectRef (None without a sink: the runtime is then
    judged by its idle time alone); never raises."""
    handle = sink()
    return handle.last_scale_up_s.remote(function) if handle is not None else None


def report(event: dict[str, Any]) -> None:
    """Fire-and-forget an event to the sink from any Ray process; never raises.

    The actor is looked up per event (~1 ms; events come only with start-ups and scale changes),
    so a restarted sink is picked up. Without a Ray connection or without the actor the event is
    dropped: autoscaling and serving must not depend on anyone listening.
    """
    handle = sink()
    if handle is None:
        log.debug("no events sink; dropped event %s", event)
        return
    try:
        handle.record.remote(event)
    except Exception as exc:  # noqa: BLE001 - the sink went away meanwhile: drop it
        log.debug("event not reported (%s): %s", exc, event)


START_ERROR_CHARS = 500


def start_error(exc: BaseException) -> str:
    """A failed start's reason in one line, as the gateway's 503 and the profile give it: the
    cause of a Ray task error (whose own text carries the remote traceback), ``Type: message``,
    at most ``START_ERROR_CHARS`` long."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
    text = " ".join(f"{type(cause).__name__}: {cause}".split())
    return text if len(text) <= START_ERROR_CHARS else text[:START_ERROR_CHARS - 1] + "…"
