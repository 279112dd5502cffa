"""The PipeCast coordinator's side effects: members join over the transport, plans go out, block
arrivals come in, routes go back.

``Coordinator`` owns one control ``Transport`` and, per model, the members that joined
(``member.py``) and at most one ``ScaleOut`` (``coordinator.py``, the pure decisions) at a time.
Its one thread (``run``, or the owner calling ``poll``) does everything:

- ``expect(model_id, n)``: the autoscaler's ``ScaleIntent`` — n new replicas are coming. Members
  that join while loading are gathered into one wave until n have joined (and a source is known)
  or ``join_window_s`` passed since the first; then the wave is planned (sources: members that
  hold the whole model, then nodes' tier copies that joined as sources (``source.py``: HOST,
  then DISK); targets whose own tier holds it load locally) and every node of the plan gets its
  part. With nobody to copy from, members that can load from the object store inside a plan
  (two or more) share the load: each loads a different part from the store, then the rest from
  each other, serving through a pipeline once their parts cover the model; the others are told
  so (``error``) and load from the object store the usual way. With serving replicas only (busy)
  the store fills in beside them (``store_fills_in``). One wave at a time per model, planned
  once the intents stopped coming (``membership.gathered``).
- ``block`` reports feed ``ScaleOut.block_arrived``; every member whose route changed gets its
  new route (``full``, ``pipeline`` with its stages' addresses, ``loading``).
- Faults: a member silent for ``dead_after_s`` (no heartbeat) whose control socket does not
  answer the transport's own heartbeats (dead, stopped, cut off), or silent for
  ``hung_after_s`` (stuck), is dead; one merely starved of CPU is not: ``ScaleOut.node_failed``
  dissolves its pipelines (their heads get new routes; their requests wait, then resume) and
  re-plans what is missing from the live holders; nodes of the repair plan get it (a member
  cancels the plan it was running). Blocks nobody live holds: those members are told to load
  from the store. A head whose stage failed (``stage_failed``) gets its route again after
  ``RETRY_ROUTE_S`` (a transient failure heals; a dead stage is caught by the heartbeat rule).
- A member that leaves (``leave``: its replica retires) is forgotten at once, as a dead one
  is; a heartbeat from a member it does not know (the coordinator restarted) gets ``rejoin``.
- A target whose part of the current plan failed with blocks missing (``agent_done``: a block
  lost to a full disk or ``/dev/shm``, corrupt past its refetches) gets what it lacks re-planned
  at once, not at the stall timeout; after ``MAX_AGENT_REPLANS`` such failures in one scale-out
  it is told to load the model another way (``error``).
- A timer tick that raises (a bug, a state it did not expect) is logged and counted per model
  (``progress()[model]["tick_errors"]``); the other models' ticks and the loop go on.
- Replays: every frame to a member carries the session it joined with (its transport takes no
  other), and every plan gets a random id, its epoch (``transport.py``).
- ``progress()``: per model, blocks per member, routes, pipelines, bytes moved, the record of the
  current and finished scale-outs (``status`` and ``/metrics`` read it; tests assert on it).

``membership.py`` keeps what it knows of each model and the liveness rule.
``python -m faascale.pipecast.service`` runs one coordinator as a process (emulated cluster;
``service_cli.main``); the platform hosts one in a Ray actor (``platform/pipecast_actor.py``).
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from faascale.pipecast.coordinator import (STORE, Event, Route, RouteMode, ScaleOut,
                                           ScaleOutRequest)
from faascale.pipecast.membership import (JoinedNode, ModelState, gathered, holders, is_dead,
                                          late_joiners, record_json, route_mode, setting,
                                          store_wave, timeline)
from faascale.pipecast.plan_io import plan_to_json
from faascale.pipecast.schedule import MulticastPlan, PlanError
from faascale.pipecast.transport import Header, Transport, TransportError

log = logging.getLogger(__name__)
JOIN_WINDOW_S = 1.0
DEAD_AFTER_S = 5.0  # silent this long and its control socket unreachable: dead
HUNG_AFTER_S = 30.0  # silent this long: dead even if its socket answers (its Python is stuck)
# A target of a running scale-out that got no block for this long, its members all alive, is
# re-planned (a receive that stalled would otherwise wait for the agents' plan timeout).
STALL_AFTER_S = 60.0
# How plans relay a model in pieces: "chain" (rotated chains: about one unicast to all, each
# node receiving and forwarding at once), "binomial" (binomial pipelines, as for whole blocks),
# or "auto" (chain). Models without pieces always relay in binomial pipelines.
RELAY_ENV = "FAASCALE_PIPECAST_RELAY"
# "0": serving replicas send alone; "1" (default): the store fills in beside them (coordinator.py)
STORE_HELPS_ENV = "FAASCALE_PIPECAST_STORE_HELPS"
RETRY_ROUTE_S = 1.0
POLL_S = 0.1
SLOW_PASS_S = 1.0  # a pass (frames + timers) slower than this is logged: heartbeats wait on it
CONTROL_SEND_S = 0.25  # a live member's control queue takes a frame at once; never block long
MAX_FINISHED = 20  # finished scale-outs kept per model for progress()
MAX_AGENT_REPLANS = 3  # failed plan parts of one target re-planned per scale-out, then it gives up
TICK_ERROR_LOG_S = 30.0  # a tick failing every poll (10 a second) logs its traceback this often


class Coordinator:
    """See the module docstring. Not thread-safe except ``expect`` and ``progress`` (a lock):
    one thread polls."""

    def __init__(self, transport: Transport, *, clock: Callable[[], float] = time.monotonic,
                 join_window_s: float = JOIN_WINDOW_S, dead_after_s: float = DEAD_AFTER_S,
                 hung_after_s: float = HUNG_AFTER_S, max_sources: int = 4) -> None:
        self.transport, self.clock = transport, clock
        self.join_window_s, self.dead_after_s, self.max_sources = (join_window_s, dead_after_s,
                                                                   max_sources)
        self.hung_after_s = max(hung_after_s, dead_after_s)
        self.models: dict[str, ModelState] = {}
        self._expected: dict[str, int] = {}  # intents for models nobody joined for yet
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return self.transport.address

    # ------------------------------------------------------------------ owner's side

    def expect(self, key: str, count: int) -> None:
        """A ScaleIntent: ``count`` new replicas of ``key`` (a model id, or the function name its
        members join with) are being created."""
        with self._lock:
            m = self.models.get(key) or next((m for m in self.models.values()
                                              if m.function == key), None)
            if m is None:
                self._expected[key] = self._expected.get(key, 0) + max(0, count)
            else:
                m.expected += max(0, count)
                m.expected_at_s = self.clock()

    def run(self) -> None:
        while not self._stop.is_set():
            self.poll(POLL_S)

    def stop(self) -> None:
        self._stop.set()

    def poll(self, timeout_s: float) -> None:
        """Handle the frames that came (waiting up to ``timeout_s`` for the first), then the
        timers: every heartbeat already here is counted before anyone is declared dead."""
        wait, frames, began = timeout_s, 0, 0.0
        while True:
            try:
                msg = self.transport.recv(wait)
            except TransportError as e:
                if isinstance(e, TimeoutError):
                    break
                log.warning("dropped a control frame: %s", e)
                continue
            began, wait, frames = began if frames else time.monotonic(), 0.0, frames + 1
            try:
                with self._lock:
                    self._on_frame(msg.header)
            except Exception:
                log.exception("control frame %s from %s failed", msg.header.meta.get("op"),
                              msg.header.sender)
        ticked = time.monotonic()
        with self._lock:
            self._tick(self.clock())
        if (done := time.monotonic()) - (began := began if frames else ticked) > SLOW_PASS_S:
            log.warning("a pass took %.1f s: %d frames, the timers %.1f s", done - began,
                        frames, done - ticked)

    def progress(self) -> dict[str, Any]:
        """Per model: members (blocks, route, the addresses they listen on), pending joiners, the running scale-out's progress
        and record, finished scale-outs. Plain data (JSON-able)."""
        with self._lock:
            out = {}
            for m in self.models.values():
                active = m.active
                out[m.model_id] = {
                    "function": m.function, "blocks_needed": m.num_blocks,
                    "members": {n.name: {"blocks": len(n.held), "route": route_mode(m, n.name),
                                         "listen": [a for a in (n.ctl, n.blocks, n.stage) if a]}
                                for n in m.nodes.values()},
                    "pending": list(m.pending), "expected": m.expected,
                    "pipeline_serves": m.pipeline_serves, "tick_errors": m.tick_errors,
                    "active": None if active is None else {
                        **active.progress(), "record": record_json(active.record)},
                    "finished": list(m.finished)}
            return out

    # ------------------------------------------------------------------ frames

    def _on_frame(self, header: Header) -> None:
        if header.kind != "control":
            return
        meta, now = dict(header.meta), self.clock()
        op, name = meta.get("op"), str(meta.get("node", ""))
        if op == "join":
            self._join(meta, now)
            return
        m = self._model_of(name)
        if m is None:  # a member we do not know (we restarted): ask it to join again
            if op == "heartbeat" and isinstance(meta.get("ctl"), str):
                try:
                    self.transport.send(meta["ctl"], "control", {"op": "rejoin"},
                                        timeout_s=CONTROL_SEND_S,
                                        epoch=str(meta.get("session", "")))
                except TransportError as e:
                    log.warning("could not ask %s to rejoin: %s", name, e)
            return
        if op == "leave":
            log.info("%s left", name)
            self._forget(m, name, now)
            return
        node = m.nodes[name]
        node.last_seen_s = now
        so = m.active
        if op == "block":
            block = int(meta["block"])
            node.held.add(block)
            if so is not None and name in so.holdings:
                so.block_arrived(name, block, now)
                self._send_routes(m)
                if so.done:
                    self._finish(m, now)
        elif op == "served":
            m.pipeline_serves += 1
            if so is not None and name in so.holdings:
                so.served_through_pipeline(name, now, meta.get("stages") or [])
        elif op == "stage_failed":
            log.warning("%s: a stage of its pipeline failed: %s", name, meta.get("why"))
            if so is not None:
                so.record.append(Event(now, "stage_failed", {"node": name,
                                                             "why": meta.get("why")}))
            m.retry_at_s[name] = now + RETRY_ROUTE_S
        elif op == "agent_done" and not meta.get("ok"):
            current = meta.get("plan_id") == m.plan_id  # else a newer plan replaced it
            log.log(logging.WARNING if current else logging.INFO, "%s: its part of %s plan "
                    "failed: %s", name, "the" if current else "a superseded", meta.get("why"))
            if so is not None:
                so.record.append(Event(now, "agent_failed", {"node": name,
                                                             "why": meta.get("why"),
                                                             "stalled": meta.get("stalled")}))
                if meta.get("plan_id") == m.plan_id and meta.get("missing") \
                        and name in so.holdings and not m.full(name):
                    self._replan_failed(m, so, name, str(meta.get("why")), now)

    def _model_of(self, name: str) -> ModelState | None:
        return next((m for m in self.models.values() if name in m.nodes), None)

    def _join(self, meta: dict[str, Any], now: float) -> None:
        model_id, name = str(meta["model_id"]), str(meta["node"])
        m = self.models.get(model_id)
        if m is None:
            m = self.models[model_id] = ModelState(
                model_id, str(meta.get("function", model_id)), int(meta["num_blocks"]),
                tuple(int(b) for b in meta["block_bytes"]), cut_through=meta.get("pieces") is True,
                expected=self._expected.pop(model_id, 0))
            m.expected += self._expected.pop(m.function, 0)
        m.cut_through = m.cut_through and meta.get("pieces") is True
        source = meta.get("source") if meta.get("source") in ("HOST", "DISK") else None
        function = str(meta.get("function") or "")
        if source is None and function and function != m.function:  # a tier source named it
            m.function = function
            m.expected += self._expected.pop(function, 0)
        old = self._model_of(name)
        if old is not None:  # a member that restarted under its name: forget the old one
            self._forget(old, name, now)
        m.nodes[name] = JoinedNode(name, str(meta["ctl"]), str(meta["blocks"]),
                                   str(meta.get("stage", "")), {int(b) for b in meta.get("held", ())},
                                   bool(meta.get("local")), now, str(meta.get("session", "")),
                                   source, bool(meta.get("store")))
        self._watch(m.nodes[name].ctl)
        log.info("%s joined %s with %d/%d blocks%s", name, model_id, len(m.nodes[name].held),
                 m.num_blocks, f" (a {source} source)" if source else "")
        if source is not None:  # a source only: planned from, never a target, never routed
            return
        if m.full(name):
            self._send(m, name, "route", {"mode": "full"})
            return
        m.pending.append(name)
        m.first_pending_s = m.first_pending_s if m.first_pending_s is not None else now

    # ------------------------------------------------------------------ timers

    def _replan_failed(self, m: ModelState, so: ScaleOut, name: str, why: str, now: float) -> None:
        """``name``'s part of the current plan ended with blocks missing: re-plan what every
        target lacks now (a plan a newer one cancelled reports an older id: not this)."""
        tries = m.agent_replans[name] = m.agent_replans.get(name, 0) + 1
        if tries > MAX_AGENT_REPLANS:
            self._give_up(m, [name], f"its part of {tries} plans failed, the last: {why}")
            return
        so.record.append(Event(now, "agent_replan", {"node": name, "try": tries}))
        try:
            self._dispatch(m, so.replan(now))
        except PlanError as e:
            self._give_up(m, [name], str(e))

    def _tick(self, now: float) -> None:
        for m in list(self.models.values()):
            try:
                self._tick_model(m, now)
            except Exception:  # noqa: BLE001 - one model's broken state must not stop the rest
                m.tick_errors += 1
                if now - m.tick_error_logged_s >= TICK_ERROR_LOG_S:
                    m.tick_error_logged_s = now
                    log.exception("%s: a coordinator tick failed (%d so far); going on",
                                  m.model_id, m.tick_errors)

    def _tick_model(self, m: ModelState, now: float) -> None:
        """One model's timers: dead members, route retries, stalls, a wave to start."""
        for name in [n for n, node in m.nodes.items() if self._dead(node, now)]:
            self._forget(m, name, now)
        self._redeliver(m, now)
        for name, at in list(m.retry_at_s.items()):
            if now >= at:
                del m.retry_at_s[name]
                m.sent.pop(name, None)  # send it again even if unchanged
                self._send_routes(m)
        so = m.active
        stalled = so.stalled(now, STALL_AFTER_S) if so is not None else []
        if so is not None and stalled:
            log.warning("%s: %s got no block for %.0f s: re-planning", m.model_id, stalled,
                        STALL_AFTER_S)
            so.record.append(Event(now, "stall_replan", {"targets": stalled}))
            try:
                self._dispatch(m, so.replan(now))
            except PlanError as e:
                self._give_up(m, stalled, str(e))
        if so is not None and gathered(m, now, self.join_window_s):
            self._join_running(m, so, now)
        if m.active is None and gathered(m, now, self.join_window_s,
                                         bool(holders(m)) or store_wave(m)):
            self._start_wave(m, now)  # all that were expected and a source, or waited enough

    def _watch(self, ctl: str) -> None:
        """Connect to a member's control socket now, so its liveness is known before the first
        frame to it (``_dead``)."""
        reachable = getattr(self.transport, "reachable", None)
        if reachable is not None and ctl:
            try:
                reachable(ctl)
            except TransportError as e:
                log.warning("cannot watch %s: %s", ctl, e)

    def _dead(self, node: JoinedNode, now: float) -> bool:
        """``is_dead`` with this coordinator's thresholds and transport."""
        return is_dead(node, now, dead_after_s=self.dead_after_s, hung_after_s=self.hung_after_s,
                       reachable=self._answers if hasattr(self.transport, "reachable") else None)

    def _answers(self, ctl: str) -> bool:
        """Whether a silent member's control socket answers: libzmq's heartbeats, else (a
        process so starved that its I/O thread misses them) its host's kernel on that port."""
        if self.transport.reachable(ctl):
            return True
        listening = getattr(self.transport, "listening", None)
        return bool(listening is not None and listening(ctl))

    def _forget(self, m: ModelState, name: str, now: float) -> None:
        m.nodes.pop(name, None)
        m.sent.pop(name, None)
        m.retry_at_s.pop(name, None)
        m.undelivered.pop(name, None)
        if name in m.pending:
            m.pending.remove(name)
        so = m.active
        if so is None or (name not in so.holdings and name not in so.plan.sources):
            return
        try:
            plan = so.node_failed(name, now)
        except PlanError as e:
            self._give_up(m, [t for t in so.holdings if t in m.nodes and not m.full(t)], str(e))
            return
        self._send_routes(m)
        if so.done:
            self._finish(m, now)
            return
        store_fed = sorted({t.dst for t in plan.transfers if t.src == STORE
                            and not (t.dst in m.nodes and m.nodes[t.dst].store)})
        if store_fed:  # members that cannot read the object store in a plan load it themselves
            self._give_up(m, store_fed, f"blocks of {m.model_id} are held by no live node")
        self._dispatch(m, plan)

    def _start_wave(self, m: ModelState, now: float) -> None:
        targets = tuple(sorted(n for n in m.pending if n in m.nodes))  # plans by name, not race
        m.pending, m.first_pending_s, m.agent_replans = [], None, {}
        m.expected = max(0, m.expected - len(targets))
        have = holders(m)
        local = frozenset(t for t in targets if m.nodes[t].local)
        if not have:  # from zero: members that can load from the store share the load
            from_store = [t for t in targets if t not in local and m.nodes[t].store]
            if len(from_store) < 2:  # alone it would only load from the store: let it
                from_store = []
            self._give_up(m, [t for t in targets if t not in local and t not in from_store],
                          f"no replica holds {m.model_id}")
            targets = tuple(t for t in targets if t in local or t in from_store)
        if not targets:
            return
        held = {t: frozenset(m.nodes[t].held) for t in targets if m.nodes[t].held}
        request = ScaleOutRequest(
            m.model_id, m.num_blocks, m.block_bytes, targets, have, local,
            held,  # a rejoined member is planned with what it holds
            cut_through=m.cut_through and setting(RELAY_ENV, "auto",
                                                   ("auto", "chain", "binomial")) != "binomial",
            store_helps=setting(STORE_HELPS_ENV, "1", ("0", "1")) == "1"
            and all(m.nodes[t].store for t in targets if t not in local))
        m.active = so = ScaleOut(request, now, self.max_sources)
        log.info("%s: %s from %s to %s (%d steps)", m.model_id, so.plan.algorithm,
                 so.plan.sources, targets, so.plan.num_steps)
        self._dispatch(m, so.plan)

    def _join_running(self, m: ModelState, so: ScaleOut, now: float) -> None:
        """Members that joined while a scale-out runs join it (one re-plan) rather than wait for
        it to end: replicas of one burst start seconds apart on slow nodes. Not those that load
        from their own tier, nor, with no holder, those that cannot load from the store."""
        late = late_joiners(m, so)
        if not late:
            return
        m.pending = [n for n in m.pending if n not in late]
        m.first_pending_s = m.first_pending_s if m.pending else None
        m.expected = max(0, m.expected - len(late))
        try:  # the store only if every target of it can load from the store
            plan = so.add_targets(late, {t: frozenset(m.nodes[t].held) for t in late}, now,
                                  all(m.nodes[t].store for t in so.holdings if t in m.nodes))
        except PlanError as e:
            self._give_up(m, late, str(e))
            return
        log.info("%s: %s join the running scale-out (%d steps)", m.model_id, late, plan.num_steps)
        self._dispatch(m, plan)
        self._send_routes(m)

    def _dispatch(self, m: ModelState, plan: MulticastPlan) -> None:
        nodes = [n for n in (*plan.sources, *plan.targets) if n in m.nodes]
        peers = {n: m.nodes[n].blocks for n in nodes}
        body = plan_to_json(plan).encode()
        m.plans_sent += 1
        # The plan's epoch: unique, also across coordinator restarts (a replayed frame of an
        # earlier plan is refused by every agent; ``transport.py``).
        plan_id = m.plan_id = f"{m.model_id[:40]}/{m.plans_sent}/{secrets.token_hex(8)}"
        m.undelivered.clear()  # an older plan is never sent late: this one replaces it
        for n in nodes:
            if any(t.src == n or t.dst == n for t in plan.transfers) or any(
                    x.node == n for x in plan.local_loads):
                meta = {"peers": peers, "plan_id": plan_id}
                if not self._send(m, n, "plan", meta, body):
                    m.undelivered[n] = (self.clock() + RETRY_ROUTE_S, meta, body)

    def _redeliver(self, m: ModelState, now: float) -> None:
        """Send the current plan again to the members that did not take it (a member starved
        of CPU drops libzmq's connection for seconds): its peers wait for it meanwhile."""
        for name, (at, meta, body) in list(m.undelivered.items()):
            if name not in m.nodes or meta["plan_id"] != m.plan_id:
                del m.undelivered[name]
            elif now >= at:
                if self._send(m, name, "plan", meta, body):
                    del m.undelivered[name]
                    log.info("%s: plan %s delivered on a later try", name, meta["plan_id"])
                else:
                    m.undelivered[name] = (now + RETRY_ROUTE_S, meta, body)

    def _give_up(self, m: ModelState, names: Sequence[str], why: str) -> None:
        for n in names:
            self._send(m, n, "error", {"why": f"{why}: load it from the object store"})

    def _finish(self, m: ModelState, now: float) -> None:
        so = m.active
        assert so is not None
        m.finished.append({**so.progress(), "started_s": so.started_s, "done_s": now,
                           "record": record_json(so.record)})
        del m.finished[:-MAX_FINISHED]
        m.active = None
        log.info("%s: scale-out done: %s", m.model_id, timeline(so, now))

    # ------------------------------------------------------------------ routes

    def _send_routes(self, m: ModelState) -> None:
        so = m.active
        if so is None:
            return
        for name, route in so.routes().items():
            if name not in m.nodes:
                continue
            meta = self._route_meta(m, route)
            key = (meta["mode"], tuple(tuple(s) for s in meta.get("stages", ())))
            if m.sent.get(name) != key and self._send(m, name, "route", meta):
                m.sent[name] = key

    def _route_meta(self, m: ModelState, route: Route) -> dict[str, Any]:
        if route.mode is RouteMode.PIPELINE and route.pipeline is not None:
            return {"mode": "pipeline", "stages": [
                [s.replica, s.first_block, s.last_block, m.nodes[s.replica].stage,
                 m.nodes[s.replica].session] for s in route.pipeline.stages]}
        return {"mode": route.mode.value}

    def _send(self, m: ModelState, name: str, op: str, meta: dict[str, Any],
              payload: bytes | None = None) -> bool:
        try:
            node = m.nodes[name]
            self.transport.send(node.ctl, "control", {"op": op, **meta}, payload,
                                timeout_s=CONTROL_SEND_S, epoch=node.session)
            return True
        except (TransportError, KeyError) as e:
            log.warning("could not send %s to %s: %s", op, name, e)
            return False


if __name__ == "__main__":
    from faascale.pipecast.service_cli import main

    sys.exit(main())
