"""The PipeCast coordinator in the platform: one detached Ray actor, ``faascale-pipecast``.

It hosts a ``pipecast.service.Coordinator`` whose control transport listens on the actor's node.
Replicas and tier sources find it by name, fetch its ``Contact`` once (its address, the cluster
secret: Ray's channel is the trust boundary; the secret then authenticates every PipeCast frame
between nodes) and join as members. Where PipeCast listens is the platform's choice, made once:
on 127.0.0.1 when the platform started its own Ray (``faascale up`` without ``--address``: one
machine, nothing to reach from outside), else on each node's Ray node IP (the interface the
cluster's nodes reach each other on). The events sink forwards the autoscaler's scale intents
here (``expect``). ``progress()`` feeds ``status`` and ``/metrics``.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

ACTOR_NAME = "faascale-pipecast"
# The platform's replicas and tier sources move whole blocks unless this is "1". Pieces (cut-
# through) are what the emulated benchmarks measure faster, but in the bursty benchmark (0.35
# cores per node) serving sources that forwarded piece by piece were seen missing heartbeats and
# being declared dead mid-plan; single runs could not separate that from the day's slower
# machine, so the platform keeps the path it was measured on until they can. Every participant
# of a model must agree, so it is one setting for the cluster.
PIECES_ENV = "FAASCALE_PIPECAST_PIECES"


def use_pieces() -> bool:
    """Whether the platform's PipeCast participants move blocks as pieces (cut-through)."""
    import os

    return os.environ.get(PIECES_ENV, "0").strip() == "1"
NAMESPACE = "faascale"
LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contact:
    """What a joining replica or tier source gets from the coordinator actor: its transport
    ``address``, the cluster ``secret``, and whether the cluster is this one machine
    (``loopback``: PipeCast then listens on 127.0.0.1 only)."""

    address: str
    secret: bytes = field(repr=False)  # never in a log line
    loopback: bool

    def bind_host(self) -> str:
        """Where this process's PipeCast transports listen (``bind_host``)."""
        return bind_host(self.loopback)


def bind_host(loopback: bool) -> str:
    """127.0.0.1 on an embedded platform, else this node's Ray node IP (in a Ray worker: the
    node it runs on)."""
    if loopback:
        return LOOPBACK
    import ray

    return ray.util.get_node_ip_address()


class PipeCastActor:
    """The actor body (plain data in and out)."""

    def __init__(self, loopback: bool) -> None:
        from faascale.pipecast.service import Coordinator
        from faascale.pipecast.zmq_transport import ZmqTransport

        self._secret = secrets.token_bytes(32)
        self._loopback = loopback
        self._transport = ZmqTransport(secret=self._secret, name="coordinator",
                                       bind_host=bind_host(loopback),
                                       recv_hwm=1024, send_hwm=64)
        self.coordinator = Coordinator(self._transport)
        self._thread = threading.Thread(target=self.coordinator.run, name="pipecast-coordinator",
                                        daemon=True)
        self._thread.start()

    def contact(self) -> Contact:
        """How a replica or tier source joins (see ``Contact``)."""
        return Contact(self._transport.address, self._secret, self._loopback)

    def expect(self, key: str, count: int) -> None:
        """A scale intent: ``count`` more replicas of the function (or model id) ``key``."""
        self.coordinator.expect(key, count)

    def has_source(self, model_id: str) -> bool:
        """Whether a live member or a node's tier copy (``tier_sources.py``) holds the whole
        model (a new replica can copy from it)."""
        m = self.coordinator.progress().get(model_id)
        return bool(m) and any(v["route"] in ("full", "source") and v["blocks"] == m["blocks_needed"]
                               for v in m["members"].values())

    def progress(self) -> dict[str, Any]:
        return self.coordinator.progress()


def start_pipecast(loopback: bool) -> Any:
    """Create (or find) the coordinator actor on this node. ``loopback``: the platform started
    its own Ray on this machine, so PipeCast listens on 127.0.0.1 only (``Contact``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(PipeCastActor).options(
        name=ACTOR_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=8, get_if_exists=True,
    ).remote(loopback)


def pipecast_actor() -> Any | None:
    """The coordinator actor, or None when the platform runs without one (tests, old state)."""
    import ray

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
