"""The search behind ``pipelines.form_pipelines``: one depth-first branch-and-bound over packings
of partial replicas (indices 0..n-1 in name order) into pipelines, under a step budget. Pure.

Its key, smaller better, is rules b-f of ``pipelines``: ``(-pipelines, stages, bottlenecks worst
first, -kept, sorted replica tuples)``. It is strictly separable (adding the same disjoint pipelines
to two packings keeps their order), so a partial packing plus an optimistic rest bounds every
packing below it. Every node is a valid packing and is offered as the incumbent: when the budget
runs out the search returns the best one offered (not proved), else it is optimal. The tree is
walked twice: for rules b-c only (a tie is no improvement, so no cuts are computed), then for the
whole key among the packings as good. A short budget so goes to pipelines and stages.

The tree. A *lazy* node holds the pipelines chosen so far and the free replicas F. Its first child
adds F's greedy chain (``pipeline_tiling``) as a pipeline, in another lazy node. Its second child is
every packing of F without the chain: set packings of the minimal sets within F of at most L
members, L growing from the fewest stages any tiling needs (the smallest sets are the cheapest to
list and make the most pipelines; level L searches only packings with a set of L) until no larger
set can be in a packing that beats the incumbent. The leftmost path is the greedy seed (chains until none tiles), reached before any
budgeted step; second children run from the deepest up, so a short budget improves the seed's tail
first, and a sufficient one proves the optimum.

Packing (set packing, NP-hard in general). Branch on the live replica in fewest sets: it joins each
of them, or stays idle. At most k more pipelines: every one needs its own replica holding each
block; x disjoint sets of the smallest size m plus larger ones fit in the live replicas, k <= (live
+ x) / (m + 1); and a memo of groups of sets proved to hold no more (sound: a packing with more
pipelines than the incumbent is never cut). The optimistic rest is k sets of the fewest stages; in
the second walk, which knows the optimal (pipelines, stages), only sets that fit the stages left and
are no worse than the incumbent's worst pipeline stay, with their smallest bottlenecks, kept layouts
and names. A set's cuts are computed only when the key needs them.

Budget: steps of about 1 us each on one core (a packing node 10; see ``pipeline_tiling``); counting
steps, not seconds, keeps answers independent of the machine. At 16 replicas x 64 blocks, 50 000
steps (``pipelines._STEPS``) take 25-60 ms. PipeCast's cyclic holdings (prefixes of rotated block
orders) are proved optimal in 37 of 40 random cases (the others: optimal pipelines and stages, the
bottleneck tie-break unproved), in 18 ms on average. Uniformly scattered holdings (each block held
with probability 0.5-0.95) have too many minimal sets to list and use the whole budget; the seed
improves in 22 of 40 cases.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from faascale.pipecast.pipeline_tiling import (Budget, Candidate, OutOfBudget, Problem, Stages,
                                               Tilings, balanced, balanced_over, bits,
                                               fewest_stages, greedy_chain)

_NODE_STEPS = 10  # steps per packing node: its bounds, branching choice and offer (~10 us)


def search(held: Sequence[frozenset[int]], num_blocks: int, block_cost: Sequence[float] | None,
           limit: int, previous: Mapping[int, Stages], steps: int) -> tuple[list[Stages], bool]:
    """The best packing of replicas ``held[i]`` (each partial, indices valid) into pipelines of at
    most ``limit`` stages, and whether it is proved optimal (False: ``steps`` ran out first, and it
    is the best found, never worse than the greedy seed). ``previous`` maps a member bitmask to the
    layout to keep for those members when it is as balanced. Each pipeline: its stages in order."""
    run = _Search(Problem(held, num_blocks, block_cost), limit, previous, Budget(steps))
    try:
        run.lazy((1 << len(held)) - 1, _EMPTY)  # rules b-c
        run.full = True
        run.lazy((1 << len(held)) - 1, _EMPTY)  # rules d-f, among the packings as good
        return [run.describe(mask).stages for mask in run.best.masks], True
    except OutOfBudget:
        return [run.layout(mask) for mask in run.best.masks], False


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
            for r in bits(m):
                self.contains[r] |= 1 << i
            self.by_size[self.sizes[i]] = self.by_size.get(self.sizes[i], 0) | 1 << i
        self.conflict = [0] * len(self.masks)  # [i]: the sets sharing a replica with set i
        for i, m in enumerate(self.masks):
            for r in bits(m):
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

    def __init__(self, problem: Problem, limit: int, previous: Mapping[int, Stages],
                 budget: Budget) -> None:
        self.problem, self.limit, self.previous, self.budget = problem, limit, previous, budget
        self.described: dict[int, Candidate] = {}
        self.orders: dict[int, tuple[int, ...]] = {}  # set -> an order it tiles in
        self.tilings: dict[int, Tilings] = {}  # free replicas -> their tilings
        self.sets: dict[tuple[int, int], _Sets] = {}  # (free, most members) -> the minimal sets
        self.best, self.best_key = _EMPTY, (0, 0, (), 0, ())
        self.full = False  # False: rules b-c only (a tie is no improvement); True: the whole key

    def describe(self, mask: int) -> Candidate:
        """The set's best layout over all its orders (budgeted, memoized)."""
        if mask not in self.described:
            self.described[mask] = balanced(self.problem, mask, self.previous, self.budget)
        return self.described[mask]

    def layout(self, mask: int) -> Stages:
        """The set's best layout if described, else the best cuts of the order it was found in
        (unbudgeted: one cut DP)."""
        if mask in self.described:
            return self.described[mask].stages
        return balanced_over(self.problem, mask, [self.orders[mask]], self.previous, None).stages

    def key(self, head: tuple[int, int], chosen: Iterable[Candidate]) -> tuple:
        """The whole key (rules b-f) of pipelines ``chosen`` with rules b-c ``head``."""
        chosen = list(chosen)
        return (*head, tuple(sorted((c.bottleneck for c in chosen), reverse=True)),
                -sum(c.kept for c in chosen), tuple(sorted(c.replicas for c in chosen)))

    def offer(self, packing: _Packing) -> None:
        """Make ``packing`` the incumbent if its key is lower (first walk: its head)."""
        if packing.head < self.best.head:
            self.best, self.best_key = packing, None
        elif self.full and packing.head == self.best.head and packing.masks != self.best.masks:
            key = self.key(packing.head, (self.describe(m) for m in packing.masks))
            if key < self.incumbent_key():
                self.best, self.best_key = packing, key

    def incumbent_key(self) -> tuple:
        """The incumbent's whole key (its cuts computed once)."""
        if self.best_key is None:
            self.best_key = self.key(self.best.head,
                                     (self.describe(m) for m in self.best.masks))
        return self.best_key

    def lazy(self, free: int, packing: _Packing) -> None:
        """Packings of ``free`` added to ``packing``: with its chain (first; the seed's path spends
        no step), then without it, over the minimal sets of at most ``size`` members for a growing
        size, until no larger set can be in a packing that beats the incumbent."""
        self.offer(packing)
        order = greedy_chain(self.problem, free, self.limit)
        chain = 0 if order is None else sum(1 << r for r in order)
        if order is not None:
            self.orders.setdefault(chain, order)
            self.lazy(free & ~chain, packing.plus(chain))
        size = fewest_stages(self.problem, 0, free)
        while size <= self.largest_useful(free, packing):
            sets = self.minimal_sets(free, size, chain)
            if sets.by_size.get(size):  # packings of smaller sets only were searched before
                self.pack(sets, sets.by_size[size], (1 << len(sets.masks)) - 1, packing, False)
            size += 1

    def minimal_sets(self, free: int, size: int, chain: int) -> _Sets:
        """The minimal sets of at most ``size`` members within ``free`` but ``chain`` (memoized:
        the second walk and the memo of ``most`` reuse them)."""
        if (free, size) not in self.sets:
            if free not in self.tilings:
                self.tilings[free] = Tilings(self.problem, free)
            tilings = self.tilings[free]
            masks = [m for m in tilings.minimal(size, self.budget) if m != chain]
            for m in masks:
                self.orders.setdefault(m, tilings.found[m])
            self.sets[free, size] = _Sets(masks, self.problem.num_replicas)
        return self.sets[free, size]

    def largest_useful(self, free: int, packing: _Packing) -> int:
        """The most members a set of ``free`` may have in a packing that beats the incumbent when
        added to ``packing`` (0: none beats it). With m the fewest stages any set needs and j the
        sets that tie the incumbent's count: j+1 sets, one of x members, fit in ``free`` (x <= free
        - j*m; not in the second walk); or j sets, one of x, keep its stages (x <= stages left -
        (j-1)*m, less one in the first walk, where a tie is no improvement)."""
        m = fewest_stages(self.problem, 0, free)
        k = min([free.bit_count() // m]
                + [(free & h).bit_count() for h in self.problem.holder_masks])
        tie = packing.head[0] - self.best.head[0]  # sets to add to tie the count
        if m > self.limit or k < tie or k == 0:
            return 0
        more = free.bit_count() - tie * m if k > tie and not self.full else 0
        same = self.best.head[1] - packing.head[1] - (tie - 1) * m - (not self.full) if tie else 0
        return min(self.limit, max(more, same))

    def pack(self, sets: _Sets, new: int, cs: int, packing: _Packing, fresh: bool) -> None:
        """Packings of the sets in ``cs`` added to ``packing``, with at least one of the ``new``
        sets unless ``fresh`` (one is in ``packing``)."""
        self.budget.spend(_NODE_STEPS)
        self.offer(packing)
        cs = self.useful(sets, cs, packing)
        if not cs or not (fresh or cs & new):
            return
        count_before = self.best.head[0]
        need = packing.head[0] - count_before  # pipelines to add to tie the incumbent's count
        r = min(bits(sets.live(cs)), key=lambda r: ((sets.contains[r] & cs).bit_count(), r))
        for i in bits(cs & sets.contains[r]):
            self.pack(sets, new, cs & ~sets.conflict[i], packing.plus(sets.masks[i]),
                      fresh or bool(new >> i & 1))
        self.pack(sets, new, cs & ~sets.contains[r], packing, fresh)
        if self.best.head[0] == count_before:
            # No packing here has more than ``need``: it would beat the incumbent and be found
            # (one without a new set already was, in the search of the smaller sets).
            sets.most[cs] = need

    def most(self, sets: _Sets, cs: int, live: int) -> int:
        """At most this many disjoint sets in ``cs`` (``live``: their replicas)."""
        if not cs:
            return 0
        m, x = sets.smallest(cs, live)
        return min([cs.bit_count(), (live.bit_count() + x) // (m + 1),
                    sets.most.get(cs, len(sets.masks))]
                   + [(live & h).bit_count() for h in self.problem.holder_masks])

    def useful(self, sets: _Sets, cs: int, packing: _Packing) -> int:
        """The sets of ``cs`` that may join ``packing`` in a packing that beats the incumbent, or 0
        when none does: when its optimistic key is not lower. First walk: the most sets, each of
        the fewest stages. Second walk (no head beats the incumbent's: the first proved it): the
        sets that fit the stages left and are no worse than the incumbent's worst pipeline, as
        many as tie its count, with their smallest bottlenecks, kept layouts and names."""
        live = sets.live(cs)
        k = self.most(sets, cs, live)
        if k == 0:
            return 0
        m, x = sets.smallest(cs, live)
        head = (packing.head[0] - k, packing.head[1] + m * k + max(0, k - x))
        if not self.full or head > self.best.head:
            return cs if head < self.best.head else 0
        k = packing.head[0] - self.best.head[0]
        if k == 0:
            return 0
        fits = self.best.head[1] - packing.head[1] - (k - 1) * m  # members of one more set
        worst = self.incumbent_key()[2][0]
        cs = sum(1 << i for i in bits(cs) if sets.sizes[i] <= fits
                 and self.describe(sets.masks[i]).bottleneck <= worst)
        if self.most(sets, cs, sets.live(cs)) < k:
            return 0
        left = [self.describe(sets.masks[i]) for i in bits(cs)]
        chosen = [self.describe(mask) for mask in packing.masks]
        bottlenecks = heapq.nsmallest(k, (c.bottleneck for c in left))
        optimistic = (*self.best.head,
                      tuple(sorted([c.bottleneck for c in chosen] + bottlenecks, reverse=True)),
                      -sum(c.kept for c in chosen) - min(k, sum(c.kept for c in left)),
                      tuple(sorted([c.replicas for c in chosen]
                                   + heapq.nsmallest(k, (c.replicas for c in left)))))
        return cs if optimistic < self.incumbent_key() else 0
