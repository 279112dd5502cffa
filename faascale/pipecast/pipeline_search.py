"""The search behind ``pipelines.form_pipelines``. Pure; replicas are indices 0..n-1 in name order,
so comparing tuples of indices compares names.

One depth-first branch-and-bound over packings of partial replicas into pipelines. Its key, smaller
better, is rules b-f of ``pipelines``: ``(-pipelines, stages, bottlenecks worst first, -kept,
sorted replica tuples)``. The key is strictly separable (adding the same disjoint pipelines to two
packings keeps their order), so a partial packing plus an optimistic rest bounds every packing below
it. Every node is itself a valid packing and is offered as the incumbent; when the step budget runs
out the search returns the best one offered (``exact`` False), otherwise it has proved it optimal.

The tree. A *lazy* node holds the pipelines chosen so far and the free replicas F. Its first child
takes F's *chain* — from block 0, each stage the free replica reaching farthest (the lowest index
among equals), no backtracking, O(n * b) — as one more pipeline, in another lazy node; its second
child searches every other packing of F: a set packing over the minimal sets that tile within F,
the chain excluded. The leftmost path is so the greedy seed (chains until none tiles), reached
before any budgeted step, and the second children run from the deepest up: a short budget improves
the seed's tail first, a sufficient one proves the optimum. Both children are the same partition
(with the chain, without it), so nothing is searched twice.

Minimal sets. An optimum uses only sets that tile while no proper subset does (a subset keeps the
count and drops stages). A minimal set that tiles in some order also tiles greedily in it (each stage
to the end of its replica's held run), else a member would be redundant. So a depth-first search
over greedy tilings within F, states (members, next block) expanded once, finds them all; it skips a
member whose run starts at or before the previous stage's start (that stage is then redundant) and
cuts a state whose remaining blocks need more stages than the limit allows (farthest-reach bound).
Each set's cuts: per greedy order of its members, a DP over (stage, first block) minimizing the
bottleneck; the previous layout of the same members instead when it is as balanced (rule e).

Packing (set packing, NP-hard in general). Branch on the live replica in fewest sets: it joins each
of them, best first (fewest stages, bottleneck, kept, names), or stays idle. At most k more
pipelines: every one needs its own replica holding each block; x disjoint sets of the smallest size
m plus larger ones fit in the live replicas, k <= (live + x) / (m + 1); and a memo of groups of sets
proved to hold no more (exact: a packing with more pipelines than the incumbent is never cut). The
optimistic rest is k pipelines of the fewest stages, the smallest bottlenecks, kept layouts and
names among the sets left; a node whose optimistic key is not below the incumbent's is cut.

Budget: steps, about 1 us each on one core (a packing node costs 10, a greedy-tiling state one per
replica examined, a cut DP four per (stage, first block) state). Counting steps, not seconds, keeps
answers independent of the machine. At 16 replicas x 64 blocks ``STEPS`` (see pipelines) allows
50-100 ms: PipeCast's cyclic holdings (prefixes of rotated block orders) are proved in 5-40 ms;
uniformly scattered holdings (each block held with probability 0.5-0.95) use the whole budget, their
minimal sets being too many to list, and return the seed with its tail improved.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

Stages = tuple[tuple[int, int, int], ...]  # (replica index, first block, last block), in order

_NODE_STEPS = 10  # steps per packing node: its bounds, branching choice and offer (~10 us)


class _OutOfBudget(Exception):
    """The search used its step budget: it returns the best packing offered so far."""


class _Budget:
    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise _OutOfBudget


def range_cost(block_cost: Sequence[float] | None, first: int, last: int) -> float:
    """The cost of blocks ``first..last``: the sum of ``block_cost`` (their count if None).
    fsum: the same range always costs the same float, so equal bottlenecks compare equal."""
    if block_cost is None:
        return float(last - first + 1)
    return math.fsum(block_cost[first:last + 1])


def search(held: Sequence[frozenset[int]], num_blocks: int, block_cost: Sequence[float] | None,
           limit: int, previous: Mapping[int, Stages], steps: int) -> tuple[list[Stages], bool]:
    """The best packing of replicas ``held[i]`` (each partial, indices valid) into pipelines of at
    most ``limit`` stages, and whether it is proved optimal (False: ``steps`` ran out first, and it
    is the best found, never worse than the greedy seed). ``previous`` maps a member bitmask to the
    layout to keep for those members when it is as balanced. Each pipeline: its stages in order."""
    run = _Search(_Problem(held, num_blocks, block_cost), limit, previous, _Budget(steps))
    try:
        run.lazy((1 << len(held)) - 1, _EMPTY)  # rules b-c
        run.full = True
        run.lazy((1 << len(held)) - 1, _EMPTY)  # rules d-f, among the packings as good
        return [run.describe(mask).stages for mask in run.best.masks], True
    except _OutOfBudget:
        return [run.layout(mask) for mask in run.best.masks], False


# --- the problem's tables ---------------------------------------------------------------------

class _Problem:
    """Per replica and block: the held run through the block; per block: its holders."""

    def __init__(self, held: Sequence[frozenset[int]], num_blocks: int,
                 block_cost: Sequence[float] | None) -> None:
        b = self.num_blocks = num_blocks
        self.num_replicas = len(held)
        self.run_start: list[list[int]] = []  # [r][p]: first block of r's held run through p, or b
        self.run_end: list[list[int]] = []    # [r][p]: last block of that run, or -1
        for blocks in held:
            start, end = [b] * b, [-1] * b
            for p in range(b):
                if p in blocks:
                    start[p] = start[p - 1] if p and p - 1 in blocks else p
            for p in reversed(range(b)):
                if p in blocks:
                    end[p] = end[p + 1] if p + 1 < b and p + 1 in blocks else p
            self.run_start.append(start)
            self.run_end.append(end)
        self.num_held = [len(blocks) for blocks in held]
        self.holders = [[r for r in range(len(held)) if self.run_end[r][p] >= 0] for p in range(b)]
        self.holder_masks = _minimal_masks(sum(1 << r for r in hs) for hs in self.holders)
        # by_reach[p]: the holders of p, the farthest-reaching first (the lowest index among equals).
        self.by_reach = [sorted(hs, key=lambda r, p=p: (-self.run_end[r][p], r))
                         for p, hs in enumerate(self.holders)]
        # min_stages[p]: fewest stages covering p..b-1 if replicas could be reused (a lower bound;
        # b+1: impossible). Jumping to the farthest reach is optimal, as in _fewest_stages.
        self.min_stages = [b + 1] * b + [0]
        for p in reversed(range(b)):
            if self.by_reach[p]:
                reach = self.run_end[self.by_reach[p][0]][p]
                self.min_stages[p] = min(b + 1, 1 + self.min_stages[reach + 1])
        self.cost: Callable[[int, int], float] = lru_cache(maxsize=None)(
            lambda first, last: range_cost(block_cost, first, last))


def _minimal_masks(masks: Iterable[int]) -> list[int]:
    """Distinct masks without supersets: a superset never gives a tighter per-block bound."""
    out: list[int] = []
    for m in sorted(set(masks), key=lambda m: (m.bit_count(), m)):
        if not any(o & m == o for o in out):
            out.append(m)
    return out


def _bits(mask: int) -> list[int]:
    """The indices of the set bits, ascending (fast on sparse wide masks)."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _fewest_stages(problem: _Problem, pos: int, usable: int) -> int:
    """Fewest stages tiling ``pos..b-1`` with replicas in ``usable``, each usable more than once: a
    lower bound for the distinct-replica problem. Jumping to the farthest reach is optimal here (a
    replica reaching past an earlier stop also holds the farther start). b+1 when impossible."""
    b, run_end, by_reach = problem.num_blocks, problem.run_end, problem.by_reach
    count = 0
    while pos < b:
        r = next((r for r in by_reach[pos] if usable >> r & 1), None)
        if r is None:
            return b + 1
        pos, count = run_end[r][pos] + 1, count + 1
    return count


# --- pipelines: the greedy chain, minimal sets, the best cuts of one set ----------------------

def _chain(problem: _Problem, free: int, limit: int) -> tuple[int, ...] | None:
    """The greedy pipeline of ``free``: for each first stage, each next stage the free replica
    reaching farthest (the lowest index among equals), no backtracking; the one of fewest stages,
    then holding the fewest blocks (the others may serve elsewhere), then reaching farthest first;
    None when each stalls or needs more than ``limit``. O(n^2 * b)."""
    best: tuple[tuple[int, int], tuple[int, ...]] | None = None
    for head in problem.by_reach[0]:
        order, left = [head], free & ~(1 << head)
        pos = problem.run_end[head][0] + 1 if free >> head & 1 else -1
        while 0 <= pos < problem.num_blocks and len(order) < limit:
            r = next((r for r in problem.by_reach[pos] if left >> r & 1), None)
            if r is None:
                break
            order.append(r)
            left &= ~(1 << r)
            pos = problem.run_end[r][pos] + 1
        rank = (len(order), sum(problem.num_held[r] for r in order))
        if pos == problem.num_blocks and (best is None or rank < best[0]):
            best = (rank, tuple(order))
    return None if best is None else best[1]


class _Tilings:
    """The replica sets that tile greedily within ``allowed`` (each stage to the end of its
    replica's held run): a depth-first search over states (members, next block), each expanded
    once, those past the stage limit parked until a call with a larger one."""

    def __init__(self, problem: _Problem, allowed: int) -> None:
        self.problem, self.allowed = problem, allowed
        self.found: dict[int, tuple[int, ...]] = {}  # set -> the first order seen
        self.seen: set[tuple[int, int]] = set()  # states expanded, or dead ends
        # Parked states: (members, next block) -> (previous stage's start, order).
        self.parked: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {(0, 0): (-1, ())}

    def minimal(self, limit: int, budget: _Budget) -> list[int]:
        """Every minimal set (bitmask) that tiles in <= ``limit`` stages, by size then mask."""
        parked, self.parked = self.parked, {}
        for (mask, pos), (prev_start, order) in parked.items():
            self.enter(pos, prev_start, mask, order, limit, budget)
        minimal: list[int] = []
        holding = [0] * self.problem.num_replicas  # [r]: the minimal sets (by index) holding r
        for m in sorted((m for m in self.found if m.bit_count() <= limit),
                        key=lambda m: (m.bit_count(), m)):
            budget.spend(2)
            outside = 0  # the sets with a replica outside m: all others lie inside m
            for r, sets in enumerate(holding):
                if not m >> r & 1:
                    outside |= sets
            if ((1 << len(minimal)) - 1) & ~outside:
                continue  # a smaller set inside m already tiles
            for r in _bits(m):
                holding[r] |= 1 << len(minimal)
            minimal.append(m)
        return minimal

    def enter(self, pos: int, prev_start: int, mask: int, order: tuple[int, ...], limit: int,
              budget: _Budget) -> None:
        """Expand the state (members ``mask`` in ``order``, next block ``pos``) once, unless its blocks left
        need more stages than ``limit`` allows: then it is parked. Every minimal set is still
        reached (a continuation cut on one visit but not another makes the set non-minimal)."""
        problem, state = self.problem, (mask, pos)
        if state in self.seen or state in self.parked:
            return
        # Fewest stages left: the table (replicas reusable) first, then only the unused ones.
        fewest = problem.min_stages[pos]
        if fewest <= problem.num_blocks and limit - mask.bit_count() - fewest < 2:
            budget.spend(fewest)
            fewest = _fewest_stages(problem, pos, self.allowed & ~mask)
        if fewest > problem.num_blocks:
            self.seen.add(state)  # a dead end at any limit
            return
        if mask.bit_count() + fewest > limit:
            self.parked[state] = (prev_start, order)
            return
        self.seen.add(state)
        budget.spend(len(problem.holders[pos]))
        for r in problem.holders[pos]:
            bit = 1 << r
            if mask & bit or not self.allowed & bit or problem.run_start[r][pos] <= prev_start:
                continue  # used, not allowed, or makes the previous stage redundant
            nxt = problem.run_end[r][pos] + 1
            if nxt == problem.num_blocks:
                self.found.setdefault(mask | bit, order + (r,))
            else:
                self.enter(nxt, pos, mask | bit, order + (r,), limit, budget)


def _cut(problem: _Problem, order: tuple[int, ...], budget: _Budget | None
         ) -> tuple[float, tuple[int, ...]]:
    """The stage ends minimizing the bottleneck for members in ``order`` (a greedy tiling; the
    earliest ends among equals). DP over (stage, first block), O(k * b * run): forward the
    reachable first blocks, backward the best bottleneck from each."""
    b, k, run_end, cost = problem.num_blocks, len(order), problem.run_end, problem.cost
    starts = [[0]]  # [i]: the first blocks stage i can have
    for here, nxt in itertools.pairwise(order):
        ends, next_ends = run_end[here], run_end[nxt]
        starts.append(sorted({e + 1 for pos in starts[-1]
                              for e in range(pos, min(ends[pos], b - 2) + 1)
                              if next_ends[e + 1] >= 0}))
    best: list[dict[int, tuple[float, int]]] = [{} for _ in order]
    best[-1] = {pos: (cost(pos, b - 1), b - 1) for pos in starts[-1]
                if run_end[order[-1]][pos] == b - 1}
    for i in reversed(range(k - 1)):
        after, ends = best[i + 1], run_end[order[i]]
        for pos in starts[i]:
            top, top_end = math.inf, -1
            for e in range(pos, min(ends[pos], b - 2) + 1):
                here = cost(pos, e)
                if here >= top:
                    break  # costs are >= 0: a longer stage cannot lower the bottleneck
                if e + 1 in after and max(here, after[e + 1][0]) < top:
                    top, top_end = max(here, after[e + 1][0]), e
            if top_end >= 0:
                best[i][pos] = (top, top_end)
    if budget is not None:
        budget.spend(sum(len(s) for s in starts) * 4)
    assert 0 in best[0], f"greedy tiling order {order} has no cut"
    stage_ends, pos = [], 0
    for i in range(k):
        stage_ends.append(best[i][pos][1])
        pos = stage_ends[-1] + 1
    return best[0][0][0], tuple(stage_ends)


@dataclass(frozen=True)
class _Candidate:
    """One pipeline: its stages, bottleneck, and whether it is a previous layout kept."""

    stages: Stages
    bottleneck: float
    kept: bool

    @property
    def replicas(self) -> tuple[int, ...]:
        return tuple(r for r, _, _ in self.stages)


def _balanced(problem: _Problem, mask: int, previous: Mapping[int, Stages],
              budget: _Budget | None) -> _Candidate:
    """``_candidate`` over every greedy order of exactly the members of ``mask``: all the orders a
    minimal set tiles in (in any other, a member would be redundant). Suffixes are memoized per
    (next block, previous start, members)."""
    b, holders = problem.num_blocks, problem.holders
    run_start, run_end = problem.run_start, problem.run_end
    memo: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}

    def suffixes(pos: int, prev_start: int, used: int) -> list[tuple[int, ...]]:
        if (pos, prev_start, used) not in memo:
            if budget is not None:
                budget.spend(len(holders[pos]))
            out: list[tuple[int, ...]] = []
            for r in holders[pos]:
                if mask >> r & 1 and not used >> r & 1 and run_start[r][pos] > prev_start:
                    nxt, now = run_end[r][pos] + 1, used | 1 << r
                    if nxt == b and now == mask:
                        out.append((r,))
                    elif nxt < b and now != mask:
                        out.extend((r,) + t for t in suffixes(nxt, pos, now))
            memo[pos, prev_start, used] = out
        return memo[pos, prev_start, used]

    return _candidate(problem, mask, suffixes(0, -1, 0), previous, budget)


def _candidate(problem: _Problem, mask: int, orders: Iterable[tuple[int, ...]],
               previous: Mapping[int, Stages], budget: _Budget | None) -> _Candidate:
    """The most balanced layout of ``mask`` over ``orders`` (then replica names); the previous
    layout of the same members instead when it is as balanced (moving cuts is churn)."""
    best: tuple[float, tuple[int, ...], Stages] | None = None
    for order in orders:
        bottleneck, ends = _cut(problem, order, budget)
        if best is None or (bottleneck, order) < best[:2]:
            starts = (0,) + tuple(e + 1 for e in ends[:-1])
            best = (bottleneck, order, tuple(zip(order, starts, ends)))
    assert best is not None, f"replica set {mask:b} has no greedy tiling order"
    kept = previous.get(mask)
    if kept is not None and max(problem.cost(f, e) for _, f, e in kept) <= best[0]:
        return _Candidate(kept, best[0], True)
    return _Candidate(best[2], best[0], False)


# --- the search -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Packing:
    """Chosen pipelines as member bitmasks, and rules b-c of their key: ``(-pipelines, stages)``
    (the rest of the key needs each pipeline's cuts: ``_Search.key``)."""

    head: tuple[int, int]
    masks: tuple[int, ...]

    def plus(self, mask: int) -> _Packing:
        return _Packing((self.head[0] - 1, self.head[1] + mask.bit_count()), self.masks + (mask,))


_EMPTY = _Packing((0, 0), ())


class _Sets:
    """The minimal sets of one packing search, by size; a group of them is a bitset over their
    indices. ``most`` memoizes groups proved to hold no more than that many disjoint sets."""

    def __init__(self, masks: list[int], num_replicas: int) -> None:
        self.masks = sorted(masks, key=lambda m: (m.bit_count(), m))
        self.sizes = [m.bit_count() for m in self.masks]
        self.contains = [0] * num_replicas  # [r]: the sets holding replica r
        self.by_size: dict[int, int] = {}  # size -> the sets of that size
        for i, m in enumerate(self.masks):
            for r in _bits(m):
                self.contains[r] |= 1 << i
            self.by_size[self.sizes[i]] = self.by_size.get(self.sizes[i], 0) | 1 << i
        self.conflict = [0] * len(self.masks)  # [i]: the sets sharing a replica with set i
        for i, m in enumerate(self.masks):
            for r in _bits(m):
                self.conflict[i] |= self.contains[r]
        self.most: dict[int, int] = {}

    def live(self, cs: int) -> int:
        """The replicas in some set of ``cs``."""
        return sum(1 << r for r, sets in enumerate(self.contains) if sets & cs)

    def smallest(self, cs: int, live: int) -> tuple[int, int]:
        """(m, x): the fewest members of a set in ``cs``, and at most how many disjoint ones."""
        m = self.sizes[(cs & -cs).bit_length() - 1]
        return m, min(live.bit_count() // m, (cs & self.by_size[m]).bit_count())


class _Search:
    """The branch-and-bound; ``best`` is the incumbent, every node visited is offered to it."""

    def __init__(self, problem: _Problem, limit: int, previous: Mapping[int, Stages],
                 budget: _Budget) -> None:
        self.problem, self.limit, self.previous, self.budget = problem, limit, previous, budget
        self.described: dict[int, _Candidate] = {}
        self.orders: dict[int, tuple[int, ...]] = {}  # set -> an order it tiles in
        self.tilings: dict[int, _Tilings] = {}  # free replicas -> their tilings
        self.sets: dict[tuple[int, int], _Sets] = {}  # (free, most members) -> the minimal sets
        self.best, self.best_key = _EMPTY, (0, 0, (), 0, ())
        self.full = False  # False: rules b-c only (a tie is no improvement); True: the whole key

    def describe(self, mask: int) -> _Candidate:
        """The set's best layout over all its orders (budgeted, memoized)."""
        if mask not in self.described:
            self.described[mask] = _balanced(self.problem, mask, self.previous, self.budget)
        return self.described[mask]

    def layout(self, mask: int) -> Stages:
        """The set's best layout if described, else the best cuts of the order it was found in
        (unbudgeted: one cut DP)."""
        if mask in self.described:
            return self.described[mask].stages
        return _candidate(self.problem, mask, [self.orders[mask]], self.previous, None).stages

    def key(self, head: tuple[int, int], chosen: Iterable[_Candidate]) -> tuple:
        """The whole key (rules b-f) of pipelines ``chosen`` with rules b-c ``head``."""
        chosen = list(chosen)
        return (*head, tuple(sorted((c.bottleneck for c in chosen), reverse=True)),
                -sum(c.kept for c in chosen), tuple(sorted(c.replicas for c in chosen)))

    def offer(self, packing: _Packing) -> None:
        if packing.head < self.best.head:
            self.best, self.best_key = packing, None
        elif self.full and packing.head == self.best.head and packing.masks != self.best.masks:
            key = self.key(packing.head, (self.describe(m) for m in packing.masks))
            if key < self.incumbent_key():
                self.best, self.best_key = packing, key

    def incumbent_key(self) -> tuple:
        if self.best_key is None:
            self.best_key = self.key(self.best.head,
                                     (self.describe(m) for m in self.best.masks))
        return self.best_key

    def lazy(self, free: int, packing: _Packing) -> None:
        """Packings of ``free`` after ``packing``: with its chain (first, unbudgeted: the seed),
        then without it, over the minimal sets of at most ``size`` members for a growing size (the
        smallest sets are the cheapest to list and make the most pipelines) until no larger set
        can be in a packing that beats the incumbent."""
        self.offer(packing)
        order = _chain(self.problem, free, self.limit)
        chain = 0 if order is None else sum(1 << r for r in order)
        if order is not None:
            self.orders.setdefault(chain, order)
            self.lazy(free & ~chain, packing.plus(chain))
        size = _fewest_stages(self.problem, 0, free)
        while size <= self.largest_useful(free, packing):
            sets = self.minimal_sets(free, size, chain)
            if sets.by_size.get(size):  # packings of smaller sets only were searched before
                self.pack(sets, sets.by_size[size], (1 << len(sets.masks)) - 1, packing, False)
            size += 1

    def minimal_sets(self, free: int, size: int, chain: int) -> _Sets:
        """The minimal sets of at most ``size`` members within ``free`` but ``chain`` (memoized:
        the second pass and the memo of ``most`` reuse them)."""
        if (free, size) not in self.sets:
            tilings = self.tilings.setdefault(free, _Tilings(self.problem, free))
            masks = [m for m in tilings.minimal(size, self.budget) if m != chain]
            for m in masks:
                self.orders.setdefault(m, tilings.found[m])
            self.sets[free, size] = _Sets(masks, self.problem.num_replicas)
        return self.sets[free, size]

    def largest_useful(self, free: int, packing: _Packing) -> int:
        """The most members a set of ``free`` may have in a packing that beats the incumbent when
        added to ``packing`` (0: none beats it). With m the fewest stages any set needs and j the
        sets that tie the incumbent's count: j+1 sets, one of x members, fit in ``free`` (x <= free
        - j*m); or j sets, one of x, keep its stages (x <= stages left - (j-1)*m)."""
        m = _fewest_stages(self.problem, 0, free)
        k = min([free.bit_count() // m] + [(free & h).bit_count() for h in self.problem.holder_masks])
        tie = packing.head[0] - self.best.head[0]  # sets to add to tie the count
        if m > self.limit or k < tie or k == 0:
            return 0
        more = free.bit_count() - tie * m if k > tie else 0
        same = self.best.head[1] - packing.head[1] - (tie - 1) * m - (not self.full) if tie else 0
        return min(self.limit, max(more, same))

    def pack(self, sets: _Sets, new: int, cs: int, packing: _Packing, fresh: bool) -> None:
        """Packings of the sets in ``cs`` added to ``packing``, with at least one of the ``new``
        sets unless ``fresh`` (one is in ``packing``)."""
        self.budget.spend(_NODE_STEPS)
        self.offer(packing)
        live = sets.live(cs)
        k = self.most(sets, cs, live)
        if k == 0 or not (fresh or cs & new) or not self.promising(sets, cs, live, k, packing):
            return
        count_before = self.best.head[0]
        need = packing.head[0] - count_before  # pipelines to add to tie the incumbent's count
        r = min(_bits(live), key=lambda r: ((sets.contains[r] & cs).bit_count(), r))
        for i in _bits(cs & sets.contains[r]):
            self.pack(sets, new, cs & ~sets.conflict[i], packing.plus(sets.masks[i]),
                      fresh or bool(new >> i & 1))
        self.pack(sets, new, cs & ~sets.contains[r], packing, fresh)
        if self.best.head[0] == count_before:
            # No packing here has more than ``need``: it would beat the incumbent and be found
            # (one without a new set already was, in the search of the smaller sets).
            sets.most[cs] = need

    def most(self, sets: _Sets, cs: int, live: int) -> int:
        """At most this many disjoint sets in ``cs``."""
        if not cs:
            return 0
        m, x = sets.smallest(cs, live)
        return min([cs.bit_count(), (live.bit_count() + x) // (m + 1),
                    sets.most.get(cs, len(sets.masks))]
                   + [(live & h).bit_count() for h in self.problem.holder_masks])

    def promising(self, sets: _Sets, cs: int, live: int, k: int, packing: _Packing) -> bool:
        """True when ``packing`` plus k sets of ``cs`` might beat the incumbent: its optimistic key
        (k sets of the fewest stages; when that ties, the smallest bottlenecks, kept layouts and
        names among the sets that fit the stages left) is lower."""
        m, x = sets.smallest(cs, live)
        head = (packing.head[0] - k, packing.head[1] + m * k + max(0, k - x))
        if head != self.best.head or not self.full:
            return head < self.best.head
        fits = self.best.head[1] - packing.head[1] - (k - 1) * m  # members of one more set
        left = [self.describe(sets.masks[i]) for i in _bits(cs) if sets.sizes[i] <= fits]
        chosen = [self.describe(mask) for mask in packing.masks]
        bottlenecks = heapq.nsmallest(k, (c.bottleneck for c in left))
        return (*head, tuple(sorted([c.bottleneck for c in chosen] + bottlenecks, reverse=True)),
                -sum(c.kept for c in chosen) - min(k, sum(c.kept for c in left)),
                tuple(sorted([c.replicas for c in chosen]
                             + heapq.nsmallest(k, (c.replicas for c in left))))
                ) < self.incumbent_key()
