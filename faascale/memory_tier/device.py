"""The DEVICE tier: a block's tensors where the engine computes.

On CPU the engine computes on the HOST tier's mapped tensors directly: the DEVICE copy *is* the
mapping (zero copy, nothing to do). On a GPU, a block goes host -> device through a small ring of
pinned staging buffers on a dedicated copy stream: the host fills one buffer while the GPU copies
out of the other, a block streams at PCIe speed without pinning the whole model in host memory,
and the compute stream is never blocked. A block lands in one device allocation (its tensors are
aligned views into it), so each staging buffer costs one host-to-device copy.

Ownership rules (``_CudaCopier``; the ring's logic, ``DeviceLoader._through_ring``, is the same on
CPU tensors, where the tests run it):

1. A staging buffer belongs to the loader. The host refills slot ``s`` only after the event
   recorded behind the last copy out of ``s`` has completed: the only place a load waits on the
   GPU (``reserve``).
2. A block's device buffer is allocated on the *consumer* stream (the stream current when
   ``to_device`` is called, never inside the copy stream's context), so the caching allocator
   files it under the stream that uses it; the copy stream's writes into it are declared with
   ``record_stream(copy_stream)``, so freeing it (even mid-load, on an exception) cannot hand its
   memory to another allocation while a copy still writes there. The old code allocated on the
   copy stream and handed the tensor over without ``record_stream``: once freed, the copy stream
   could reuse the memory for the next block while compute kernels still read it.
3. Hand-over: the consumer stream waits on an event recorded behind the last copy (the GPU waits,
   the host does not). ``to_device`` returns once every source byte is in a staging buffer, so the
   caller may unmap the sources at once; the copies may still be in flight. Use the tensors on
   any other stream only after ``synchronize()``.

CUDA paths run only where ``torch.cuda.is_available()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from faascale.engine.config import resolve_device

ALIGN_BYTES = 256  # each tensor's offset in its block's device buffer (cudaMalloc's alignment)


@dataclass(frozen=True)
class Piece:
    """Bytes ``[src_offset, + num_bytes)`` of tensor ``tensor`` go to ``staging_offset`` of the
    chunk's staging buffer."""

    tensor: int
    src_offset: int
    staging_offset: int
    num_bytes: int


@dataclass(frozen=True)
class Chunk:
    """One fill of staging slot ``slot`` and one copy of its first ``num_bytes`` to bytes
    ``[dst_offset, + num_bytes)`` of the block's device buffer."""

    slot: int
    dst_offset: int
    num_bytes: int
    pieces: tuple[Piece, ...]


def plan_layout(sizes_bytes: Sequence[int], align_bytes: int = ALIGN_BYTES
                ) -> tuple[list[int], int]:
    """Offsets of tensors of ``sizes_bytes`` packed in one buffer, each aligned to
    ``align_bytes``, and the buffer's size (the end of the last tensor)."""
    offsets, end = [], 0
    for size in sizes_bytes:
        start = -(-end // align_bytes) * align_bytes
        offsets.append(start)
        end = start + size
    return offsets, end


def plan_chunks(offsets: Sequence[int], sizes_bytes: Sequence[int], total_bytes: int,
                staging_bytes: int, num_slots: int) -> list[Chunk]:
    """The buffer ``[0, total_bytes)`` (tensor ``i`` at ``offsets[i]``, ``sizes_bytes[i]`` long)
    cut into windows of ``staging_bytes``; each window holding tensor bytes is a chunk, trimmed
    to its first and last tensor byte (gaps between tensors inside it are copied too: one copy
    per chunk), staging slots taken round-robin. Pure."""
    assert staging_bytes > 0 and num_slots > 0, (staging_bytes, num_slots)
    chunks: list[Chunk] = []
    for start in range(0, total_bytes, staging_bytes):
        end = min(start + staging_bytes, total_bytes)
        spans = [(i, max(off, start), min(off + size, end))
                 for i, (off, size) in enumerate(zip(offsets, sizes_bytes))]
        spans = [(i, a, b) for i, a, b in spans if a < b]
        if not spans:
            continue  # alignment padding only
        lo, hi = min(a for _, a, _ in spans), max(b for _, _, b in spans)
        pieces = tuple(Piece(i, a - offsets[i], a - lo, b - a) for i, a, b in spans)
        chunks.append(Chunk(len(chunks) % num_slots, lo, hi - lo, pieces))
    return chunks


class _Copier(Protocol):
    """The side effects of the ring, in the order ``_through_ring`` calls them."""

    def alloc(self, num_bytes: int) -> torch.Tensor: ...
    def reserve(self, slot: int) -> None: ...
    def fill(self, slot: int, offset: int, src: torch.Tensor) -> None: ...
    def copy(self, slot: int, num_bytes: int, dst: torch.Tensor) -> None: ...
    def release(self, slot: int) -> None: ...
    def hand_over(self) -> None: ...


class _HostCopier:
    """The ring on CPU tensors: plain staging buffers, synchronous copies, nothing to wait for."""

    def __init__(self, staging_bytes: int, num_slots: int) -> None:
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8) for _ in range(num_slots)]

    def alloc(self, num_bytes: int) -> torch.Tensor:
        return torch.empty(num_bytes, dtype=torch.uint8)

    def reserve(self, slot: int) -> None:
        pass

    def fill(self, slot: int, offset: int, src: torch.Tensor) -> None:
        self.staging[slot][offset:offset + src.numel()].copy_(src)

    def copy(self, slot: int, num_bytes: int, dst: torch.Tensor) -> None:
        dst.copy_(self.staging[slot][:num_bytes])

    def release(self, slot: int) -> None:
        pass

    def hand_over(self) -> None:
        pass


class _CudaCopier:
    """The ring on a GPU: pinned staging, a copy stream, one event per slot (module docstring)."""

    def __init__(self, device: torch.device, staging_bytes: int, num_slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True)
                        for _ in range(num_slots)]
        self.events: list[torch.cuda.Event | None] = [None] * num_slots
        self.consumer: torch.cuda.Stream | None = None

    def alloc(self, num_bytes: int) -> torch.Tensor:
        # Rule 2: on the consumer stream (we are outside the copy stream's context), with the
        # copy stream's use recorded.
        self.consumer = torch.cuda.current_stream(self.device)
        buf = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        buf.record_stream(self.stream)
        # The copy stream must not write before the consumer's earlier work with this memory
        # (the allocator may have just recycled it from that stream) is done.
        self.stream.wait_stream(self.consumer)
        return buf

    def reserve(self, slot: int) -> None:
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # rule 1: the last copy out of this slot has finished

    def fill(self, slot: int, offset: int, src: torch.Tensor) -> None:
        self.staging[slot][offset:offset + src.numel()].copy_(src)  # pageable -> pinned, on the CPU

    def copy(self, slot: int, num_bytes: int, dst: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(self.staging[slot][:num_bytes], non_blocking=True)

    def release(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events[slot] = event

    def hand_over(self) -> None:
        done = torch.cuda.Event()
        done.record(self.stream)
        assert self.consumer is not None
        self.consumer.wait_event(done)  # rule 3: the GPU waits, not the host

    def synchronize(self) -> None:
        self.stream.synchronize()


class DeviceLoader:
    """Moves block tensors to ``device`` ("cpu", "cuda", "cuda:N", "auto"). Reusable; not
    thread-safe (one per replica). ConfigError / DeviceUnavailableError for a device the engine
    does not run on or this machine does not have.

    ``copy``: on CPU, copy through the staging ring too (a private copy of mapped blocks, and how
    the tests run the ring's logic without a GPU); by default a CPU load is zero copy."""

    def __init__(self, device: str | torch.device = "cpu", staging_bytes: int = 64 << 20,
                 num_staging: int = 2, copy: bool = False) -> None:
        if staging_bytes < 1 or num_staging < 1:
            raise ValueError(f"staging: need >= 1 buffer of >= 1 byte, got {num_staging} of "
                             f"{staging_bytes}")
        self.device = resolve_device(device)
        self.staging_bytes, self.num_staging = staging_bytes, num_staging
        self.copies = copy or self.device.type != "cpu"
        self._copier: _Copier | None = None  # made at the first copy: pinned memory only if used
        # What went through ``to_device`` (a replica's startup profile records them): calls
        # (blocks), their bytes, and the bytes that were copied (0 on CPU: zero copy).
        self.num_blocks = self.num_bytes = self.num_bytes_copied = 0

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` on the device, same names, shapes and dtypes: the same tensors where they
        already are there (CPU: zero copy), else aligned views into one new buffer per call.
        Returns once the sources are no longer read (the caller may unmap them); on a GPU the
        copies may still be in flight, ordered before the current stream's next work (module
        docstring). Does not mutate ``tensors``."""
        out = {n: t for n, t in tensors.items() if t.device == self.device and not
               (self.copies and t.device.type == "cpu")}
        moving = {n: t for n, t in tensors.items() if n not in out}
        if moving:
            out.update(self._through_ring(moving))
        self.num_blocks += 1
        self.num_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.num_bytes_copied += sum(t.numel() * t.element_size() for t in moving.values())
        return {n: out[n] for n in tensors}

    def synchronize(self, whole_device: bool = False) -> None:
        """Wait (host) until every copy issued so far has landed; with ``whole_device``, until
        every stream of the device is idle too (``torch.cuda.synchronize``: what a replica does
        before it reports itself ready, so that a failed copy or kernel fails the start, not its
        first request). Nothing to wait for on a CPU."""
        if isinstance(self._copier, _CudaCopier):
            self._copier.synchronize()
        if whole_device and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stats(self) -> dict[str, object]:
        """The counters and the device, for a startup profile's span."""
        return {"device": str(self.device), "mover": type(self).__name__,
                "blocks_moved": self.num_blocks, "bytes_moved": self.num_bytes,
                "bytes_copied": self.num_bytes_copied}

    def _new_copier(self) -> _Copier:
        if self.device.type == "cuda":
            return _CudaCopier(self.device, self.staging_bytes, self.num_staging)
        return _HostCopier(self.staging_bytes, self.num_staging)

    def _through_ring(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._copier is None:
            self._copier = self._new_copier()
        copier = self._copier
        srcs = [t.cpu().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
        sizes = [s.numel() for s in srcs]
        offsets, total = plan_layout(sizes)
        buf = copier.alloc(total)
        for chunk in plan_chunks(offsets, sizes, total, self.staging_bytes, self.num_staging):
            copier.reserve(chunk.slot)
            for p in chunk.pieces:
                copier.fill(chunk.slot, p.staging_offset,
                            srcs[p.tensor][p.src_offset:p.src_offset + p.num_bytes])
            copier.copy(chunk.slot, chunk.num_bytes,
                        buf[chunk.dst_offset:chunk.dst_offset + chunk.num_bytes])
            copier.release(chunk.slot)
        copier.hand_over()
        return {name: buf[off:off + size].view(t.dtype).view(t.shape)
                for (name, t), off, size in zip(tensors.items(), offsets, sizes)}
