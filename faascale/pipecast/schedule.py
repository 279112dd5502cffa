"""Multicast schedules: which block goes from which node to which node at which step. Pure.

The step ("telephone") model: in every step each node sends at most one block and receives at most
one block over the network; a step lasts one block time on a link. Blocks are 0..b-1; nodes are
strings. Sources hold every block before step 0; a block received at step s is held after step s
and can be forwarded from step s+1. A target may also read blocks from its own HOST/DISK tier
(``LocalLoad``, one per node per step, not on the network).

The schedules:

- ``binomial_pipeline``: RDMC's binomial pipeline (hypercube). With n = 1 + targets nodes, every
  node holds every block after b + ceil(log2 n) - 1 steps, for every n (the lower bound: the source
  sends its last block at step b-1 at the earliest, then holders of it at most double per step).
- ``k_way``: PipeCast's multi-source plan: one binomial pipeline per source, block orders rotated
  so that the targets together hold every block after ceil(b/K) steps.
- baselines: ``chain`` (pipelined relay), ``binary_tree`` (FaaSNet-like), ``naive`` (one source
  sends every block to every target in turn), ``naive_parallel`` (every target pulls from an
  object store that serves any number of targets at once).

``repair.py`` finishes a plan a failure cut short; ``timing.simulate`` turns a plan into seconds
for given block sizes and link rates.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType


class PlanError(ValueError):
    """A plan breaks the step model, or a schedule was asked for with bad input."""


@dataclass(frozen=True)
class Transfer:
    """``src`` sends block ``block`` to ``dst`` during step ``step`` (held by ``dst`` after it)."""

    step: int
    src: str
    dst: str
    block: int


@dataclass(frozen=True)
class LocalLoad:
    """Target ``node`` reads block ``block`` from its own HOST/DISK tier during step ``step``."""

    step: int
    node: str
    block: int


@dataclass(frozen=True)
class MulticastPlan:
    """A schedule. Construction only normalises (tuples, sorted by step); ``validate`` checks it.

    ``unlimited_senders`` are exempt from the one-send-per-step limit (an object store that serves
    any number of readers at once). ``initial`` gives nodes that start with only some blocks (a
    repair after a failure): a source listed there holds just those, a target starts with them;
    a source not listed holds every block.
    """

    algorithm: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    num_blocks: int
    transfers: tuple[Transfer, ...] = ()
    local_loads: tuple[LocalLoad, ...] = ()
    unlimited_senders: frozenset[str] = field(default_factory=frozenset)
    initial: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "transfers", tuple(sorted(
            self.transfers, key=lambda t: (t.step, t.src, t.dst, t.block))))
        object.__setattr__(self, "local_loads", tuple(sorted(
            self.local_loads, key=lambda x: (x.step, x.node, x.block))))
        object.__setattr__(self, "unlimited_senders", frozenset(self.unlimited_senders))
        object.__setattr__(self, "initial", MappingProxyType(
            {n: frozenset(b) for n, b in dict(self.initial).items()}))

    def _held_before(self, node: str) -> frozenset[int]:
        if node in self.initial:
            return self.initial[node]
        return frozenset(range(self.num_blocks)) if node in self.sources else frozenset()

    @property
    def num_steps(self) -> int:
        """Steps until the last transfer or local load is done (0 for an empty plan)."""
        last = [t.step for t in self.transfers[-1:]] + [x.step for x in self.local_loads[-1:]]
        return max(last) + 1 if last else 0

    @functools.cached_property
    def _arrivals(self) -> dict[tuple[str, int], int]:
        arrivals = {(n, b): -1 for n in (*self.sources, *self.targets) for b in self._held_before(n)}
        moves = [(t.step, t.dst, t.block) for t in self.transfers]
        moves += [(x.step, x.node, x.block) for x in self.local_loads]
        for step, node, block in sorted(moves, reverse=True):  # the earliest arrival wins
            arrivals[(node, block)] = min(step, arrivals.get((node, block), step))
        return arrivals

    def arrival_step(self, node: str, block: int) -> int | None:
        """The step after which ``node`` holds ``block``: -1 for sources (held before step 0),
        None if it never arrives. Raises PlanError for a node or block not in the plan."""
        if node not in self.sources and node not in self.targets:
            raise PlanError(f"node {node!r} is not in the plan")
        if not 0 <= block < self.num_blocks:
            raise PlanError(f"block {block} is not in 0..{self.num_blocks - 1}")
        return self._arrivals.get((node, block))

    def holdings_after(self, step: int) -> dict[str, frozenset[int]]:
        """Every node's blocks after ``step`` (step -1: before the plan starts). A new dict."""
        held: dict[str, set[int]] = {n: set() for n in (*self.sources, *self.targets)}
        for (node, block), at in self._arrivals.items():
            if at <= step and node in held:
                held[node].add(block)
        return {n: frozenset(b) for n, b in held.items()}

    def first_complete_union_step(self) -> int | None:
        """The first step after which the targets together hold every block; None if never or
        there are no targets."""
        first: dict[int, int] = {}
        for (node, block), at in self._arrivals.items():
            if node in self.targets:
                first[block] = min(first.get(block, at), at)
        if not self.targets or len(first) < self.num_blocks:
            return None
        return max(first.values())

    def validate(self) -> None:
        """Raise PlanError naming the step and node of the first broken rule; return None if the
        plan keeps the step model and leaves every target with every block exactly once."""
        _check_nodes(self.sources, self.targets)
        check_num_blocks(self.num_blocks)
        nodes = set(self.sources) | set(self.targets)
        strangers = sorted(set(self.initial) - nodes)
        if strangers:
            raise PlanError(f"initial holdings of nodes not in the plan: {strangers}")
        held = {n: dict.fromkeys(self._held_before(n), -1) for n in nodes}
        by_step = itertools.groupby(sorted(
            [(t.step, 0, t) for t in self.transfers] + [(x.step, 1, x) for x in self.local_loads],
            key=lambda e: (e[0], e[1])), key=lambda e: e[0])
        for step, entries in by_step:
            arrived: list[tuple[str, int]] = []
            senders: set[str] = set()
            receivers: set[str] = set()
            loaders: set[str] = set()
            for _, _, move in entries:
                if step < 0:
                    raise PlanError(f"step {step}: negative step in {move}")
                if not 0 <= move.block < self.num_blocks:
                    raise PlanError(f"step {step}: block {move.block} is not in "
                                    f"0..{self.num_blocks - 1} ({move})")
                if isinstance(move, LocalLoad):
                    if move.node not in self.targets:
                        raise PlanError(f"step {step}: local load by {move.node!r}, not a target")
                    if move.node in loaders:
                        raise PlanError(f"step {step}: node {move.node!r} loads more than one "
                                        "block locally")
                    loaders.add(move.node)
                    arrived.append((move.node, move.block))
                    continue
                src, dst = move.src, move.dst
                if src not in nodes or dst not in self.targets or src == dst:
                    raise PlanError(f"step {step}: {src!r} -> {dst!r} is not a transfer from a "
                                    "plan node to another node that is a target")
                if held[src].get(move.block, step) >= step:
                    raise PlanError(f"step {step}: node {src!r} sends block {move.block} "
                                    "it does not hold yet")
                if src in senders and src not in self.unlimited_senders:
                    raise PlanError(f"step {step}: node {src!r} sends more than one block")
                if dst in receivers:
                    raise PlanError(f"step {step}: node {dst!r} receives more than one block")
                senders.add(src)
                receivers.add(dst)
                arrived.append((dst, move.block))
            for node, block in arrived:
                if block in held[node]:
                    raise PlanError(f"step {step}: target {node!r} receives block {block} twice "
                                    f"(it arrived at step {held[node][block]})")
                held[node][block] = step
        for node in self.targets:
            missing = sorted(set(range(self.num_blocks)) - set(held[node]))
            if missing:
                raise PlanError(f"target {node!r} ends without blocks {missing}")


def rotated(num_blocks: int, start: int) -> tuple[int, ...]:
    """Blocks ``start, start+1, ..., b-1, 0, ..., start-1``."""
    return tuple((start + i) % num_blocks for i in range(num_blocks))


def binomial_pipeline(source: str, targets: Sequence[str], num_blocks: int,
                      block_order: Sequence[int] | None = None) -> MulticastPlan:
    """RDMC's binomial pipeline from ``source`` to ``targets``: b + ceil(log2 n) - 1 steps.

    The source injects blocks in ``block_order`` (default 0..b-1), position p at step p, so the
    targets together hold the first p+1 blocks of the order after step p. n = 2^l nodes form an
    l-cube; otherwise the first n - 2^l cube vertices are shared by two twin nodes and one extra
    step lets the twins swap their last blocks (see ``_unfold_twins``). Zero targets: an empty
    plan. Raises PlanError for num_blocks < 1, repeated names or a block_order that is not a
    permutation of 0..b-1.
    """
    targets = tuple(targets)
    _check_nodes((source,), targets)
    check_num_blocks(num_blocks)
    order = _check_order(block_order, num_blocks)
    if not targets:
        return MulticastPlan("binomial", (source,), (), num_blocks)
    dim = (1 + len(targets)).bit_length() - 1  # floor(log2 n)
    num_vertices = 1 << dim
    members = [(source,)] + [(t,) for t in targets[:num_vertices - 1]]
    for i, twin in enumerate(targets[num_vertices - 1:]):
        members[1 + i] += (twin,)
    moves = _unfold_twins(members, _hypercube(dim, num_blocks))
    return MulticastPlan("binomial", (source,), targets, num_blocks,
                         tuple(Transfer(s, a, b, order[p]) for s, a, b, p in moves))


def _hypercube_position(u: int, step: int, dim: int) -> int:
    """The position vertex ``u`` (not 0) receives from ``u ^ 2^(step mod dim)`` at ``step`` in the
    endless pipeline; negative means nothing yet. Bit d = step mod dim of u clear: position
    step - dim. Set: step - dim + g, g in 1..dim the cyclic distance to u's next set bit.

    Why it works: position k reaches a u with bit (k mod dim) clear at step k + dim, else at
    k + dim - (distance from u's previous set bit to bit k mod dim) — every position once. The
    sender holds it earlier: its set bits are u's minus bit d, so its gaps are no shorter.
    """
    d = step % dim
    if not u >> d & 1:
        return step - dim
    gap = next(g for g in range(1, dim + 1) if u >> (d + g) % dim & 1)
    return step - dim + gap


def _hypercube(dim: int, num_blocks: int) -> list[list[tuple[int, int, int]]]:
    """Per step, the (from_vertex, to_vertex, position) moves on the 2^dim-cube: b + dim - 1 steps.

    The endless pipeline would deliver the last position b-1 to vertices whose bit (b-1) mod dim
    is clear only at step b-1+dim. Instead, each slot that would carry a position past the end
    carries b-1 when its sender holds it and its receiver does not: from step b-1 the holders of
    b-1 are the subcube spanned by the dimensions used since, which doubles every step, so all
    2^dim vertices hold it after step b + dim - 2. Other such slots stay idle.
    """
    last = num_blocks - 1
    holds_last = {0}
    steps: list[list[tuple[int, int, int]]] = []
    for step in range(num_blocks + dim - 1):
        moves = []
        for u in range(1, 1 << dim):
            w = u ^ 1 << step % dim
            pos = _hypercube_position(u, step, dim)
            if pos < 0 or (pos > last and (w not in holds_last or u in holds_last)):
                continue
            moves.append((w, u, min(pos, last)))
        holds_last.update(u for _, u, p in moves if p == last)
        steps.append(moves)
    return steps


def _unfold_twins(members: list[tuple[str, ...]],
                  cube: list[list[tuple[int, int, int]]]) -> list[tuple[int, str, str, int]]:
    """Cube moves to node moves (step, src, dst, position); vertices with two nodes share the work.

    For a twin vertex, each step one twin S sends the vertex's outgoing block (S holds it), the
    other twin R receives the incoming block, and R passes S the one block S lacks. Invariant:
    each twin lacks at most one block the vertex holds (S ends lacking only the new block; R
    keeps its old lack). So one step after the cube finishes, the twins swap and are complete:
    b + floor(log2 n) = b + ceil(log2 n) - 1 steps.
    """
    nodes = [n for group in members for n in group]
    held: dict[str, set[int]] = {n: set() for n in nodes}
    held[members[0][0]] = {p for moves in cube for _, _, p in moves}
    out: list[tuple[int, str, str, int]] = []
    for step in range(len(cube) + 1):
        moves = cube[step] if step < len(cube) else []
        incoming = {u: p for _, u, p in moves}
        outgoing = {w: p for w, _, p in moves}
        sender, receiver = {}, {}
        step_moves: list[tuple[int, str, str, int]] = []
        for v, group in enumerate(members):
            if len(group) == 1:
                sender[v] = receiver[v] = group[0]
                continue
            a, b = group
            union = held[a] | held[b]
            lacks = {n: union - held[n] for n in group}
            assert len(lacks[a]) <= 1 and len(lacks[b]) <= 1, (step, group, lacks)
            if v in outgoing:  # S must hold the outgoing block; if both do, the one lacking one
                s = a if outgoing[v] not in held[b] or (lacks[a] and outgoing[v] in held[a]) else b
            else:  # the complete twin receives the new block, so it keeps lacking nothing
                s = b if not lacks[a] else a
            r = b if s == a else a
            sender[v], receiver[v] = s, r
            step_moves += [(step, r, s, p) for p in lacks[s]]
            if v not in outgoing and v not in incoming:
                step_moves += [(step, s, r, p) for p in lacks[r]]
        step_moves += [(step, sender[w], receiver[u], p) for w, u, p in moves]
        for _, src, dst, p in step_moves:
            assert p in held[src] and p not in held[dst], (step, src, dst, p)
            held[dst].add(p)
        out += step_moves
    return out


def k_way(sources: Sequence[str], targets: Sequence[str], num_blocks: int,
          local: Iterable[str] = frozenset(), relay: str = "binomial") -> MulticastPlan:
    """PipeCast: one binomial pipeline per source, rotated so the targets soon hold every block.

    ``relay="chain"``: each group is a pipelined chain instead (same rotation), the plan for
    agents that cut through: a chain then delivers the model to all of its targets in about one
    unicast, where a binomial pipeline still pays a block per extra step.

    Targets in ``local`` load from their own tier, one block per step, the j-th of L starting at
    block j*b//L. The other targets are cut, in the given order, into G = min(K, their number)
    contiguous groups whose sizes differ by at most one; source k < G feeds group k, injecting
    blocks from k*b//G on (sources past G stay idle). Each group is complete after
    b + ceil(log2(group size + 1)) - 1 steps, and the network targets together hold every block
    after ceil(b/G) steps — optimal, since G sources send at most G blocks per step. Raises
    PlanError for no sources, repeated names, num_blocks < 1 or a ``local`` node not a target.
    """
    sources, targets, local = tuple(sources), tuple(targets), frozenset(local)
    _check_nodes(sources, targets)
    check_num_blocks(num_blocks)
    if not sources:
        raise PlanError("k_way needs at least one source")
    if relay not in ("binomial", "chain"):
        raise PlanError(f"relay is 'binomial' or 'chain', not {relay!r}")
    if not local <= set(targets):
        raise PlanError(f"local nodes {sorted(local - set(targets))} are not targets")
    network = [t for t in targets if t not in local]
    num_groups = min(len(sources), len(network))
    transfers: list[Transfer] = []
    begin = 0
    for k in range(num_groups):
        size = len(network) // num_groups + (k < len(network) % num_groups)
        order = rotated(num_blocks, k * num_blocks // num_groups)
        relayed = chain if relay == "chain" else binomial_pipeline
        transfers += relayed(sources[k], network[begin:begin + size], num_blocks,
                             order).transfers
        begin += size
    loaders = [t for t in targets if t in local]
    loads = [LocalLoad(step, node, block) for j, node in enumerate(loaders)
             for step, block in enumerate(rotated(num_blocks, j * num_blocks // len(loaders)))]
    name = f"pipecast-k{len(sources)}" + ("-chain" if relay == "chain" else "")
    return MulticastPlan(name, sources, targets, num_blocks, tuple(transfers), tuple(loads))


def chain(source: str, targets: Sequence[str], num_blocks: int,
          block_order: Sequence[int] | None = None) -> MulticastPlan:
    """Pipelined relay source -> t0 -> t1 -> ...: the i-th block of ``block_order`` (default
    0..b-1) reaches target j at step i + j, so b + n - 2 steps. With agents that cut through
    (blocks in pieces, each forwarded as it lands) a hop costs a piece, not a step: every target
    holds the model about one unicast after the start. Raises PlanError as
    ``binomial_pipeline``."""
    targets = _checked(source, targets, num_blocks)
    order = _check_order(block_order, num_blocks)
    path = (source, *targets)
    return MulticastPlan("chain", (source,), targets, num_blocks, tuple(
        Transfer(i + j, path[j], path[j + 1], order[i])
        for j in range(len(targets)) for i in range(num_blocks)))


def binary_tree(source: str, targets: Sequence[str], num_blocks: int) -> MulticastPlan:
    """FaaSNet-like: a binary tree in heap order (children of node i: 2i+1, 2i+2), every node
    sends each block to its left child, then its right child, one send per step, pipelined.

    A node that receives block i at step a + 2i sends it at a+2i+1 (left) and a+2i+2 (right), so
    a left edge costs 1 step and a right edge 2: a node whose path from the source costs c
    receives block i at step c - 1 + 2i. Steps: max c + 2(b-1). Raises PlanError as
    ``binomial_pipeline``.
    """
    targets = _checked(source, targets, num_blocks)
    nodes = (source, *targets)
    first = [-1] + [0] * len(targets)  # the step block 0 arrives; the source holds it before 0
    transfers = []
    for child in range(1, len(nodes)):
        parent, is_right = (child - 1) // 2, child % 2 == 0
        first[child] = first[parent] + 1 + is_right
        transfers += [Transfer(first[child] + 2 * i, nodes[parent], nodes[child], i)
                      for i in range(num_blocks)]
    return MulticastPlan("binary-tree", (source,), targets, num_blocks, tuple(transfers))


def naive(source: str, targets: Sequence[str], num_blocks: int) -> MulticastPlan:
    """The source sends every block to target 0, then to target 1, ...: b*(n-1) steps. Raises
    PlanError as ``binomial_pipeline``."""
    targets = _checked(source, targets, num_blocks)
    return MulticastPlan("naive", (source,), targets, num_blocks, tuple(
        Transfer(j * num_blocks + i, source, t, i)
        for j, t in enumerate(targets) for i in range(num_blocks)))


def naive_parallel(targets: Sequence[str], num_blocks: int, store: str = "store") -> MulticastPlan:
    """Every target pulls block i at step i from ``store``, which serves any number of targets
    per step (``unlimited_senders``): b steps. Raises PlanError as ``binomial_pipeline``."""
    targets = _checked(store, targets, num_blocks)
    return MulticastPlan("naive-parallel", (store,), targets, num_blocks, tuple(
        Transfer(i, store, t, i) for t in targets for i in range(num_blocks)),
        unlimited_senders=frozenset({store}))


def check_num_blocks(num_blocks: int) -> None:
    """Raise PlanError unless ``num_blocks`` is an integer >= 1."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise PlanError(f"num_blocks: must be an integer >= 1, got {num_blocks!r}")


def _check_nodes(sources: Sequence[str], targets: Sequence[str]) -> None:
    names = [*sources, *targets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PlanError(f"node names must be distinct across sources and targets: {repeated}")


def _check_order(block_order: Sequence[int] | None, num_blocks: int) -> tuple[int, ...]:
    if block_order is None:
        return tuple(range(num_blocks))
    if sorted(block_order) != list(range(num_blocks)):
        raise PlanError(f"block_order must be a permutation of 0..{num_blocks - 1}, "
                        f"got {list(block_order)}")
    return tuple(block_order)


def _checked(source: str, targets: Sequence[str], num_blocks: int) -> tuple[str, ...]:
    targets = tuple(targets)
    _check_nodes((source,), targets)
    check_num_blocks(num_blocks)
    return targets
