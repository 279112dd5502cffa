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

The search (``pipeline_search``) is one branch-and-bound under a step budget, ``_STEPS``: its first
descent is a greedy seed (chains of the farthest-reaching free replicas), the rest improves on it.
Within the budget the answer is proved optimal (``Pipelines.exact``); past it, it is the best
packing found, never worse than the seed. tests/test_pipecast_pipelines.py checks small cases
against brute force, and budget-limited runs against the exact answer and the seed.
"""

from __future__ import annotations

import enum
import itertools
import math
import numbers
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from faascale.pipecast.pipeline_search import search
from faascale.pipecast.pipeline_tiling import range_cost

# Search steps (about 1 us each on one core) before the best packing found is returned. The
# brief's bound is 50 ms at 16 replicas x 64 blocks; see pipeline_search for what fits in it.
_STEPS = 50_000


class PipelineError(ValueError):
    """Bad input to pipeline forming: block counts, indices, costs, limits or a malformed layout."""


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
        return tuple(range_cost(block_cost, s.first_block, s.last_block) for s in self.stages)

    def bottleneck(self, block_cost: Sequence[float] | None = None) -> float:
        """The costliest stage: it paces the pipeline's throughput."""
        return max(self.stage_costs(block_cost))


@dataclass(frozen=True)
class Pipelines:
    """Who serves how: ``full`` replicas serve alone (never a stage), ``pipelines`` chain partial
    replicas, ``idle`` partial replicas wait for blocks. Names are sorted; pipelines by replicas.
    ``exact`` is False when the search hit its step budget: the best packing it found by then, never
    worse than its greedy seed."""

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
    index = {name: i for i, name in enumerate(partial)}  # the search's replicas: name order
    kept_by_members = {sum(1 << index[r] for r in p.replicas):
                       tuple((index[s.replica], s.first_block, s.last_block) for s in p.stages)
                       for p in previous if p.covers(num_blocks) and set(p.replicas) <= set(partial)
                       and p.held_by(held)}
    limit = len(partial) if max_stages is None else min(max_stages, len(partial))
    found, exact = search([held[r] for r in partial], num_blocks, block_cost, limit,
                          kept_by_members, _STEPS)
    chosen = [PipelineLayout(tuple(Stage(partial[r], first, last) for r, first, last in stages))
              for stages in found]
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


# --- validation ----------------------------------------------------------------------------------

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
