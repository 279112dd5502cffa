"""Temporary pipelines from partially loaded replicas (execute-while-load). Pure: holdings in,
layouts out; no I/O, no clock, no Ray, no torch.

A model is packed as ``b`` blocks. A replica holding every block is *full* and serves alone. Partial
replicas whose blocks together cover the model are chained: stage 1 runs blocks ``[0..i]``, stage 2
``[i+1..j]``, ..., the last stage ends at block ``b-1``; every stage holds its whole range, and a
replica is in at most one pipeline (rule a). Among valid packings ``form_pipelines`` returns the
best by, in order: (b) most pipelines; (c) fewest stages in total (each hop costs latency); (d) the
leximax of the pipelines' bottlenecks (a bottleneck is a pipeline's costliest stage, the sum of
``block_cost`` over its range; compare the worst pipeline first, then the next); (e) most pipelines
kept exactly from ``previous``; (f) the smallest sorted tuple of pipelines' replica names.

Algorithm (n partial replicas, b blocks, k stages in a pipeline, C candidate sets):

1. **Candidates.** An optimum uses only *minimal* replica sets, sets that tile the model while no
   proper subset does (a subset keeps the count and drops stages). A minimal set that tiles in some
   order also tiles greedily in it (each stage to the end of its replica's held run), else a member
   would be redundant. So a depth-first search over greedy tilings, states (members, next block)
   expanded once, finds them all. It skips a member whose run starts at or before the previous
   stage's start (that stage is then redundant) and cuts a state whose remaining blocks need more
   stages than the limit L allows (farthest-reach bound, over all replicas, then the unused ones).
   Supersets of smaller sets are dropped with per-replica bitsets. Worst case O(2^n * b) states.
2. **Cuts.** A candidate's orders (greedy tilings again, suffixes memoized; 1-4 in practice) each
   get a DP over (stage, first block) minimizing the bottleneck, O(k * b * run length). A still
   valid previous layout of the same members with an equal bottleneck is kept as it is (rule e).
3. **Packing** (set packing, NP-hard in general). Count and stages first, asked as decisions "k
   disjoint candidates within s stages?" from the upper bounds down: a memoized search over bitsets
   of candidates, branching on the replica in fewest of them. Bounds: every pipeline needs its own
   replica holding each block; x disjoint sets of the smallest size m (computed) plus larger ones
   fit in n replicas, so count <= (n + x) / (m + 1). Then rules d-f choose among the packings with
   exactly that count and stage total, the same search scored by the full key; that key is strictly
   separable (adding the same disjoint pipelines to two packings keeps their order), so memoizing
   is exact. Sets whose bottleneck exceeds a complete packing's worst are skipped. O(2^n * C).
4. **Deepening** on L, the largest set searched, from the fewest stages possible. A level's answer
   (K pipelines, S stages) is certified when no tiling was cut by L, or when every packing that
   could beat it fits under L: one with more pipelines has a set of at most n minus the K smallest
   set sizes, one with as many and no more stages at most S minus the K-1 smallest.

**Budget.** All of that counts steps (0.5-1 us each on one core). Past ``_STEPS`` (25-50 ms) the
search stops and returns a greedy: the last level's packing (the best of pipelines of <= L stages;
already optimal for rules b and c if only the tie-break ran out), then sets found so far, smallest
first, while disjoint, then farthest-reach chains of the replicas left. ``Pipelines.exact`` says
which. Counting steps, not seconds, keeps answers independent of the machine. At 16 replicas x 64
blocks (40 seeds each): cyclic holdings, PipeCast's pattern of prefixes of rotated block orders, are
exact in 39/40 and random runs in 40/40, 3-20 ms on average; uniformly scattered holdings (each
block held with probability 0.75-0.95) use the whole budget, and the greedy matched the exact count
and stages in 12 of 13 sampled cases. tests/test_pipecast_pipelines.py checks small cases against
brute force.
"""

from __future__ import annotations

import enum
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

# Exact-search steps before the greedy (one step: 0.5-1 us, measured per phase on one core). The
# brief's bound is 50 ms at 16 replicas x 64 blocks; 50 000 steps take 25-50 ms there.
_STEPS = 50_000
_STATE_COST, _OPTION_COST = 10, 3  # steps per packing memo state and per branch tried


class PipelineError(ValueError):
    """Bad input to pipeline forming: block counts, indices, costs, limits or a malformed layout."""


class _OutOfBudget(Exception):
    """The exact search used its step budget; the caller falls back to the greedy."""


@dataclass(frozen=True)
class Stage:
    """One replica running blocks ``first_block..last_block`` (inclusive) of a pipeline."""

    replica: str
    first_block: int
    last_block: int

    def __post_init__(self) -> None:
        if not isinstance(self.replica, str) or not self.replica:
            raise PipelineError(f"stage replica must be a non-empty string, got {self.replica!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool)
                   for i in (self.first_block, self.last_block)) \
                or not 0 <= self.first_block <= self.last_block:
            raise PipelineError(f"stage {self.replica}: need 0 <= first_block <= last_block, got "
                                f"{self.first_block}..{self.last_block}")

    @property
    def num_blocks(self) -> int:
        return self.last_block - self.first_block + 1

    def held_by(self, blocks: Collection[int]) -> bool:
        """True when ``blocks`` contains every block of this stage's range."""
        return all(i in blocks for i in range(self.first_block, self.last_block + 1))


@dataclass(frozen=True)
class PipelineLayout:
    """The stages of one temporary pipeline, in order: ``[(node, first_block, last_block), ...]``.

    Construction checks the shape: at least one stage, the first starts at block 0, each next one
    starts right after the previous ends, no replica twice. Raises PipelineError otherwise.
    Whether it covers a model of ``num_blocks``: ``covers``; whether replicas hold it: ``held_by``.
    """

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise PipelineError(f"a pipeline needs one or more Stage, got {self.stages!r}")
        if self.stages[0].first_block != 0:
            raise PipelineError(f"a pipeline starts at block 0, got {self.stages[0]}")
        for prev, nxt in itertools.pairwise(self.stages):
            if nxt.first_block != prev.last_block + 1:
                raise PipelineError(f"stages are not contiguous: {prev} then {nxt}")
        if len(set(self.replicas)) != len(self.stages):
            raise PipelineError(f"a replica appears twice in one pipeline: {self.replicas}")

    @classmethod
    def of(cls, *stages: tuple[str, int, int]) -> PipelineLayout:
        """``PipelineLayout.of(("a", 0, 1), ("b", 2, 3))``: the design's notation."""
        return cls(tuple(Stage(*s) for s in stages))

    @property
    def replicas(self) -> tuple[str, ...]:
        return tuple(s.replica for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def max_stage_blocks(self) -> int:
        return max(s.num_blocks for s in self.stages)

    def covers(self, num_blocks: int) -> bool:
        """True when the stages run exactly blocks ``0..num_blocks-1``."""
        return self.stages[-1].last_block == num_blocks - 1

    def held_by(self, holdings: Mapping[str, Collection[int]]) -> bool:
        """True when every stage's replica is in ``holdings`` and holds its whole range."""
        return all(s.replica in holdings and s.held_by(holdings[s.replica]) for s in self.stages)

    def stage_costs(self, block_cost: Sequence[float] | None = None) -> tuple[float, ...]:
        """Each stage's cost: the sum of ``block_cost`` over its range (its block count if None)."""
        return tuple(_range_cost(block_cost, s.first_block, s.last_block) for s in self.stages)

    def bottleneck(self, block_cost: Sequence[float] | None = None) -> float:
        """The costliest stage: it paces the pipeline's throughput."""
        return max(self.stage_costs(block_cost))


@dataclass(frozen=True)
class Pipelines:
    """Who serves how: ``full`` replicas serve alone (never a stage), ``pipelines`` chain partial
    replicas, ``idle`` partial replicas wait for blocks. Names are sorted; pipelines by replicas.
    ``exact`` is False when the search hit its budget and the packing is the greedy's."""

    full: tuple[str, ...] = ()
    pipelines: tuple[PipelineLayout, ...] = ()
    idle: tuple[str, ...] = ()
    exact: bool = True

    def pipeline_of(self, replica: str) -> PipelineLayout | None:
        """The pipeline ``replica`` is a stage of, or None."""
        return next((p for p in self.pipelines if replica in p.replicas), None)


class DissolveReason(enum.Enum):
    MEMBER_FULL = "member_full"        # a member holds every block now: it serves alone
    MEMBER_INVALID = "member_invalid"  # a member left or no longer holds its stage's blocks
    REPACKED = "repacked"              # still valid, but a better packing exists


@dataclass(frozen=True)
class Dissolved:
    layout: PipelineLayout
    reason: DissolveReason


@dataclass(frozen=True)
class PipelineChanges:
    """What ``reform`` changed. Requests in a dissolved pipeline resume elsewhere (caller's job)."""

    dissolved: tuple[Dissolved, ...] = ()
    formed: tuple[PipelineLayout, ...] = ()
    kept: tuple[PipelineLayout, ...] = ()
    became_full: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.dissolved or self.formed or self.became_full)


def form_pipelines(holdings: Mapping[str, Collection[int]], num_blocks: int, *,
                   block_cost: Sequence[float] | None = None,
                   previous: Sequence[PipelineLayout] = (),
                   max_stages: int | None = None) -> Pipelines:
    """The best packing of partial replicas into pipelines (rules a-f in the module docstring).

    ``holdings`` maps replica name -> block indices it holds; ``block_cost`` is each block's
    compute cost (default 1.0 each); ``previous`` are the pipelines in use (a preference only: they
    may be stale or invalid); ``max_stages`` caps stages per pipeline. Does not mutate its inputs.
    Raises PipelineError on num_blocks < 1, a block index outside 0..num_blocks-1, a cost list of
    the wrong length or with a negative or non-finite cost, or max_stages < 1.
    """
    held = _validate(holdings, num_blocks, block_cost, max_stages)
    full = tuple(sorted(r for r, blocks in held.items() if len(blocks) == num_blocks))
    partial = tuple(sorted(r for r, blocks in held.items() if 0 < len(blocks) < num_blocks))
    problem = _Problem(partial, held, num_blocks, block_cost)
    limit = len(partial) if max_stages is None else min(max_stages, len(partial))
    kept_by_members = {frozenset(p.replicas): p for p in previous
                       if p.covers(num_blocks) and set(p.replicas) <= set(partial)
                       and p.held_by(held)}
    chosen, exact = _solve(problem, limit, kept_by_members)
    used = {r for p in chosen for r in p.replicas}
    idle = tuple(sorted(r for r in held if r not in used and r not in full))
    return Pipelines(full, tuple(sorted(chosen, key=lambda p: p.replicas)), idle, exact)


def reform(current: Pipelines, holdings: Mapping[str, Collection[int]], num_blocks: int, *,
           block_cost: Sequence[float] | None = None,
           max_stages: int | None = None) -> tuple[Pipelines, PipelineChanges]:
    """Re-form pipelines as blocks arrive, preferring ``current``'s; report what changed.

    A current pipeline with a member now full is dissolved as MEMBER_FULL (its requests resume on
    full replicas), one with a member gone or missing blocks as MEMBER_INVALID, any other one not
    kept as REPACKED. Pure; raises PipelineError as ``form_pipelines``.
    """
    new = form_pipelines(holdings, num_blocks, block_cost=block_cost,
                         previous=current.pipelines, max_stages=max_stages)
    now_full, now = set(new.full), set(new.pipelines)
    dissolved = []
    for p in current.pipelines:
        if p in now:
            continue
        if now_full.intersection(p.replicas):
            reason = DissolveReason.MEMBER_FULL
        elif not p.held_by(holdings):
            reason = DissolveReason.MEMBER_INVALID
        else:
            reason = DissolveReason.REPACKED
        dissolved.append(Dissolved(p, reason))
    before = set(current.pipelines)
    changes = PipelineChanges(
        dissolved=tuple(dissolved),
        formed=tuple(p for p in new.pipelines if p not in before),
        kept=tuple(p for p in new.pipelines if p in before),
        became_full=tuple(sorted(now_full - set(current.full))))
    return new, changes


# --- validation and the problem's tables ------------------------------------------------------

def _validate(holdings: Mapping[str, Collection[int]], num_blocks: int,
              block_cost: Sequence[float] | None, max_stages: int | None
              ) -> dict[str, frozenset[int]]:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise PipelineError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    if max_stages is not None and (isinstance(max_stages, bool) or not isinstance(max_stages, int)
                                   or max_stages < 1):
        raise PipelineError(f"max_stages must be an integer >= 1 or None, got {max_stages!r}")
    if block_cost is not None:
        if len(block_cost) != num_blocks:
            raise PipelineError(f"block_cost has {len(block_cost)} entries for {num_blocks} blocks")
        for i, c in enumerate(block_cost):
            if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) \
                    or c < 0:
                raise PipelineError(f"block_cost[{i}] must be a finite number >= 0, got {c!r}")
    held: dict[str, frozenset[int]] = {}
    for replica, blocks in holdings.items():
        if not isinstance(replica, str) or not replica:
            raise PipelineError(f"replica names must be non-empty strings, got {replica!r}")
        try:
            indices = frozenset(operator.index(i) for i in blocks)
        except TypeError as e:
            raise PipelineError(f"{replica}: block indices must be integers ({e})") from None
        bad = sorted(i for i in indices if not 0 <= i < num_blocks)
        if bad:
            raise PipelineError(f"{replica}: block index {bad[0]} outside 0..{num_blocks - 1}")
        held[replica] = indices
    return held


def _range_cost(block_cost: Sequence[float] | None, first: int, last: int) -> float:
    # fsum: the same range always costs the same float, so equal bottlenecks compare equal.
    if block_cost is None:
        return float(last - first + 1)
    return math.fsum(block_cost[first:last + 1])


class _Problem:
    """Partial replicas as indices 0..n-1 (sorted names) and per-block run tables."""

    def __init__(self, names: tuple[str, ...], held: Mapping[str, frozenset[int]], num_blocks: int,
                 block_cost: Sequence[float] | None) -> None:
        self.names, self.num_blocks = names, num_blocks
        b = num_blocks
        self.run_start: list[list[int]] = []  # [r][p]: first block of r's held run through p, or b
        self.run_end: list[list[int]] = []    # [r][p]: last block of that run, or -1
        for name in names:
            start, end = [b] * b, [-1] * b
            blocks = held[name]
            for p in range(b):
                if p in blocks:
                    start[p] = start[p - 1] if p and p - 1 in blocks else p
            for p in reversed(range(b)):
                if p in blocks:
                    end[p] = end[p + 1] if p + 1 < b and p + 1 in blocks else p
            self.run_start.append(start)
            self.run_end.append(end)
        self.holders = [[r for r in range(len(names)) if self.run_end[r][p] >= 0] for p in range(b)]
        self.holder_masks = _minimal_masks(sum(1 << r for r in hs) for hs in self.holders)
        # min_stages[p]: fewest stages covering p..b-1 if replicas could be reused (a lower bound;
        # b+1: impossible). Jumping to the farthest reach is optimal, as in _fewest_stages.
        self.min_stages = [b + 1] * b + [0]
        for p in reversed(range(b)):
            reach = max((self.run_end[r][p] for r in self.holders[p]), default=-1)
            if reach >= 0:
                self.min_stages[p] = min(b + 1, 1 + self.min_stages[reach + 1])
        self.cost: Callable[[int, int], float] = lru_cache(maxsize=None)(
            lambda first, last: _range_cost(block_cost, first, last))


def _minimal_masks(masks: Iterable[int]) -> list[int]:
    """Distinct masks without supersets: a superset never gives a tighter per-block bound."""
    out: list[int] = []
    for m in sorted(set(masks), key=lambda m: (m.bit_count(), m)):
        if not any(o & m == o for o in out):
            out.append(m)
    return out


class _Budget:
    """Search steps left for the exact search; ``spend`` raises _OutOfBudget past zero."""

    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise _OutOfBudget


def _bits(mask: int) -> list[int]:
    """The indices of the set bits, ascending (fast on sparse wide masks)."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


# --- step 1: minimal candidate sets ------------------------------------------------------------

def _fewest_stages(problem: _Problem, pos: int, usable: int) -> int:
    """Fewest stages tiling ``pos..b-1`` with replicas in ``usable``, each usable more than once: a
    lower bound for the distinct-replica problem. Jumping to the farthest reach is optimal here (a
    replica reaching past an earlier stop also holds the farther start). b+1 when impossible."""
    b, run_end, holders = problem.num_blocks, problem.run_end, problem.holders
    count = 0
    while pos < b:
        reach = max((run_end[r][pos] for r in holders[pos] if usable >> r & 1), default=-1)
        if reach < 0:
            return b + 1
        pos, count = reach + 1, count + 1
    return count


def _greedy_paths(problem: _Problem, allowed: int, limit: int, budget: _Budget,
                  on_path: Callable[[int, tuple[int, ...]], object]) -> bool:
    """Depth-first over greedy tilings (each stage runs to the end of its replica's held run) by
    replicas in ``allowed`` with <= ``limit`` stages; calls ``on_path(mask, order)`` for each.
    Returns False when ``limit`` cut some path (a longer tiling may exist), else True.

    A state (members, next block) is expanded once: every *minimal* member set is still reached
    (a continuation pruned on one visit but not another makes the set non-minimal), but not every
    order. Spends a budget step per replica examined.
    """
    b, seen = problem.num_blocks, set()
    min_stages, holders = problem.min_stages, problem.holders
    run_start, run_end = problem.run_start, problem.run_end
    complete = True

    def visit(pos: int, prev_start: int, mask: int, order: tuple[int, ...]) -> None:
        nonlocal complete
        budget.spend(len(holders[pos]))
        for r in holders[pos]:
            bit = 1 << r
            if mask & bit or not allowed & bit or run_start[r][pos] <= prev_start:
                continue  # used, not allowed, or makes the previous stage redundant
            nxt, m = run_end[r][pos] + 1, mask | bit
            if nxt == b:
                on_path(m, order + (r,))
                continue
            slack = limit - len(order) - 1 - min_stages[nxt]
            if slack < 0:
                complete = complete and min_stages[nxt] > b  # a dead end cuts nothing
                continue
            if (m, nxt) in seen:
                continue
            seen.add((m, nxt))
            if slack < 2:
                fewest = _fewest_stages(problem, nxt, allowed & ~m)
                budget.spend(min(fewest, limit))
                if limit - len(order) - 1 < fewest:
                    complete = complete and fewest > b  # cut by the limit, or a dead end
                    continue
            visit(nxt, pos, m, order + (r,))

    if min_stages[0] > limit:
        return min_stages[0] > b
    visit(0, -1, 0, ())
    return complete


def _minimal_sets(problem: _Problem, limit: int, budget: _Budget,
                  found: dict[int, tuple[int, ...]]) -> tuple[list[int], bool]:
    """Every minimal replica set (bitmask) that tiles the model in <= limit stages, by size then
    mask, and whether those are all of them (no longer tiling was cut off). Adds to ``found`` (set
    -> first order seen) as it goes, so a caller catching _OutOfBudget keeps what was found."""
    complete = _greedy_paths(problem, (1 << len(problem.names)) - 1, limit, budget,
                             lambda m, order: found.setdefault(m, order))
    minimal: list[int] = []
    holding = [0] * len(problem.names)  # [r]: bitset of the minimal sets (by index) holding r
    for m in sorted((m for m in found if m.bit_count() <= limit),
                    key=lambda m: (m.bit_count(), m)):
        budget.spend()
        outside = 0  # the sets with a replica outside m: all others lie inside m
        for r, sets in enumerate(holding):
            if not m >> r & 1:
                outside |= sets
        if ((1 << len(minimal)) - 1) & ~outside:
            continue  # a smaller set inside m already tiles
        for r in _bits(m):
            holding[r] |= 1 << len(minimal)
        minimal.append(m)
    return minimal, complete


# --- step 2: the best cuts of one set ----------------------------------------------------------

def _cut(problem: _Problem, order: tuple[int, ...], budget: _Budget | None = None
         ) -> tuple[float, tuple[int, ...]] | None:
    """The stage ends minimizing the bottleneck for members in ``order`` (earliest ends among
    equals), or None when the order cannot tile. DP over (stage, first block), O(k * b * run):
    forward the reachable first blocks, backward the best bottleneck from each."""
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
    if 0 not in best[0]:
        return None
    stage_ends, pos = [], 0
    for i in range(k):
        stage_ends.append(best[i][pos][1])
        pos = stage_ends[-1] + 1
    return best[0][0][0], tuple(stage_ends)


@dataclass(frozen=True)
class _Candidate:
    mask: int
    layout: PipelineLayout
    bottleneck: float
    kept: bool


def _candidate(problem: _Problem, mask: int, orders: Iterable[tuple[int, ...]],
               kept_by_members: Mapping[frozenset[str], PipelineLayout],
               budget: _Budget | None = None) -> _Candidate:
    """The most balanced layout of ``mask`` over ``orders`` (then replica names); the previous
    layout of the same members instead when it is as balanced (moving cuts is churn)."""
    best: tuple[float, tuple[str, ...], PipelineLayout] | None = None
    for order in orders:
        cut = _cut(problem, order, budget)
        assert cut is not None, "a greedy tiling order always has a cut"
        starts = (0,) + tuple(e + 1 for e in cut[1][:-1])
        layout = PipelineLayout(tuple(Stage(problem.names[r], s, e)
                                      for r, s, e in zip(order, starts, cut[1])))
        if best is None or (cut[0], layout.replicas) < best[:2]:
            best = (cut[0], layout.replicas, layout)
    assert best is not None, f"replica set {mask:b} has no tiling order"
    previous = kept_by_members.get(frozenset(best[2].replicas))
    if previous is not None and max(problem.cost(s.first_block, s.last_block)
                                    for s in previous.stages) <= best[0]:
        return _Candidate(mask, previous, best[0], True)
    return _Candidate(mask, best[2], best[0], False)


def _balanced(problem: _Problem, mask: int, budget: _Budget,
              kept_by_members: Mapping[frozenset[str], PipelineLayout]) -> _Candidate:
    """``_candidate`` over every order that tiles with exactly the members of minimal set ``mask``.
    A minimal set tiles in an order only if its greedy tiling in that order does (else a member
    would be redundant), so greedy orders are all of them; suffixes are memoized per state."""
    b, holders = problem.num_blocks, problem.holders
    run_start, run_end = problem.run_start, problem.run_end
    memo: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}

    def suffixes(pos: int, prev_start: int, used: int) -> list[tuple[int, ...]]:
        if (pos, prev_start, used) not in memo:
            budget.spend(len(holders[pos]))
            out: list[tuple[int, ...]] = []
            for r in holders[pos]:
                if mask >> r & 1 and not used >> r & 1 and run_start[r][pos] > prev_start:
                    nxt, now = run_end[r][pos] + 1, used | 1 << r
                    if nxt == b and now == mask:
                        out.append((r,))
                    elif nxt < b and now != mask:
                        tails = suffixes(nxt, pos, now)
                        budget.spend(len(tails))
                        out.extend((r,) + t for t in tails)
            memo[pos, prev_start, used] = out
        return memo[pos, prev_start, used]

    return _candidate(problem, mask, suffixes(0, -1, 0), kept_by_members, budget)


# --- step 3: packing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Packing:
    """A packing and its score; a smaller ``score`` is better (rules b-f, strictly separable)."""

    score: tuple
    chosen: tuple[_Candidate, ...]

    def plus(self, c: _Candidate) -> _Packing:
        count, stages, bottlenecks, kept, names = self.score
        return _Packing((count - 1, stages + c.layout.num_stages,
                         tuple(sorted(bottlenecks + (c.bottleneck,), reverse=True)),
                         kept - c.kept, tuple(sorted(names + (c.layout.replicas,)))),
                        self.chosen + (c,))


_EMPTY = _Packing((0, 0, (), 0, ()), ())


class _Packer:
    """Set packing over ``masks`` (minimal sets sorted by size). A group of candidates is a bitset
    over their indices; memo states are such groups: the sets inside the replicas still free."""

    def __init__(self, problem: _Problem, masks: Sequence[int], budget: _Budget) -> None:
        self.masks, self.budget, self.bound_masks = masks, budget, problem.holder_masks
        budget.spend(5 * len(masks))  # building the tables below: ~4 us per set
        self.num_replicas = len(problem.names)
        self.sizes = [m.bit_count() for m in masks]
        self.contains = [0] * self.num_replicas  # [r]: the sets holding replica r
        for i, m in enumerate(masks):
            for r in _bits(m):
                self.contains[r] |= 1 << i
        self.conflict = [0] * len(masks)  # [i]: the sets sharing a replica with set i
        for i, m in enumerate(masks):
            for r in _bits(m):
                self.conflict[i] |= self.contains[r]
        self.by_size: dict[int, int] = {}  # size -> bitset of the sets of that size
        for i, size in enumerate(self.sizes):
            self.by_size[size] = self.by_size.get(size, 0) | 1 << i
        # Most disjoint sets of the smallest size (a matching when it is 2), for the count bound.
        self.num_smallest = self._disjoint(self.by_size[self.sizes[0]], {}) if masks else 0
        self.fit_memo: dict[tuple[int, int, int], tuple[int, ...] | None] = {}

    def _disjoint(self, cs: int, memo: dict[int, int]) -> int:
        """Most disjoint sets in ``cs``, by plain memoized branching on a replica (depth <= n)."""
        if not cs:
            return 0
        if cs not in memo:
            self.budget.spend(_OPTION_COST)
            r = _bits(self._alive(cs))[0]
            most = self._disjoint(cs & ~self.contains[r], memo)
            for i in _bits(cs & self.contains[r]):
                most = max(most, 1 + self._disjoint(cs & ~self.conflict[i], memo))
            memo[cs] = most
        return memo[cs]

    def _alive(self, cs: int) -> int:
        out = 0
        for r in range(self.num_replicas):
            if self.contains[r] & cs:
                out |= 1 << r
        return out

    def _smallest(self, cs: int) -> int:
        return self.sizes[(cs & -cs).bit_length() - 1] if cs else 0

    def _of_smallest(self, cs: int, replicas: int) -> tuple[int, int]:
        """(m, x): the smallest size in ``cs``, and at most how many disjoint sets have it."""
        m = self._smallest(cs)
        x = min(replicas.bit_count() // m, (cs & self.by_size[m]).bit_count())
        return m, min(x, self.num_smallest) if m == self.sizes[0] else x

    def _most(self, cs: int, replicas: int) -> int:
        """At most this many disjoint sets in ``cs`` (within ``replicas``): each needs its own
        replica holding block k, for every k; and x sets of the smallest size m plus the others
        of >= m+1 replicas fit in n: K <= (n + x) / (m + 1)."""
        if not cs:
            return 0
        m, x = self._of_smallest(cs, replicas)
        return min([cs.bit_count(), (replicas.bit_count() + x) // (m + 1)]
                   + [(replicas & b).bit_count() for b in self.bound_masks])

    def _fewest_stages(self, cs: int, k: int, replicas: int) -> int:
        """At least this many stages in k disjoint sets of ``cs``: x of size m, the rest larger."""
        if not cs or not k:
            return 0
        m, x = self._of_smallest(cs, replicas)
        return m * k + max(0, k - x)

    def _branch(self, cs: int, alive: int) -> int:
        """The replica in fewest sets: it is unused, or in one of them."""
        return min(_bits(alive), key=lambda r: (self.contains[r] & cs).bit_count())

    def count_and_stages(self) -> tuple[int, int, tuple[int, ...]]:
        """Most sets, then fewest stages: ``(count, stages, chosen indices)``, asked as decisions
        from the upper bounds down (tight targets prune far more than a running best does)."""
        everything = (1 << len(self.masks)) - 1
        alive = self._alive(everything)
        num_alive = alive.bit_count()
        for k in range(self._most(everything, alive), 0, -1):
            if self._fits(everything, k, num_alive) is not None:
                for s in range(self._fewest_stages(everything, k, alive), num_alive + 1):
                    chosen = self._fits(everything, k, s)
                    if chosen is not None:
                        return k, s, chosen
        return 0, 0, ()

    def _fits(self, cs: int, k: int, s: int) -> tuple[int, ...] | None:
        """Indices of k disjoint sets of ``cs`` with <= s stages in total (the first found), or
        None. Memoized in ``self.fit_memo``, which ``best`` reuses to skip hopeless states."""
        if k == 0:
            return ()
        if (cs, k, s) in self.fit_memo:
            return self.fit_memo[cs, k, s]
        self.budget.spend(_STATE_COST)
        found, alive = None, self._alive(cs)
        if cs and self._most(cs, alive) >= k and self._fewest_stages(cs, k, alive) <= s:
            r = self._branch(cs, alive)
            for i in _bits(cs & self.contains[r]):
                self.budget.spend(_OPTION_COST)
                rest = cs & ~self.conflict[i]
                left = alive & ~self.masks[i]
                if self.sizes[i] + self._fewest_stages(rest, k - 1, left) <= s:
                    sub = self._fits(rest, k - 1, s - self.sizes[i])
                    if sub is not None:
                        found = sub + (i,)
                        break
            if found is None:
                found = self._fits(cs & ~self.contains[r], k, s)
        self.fit_memo[cs, k, s] = found
        return found

    def best(self, count: int, stages: int, max_bottleneck: float,
             describe: Callable[[int], _Candidate]) -> _Packing | None:
        """The best packing by rules b-f among those of exactly ``count`` sets and ``stages``
        stages whose sets' bottlenecks are all <= ``max_bottleneck``; None if there is none."""
        memo: dict[tuple[int, int, int], _Packing | None] = {}
        sizes, masks = self.sizes, self.masks
        bound = [max_bottleneck]  # tightened by every complete packing found

        def solve(cs: int, k: int, s: int, worst: float) -> _Packing | None:
            if k == 0:
                bound[0] = min(bound[0], worst) if s == 0 else bound[0]
                return _EMPTY if s == 0 else None
            if (cs, k, s) in memo:
                return memo[cs, k, s]
            if self.fit_memo.get((cs, k, s), ()) is None:
                return None  # no k sets fit in s stages, so none take exactly s
            self.budget.spend(_STATE_COST)
            alive, best = self._alive(cs), None
            smallest = self._smallest(cs)
            if cs and self._fewest_stages(cs, k, alive) <= s <= k * sizes[cs.bit_length() - 1] \
                    and self._most(cs, alive) >= k:
                r = self._branch(cs, alive)
                options = cs & self.contains[r]
                while options:
                    low = options & -options
                    options ^= low
                    i = low.bit_length() - 1
                    if sizes[i] + (k - 1) * smallest > s:
                        break  # sets come by size: the rest are larger still
                    self.budget.spend(_OPTION_COST)
                    c = describe(masks[i])
                    if c.bottleneck > bound[0] or best and c.bottleneck > best.score[2][0]:
                        continue  # its packing's worst bottleneck would be worse
                    sub = solve(cs & ~self.conflict[i], k - 1, s - sizes[i],
                                max(worst, c.bottleneck))
                    if sub is not None and (best is None or sub.plus(c).score < best.score):
                        best = sub.plus(c)
                sub = solve(cs & ~self.contains[r], k, s, worst)
                if sub is not None and (best is None or sub.score < best.score):
                    best = sub
            memo[cs, k, s] = best
            return best

        return solve((1 << len(masks)) - 1, count, stages, 0.0)


# --- the whole search, and the greedy past its budget ------------------------------------------

def _solve(problem: _Problem, limit: int, kept_by_members: Mapping[frozenset[str], PipelineLayout]
           ) -> tuple[list[PipelineLayout], bool]:
    """Iterative deepening on the largest set size L, each level an exact (count, stages) packing
    of the sets of size <= L. Certified optimal when no longer set exists, or when every packing
    that could beat it fits under L: with K pipelines of S stages and m the smallest set, one with
    more pipelines has sets of <= n - K*m replicas (none if K meets the per-block bound), and one
    with as many and no more stages has sets of <= S - (K-1)*m. Then rules d-f pick among the
    packings with that (K, S)."""
    budget, found = _Budget(_STEPS), {}
    described: dict[int, _Candidate] = {}

    def describe(mask: int) -> _Candidate:
        if mask not in described:
            described[mask] = _balanced(problem, mask, budget, kept_by_members)
        return described[mask]

    level, chosen, packer = min(problem.min_stages[0], limit), [], None
    try:
        while True:
            masks, complete = _minimal_sets(problem, level, budget, found)
            if packer is None or len(masks) != len(packer.masks):  # else: no new set, same packing
                packer = _Packer(problem, masks, budget)
                count, stages, indices = packer.count_and_stages()
                chosen = [masks[i] for i in indices]
            certified = complete or level >= limit or masks and level >= _needed_level(
                problem, [m.bit_count() for m in masks], level, count, stages)
            if certified:
                break
            level += 1
        first = [describe(m) for m in chosen]
        worst = max((c.bottleneck for c in first), default=0.0)
        best = packer.best(count, stages, worst, describe)
        assert best is not None, "the first pass's packing is one of those searched"
        return [c.layout for c in best.chosen], True
    except _OutOfBudget:
        layouts = [described[m].layout if m in described
                   else _candidate(problem, m, [found[m]], kept_by_members).layout for m in chosen]
        return _greedy(problem, layouts, found, limit, kept_by_members), False


def _needed_level(problem: _Problem, sizes: Sequence[int], level: int, count: int, stages: int
                  ) -> int:
    """The set size every packing that could beat (count, stages) fits under. ``sizes``: of every
    minimal set of size <= level, ascending (sets not listed have more than ``level`` members).

    A packing of j sets, one of size x, has j-1 other distinct sets, so x <= budget minus the j-1
    smallest sizes, where budget is n (for j = count + 1) or ``stages`` (for j = count).
    """
    def smallest_sum(j: int) -> int:
        return sum(sizes[:j]) + max(0, j - len(sizes)) * (level + 1)

    n = len(problem.names)
    more = count < min(m.bit_count() for m in problem.holder_masks)  # per-block bound allows more
    return max(n - smallest_sum(count) if more else 0, stages - smallest_sum(count - 1))


def _greedy(problem: _Problem, chosen: list[PipelineLayout], found: Mapping[int, tuple[int, ...]],
            limit: int, kept_by_members: Mapping[frozenset[str], PipelineLayout]
            ) -> list[PipelineLayout]:
    """Fallback, O(F log F + n * b) plus one cut DP per pipeline: keep ``chosen`` (the packing of
    the last level searched), add sets found so far, smallest first, while disjoint; then chains of
    unused replicas, each stage the farthest reach."""
    index = {name: r for r, name in enumerate(problem.names)}
    used = sum(1 << index[name] for p in chosen for name in p.replicas)
    for mask in sorted(found, key=lambda m: (m.bit_count(), m)):
        if not mask & used and mask.bit_count() <= limit:
            chosen.append(_candidate(problem, mask, [found[mask]], kept_by_members).layout)
            used |= mask
    while True:
        order, pos = [], 0
        while pos < problem.num_blocks and len(order) < limit:
            options = [r for r in problem.holders[pos] if not used >> r & 1 and r not in order]
            if not options:
                break
            r = max(options, key=lambda r: (problem.run_end[r][pos], -r))
            order.append(r)
            pos = problem.run_end[r][pos] + 1
        if pos < problem.num_blocks:
            return chosen
        mask = sum(1 << r for r in order)
        chosen.append(_candidate(problem, mask, [tuple(order)], kept_by_members).layout)
        used |= mask
