"""The sending side of a ``NodeAgent`` (``agent.py``): one node's planned sends and its answers
to receivers that got a corrupt piece.

A send goes piece by piece, each once this node has it (cut-through: a block still landing is
read from its part file), zero-copy from the block file's mapping, with the manifest's blake3 of
the piece as its digest (the transport does not hash it again). A receiver that got a corrupt
piece asks for it again: ``resend_loop`` (a thread of its own) sends it once more, or says that
this node's own copy is corrupt. A send given up is cancelled at the receiver, so that it
admits its next sender (see ``agent.py``'s docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from faascale.engine.blockio import hasher_for
from faascale.pipecast.landing import PART_SUFFIX, mapped
from faascale.pipecast.plan_io import BlockCatalog
from faascale.pipecast.progress import POLL_S, Progress, SendRecord
from faascale.pipecast.schedule import Transfer
from faascale.pipecast.transport import Transport, TransportError, TransportTimeout

ASK_SEND_S = 1.0  # a refetch ask goes to a peer that just sent us a frame: it takes it at once
REPLACED = "the plan was cancelled (a newer one replaced it)"


class Sender:
    """One node's sends over ``transport`` of the blocks in ``holdings_dir`` (files named as
    ``catalog`` names them). Mutates nothing but the ``Progress`` it is given; the agent owns
    the threads that call it."""

    def __init__(self, transport: Transport, catalog: BlockCatalog, holdings_dir: Path,
                 clock: Callable[[], float]) -> None:
        self._transport, self._catalog, self._dir, self._clock = (transport, catalog,
                                                                  holdings_dir, clock)

    def _path(self, block: int) -> Path:
        return self._dir / self._catalog.blocks[block].file

    def send_all(self, sends: Sequence[Transfer], peers: Mapping[str, str], deadline: float,
                 progress: Progress) -> None:
        """The node's planned sends in plan order, each once its block's first piece is here and
        its receiver admitted it. Once the plan is cancelled (a newer one replaces it) nothing
        more is sent: its receivers have closed its epoch and drop its frames, and the link and
        the CPU are the new plan's (a source whose receiver had granted every step at once went
        on sending the whole model into the void, seconds on a starved node, while the new plan
        waited for it)."""
        for send in sends:  # observe (block here, admitted?) -> decide -> act
            lacking = progress.wait_ready(send, deadline)  # at once once cancelled
            if progress.cancelled.is_set():
                progress.fail_send(send, REPLACED)
            elif lacking is None:
                self.send(send, peers[send.dst], deadline, progress)
            elif lacking == "block":
                progress.fail_send(send, "the node never got the block to forward")
                self.cancel(send, peers[send.dst], progress)
            else:
                progress.fail_send(send, f"{send.dst} did not admit it (no credit) in time",
                                   stalled=True)

    def send(self, send: Transfer, address: str, deadline: float, progress: Progress) -> None:
        """Send ``send``'s block piece by piece, each once it is here (a block still landing
        is read from its part file). A block lost while forwarding it cancels the rest; a plan
        cancelled meanwhile stops it after the piece going out (a whole block: after it)."""
        start = progress.now()
        info = self._catalog.blocks[send.block]
        try:
            with mapped(*self._sources(send.block, progress)) as view:
                for piece in range(info.num_pieces):
                    if progress.cancelled.is_set():
                        progress.fail_send(send, REPLACED)
                        return
                    if not progress.wait_piece(send.block, piece, deadline):
                        progress.fail_send(send, f"the node lost the block (piece {piece} "
                                                 "never came) while forwarding it")
                        self.cancel(send, address, progress)
                        return
                    self._send_piece(address, send.block, piece, view, deadline, progress.plan_id)
        except TransportTimeout:
            progress.fail_send(send, f"{send.dst} did not take the frame in time", stalled=True)
        except (TransportError, OSError) as e:
            progress.fail_send(send, f"{type(e).__name__}: {e}")
        else:
            progress.sent(SendRecord(send.step, send.block, send.dst, start, progress.now()),
                          info.size_bytes)

    def _send_piece(self, address: str, block: int, piece: int, view: memoryview,
                    deadline: float, plan_id: str) -> None:
        # A held piece is the manifest's bytes (verified when it landed or was put in place),
        # so its blake3 is known: the transport need not hash it again (a file changed since is
        # caught by the receiver, whose transport still checks the bytes).
        info = self._catalog.blocks[block]
        offset, length = info.span(piece)
        algorithm, _, hexdigest = info.piece_checksum(piece).partition(":")
        meta = {"model_id": self._catalog.model_id, "index": block}
        if info.pieces:
            meta["piece"] = piece
        self._transport.send(address, "block", meta, view[offset:offset + length],
                             timeout_s=max(0.0, deadline - self._clock()),
                             digest=bytes.fromhex(hexdigest) if algorithm == "blake3" else None,
                             epoch=plan_id)

    def _sources(self, block: int, progress: Progress) -> tuple[Path, ...]:
        """Where to read ``block`` from: its file once held, else its part file (or the file,
        if it was renamed into place meanwhile)."""
        if progress.holds(block):
            return (self._path(block),)
        return (self._dir / (self._catalog.blocks[block].file + PART_SUFFIX), self._path(block))

    def resend_loop(self, progress: Progress, peers: Mapping[str, str], deadline: float) -> None:
        """Answer receivers that got a corrupt piece from this node: send it again (its own
        thread, so that a refetch does not wait behind this node's remaining sends)."""
        while not progress.stop.is_set():
            request = progress.next_resend(POLL_S)
            if request is None:
                continue
            receiver, block, piece = request
            address = peers.get(receiver)
            if address is None or not progress.wait_piece(block, piece, deadline):
                progress.note(f"cannot send piece {piece} of block {block} again to {receiver}")
                continue
            try:
                with mapped(*self._sources(block, progress)) as view:
                    if self._piece_is_bad(block, piece, view):  # our own copy: say so
                        progress.note(f"{receiver} got a corrupt piece {piece} of block {block}"
                                      " and this node's copy of it is corrupt too")
                        self._transport.send(address, "control", {
                            "model_id": self._catalog.model_id, "bad_copy": block},
                            timeout_s=ASK_SEND_S, epoch=progress.plan_id)
                        continue
                    self._send_piece(address, block, piece, view, deadline, progress.plan_id)
            except (TransportError, OSError) as e:
                progress.note(f"resend of block {block} piece {piece} to {receiver} failed: {e}")
            else:
                progress.resent(self._catalog.blocks[block].span(piece)[1])

    def _piece_is_bad(self, block: int, piece: int, view: memoryview) -> bool:
        """Whether this node's bytes of ``piece`` differ from the manifest (a receiver asked
        for it again: the fault may be this node's file, not the wire)."""
        info = self._catalog.blocks[block]
        offset, length = info.span(piece)
        hasher = hasher_for(info.piece_checksum(piece))
        hasher.update(view[offset:offset + length])
        return hasher.hexdigest() != info.piece_checksum(piece).partition(":")[2]

    def cancel(self, send: Transfer, address: str, progress: Progress) -> None:
        """Tell the receiver that ``send`` will not come, so that it admits its next sender."""
        try:
            self._transport.send(address, "control", {"model_id": self._catalog.model_id,
                                                      "cancel_step": send.step,
                                                      "index": send.block}, timeout_s=POLL_S,
                                 epoch=progress.plan_id)
        except TransportError as e:
            progress.note(f"could not tell {send.dst} that block {send.block} will not come: {e}")
