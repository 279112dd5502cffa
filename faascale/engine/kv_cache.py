"""The KV cache of one layer range: per layer, ``[slot, kv_head, position, head_dim]`` for K and V.

A sequence owns one slot while it runs; its K/V for positions ``[0, length)`` live in that slot.
The position axis grows in chunks as sequences get longer, so a short-prompt workload never pays
for ``max_seq_len``. Slots are handed out by :class:`SlotAllocator`. The cache lives on its
``device`` (the shard's: CPU memory or GPU memory); so do the index tensors a scattered batch uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheIndex:
    """Where one forward's sequences live in the cache, built once per forward (not per layer).
    ``pos_idx`` is None when the write is one block (one sequence, or contiguous slots at one
    start: views, no scatter); ``slot_idx`` is None when neither the write nor the read needs to
    scatter or gather. Index tensors live on the cache's device (on a GPU: one small copy per
    forward instead of two per layer)."""

    slot_idx: torch.Tensor | None  # [b]
    pos_idx: torch.Tensor | None  # [b]


class KVCache:
    def __init__(self, num_layers: int, max_batch_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, chunk_tokens: int = 256,
                 device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.max_batch_size = max_batch_size
        self.chunk_tokens = chunk_tokens
        self.device = torch.device(device)
        shape = (max_batch_size, num_kv_heads, 0, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @property
    def capacity_tokens(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def ensure_capacity(self, num_positions: int) -> None:
        """Grow (copying existing entries) so positions ``[0, num_positions)`` fit in every slot."""
        cap = self.capacity_tokens
        if num_positions <= cap:
            return
        new_cap = -(-num_positions // self.chunk_tokens) * self.chunk_tokens
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                b, h, _, d = old.shape
                # masked, but 0*NaN is NaN
                new = torch.zeros((b, h, new_cap, d), dtype=old.dtype, device=old.device)
                new[:, :, :cap] = old
                store[i] = new

    @staticmethod
    def _contiguous(slots: tuple[int, ...]) -> bool:
        return slots == tuple(range(slots[0], slots[0] + len(slots)))

    def index(self, slots: tuple[int, ...], starts: tuple[int, ...]) -> CacheIndex:
        """The ``CacheIndex`` of a forward over ``slots`` at ``starts`` (for ``write``/``read``)."""
        contiguous = self._contiguous(slots)
        block_write = len(slots) == 1 or (len(set(starts)) == 1 and contiguous)
        if block_write and contiguous:
            return CacheIndex(None, None)
        slot_idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        return CacheIndex(slot_idx, None if block_write else
                          torch.tensor(starts, dtype=torch.long, device=self.device))

    def write(self, layer: int, slots: tuple[int, ...], starts: tuple[int, ...], k: torch.Tensor,
              v: torch.Tensor, index: CacheIndex | None = None) -> None:
        """Store k, v [b, kv_heads, T, head_dim] at positions ``starts[i] ..`` of ``slots[i]``.
        ``index``: ``self.index(slots, starts)``, built once per forward (else built here)."""
        t = k.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        idx = index if index is not None else self.index(slots, starts)
        if idx.pos_idx is None:
            s0, p0 = slots[0], starts[0]
            kc[s0:s0 + len(slots), :, p0:p0 + t] = k
            vc[s0:s0 + len(slots), :, p0:p0 + t] = v
            return
        assert t == 1 and idx.slot_idx is not None, "multi-token writes are per sequence"
        kc[idx.slot_idx, :, idx.pos_idx] = k[:, :, 0]
        vc[idx.slot_idx, :, idx.pos_idx] = v[:, :, 0]

    def read(self, layer: int, slots: tuple[int, ...], length: int,
             index: CacheIndex | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [b, kv_heads, length, head_dim] for ``slots`` (views when slots are contiguous).
        ``index``: as for ``write``."""
        kc, vc = self.k[layer], self.v[layer]
        if self._contiguous(slots):
            s0 = slots[0]
            return kc[s0:s0 + len(slots), :, :length], vc[s0:s0 + len(slots), :, :length]
        idx = (index or self.index(slots, (0,) * len(slots))).slot_idx
        assert idx is not None
        return kc[idx, :, :length], vc[idx, :, :length]


class SlotAllocator:
    """Hands out cache slots, lowest first, so running sequences stay packed at the front."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots))

    def allocate(self) -> int:
        """Take the lowest free slot; raises RuntimeError if none is free (a scheduler bug)."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} released twice"
        self._free.append(slot)
