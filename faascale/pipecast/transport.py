"""Transport between nodes: model blocks (multicast), hidden states and tokens (pipelines).

One small interface, ``Transport``; this module owns the ZeroMQ side effect (``ZmqTransport``),
``nccl_transport.py`` the NCCL one. A frame is a ``Header`` plus an optional payload. On the wire
it is one two-part ZeroMQ message::

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
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, Self

import blake3
import zmq

log = logging.getLogger(__name__)

KINDS = frozenset({"block", "hidden", "token", "control"})
DIGEST_BYTES = 32  # blake3
MAC_BYTES = 32  # keyed blake3
MAX_META_BYTES = 4096  # encoded JSON: ids, indices, shapes; data goes in the payload
MAX_HEADER_BYTES = MAC_BYTES + MAX_META_BYTES + 1024  # meta + the fixed fields (~250 B) + MAC
MAX_NAME_CHARS = 128
MAX_EPOCH_CHARS = 128
MIN_SECRET_BYTES = 16
ZERO_COPY_MIN_BYTES = 64 << 10  # below this a copy is cheaper than tracking (pyzmq's threshold)
PARALLEL_HASH_MIN_BYTES = 1 << 20  # blake3 threads pay off from ~1 MiB; below, startup dominates
_MAC_CONTEXT = "faascale pipecast transport 2026 header MAC v1"
_WIRE_VERSION = 2  # 2: the epoch
_RELEASE_WAIT_S = 1.0  # after a reset, how long send waits for ZeroMQ to drop the payload
_HEARTBEAT_IVL_MS, _HEARTBEAT_TIMEOUT_MS = 1000, 3000  # a dead peer's connection drops in ~3 s


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
        _check_name(self.sender, HeaderError)
        _check_epoch(self.epoch, HeaderError)
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


def _check_name(name: Any, error: type[Exception]) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise error(f"a sender name is 1..{MAX_NAME_CHARS} characters, got {name!r}")


def _check_epoch(epoch: Any, error: type[Exception]) -> None:
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_CHARS:
        raise error(f"an epoch is a string of at most {MAX_EPOCH_CHARS} characters, got "
                    f"{epoch!r}")


# ---------------------------------------------------------------------------------------------
# ZeroMQ


@dataclass
class _Peer:
    lock: threading.Lock = field(default_factory=threading.Lock)
    socket: zmq.Socket | None = None


class ZmqTransport:
    """``Transport`` over ZeroMQ/TCP: one bound PULL socket receives from every peer; one PUSH
    socket per peer address (cached, created on first send) sends.

    Memory is bounded per link by the high-water marks (messages, not bytes): at most
    ``send_hwm`` queued here, ``recv_hwm`` + 1 at the receiver, plus kernel socket buffers. Large
    payloads (>= ZERO_COPY_MIN_BYTES) are sent zero-copy from the caller's buffer and ``send``
    waits until ZeroMQ has written them out; smaller ones are copied and queued. Received payloads
    go into the ``into`` buffer with one copy (libzmq reads the socket into its own message, then
    ``recv_into`` copies it to the caller), or with no copy into a view of ZeroMQ's message.
    A payload part larger than ``max_payload_bytes`` drops the sender's connection unbuffered.
    ``epochs_only``: accept only frames of the epochs open (see the module docstring).
    ``close`` returns within about ``linger_s``; frames still queued then are dropped."""

    def __init__(self, *, secret: bytes, name: str, bind_host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, send_hwm: int = 2, recv_hwm: int = 2,
                 max_payload_bytes: int = 1 << 30, linger_s: float = 0.5,
                 epochs_only: bool = False) -> None:
        _check_name(name, TransportError)
        if bind_host in ("0.0.0.0", "*") and not advertise_host:
            raise TransportError(f"binding {bind_host} needs advertise_host (the peers' view)")
        if min(send_hwm, recv_hwm) < 1 or max_payload_bytes < 1 or not 0 <= port < 65536:
            raise TransportError("HWMs and max_payload_bytes must be >= 1, port in 0..65535")
        self._key = mac_key(secret)
        self._name = name
        self._send_hwm = send_hwm
        self._linger_ms = int(_check_timeout(linger_s) * 1000)
        self._seq = itertools.count(time.time_ns())  # above any seq of an earlier incarnation
        self._epochs_only = epochs_only
        self._epochs: set[str] = set()  # open: frames of these are accepted
        self._last_seq: dict[tuple[str, str], int] = {}  # (epoch, sender) -> its last seq taken
        self._epochs_lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._stats = TransportStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._ctx = zmq.Context(io_threads=1)
        endpoint = f"tcp://{bind_host}:{port or '*'}"
        try:
            self._pull = self._ctx.socket(zmq.PULL)
            self._pull.setsockopt(zmq.LINGER, 0)
            self._pull.setsockopt(zmq.RCVHWM, recv_hwm)
            # Per message part (libzmq checks each frame): the header part is at most
            # MAX_HEADER_BYTES, the payload part at most max_payload_bytes.
            self._pull.setsockopt(zmq.MAXMSGSIZE, max(max_payload_bytes, MAX_HEADER_BYTES))
            self._pull.bind(endpoint)
            bound_port = self._pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise TransportError(f"cannot bind {endpoint}: {e}") from e
        self._address = f"tcp://{advertise_host or bind_host}:{bound_port}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def address(self) -> str:
        return self._address

    @property
    def stats(self) -> TransportStats:
        with self._stats_lock:
            return self._stats

    def send(self, peer_address: str, kind: str, meta: Mapping[str, Any], payload: Any = None,
             *, timeout_s: float, digest: bytes | None = None, epoch: str = "") -> Header:
        """See ``Transport.send``. A timeout while a large payload is going out resets the
        connection to that peer: the frame then arrives whole or not at all (never half), and
        frames already queued to that peer may be dropped. ``digest``: the payload's blake3, when
        the caller already knows it (a block verified against its manifest checksum), so the
        payload is not hashed again here; the receiver still checks it. A wrong one makes the
        receiver reject the frame as corrupt, never accept bad data."""
        deadline = time.monotonic() + _check_timeout(timeout_s)
        data = _payload_view(payload)
        if digest is not None and (not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES):
            raise HeaderError(f"digest must be {DIGEST_BYTES} bytes of blake3")
        digest = digest if digest is not None else payload_digest(data)
        _check_address(peer_address)
        peer = self._peer(peer_address)
        with peer.lock:  # seq is taken under the lock, so per-peer send order == seq order
            header = Header(kind, self._name, next(self._seq), meta, data.nbytes, digest, epoch)
            self._check_open()
            sock = peer.socket if peer.socket is not None else self._connect(peer, peer_address)
            head = encode_header(header, self._key)
            while True:
                try:
                    if sock.poll(_remaining_ms(deadline), zmq.POLLOUT):
                        sock.send(head, zmq.SNDMORE | zmq.NOBLOCK)
                        break
                except zmq.Again:  # raced after poll; retry while time is left
                    if time.monotonic() < deadline:
                        continue
                except zmq.ZMQError as e:
                    self._reset(peer)
                    raise TransportError(f"send to {peer_address} failed: {e}") from e
                self._count(send_timeouts=1)
                raise TransportTimeout(f"{peer_address} did not take a {kind} frame within "
                                       f"{timeout_s} s (queue full or unreachable)")
            try:  # once the first part is in, ZeroMQ accepts the rest of the message
                zero_copy = data.nbytes >= ZERO_COPY_MIN_BYTES
                tracker = sock.send(data, zmq.NOBLOCK, copy=not zero_copy, track=zero_copy)
            except zmq.ZMQError as e:
                self._reset(peer)
                raise TransportError(f"send to {peer_address} failed: {e}") from e
            if zero_copy and not _wait_tracker(tracker, deadline):
                self._reset(peer)
                _wait_tracker(tracker, time.monotonic() + _RELEASE_WAIT_S)
                self._count(send_timeouts=1)
                raise TransportTimeout(f"{peer_address} did not take a {data.nbytes}-byte "
                                       f"{kind} frame within {timeout_s} s (connection reset)")
        self._count(frames_sent=1, bytes_sent=data.nbytes)
        return header

    def recv(self, timeout_s: float,
             into: Callable[[Header], Any] | None = None) -> Message:
        """See ``Transport.recv``. ``into`` must return a writable C-contiguous buffer of at
        least ``header.payload_bytes`` (bytearray, numpy array, mmap, memoryview) or None; it is
        called only for frames with a payload. ``Message.payload`` is then a view of that very
        buffer (``payload.obj is buffer``). Invalid frames are dropped while waiting."""
        deadline = time.monotonic() + _check_timeout(timeout_s)
        with self._recv_lock:
            self._check_open()
            while True:
                if not self._pull.poll(_remaining_ms(deadline), zmq.POLLIN):
                    raise TransportTimeout(f"no valid frame within {timeout_s} s")
                try:
                    message = self._recv_one(into)
                finally:
                    while self._pull.get(zmq.RCVMORE):  # leave the socket at a message boundary
                        self._pull.recv(zmq.NOBLOCK, copy=False)
                if message is not None:
                    return message
                if time.monotonic() >= deadline:
                    raise TransportTimeout(f"no valid frame within {timeout_s} s")

    def reachable(self, peer_address: str) -> bool:
        """Whether a live connection to ``peer_address`` is up now, as libzmq sees it: its
        ZMTP heartbeats (every second, dropped after 3 s without an answer) are answered by the
        peer's I/O thread, which needs no Python lock, so a peer whose Python is busy or
        starved stays reachable while a dead, stopped or partitioned one does not. Connects on
        the first call (asynchronously: that call may still say False). Never blocks."""
        _check_address(peer_address)
        peer = self._peer(peer_address)
        if not peer.lock.acquire(blocking=False):
            return True  # a send to it is under way right now: it is being talked to
        try:
            self._check_open()
            sock = peer.socket if peer.socket is not None else self._connect(peer, peer_address)
            return bool(sock.poll(0, zmq.POLLOUT))  # IMMEDIATE: only a live pipe is writable
        finally:
            peer.lock.release()

    def open_epoch(self, epoch: str) -> None:
        """See ``Transport.open_epoch``."""
        _check_epoch(epoch, TransportError)
        if not epoch:
            raise TransportError("the empty epoch is not opened: it is open unless epochs_only")
        with self._epochs_lock:
            self._epochs.add(epoch)

    def close_epoch(self, epoch: str) -> None:
        """See ``Transport.close_epoch``."""
        with self._epochs_lock:
            self._epochs.discard(epoch)
            for key in [k for k in self._last_seq if k[0] == epoch]:
                del self._last_seq[key]

    def close(self) -> None:
        """Idempotent. Waits for in-flight send/recv calls (each bounded by its timeout)."""
        with self._peers_lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                if peer.socket is not None:
                    peer.socket.close()  # its LINGER (linger_s) bounds the flush in term()
                    peer.socket = None
        with self._recv_lock:
            self._pull.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _recv_one(self, into: Callable[[Header], Any] | None) -> Message | None:
        """One whole message off the socket: a Message, or None if it was rejected."""
        frame = self._pull.recv(zmq.NOBLOCK, copy=False)
        if not self._pull.get(zmq.RCVMORE):
            return self._reject(f"a one-part message of {len(frame)} bytes")
        if len(frame) > MAX_HEADER_BYTES:
            return self._reject(f"a {len(frame)}-byte header frame")
        try:
            header = decode_header(frame.bytes, self._key)
        except HeaderError as e:
            return self._reject(str(e))
        stale = self._take(header)
        if stale is not None:
            return self._reject(stale)
        n = header.payload_bytes
        if n == 0:
            view, size = None, len(self._pull.recv(zmq.NOBLOCK, copy=False))
        elif into is None or (buffer := into(header)) is None:
            view = self._pull.recv(zmq.NOBLOCK, copy=False).buffer  # ZeroMQ's memory, no copy
            size = view.nbytes
        else:
            view = _writable_view(buffer, n)
            size = _recv_into(self._pull, view)
        if size != n or self._pull.get(zmq.RCVMORE):
            self._corrupt(header, f"payload part is {size} bytes (or more parts), header says {n}")
        if view is not None and payload_digest(view) != header.digest:
            self._corrupt(header, f"payload digest mismatch ({n} bytes)")
        self._count(frames_received=1, bytes_received=n)
        return Message(header, view)

    def _take(self, header: Header) -> str | None:
        """Record ``header``'s number if its epoch is open and the number is above its sender's
        last one in that epoch; else why not."""
        key = (header.epoch, header.sender)
        with self._epochs_lock:
            if header.epoch not in self._epochs and (header.epoch or self._epochs_only):
                return (f"{header.kind} frame of epoch {header.epoch!r} from {header.sender!r}, "
                        "not open here (a replay, or a plan that ended)")
            last = self._last_seq.get(key, -1)
            if header.seq <= last:
                return f"stale seq {header.seq} from {header.sender!r} (last {last})"
            self._last_seq[key] = header.seq
        return None

    def _reject(self, why: str) -> None:
        log.warning("%s: dropped a frame: %s", self._name, why)
        self._count(rejected_frames=1)

    def _corrupt(self, header: Header, why: str) -> None:
        self._count(corrupt_frames=1)
        raise CorruptFrameError(f"{header.kind} frame {dict(header.meta)} from "
                                f"{header.sender!r}: {why}", header)

    def _peer(self, address: str) -> _Peer:
        with self._peers_lock:
            self._check_open()
            return self._peers.setdefault(address, _Peer())

    def _connect(self, peer: _Peer, address: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._send_hwm)
        sock.setsockopt(zmq.LINGER, self._linger_ms)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections: unreachable = timeout
        sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        try:
            sock.connect(address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise TransportError(f"cannot connect to {address}: {e}") from e
        peer.socket = sock
        return sock

    @staticmethod
    def _reset(peer: _Peer) -> None:
        if peer.socket is not None:
            peer.socket.close(linger=0)
            peer.socket = None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self._name!r} is closed")

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v
                                                  for k, v in deltas.items()})


def _payload_view(payload: Any) -> memoryview:
    if payload is None:
        return memoryview(b"")
    try:
        return memoryview(payload).cast("B")
    except TypeError as e:
        raise TransportError(f"payload must be a C-contiguous buffer (bytes, bytearray, "
                             f"memoryview, numpy array): {e}") from e


def _writable_view(buffer: Any, num_bytes: int) -> memoryview:
    try:
        view = memoryview(buffer).cast("B")
    except TypeError as e:
        raise TransportError(f"into() must return a C-contiguous buffer: {e}") from e
    if view.readonly or view.nbytes < num_bytes:
        raise TransportError(f"into() returned a {'read-only ' if view.readonly else ''}"
                             f"{view.nbytes}-byte buffer for a {num_bytes}-byte payload")
    return view[:num_bytes]


def _recv_into(sock: zmq.Socket, view: memoryview) -> int:
    """Receive the next part into ``view``; its true size (larger = truncated)."""
    if hasattr(sock, "recv_into"):  # pyzmq >= 26.4
        return sock.recv_into(view, flags=zmq.NOBLOCK)
    frame = sock.recv(zmq.NOBLOCK, copy=False)  # same single copy, one more allocation
    if len(frame) <= view.nbytes:
        view[:len(frame)] = frame.buffer
    return len(frame)


def _wait_tracker(tracker: zmq.MessageTracker, deadline: float) -> bool:
    try:
        tracker.wait(max(0.0, deadline - time.monotonic()))
    except zmq.NotDone:
        return False
    return True


def _check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s < math.inf:
        raise TransportError(f"a timeout is a finite number of seconds >= 0, got {timeout_s!r}")
    return float(timeout_s)


def _check_address(address: str) -> None:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not host or not port.isdigit():
        raise TransportError(f"a peer address is tcp://host:port, got {address!r}")


def _remaining_ms(deadline: float) -> int:
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))
