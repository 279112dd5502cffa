"""Repair plans: finish a multicast that a failure cut short, from what the live nodes hold. Pure.

Same step model as ``schedule.py``; the nodes start with what they hold (``MulticastPlan.initial``)
and an object store, if any, is an unlimited sender used only for blocks nobody live holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from faascale.pipecast.schedule import MulticastPlan, PlanError, Transfer, check_num_blocks


def repair(holdings: Mapping[str, Iterable[int]], targets: Sequence[str], num_blocks: int, *,
           store: str | None = None, store_fills: bool = False) -> MulticastPlan:
    """Finish a multicast that a failure cut short: every target ends with every block.

    ``holdings``: what each live node holds now (targets included; nodes that are not targets
    are helpers, e.g. replicas or tiers that hold the model). ``store`` (an object store that
    holds every block and serves any number of readers per step) is used only for blocks no
    live node can give. Greedy, step by step in the step model: targets missing the most go
    first, each takes the rarest block it needs from the first idle holder (peers before the
    store), in the target's own rotated order. A block the store sends in a step is not
    fetched from it again in that step: the others take it from that target later, so targets
    that start with nothing (a scale from zero) each load a different contiguous part from the
    store, and then fill in from each other (every block leaves the store about once per step it is needed, not once per target).
    ``store_fills``: the holders that are not targets are busy (serving replicas during the
    scale-up their load caused): they only seed, sending a block that no target holds yet; a
    target whose next block no free node can send this step loads it from the store instead
    of waiting. From a busy holder to N targets, the holder then feeds one target's part and
    the store the others', as from zero, and the targets fill in from each other (the store
    when they are all busy): every block is held by some target after about b/N steps
    instead of b, and the holder sends about 1/N of the model.
    Not optimal, but every step moves at least one block, so it ends within (missing blocks)
    steps. Raises PlanError if a needed block is held by nobody and there is no store, or for
    a target or block not in range.
    """
    targets = tuple(targets)
    check_num_blocks(num_blocks)
    held = {n: set(bs) for n, bs in holdings.items()}
    for t in targets:
        held.setdefault(t, set())
    if store is not None:
        if store in held:
            raise PlanError(f"the store {store!r} is also a node with holdings")
        held[store] = set(range(num_blocks))
    bad = sorted((n, b) for n, bs in held.items() for b in bs if not 0 <= b < num_blocks)
    if bad:
        raise PlanError(f"holdings name blocks outside 0..{num_blocks - 1}: {bad[:5]}")
    unheld = set(range(num_blocks)) - set().union(*held.values())
    if unheld and any(unheld - held[t] for t in targets):
        raise PlanError(f"blocks {sorted(unheld)} are held by no live node and there is no store")
    helpers = tuple(sorted(n for n in held if n not in targets))
    initial = {n: frozenset(held[n]) for n in (*helpers, *targets) if n != store}
    senders_in_order = [n for n in sorted(held) if n != store]
    is_target = frozenset(targets)
    transfers: list[Transfer] = []
    # Each target takes blocks in its own rotated order (the j-th of N from block j*b/N on): from
    # zero, every target then loads one contiguous part from the store, which a pipeline can use.
    start = {t: j * num_blocks // len(targets) for j, t in enumerate(targets)}
    step = 0
    while any(len(held[t]) < num_blocks for t in targets):
        rarity = {b: sum(b in bs for n, bs in held.items() if n != store) for b in range(num_blocks)}
        busy: set[str] = set()
        from_store: set[int] = set()  # blocks the store sends this step (to one target each)
        arrived: list[tuple[str, int]] = []
        for dst in sorted((t for t in targets if len(held[t]) < num_blocks),
                          key=lambda t: (len(held[t]), t)):
            for block in sorted(set(range(num_blocks)) - held[dst],
                                key=lambda b: (rarity[b], (b - start[dst]) % num_blocks)):
                if block in from_store:  # another target brings it now: take it from them later
                    continue
                # filling in, a busy holder only seeds a block no target holds yet
                seeded = store_fills and any(block in held[t] for t in targets)
                src = next((n for n in senders_in_order if n != dst and block in held[n]
                            and n not in busy and (n in is_target or not seeded)), None)
                if src is None and store is not None and (rarity[block] == 0 or store_fills):
                    # no live peer has it (or, filling in, none is free): the store does
                    src = store
                    from_store.add(block)
                if src is not None:
                    if src != store:
                        busy.add(src)
                    transfers.append(Transfer(step, src, dst, block))
                    arrived.append((dst, block))
                    break
        if not arrived:  # unreachable given the check above; guards against a silent loop
            raise PlanError(f"step {step}: no block can move")
        for dst, block in arrived:
            held[dst].add(block)
        step += 1
    sources = tuple(n for n in helpers) + ((store,) if store and store not in helpers else ())
    return MulticastPlan("repair", sources, targets, num_blocks, tuple(transfers),
                         unlimited_senders=frozenset({store}) if store else frozenset(),
                         initial=initial)
