"""Keep-alive and eviction for one tier of a node's block store. Pure: snapshots in, decisions out.

Which blocks leave a full tier: never pinned ones (a replica is mapping them); first those whose
function's keep-alive has expired; then the cheapest to bring back per byte freed (a block also held
by a lower tier on this node costs a local read; one held only remotely costs a network fetch), and
among equals the least recently used. The clock comes in as ``now_s``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from faascale.engine.blockio import BlockId


class Tier(enum.IntEnum):
    """Where a block lives, fastest first. ``REMOTE`` is the object store (never evicted)."""

    DEVICE = 0
    HOST = 1
    DISK = 2
    REMOTE = 3


class TierFullError(Exception):
    """A tier cannot make room: what is left is pinned (in use). Carries the numbers."""

    def __init__(self, tier: Tier, need_bytes: int, free_bytes: int, pinned_bytes: int) -> None:
        self.tier, self.need_bytes = tier, need_bytes
        super().__init__(f"{tier.name} tier is full: need {need_bytes} bytes, {free_bytes} free "
                         f"after evicting everything unpinned ({pinned_bytes} bytes pinned)")


@dataclass(frozen=True)
class Resident:
    """One block held in a tier, as the eviction policy sees it."""

    block: BlockId
    size_bytes: int
    last_used_s: float
    keep_alive_until_s: float  # the function's keep-alive after its last use or demotion
    pinned: bool
    refetch_s: float  # estimated seconds to bring it back from the next tier that holds it


def expired(r: Resident, now_s: float) -> bool:
    return now_s >= r.keep_alive_until_s


def eviction_order(residents: Iterable[Resident], now_s: float) -> list[Resident]:
    """Unpinned residents, the first to evict first."""
    return sorted((r for r in residents if not r.pinned),
                  key=lambda r: (not expired(r, now_s), r.refetch_s / max(r.size_bytes, 1),
                                 r.last_used_s))


def choose_evictions(tier: Tier, residents: Sequence[Resident], capacity_bytes: int,
                     need_bytes: int, now_s: float) -> list[BlockId]:
    """The blocks to evict so ``need_bytes`` more fit in ``capacity_bytes``.

    Returns [] when they already fit. Raises TierFullError when even evicting every unpinned
    block is not enough (the caller then serves from a lower tier instead of crashing).
    """
    used = sum(r.size_bytes for r in residents)
    free = capacity_bytes - used
    if need_bytes <= free:
        return []
    chosen: list[BlockId] = []
    for r in eviction_order(residents, now_s):
        chosen.append(r.block)
        free += r.size_bytes
        if need_bytes <= free:
            return chosen
    pinned = sum(r.size_bytes for r in residents if r.pinned)
    raise TierFullError(tier, need_bytes, free, pinned)


def expired_blocks(residents: Iterable[Resident], now_s: float) -> list[BlockId]:
    """Unpinned blocks whose keep-alive has run out (a periodic sweep frees them)."""
    return [r.block for r in residents if not r.pinned and expired(r, now_s)]
