"""The DEVICE tier: zero copy on CPU; the staging ring's plan (pure), its logic on CPU tensors
(every byte through the ring, the ownership order of its side effects), typed errors; the CUDA
path where a GPU exists (a plain skip otherwise: hardware, a skip in CI too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faascale.engine.checkpoint import load_block, read_manifest
from faascale.engine.config import ConfigError, DeviceUnavailableError
from faascale.memory_tier.device import (ALIGN_BYTES, Chunk, DeviceLoader, Piece, _HostCopier,
                                         plan_chunks, plan_layout)

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="hardware absent: needs a CUDA GPU (a skip in CI too)")


def test_cpu_device_is_the_mapping_itself(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    block = load_block(tiny_packed, m, 0)
    on_device = DeviceLoader("cpu").to_device(block)
    assert on_device.keys() == block.keys()
    assert all(on_device[k].data_ptr() == block[k].data_ptr() for k in block)  # no copy


# --- the plan (pure) -------------------------------------------------------------------------

def test_layout_aligns_every_tensor() -> None:
    assert plan_layout([10, 0, 300, 4], align_bytes=256) == ([0, 256, 256, 768], 772)
    assert plan_layout([]) == ([], 0)
    offsets, _ = plan_layout([1, 2, 3])
    assert all(o % ALIGN_BYTES == 0 for o in offsets)


def test_chunks_cover_the_buffer_once_and_rotate_the_slots() -> None:
    # tensor 0: [0, 10); tensor 1: [16, 46) spans chunks; tensor 2 empty; tensor 3: [48, 50)
    offsets, sizes = [0, 16, 48, 48], [10, 30, 0, 2]
    chunks = plan_chunks(offsets, sizes, 50, staging_bytes=20, num_slots=2)
    assert chunks == [
        Chunk(0, 0, 20, (Piece(0, 0, 0, 10), Piece(1, 0, 16, 4))),
        Chunk(1, 20, 20, (Piece(1, 4, 0, 20),)),
        Chunk(0, 40, 10, (Piece(1, 24, 0, 6), Piece(3, 0, 8, 2))),
    ]
    assert plan_chunks([0], [0], 0, 20, 2) == []
    # a window of padding only is skipped; a chunk is trimmed to its tensor bytes
    assert plan_chunks([0, 256], [10, 10], 266, staging_bytes=100, num_slots=2) == [
        Chunk(0, 0, 10, (Piece(0, 0, 0, 10),)), Chunk(1, 256, 10, (Piece(1, 0, 0, 10),))]


def test_every_tensor_byte_is_carried_exactly_once() -> None:
    sizes = [7, 513, 0, 1, 4096, 300]
    offsets, total = plan_layout(sizes, align_bytes=64)
    for staging, slots in ((1, 1), (64, 2), (100, 3), (10_000, 2)):
        seen = {i: [] for i in range(len(sizes))}
        for chunk in plan_chunks(offsets, sizes, total, staging, slots):
            assert 0 < chunk.num_bytes <= staging and chunk.slot < slots
            for p in chunk.pieces:
                assert p.staging_offset + p.num_bytes <= chunk.num_bytes
                # where the piece sits in staging is where it lands in the device buffer
                assert chunk.dst_offset + p.staging_offset == offsets[p.tensor] + p.src_offset
                seen[p.tensor].append((p.src_offset, p.num_bytes))
        for i, size in enumerate(sizes):
            covered = sorted(seen[i])
            assert sum(n for _, n in covered) == size
            assert all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:]))


# --- the ring on CPU tensors -----------------------------------------------------------------

def _block() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(33, 17, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
            "empty": torch.empty(0, 4), "scalar": torch.tensor(3.5, dtype=torch.float64),
            "ids": torch.arange(11, dtype=torch.int32), "flags": torch.tensor([True, False])}


def test_copy_through_the_ring_on_cpu_tensors(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    for block in (_block(), load_block(tiny_packed, m, 1)):
        loader = DeviceLoader("cpu", staging_bytes=100, num_staging=2, copy=True)
        out = loader.to_device(block)
        assert list(out) == list(block)
        for name, t in block.items():
            got = out[name]
            assert got.shape == t.shape and got.dtype == t.dtype and torch.equal(got, t), name
            assert got.numel() == 0 or got.data_ptr() != t.data_ptr()  # a copy, not the mapping
            if got.numel():
                assert (got.data_ptr() - got.untyped_storage().data_ptr()) % ALIGN_BYTES == 0
        loader.to_device(block)  # reusable: the same ring again
        loader.synchronize()


class _Recording(_HostCopier):
    """The CPU ring's side effects, logged in order."""

    def __init__(self, staging_bytes: int, num_slots: int) -> None:
        super().__init__(staging_bytes, num_slots)
        self.log: list[tuple] = []

    def alloc(self, num_bytes):  # noqa: ANN001, ANN201
        self.log.append(("alloc", num_bytes))
        return super().alloc(num_bytes)

    def reserve(self, slot):  # noqa: ANN001, ANN201
        self.log.append(("reserve", slot))

    def fill(self, slot, offset, src):  # noqa: ANN001, ANN201
        self.log.append(("fill", slot))
        super().fill(slot, offset, src)

    def copy(self, slot, num_bytes, dst):  # noqa: ANN001, ANN201
        self.log.append(("copy", slot))
        super().copy(slot, num_bytes, dst)

    def release(self, slot):  # noqa: ANN001, ANN201
        self.log.append(("release", slot))

    def hand_over(self):  # noqa: ANN201
        self.log.append(("hand_over",))


def test_the_ring_follows_the_ownership_rules() -> None:
    """The order the CUDA copier relies on: the output is allocated before any copy (on the
    consumer's stream there); a slot is filled only after it was reserved since its last
    release (its previous copy finished); a slot's copy follows its fills, its release follows
    its copy; the hand-over to the consumer comes last, once per load."""
    loader = DeviceLoader("cpu", staging_bytes=64, num_staging=2, copy=True)
    rec = loader._copier = _Recording(64, 2)
    block = _block()
    out = loader.to_device(block)
    assert all(torch.equal(out[k], block[k]) for k in block)
    log = rec.log
    assert log[0][0] == "alloc" and log[-1] == ("hand_over",)
    assert sum(e[0] == "alloc" for e in log) == 1 and sum(e[0] == "hand_over" for e in log) == 1
    state = {0: "released", 1: "released"}
    for event, *args in log[1:-1]:
        slot = args[0]
        if event == "reserve":
            assert state[slot] == "released"
            state[slot] = "reserved"
        elif event == "fill":
            assert state[slot] in ("reserved", "filling")
            state[slot] = "filling"
        elif event == "copy":
            assert state[slot] == "filling"
            state[slot] = "copied"
        elif event == "release":
            assert state[slot] == "copied"
            state[slot] = "released"
    assert set(state.values()) == {"released"}
    assert {e[1] for e in log if e[0] == "copy"} == {0, 1}  # both buffers of the ring used


def test_a_device_the_engine_does_not_run_on_is_a_typed_error() -> None:
    for bad in ("meta", "mps", "cuda:-1", "tpu"):
        with pytest.raises(ConfigError, match="device"):
            DeviceLoader(bad)
    with pytest.raises(DeviceUnavailableError):
        DeviceLoader("cuda:4096")  # no machine has that GPU
    with pytest.raises(ValueError, match="staging"):
        DeviceLoader("cpu", staging_bytes=0)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="hardware present: this machine has a GPU (the CUDA tests below run)")
def test_cuda_without_a_gpu_says_so() -> None:
    with pytest.raises(DeviceUnavailableError, match="is_available"):
        DeviceLoader("cuda")
    assert DeviceLoader("auto").device == torch.device("cpu")


# --- CUDA (a GPU only) -----------------------------------------------------------------------

@needs_gpu
def test_cuda_copies_through_pinned_staging(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    block = load_block(tiny_packed, m, 3)
    loader = DeviceLoader("cuda", staging_bytes=4096)  # force many chunks per tensor
    on_device = loader.to_device(block)
    for name, t in block.items():
        assert on_device[name].is_cuda and torch.equal(on_device[name].cpu(), t)
    assert all(s.is_pinned() for s in loader._copier.staging)
    for name, t in _block().items():  # odd dtypes, empty and 0-dim tensors
        got = loader.to_device({name: t})[name]
        assert got.is_cuda and got.dtype == t.dtype and torch.equal(got.cpu(), t), name


@needs_gpu
def test_cuda_tensors_are_ordered_before_the_consumer_stream() -> None:
    """No host sync after ``to_device``: work queued on the current stream sees every byte."""
    src = {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(6)}  # sums exact in fp32
    loader = DeviceLoader("cuda", staging_bytes=8 << 20)
    out = loader.to_device(src)
    sums = torch.stack([out[f"t{i}"].sum() for i in range(6)])  # on the current stream
    assert sums.tolist() == [float(i * (1 << 20)) for i in range(6)]


@needs_gpu
def test_freeing_a_loaded_block_early_cannot_corrupt_the_next_allocation() -> None:
    """Rule 2: the device buffer records the copy stream's use, so memory freed while copies
    may still be in flight is not handed to a new tensor until they have landed."""
    loader = DeviceLoader("cuda", staging_bytes=16 << 20)
    for _ in range(3):
        out = loader.to_device({"w": torch.ones(64 << 20, dtype=torch.uint8)})
        del out  # freed at once, on the consumer stream
        fresh = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
        loader.synchronize()
        torch.cuda.synchronize()
        assert int(fresh.sum()) == 0


@needs_gpu
def test_tensors_already_on_the_gpu_are_not_copied() -> None:
    t = torch.randn(8, device="cuda")
    assert DeviceLoader("cuda").to_device({"t": t})["t"].data_ptr() == t.data_ptr()
