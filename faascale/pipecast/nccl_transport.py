"""NCCL transport: CUDA tensors between GPU nodes through ``torch.distributed`` (NCCL backend).

The same ``Transport`` contract as ``ZmqTransport``, composed over one: the header travels on that
ZeroMQ control channel (authenticated, ordered, bounded), then the tensor's bytes travel by NCCL
point-to-point (``isend``/``irecv``) between the two ranks. The header's meta carries the tensor's
description under ``TENSOR_META_KEY`` (dtype, shape, bytes, source rank, digest), so ``into`` can
allocate the destination. Frames without a CUDA tensor (control messages, CPU buffers) go over the
control channel unchanged.

Digests: hashing a device tensor needs a device-to-host copy, so by default NCCL payloads are not
hashed (digest ``UNVERIFIED_DIGEST``; integrity rests on NCCL and the links inside the cluster);
``verify_payload=True`` hashes on both sides (a debugging aid, it costs a D2H copy per frame).

Order: headers and NCCL operations are issued in the same order per direction (one lock each), so
the k-th tensor header from rank A matches the k-th NCCL receive from A. NCCL serializes a pair of
ranks on one communicator: two ranks must not send to each other at the same time (pipeline
stages send one way; a pair that must talk both ways has to order its operations the same way on
both sides). A timed-out NCCL operation cannot be cancelled: after ``TransportTimeout`` from the
NCCL part, destroy and recreate the process group before using NCCL again.

Needs CUDA and an initialized NCCL process group; its test is skipped on machines without GPUs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Self

from faascale.pipecast.transport import (DIGEST_BYTES, CorruptFrameError, Header, HeaderError,
                                         Message, TransportError, TransportStats,
                                         TransportTimeout, payload_digest)
from faascale.pipecast.zmq_transport import ZmqTransport

try:
    import torch
    import torch.distributed as dist
except ImportError:  # the transport then refuses to construct, with a clear message
    torch = None  # type: ignore[assignment]
    dist = None  # type: ignore[assignment]

TENSOR_META_KEY = "_tensor"
UNVERIFIED_DIGEST = bytes(DIGEST_BYTES)
_POLL_S = 200e-6  # completion polling; an NCCL p2p of a 1 MiB hidden state takes ~50-500 us


class NcclTransport:
    """``Transport`` for CUDA tensors over NCCL, headers over ``control`` (which it owns and
    closes). ``rank_of`` maps each peer's control address to its global rank in ``group`` (the
    default process group if None). ``device`` is where received tensors are allocated when
    ``recv`` has no ``into`` (default: the current CUDA device)."""

    def __init__(self, control: ZmqTransport, rank_of: Mapping[str, int], *,
                 device: Any = None, group: Any = None, verify_payload: bool = False) -> None:
        _require_nccl(group)
        self._control = control
        self._rank_of = dict(rank_of)
        self._group = group
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()
        self._device = torch.device("cuda" if device is None else device)
        if self._device.type != "cuda":
            raise TransportError(f"NCCL transport needs a CUDA device, got {self._device}")
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._verify = verify_payload
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._tensor_stats = TransportStats()  # the NCCL part; the control channel counts frames

    @property
    def name(self) -> str:
        return self._control.name

    @property
    def address(self) -> str:
        return self._control.address

    @property
    def stats(self) -> TransportStats:
        c = self._control.stats
        with self._stats_lock:
            t = self._tensor_stats
        return replace(c, bytes_sent=c.bytes_sent + t.bytes_sent,
                       bytes_received=c.bytes_received + t.bytes_received,
                       corrupt_frames=c.corrupt_frames + t.corrupt_frames,
                       send_timeouts=c.send_timeouts + t.send_timeouts)

    def send(self, peer_address: str, kind: str, meta: Mapping[str, Any], payload: Any = None,
             *, timeout_s: float, epoch: str = "") -> Header:
        """See ``Transport.send``. A CUDA tensor goes by NCCL: send returns when the NCCL send
        has completed on the GPU, so the tensor may then be reused. Other payloads go over the
        control channel. Raises ``TransportError`` for a peer without a known rank."""
        if not (isinstance(payload, torch.Tensor) and payload.is_cuda):
            return self._control.send(peer_address, kind, meta, payload, timeout_s=timeout_s,
                                      epoch=epoch)
        if TENSOR_META_KEY in meta:
            raise HeaderError(f"meta key {TENSOR_META_KEY!r} is reserved for the NCCL transport")
        if payload.device != self._device:
            raise TransportError(f"the tensor is on {payload.device}, this transport on "
                                 f"{self._device}")
        dst = self._rank_of.get(peer_address)
        if dst is None:
            raise TransportError(f"no NCCL rank known for {peer_address}")
        deadline = time.monotonic() + timeout_s
        tensor = payload.contiguous()  # a copy only if it was not; kept alive until completion
        flat = tensor.reshape(-1).view(torch.uint8)
        digest = _device_digest(flat) if self._verify else UNVERIFIED_DIGEST
        described = {**meta, TENSOR_META_KEY: {
            "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "nbytes": flat.numel(), "src_rank": self._rank, "digest": digest.hex()}}
        with self._send_lock:
            header = self._control.send(peer_address, kind, described, None, timeout_s=timeout_s,
                                        epoch=epoch)
            work = dist.isend(flat, dst=dst, group=self._group)
        try:
            _wait(work, deadline, f"NCCL send of {flat.numel()} bytes to rank {dst}")
        except TransportTimeout:
            self._count(send_timeouts=1)
            raise
        self._count(bytes_sent=flat.numel())
        return _tensor_header(header)

    def open_epoch(self, epoch: str) -> None:
        """See ``Transport.open_epoch`` (the control channel's: headers carry the epoch)."""
        self._control.open_epoch(epoch)

    def close_epoch(self, epoch: str) -> None:
        self._control.close_epoch(epoch)

    def recv(self, timeout_s: float,
             into: Callable[[Header], Any] | None = None) -> Message:
        """See ``Transport.recv``. For a tensor frame, ``into(header)`` returns a contiguous CUDA
        tensor of at least ``header.payload_bytes`` (any dtype; it is filled bytewise), or None:
        a tensor of the sent dtype and shape is allocated on ``device``. The NCCL receive is
        always posted, even when ``into`` raises or returns a bad tensor (it then lands in a
        scratch tensor and the error is raised), so later frames stay matched."""
        deadline = time.monotonic() + timeout_s
        with self._recv_lock:
            message = self._control.recv(timeout_s, into=into)
            described = message.header.meta.get(TENSOR_META_KEY)
            if described is None:
                return message
            header = _tensor_header(message.header)
            num_bytes, src = header.payload_bytes, described.get("src_rank")
            if not (type(src) is int and 0 <= src < self._world_size):
                raise TransportError(f"tensor frame from {header.sender!r} has src_rank {src!r}")
            error: BaseException | None = None
            try:
                dst = into(header) if into is not None else None
                if dst is None:
                    dst = torch.empty(described["shape"], dtype=_dtype(described["dtype"]),
                                      device=self._device)
                flat = _byte_view(dst, num_bytes, self._device)
            except BaseException as e:  # noqa: BLE001 - re-raised once the NCCL recv is posted
                error, dst = e, None
                flat = torch.empty(num_bytes, dtype=torch.uint8, device=self._device)
            work = dist.irecv(flat, src=src, group=self._group)
        _wait(work, deadline, f"NCCL receive of {num_bytes} bytes from rank {src}")
        if error is not None:
            raise error
        if header.digest != UNVERIFIED_DIGEST and _device_digest(flat) != header.digest:
            self._count(corrupt_frames=1)
            raise CorruptFrameError(f"tensor frame {dict(header.meta)} from {header.sender!r}: "
                                    f"payload digest mismatch", header)
        self._count(bytes_received=num_bytes)
        return Message(header, dst)

    def close(self) -> None:
        """Closes the control channel. The process group belongs to the caller."""
        self._control.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            s = self._tensor_stats
            self._tensor_stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})


def _wait(work: Any, deadline: float, what: str) -> None:
    """Until the NCCL operation has completed on the GPU, or TransportTimeout at ``deadline``."""
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise TransportTimeout(f"{what} did not complete in time; the NCCL communicator may "
                                   f"be stuck: destroy and recreate the process group")
        time.sleep(_POLL_S)
    work.wait()  # raises a recorded NCCL error; orders the current stream after the op


def _require_nccl(group: Any) -> None:
    if torch is None or not torch.cuda.is_available():
        raise TransportError("NCCL transport needs CUDA GPUs (torch with CUDA and a visible GPU); "
                             "use ZmqTransport on CPU nodes")
    if not dist.is_available() or not dist.is_nccl_available():
        raise TransportError("NCCL transport needs CUDA GPUs and a torch build with NCCL")
    if not dist.is_initialized():
        raise TransportError("NCCL transport needs an initialized process group: call "
                             "torch.distributed.init_process_group('nccl', ...) first")
    if "nccl" not in str(dist.get_backend(group)).lower():
        raise TransportError(f"NCCL transport needs the NCCL backend, the group has "
                             f"{dist.get_backend(group)!r}")


def _tensor_header(header: Header) -> Header:
    """The control header with the tensor's size and digest as its payload's."""
    try:
        described = header.meta[TENSOR_META_KEY]
        return replace(header, payload_bytes=described["nbytes"],
                       digest=bytes.fromhex(described["digest"]))
    except (KeyError, TypeError, ValueError) as e:  # HeaderError is a ValueError
        raise TransportError(f"malformed tensor description from {header.sender!r}: {e}") from e


def _byte_view(tensor: Any, num_bytes: int, device: Any) -> Any:
    if not (isinstance(tensor, torch.Tensor) and tensor.device == device
            and tensor.is_contiguous()):
        raise TransportError(f"into() must return a contiguous tensor on {device}")
    flat = tensor.reshape(-1).view(torch.uint8)  # a view: contiguous
    if flat.numel() < num_bytes:
        raise TransportError(f"into() returned {flat.numel()} bytes for a {num_bytes}-byte tensor")
    return flat[:num_bytes]


def _dtype(name: str) -> Any:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise TransportError(f"unknown tensor dtype {name!r}")
    return dtype


def _device_digest(flat: Any) -> bytes:
    return payload_digest(flat.cpu().numpy())
