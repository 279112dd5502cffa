"""The PipeCast node agent: runs one node's part of a ``MulticastPlan`` over a ``Transport``.

Every node of a plan runs one agent. ``NodeAgent.execute`` does four things at once:

- **sends**, in the caller's thread: the node's transfers one at a time, in plan step order; each
  waits until the receiver has admitted it (see below) and the node has the block's first piece
  (held at the start, or received or loaded in this run), then sends the block piece by piece,
  each as soon as it is here and verified (*cut-through*: a hop costs a piece, not a block),
  zero-copy from the block file's mapping (the part file's, while the block is still landing),
  with the manifest's blake3 of the piece as its digest (the transport does not hash it again);
- **receives**, in a thread: piece frames as they arrive, each straight into its place in a
  preallocated, mmap'd part file (``recv(into=...)``), checked (the frame's digest, which the
  transport has verified against the payload, must equal the manifest's piece checksum; the
  size must match); the block is renamed into place once every piece landed. No second hash:
  the transport's blake3 is the manifest's algorithm. A corrupt piece, and one a later frame of
  its sender shows lost on the way (``Progress.lost_on_the_way``), is asked for again from its
  sender (``MAX_REFETCHES`` times, each answered within ``REFETCH_WAIT_S``, else the block is
  lost: the coordinator's repair fetches it elsewhere); a sender answers while its ``execute``
  runs (a thread of its own). Blocks without pieces (packing formats 1 and 2) move as one piece;
- **local loads**, in a thread: the node's ``LocalLoad`` blocks copied from its local tier
  directory, hashed against the manifest, renamed into place; in plan step order;
- **store loads**, in a thread: the plan's transfers from the object store to this node (a
  scale from zero), each fetched by the node's block store (``store_loader``); in plan step
  order, and first: a receive from a peer of step s is admitted only once the store loads of
  steps < s are done (*store first*, ``admission.py``: they are the node's part of the model,
  the part a temporary pipeline waits for; a peer's block beside them would share the node's
  link and delay it).

No barriers: steps are not synchronised across nodes. A barrier per step would stretch every
step to its slowest transfer anywhere (``schedule.simulate``'s pessimistic model: SmolLM2's
184 MB embedding blocks would set the pace of every step they appear in). Two local rules keep
the step model instead:

- a node sends one block at a time, in plan step order, each once it holds the block;
- a node receives one block at a time, in plan step order (*admission*): it sends the planned
  sender of its next receive a small credit (a ``control`` frame) once the previous receive has
  been delivered (at once if the same peer sends both: one connection keeps them in order), and
  a sender sends only with the receiver's credit (with store loads in the plan, also once this
  node's store loads of earlier steps are done: store first). Without credits a fast sender's
  step s+1 overlapped a slow sender's step s on one receiver's inbound link; TCP shares the link
  fairly, which delays the earlier transfer, the one the pipeline waits on: PipeCast K=1 to 8
  nodes took 1.6x the link-only model at 250 Mbit/s, with the CPU 77 % idle.

Why it cannot deadlock: every wait is on something of an earlier step. A send of step s waits for
its block (received at a step < s, by a send of that earlier step) and for its credit (granted
once the receiver's receives of steps < s are delivered, each a send of an earlier step, and
its store loads of steps < s are done, which wait on nothing in the plan and each hold it back
at most ``admission.store_load_bound_s``: a store that hangs delays, never stops, the receives).
By induction on s every send happens while the peers are alive. A sender that gives a send up (it
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
deadline. So is a block whose part file cannot be made (the disk or ``/dev/shm`` is full: ENOSPC,
or any OSError): nothing of it is left, its later pieces are refused, the other blocks go on, and
the coordinator re-plans the lost one (``service.py``).

Its parts: ``plan_io`` (catalog, roles, plans as JSON), ``progress`` (one execute's state and
report), ``admission`` (credits), ``sender`` (sends and resends), ``landing`` (block files),
``agent_cli`` (the process).

Process entry point, one agent per host: ``python -m faascale.pipecast.agent`` (``agent_cli``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from faascale.pipecast.admission import Admission
from faascale.pipecast.landing import (PART_SUFFIX, Landing, PieceRef, Refused, Unlanded,
                                       copy_verified, file_size)
from faascale.pipecast.plan_io import (AgentConfigError, AgentError, BlockCatalog, BlockFile,
                                       NodeRole, plan_from_json, plan_to_json, role_of, write_json)
from faascale.pipecast.progress import POLL_S, AgentReport, MulticastError, Progress, SendRecord
from faascale.pipecast.schedule import MulticastPlan, Transfer
from faascale.pipecast.sender import ASK_SEND_S, Sender
from faascale.pipecast.transport import (
    CorruptFrameError,
    Header,
    Transport,
    TransportError,
    TransportTimeout,
)

__all__ = ["AgentConfigError", "AgentError", "AgentReport", "BlockCatalog", "BlockFile",
           "MulticastError", "NodeAgent", "NodeRole", "SendRecord", "plan_from_json",
           "plan_to_json", "role_of", "write_json"]
log = logging.getLogger(__name__)
MAX_EARLY_FRAMES = 4096  # control frames kept for the next plan (a peer started it first)
CREDIT_SEND_S = 5.0  # a credit (a small frame) a live peer takes at once; a dead one never
MAX_REFETCHES = 2  # a corrupt piece is asked for again this often before its block is given up
REFETCH_WAIT_S = 2.0  # ... and each ask must be answered this soon (its sender may have ended)
# "0" turns store first off (``NodeAgent(store_first=...)``'s default): for the from-zero
# ablation of benchmarks/scaleout.py only, which sets it in the members' environment.
STORE_FIRST_ENV = "FAASCALE_PIPECAST_STORE_FIRST"


class NodeAgent:
    """One node's executor. ``manifest``: the model's ``ModelManifest`` (or a ``BlockCatalog``).
    ``holdings_dir``: where the node has and puts block files (created if missing).
    ``local_dir``: the node's local tier, read by ``LocalLoad`` entries. ``admission=False``
    (for measurements only) sends without waiting for credits and grants none: every agent of
    a plan must agree. ``store_first=False`` (for measurements only; None: on unless
    ``FAASCALE_PIPECAST_STORE_FIRST=0``) admits receives beside the node's store loads. The
    agent owns the transport's receiving side while ``execute`` runs; one ``execute`` at a time. ``on_block(i)`` is called (from the agent's threads) the moment
    block ``i`` is in place, received or loaded: PipeCast reports it to the coordinator, which
    may form a pipeline with it before the plan is done."""

    def __init__(self, name: str, transport: Transport, manifest: Any,
                 holdings_dir: str | os.PathLike, clock: Callable[[], float] = time.monotonic,
                 local_dir: str | os.PathLike | None = None, admission: bool = True,
                 on_block: Callable[[int], None] | None = None,
                 store_loader: Callable[[int], Path] | None = None,
                 store_name: str = "store", store_first: bool | None = None) -> None:
        self.name = name
        self._store_first = (os.environ.get(STORE_FIRST_ENV, "1").strip() != "0"
                             if store_first is None else store_first)
        # A plan's transfers from ``store_name`` (the object store: a scale from zero) to this
        # node are loads: ``store_loader(i)`` returns a verified file of block i on this node
        # (the node's block store fetched it), which is linked (or copied) into place.
        self._store_loader, self._store_name = store_loader, store_name
        self._on_block = on_block
        self._transport = transport
        self._catalog = BlockCatalog.of(manifest)
        self._dir = Path(holdings_dir)
        self._local_dir = None if local_dir is None else Path(local_dir)
        self._clock = clock
        self._sender = Sender(transport, self._catalog, self._dir, clock)
        self._landing: Landing | None = None  # part files made by prepare()
        self._admission = admission
        self._running: Progress | None = None
        self._keep: str | None = None  # cancel(keep=...): every other plan's run is cancelled
        self._early: dict[str, list[Header]] = {}  # control frames of a plan not yet started

    def cancel(self, keep: str | None = None) -> None:
        """Give up the ``execute`` in progress (another thread calls this): it returns within
        about POLL_S, raising ``MulticastError`` with what is missing; a no-op when idle. The
        coordinator does this before it hands the node a repair plan. ``keep``: the newest
        plan's id; a run of any other plan that starts later is cancelled at once too (an
        older plan still queued behind the running one must not run: its peers have moved on)."""
        self._keep = keep if keep is not None else self._keep
        running = self._running
        if running is not None and (keep is None or running.plan_id != keep):
            running.cancelled.set()

    def path(self, block: int) -> Path:
        """Where block ``block`` is (or will be) in place."""
        return self._dir / self._catalog.blocks[block].file

    def held(self) -> frozenset[int]:
        """Blocks in place now (file present with the manifest size). Reads the directory."""
        return frozenset(i for i, b in enumerate(self._catalog.blocks)
                         if file_size(self._dir / b.file) == b.size_bytes)

    def expect(self, plan_id: str) -> None:
        """Take frames of plan ``plan_id`` from now on, before ``execute`` runs it (a peer that
        started it first sends credits early: kept for it). "" (frames of no epoch) is a no-op."""
        if plan_id:
            self._transport.open_epoch(plan_id)

    def prepare(self, plan: MulticastPlan) -> None:
        """Optional, before ``execute``: create the part files of the blocks ``plan`` brings this
        node over the network, preallocated and with their pages faulted in, so that landing a
        block costs no page faults while the clock runs (fresh pages cost this VM ~2.5 s of CPU
        per GB: its balloon hands freed memory back to the host). Mutates ``holdings_dir`` (part
        files; ``execute`` removes what it does not use). Raises AgentConfigError for a node not
        in the plan, OSError if the space cannot be reserved."""
        role = role_of(plan, self.name)
        self._dir.mkdir(parents=True, exist_ok=True)
        landing = self._landing or Landing(self._dir, self._catalog)
        self._landing = landing
        for block in sorted(set(role.receives) - self.held()):
            if role.receives[block].src == self._store_name:
                continue  # loaded from the store's file, not landed from the network
            if self._catalog.blocks[block].size_bytes and block not in landing.parts:
                landing.prepare(block)

    def execute(self, plan: MulticastPlan, peers: Mapping[str, str],
                timeout_s: float, plan_id: str = "") -> AgentReport:
        """Run this node's part of ``plan`` (see the module docstring); return when every planned
        send is done and every planned block is in place, within about ``timeout_s`` (+ POLL_S).

        ``peers``: transport address of every node this one sends to (required) or receives
        from (its credits go there; a sender without an address is not asked to wait for
        one). Transport names must be the plan's node names. ``plan_id``: the plan's epoch
        (issued by the coordinator, never reused): every frame of the plan carries it, and the
        transport takes frames of it only while this runs (or since ``expect``); after, none.
        Mutates ``holdings_dir`` (block files appear; nothing else is left). Raises
        AgentConfigError before any I/O for a
        node not in the plan, a plan for another model size, a missing peer address or a block
        to send that the node neither holds nor gets; MulticastError if the part did not
        complete (see the class)."""
        self.expect(plan_id)
        try:
            role = self._check(plan, peers)
        except AgentConfigError:
            self.end_plan(plan_id)
            raise
        self._dir.mkdir(parents=True, exist_ok=True)
        expected = set(role.receives) | {x.block for x in role.loads}
        held = self.held()
        progress = Progress(held, self._clock, expected, self._on_block, plan_id)
        self._running = progress
        if self._keep is not None and plan_id != self._keep:  # a newer plan came first
            progress.cancelled.set()
        deadline = progress.t0 + timeout_s
        landing, self._landing = self._landing or Landing(self._dir, self._catalog), None
        from_store = sorted((t for t in role.receives.values() if t.src == self._store_name),
                            key=lambda t: t.step)
        network = [t for t in role.receives.values() if t.src != self._store_name]
        # the part files in the order their blocks come, made while earlier blocks land
        landing.prepare_ahead([t.block for t in sorted(network, key=lambda t: t.step)
                               if self._catalog.blocks[t.block].size_bytes and t.block not in held])
        admission = Admission(
            network if self._admission else (), peers,
            [(t, self._catalog.blocks[t.block].size_bytes) for t in from_store]
            if self._admission and self._store_first else (), self._clock)
        for send in () if self._admission else role.sends:
            progress.credit(send.dst, send.step)
        workers = [threading.Thread(target=self._receive_loop,
                                    args=(progress, landing, admission, role, peers), daemon=True,
                                    name=f"agent-{self.name}-recv"),
                   threading.Thread(target=self._grant_loop, args=(progress, admission, deadline),
                                    daemon=True, name=f"agent-{self.name}-grant")]
        if role.sends:
            workers.append(threading.Thread(target=self._sender.resend_loop,
                                            args=(progress, peers, deadline), daemon=True,
                                            name=f"agent-{self.name}-resend"))
        if role.loads:
            workers.append(threading.Thread(target=self._load_loop, args=(role, progress),
                                            daemon=True, name=f"agent-{self.name}-load"))
        if from_store:
            workers.append(threading.Thread(target=self._store_loop,
                                            args=(from_store, progress, admission),
                                            daemon=True, name=f"agent-{self.name}-store"))
        early, self._early = self._early.get(plan_id, []), {}
        for header in early:  # frames for this plan that came while the last one was ending
            self._on_control(header, progress, admission)
        for w in workers:
            w.start()
        try:
            admission.start()
            self._sender.send_all(role.sends, peers, deadline, progress)
            progress.wait_all_settled(deadline)
        finally:
            progress.stop.set()
            self._running = None
            for w in workers:
                w.join()
            self.end_plan(plan_id)
            landing.close()
            for part in self._dir.glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)
        return progress.finish(self.name, role)

    def end_plan(self, plan_id: str) -> None:
        """Refuse the plan's frames from now on (a straggler's, a replay of one)."""
        if plan_id:
            self._transport.close_epoch(plan_id)

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
        if self._store_loader is None and any(t.src == self._store_name
                                              for t in role.receives.values()):
            raise AgentConfigError(f"{self.name} must load blocks from {self._store_name!r} in "
                                   "the plan but has no store loader")
        return role

    # -- receiving --------------------------------------------------------------------------------

    def _receive_loop(self, progress: Progress, landing: Landing, admission: Admission,
                      role: NodeRole, peers: Mapping[str, str]) -> None:
        def into(header: Header) -> Any:  # the frame is here: admit the next sender at once
            if header.kind == "block" and header.epoch != progress.plan_id:
                raise Refused(f"dropped block {header.meta.get('index')} of another plan "
                               f"from {header.sender}")
            ref = PieceRef.of(header)
            if header.kind == "block" and header.meta.get("model_id") == self._catalog.model_id:
                admission.answered(ref.block)  # its sender has the credit
            try:
                if ref.block is not None and progress.is_lost(ref.block):
                    raise Refused(f"dropped piece {ref.piece} of block {ref.block} from "
                                   f"{header.sender}: the block was given up here")
                return landing.open(header)
            finally:
                if header.meta.get("model_id") == self._catalog.model_id \
                        and ref.block is not None and 0 <= ref.block < self._catalog.num_blocks \
                        and ref.piece == self._catalog.blocks[ref.block].num_pieces - 1:
                    admission.delivered(ref.block)  # its last piece is coming in

        while not progress.stop.is_set():
            for block, piece in progress.overdue_refetches(REFETCH_WAIT_S):
                landing.drop(block)
                progress.lose(block, f"piece {piece} of block {block}, asked for again, did "
                                     f"not come within {REFETCH_WAIT_S} s")
            bad: tuple[Header, str] | None = None
            try:
                message = self._transport.recv(POLL_S, into=into)
            except TransportTimeout:
                continue
            except Refused as e:
                if e.corrupt:
                    self._corrupt(progress, landing, role, peers, e.block, e.sender, str(e),
                                  e.piece)
                else:
                    progress.note(str(e))
                continue
            except Unlanded as e:  # no room for its part file (ENOSPC...): this block only
                landing.drop(e.block)
                progress.lose(e.block, str(e))
                continue
            except CorruptFrameError as e:  # handled below, once the traceback (and with it
                bad = (e.header, str(e))  # a view of the mapping) is gone
            except TransportError as e:  # closed under us: nothing more will arrive
                progress.note(f"receive failed: {e}")
                return
            if bad is not None:
                ref = PieceRef.of(bad[0])
                self._corrupt(progress, landing, role, peers, ref.block, bad[0].sender, bad[1],
                              ref.piece)
                continue
            header = message.header
            del message  # releases the view of the mapping before it is closed
            if header.kind == "control":
                self._on_control(header, progress, admission)
                continue
            block, piece, sender = int(header.meta["index"]), PieceRef.of(header).piece, \
                header.sender
            info = self._catalog.blocks[block]
            if info.size_bytes == 0:
                admission.delivered(block)  # a zero-byte block (no into call)
            else:
                complete = landing.land(block, piece)
                progress.land_piece(block, piece)
                for b, p in progress.lost_on_the_way(block, piece, {e: self._catalog.blocks[
                        e].num_pieces for e in role.earlier_from(sender, block)}):
                    self._ask_again(progress, landing, role, peers, b, sender, p,
                                    "lost on the way (a later frame of its sender came first)")
                if not complete:
                    continue
            try:
                landing.commit(block, sender)
            except Refused as e:
                progress.corrupt(block, sender, str(e))
            except (OSError, ValueError) as e:
                progress.lose(block, f"could not put block {block} in place: {e}")
            else:
                progress.arrive(block, info.size_bytes, network=True)

    def _corrupt(self, progress: Progress, landing: Landing, role: NodeRole,
                 peers: Mapping[str, str], block: int | None, sender: str, why: str,
                 piece: int) -> None:
        progress.count_corrupt(sender)  # a corrupt frame: counted, and asked for again
        self._ask_again(progress, landing, role, peers, block, sender, piece,
                        f"corrupt frame dropped: {why}")

    def _ask_again(self, progress: Progress, landing: Landing, role: NodeRole,
                   peers: Mapping[str, str], block: int | None, sender: str, piece: int,
                   why: str) -> None:
        """Ask ``block``'s planned sender for ``piece`` again if it has not been asked too
        often, else give the block up (its part file is dropped)."""
        planned = role.receives.get(block) if block is not None else None
        address = peers.get(planned.src) if planned is not None else None
        if block is not None and planned is not None and address is not None \
                and planned.src == sender and progress.ask_again(block, piece, MAX_REFETCHES):
            try:
                self._transport.send(address, "control", {
                    "model_id": self._catalog.model_id, "refetch": block, "piece": piece},
                    timeout_s=ASK_SEND_S, epoch=progress.plan_id)
                progress.note(f"{why}: piece {piece} of block {block} asked for again from "
                              f"{sender}")
                return
            except TransportError as e:
                progress.note(f"could not ask {sender} for block {block} piece {piece}: {e}")
        if block is not None and 0 <= block < self._catalog.num_blocks:
            landing.drop(block)
        progress.lose(block, why)

    def _on_control(self, header: Header, progress: Progress, admission: Admission) -> None:
        meta = header.meta
        if meta.get("model_id") != self._catalog.model_id:
            progress.note(f"dropped a control frame from {header.sender!r} for another model")
        elif header.epoch != progress.plan_id:  # a repair plan a peer already started
            early = self._early.setdefault(header.epoch, [])
            if len(early) < MAX_EARLY_FRAMES:
                early.append(header)
        elif type(meta.get("credit_step")) is int:
            progress.credit(header.sender, meta["credit_step"])
        elif type(meta.get("refetch")) is int and type(meta.get("piece")) is int:
            progress.request_resend(header.sender, meta["refetch"], meta["piece"])
        elif type(meta.get("bad_copy")) is int:
            progress.lose(meta["bad_copy"], f"{header.sender}'s own copy of block "
                                            f"{meta['bad_copy']} is corrupt")
        elif type(meta.get("cancel_step")) is int and type(meta.get("index")) is int:
            progress.lose(meta["index"], f"{header.sender} gave up sending block "
                                         f"{meta['index']} (step {meta['cancel_step']})")
            admission.delivered(meta["index"])

    def _grant_loop(self, progress: Progress, admission: Admission, deadline: float) -> None:
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
            admission.credit_sent(receive)  # again later, unless its block begins to arrive
            try:
                self._transport.send(address, "control", {"model_id": self._catalog.model_id,
                                                          "credit_step": receive.step},
                                     timeout_s=min(CREDIT_SEND_S,
                                                   max(0.0, deadline - self._clock())),
                                     epoch=progress.plan_id)
            except TransportError as e:
                progress.note(f"could not admit {receive.src} (block {receive.block}): {e}")

    # -- local loads ------------------------------------------------------------------------------

    def _load_loop(self, role: NodeRole, progress: Progress) -> None:
        assert self._local_dir is not None
        for load in role.loads:
            if progress.stop.is_set():
                return
            info = self._catalog.blocks[load.block]
            try:
                copy_verified(self._local_dir / info.file, self.path(load.block), info)
            except (OSError, ValueError, Refused) as e:
                progress.lose(load.block, f"local load of block {load.block} failed: {e}")
            else:
                progress.arrive(load.block, info.size_bytes, network=False)


    def _store_loop(self, loads: list[Transfer], progress: Progress,
                    admission: Admission) -> None:
        """The plan's blocks from the object store, in step order: each fetched by the node's
        block store (``store_loader``, which verified it), then hard-linked into place (a copy,
        hashed, when the two are on different file systems). Each one done (in place, or
        failed) is told to ``admission``: later receives may be admitted."""
        assert self._store_loader is not None
        for load in loads:
            if progress.stop.is_set():
                return
            info = self._catalog.blocks[load.block]
            try:
                src = Path(self._store_loader(load.block))
                if file_size(src) != info.size_bytes:
                    raise Refused(f"{src} is not {info.size_bytes} bytes")
                dst = self.path(load.block)
                dst.unlink(missing_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    copy_verified(src, dst, info)
            except Exception as e:  # noqa: BLE001 - the store or the tier failed: this block only
                progress.lose(load.block, f"store load of block {load.block} failed: "
                                          f"{type(e).__name__}: {e}")
            else:
                progress.arrive(load.block, info.size_bytes, network=False)
            admission.stored(load.block)


if __name__ == "__main__":
    import sys

    from faascale.pipecast.agent_cli import main

    sys.exit(main())
