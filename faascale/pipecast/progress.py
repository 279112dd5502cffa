"""One ``NodeAgent.execute``'s shared state: blocks held and lost, sends done and failed, credits,
and the report (``AgentReport``) or the error (``MulticastError``) it ends with."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from faascale.pipecast.plan_io import AgentError, NodeRole
from faascale.pipecast.schedule import Transfer

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often a wait re-reads the clock and its cancel flag; bounds execute's tail


class MulticastError(AgentError):
    """The node's part of the plan did not complete. ``missing_blocks``: blocks the plan brings
    that are not in place. ``stalled_peers``: planned senders of missing blocks that sent nothing
    valid for them, and receivers that did not take a frame in time (the coordinator re-plans
    around them). ``corrupt_peers``: senders of corrupt frames. ``report``: what did happen."""

    def __init__(self, message: str, *, missing_blocks: Sequence[int],
                 stalled_peers: Sequence[str], corrupt_peers: Sequence[str],
                 report: AgentReport) -> None:
        super().__init__(message)
        self.missing_blocks = tuple(missing_blocks)
        self.stalled_peers = tuple(stalled_peers)
        self.corrupt_peers = tuple(corrupt_peers)
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships exceptions between processes
        return (_rebuild_error, (str(self), self.missing_blocks, self.stalled_peers,
                                 self.corrupt_peers, self.report))


def _rebuild_error(message: str, missing: Sequence[int], stalled: Sequence[str],
                   corrupt: Sequence[str], report: AgentReport) -> MulticastError:
    return MulticastError(message, missing_blocks=missing, stalled_peers=stalled,
                          corrupt_peers=corrupt, report=report)


@dataclass(frozen=True)
class SendRecord:
    """One send: ``block`` to ``dst`` at plan ``step``, from ``start_s`` to ``end_s`` (seconds
    since the start of ``execute``; the end is when the frame left this node's hands)."""

    step: int
    block: int
    dst: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class AgentReport:
    """What one node's ``execute`` did. Times are seconds since ``started_at`` (the agent's clock
    at the start). ``arrival_s[block]``: when a block received or loaded in this run was in place.
    ``sends``: completed sends in order. Bytes are block payload bytes. ``corrupt_frames``: frames
    dropped because their bytes were not the block. ``errors``: one line per problem."""

    node: str
    started_at: float
    elapsed_s: float
    arrival_s: Mapping[int, float] = field(hash=False)
    sends: tuple[SendRecord, ...]
    bytes_sent: int
    bytes_received: int
    corrupt_frames: int
    missing_blocks: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()
    refetched_pieces: int = 0  # corrupt pieces this node asked its sender for again, and got
    pieces_resent: int = 0  # pieces this node sent again because a receiver asked

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrival_s", dict(self.arrival_s))  # a copy (picklable)

    @property
    def blocks_sent(self) -> int:
        return len(self.sends)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d |= {"arrival_s": {str(b): s for b, s in self.arrival_s.items()},
              "sends": [asdict(s) for s in self.sends]}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> AgentReport:
        d = json.loads(text)
        return cls(**d | {"arrival_s": {int(b): s for b, s in d["arrival_s"].items()},
                          "sends": tuple(SendRecord(**s) for s in d["sends"]),
                          "missing_blocks": tuple(d["missing_blocks"]),
                          "errors": tuple(d["errors"])})


class Progress:
    """The node's blocks during one ``execute``: held, lost; sends done and failed. Thread-safe;
    a condition wakes the sender when a block settles."""

    def __init__(self, held: frozenset[int], clock: Callable[[], float],
                 expected: set[int], on_block: Callable[[int], None] | None = None,
                 plan_id: str = "") -> None:
        self._clock = clock
        self.plan_id = plan_id
        self._on_block = on_block
        self.t0 = clock()
        self.stop = threading.Event()
        self.cancelled = threading.Event()  # NodeAgent.cancel: every wait gives up now
        self._cond = threading.Condition()
        self._held = set(held)
        self._expected = expected - self._held  # blocks this run brings
        self._arrival_s: dict[int, float] = {}
        self._lost: dict[int, str] = {}
        self._sends: list[SendRecord] = []
        self._bytes_sent = self._bytes_received = self._corrupt = 0
        self._stalled: list[str] = []
        self._corrupt_peers: list[str] = []
        self._errors: list[str] = []
        self._credits: set[tuple[str, int]] = set()  # (receiver, step) admitted to send
        self._granted: set[int] = set()  # blocks whose sender this node admitted
        self._pieces: dict[int, set[int]] = {}  # verified pieces of blocks being received
        self._asked: dict[tuple[int, int], tuple[int, float]] = {}  # refetch: (tries, asked at)
        self._refetched = self._resent = 0
        self.refetch_requests: list[tuple[str, int, int]] = []  # (receiver, block, piece) to resend

    def now(self) -> float:
        return self._clock() - self.t0

    def _wait(self, done: Callable[[], bool], deadline: float) -> bool:
        with self._cond:
            while not done():
                left = deadline - self._clock()
                if left <= 0 or self.cancelled.is_set():
                    return False
                self._cond.wait(min(left, POLL_S))  # the clock may be a fake: re-read it often
            return True

    def holds(self, block: int) -> bool:
        with self._cond:
            return block in self._held

    def _has_piece(self, block: int, piece: int) -> bool:
        return block in self._held or piece in self._pieces.get(block, ())

    def wait_ready(self, send: Transfer, deadline: float) -> Literal["block", "credit"] | None:
        """Wait until ``send`` may go: None once its block's first piece is here (the rest is
        forwarded as it lands: ``wait_piece``) and its receiver admitted it; else what it lacks
        when the block was lost or the deadline passed."""
        def ready() -> bool:
            return send.block in self._lost or (self._has_piece(send.block, 0)
                                                 and (send.dst, send.step) in self._credits)
        self._wait(ready, deadline)
        with self._cond:
            if send.block in self._lost or not self._has_piece(send.block, 0):
                return "block"
            return None if (send.dst, send.step) in self._credits else "credit"

    def wait_piece(self, block: int, piece: int, deadline: float) -> bool:
        """Wait until ``piece`` of ``block`` is here and verified; False if the block was lost
        or the deadline passed first."""
        return self._wait(lambda: self._has_piece(block, piece) or block in self._lost,
                          deadline) and self._has_piece(block, piece)

    def land_piece(self, block: int, piece: int) -> None:
        """A verified piece is in the block's part file: forwarders may send it."""
        with self._cond:
            self._pieces.setdefault(block, set()).add(piece)
            if self._asked.pop((block, piece), None) is not None:
                self._refetched += 1
            self._cond.notify_all()

    def ask_again(self, block: int, piece: int, max_tries: int) -> bool:
        """A corrupt piece: whether to ask its sender for it again (fewer than ``max_tries``
        asks so far, and the block not given up). Counts the ask."""
        with self._cond:
            tries = self._asked.get((block, piece), (0, 0.0))[0]
            if tries >= max_tries or block in self._lost or block not in self._expected:
                return False
            self._asked[(block, piece)] = (tries + 1, self._clock())
            return True

    def lost_on_the_way(self, block: int, piece: int, earlier: Mapping[int, int]
                        ) -> list[tuple[int, int]]:
        """(block, piece) a frame just landed (``piece`` of ``block``) shows lost on the way and
        not asked for again yet. One sender's frames come in the order it sent them (one
        connection), a block's pieces in order and its blocks to this node in plan step order;
        so a piece of ``block`` before ``piece``, or of an ``earlier`` block of that sender's
        (block -> its number of pieces) that began landing, which is not here, was lost: a
        connection that dropped and came back (libzmq's heartbeat on a starved node) loses the
        frames it held, and its sender, unaware, goes on with the next."""
        with self._cond:
            out = []
            for b, upto in [*earlier.items(), (block, piece)]:
                got = self._pieces.get(b)
                if got is None or b in self._held or b in self._lost:
                    continue
                out += [(b, p) for p in range(upto) if p not in got and (b, p) not in self._asked]
            return out

    def overdue_refetches(self, wait_s: float) -> list[tuple[int, int]]:
        """(block, piece) asked for again more than ``wait_s`` ago and still not here."""
        now = self._clock()
        with self._cond:
            return [k for k, (_, at) in self._asked.items()
                    if now - at > wait_s and k[0] not in self._lost and k[0] not in self._held]

    def request_resend(self, receiver: str, block: int, piece: int) -> None:
        with self._cond:
            self.refetch_requests.append((receiver, block, piece))
            self._cond.notify_all()

    def next_resend(self, timeout_s: float) -> tuple[str, int, int] | None:
        with self._cond:
            if not self.refetch_requests:
                self._cond.wait(timeout_s)
            return self.refetch_requests.pop(0) if self.refetch_requests else None

    def resent(self, size_bytes: int) -> None:
        with self._cond:
            self._resent += 1
            self._bytes_sent += size_bytes

    def credit(self, receiver: str, step: int) -> None:
        with self._cond:
            self._credits.add((receiver, step))
            self._cond.notify_all()

    def granted(self, block: int) -> None:
        with self._cond:
            self._granted.add(block)

    def wait_all_settled(self, deadline: float) -> None:
        self._wait(lambda: self._expected <= self._held | set(self._lost), deadline)

    def arrive(self, block: int, size_bytes: int, network: bool) -> None:
        with self._cond:
            new = block not in self._held
            if new:
                self._held.add(block)
                self._arrival_s[block] = self.now()
            self._pieces.pop(block, None)
            self._bytes_received += size_bytes if network else 0
            self._cond.notify_all()
        if new and self._on_block is not None:
            try:
                self._on_block(block)
            except Exception:  # the caller's bug must not lose the block or stall the plan
                log.exception("on_block(%d) failed", block)

    def is_lost(self, block: int) -> bool:
        """Whether ``block`` was given up in this execute (its later pieces are refused)."""
        with self._cond:
            return block in self._lost

    def lose(self, block: int | None, why: str) -> None:
        with self._cond:
            self._errors.append(why)
            if block is not None and block in self._expected and block not in self._held:
                self._lost.setdefault(block, why)
            self._cond.notify_all()

    def count_corrupt(self, sender: str) -> None:
        """A corrupt frame from ``sender`` was dropped."""
        with self._cond:
            self._corrupt += 1
            if sender not in self._corrupt_peers:
                self._corrupt_peers.append(sender)

    def corrupt(self, block: int | None, sender: str, why: str) -> None:
        self.count_corrupt(sender)
        self.lose(block, f"corrupt frame dropped: {why}")

    def note(self, why: str) -> None:
        with self._cond:
            self._errors.append(why)

    def sent(self, record: SendRecord, size_bytes: int) -> None:
        with self._cond:
            self._sends.append(record)
            self._bytes_sent += size_bytes

    def fail_send(self, send: Transfer, why: str, stalled: bool = False) -> None:
        with self._cond:
            self._errors.append(f"send of block {send.block} to {send.dst} (step {send.step}) "
                                f"failed: {why}")
            if stalled and send.dst not in self._stalled:
                self._stalled.append(send.dst)

    def finish(self, node: str, role: NodeRole) -> AgentReport:
        """The report; raises MulticastError if a planned block is missing or a send failed."""
        with self._cond:
            missing = sorted(self._expected - self._held)
            # Blamed: planned senders that were admitted and sent nothing. The senders of later
            # receives were never admitted: they wait behind the stalled one, blameless.
            # A cancelled run (a newer plan replaced it) blames nobody: its peers stopped too.
            cancelled = self.cancelled.is_set()
            blamed = [b for b in missing if b in role.receives and b in self._granted
                      and b not in self._lost]
            stalled = [] if cancelled else list(dict.fromkeys(
                [role.receives[b].src for b in blamed] + self._stalled))
            waited = [f"block {b} from {role.receives[b].src} (step {role.receives[b].step}) "
                      + ("never arrived" if b in self._granted else "was never admitted: an "
                         "earlier receive did not arrive")
                      for b in missing if b in role.receives and b not in self._lost]
            report = AgentReport(node, self.t0, self.now(), self._arrival_s, tuple(self._sends),
                                 self._bytes_sent, self._bytes_received, self._corrupt,
                                 tuple(missing), tuple(self._errors + waited),
                                 self._refetched, self._resent)
            failed_sends = len(self._sends) < len(role.sends)
        if missing or failed_sends:
            why = "cancelled (a newer plan replaced it): " if cancelled else ""
            raise MulticastError(
                f"{node}: {why}missing blocks {missing}, {len(role.sends) - len(report.sends)} of "
                f"{len(role.sends)} sends failed after {report.elapsed_s:.1f} s; stalled peers "
                f"{stalled}, corrupt peers {self._corrupt_peers}: {'; '.join(report.errors)}",
                missing_blocks=missing, stalled_peers=stalled,
                corrupt_peers=self._corrupt_peers, report=report)
        return report
