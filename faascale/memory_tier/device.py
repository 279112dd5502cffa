"""The DEVICE tier: a block's tensors where the engine computes.

On CPU the engine computes on the HOST tier's mapped tensors directly: the DEVICE copy *is* the
mapping (zero copy, nothing to do). On a GPU, blocks go host -> device through a small ring of
pinned staging buffers on a dedicated copy stream, so a block streams at PCIe speed without
pinning the whole model in host memory, and the compute stream is never blocked. (CUDA paths run
only where ``torch.cuda.is_available()``; tests skip them here.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class DeviceLoader:
    """Moves block tensors to ``device``. Reusable; not thread-safe (one per replica)."""

    def __init__(self, device: str | torch.device = "cpu", staging_bytes: int = 64 << 20,
                 num_staging: int = 2) -> None:
        self.device = torch.device(device)
        self._staging: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._stream = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self.device)
            self._staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True)
                             for _ in range(num_staging)]
            self._events = [None] * num_staging

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device copies of ``tensors`` (CPU: the same tensors, no copy). Blocks until done, so
        the caller may drop (unmap) the host buffers right after."""
        if self.device.type == "cpu":
            return dict(tensors)
        return self._to_cuda(tensors)

    def _to_cuda(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._stream is not None
        out: dict[str, torch.Tensor] = {}
        slot = 0
        with torch.cuda.stream(self._stream):
            for name, src in tensors.items():
                dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
                src_bytes = src.contiguous().view(torch.uint8).reshape(-1)
                dst_bytes = dst.view(torch.uint8).reshape(-1)
                for start in range(0, src_bytes.numel(), self._staging[0].numel()):
                    chunk = src_bytes[start:start + self._staging[0].numel()]
                    event = self._events[slot]
                    if event is not None:
                        event.synchronize()  # the copy out of this staging buffer has finished
                    staging = self._staging[slot][:chunk.numel()]
                    staging.copy_(chunk)  # pageable (mmap) -> pinned, on the CPU
                    dst_bytes[start:start + chunk.numel()].copy_(staging, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    self._events[slot] = event
                    slot = (slot + 1) % len(self._staging)
                out[name] = dst
        self._stream.synchronize()
        # Make the copies visible to the compute stream before anyone uses them.
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return out
