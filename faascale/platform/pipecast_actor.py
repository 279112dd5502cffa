"""The PipeCast coordinator in the platform: one detached Ray actor, ``faascale-pipecast``.

It hosts a ``pipecast.service.Coordinator`` whose control transport listens on the actor's node.
Replicas and tier sources find it by name, fetch its ``Contact`` once (its address, the cluster
secret: Ray's channel is the trust boundary; the secret then authenticates every PipeCast frame
between nodes) and join as members. Where PipeCast listens is the platform's choice, made once:
on 127.0.0.1 when the platform started its own Ray (``faascale up`` without ``--address``: one
machine, nothing to reach from outside), else on each node's Ray node IP (the interface the
cluster's nodes reach each other on). The events sink forwards the autoscaler's scale intents
here (``expect``). ``progress()`` feeds ``status`` and ``/metrics``.

The actor restarts when its process dies (``max_restarts=-1``), with what it was created with: the
platform chooses the secret and the port (``start_pipecast``), so the restarted coordinator listens
where the members already send their heartbeats and checks the same MACs; it knows no member, and
answers each heartbeat with ``rejoin`` (``pipecast/service.py``): every live member joins again with
the blocks it holds, within a heartbeat. A plan that was running is lost with the old process; the
members' agents time it out and the next scale-out plans anew.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from faascale.actor_logs import timestamp_logs

ACTOR_NAME = "faascale-pipecast"
# The platform's replicas and tier sources move whole blocks unless this is "1". Pieces (cut-
# through) are what the emulated benchmarks measure faster, but in the bursty benchmark (0.35
# cores per node) serving sources that forwarded piece by piece were seen missing heartbeats and
# being declared dead mid-plan; single runs could not separate that from the day's slower
# machine, so the platform keeps the path it was measured on until they can. (Later A/B runs
# found a piece libzmq dropped with a connection stalling a plan for 60 s; receivers now ask for
# such a piece again at once: docs/benchmarks.md.) Every participant of a model must agree, so
# it is one setting for the cluster.
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
    """The actor body (plain data in and out). ``secret`` and ``port`` (0: any) are the ones it
    keeps across restarts (``start_pipecast`` chooses them); without a secret it makes one."""

    def __init__(self, loopback: bool, secret: bytes | None = None, port: int = 0) -> None:
        from faascale.pipecast.service import Coordinator
        from faascale.pipecast.transport import TransportError

        timestamp_logs()
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._loopback = loopback
        host = bind_host(loopback)
        try:
            self._transport = _coordinator_transport(self._secret, host, port)
        except TransportError as exc:  # taken meanwhile: every member finds the new port
            # through ``contact`` (new ones at once, the others when their heartbeats fail)
            log.warning("PipeCast coordinator port %d: %s; listening on another", port, exc)
            self._transport = _coordinator_transport(self._secret, host, 0)
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


def _coordinator_transport(secret: bytes, host: str, port: int) -> Any:
    from faascale.pipecast.plan_io import CONTROL_FRAME_BYTES
    from faascale.pipecast.zmq_transport import ZmqTransport

    # Members send the coordinator control frames only (their meta, no payload): nothing
    # larger than a header is buffered (``ZmqTransport``'s MAXMSGSIZE).
    return ZmqTransport(secret=secret, name="coordinator", bind_host=host, port=port,
                        recv_hwm=1024, send_hwm=64, max_payload_bytes=CONTROL_FRAME_BYTES)


def start_pipecast(loopback: bool) -> Any:
    """Create (or find) the coordinator actor on this node. ``loopback``: the platform started
    its own Ray on this machine, so PipeCast listens on 127.0.0.1 only (``Contact``). The actor
    restarts if its process dies, on the same port with the same secret (chosen here, once)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(PipeCastActor).options(
        name=ACTOR_NAME, namespace=NAMESPACE, num_cpus=0, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        max_concurrency=8, get_if_exists=True, max_restarts=-1,
    ).remote(loopback, secrets.token_bytes(32), _free_port(bind_host(loopback)))


def _free_port(host: str) -> int:
    """A port free on ``host`` now, below the kernel's ephemeral range where it can tell (so no
    outgoing connection takes it as its source port while a restarted coordinator comes back;
    the members reconnecting to it are such connections). The coordinator binds it in a
    moment; if it was taken in between, the coordinator takes another."""
    import random
    import socket

    low = _ephemeral_low()
    for port in random.sample(range(max(1024, low - 12000), low), 64) if low > 2048 else []:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The lowest port the kernel hands out to outgoing connections (0 where unknown)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def locator(actor: Any, timeout_s: float = 10.0) -> Any:
    """A participant's ``locate`` (``pipecast/participant.py``): where ``actor`` listens now. A
    restarted coordinator that could not take its old port back listens on another; its members
    find it here once their heartbeats fail."""
    def locate() -> str:
        import ray

        return ray.get(actor.contact.remote(), timeout=timeout_s).address
    return locate


def pipecast_actor() -> Any | None:
    """The coordinator actor, or None when the platform runs without one (tests, old state)."""
    import ray

    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
