"""What one group of partial replicas can run as a pipeline, for ``pipeline_search``. Pure;
replicas are indices 0..n-1 in name order, so comparing tuples of indices compares names.

``Problem``: per replica and block, the held run through the block; per block, its holders and the
fewest stages from it if replicas could be reused (a lower bound). ``greedy_chain``: the seed's
pipeline of some free replicas: for each first stage, each next stage the free replica reaching
farthest, no backtracking; the one of fewest stages, then fewest blocks held (the others may serve
elsewhere).

``Tilings``: the minimal sets, those that tile while no proper subset does (an optimum uses only
those: a subset keeps the count and drops stages). A minimal set that tiles in some order also
tiles greedily in it (each stage to the end of its replica's held run), else a member would be
redundant. So a depth-first search over greedy tilings, states (members, next block) expanded once,
finds them all; it skips a member whose run starts at or before the previous stage's start (that
stage is then redundant) and parks a state whose remaining blocks need more stages than the limit
allows until the limit grows.

``balanced``: a set's best cuts: per greedy order of its members, a DP over (stage, first block)
minimizing the bottleneck; the previous layout of those members instead when it is as balanced.

What may run long spends from a ``Budget`` of steps, about 1 us each on one core (a tiling state
one per holder of its block, a cut DP four per (stage, first block)); ``OutOfBudget`` ends it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

Stages = tuple[tuple[int, int, int], ...]  # (replica index, first block, last block), in order


class OutOfBudget(Exception):
    """The search used its step budget: it returns the best packing offered so far."""


class Budget:
    """Steps left; ``spend`` raises OutOfBudget past zero."""

    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise OutOfBudget


def range_cost(block_cost: Sequence[float] | None, first: int, last: int) -> float:
    """The cost of blocks ``first..last``: the sum of ``block_cost`` (their count if None).
    fsum: the same range always costs the same float, so equal bottlenecks compare equal."""
    if block_cost is None:
        return float(last - first + 1)
    return math.fsum(block_cost[first:last + 1])


class Problem:
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
        # by_reach[p]: the holders of p, the farthest-reaching first (lowest index among equals).
        self.by_reach = [sorted(hs, key=lambda r, p=p: (-self.run_end[r][p], r))
                         for p, hs in enumerate(self.holders)]
        # min_stages[p]: fewest stages covering p..b-1 if replicas could be reused (a lower bound;
        # b+1: impossible). Jumping to the farthest reach is optimal, as in fewest_stages.
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


def bits(mask: int) -> list[int]:
    """The indices of the set bits, ascending (fast on sparse wide masks)."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def fewest_stages(problem: Problem, pos: int, usable: int) -> int:
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


def greedy_chain(problem: Problem, free: int, limit: int) -> tuple[int, ...] | None:
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


class Tilings:
    """The replica sets that tile greedily within ``allowed`` (each stage to the end of its
    replica's held run): a depth-first search over states (members, next block), each expanded
    once, those past the stage limit parked until a call with a larger one."""

    def __init__(self, problem: Problem, allowed: int) -> None:
        self.problem, self.allowed = problem, allowed
        self.found: dict[int, tuple[int, ...]] = {}  # set -> the first order seen
        self.seen: set[tuple[int, int]] = set()  # states expanded, or dead ends
        # Parked states: (members, next block) -> (previous stage's start, order).
        self.parked: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {(0, 0): (-1, ())}

    def minimal(self, limit: int, budget: Budget) -> list[int]:
        """Every minimal set (bitmask) within ``allowed`` that tiles in <= ``limit`` stages, by
        size then mask; states parked at a smaller limit resume."""
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
            for r in bits(m):
                holding[r] |= 1 << len(minimal)
            minimal.append(m)
        return minimal

    def enter(self, pos: int, prev_start: int, mask: int, order: tuple[int, ...], limit: int,
              budget: Budget) -> None:
        """Expand the state (members ``mask`` in ``order``, next block ``pos``) once, unless the
        blocks left need more stages than ``limit`` allows: then it is parked. Every minimal set is
        still reached (a continuation cut on one visit but not another makes it non-minimal)."""
        problem, state = self.problem, (mask, pos)
        if state in self.seen or state in self.parked:
            return
        # Fewest stages left: the table (replicas reusable) first, then only the unused ones.
        fewest = problem.min_stages[pos]
        if fewest <= problem.num_blocks and limit - mask.bit_count() - fewest < 2:
            budget.spend(fewest)
            fewest = fewest_stages(problem, pos, self.allowed & ~mask)
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


def _cut(problem: Problem, order: tuple[int, ...], budget: Budget | None
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
class Candidate:
    """One pipeline: its stages, bottleneck, and whether it is a previous layout kept."""

    stages: Stages
    bottleneck: float
    kept: bool

    @property
    def replicas(self) -> tuple[int, ...]:
        return tuple(r for r, _, _ in self.stages)


def balanced(problem: Problem, mask: int, previous: Mapping[int, Stages],
             budget: Budget | None) -> Candidate:
    """``balanced_over`` every greedy order of exactly the members of ``mask``, which are all the
    orders a minimal set tiles in (in any other, a member would be redundant). Suffixes of orders
    are memoized per (next block, previous start, members)."""
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

    return balanced_over(problem, mask, suffixes(0, -1, 0), previous, budget)


def balanced_over(problem: Problem, mask: int, orders: Iterable[tuple[int, ...]],
                  previous: Mapping[int, Stages], budget: Budget | None) -> Candidate:
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
        return Candidate(kept, best[0], True)
    return Candidate(best[2], best[0], False)
