"""The PipeCast coordinator in the platform: one detached Ray actor, ``faascale-pipecast``.

It hosts a ``pipecast.service.Coordinator`` whose control transport listens on the actor's node
(its Ray node IP, so replicas on every node reach it). Replicas find it by name, fetch its address
and the cluster secret once (Ray's channel is the trust boundary; the secret then authenticates
every PipeCast frame between nodes), and join as members. The events sink forwards the
autoscaler's scale intents here (``expect``). ``progress()`` feeds ``status`` and ``/metrics``.
"""

from __future__ import annotations

import logging
import secrets
import threading
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
log = logging.getLogger(__name__)


class PipeCastActor:
    """The actor body (plain data in and out)."""

    def __init__(self, bind_host: str | None = None) -> None:
        import ray

        from faascale.pipecast.service import Coordinator
        from faascale.pipecast.transport import ZmqTransport

        host = bind_host or ray.util.get_node_ip_address()
        self._secret = secrets.token_bytes(32)
        self._transport = ZmqTransport(secret=self._secret, name="coordinator", bind_host=host,
                                       recv_hwm=1024, send_hwm=64)
        self.coordinator = Coordinator(self._transport)
        self._thread = threading.Thread(target=self.coordinator.run, name="pipecast-coordinator",
                                        daemon=True)
        self._thread.start()

    def contact(self) -> tuple[str, bytes]:
        """(the coordinator's transport address, the cluster secret) for a joining replica."""
        return self._transport.address, self._secret

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


def start_pipecast() -> Any:
    """Create (or find) the coordinator actor on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(PipeCastActor).options(
        name=ACTOR_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=8, get_if_exists=True,
    ).remote()


def pipecast_actor() -> Any | None:
    """The coordinator actor, or None when the platform runs without one (tests, old state)."""
    import ray

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
