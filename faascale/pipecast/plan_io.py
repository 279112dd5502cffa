"""PipeCast's plan and catalog I/O: what a node agent reads before it moves a byte.

The agent's errors for bad input (``AgentConfigError``), the model's blocks as the agent needs them
(``BlockCatalog``, read from ``manifest.json`` without importing the engine), one node's part of a
plan (``role_of``), a plan as JSON and back (``plan_to_json``/``plan_from_json``, validated), and
``write_json`` (atomic, for readers that poll).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from faascale.engine.blockio import piece_spans
from faascale.pipecast.schedule import LocalLoad, MulticastPlan, PlanError, Transfer

# The largest payloads of control frames, so that a receiving transport refuses anything larger
# before buffering it (``ZmqTransport(max_payload_bytes=...)``). A participant's control socket
# takes a plan's JSON (about 70 bytes a transfer: a million transfers, 1,000 targets x 1,000
# blocks, fit); the coordinator takes frames without a payload (only their header is buffered).
PLAN_FRAME_BYTES = 64 << 20
CONTROL_FRAME_BYTES = 1


class AgentError(Exception):
    """Base of the agent's errors."""


class AgentConfigError(AgentError, ValueError):
    """Bad input before any I/O: the node is not in the plan, a peer has no address, the node
    must send a block it neither holds nor gets, a plan or catalog file is malformed."""



@dataclass(frozen=True)
class BlockFile:
    """One block as the agent needs it: its file name, size, tagged checksum and its pieces (the
    units it moves in: ``piece_bytes`` each, the last shorter; ``pieces`` their blake3). A block
    without pieces (packing formats 1 and 2) moves as one piece, checked by ``checksum``."""

    file: str
    size_bytes: int
    checksum: str  # "blake3:<hex>" (or "sha256:<hex>", packing format 1)
    pieces: tuple[str, ...] = ()
    piece_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pieces", tuple(self.pieces))
        if self.pieces and len(self.pieces) != len(piece_spans(self.size_bytes, self.piece_bytes)):
            raise ValueError(f"{self.file}: {len(self.pieces)} piece checksums for "
                             f"{self.size_bytes} bytes in pieces of {self.piece_bytes}")
        if any(not c.startswith("blake3:") for c in self.pieces):
            raise ValueError(f"{self.file}: piece checksums must be blake3 (the frame digest)")

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) or 1

    def span(self, piece: int) -> tuple[int, int]:
        """(offset, length) of ``piece``."""
        return piece_spans(self.size_bytes, self.piece_bytes if self.pieces else 0)[piece]

    def piece_checksum(self, piece: int) -> str:
        """The tagged checksum that ``piece``'s bytes must have (the block's, for one piece)."""
        return self.pieces[piece] if self.pieces else self.checksum


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

    @property
    def max_frame_bytes(self) -> int:
        """The largest payload a block frame of this model carries (its largest piece, or its
        largest block without pieces): a receiving transport refuses anything larger before
        buffering it (``ZmqTransport(max_payload_bytes=...)``)."""
        return max([1, *(min(b.piece_bytes, b.size_bytes) if b.pieces else b.size_bytes
                         for b in self.blocks)])

    @classmethod
    def of(cls, manifest: Any) -> BlockCatalog:
        """From a ``ModelManifest`` (or a catalog, returned as is)."""
        if isinstance(manifest, BlockCatalog):
            return manifest
        return cls(manifest.model_id, tuple(BlockFile(b.file, b.size_bytes, b.checksum,
                                                      b.pieces, b.piece_bytes)
                                            for b in manifest.blocks))

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> BlockCatalog:
        """From ``model_dir/manifest.json``. Raises AgentConfigError if absent or malformed."""
        path = Path(model_dir) / "manifest.json"
        try:
            text = path.read_text()
        except OSError as e:
            raise AgentConfigError(f"{path}: not a packed model manifest: {e}") from e
        return cls.from_json(text, where=str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> BlockCatalog:
        """From a manifest's JSON text. Raises AgentConfigError if malformed."""
        try:
            d = json.loads(text)
            if d["format"] != "faascale-blocks":
                raise ValueError(f"format {d['format']!r}")
            return cls(str(d["model_id"]), tuple(
                BlockFile(str(b["file"]), int(b["size_bytes"]),
                          b["checksum"] if "checksum" in b else f"sha256:{b['sha256']}",
                          tuple(str(c) for c in b.get("pieces") or ()),
                          int(b.get("piece_bytes") or 0))
                for b in d["blocks"]))
        except (ValueError, KeyError, TypeError) as e:
            raise AgentConfigError(f"{where}: not a packed model manifest: {e}") from e


@dataclass(frozen=True)
class NodeRole:
    """One node's part of a plan. ``sends`` in step order; ``receives[block]``: the transfer that
    brings it; ``loads`` in step order."""

    sends: tuple[Transfer, ...]
    receives: Mapping[int, Transfer]
    loads: tuple[LocalLoad, ...]

    def earlier_from(self, sender: str, block: int) -> list[int]:
        """The blocks ``sender`` brings this node at steps before ``block``'s (none if it
        does not bring ``block``): what it sends first, on the same connection."""
        planned = self.receives.get(block)
        if planned is None or planned.src != sender:
            return []
        return [b for b, t in self.receives.items() if t.src == sender and t.step < planned.step]


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


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so that a reader polling ``path`` never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
