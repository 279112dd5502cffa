"""``Transport`` over ZeroMQ/TCP (``ZmqTransport``): the sockets, and the receiver's replay check.

The frame format, its MAC, the epochs and the delivery contract are ``transport.py``'s.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Self

import zmq

from faascale.pipecast.transport import (DIGEST_BYTES, MAX_HEADER_BYTES, CorruptFrameError,
                                         Header, HeaderError, Message, TransportError,
                                         TransportStats, TransportTimeout, check_epoch,
                                         check_name, decode_header, encode_header, mac_key,
                                         payload_digest)

log = logging.getLogger(__name__)

ZERO_COPY_MIN_BYTES = 64 << 10  # below this a copy is cheaper than tracking (pyzmq's threshold)
_RELEASE_WAIT_S = 1.0  # after a reset, how long send waits for ZeroMQ to drop the payload
_HEARTBEAT_IVL_MS, _HEARTBEAT_TIMEOUT_MS = 1000, 3000  # a dead peer's connection drops in ~3 s
LISTEN_PROBE_S = 0.2  # ``listening``: a live host on the same network answers a SYN in far less
LISTEN_CACHE_S = 1.0  # ``listening``: an answer is reused this long (one probe per peer at most)


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
        check_name(name, TransportError)
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
        self._listening: dict[str, tuple[float, bool]] = {}  # address -> (when, answer)
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

    def listening(self, peer_address: str, timeout_s: float = LISTEN_PROBE_S) -> bool:
        """Whether ``peer_address``'s host completes a TCP connection to it now: its process
        still holds the listening socket open (its kernel answers, whatever the process's threads
        are doing), as against a process that died (refused at once) or a host cut off (no answer
        within ``timeout_s``). Looked at when ``reachable`` says no: a process starved of CPU
        (every thread of a new replica runnable on a 0.35-core node, libzmq's I/O thread
        included) misses libzmq's heartbeats for seconds but is not dead. A stopped process
        (SIGSTOP) answers here too. The probe connection is closed at once (libzmq drops it
        when its greeting never comes). The answer is kept ``LISTEN_CACHE_S``: at most one
        probe per peer in that time. Blocks at most ``timeout_s``."""
        _check_address(peer_address)
        host, _, port = peer_address.removeprefix("tcp://").rpartition(":")
        now = time.monotonic()
        with self._peers_lock:
            seen = self._listening.get(peer_address)
        if seen is not None and now - seen[0] < LISTEN_CACHE_S:
            return seen[1]
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                up = True
        except OSError:
            up = False
        with self._peers_lock:
            self._listening[peer_address] = (time.monotonic(), up)
        return up

    def open_epoch(self, epoch: str) -> None:
        """See ``Transport.open_epoch``."""
        check_epoch(epoch, TransportError)
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
