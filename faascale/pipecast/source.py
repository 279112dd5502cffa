"""A node's tier copy of a model as a PipeCast source: every holder feeds a scale-out, not only the
replicas that serve.

A ``TierSource`` is a ``Participant`` (the coordinator link and the multicast agent) over a
directory that holds every block of the model: the node's HOST tier (shared memory) or DISK tier
(a cache directory), seen through a directory of links named as the manifest names its blocks.
It joins with ``source: HOST|DISK``; the coordinator (``service.py``) ranks it after the serving
replicas and HOST before DISK (``coordinator.choose_sources``), plans from it like from any
holder, and never routes requests to it: it has no engine. It sends zero-copy from the block
files' mappings, as a replica's agent does. ``close()`` leaves (the tier evicted the model, or
the node's tier actor stops).
"""

from __future__ import annotations

import os
from typing import Any

from faascale.pipecast.participant import Participant

SOURCE_KINDS = ("HOST", "DISK")


class TierSource(Participant):
    """See the module docstring. ``holdings_dir`` must hold every block (``ValueError`` if not);
    ``kind``: the tier it reads, HOST or DISK."""

    def __init__(self, name: str, manifest: Any, holdings_dir: str | os.PathLike, kind: str, *,
                 secret: bytes, coordinator: str, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, function: str = "",
                 pieces: bool = True) -> None:
        if kind not in SOURCE_KINDS:
            raise ValueError(f"a tier source reads HOST or DISK, not {kind!r}")
        super().__init__(name, manifest, holdings_dir, secret=secret, coordinator=coordinator,
                         bind_host=bind_host, advertise_host=advertise_host, function=function,
                         pieces=pieces)
        missing = sorted(set(range(manifest.num_blocks)) - self.held)
        if missing:
            self.blocks_tx.close()
            self.ctl_tx.close()
            raise ValueError(f"{name}: {holdings_dir} lacks blocks {missing}: not a source")
        self.kind = kind
        self._start()

    def _join_meta(self) -> dict[str, Any]:
        return {"source": self.kind, "stage": ""}

    def close(self, leave: bool = True) -> None:
        stuck = self._stop_threads(leave)
        self._close_transports(stuck)
