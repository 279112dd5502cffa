"""What every PipeCast node process shares: the control link to the coordinator and the multicast.

A ``Participant`` binds two transports, ``blocks`` (its ``NodeAgent``: the plans' transfers) and
``ctl`` (the coordinator's control frames), joins the coordinator (``service.py``) with the blocks
it holds, runs every ``plan`` it is sent (a new one cancels the one running), reports each block
that lands (``block``) and how each plan ended (``agent_done``), heartbeats every ``HEARTBEAT_S``,
and joins again when a restarted coordinator asks (``rejoin``). If its heartbeats have failed for
``LOCATE_AFTER_S`` (the coordinator restarted somewhere else: another port, another node), it asks
``locate`` (set by the platform: the coordinator actor's current address) and joins there. Two
kinds:

- ``Member`` (``member.py``): a replica's part, with an engine, stage server and routes;
- ``TierSource`` (``source.py``): a node's HOST or DISK tier copy of a model, a source only.

Control frames carry small JSON in their meta: ``{op, node, ...}``; a plan rides as the payload.

Replays (``transport.py``): both transports take frames of open epochs only. The control one has
one, the participant's *session*: a random id it joins (and heartbeats) with, which the
coordinator stamps on every frame to it; a restarted participant has a new one, so a control
frame captured before (a plan, a route) is refused. The blocks one opens each plan's id (random,
from the coordinator) when the plan comes and closes it when the plan ends.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faascale.pipecast.agent import (AgentConfigError, BlockCatalog, MulticastError, NodeAgent,
                                     plan_from_json)
from faascale.pipecast.plan_io import PLAN_FRAME_BYTES
from faascale.pipecast.transport import Header, TransportError
from faascale.pipecast.zmq_transport import ZmqTransport

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
LOCATE_AFTER_S = 8.0  # heartbeats failing this long (a send times out in 5 s): ask ``locate``
POLL_S = 0.2
PLAN_TIMEOUT_S = 600.0


class Participant:
    """See the module docstring. Subclasses add what they join with (``_join_meta``), the control
    operations beyond plan and rejoin (``_on_op``), and their own threads (``_threads``) before
    calling ``_start``."""

    def __init__(self, name: str, manifest: Any, holdings_dir: str | os.PathLike, *,
                 secret: bytes, coordinator: str, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, local_dir: str | os.PathLike | None = None,
                 function: str = "", store_loader: Callable[[int], Path] | None = None,
                 pieces: bool = True) -> None:
        self.name, self.manifest = name, manifest
        # ``pieces=False``: move whole blocks (one frame each) even if the manifest lists
        # pieces; every participant of a model must agree (the platform's setting is one).
        catalog = BlockCatalog.of(manifest)
        if not pieces:
            catalog = BlockCatalog(catalog.model_id, tuple(
                dataclasses.replace(b, pieces=(), piece_bytes=0) for b in catalog.blocks))
        self._pieces = all(b.pieces for b in catalog.blocks if b.size_bytes)
        self.function = function or getattr(manifest, "name", "") or manifest.model_id
        self.coordinator = coordinator
        # Where the coordinator listens now (its address), asked when heartbeats keep failing;
        # None: only the address given. The platform sets it (the actor's ``contact``).
        self.locate: Callable[[], str] | None = None
        self.holdings_dir = Path(holdings_dir)
        self.local_dir = None if local_dir is None else Path(local_dir)
        self._tx = {"secret": secret, "bind_host": bind_host, "advertise_host": advertise_host}
        # No block frame of this model is larger than a piece: nothing larger is buffered.
        self.blocks_tx = ZmqTransport(name=name, **self._tx, epochs_only=True,
                                      max_payload_bytes=catalog.max_frame_bytes)
        self.session = secrets.token_hex(16)  # this incarnation's control epoch
        self.ctl_tx = ZmqTransport(name=f"{name}#ctl", recv_hwm=64, send_hwm=64, **self._tx,
                                   epochs_only=True, max_payload_bytes=PLAN_FRAME_BYTES)
        self.ctl_tx.open_epoch(self.session)
        self._can_load_from_store = store_loader is not None
        self.agent = NodeAgent(name, self.blocks_tx, catalog, self.holdings_dir,
                               local_dir=self.local_dir, on_block=self._landed,
                               store_loader=store_loader)
        self._lock = threading.Lock()
        self.held: set[int] = set(self.agent.held())
        self._stop = threading.Event()
        self._plans: queue.SimpleQueue[tuple[Any, dict[str, str], str]] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=f, name=f"pipecast-{name}-{f.__name__}",
                                          daemon=True)
                         for f in (self._control_loop, self._plan_loop, self._heartbeat_loop)]

    def _start(self) -> None:
        for t in self._threads:
            t.start()
        self._join()

    # ------------------------------------------------------------------ for subclasses

    def _join_meta(self) -> dict[str, Any]:
        return {}

    def _on_op(self, op: str, meta: dict[str, Any], payload: Any) -> None:
        """A control operation other than plan and rejoin (control thread)."""

    def _landed(self, block: int) -> None:  # agent threads
        with self._lock:
            self.held.add(block)
        self._tell("block", block=block)

    # ------------------------------------------------------------------ the coordinator link

    def _join(self) -> None:
        with self._lock:
            held = sorted(self.held)
        self._tell("join", model_id=self.manifest.model_id, function=self.function,
                   num_blocks=self.manifest.num_blocks,
                   block_bytes=[b.size_bytes for b in self.manifest.blocks],
                   pieces=self._pieces,
                   held=held, local=self.local_dir is not None, blocks=self.blocks_tx.address,
                   ctl=self.ctl_tx.address, session=self.session,
                   store=self._can_load_from_store, **self._join_meta())

    def _tell(self, op: str, **meta: Any) -> bool:
        """Send the coordinator a control frame; False if it could not be sent (logged)."""
        try:
            self.ctl_tx.send(self.coordinator, "control", {"op": op, "node": self.name, **meta},
                             timeout_s=5.0)
            return True
        except TransportError as e:
            log.warning("%s: could not tell the coordinator %s: %s", self.name, op, e)
            return False

    def _relocate(self) -> None:
        """Ask ``locate`` where the coordinator is; if it moved, join it there (heartbeat
        thread)."""
        if self.locate is None:
            return
        try:
            address = self.locate()
        except Exception as e:  # the actor is restarting or unreachable: ask again later
            log.warning("%s: could not locate the coordinator: %s", self.name, e)
            return
        if address and address != self.coordinator:
            log.warning("%s: the coordinator moved from %s to %s; joining it there", self.name,
                        self.coordinator, address)
            self.coordinator = address
            self._join()

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.ctl_tx.recv(POLL_S)
            except TransportError:
                continue
            try:
                self._on_control(msg.header, msg.payload)
            except Exception:
                log.exception("%s: control frame %s failed", self.name, msg.header.meta.get("op"))

    def _on_control(self, header: Header, payload: Any) -> None:
        meta, op = dict(header.meta), header.meta.get("op")
        if header.kind != "control":
            return
        if op == "plan":
            plan, peers, plan_id = (plan_from_json(bytes(payload).decode()), dict(meta["peers"]),
                                    str(meta["plan_id"]))
            self.agent.expect(plan_id)  # its peers' early frames are taken from now on
            self.agent.cancel(keep=plan_id)  # a new plan (a repair) replaces any older one
            self._plans.put((plan, peers, plan_id))
        elif op == "rejoin":  # the coordinator restarted and does not know us
            self._join()
        else:
            self._on_op(str(op), meta, payload)

    def _plan_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._plans.get(timeout=POLL_S)
            except queue.Empty:
                continue
            while not self._plans.empty():  # only the newest plan runs: those it replaced
                self.agent.end_plan(item[2])  # never begin (their peers have moved on)
                item = self._plans.get_nowait()
            plan, peers, plan_id = item
            try:
                report = self.agent.execute(plan, peers, PLAN_TIMEOUT_S, plan_id)
                log.info("%s: plan %s done in %.1f s: %d blocks here (%.0f MB over the network, "
                         "the rest loaded; block@s: %s), %d sent (%.0f MB)", self.name,
                         plan_id[-8:], report.elapsed_s, len(report.arrival_s),
                         report.bytes_received / 1e6, " ".join(
                             f"{b}@{t:.1f}" for b, t in sorted(report.arrival_s.items(),
                                                               key=lambda x: x[1])[:16]),
                         report.blocks_sent, report.bytes_sent / 1e6)
                self._tell("agent_done", ok=True, received=len(report.arrival_s),
                           plan_id=plan_id)
            except MulticastError as e:
                self._tell("agent_done", ok=False, why=str(e)[:1000], plan_id=plan_id,
                           missing=list(e.missing_blocks), stalled=list(e.stalled_peers))
            except AgentConfigError as e:
                self._tell("agent_done", ok=False, why=str(e)[:1000], plan_id=plan_id,
                           missing=[], stalled=[])

    def _heartbeat_loop(self) -> None:
        failing_since: float | None = None  # when the first of the failing heartbeats began
        while not self._stop.wait(HEARTBEAT_S):
            began = time.monotonic()
            if self._tell("heartbeat", held=len(self.held), ctl=self.ctl_tx.address,
                          session=self.session):
                failing_since = None
                continue
            failing_since = began if failing_since is None else failing_since
            if time.monotonic() - failing_since >= LOCATE_AFTER_S:
                failing_since = None  # the next try is LOCATE_AFTER_S later
                self._relocate()

    # ------------------------------------------------------------------ stopping

    def _stop_threads(self, leave: bool) -> list[str]:
        """Leave the coordinator (unless ``leave`` is False: silence, as a crash), stop the agent
        and join every thread; returns the names of threads still busy."""
        if leave and not self._stop.is_set():
            self._tell("leave")
        self._stop.set()
        self.agent.cancel()
        stuck = []
        for t in self._threads:
            t.join(5.0)
            stuck += [t.name] if t.is_alive() else []
        if stuck:  # a send to a dead peer, bounded by its timeout: its transport closes with us
            log.warning("%s: threads %s still busy; leaving their sockets to the process",
                        self.name, stuck)
        return stuck

    def _close_transports(self, stuck: list[str], *others: ZmqTransport) -> None:
        for tx in (*others, self.ctl_tx, *(() if stuck else (self.blocks_tx,))):
            tx.close()
