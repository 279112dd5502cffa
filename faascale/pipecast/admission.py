"""Admission: a node receives one block at a time, in plan step order; the planned sender of its next
receive gets a credit once the previous receive was delivered (see ``agent.py``'s docstring for why
and why it cannot deadlock). A credit is sent again until a frame of its block arrives
(``CREDIT_RESEND_S``): a lost one would hold the node's receives for the rest of the plan.

Store first: a node that loads blocks from the object store (a scale from zero) admits a network
receive of step s only once its store loads of steps < s are done (in place or failed), each
load holding it back at most ``store_load_bound_s`` of its size. Its store loads and its
receives share the node's one inbound link (and its CPU); the store loads are its part of the
model, the part the members' temporary pipeline waits for (first servable = the members' parts
together cover the model), while a peer's block can come a little later at no cost to it.
Measured without it (1 GB model, 4 nodes at 1 Gbit/s from Ceph RGW): a member got a block from
a peer at 2.98 s, before its own store blocks (3.64 s, 6.68 s). With it, against without
(``benchmarks/scaleout_from_zero.py``'s ablation, interleaved pairs on a loaded 2-core machine):
first servable 0.83 x (median of 7 pairs, faster in all 7) for the 1 GB model, 0.94 x for
SmolLM2 (12 pairs, faster in 8); all hold unchanged (0.98 x, 1.01 x).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from faascale.pipecast.schedule import Transfer

# A store load holds the node's later receives back at most this long: its setup (a ranged GET's
# first byte from S3 takes ~0.1 s; 2 s is generous on a loaded machine) plus its bytes at 100
# Mbit/s (a tenth of the emulated links', under 1 % of a datacenter node's). A load slower than
# that has stalled (a store that hangs): the receives go ahead beside it, as without the rule.
STORE_FIRST_SETUP_S = 2.0
STORE_FIRST_MIN_BYTES_PER_S = 100e6 / 8
# A credit whose block has not begun to arrive is sent again this often. It is sent once per
# receive otherwise, and can be lost: a sender that has not yet opened the plan's epoch (it is
# ending the plan this one replaced) drops it, and a starved sender may not take it in time. Its
# receive then waited out the whole plan (bursty runs: a 60 s stall, every later receive of the
# node held behind it). A duplicate credit changes nothing at the sender.
CREDIT_RESEND_S = 2.0


def store_load_bound_s(size_bytes: int) -> float:
    """How long one store load of ``size_bytes`` may hold the node's receives back."""
    return STORE_FIRST_SETUP_S + max(0, size_bytes) / STORE_FIRST_MIN_BYTES_PER_S


def held_back(step: int, pending_loads: Sequence[tuple[int, int]], running_s: float) -> bool:
    """Whether the node's network receive of plan ``step`` waits for its own store loads.

    ``pending_loads``: (step, size_bytes) of the store loads not done yet, in step order; they
    run one at a time in that order, so the first is the one running, for ``running_s``
    seconds now (since the previous one was done, or since the start). Held back while a load
    of an earlier step is pending and the running one is within its bound
    (``store_load_bound_s``); a load past its bound holds nothing (it may never end). Pure."""
    if not pending_loads or not any(s < step for s, _ in pending_loads):
        return False
    return running_s < store_load_bound_s(pending_loads[0][1])


class Admission:
    """The receiving side of admission: the node's receives in plan step order; the sender of
    the next one is granted a credit once the previous one was delivered (or given up), or with
    the previous one's if the same peer sends both, and (``store_loads``: the node's loads from
    the object store and their sizes) once it is not ``held_back`` by a store load of an earlier
    step (``stored`` reports each load done). ``clock``: seconds, for the store loads' bounds.
    Thread-safe: the receive thread reports deliveries, the store thread its loads, the grant
    thread takes the grants (``next_grant`` also re-reads the clock: a bound may have passed)."""

    def __init__(self, receives: Iterable[Transfer], peers: Mapping[str, str],
                 store_loads: Iterable[tuple[Transfer, int]] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._order = sorted(receives, key=lambda t: t.step)
        self._peers = peers
        self._delivered: set[int] = set()
        self._next = 0  # receives granted so far
        self._grants: queue.SimpleQueue[Transfer] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._clock = clock
        self._unanswered: dict[int, tuple[Transfer, float]] = {}  # block -> credit, sent at
        loads = sorted(store_loads, key=lambda x: x[0].step)
        self._loads = {t.block: (t.step, size) for t, size in loads}  # pending, in step order
        self._load_since = clock()  # when the running store load started (the last one ended)

    def start(self) -> None:
        with self._lock:
            self._advance()

    def delivered(self, block: Any) -> None:
        with self._lock:
            self._delivered.add(block)
            self._unanswered.pop(block, None)
            self._advance()

    def credit_sent(self, receive: Transfer) -> None:
        """A credit for ``receive`` went out (or was tried): sent again after CREDIT_RESEND_S
        unless a frame of its block comes first (``answered``)."""
        with self._lock:
            if receive.block not in self._delivered:
                self._unanswered[receive.block] = (receive, self._clock())

    def answered(self, block: Any) -> None:
        """A frame of ``block`` arrived: its sender has the credit."""
        with self._lock:
            self._unanswered.pop(block, None)

    def stored(self, block: int) -> None:
        """The node's store load of ``block`` is done (in place, or failed): the next begins."""
        with self._lock:
            if self._loads.pop(block, None) is not None:
                self._load_since = self._clock()
                self._advance()

    def _advance(self) -> None:
        # The next receive is admitted once the previous one is delivered, or at once if the
        # same peer sends both: its sends are sequential on one connection, so they cannot
        # overlap here, and its link need not idle for a credit's round trip between them.
        # Either way only once no store load of an earlier step holds it back.
        while self._next < len(self._order) and (
                self._next == 0 or self._order[self._next - 1].block in self._delivered
                or self._order[self._next - 1].src == self._order[self._next].src) \
                and not held_back(self._order[self._next].step, list(self._loads.values()),
                                  self._clock() - self._load_since):
            self._grants.put(self._order[self._next])
            self._next += 1

    def next_grant(self, timeout_s: float) -> tuple[Transfer, str | None] | None:
        """The next receive to admit, or one whose credit is due again (``credit_sent``), and
        its sender's address (None: unknown); None if there is none within ``timeout_s``."""
        with self._lock:
            if self._loads:  # a store load may have run past its bound since
                self._advance()
            now, senders = self._clock(), set()
            due = None  # a sender sends in step order: its earliest unanswered credit is due
            for r, at in sorted(self._unanswered.values(), key=lambda x: x[0].step):
                if r.src not in senders and now - at >= CREDIT_RESEND_S:
                    due = r
                    break
                senders.add(r.src)
            if due is not None:
                self._unanswered[due.block] = (due, now)
                return due, self._peers.get(due.src)
        try:
            receive = self._grants.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return receive, self._peers.get(receive.src)
