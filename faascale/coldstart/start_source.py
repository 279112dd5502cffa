"""Where a new replica's weights come from, and how long a start from each takes: value types.

Pure and torch-free: the autoscaling policy (``platform.autoscale``), the estimator
(``estimate.py``) and a starting replica compare the same ``ColdStartEstimate``s, and the policy
runs in Ray Serve's controller, which must not import the engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SOURCE_PEER = "PEER"      # PipeCast: multicast from replicas that hold the model, serving while loading
SOURCE_HOST = "HOST"      # a node's host-memory tier holds the model
SOURCE_DISK = "DISK"      # a node's disk tier holds it
SOURCE_REMOTE = "REMOTE"  # the object store (always there)
SOURCES = (SOURCE_PEER, SOURCE_HOST, SOURCE_DISK, SOURCE_REMOTE)


@dataclass(frozen=True)
class ColdStartEstimate:
    """How long adding one replica of the function takes from one source, predicted.

    ``ready_s``: from the order to the replica serving (for PEER, serving through a temporary
    pipeline counts). ``available``: the source exists now (a peer or a node's tier holds the
    model; REMOTE always). ``high_s``: the pessimistic end of the estimate's band. ``basis``
    says what it rests on (measured starts of this function, the fitted model, or a prior).
    Raises ValueError for a source not in ``SOURCES`` or a ``ready_s`` that is not finite and >= 0.
    """

    source: str
    ready_s: float
    available: bool = True
    high_s: float | None = None
    basis: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}, got {self.source!r}")
        ready = self.ready_s
        if isinstance(ready, bool) or not isinstance(ready, (int, float)) or not math.isfinite(ready):
            raise ValueError(f"ready_s: must be a finite number, got {ready!r}")
        if ready < 0.0:
            raise ValueError(f"ready_s: must be >= 0.0, got {ready}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColdStartEstimate:
        """Unknown keys are ignored (an estimate stored by a newer version still reads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def choose_source(estimates: tuple[ColdStartEstimate, ...] | list[ColdStartEstimate]
                  ) -> ColdStartEstimate | None:
    """The fastest available way to add a replica: least ``ready_s``; on a tie the narrower
    band, then the order of ``SOURCES`` (a peer before a tier before the store). None when no
    estimate is available."""
    usable = [e for e in estimates if e.available]
    if not usable:
        return None
    return min(usable, key=lambda e: (e.ready_s, e.high_s if e.high_s is not None else e.ready_s,
                                      SOURCES.index(e.source)))
