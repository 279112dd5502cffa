"""Admission: a node receives one block at a time, in plan step order; the planned sender of its next
receive gets a credit once the previous receive was delivered (see ``agent.py``'s docstring for why
and why it cannot deadlock)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from faascale.pipecast.schedule import Transfer


class Admission:
    """The receiving side of admission: the node's receives in plan step order; the sender of
    the next one is granted a credit once the previous one was delivered (or given up), or with
    the previous one's if the same peer sends both.
    Thread-safe: the receive thread reports deliveries, the grant thread takes the grants."""

    def __init__(self, receives: Iterable[Transfer], peers: Mapping[str, str]) -> None:
        self._order = sorted(receives, key=lambda t: t.step)
        self._peers = peers
        self._delivered: set[int] = set()
        self._next = 0  # receives granted so far
        self._grants: queue.SimpleQueue[Transfer] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._advance()

    def delivered(self, block: Any) -> None:
        with self._lock:
            self._delivered.add(block)
            self._advance()

    def _advance(self) -> None:
        # The next receive is admitted once the previous one is delivered, or at once if the
        # same peer sends both: its sends are sequential on one connection, so they cannot
        # overlap here, and its link need not idle for a credit's round trip between them.
        while self._next < len(self._order) and (
                self._next == 0 or self._order[self._next - 1].block in self._delivered
                or self._order[self._next - 1].src == self._order[self._next].src):
            self._grants.put(self._order[self._next])
            self._next += 1

    def next_grant(self, timeout_s: float) -> tuple[Transfer, str | None] | None:
        """The next receive to admit and its sender's address (None: unknown); None if there
        is none within ``timeout_s``."""
        try:
            receive = self._grants.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return receive, self._peers.get(receive.src)
