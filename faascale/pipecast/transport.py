"""Transport between nodes: model blocks (multicast), hidden states and tokens (pipelines).

One small interface, ``Transport``, and the wire format every implementation shares (this module:
headers, their MAC, the errors; pure). ``zmq_transport.py`` owns the ZeroMQ side effect
(``ZmqTransport``), ``nccl_transport.py`` the NCCL one. A frame is a ``Header`` plus an optional
payload. On the wire it is one two-part ZeroMQ message::

    part 0: MAC (32 B, keyed blake3 over the header JSON) || header JSON (<= MAX_HEADER_BYTES)
    part 1: payload (payload_bytes bytes, possibly empty)

Trust: every node holds the cluster secret; the MAC key is derived from it. The header carries the
payload's blake3 digest, so the MAC covers the payload too. An authenticated frame whose payload
does not match its digest raises ``CorruptFrameError``. The secret is shared, so any holder can
claim any sender name: the MAC proves "a cluster member", not "that node".

Replays: the header also carries an *epoch* and a sequence number, both under the MAC. An epoch
names what a frame belongs to, issued by whoever set up the exchange and never reused (a
multicast plan: a random id from the coordinator; a member's control session: a random id it
joined with), and a receiver accepts a frame of an epoch only while it has that epoch open
(``open_epoch``: the plans it is executing). The sequence number grows with every frame a sender
sends, and a receiver accepts it only above the last one it took from that sender in that epoch.
So a captured frame replayed later is refused: within its epoch by its number, after the epoch
closed (or the receiver restarted: a new incarnation opens only new epochs) by its epoch. A
transport made with ``epochs_only`` takes nothing else; others also take frames of the empty
epoch, checked by sequence number alone (in memory: a restarted receiver forgets it). A frame
whose MAC fails (wrong secret, tampered, malformed), of an epoch not open, or not above its
sender's last number is dropped and counted in ``stats.rejected_frames``, never delivered.

Delivery is at most once and unacknowledged: ``send`` returning means the frame left the caller's
hands (small frames: queued in a bounded queue; large ones: written to the kernel), not that the
peer received it; a frame whose send timed out may still arrive (whole). Frames from one sender to
one receiver arrive in send order, except that a send timeout resets that connection, which may
drop frames already accepted (a later frame that overtakes one of them makes the older one a stale
"replay", dropped).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, Self

import blake3

KINDS = frozenset({"block", "hidden", "token", "control"})
DIGEST_BYTES = 32  # blake3
MAC_BYTES = 32  # keyed blake3
MAX_META_BYTES = 4096  # encoded JSON: ids, indices, shapes; data goes in the payload
MAX_HEADER_BYTES = MAC_BYTES + MAX_META_BYTES + 1024  # meta + the fixed fields (~250 B) + MAC
MAX_NAME_CHARS = 128
MAX_EPOCH_CHARS = 128
MIN_SECRET_BYTES = 16
PARALLEL_HASH_MIN_BYTES = 1 << 20  # blake3 threads pay off from ~1 MiB; below, startup dominates
_MAC_CONTEXT = "faascale pipecast transport 2026 header MAC v1"
_WIRE_VERSION = 2  # 2: the epoch


# ---------------------------------------------------------------------------------------------
# Errors


class TransportError(Exception):
    """A transport operation failed: closed transport, bad address or buffer, socket error."""


class TransportTimeout(TransportError, TimeoutError):
    """``recv``: no valid frame within the timeout. ``send``: the peer did not take the frame
    within the timeout (its queue is full or it is unreachable)."""


class HeaderError(TransportError, ValueError):
    """A header is invalid (unknown kind, oversize or non-JSON meta, bad field), or a received
    header frame fails its MAC. Raised by ``send`` before any I/O."""


class CorruptFrameError(TransportError):
    """An authenticated frame whose payload does not match its header (digest or size).

    ``header`` names the frame (e.g. which block to fetch again). The buffer it was received into
    holds untrusted bytes: do not use them."""

    def __init__(self, message: str, header: Header) -> None:
        super().__init__(message)
        self.header = header

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling (Ray ships exceptions)
        return (type(self), (str(self), self.header))


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Header:
    """What a frame is. ``send`` fills ``sender``, ``seq``, ``payload_bytes``, ``digest`` and
    ``epoch`` (its argument; "" for a frame of no epoch).

    ``meta`` is a small JSON object (``model_id``, block ``index``, ``request_id``, ``step``…),
    stored as a read-only deep copy that equals what the receiver decodes. Construction validates
    every field and raises ``HeaderError``."""

    kind: str
    sender: str
    seq: int  # per sender, strictly increasing; starts at the wall clock in ns (restarts go up)
    meta: Mapping[str, Any] = field(hash=False)
    payload_bytes: int
    digest: bytes  # blake3 of the payload
    epoch: str = ""  # what the frame belongs to (a plan, a session); the receiver must have it open

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HeaderError(f"unknown frame kind {self.kind!r}; expected one of {sorted(KINDS)}")
        check_name(self.sender, HeaderError)
        check_epoch(self.epoch, HeaderError)
        for name in ("seq", "payload_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise HeaderError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            raise HeaderError(f"digest must be {DIGEST_BYTES} bytes")
        object.__setattr__(self, "meta", MappingProxyType(json.loads(_encode_meta(self.meta))))


@dataclass(frozen=True)
class Message:
    """A received frame. ``payload``: a memoryview (ZeroMQ; the caller's ``into`` buffer when one
    was given), a CUDA tensor (NCCL), or None when the frame carried no payload bytes."""

    header: Header
    payload: Any


@dataclass(frozen=True)
class TransportStats:
    """Counters since construction. Bytes are payload bytes."""

    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    rejected_frames: int = 0  # bad MAC, malformed, epoch not open, replayed: never delivered
    corrupt_frames: int = 0  # authenticated, payload mismatch: raised as CorruptFrameError
    send_timeouts: int = 0


class Transport(Protocol):
    """One node's end of the transport. Thread-safe; one ``recv`` at a time is served."""

    @property
    def name(self) -> str: ...  # the sender name stamped on every frame; unique in the cluster

    @property
    def address(self) -> str: ...  # where peers send to, e.g. ``tcp://10.0.0.7:41234``

    @property
    def stats(self) -> TransportStats: ...

    def send(self, peer_address: str, kind: str, meta: Mapping[str, Any], payload: Any = None,
             *, timeout_s: float, digest: bytes | None = None, epoch: str = "") -> Header:
        """Send one frame; return its header. The caller must not mutate ``payload`` until send
        returns (or raises). ``digest``: the payload's blake3 if the caller knows it (skips a
        hash). ``epoch``: what the frame belongs to (the peer drops it unless it has the epoch
        open). Raises ``HeaderError`` before any I/O, ``TransportTimeout`` if the peer does not
        take the frame in time, ``TransportError`` otherwise."""
        ...

    def open_epoch(self, epoch: str) -> None:
        """Accept frames of ``epoch`` from now on (idempotent). Raises ``TransportError`` for an
        empty or oversize epoch."""
        ...

    def close_epoch(self, epoch: str) -> None:
        """Drop every later frame of ``epoch``, and forget its senders' numbers (idempotent)."""
        ...

    def recv(self, timeout_s: float,
             into: Callable[[Header], Any] | None = None) -> Message:
        """The next valid frame. ``into(header)`` returns the buffer to receive the payload into
        (or None: the transport allocates). Raises ``TransportTimeout``, ``CorruptFrameError``
        (frame consumed, buffer untrusted), ``TransportError``; if ``into`` raises, the frame is
        discarded and the exception propagates."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


# ---------------------------------------------------------------------------------------------
# Header codec (pure)


def mac_key(secret: bytes) -> bytes:
    """The 32-byte MAC key derived from the cluster ``secret`` (bytes, >= MIN_SECRET_BYTES)."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise TransportError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
    return blake3.blake3(secret, derive_key_context=_MAC_CONTEXT).digest()


def payload_digest(data: Any) -> bytes:
    """blake3 of a buffer; multi-threaded from PARALLEL_HASH_MIN_BYTES."""
    view = memoryview(data)
    threads = blake3.blake3.AUTO if view.nbytes >= PARALLEL_HASH_MIN_BYTES else 1
    return blake3.blake3(view, max_threads=threads).digest()


def encode_header(header: Header, key: bytes) -> bytes:
    """The wire form: MAC || canonical JSON."""
    body = json.dumps({"v": _WIRE_VERSION, "kind": header.kind, "sender": header.sender,
                       "seq": header.seq, "epoch": header.epoch, "meta": dict(header.meta),
                       "payload_bytes": header.payload_bytes, "digest": header.digest.hex()},
                      sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(body, key=key).digest() + body


def decode_header(frame: bytes, key: bytes) -> Header:
    """Authenticate and parse a header frame. Raises ``HeaderError`` if it is oversize, its MAC
    fails, or a field is invalid."""
    if not MAC_BYTES < len(frame) <= MAX_HEADER_BYTES:
        raise HeaderError(f"header frame of {len(frame)} bytes")
    mac, body = frame[:MAC_BYTES], frame[MAC_BYTES:]
    if not hmac.compare_digest(mac, blake3.blake3(body, key=key).digest()):
        raise HeaderError("header MAC mismatch (unknown peer or wrong cluster secret)")
    try:
        fields = json.loads(body)
        if fields.pop("v") != _WIRE_VERSION:
            raise HeaderError(f"wire version {fields!r}")
        return Header(kind=fields["kind"], sender=fields["sender"], seq=fields["seq"],
                      meta=fields["meta"], payload_bytes=fields["payload_bytes"],
                      digest=bytes.fromhex(fields["digest"]), epoch=fields["epoch"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # HeaderError is a ValueError
        raise HeaderError(f"malformed header: {e}") from e


def _encode_meta(meta: Any) -> str:
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise HeaderError("meta must be a mapping with str keys")
    try:
        encoded = json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise HeaderError(f"meta must be JSON-able: {e}") from e
    if len(encoded.encode()) > MAX_META_BYTES:
        raise HeaderError(f"meta is {len(encoded.encode())} bytes encoded; the limit is "
                          f"{MAX_META_BYTES} (send data as the payload)")
    return encoded


def check_name(name: Any, error: type[Exception]) -> None:
    """Raise ``error`` unless ``name`` is a valid sender name (1..MAX_NAME_CHARS characters)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise error(f"a sender name is 1..{MAX_NAME_CHARS} characters, got {name!r}")


def check_epoch(epoch: Any, error: type[Exception]) -> None:
    """Raise ``error`` unless ``epoch`` is a string of at most MAX_EPOCH_CHARS characters."""
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_CHARS:
        raise error(f"an epoch is a string of at most {MAX_EPOCH_CHARS} characters, got "
                    f"{epoch!r}")
