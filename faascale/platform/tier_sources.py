"""Every node's tier copies of a model feed PipeCast: the companion of each node's block store.

With PipeCast on, the platform's ``TierConfig`` names ``start`` as the block store's companion
(``memory_tier/node.py`` calls it in the node's ``NodeBlocks`` actor, so no process is added). It
runs a thread that every ``POLL_S`` asks the store which models it holds completely in one tier
(``NodeBlocks.held_models``) and keeps one ``pipecast.source.TierSource`` per such model that no
replica on the node maps (a serving replica is a PipeCast member itself, and the better source:
two sources from one node would share its link). A copy that moved tier (HOST evicted, DISK left)
is re-offered as the new kind; a copy that went (evicted, or a replica maps it again) leaves.

The decision is pure (``plan_sources``); the thread only applies it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
COMPANION = "faascale.platform.tier_sources:start"
POLL_S = 2.0


@dataclass(frozen=True)
class Offer:
    """A model this node can offer as a source: its tier and the directory of its blocks."""

    model_id: str
    tier: str
    directory: str


@dataclass(frozen=True)
class SourcePlan:
    start: tuple[Offer, ...]
    stop: tuple[str, ...]  # model ids whose source leaves


def plan_sources(held: Sequence[Mapping[str, Any]], running: Mapping[str, Offer]) -> SourcePlan:
    """From ``NodeBlocks.held_models`` and the sources running now: the ones to start and to stop.
    Pure."""
    wanted = {h["model_id"]: Offer(h["model_id"], h["tier"], h["directory"])
              for h in held if not h["pinned"]}
    stop = tuple(sorted(m for m, offer in running.items() if wanted.get(m) != offer))
    start = tuple(o for m, o in sorted(wanted.items()) if running.get(m) != o)
    return SourcePlan(start, stop)


class TierSources:
    """Applies ``plan_sources`` every ``poll_s`` (a daemon thread). ``held`` and ``make`` are
    injected (tests); ``make(offer, manifest_json)`` returns an object with ``close()``."""

    def __init__(self, held: Callable[[], list[dict[str, Any]]],
                 make: Callable[[Offer, str], Any], poll_s: float = POLL_S) -> None:
        self._held, self._make, self.poll_s = held, make, poll_s
        self.running: dict[str, tuple[Offer, Any]] = {}
        self._stop = threading.Event()

    def step(self) -> SourcePlan:
        held = self._held()
        plan = plan_sources(held, {m: o for m, (o, _) in self.running.items()})
        for model_id in plan.stop:
            _, source = self.running.pop(model_id)
            try:
                source.close()
            except Exception:  # noqa: BLE001
                log.exception("tier source of %s did not close", model_id)
        manifests = {h["model_id"]: h["manifest_json"] for h in held}
        for offer in plan.start:
            try:
                self.running[offer.model_id] = (offer, self._make(offer, manifests[offer.model_id]))
                log.info("offering %s from %s as a PipeCast source", offer.model_id, offer.tier)
            except Exception as exc:  # noqa: BLE001 - no coordinator yet, a file gone: next poll
                log.warning("cannot offer %s as a source: %s", offer.model_id, exc)
        return plan

    def run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the store or Ray busy: next poll
                log.debug("tier sources step failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        for _, source in self.running.values():
            source.close()
        self.running.clear()


def _make_source(offer: Offer, manifest_json: str) -> Any:
    """A ``TierSource`` for ``offer``, joined to the platform's coordinator."""
    import ray

    from faascale.pipecast.plan_io import BlockCatalog
    from faascale.pipecast.source import TierSource
    from faascale.platform.pipecast_actor import locator, pipecast_actor, use_pieces

    coordinator = pipecast_actor()
    if coordinator is None:
        raise RuntimeError("no PipeCast coordinator")
    contact = ray.get(coordinator.contact.remote(), timeout=10)
    catalog = BlockCatalog.from_json(manifest_json)
    node = ray.get_runtime_context().get_node_id()[:8]
    source = TierSource(f"tier-{node}-{offer.tier.lower()}-{offer.model_id[:24]}", catalog,
                        offer.directory, offer.tier, secret=contact.secret,
                        coordinator=contact.address, bind_host=contact.bind_host(),
                        pieces=use_pieces())
    source.locate = locator(coordinator)
    return source


def start(node_blocks: Any) -> TierSources | None:
    """The block store's companion: offer this node's complete tier copies as PipeCast sources
    (unless PipeCast is off: ``FAASCALE_PIPECAST=0``)."""
    if os.environ.get("FAASCALE_PIPECAST", "1") == "0":
        return None
    keeper = TierSources(node_blocks.held_models, _make_source)
    threading.Thread(target=keeper.run, name="tier-sources", daemon=True).start()
    node_blocks.tier_sources = keeper
    return keeper
