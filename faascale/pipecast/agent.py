"""The PipeCast node agent: runs one node's part of a ``MulticastPlan`` over a ``Transport``.

Every node of a plan runs one agent. ``NodeAgent.execute`` does three things at once:

- **sends**, in the caller's thread: the node's transfers one at a time, in plan step order; each
  waits until the node holds its block (held at the start, or received or loaded in this run)
  and the receiver has admitted it (see below); it goes zero-copy from the block file's mapping,
  with the manifest's blake3 as its digest (the transport does not hash it again);
- **receives**, in a thread: block frames as they arrive, each straight into a preallocated,
  mmap'd part file (``recv(into=...)``), checked (the frame's digest, which the transport has
  verified against the payload, must equal the manifest checksum; the size must match) and
  renamed into place. No second hash: the transport's blake3 is the manifest's algorithm;
- **local loads**, in a thread: the node's ``LocalLoad`` blocks copied from its local tier
  directory, hashed against the manifest, renamed into place; in plan step order.

No barriers: steps are not synchronised across nodes. A barrier per step would stretch every
step to its slowest transfer anywhere (``schedule.simulate``'s pessimistic model: SmolLM2's
184 MB embedding blocks would set the pace of every step they appear in). Two local rules keep
the step model instead:

- a node sends one block at a time, in plan step order, each once it holds the block;
- a node receives one block at a time, in plan step order (*admission*): it sends the planned
  sender of its next receive a small credit (a ``control`` frame) once the previous receive has
  been delivered (at once if the same peer sends both: one connection keeps them in order), and
  a sender sends only with the receiver's credit. Without it a fast sender's
  step s+1 overlapped a slow sender's step s on one receiver's inbound link; TCP shares the link
  fairly, which delays the earlier transfer, the one the pipeline waits on: PipeCast K=1 to 8
  nodes took 1.6x the link-only model at 250 Mbit/s, with the CPU 77 % idle.

Why it cannot deadlock: every wait is on something of an earlier step. A send of step s waits for
its block (received at a step < s, by a send of that earlier step) and for its credit (granted
once the receiver's receives of steps < s are delivered, each a send of an earlier step). By
induction on s every send happens while the peers are alive. A sender that gives a send up (it
never got the block) tells the receiver (a ``control`` frame), which counts that receive as
delivered, so a loss stays local.

Files: block i lives in ``holdings_dir / <manifest file name>`` (``block-0003.bin``). A block is
*held* when that file exists with the manifest's size; files present at the start are trusted (they
were verified when they were put there), received ones are verified before the rename. A part
file (``.part``) never outlives ``execute``.

Faults: ``execute`` raises ``MulticastError`` (carrying the partial ``AgentReport``) if, by the
deadline ``timeout_s``, a block the plan brings has not arrived (its planned sender stalled, died,
or sent it corrupt), or a send failed (the peer did not take it in time, or the node never got the
block to forward). A corrupt frame is dropped and counted, its block never renamed into place; the
plan sends each block once, so a block lost that way is given up at once rather than at the
deadline.

Process entry point, one agent per host (see ``main``)::

    python -m faascale.pipecast.agent --plan plan.json --name N --bind HOST:PORT \\
        --peers peers.json --blocks-dir DIR --model-dir PACKED --secret-file F \\
        [--local-dir DIR] [--start-at EPOCH_S | --start-file F] [--timeout-s S] \\
        --report out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import mmap
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from faascale.engine.blockio import hasher_for, preallocate
from faascale.pipecast.schedule import LocalLoad, MulticastPlan, PlanError, Transfer
from faascale.pipecast.transport import (
    CorruptFrameError,
    Header,
    Transport,
    TransportError,
    TransportTimeout,
    ZmqTransport,
)

log = logging.getLogger(__name__)
START_POLL_S = 0.002  # --start-file: how often to look for it (agents start within this)
MAX_EARLY_FRAMES = 4096  # control frames kept for the next plan (a peer started it first)
CREDIT_SEND_S = 5.0  # a credit (a small frame) a live peer takes at once; a dead one never
POLL_S = 0.05  # how often the receive thread looks at its stop flag; bounds execute's tail
COPY_CHUNK_BYTES = 16 << 20  # local loads read in chunks: one syscall per 16 MiB, little memory
PART_SUFFIX = ".part"
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: page tables filled in one call
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


# ---------------------------------------------------------------------------------------------
# Errors


class AgentError(Exception):
    """Base of the agent's errors."""


class AgentConfigError(AgentError, ValueError):
    """Bad input before any I/O: the node is not in the plan, a peer has no address, the node
    must send a block it neither holds nor gets, a plan or catalog file is malformed."""


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


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class BlockFile:
    """One block as the agent needs it: its file name, size and tagged checksum."""

    file: str
    size_bytes: int
    checksum: str  # "blake3:<hex>" (or "sha256:<hex>", packing format 1)


@dataclass(frozen=True)
class BlockCatalog:
    """The part of a ``ModelManifest`` the agent uses. ``read`` parses it from ``manifest.json``
    without importing the engine: that import pulls in torch, 2.4 s per agent process here (eight
    agents on two cores would take ~10 s to start)."""

    model_id: str
    blocks: tuple[BlockFile, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @classmethod
    def of(cls, manifest: Any) -> BlockCatalog:
        """From a ``ModelManifest`` (or a catalog, returned as is)."""
        if isinstance(manifest, BlockCatalog):
            return manifest
        return cls(manifest.model_id, tuple(BlockFile(b.file, b.size_bytes, b.checksum)
                                            for b in manifest.blocks))

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> BlockCatalog:
        """From ``model_dir/manifest.json``. Raises AgentConfigError if absent or malformed."""
        path = Path(model_dir) / "manifest.json"
        try:
            d = json.loads(path.read_text())
            if d["format"] != "faascale-blocks":
                raise ValueError(f"format {d['format']!r}")
            return cls(str(d["model_id"]), tuple(
                BlockFile(str(b["file"]), int(b["size_bytes"]),
                          b["checksum"] if "checksum" in b else f"sha256:{b['sha256']}")
                for b in d["blocks"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AgentConfigError(f"{path}: not a packed model manifest: {e}") from e


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


@dataclass(frozen=True)
class NodeRole:
    """One node's part of a plan. ``sends`` in step order; ``receives[block]``: the transfer that
    brings it; ``loads`` in step order."""

    sends: tuple[Transfer, ...]
    receives: Mapping[int, Transfer]
    loads: tuple[LocalLoad, ...]


def role_of(plan: MulticastPlan, node: str) -> NodeRole:
    """``node``'s sends, receives and local loads in ``plan``. Pure. Raises AgentConfigError if
    the node is not in the plan."""
    if node not in plan.sources and node not in plan.targets:
        raise AgentConfigError(f"node {node!r} is not in the {plan.algorithm} plan")
    receives: dict[int, Transfer] = {}
    for t in plan.transfers:  # sorted by step: the first transfer of a block brings it
        if t.dst == node:
            receives.setdefault(t.block, t)
    return NodeRole(tuple(t for t in plan.transfers if t.src == node),
                    MappingProxyType(receives),
                    tuple(x for x in plan.local_loads if x.node == node))


def plan_to_json(plan: MulticastPlan) -> str:
    """A plan as JSON (``plan_from_json`` reads it back equal)."""
    return json.dumps({"algorithm": plan.algorithm, "sources": list(plan.sources),
                       "targets": list(plan.targets), "num_blocks": plan.num_blocks,
                       "transfers": [[t.step, t.src, t.dst, t.block] for t in plan.transfers],
                       "local_loads": [[x.step, x.node, x.block] for x in plan.local_loads],
                       "unlimited_senders": sorted(plan.unlimited_senders),
                       "initial": {n: sorted(b) for n, b in plan.initial.items()}})


def plan_from_json(text: str) -> MulticastPlan:
    """Parse and validate a plan. Raises AgentConfigError if malformed or invalid."""
    try:
        d = json.loads(text)
        plan = MulticastPlan(d["algorithm"], d["sources"], d["targets"], d["num_blocks"],
                             tuple(Transfer(*t) for t in d["transfers"]),
                             tuple(LocalLoad(*x) for x in d["local_loads"]),
                             frozenset(d.get("unlimited_senders", ())),
                             {str(n): frozenset(int(x) for x in b)
                              for n, b in d.get("initial", {}).items()})
        plan.validate()
    except (ValueError, KeyError, TypeError, PlanError) as e:
        raise AgentConfigError(f"not a valid multicast plan: {e}") from e
    return plan


# ---------------------------------------------------------------------------------------------
# The agent


class NodeAgent:
    """One node's executor. ``manifest``: the model's ``ModelManifest`` (or a ``BlockCatalog``).
    ``holdings_dir``: where the node has and puts block files (created if missing).
    ``local_dir``: the node's local tier, read by ``LocalLoad`` entries. ``admission=False``
    (for measurements only) sends without waiting for credits and grants none: every agent of
    a plan must agree. The agent owns the transport's receiving side while ``execute`` runs;
    one ``execute`` at a time. ``on_block(i)`` is called (from the agent's threads) the moment
    block ``i`` is in place, received or loaded: PipeCast reports it to the coordinator, which
    may form a pipeline with it before the plan is done."""

    def __init__(self, name: str, transport: Transport, manifest: Any,
                 holdings_dir: str | os.PathLike, clock: Callable[[], float] = time.monotonic,
                 local_dir: str | os.PathLike | None = None, admission: bool = True,
                 on_block: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._on_block = on_block
        self._transport = transport
        self._catalog = BlockCatalog.of(manifest)
        self._dir = Path(holdings_dir)
        self._local_dir = None if local_dir is None else Path(local_dir)
        self._clock = clock
        self._landing: _Landing | None = None  # part files made by prepare()
        self._admission = admission
        self._running: _Progress | None = None
        self._early: dict[str, list[Header]] = {}  # control frames of a plan not yet started

    def cancel(self) -> None:
        """Give up the ``execute`` in progress (another thread calls this): it returns within
        about POLL_S, raising ``MulticastError`` with what is missing; a no-op when idle. The
        coordinator does this before it hands the node a repair plan."""
        running = self._running
        if running is not None:
            running.cancelled.set()

    def path(self, block: int) -> Path:
        """Where block ``block`` is (or will be) in place."""
        return self._dir / self._catalog.blocks[block].file

    def held(self) -> frozenset[int]:
        """Blocks in place now (file present with the manifest size). Reads the directory."""
        return frozenset(i for i, b in enumerate(self._catalog.blocks)
                         if _size(self._dir / b.file) == b.size_bytes)

    def prepare(self, plan: MulticastPlan) -> None:
        """Optional, before ``execute``: create the part files of the blocks ``plan`` brings this
        node over the network, preallocated and with their pages faulted in, so that landing a
        block costs no page faults while the clock runs (fresh pages cost this VM ~2.5 s of CPU
        per GB: its balloon hands freed memory back to the host). Mutates ``holdings_dir`` (part
        files; ``execute`` removes what it does not use). Raises AgentConfigError for a node not
        in the plan, OSError if the space cannot be reserved."""
        role = role_of(plan, self.name)
        self._dir.mkdir(parents=True, exist_ok=True)
        landing = self._landing or _Landing(self._dir, self._catalog)
        self._landing = landing
        for block in sorted(set(role.receives) - self.held()):
            if self._catalog.blocks[block].size_bytes and block not in landing.parts:
                landing.prepare(block)

    def execute(self, plan: MulticastPlan, peers: Mapping[str, str],
                timeout_s: float, plan_id: str = "") -> AgentReport:
        """Run this node's part of ``plan`` (see the module docstring); return when every planned
        send is done and every planned block is in place, within about ``timeout_s`` (+ POLL_S).

        ``peers``: transport address of every node this one sends to (required) or receives
        from (its credits go there; a sender without an address is not asked to wait for
        one). Transport names must be the plan's node names. Mutates ``holdings_dir``
        (block files appear; nothing else is left). Raises AgentConfigError before any I/O for a
        node not in the plan, a plan for another model size, a missing peer address or a block
        to send that the node neither holds nor gets; MulticastError if the part did not
        complete (see the class)."""
        role = self._check(plan, peers)
        self._dir.mkdir(parents=True, exist_ok=True)
        expected = set(role.receives) | {x.block for x in role.loads}
        progress = _Progress(self.held(), self._clock, expected, self._on_block, plan_id)
        self._running = progress
        deadline = progress.t0 + timeout_s
        landing, self._landing = self._landing or _Landing(self._dir, self._catalog), None
        admission = _Admission(role.receives.values() if self._admission else (), peers)
        for send in () if self._admission else role.sends:
            progress.credit(send.dst, send.step)
        workers = [threading.Thread(target=self._receive_loop,
                                    args=(progress, landing, admission), daemon=True,
                                    name=f"agent-{self.name}-recv"),
                   threading.Thread(target=self._grant_loop, args=(progress, admission, deadline),
                                    daemon=True, name=f"agent-{self.name}-grant")]
        if role.loads:
            workers.append(threading.Thread(target=self._load_loop, args=(role, progress),
                                            daemon=True, name=f"agent-{self.name}-load"))
        early, self._early = self._early.get(plan_id, []), {}
        for header in early:  # frames for this plan that came while the last one was ending
            self._on_control(header, progress, admission)
        for w in workers:
            w.start()
        try:
            admission.start()
            for send in role.sends:  # observe (block here, admitted?) -> decide -> act
                lacking = progress.wait_ready(send, deadline)
                if lacking is None:
                    self._send(send, peers[send.dst], deadline, progress)
                elif lacking == "block":
                    progress.fail_send(send, "the node never got the block to forward")
                    self._cancel(send, peers[send.dst], progress)
                else:
                    progress.fail_send(send, f"{send.dst} did not admit it (no credit) in time",
                                       stalled=True)
            progress.wait_all_settled(deadline)
        finally:
            progress.stop.set()
            self._running = None
            for w in workers:
                w.join()
            landing.close()
            for part in self._dir.glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)
        return progress.finish(self.name, role)

    # -- checks ---------------------------------------------------------------------------------

    def _check(self, plan: MulticastPlan, peers: Mapping[str, str]) -> NodeRole:
        if plan.num_blocks != self._catalog.num_blocks:
            raise AgentConfigError(f"the plan moves {plan.num_blocks} blocks; model "
                                   f"{self._catalog.model_id} has {self._catalog.num_blocks}")
        role = role_of(plan, self.name)
        unknown = sorted({t.dst for t in role.sends} - set(peers))
        if unknown:
            raise AgentConfigError(f"{self.name}: no transport address for peers {unknown}")
        coming = self.held() | set(role.receives) | {x.block for x in role.loads}
        lacking = sorted({t.block for t in role.sends} - coming)
        if lacking:
            raise AgentConfigError(f"{self.name} must send blocks {lacking} that it neither "
                                   f"holds in {self._dir} nor gets in the plan")
        if role.loads and self._local_dir is None:
            raise AgentConfigError(f"{self.name} has local loads in the plan but no local_dir")
        return role

    # -- sending ----------------------------------------------------------------------------------

    def _send(self, send: Transfer, address: str, deadline: float, progress: _Progress) -> None:
        start = progress.now()
        algorithm, _, hexdigest = self._catalog.blocks[send.block].checksum.partition(":")
        try:
            with _mapped(self.path(send.block)) as view:
                # A held block is the manifest's bytes (verified when it was put in place), so
                # its blake3 is known: the transport need not hash it again (a file changed
                # since is caught by the receiver, whose transport still checks the bytes).
                self._transport.send(address, "block", {"plan": progress.plan_id,
                                                        "model_id": self._catalog.model_id,
                                                        "index": send.block}, view,
                                     timeout_s=max(0.0, deadline - self._clock()),
                                     digest=bytes.fromhex(hexdigest)
                                     if algorithm == "blake3" else None)
        except TransportTimeout:
            progress.fail_send(send, f"{send.dst} did not take the frame in time", stalled=True)
        except (TransportError, OSError) as e:
            progress.fail_send(send, f"{type(e).__name__}: {e}")
        else:
            progress.sent(SendRecord(send.step, send.block, send.dst, start, progress.now()),
                          self._catalog.blocks[send.block].size_bytes)

    def _cancel(self, send: Transfer, address: str, progress: _Progress) -> None:
        """Tell the receiver that ``send`` will not come, so that it admits its next sender."""
        try:
            self._transport.send(address, "control", {"plan": progress.plan_id,
                                                      "model_id": self._catalog.model_id,
                                                      "cancel_step": send.step,
                                                      "index": send.block}, timeout_s=POLL_S)
        except TransportError as e:
            progress.note(f"could not tell {send.dst} that block {send.block} will not come: {e}")

    # -- receiving --------------------------------------------------------------------------------

    def _receive_loop(self, progress: _Progress, landing: _Landing,
                      admission: _Admission) -> None:
        def into(header: Header) -> Any:  # the frame is here: admit the next sender at once
            if header.kind == "block" and header.meta.get("plan", "") != progress.plan_id:
                raise _Refused(f"dropped block {header.meta.get('index')} of another plan "
                               f"from {header.sender}")
            try:
                return landing.open(header)
            finally:
                if header.meta.get("model_id") == self._catalog.model_id:
                    admission.delivered(header.meta.get("index"))

        while not progress.stop.is_set():
            bad: CorruptFrameError | None = None
            try:
                message = self._transport.recv(POLL_S, into=into)
            except TransportTimeout:
                continue
            except _Refused as e:
                if e.corrupt:
                    progress.corrupt(e.block, e.sender, str(e))
                else:
                    progress.note(str(e))
                continue
            except CorruptFrameError as e:  # handled below, once the traceback (and with it
                bad = CorruptFrameError(str(e), e.header)  # a view of the mapping) is gone
            except TransportError as e:  # closed under us: nothing more will arrive
                progress.note(f"receive failed: {e}")
                return
            if bad is not None:
                progress.corrupt(landing.discard(bad.header), bad.header.sender, str(bad))
                continue
            header = message.header
            del message  # releases the view of the mapping before it is closed
            if header.kind == "control":
                self._on_control(header, progress, admission)
                continue
            block, sender = int(header.meta["index"]), header.sender
            admission.delivered(block)  # again for a zero-byte block (no into call)
            try:
                landing.commit(block, sender)
            except _Refused as e:
                progress.corrupt(block, sender, str(e))
            except (OSError, ValueError) as e:
                progress.lose(block, f"could not put block {block} in place: {e}")
            else:
                progress.arrive(block, self._catalog.blocks[block].size_bytes, network=True)

    def _on_control(self, header: Header, progress: _Progress, admission: _Admission) -> None:
        meta = header.meta
        if meta.get("model_id") != self._catalog.model_id:
            progress.note(f"dropped a control frame from {header.sender!r} for another model")
        elif meta.get("plan", "") != progress.plan_id:  # a repair plan a peer already started
            early = self._early.setdefault(str(meta.get("plan")), [])
            if len(early) < MAX_EARLY_FRAMES:
                early.append(header)
        elif type(meta.get("credit_step")) is int:
            progress.credit(header.sender, meta["credit_step"])
        elif type(meta.get("cancel_step")) is int and type(meta.get("index")) is int:
            progress.lose(meta["index"], f"{header.sender} gave up sending block "
                                         f"{meta['index']} (step {meta['cancel_step']})")
            admission.delivered(meta["index"])

    def _grant_loop(self, progress: _Progress, admission: _Admission, deadline: float) -> None:
        """Send the credits ``admission`` hands out (its own thread: a slow peer must not hold
        up receiving)."""
        while not progress.stop.is_set():
            grant = admission.next_grant(POLL_S)
            if grant is None:
                continue
            receive, address = grant
            progress.granted(receive.block)
            if address is None:  # a sender we cannot reach does not wait for credits
                continue
            try:
                self._transport.send(address, "control", {"plan": progress.plan_id,
                                                          "model_id": self._catalog.model_id,
                                                          "credit_step": receive.step},
                                     timeout_s=min(CREDIT_SEND_S,
                                                   max(0.0, deadline - self._clock())))
            except TransportError as e:
                progress.note(f"could not admit {receive.src} (block {receive.block}): {e}")

    # -- local loads ------------------------------------------------------------------------------

    def _load_loop(self, role: NodeRole, progress: _Progress) -> None:
        assert self._local_dir is not None
        for load in role.loads:
            if progress.stop.is_set():
                return
            info = self._catalog.blocks[load.block]
            try:
                _copy_verified(self._local_dir / info.file, self.path(load.block), info)
            except (OSError, ValueError, _Refused) as e:
                progress.lose(load.block, f"local load of block {load.block} failed: {e}")
            else:
                progress.arrive(load.block, info.size_bytes, network=False)


# ---------------------------------------------------------------------------------------------
# Shared state of one execute


class _Progress:
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

    def wait_ready(self, send: Transfer, deadline: float) -> Literal["block", "credit"] | None:
        """Wait until ``send`` may go: None once its block is held and its receiver admitted it;
        else what it lacks when the block was lost or the deadline passed."""
        def ready() -> bool:
            return send.block in self._lost or (send.block in self._held
                                                 and (send.dst, send.step) in self._credits)
        self._wait(ready, deadline)
        with self._cond:
            if send.block not in self._held:
                return "block"
            return None if (send.dst, send.step) in self._credits else "credit"

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
            self._bytes_received += size_bytes if network else 0
            self._cond.notify_all()
        if new and self._on_block is not None:
            try:
                self._on_block(block)
            except Exception:  # the caller's bug must not lose the block or stall the plan
                log.exception("on_block(%d) failed", block)

    def lose(self, block: int | None, why: str) -> None:
        with self._cond:
            self._errors.append(why)
            if block is not None and block in self._expected and block not in self._held:
                self._lost.setdefault(block, why)
            self._cond.notify_all()

    def corrupt(self, block: int | None, sender: str, why: str) -> None:
        with self._cond:
            self._corrupt += 1
            if sender not in self._corrupt_peers:
                self._corrupt_peers.append(sender)
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
            blamed = [b for b in missing if b in role.receives and b in self._granted
                      and b not in self._lost]
            stalled = list(dict.fromkeys([role.receives[b].src for b in blamed] + self._stalled))
            waited = [f"block {b} from {role.receives[b].src} (step {role.receives[b].step}) "
                      + ("never arrived" if b in self._granted else "was never admitted: an "
                         "earlier receive did not arrive")
                      for b in missing if b in role.receives and b not in self._lost]
            report = AgentReport(node, self.t0, self.now(), self._arrival_s, tuple(self._sends),
                                 self._bytes_sent, self._bytes_received, self._corrupt,
                                 tuple(missing), tuple(self._errors + waited))
            failed_sends = len(self._sends) < len(role.sends)
        if missing or failed_sends:
            raise MulticastError(
                f"{node}: missing blocks {missing}, {len(role.sends) - len(report.sends)} of "
                f"{len(role.sends)} sends failed after {report.elapsed_s:.1f} s; stalled peers "
                f"{stalled}, corrupt peers {self._corrupt_peers}: {'; '.join(report.errors)}",
                missing_blocks=missing, stalled_peers=stalled,
                corrupt_peers=self._corrupt_peers, report=report)
        return report


class _Admission:
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


# ---------------------------------------------------------------------------------------------
# Block files (the agent's file side effects)


class _Refused(Exception):
    """A frame or file refused before use. ``corrupt``: its bytes are not the block."""

    def __init__(self, why: str, block: int | None = None, sender: str = "",
                 corrupt: bool = False) -> None:
        super().__init__(why)
        self.block, self.sender, self.corrupt = block, sender, corrupt


@dataclass
class _Landing:
    """Part files of blocks being received: preallocated, mapped, renamed into place. Used by
    one thread at a time (``prepare``'s caller, then the receive thread)."""

    dir: Path
    catalog: BlockCatalog
    parts: dict[int, mmap.mmap] = field(default_factory=dict)

    def _part_path(self, block: int) -> Path:
        return self.dir / (self.catalog.blocks[block].file + PART_SUFFIX)

    def open(self, header: Header) -> Any:
        """``recv``'s ``into``: the mapping to receive block ``header.meta['index']`` into.
        Raises _Refused for a frame that is not one of this model's blocks (its bytes would not
        be the block: the digest or size differ from the manifest)."""
        index, model = header.meta.get("index"), header.meta.get("model_id")
        if header.kind != "block" or model != self.catalog.model_id or type(index) is not int \
                or not 0 <= index < self.catalog.num_blocks:
            raise _Refused(f"dropped a {header.kind} frame from {header.sender!r} for "
                           f"{model!r} block {index!r}: not a block of {self.catalog.model_id}")
        info = self.catalog.blocks[index]
        if header.payload_bytes != info.size_bytes \
                or _digest_matches(info.checksum, header.digest) is False:
            raise _Refused(f"block {index} from {header.sender!r}: {header.payload_bytes} "
                           f"bytes, digest {header.digest.hex()[:16]}… (manifest: "
                           f"{info.size_bytes} bytes, {info.checksum[:23]}…)",
                           index, header.sender, corrupt=True)
        return self.parts.get(index) or self.prepare(index)  # a prepared (or earlier) part

    def prepare(self, block: int) -> mmap.mmap:
        """Create block ``block``'s part file: preallocated, mapped, its pages faulted in."""
        size = self.catalog.blocks[block].size_bytes
        try:
            with open(self._part_path(block), "w+b") as f:  # the mapping keeps its own fd
                preallocate(f.fileno(), size)
                mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except BaseException:
            self._part_path(block).unlink(missing_ok=True)
            raise
        self.parts[block] = mapping
        return mapping

    def close(self) -> None:
        """Drop every part file not put in place."""
        for block, mapping in self.parts.items():
            _close(mapping)
            self._part_path(block).unlink(missing_ok=True)
        self.parts.clear()

    def commit(self, block: int, sender: str) -> None:
        """Put a received block in place. ``open`` checked its size and frame digest against the
        manifest, the transport the bytes against the digest; a manifest that is not blake3
        (packing format 1) is checked here by hashing the block. Raises _Refused (corrupt:
        nothing put in place) or OSError."""
        info = self.catalog.blocks[block]
        part = self.parts.pop(block, None)
        if part is None:  # a zero-byte payload: recv never called into()
            self._part_path(block).write_bytes(b"")
        algorithm, _, expected = info.checksum.partition(":")
        try:
            if part is None or algorithm != "blake3":
                hasher = hasher_for(info.checksum)
                hasher.update(b"" if part is None else part)
                if info.size_bytes != (0 if part is None else len(part)) \
                        or hasher.hexdigest() != expected:
                    raise _Refused(f"block {block} from {sender!r} does not match the "
                                   f"manifest's {algorithm}", block, sender, corrupt=True)
        except BaseException:
            self._part_path(block).unlink(missing_ok=True)
            raise
        finally:
            if part is not None:
                _close(part)
        os.replace(self._part_path(block), self.dir / info.file)

    def discard(self, header: Header) -> int | None:
        """Drop the part file of the block ``header`` names, if any; that block (or None)."""
        index = header.meta.get("index")
        part = self.parts.pop(index, None) if type(index) is int else None
        if part is not None:
            _close(part)
            self._part_path(index).unlink(missing_ok=True)
        return index if type(index) is int else None


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a view of it is still alive somewhere: the GC unmaps it later
        pass


def _digest_matches(checksum: str, digest: bytes) -> bool | None:
    """Whether a frame's blake3 digest (checked against its payload by the transport) is the
    manifest checksum; None if the manifest uses another algorithm (the bytes must be hashed)."""
    algorithm, _, hexdigest = checksum.partition(":")
    return digest.hex() == hexdigest if algorithm == "blake3" else None


def _copy_verified(src: Path, dst: Path, info: BlockFile) -> None:
    """Copy a local-tier block file to ``dst`` through a part file, hashing it on the way; rename
    only if it matches the manifest. Raises OSError or _Refused (corrupt or wrong size)."""
    part = dst.with_name(dst.name + PART_SUFFIX)
    expected = info.checksum.partition(":")[2]
    hasher = hasher_for(info.checksum)
    try:
        with open(src, "rb") as f, open(part, "wb") as out:
            if os.fstat(f.fileno()).st_size != info.size_bytes:
                raise _Refused(f"{src} is not {info.size_bytes} bytes")
            buf = bytearray(min(COPY_CHUNK_BYTES, max(1, info.size_bytes)))
            view = memoryview(buf)
            while n := f.readinto(buf):
                hasher.update(view[:n])
                out.write(view[:n])
        if hasher.hexdigest() != expected:
            raise _Refused(f"{src} does not match the manifest checksum", corrupt=True)
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """A read-only view of a block file (zero copy for the transport)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    try:
        yield memoryview(mm)
    finally:  # after a failed send the transport's views may live on in a traceback
        _close(mm)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Process entry point


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m faascale.pipecast.agent",
                                 description="Run one node's part of a PipeCast multicast plan.")
    ap.add_argument("--plan", required=True, type=Path, help="plan JSON (plan_to_json)")
    ap.add_argument("--name", required=True, help="this node's name in the plan")
    ap.add_argument("--bind", required=True, help="HOST:PORT the transport listens on")
    ap.add_argument("--peers", required=True, type=Path, help="JSON {node: tcp://host:port}")
    ap.add_argument("--blocks-dir", required=True, type=Path, help="the node's holdings")
    ap.add_argument("--model-dir", required=True, type=Path, help="a packed model (its manifest)")
    ap.add_argument("--secret-file", required=True, type=Path, help="the cluster secret")
    ap.add_argument("--local-dir", type=Path, help="the node's local tier, for local loads")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--start-at", type=float, default=0.0,
                       help="wall-clock time (epoch s) to start at, shared by all agents")
    start.add_argument("--start-file", type=Path,
                       help="wait for this file, then start at the epoch time it holds (for a "
                            "launcher that starts everyone once all agents print ready)")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--no-admission", action="store_true",
                    help="send without the receivers' credits (measurements only; all agents)")
    ap.add_argument("--report", required=True, type=Path, help="where to write the JSON report")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Bind, prepare (part files), print ``ready <address>``, wait for ``--start-at`` (or the
    time in ``--start-file``), execute, write the report:
    ``{"report": AgentReport, "start_epoch_s", "cpu_s", "error"}``. Exit 0 if the node's part
    completed, 1 on MulticastError (report written too), 2 on bad input."""
    args = _parse_args(argv)
    _keep_freed_memory()
    try:
        plan = plan_from_json(args.plan.read_text())
        peers = json.loads(args.peers.read_text())
        catalog = BlockCatalog.read(args.model_dir)
        host, _, port = args.bind.rpartition(":")
        transport = ZmqTransport(secret=args.secret_file.read_bytes(), name=args.name,
                                 bind_host=host, port=int(port))
    except (AgentConfigError, OSError, ValueError, TransportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with transport:
        agent = NodeAgent(args.name, transport, catalog, args.blocks_dir,
                          local_dir=args.local_dir, admission=not args.no_admission)
        try:
            agent.prepare(plan)
        except (AgentConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ready {transport.address}", flush=True)
        start_at = _start_time(args)
        if start_at is None:
            print(f"error: {args.start_file} did not appear in {args.timeout_s} s",
                  file=sys.stderr)
            return 2
        time.sleep(max(0.0, start_at - time.time()))
        start_epoch_s, cpu0 = time.time(), _cpu_s()
        error = None
        try:
            report = agent.execute(plan, peers, args.timeout_s)
        except MulticastError as e:
            report, error = e.report, str(e)
        except AgentConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = {"report": json.loads(report.to_json()), "start_epoch_s": start_epoch_s,
               "cpu_s": _cpu_s() - cpu0, "error": error}
    write_json(args.report, out)
    return 1 if error else 0


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that a reader polling ``path`` never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _start_time(args: argparse.Namespace) -> float | None:
    """The shared start (epoch s); None if ``--start-file`` did not appear within the timeout."""
    if args.start_file is None:
        return args.start_at
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:  # a poll: the launcher writes it once (atomically)
        with contextlib.suppress(OSError, ValueError):
            return float(args.start_file.read_text())
        time.sleep(START_POLL_S)
    return None


def _keep_freed_memory() -> None:
    """Let freed large allocations stay in the heap. libzmq receives every block into a fresh
    malloc'd message; glibc serves sizes above 32 MiB with mmap and unmaps them on free, so each
    block landed in new pages: a fault per 4 KiB (a 1 GB model cost the receiver 0.7 s more CPU,
    2.6 s instead of 1.9 s, measured on 1 Gbit/s emulated links). Linux glibc only; else a no-op."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_MAX, 0)  # big allocations from the heap ...
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ... which is not trimmed after a free
    except (OSError, AttributeError):
        pass


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (ZeroMQ's I/O thread and blake3's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
