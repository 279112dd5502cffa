"""How long a multicast plan takes on given links: the plan as the runtime runs it. Pure.

The runtime has no barrier between a plan's steps (receivers admit their senders in step order,
by credits: ``admission``), so neither has this model: every node sends in its plan's step order,
and a send holds the sender's outbound link and the receiver's inbound link for size / rate from
the moment both are free and the sender holds what it sends. With ``piece_bytes`` a block moves as
pieces of that size, each forwarded as soon as it arrived (cut-through, as the agent does); with 0
a block is forwarded once whole. A local load holds its node's reader at ``local_gbps``. Latency,
CPU and protocol overheads are left out: this is the time the links alone would take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from faascale.engine.blockio import piece_spans
from faascale.pipecast.schedule import MulticastPlan, PlanError


@dataclass(frozen=True)
class Timeline:
    """When a plan's blocks arrive, in seconds from its start.

    ``arrival_s[(target, block)]``: when the target holds the whole block. ``step_end_s[s]``: when
    every move of steps 0..s has landed. ``node_done_s[target]``: when it holds every block.
    ``all_done_s``: the last of those (0.0 with no targets). ``first_union_s``: when the targets
    together hold every block (None with no targets).
    """

    step_end_s: tuple[float, ...]
    arrival_s: Mapping[tuple[str, int], float]
    node_done_s: Mapping[str, float]
    all_done_s: float
    first_union_s: float | None


def simulate(plan: MulticastPlan, block_bytes: Sequence[int], link_gbps: float,
             local_gbps: float | None = None, piece_bytes: int = 0) -> Timeline:
    """Time ``plan`` (module docstring) with ``link_gbps`` (1e9 bit/s) on every link. Validates the
    plan first. Raises PlanError for an invalid plan, ``block_bytes`` not one non-negative size
    per block, a rate that is not positive, or local loads without ``local_gbps``."""
    plan.validate()
    if len(block_bytes) != plan.num_blocks or any(b < 0 for b in block_bytes):
        raise PlanError(f"block_bytes: need {plan.num_blocks} non-negative sizes, "
                        f"got {list(block_bytes)}")
    if plan.local_loads and local_gbps is None:
        raise PlanError("the plan has local loads: give local_gbps")
    for name, rate in (("link_gbps", link_gbps), ("local_gbps", local_gbps)):
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise PlanError(f"{name}: must be a positive number, got {rate!r}")
    if piece_bytes < 0:
        raise PlanError(f"piece_bytes: must be >= 0, got {piece_bytes}")
    spans = [piece_spans(size, piece_bytes) for size in block_bytes]
    held: dict[tuple[str, int, int], float] = {
        (s, b, p): 0.0 for s in plan.sources for b in range(plan.num_blocks)
        for p in range(len(spans[b]))}
    out_free: dict[str, float] = {}
    in_free: dict[str, float] = {}
    reader_free: dict[str, float] = {}
    step_end = [0.0] * plan.num_steps
    moves = sorted([(t.step, 0, t.src, t.dst, t.block) for t in plan.transfers]
                   + [(x.step, 1, x.node, x.node, x.block) for x in plan.local_loads])
    for step, local, src, dst, block in moves:
        for p, (_, length) in enumerate(spans[block]):
            if local:
                assert local_gbps is not None
                start = reader_free.get(dst, 0.0)
                end = reader_free[dst] = start + length * 8 / (local_gbps * 1e9)
            else:
                start = max(out_free.get(src, 0.0), in_free.get(dst, 0.0), held[(src, block, p)])
                end = out_free[src] = in_free[dst] = start + length * 8 / (link_gbps * 1e9)
            held[(dst, block, p)] = min(end, held.get((dst, block, p), math.inf))
            step_end[step] = max(step_end[step], end)
    arrival_s = {(n, b): max(held[(n, b, p)] for p in range(len(spans[b])))
                 for n in plan.targets for b in range(plan.num_blocks)}
    node_done_s = {n: max(arrival_s[(n, b)] for b in range(plan.num_blocks))
                   for n in plan.targets}
    union = (max(min(arrival_s[(n, b)] for n in plan.targets) for b in range(plan.num_blocks))
             if plan.targets else None)
    for s in range(1, len(step_end)):
        step_end[s] = max(step_end[s], step_end[s - 1])
    return Timeline(tuple(step_end), arrival_s, node_done_s,
                    max(node_done_s.values(), default=0.0), union)
