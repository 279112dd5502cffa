"""The DEVICE tier: zero copy on CPU; the CUDA staging path runs only where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faascale.engine.checkpoint import load_block, read_manifest
from faascale.memory_tier.device import DeviceLoader


def test_cpu_device_is_the_mapping_itself(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    block = load_block(tiny_packed, m, 0)
    on_device = DeviceLoader("cpu").to_device(block)
    assert on_device.keys() == block.keys()
    assert all(on_device[k].data_ptr() == block[k].data_ptr() for k in block)  # no copy


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="hardware absent: needs a CUDA GPU, none here (a skip in CI too)")
def test_cuda_copies_through_pinned_staging(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    block = load_block(tiny_packed, m, 3)
    loader = DeviceLoader("cuda", staging_bytes=4096)  # force many chunks per tensor
    on_device = loader.to_device(block)
    for name, t in block.items():
        assert on_device[name].is_cuda and torch.equal(on_device[name].cpu(), t)
