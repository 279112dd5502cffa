"""The PipeCast transport for real: ZeroMQ sockets on 127.0.0.1, real threads, real timeouts.

NCCL runs only where there are CUDA GPUs (two for the round trip); here its refusal is tested."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import blake3
import numpy as np
import pytest
import zmq

from faascale.pipecast.transport import (MAX_META_BYTES, CorruptFrameError, Header, HeaderError,
                                         TransportError, TransportTimeout, decode_header,
                                         encode_header, mac_key, payload_digest)
from faascale.pipecast.zmq_transport import LISTEN_CACHE_S, ZmqTransport
from faascale.platform.server import free_port

SECRET = b"faascale-test-cluster-secret-32b!"
MiB = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[ZmqTransport, ZmqTransport]]:
    with ZmqTransport(secret=SECRET, name="node-a") as a, \
            ZmqTransport(secret=SECRET, name="node-b") as b:
        yield a, b


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@contextmanager
def raw_push(address: str) -> Iterator[zmq.Socket]:
    """A sender that bypasses ZmqTransport: writes whatever frames a test forges."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def dead_address() -> str:
    """A loopback port that nothing listens on (a transport bound it, then closed)."""
    with ZmqTransport(secret=SECRET, name="gone") as gone:
        return gone.address


def test_a_64mib_block_lands_straight_in_the_callers_buffer(pair, pool) -> None:
    a, b = pair
    block = np.random.default_rng(0).bytes(64 * MiB)
    dest = np.empty(64 * MiB, dtype=np.uint8)  # e.g. a host-tier slot, allocated up front
    asked: list[Header] = []

    def into(header: Header) -> np.ndarray:
        asked.append(header)
        return dest

    sent = pool.submit(a.send, b.address, "block", {"model_id": "m", "index": 7}, block,
                       timeout_s=10)
    msg = b.recv(10, into=into)
    header = sent.result()

    assert msg.payload.obj is dest  # a view of the very buffer into() returned
    assert np.frombuffer(msg.payload, np.uint8).ctypes.data == dest.ctypes.data
    assert dest.tobytes() == block
    assert msg.header == header and asked == [header]
    assert (header.kind, header.sender, dict(header.meta)) == ("block", "node-a",
                                                               {"model_id": "m", "index": 7})
    assert header.payload_bytes == 64 * MiB
    assert header.digest == blake3.blake3(block).digest()
    assert (a.stats.frames_sent, a.stats.bytes_sent) == (1, 64 * MiB)
    assert (b.stats.frames_received, b.stats.bytes_received) == (1, 64 * MiB)


def test_without_into_the_payload_is_a_view_of_the_received_message(pair) -> None:
    a, b = pair
    data = np.arange(MiB // 4, dtype=np.float32)
    a.send(b.address, "hidden", {"request_id": "r1"}, data, timeout_s=5)
    a.send(b.address, "hidden", {"request_id": "r2"}, data, timeout_s=5)
    first = b.recv(5)
    second = b.recv(5, into=lambda header: None)  # None: "you allocate"
    for msg in (first, second):
        assert np.array_equal(np.frombuffer(msg.payload, np.float32), data)
    assert [first.header.meta["request_id"], second.header.meta["request_id"]] == ["r1", "r2"]


def test_many_small_activation_frames_arrive_in_order(pair, pool) -> None:
    a, b = pair
    rng = np.random.default_rng(1)
    hidden = [rng.bytes(8192) for _ in range(300)]

    def stream() -> None:
        for step, h in enumerate(hidden):
            a.send(b.address, "hidden", {"request_id": "r", "step": step}, h, timeout_s=5)
            a.send(b.address, "token", {"request_id": "r", "step": step, "token": step % 50},
                   None, timeout_s=5)

    sender = pool.submit(stream)
    seqs = []
    for step, h in enumerate(hidden):
        msg = b.recv(5)
        assert (msg.header.kind, msg.header.meta["step"]) == ("hidden", step)
        assert bytes(msg.payload) == h
        tok = b.recv(5)
        assert (tok.header.kind, dict(tok.header.meta)) == (
            "token", {"request_id": "r", "step": step, "token": step % 50})
        assert tok.payload is None and tok.header.payload_bytes == 0
        seqs += [msg.header.seq, tok.header.seq]
    sender.result()
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert b.stats.frames_received == 600 and b.stats.rejected_frames == 0


def test_a_frame_with_the_wrong_secret_is_dropped_counted_and_recv_times_out(pair) -> None:
    a, b = pair
    with ZmqTransport(secret=b"some-other-cluster-secret-32byte", name="intruder") as intruder:
        intruder.send(b.address, "control", {"op": "evict"}, b"x" * 100, timeout_s=5)
        start = time.monotonic()
        with pytest.raises(TransportTimeout):
            b.recv(0.5)
        assert 0.45 <= time.monotonic() - start < 2.0
        assert (b.stats.rejected_frames, b.stats.frames_received) == (1, 0)

        # recv keeps waiting past an invalid frame for the next valid one
        intruder.send(b.address, "control", {"op": "evict"}, None, timeout_s=5)
        a.send(b.address, "control", {"op": "hello"}, None, timeout_s=5)
        assert b.recv(5).header.meta == {"op": "hello"}
        with pytest.raises(TransportTimeout):
            b.recv(0.3)
        assert (b.stats.rejected_frames, b.stats.frames_received) == (2, 1)


def test_a_replayed_frame_is_rejected(pair) -> None:
    a, b = pair
    header = a.send(b.address, "control", {"op": "load", "index": 1}, b"payload", timeout_s=5)
    assert b.recv(5).header == header
    with raw_push(b.address) as sock:
        sock.send_multipart([encode_header(header, mac_key(SECRET)), b"payload"])
        with pytest.raises(TransportTimeout):
            b.recv(0.5)
    assert (b.stats.rejected_frames, b.stats.frames_received) == (1, 1)


def test_a_frame_captured_before_a_receiver_restart_is_refused_after_it() -> None:
    """Epoch + counter: a receiver takes frames of the epochs (plans) it has open, each above
    its sender's last number in that epoch. A frame captured off the wire (its exact bytes) and
    replayed to the same receiver is refused by its number; replayed to the receiver restarted
    on the same port (a new transport, running a new plan) by its epoch, where an in-memory
    check alone would have taken it. Normal traffic of the open epoch still flows."""
    port = free_port()
    plan_1, plan_2 = "m/1/" + "a" * 16, "m/2/" + "b" * 16
    with ZmqTransport(secret=SECRET, name="src") as a:
        with ZmqTransport(secret=SECRET, name="dst", port=port, epochs_only=True) as b:
            b.open_epoch(plan_1)
            header = a.send(b.address, "block", {"index": 1}, b"piece one", timeout_s=5,
                            epoch=plan_1)
            assert b.recv(5).header == header and header.epoch == plan_1
            captured = [encode_header(header, mac_key(SECRET)), b"piece one"]  # the wire bytes
            with raw_push(b.address) as sock:
                sock.send_multipart(captured)
                with pytest.raises(TransportTimeout):
                    b.recv(0.5)
            assert (b.stats.rejected_frames, b.stats.frames_received) == (1, 1)
            address = b.address
        with ZmqTransport(secret=SECRET, name="dst", port=port, epochs_only=True) as b2:
            assert b2.address == address  # the restarted receiver, where the frame went
            b2.open_epoch(plan_2)
            with raw_push(b2.address) as sock:
                sock.send_multipart(captured)
                with pytest.raises(TransportTimeout):
                    b2.recv(0.5)
            assert (b2.stats.rejected_frames, b2.stats.frames_received) == (1, 0)
            a.send(b2.address, "block", {"index": 1}, b"piece two", timeout_s=5, epoch=plan_2)
            assert bytes(b2.recv(5).payload) == b"piece two"
            for epoch in (plan_1, ""):  # a closed plan's frame, a frame of no plan: refused
                a.send(b2.address, "control", {"credit_step": 3}, timeout_s=5, epoch=epoch)
            b2.close_epoch(plan_2)  # the plan ended: its frames no longer count
            a.send(b2.address, "block", {"index": 2}, b"late", timeout_s=5, epoch=plan_2)
            with pytest.raises(TransportTimeout):
                b2.recv(0.5)
            assert (b2.stats.rejected_frames, b2.stats.frames_received) == (4, 1)
        with pytest.raises(TransportError, match="empty epoch"):
            a.open_epoch("")
        with pytest.raises(HeaderError, match="epoch"):
            a.send(address, "control", {}, timeout_s=1, epoch="x" * 129)


@pytest.mark.parametrize("into_buffer", [True, False], ids=["into", "no-into"])
@pytest.mark.parametrize("lie", ["digest", "size"])
def test_a_corrupt_payload_raises_and_is_counted(pair, lie, into_buffer) -> None:
    a, b = pair
    payload = np.random.default_rng(2).bytes(2 * MiB)
    digest = payload_digest(b"other bytes") if lie == "digest" else payload_digest(payload)
    size = len(payload) if lie == "digest" else len(payload) - 1
    forged = Header("block", "node-c", time.time_ns(), {"model_id": "m", "index": 3}, size,
                    digest)  # a cluster member (valid MAC) whose payload does not match
    buf = bytearray(4 * MiB)
    into = (lambda header: buf) if into_buffer else None
    with raw_push(b.address) as sock:
        sock.send_multipart([encode_header(forged, mac_key(SECRET)), payload])
        with pytest.raises(CorruptFrameError) as err:
            b.recv(5, into=into)
    assert err.value.header == forged and err.value.header.meta["index"] == 3
    assert (b.stats.corrupt_frames, b.stats.frames_received) == (1, 0)

    # the stream stays aligned: the next frame is read whole
    a.send(b.address, "block", {"index": 4}, payload, timeout_s=5)
    assert bytes(b.recv(5, into=into).payload) == payload
    assert (b.stats.corrupt_frames, b.stats.frames_received, b.stats.rejected_frames) == (1, 1, 0)


def test_the_sender_may_reuse_its_buffer_as_soon_as_send_returns(pair, pool) -> None:
    a, b = pair
    buf = np.zeros(4 * MiB, dtype=np.uint8)  # one staging buffer, refilled for every frame

    def stream() -> None:
        for i in range(6):
            buf[:] = i + 1
            a.send(b.address, "block", {"index": i}, buf, timeout_s=10)

    sender = pool.submit(stream)
    for i in range(6):
        msg = b.recv(10)  # a CorruptFrameError here means ZeroMQ read the buffer after return
        assert np.all(np.frombuffer(msg.payload, np.uint8) == i + 1)
    sender.result()


@pytest.mark.parametrize("frame_bytes", [16 << 10, 8 * MiB], ids=["copied-16KiB", "zero-copy-8MiB"])
def test_a_receiver_that_never_reads_makes_send_time_out(pair, frame_bytes) -> None:
    a, b = pair
    frame = bytearray(frame_bytes)
    accepted, limit_bytes = 0, 96 * MiB  # HWMs (2 + 2 + 1) + kernel socket buffers (~10 MiB)
    with pytest.raises(TransportTimeout):
        while accepted * frame_bytes <= limit_bytes:
            start = time.monotonic()
            a.send(b.address, "block", {"index": accepted}, frame, timeout_s=0.3)
            accepted += 1
    assert 0.29 <= time.monotonic() - start < 1.5  # the timed-out call kept to its timeout
    assert accepted >= 1 and a.stats.send_timeouts == 1
    assert a.stats.frames_sent == accepted

    # what did arrive is whole and in order (at most once: a reset may drop queued frames)
    indices = []
    try:
        while True:
            msg = b.recv(0.5)
            assert msg.header.payload_bytes == frame_bytes
            indices.append(msg.header.meta["index"])
    except TransportTimeout:
        pass
    assert indices == sorted(indices) and len(indices) <= accepted + 1
    assert b.stats.corrupt_frames == 0 and b.stats.rejected_frames == 0


def test_sending_to_an_unreachable_peer_times_out(pair) -> None:
    a, _ = pair
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        a.send(dead_address(), "control", {}, b"hello", timeout_s=0.3)
    assert time.monotonic() - start < 1.5


def test_close_with_pending_frames_does_not_hang() -> None:
    a = ZmqTransport(secret=SECRET, name="node-a", linger_s=0.5)
    b = ZmqTransport(secret=SECRET, name="node-b")
    with pytest.raises(TransportTimeout):  # fill every queue towards b, which never reads
        for i in range(100_000):
            a.send(b.address, "hidden", {"step": i}, bytes(32 << 10), timeout_s=0.2)
    for t in (a, b):
        start = time.monotonic()
        t.close()
        assert time.monotonic() - start < 1.5
        t.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        a.send(b.address, "control", {}, None, timeout_s=1)
    with pytest.raises(TransportError, match="closed"):
        b.recv(1)


def test_close_waits_for_a_recv_in_flight_no_longer_than_its_timeout(pool) -> None:
    b = ZmqTransport(secret=SECRET, name="node-b")
    waiting = pool.submit(b.recv, 0.3)
    time.sleep(0.05)  # let recv start polling
    start = time.monotonic()
    b.close()
    assert time.monotonic() - start < 1.0
    with pytest.raises(TransportTimeout):
        waiting.result()


@pytest.mark.parametrize("kind, meta, payload, error", [
    ("weights", {}, None, HeaderError),  # unknown kind
    ("block", {"blob": "x" * (MAX_META_BYTES + 1)}, None, HeaderError),  # oversize meta
    ("block", {"when": object()}, None, HeaderError),  # not JSON
    ("block", {"loss": math.nan}, None, HeaderError),  # not JSON either
    ("block", {1: "a"}, None, HeaderError),  # non-str key
    ("block", ["not", "a", "mapping"], None, HeaderError),
    ("block", {}, np.zeros((4, 4))[:, ::2], TransportError),  # non-contiguous payload
    ("block", {}, "text is not bytes", TransportError),
])
def test_invalid_frames_are_typed_errors_raised_before_any_io(pair, kind, meta, payload,
                                                              error) -> None:
    a, _ = pair
    start = time.monotonic()
    with pytest.raises(error):  # an I/O attempt would wait the whole 30 s on a dead peer
        a.send(dead_address(), kind, meta, payload, timeout_s=30)
    assert time.monotonic() - start < 2.0 and a.stats.frames_sent == 0


@pytest.mark.parametrize("address, timeout_s", [
    ("127.0.0.1:5555", 1), ("tcp://127.0.0.1", 1), ("tcp://127.0.0.1:5555", -1),
    ("tcp://127.0.0.1:5555", math.inf),
])
def test_bad_addresses_and_timeouts_are_typed_errors(pair, address, timeout_s) -> None:
    a, _ = pair
    with pytest.raises(TransportError):
        a.send(address, "control", {}, None, timeout_s=timeout_s)


def test_bad_construction_is_a_typed_error() -> None:
    with pytest.raises(TransportError, match="secret"):
        ZmqTransport(secret=b"short", name="a")
    with pytest.raises(TransportError, match="name"):
        ZmqTransport(secret=SECRET, name="")
    with pytest.raises(TransportError, match="advertise_host"):
        ZmqTransport(secret=SECRET, name="a", bind_host="0.0.0.0")


def test_header_codec_round_trips_and_its_mac_covers_every_byte() -> None:
    key = mac_key(SECRET)
    header = Header("hidden", "node-a", 42, {"request_id": "r", "shape": [1, 576]}, 4608,
                    payload_digest(b"\x01" * 4608), "m/7/2f1c")
    frame = encode_header(header, key)
    assert decode_header(frame, key) == header
    for i in range(0, len(frame), 7):
        tampered = bytearray(frame)
        tampered[i] ^= 0x01
        with pytest.raises(HeaderError):
            decode_header(bytes(tampered), key)
    with pytest.raises(HeaderError, match="MAC"):
        decode_header(frame, mac_key(b"another-secret-of-enough-bytes!!"))
    with pytest.raises(HeaderError):
        decode_header(frame + b" " * 10_000, key)
    assert header.meta["shape"] == [1, 576]
    with pytest.raises(TypeError):
        header.meta["shape"] = [2, 576]  # read-only


def test_a_bad_into_buffer_is_an_error_and_the_stream_stays_aligned(pair) -> None:
    a, b = pair
    for i in range(4):
        a.send(b.address, "block", {"index": i}, bytes([i]) * MiB, timeout_s=5)
    with pytest.raises(TransportError, match="1048576-byte payload"):
        b.recv(5, into=lambda header: bytearray(10))  # too small
    with pytest.raises(TransportError, match="read-only"):
        b.recv(5, into=lambda header: bytes(MiB))
    with pytest.raises(RuntimeError, match="no slot"):
        b.recv(5, into=lambda header: (_ for _ in ()).throw(RuntimeError("no slot")))
    msg = b.recv(5, into=lambda header: bytearray(MiB))
    assert msg.header.meta["index"] == 3 and bytes(msg.payload) == bytes([3]) * MiB
    assert b.stats.rejected_frames == 0  # each bad frame was consumed whole


# ---------------------------------------------------------------------------------------------
# NCCL


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_has_cuda(), reason="hardware present: this machine has CUDA, and the test "
                    "checks the refusal on machines without it (a skip in CI too)")
def test_nccl_transport_without_cuda_is_refused_clearly(pair) -> None:
    from faascale.pipecast.nccl_transport import NcclTransport

    a, _ = pair
    with pytest.raises(TransportError, match="NCCL transport needs CUDA GPUs"):
        NcclTransport(a, rank_of={})


def _nccl_worker(rank: int, init_port: int) -> None:
    """One of two ranks: rank 0 sends a bf16 tensor and a control frame, rank 1 checks both."""
    import torch
    import torch.distributed as dist

    from faascale.pipecast.nccl_transport import TENSOR_META_KEY, NcclTransport

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{init_port}", rank=rank,
                            world_size=2)
    try:
        control = ZmqTransport(secret=SECRET, name=f"gpu-{rank}")
        addresses: list[str | None] = [None, None]
        dist.all_gather_object(addresses, control.address)
        with NcclTransport(control, {addr: r for r, addr in enumerate(addresses)},
                           verify_payload=True) as t:
            expected = torch.arange(4096, dtype=torch.float32, device="cuda").to(torch.bfloat16)
            if rank == 0:
                t.send(addresses[1], "hidden", {"step": 0}, expected.view(8, 512), timeout_s=60)
                t.send(addresses[1], "control", {"op": "done"}, None, timeout_s=60)
            else:
                msg = t.recv(60)
                assert msg.header.meta[TENSOR_META_KEY]["shape"] == [8, 512]
                assert msg.payload.dtype == torch.bfloat16 and msg.payload.shape == (8, 512)
                assert torch.equal(msg.payload.view(-1), expected)
                assert msg.header.payload_bytes == 4096 * 2
                assert t.recv(60).header.meta == {"op": "done"}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(_num_gpus() < 2, reason="hardware absent: needs two CUDA GPUs (a skip in CI too)")
def test_nccl_transport_moves_a_cuda_tensor_between_two_ranks() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_worker, args=(port,), nprocs=2, join=True)


def test_a_known_digest_skips_the_senders_hash_and_a_wrong_one_is_caught() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    with ZmqTransport(secret=SECRET, name="dig-a") as a, ZmqTransport(secret=SECRET, name="dig-b") as b:
        a.send(b.address, "block", {"i": 1}, data, timeout_s=5, digest=payload_digest(data))
        assert bytes(b.recv(5).payload) == data
        a.send(b.address, "block", {"i": 2}, data, timeout_s=5, digest=bytes(32))  # a lie
        with pytest.raises(CorruptFrameError):
            b.recv(5)
        with pytest.raises(HeaderError, match="32 bytes"):
            a.send(b.address, "block", {"i": 3}, data, timeout_s=5, digest=b"short")


_IDLE_PEER = """
import sys, time
from faascale.pipecast.zmq_transport import ZmqTransport
t = ZmqTransport(secret=b"reachable-test-secret-0123", name="idle")
print(t.address, flush=True)
time.sleep(120)  # never reads, never sends: only libzmq's I/O thread answers
"""


def test_reachable_follows_the_peers_process_not_its_python() -> None:
    """A peer whose Python never touches its socket stays reachable (libzmq answers the
    heartbeats); stopped (SIGSTOP), it is unreachable within the heartbeat timeout, reachable
    again when it continues, and unreachable once killed. Stopped, its port still answers
    (``listening``: its kernel holds the socket, as for a process starved of CPU); killed, it
    does not."""
    import signal
    import subprocess
    import sys

    def settles(want: bool, within_s: float) -> float:
        start = time.monotonic()
        while t.reachable(address) is not want:
            assert time.monotonic() - start < within_s, f"reachable stayed {not want}"
            time.sleep(0.05)
        return time.monotonic() - start

    proc = subprocess.Popen([sys.executable, "-c", _IDLE_PEER], stdout=subprocess.PIPE,
                            text=True)
    try:
        address = proc.stdout.readline().strip()
        with ZmqTransport(secret=b"reachable-test-secret-0123", name="watcher") as t:
            settles(True, 10)
            time.sleep(4.5)  # longer than the heartbeat timeout: a silent Python is not a death
            assert t.reachable(address)
            proc.send_signal(signal.SIGSTOP)
            assert settles(False, 6) > 0.5  # seen through missed heartbeats, not at once
            assert t.listening(address)  # no thread of it runs, but its port answers
            proc.send_signal(signal.SIGCONT)
            settles(True, 10)
            proc.kill()
            proc.wait(10)
            settles(False, 5)
            time.sleep(LISTEN_CACHE_S)  # the answer above is kept this long
            assert not t.listening(address)
            with socket.socket() as free:  # a port bound but not listening: refused at once
                free.bind(("127.0.0.1", 0))
                assert not t.listening(f"tcp://127.0.0.1:{free.getsockname()[1]}")
    finally:
        proc.kill()
        proc.wait(10)
