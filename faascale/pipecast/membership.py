"""What the PipeCast coordinator (``service.py``) knows of each model, and its liveness rule.

``JoinedNode``: one node that joined a model (a member, or a node's tier copy as a source);
``ModelState``: one model's nodes, joiners waiting for a wave, the running ``ScaleOut`` and its
bookkeeping; ``gathered``: when the joiners waiting are planned; ``is_dead``: when a silent node
counts as dead. No sockets of its own: ``is_dead`` asks the transport's ``reachable``, which it
is given. ``timeline``: where a finished scale-out's time went, for the log; ``setting``: one of
the coordinator's environment settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faascale.pipecast.coordinator import STORE, Event, Holder, HolderKind, ScaleOut
from faascale.pipecast.transport import TransportError

log = logging.getLogger(__name__)
SETTLE_S = 0.75  # a wave waits until no intent came for this long (Serve's policy ticks: 0.5 s)
MAX_GATHER_S = 3.0  # ... at most this long after its first member joined


@dataclass
class JoinedNode:
    """A node that joined a model: a member (replica) or a tier source; its addresses, session,
    the blocks it holds and when it was last heard from. Mutated by the coordinator."""

    name: str
    ctl: str
    blocks: str
    stage: str
    held: set[int]
    local: bool
    last_seen_s: float
    session: str = ""  # the epoch of its control frames (``participant.py``)
    source: str | None = None  # HOST or DISK: a node's tier copy (``source.py``), never routed to
    store: bool = False  # its agent can load blocks from the object store inside a plan
    suspected: bool = False  # silent past dead_after_s, its socket still answering


@dataclass
class ModelState:
    """One model at the coordinator: the nodes that joined, the wave gathering, the running
    scale-out and what was sent for it, finished scale-outs. Mutated by the coordinator."""

    model_id: str
    function: str
    num_blocks: int
    block_bytes: tuple[int, ...]
    cut_through: bool = False  # every member's manifest lists pieces: plans relay in chains
    nodes: dict[str, JoinedNode] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    first_pending_s: float | None = None
    expected: int = 0
    expected_at_s: float = -math.inf  # when an intent last raised ``expected``
    active: ScaleOut | None = None
    sent: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # last route sent per node
    retry_at_s: dict[str, float] = field(default_factory=dict)
    # plans not delivered (the member's control socket took no frame): name -> (when to try
    # again, the plan's meta, its body); sent again until taken, replaced or the member is gone
    undelivered: dict[str, tuple[float, dict[str, Any], bytes]] = field(default_factory=dict)
    finished: list[dict[str, Any]] = field(default_factory=list)
    pipeline_serves: int = 0
    plans_sent: int = 0
    plan_id: str = ""  # the last plan dispatched (its epoch)
    agent_replans: dict[str, int] = field(default_factory=dict)  # per target, this scale-out
    tick_errors: int = 0
    tick_error_logged_s: float = -math.inf

    def full(self, name: str) -> bool:
        return len(self.nodes[name].held) == self.num_blocks


def is_dead(node: JoinedNode, now: float, *, dead_after_s: float, hung_after_s: float,
            reachable: Callable[[str], bool] | None) -> bool:
    """Silent for ``dead_after_s`` and its control socket unreachable (the process died or is
    cut off), or silent for ``hung_after_s`` whatever its socket says (its Python is stuck).
    A member that only missed heartbeats because it is starved of CPU is still reachable:
    libzmq's own heartbeats (``ZmqTransport.reachable``) while its I/O thread gets the CPU, its
    kernel's answer on the socket's port when not even that thread does (the coordinator's
    ``answers``: ``ZmqTransport.listening``). ``reachable`` None: silence alone decides. Sets
    ``node.suspected`` while it waits on such a member."""
    silent_s = now - node.last_seen_s
    if silent_s <= dead_after_s:
        node.suspected = False
        return False
    if silent_s <= hung_after_s and reachable is not None and node.ctl:
        try:
            up = reachable(node.ctl)
        except TransportError:
            up = False
        if up:
            if not node.suspected:
                node.suspected = True
                log.warning("%s: no heartbeat for %.1f s but its socket answers: waiting "
                            "up to %.0f s", node.name, silent_s, hung_after_s)
            return False
    log.warning("%s: no heartbeat for %.1f s%s: dead", node.name, silent_s,
                "" if silent_s > hung_after_s else " and its socket does not answer")
    return True


def holders(m: ModelState) -> tuple[Holder, ...]:
    """Every node holding the whole model: serving replicas, then tier sources (HOST, DISK);
    ``choose_sources`` ranks them by kind."""
    return tuple(Holder(n, HolderKind[m.nodes[n].source] if m.nodes[n].source
                        else HolderKind.REPLICA)
                 for n in sorted(m.nodes) if n not in m.pending and m.full(n))


def store_wave(m: ModelState) -> bool:
    """From zero: every expected member joined and two or more can load parts from the store;
    waiting out the join window would only delay a wave that has nobody to wait for (a tier
    copy that joins later serves the next wave)."""
    return sum(1 for t in m.pending if m.nodes[t].store) >= 2


def gathered(m: ModelState, now_s: float, join_window_s: float, have_source: bool = True) -> bool:
    """Whether the members waiting (``pending``) are planned now: every expected one joined
    (and there is something to copy from: ``have_source``), or ``join_window_s`` passed since
    the first; either way only once no intent came for ``SETTLE_S``, unless the first has
    waited ``MAX_GATHER_S``. A burst's intents come one policy tick apart (the target rises
    with the requests: 1 -> 2 -> 3 -> 4), and a warm replica joins at once: planned at its own
    intent, each member re-planned the running scale-out, and a re-plan throws away the whole
    blocks in flight and the part files made for them (bursty runs: the first pipeline 17-22 s
    after the plan with three re-plans, 10.5 s with one plan for all)."""
    if not m.pending:
        return False
    waited = now_s - (m.first_pending_s if m.first_pending_s is not None else now_s)
    ready = (len(m.pending) >= max(1, m.expected) and have_source) or waited >= join_window_s
    return ready and (now_s - m.expected_at_s >= SETTLE_S or waited >= MAX_GATHER_S)


def late_joiners(m: ModelState, so: ScaleOut) -> list[str]:
    """Pending members that may join the running scale-out ``so``: new to it, or back after it
    counted them dead; not those that load from their own tier, nor, with no holder, those that
    cannot load from the store."""
    return [n for n in m.pending if n in m.nodes and not m.nodes[n].local
            and (so.request.holders or m.nodes[n].store)
            and (n not in so.holdings or n in so.dead)]


def route_mode(m: ModelState, name: str) -> str:
    """How ``name`` serves now, for ``progress``: source, full, loading, or its route's mode."""
    if m.nodes[name].source is not None:
        return "source"
    so = m.active
    if so is not None and name in so.holdings:
        return so.route(name).mode.value
    return "full" if m.full(name) else "loading"


def record_json(events: Sequence[Event]) -> list[dict[str, Any]]:
    """A scale-out's record as plain data (JSON-able)."""
    return [{"at_s": e.at_s, "kind": e.kind, "detail": json.loads(json.dumps(e.detail,
                                                                            default=list))}
            for e in events]


def timeline(so: ScaleOut, now_s: float) -> str:
    """Where a scale-out's time went, from its record, in seconds since it was planned: how many
    of the last plan's moves were loads from the store, when the first pipeline formed, and per
    target when its first block, half its blocks and all of them had arrived ("-": not yet)."""
    t0, need = so.started_s, so.request.num_blocks
    arrived: dict[str, list[float]] = {}
    pipeline = None
    for e in so.record:
        if e.kind == "block":
            arrived.setdefault(str(e.detail["node"]), []).append(e.at_s - t0)
        elif e.kind == "pipelines" and pipeline is None and e.detail.get("formed"):
            pipeline = e.at_s - t0

    def marks(name: str) -> str:
        times = arrived.get(name, [])
        return "/".join(f"{times[k - 1]:.1f}" if len(times) >= k else "-"
                        for k in (1, (need + 1) // 2, need))
    stored = sum(t.src == STORE for t in so.plan.transfers)
    return (f"{so.plan.algorithm} from {', '.join(so.plan.sources)} in {now_s - t0:.1f} s "
            f"(last plan: {stored} of {len(so.plan.transfers)} moves from the store); "
            f"first pipeline {'-' if pipeline is None else f'{pipeline:.1f}'} s; blocks first/half/"
            f"all at (s): " + ", ".join(f"{t} {marks(t)}" for t in so.request.targets))


def setting(name: str, default: str, allowed: tuple[str, ...]) -> str:
    """The environment variable ``name`` (lower case), or ``default`` (warned) if not allowed."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        log.warning("%s=%r: expected %s; using %s", name, value, " or ".join(allowed), default)
        value = default
    return value
