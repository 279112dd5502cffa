"""The PipeCast coordinator's decisions, pure: sources, the plan, pipelines, routes, repairs.

One ``ScaleOut`` per scale-up of one model. It starts from a ``ScaleOutRequest`` (the
autoscaler's ``ScaleIntent`` joined with the memory tier's view of the cluster: who holds the
model, in which tier) and plans the multicast. Then events come in — a block landed on a node, a
node stopped answering — and each returns what to do: the pipelines to form or dissolve and how
every new replica should route requests (``Route``), or a repair plan. The side effects (Ray,
the transport, the agents) live elsewhere and call these; tests drive them with literals and a
fake clock. ``record`` keeps what happened (for ``status`` and for tests: "a request was served
through a pipeline before any new replica held the whole model").

Sources, fastest first: replicas already serving the model (their blocks are in memory), nodes
whose HOST tier holds it, nodes whose DISK tier holds it; at most ``max_sources`` of them, one
chain each with rotated block orders when the agents cut through (the model's blocks move in
pieces), else one binomial pipeline each (``k_way``). A new replica whose own node holds the model loads locally.
No holder at all: the object store is the one source. Only serving replicas to copy from, and
targets that can load from the store (``store_helps``): the replicas are busy (the scale-up is
their load), so the store fills in beside them (``store_fills_in``). A target that holds some
blocks already (a member rejoining a restarted coordinator) is planned with them
(``ScaleOutRequest.held``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from faascale.pipecast.pipelines import PipelineChanges, PipelineLayout, Pipelines, Stage, reform
from faascale.pipecast.repair import repair
from faascale.pipecast.schedule import MulticastPlan, k_way

STORE = "store"  # the object store, as a node name in plans


class HolderKind(enum.IntEnum):
    """Where a source holds the model, fastest first."""

    REPLICA = 0
    HOST = 1
    DISK = 2


@dataclass(frozen=True)
class Holder:
    node: str
    kind: HolderKind


@dataclass(frozen=True)
class ScaleOutRequest:
    """What the coordinator plans from. ``targets``: the nodes of the new replicas (one replica
    per node in this model of the cluster); ``local``: targets whose own tier holds the model;
    ``held``: blocks some targets hold already (a member that rejoined a restarted coordinator,
    or one that loaded part of the model before its plan was cut short). ``cut_through``: the
    model's manifest lists pieces, so the agents forward each piece as it lands; the plan then
    relays in rotated chains (about one unicast to all) instead of binomial pipelines."""

    model_id: str
    num_blocks: int
    block_bytes: tuple[int, ...]
    targets: tuple[str, ...]
    holders: tuple[Holder, ...] = ()
    local: frozenset[str] = frozenset()
    held: Mapping[str, frozenset[int]] = field(default_factory=dict)
    cut_through: bool = False  # blocks move in pieces, each forwarded as it lands: chains
    store_helps: bool = False  # every network target can load blocks from the store in a plan

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or len(self.block_bytes) != self.num_blocks:
            raise ValueError(f"{self.model_id}: need num_blocks >= 1 and one size per block")
        if len(set(self.targets)) != len(self.targets) or not self.targets:
            raise ValueError(f"{self.model_id}: targets must be distinct and not empty")
        if not self.local <= set(self.targets):
            raise ValueError(f"{self.model_id}: local targets {sorted(self.local - set(self.targets))} "
                             "are not targets")
        object.__setattr__(self, "held", {t: frozenset(b) for t, b in dict(self.held).items() if b})
        strangers = sorted(set(self.held) - set(self.targets))
        if strangers:
            raise ValueError(f"{self.model_id}: held blocks of nodes that are not targets: {strangers}")
        bad = sorted((t, b) for t, bs in self.held.items() for b in bs
                     if not 0 <= b < self.num_blocks)
        if bad:
            raise ValueError(f"{self.model_id}: held blocks outside 0..{self.num_blocks - 1}: {bad[:5]}")


def choose_sources(request: ScaleOutRequest, max_sources: int = 4) -> tuple[str, ...]:
    """The holders to multicast from: fastest kind first, then by name; never a target; at most
    one per network target. ``(STORE,)`` when nobody holds the model."""
    network_targets = [t for t in request.targets if t not in request.local]
    if not network_targets:
        return ()
    fastest: dict[str, Holder] = {}
    for h in request.holders:
        if h.node not in request.targets and (h.node not in fastest or h.kind < fastest[h.node].kind):
            fastest[h.node] = h
    ranked = sorted(fastest.values(), key=lambda h: (h.kind, h.node))
    chosen = tuple(h.node for h in ranked[:max(1, min(max_sources, len(network_targets)))])
    return chosen or (STORE,)


def store_fills_in(request: ScaleOutRequest, sources: Sequence[str]) -> bool:
    """Whether the store fills in beside ``sources`` (``repair``'s ``store_fills``): the targets
    can load from it, two or more load over the network (one receives one block at a time:
    nothing to share), and every source is a serving replica. A scale-up happens because the
    serving replicas are saturated: they serve the burst and send on what CPU is left, so the
    targets load the parts those replicas are not sending from the store, as from zero, and
    fill in from each other. A tier copy (HOST, DISK) is on a node that serves nothing: it
    sends alone."""
    kind: dict[str, HolderKind] = {}
    for h in request.holders:
        kind[h.node] = min(h.kind, kind.get(h.node, h.kind))
    network = [t for t in request.targets if t not in request.local]
    return (request.store_helps and len(network) >= 2 and bool(sources)
            and all(kind.get(s) == HolderKind.REPLICA for s in sources))


def plan_scale_out(request: ScaleOutRequest, max_sources: int = 4) -> MulticastPlan:
    """PipeCast's plan: k chains (``request.cut_through``) or k binomial pipelines, with rotated
    block orders, from the chosen sources,
    local loads (rotated) for targets that hold the model themselves. Network targets that hold
    some blocks already are planned with them (``repair``'s greedy plan from the chosen sources
    and every target's holdings: nothing a target holds is sent to it again). With nobody holding
    the model, the same greedy plan from the store: each target loads a different part of it,
    and the rest from the others (a pipeline can serve once their parts cover the model). With
    only busy serving replicas to copy from (``store_fills_in``), that plan with the replicas as
    helpers: ``pipecast-kK+store``."""
    sources = choose_sources(request, max_sources) or (STORE,)  # () when every target is local
    fills = store_fills_in(request, sources)
    partial = {t: b for t, b in request.held.items() if t not in request.local}
    if not partial and sources != (STORE,) and not fills:
        return k_way(sources, request.targets, request.num_blocks, local=request.local,
                     relay="chain" if request.cut_through else "binomial")
    # From zero (only the store holds it) or with partial targets: ``repair``'s plan, where
    # targets that start with nothing each load a different part from the store, then share.
    network = [t for t in request.targets if t not in request.local]
    everything = frozenset(range(request.num_blocks))
    holdings = {**{s: everything for s in sources if s != STORE}, **partial}
    plan = repair(holdings, network, request.num_blocks,
                  store=STORE if STORE in sources or fills else None, store_fills=fills)
    if fills:
        plan = replace(plan, algorithm=f"pipecast-k{len(sources)}+store")
    if request.local:  # local loaders keep their rotated loads beside the repair's transfers
        loads = k_way(sources, request.targets, request.num_blocks, local=request.local).local_loads
        plan = MulticastPlan(plan.algorithm, plan.sources, request.targets, plan.num_blocks,
                             plan.transfers, loads, plan.unlimited_senders, plan.initial)
        plan.validate()
    return plan


class RouteMode(enum.Enum):
    FULL = "full"  # holds every block: serve alone
    PIPELINE = "pipeline"  # serve through a temporary pipeline (this replica is a stage)
    LOADING = "loading"  # cannot serve yet: hold requests (or let the gateway send them elsewhere)


@dataclass(frozen=True)
class Route:
    """How one replica serves right now. ``pipeline``: its pipeline when mode is PIPELINE."""

    replica: str
    mode: RouteMode
    pipeline: PipelineLayout | None = None


@dataclass(frozen=True)
class Event:
    """One line of the coordinator's record."""

    at_s: float
    kind: str  # planned, joined, block, pipelines, full, stalled, repaired, served
    detail: Mapping[str, object] = field(default_factory=dict)


class ScaleOut:
    """The state of one scale-out; every method is a pure transition plus its decision.

    Not thread-safe: the coordinator's one thread calls it.
    """

    def __init__(self, request: ScaleOutRequest, now_s: float, max_sources: int = 4,
                 block_cost: Sequence[float] | None = None) -> None:
        self.request = request
        self.plan = plan_scale_out(request, max_sources)
        self.store_fills = store_fills_in(request, choose_sources(request, max_sources))
        self.block_cost = block_cost
        self.started_s = now_s
        self.holdings: dict[str, set[int]] = {t: set(request.held.get(t, ())) for t in request.targets}
        self.last_progress_s: dict[str, float] = dict.fromkeys(request.targets, now_s)
        self.dead: set[str] = set()
        self.pipelines = Pipelines()
        self.record: list[Event] = [Event(now_s, "planned", {
            "algorithm": self.plan.algorithm, "sources": self.plan.sources,
            "targets": request.targets, "steps": self.plan.num_steps,
            "store_fills": self.store_fills,
            "held": {t: len(b) for t, b in request.held.items()}})]
        if request.held:  # what the targets hold already may form pipelines at once
            self._reform(now_s)

    # ------------------------------------------------------------------ events

    def block_arrived(self, node: str, block: int, now_s: float) -> PipelineChanges | None:
        """``node`` holds ``block`` now. Returns the pipeline changes it causes (None: none).
        Unknown nodes and repeated arrivals are ignored (an agent may report twice)."""
        held = self.holdings.get(node)
        if held is None or block in held or not 0 <= block < self.request.num_blocks:
            return None
        held.add(block)
        self.last_progress_s[node] = now_s
        self.record.append(Event(now_s, "block", {"node": node, "block": block}))
        if len(held) == self.request.num_blocks:
            self.record.append(Event(now_s, "full", {"node": node}))
        return self._reform(now_s)

    def _reform(self, now_s: float) -> PipelineChanges | None:
        live = {n: frozenset(b) for n, b in self.holdings.items() if n not in self.dead}
        self.pipelines, changes = reform(self.pipelines, live, self.request.num_blocks,
                                         block_cost=self.block_cost)
        if not changes.changed:
            return None
        self.record.append(Event(now_s, "pipelines", {
            "formed": [_stages(p) for p in changes.formed],
            "dissolved": [(_stages(d.layout), d.reason.name) for d in changes.dissolved],
            "full": list(changes.became_full)}))
        return changes

    def served_through_pipeline(self, replica: str, now_s: float,
                                stages: Sequence[Sequence[object]] | None = None) -> None:
        """A replica made a token through a pipeline (for the record). ``stages``: the pipeline
        it ran on, as it reports it (the route may have changed since); default: its route now."""
        if stages is None:
            route = self.route(replica)
            stages = _stages(route.pipeline) if route.pipeline else []
        self.record.append(Event(now_s, "served", {
            "replica": replica, "stages": [list(s) for s in stages],
            "full_replicas": [n for n, b in self.holdings.items()
                              if len(b) == self.request.num_blocks]}))

    def stalled(self, now_s: float, timeout_s: float) -> list[str]:
        """Targets still loading that got no block for ``timeout_s`` (their source or they died)."""
        return sorted(n for n, held in self.holdings.items()
                      if n not in self.dead and len(held) < self.request.num_blocks
                      and now_s - self.last_progress_s[n] > timeout_s)

    def node_failed(self, node: str, now_s: float) -> MulticastPlan:
        """``node`` (a source or a target) is gone: re-plan what is missing from the live holders
        (targets, other holders, and the object store for blocks nobody live holds). Pipelines
        through the node dissolve. Returns the repair plan to run."""
        self.dead.add(node)
        self.record.append(Event(now_s, "stalled", {"node": node}))
        return self.replan(now_s)

    def add_targets(self, names: Sequence[str], held: Mapping[str, frozenset[int]],
                    now_s: float, use_store: bool = True) -> MulticastPlan:
        """Replicas that joined while this scale-out runs become its targets (instead of waiting
        for it to end, a whole transfer later), and a target declared dead that joined again is
        live again with what it holds now: every live target's missing blocks are planned
        again, from the live holders and what the targets received so far. Returns the plan to
        run (it replaces the running one); ValueError if no name is new or back. ``use_store``:
        as for ``replan``."""
        names = list(dict.fromkeys(names))
        new = [n for n in names if n not in self.holdings]
        back = [n for n in names if n in self.dead and n in self.holdings]
        if not new and not back:
            raise ValueError(f"{names}: no new target and none back")
        self.request = replace(self.request, targets=(*self.request.targets, *new),
                               held={**self.request.held, **{n: held[n] for n in new if n in held}})
        for n in (*new, *back):
            self.dead.discard(n)
            self.holdings[n] = set(held.get(n, ()))
            self.last_progress_s[n] = now_s
        self.record.append(Event(now_s, "joined", {"targets": new, "back": back}))
        return self.replan(now_s, use_store)

    def replan(self, now_s: float, use_store: bool = True) -> MulticastPlan:
        """Re-plan what every live target still lacks from the live holders (and the store for
        blocks nobody live holds): after a death, or when targets stalled while their senders
        live (``stalled``). Returns the plan to run (it replaces the running one).
        ``use_store`` False: every target is planned from its peers only (some target cannot
        load from the store); PlanError if a block is then held by nobody live."""
        self._reform(now_s)
        holders = {h.node: set(range(self.request.num_blocks)) for h in self.request.holders
                   if h.node not in self.dead}
        for n, held in self.holdings.items():
            if n not in self.dead:
                holders[n] = set(held)
        targets = [n for n in self.request.targets if n not in self.dead
                   and len(self.holdings[n]) < self.request.num_blocks]
        plan = repair(holders, targets, self.request.num_blocks, store=STORE if use_store else None,
                      store_fills=use_store and self.store_fills)
        self.plan = plan
        for n in targets:
            self.last_progress_s[n] = now_s
        self.record.append(Event(now_s, "repaired", {"targets": targets, "steps": plan.num_steps}))
        return plan

    # ------------------------------------------------------------------ views

    def route(self, replica: str) -> Route:
        """How ``replica`` should serve now. Raises KeyError for a replica not in this scale-out.

        Full: alone. In a pipeline: through it. Otherwise, once some new replica is full (its
        pipeline dissolved when it became full), through that one: the replica's own held
        prefix of blocks (if any) then the full replica for the rest, so a request on it keeps
        going instead of waiting for its last blocks. Else through the shortest pipeline the
        others formed (its stages serve several heads, one KV cache each). The sources are not
        borrowed: they are busy sending. Loading (requests wait) only when none exists."""
        held = self.holdings[replica]
        n = self.request.num_blocks
        if len(held) == n:
            return Route(replica, RouteMode.FULL)
        if replica in self.dead:
            return Route(replica, RouteMode.LOADING)
        layout = self.pipelines.pipeline_of(replica)
        if layout is not None:
            return Route(replica, RouteMode.PIPELINE, layout)
        helper = next((t for t in self.request.targets if t not in self.dead
                       and len(self.holdings[t]) == n), None)
        if helper is None:
            if self.pipelines.pipelines:  # ride the shortest pipeline others formed
                return Route(replica, RouteMode.PIPELINE,
                             min(self.pipelines.pipelines, key=lambda p: len(p.stages)))
            return Route(replica, RouteMode.LOADING)
        prefix = next((b for b in range(n) if b not in held), n)
        stages = ([Stage(replica, 0, prefix - 1)] if prefix else []) + [Stage(helper, prefix, n - 1)]
        return Route(replica, RouteMode.PIPELINE, PipelineLayout(tuple(stages)))

    def routes(self) -> dict[str, Route]:
        return {r: self.route(r) for r in self.request.targets}

    @property
    def done(self) -> bool:
        return all(len(b) == self.request.num_blocks for n, b in self.holdings.items()
                   if n not in self.dead)

    def progress(self) -> dict[str, object]:
        """For ``status`` and ``/metrics``: blocks per replica, pipelines, bytes moved."""
        sizes = self.request.block_bytes
        return {"model_id": self.request.model_id, "algorithm": self.plan.algorithm,
                "blocks": {n: len(b) for n, b in self.holdings.items()},
                "blocks_needed": self.request.num_blocks,
                "pipelines": [_stages(p) for p in self.pipelines.pipelines],
                "bytes_moved": sum(sizes[b] for held in self.holdings.values() for b in held),
                "dead": sorted(self.dead), "done": self.done}


def _stages(layout: PipelineLayout) -> list[tuple[str, int, int]]:
    return [(s.replica, s.first_block, s.last_block) for s in layout.stages]
