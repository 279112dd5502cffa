"""The device through the platform (issue 20): a replica materialises its blocks on the spec's
device through a ``DeviceLoader`` and records it in its startup profile, a PipeCast member builds
its shards there (each block moved once), a pipeline stage sends host bytes whatever its device,
and ``scripts/gpu-check.sh`` says plainly when there is no GPU. Everything runs on CPU tensors
here (the loader's ring with ``copy=True`` where a copy matters); the CUDA variants run where a
GPU exists (a plain skip otherwise: hardware, a skip in CI too). Spec defaults and validation are
in test_spec.py, the CLI's error line in test_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from faascale.coldstart.profile import StartupRecorder
from faascale.coldstart.start_steps import load_packed
from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import DeviceUnavailableError, EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.model import ForwardBatch, ModelShard, merge_block_tensors
from faascale.engine.sampling import SamplingParams
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.device import DeviceLoader
from faascale.pipecast.member import Member
from faascale.pipecast.service import Coordinator
from faascale.pipecast.stage import (RemoteStage, StageServer, _bytes_of, _empty_like_meta,
                                     _tensor_meta, wire_bytes)
from faascale.pipecast.zmq_transport import ZmqTransport
from faascale.platform.replica import FunctionReplica
from test_pipecast_member import SECRET as MEMBER_SECRET
from test_pipecast_member import coordinator  # noqa: F401 - the fixture, shared

ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="hardware absent: needs a CUDA GPU (a skip in CI too)")
no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="hardware present: this machine has a GPU (the CUDA "
    "variants run instead)")
CFG = EngineConfig(max_batch_size=4, max_seq_len=256)
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SECRET = b"device-wiring-secret-0123456789"


def reference(packed: Path, prompt: str = "hello device") -> list[int]:
    return list(LLM.load(packed, CFG).generate([prompt], GREEDY)[0].token_ids)


def tokens_of(loop: Any, tokenizer: Tokenizer, prompt: str = "hello device") -> list[int]:
    return [o.token_id for o in loop.submit(tokenizer.encode(prompt), GREEDY)
            if o.token_id is not None]


def tensor_bytes(packed: Path) -> int:
    m = read_manifest(packed)
    return sum(t.numel() * t.element_size() for i in range(m.num_blocks)
               for t in load_block(packed, m, i).values())


# --- the replica's start: blocks through the loader, the device in its profile ---------------

def spec_doc(**extra: Any) -> dict[str, Any]:
    return {"name": "tiny", "model": {"source": "random://tiny-llama", "blocks": 4},
            "engine": {"max_seq_len": 256, "max_batch_size": 4}, **extra}


@pytest.fixture()
def replica(tiny_packed: Path, tmp_path: Path) -> Iterator[Any]:
    """``make(doc)``: a ``FunctionReplica`` outside Ray and Serve (no events sink: its events and
    profile are dropped, the profile kept on the replica), loading ``tiny_packed`` from disk."""
    made: list[FunctionReplica] = []

    def make(doc: dict[str, Any]) -> FunctionReplica:
        r = FunctionReplica(doc, str(tmp_path), str(tiny_packed))
        made.append(r)
        return r

    threads = torch.get_num_threads()
    yield make
    for r in made:
        r.__del__()
    torch.set_num_threads(threads)  # the replica applies OMP_NUM_THREADS


def test_a_replica_materialises_its_blocks_through_the_device_loader(
        tiny_packed: Path, replica: Any) -> None:
    r = replica(spec_doc())
    m = read_manifest(tiny_packed)
    assert r.spec.device == "cpu" and r.profile.device == "cpu" and r.profile.ok
    (span,) = [s for s in r.profile.spans if s.name == "materialize"]
    assert span.attrs["device"] == "cpu" and span.attrs["mover"] == "DeviceLoader"
    assert span.attrs["blocks_moved"] == m.num_blocks  # every block went through the loader
    assert span.attrs["bytes_moved"] == tensor_bytes(tiny_packed)
    assert span.attrs["bytes_copied"] == 0  # on a CPU: zero copy, the mapped blocks themselves
    assert span.attrs["device_sync_s"] >= 0
    assert r._loader.num_blocks == m.num_blocks
    assert {s.name for s in r.profile.spans} >= {"spec_tokenizer", "weight_fetch", "materialize",
                                                 "kv_cache"}
    assert all(t.device.type == "cpu" for t in (r.llm.shards[0].embed,))
    assert tokens_of(r.loop, r.llm.tokenizer) == reference(tiny_packed)


def test_materialize_copies_through_the_loader_s_ring_and_records_it(tiny_packed: Path) -> None:
    """The GPU's path on CPU tensors: every block copied through the staging ring (4 KiB
    buffers: many chunks a block), the shards on the copies, the same tokens."""
    rec = StartupRecorder()
    loader = DeviceLoader("cpu", staging_bytes=4096, copy=True)
    llm = load_packed(rec, tiny_packed, CFG, loader)
    (span,) = [s for s in rec.spans if s.name == "materialize"]
    assert span.attrs["bytes_copied"] == span.attrs["bytes_moved"] == tensor_bytes(tiny_packed)
    assert [s.name for s in rec.spans] == ["spec_tokenizer", "weight_fetch", "materialize"]
    m = read_manifest(tiny_packed)
    mapped = load_block(tiny_packed, m, 0)
    assert llm.shards[0].embed.data_ptr() != mapped["embed.weight"].data_ptr()  # a copy
    assert list(llm.generate(["hello device"], GREEDY)[0].token_ids) == reference(tiny_packed)

    rec = StartupRecorder()  # blocks already verified: mapped inside materialize
    load_packed(rec, tiny_packed, CFG, DeviceLoader("cpu"), verify=False)
    assert [s.name for s in rec.spans] == ["spec_tokenizer", "materialize"]


@no_gpu
def test_a_gpu_function_on_a_machine_without_one_fails_its_start_naming_the_device(
        replica: Any) -> None:
    with pytest.raises(DeviceUnavailableError, match="'cuda' needs a CUDA GPU"):
        replica(spec_doc(resources={"num_gpus": 1}))


# --- a PipeCast member's shards on its device -------------------------------------------------

def member(packed: Path, coordinator: Coordinator, cfg: EngineConfig,
           mover: DeviceLoader | None) -> Member:
    m = read_manifest(packed)
    return Member("holder", m, Tokenizer(read_tokenizer_json(packed, m), m.tokenizer), packed, cfg,
                  secret=MEMBER_SECRET, coordinator=coordinator.address, mover=mover)


def test_a_member_moves_each_block_once_through_its_loader(tiny_packed: Path,
                                                           coordinator: Coordinator) -> None:
    loader = DeviceLoader("cpu", staging_bytes=1 << 16, copy=True)
    holder = member(tiny_packed, coordinator, CFG, loader)
    try:
        n = holder.manifest.num_blocks
        assert holder.full and holder.mover is loader and loader.num_blocks == n
        assert loader.num_bytes_copied == tensor_bytes(tiny_packed)
        # Other layer ranges (a pipeline's stages) share the blocks already moved.
        half = holder.manifest.blocks[n // 2].layer_start
        first, second = holder._shard(0, half), holder._shard(half, holder.manifest.config.num_layers)
        full = holder._shard(0, holder.manifest.config.num_layers)
        assert loader.num_blocks == n
        assert first.layers[0].qkv_w.data_ptr() == full.layers[0].qkv_w.data_ptr()
        assert second.layers[0].qkv_w.data_ptr() == full.layers[half].qkv_w.data_ptr()
        assert tokens_of(holder.loop, holder.loop.engine.tokenizer) == reference(tiny_packed)
    finally:
        holder.close()


def test_a_member_makes_its_own_loader_for_its_device(tiny_packed: Path,
                                                      coordinator: Coordinator) -> None:
    holder = member(tiny_packed, coordinator, CFG, None)
    try:
        assert holder.mover.device == torch.device("cpu") and holder.device.type == "cpu"
        assert holder.mover.num_blocks == holder.manifest.num_blocks
        assert holder.mover.num_bytes_copied == 0  # zero copy on a CPU
    finally:
        holder.close()


# --- a pipeline stage's frames: host bytes whatever the device --------------------------------

def test_wire_bytes_of_a_host_tensor_are_its_own_bytes() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    view = wire_bytes(t)
    assert bytes(view) == t.numpy().tobytes()
    t[0, 0] = 42.0  # no copy: the view is the tensor's memory
    assert bytes(view) == t.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_wire_bytes_round_trip_strided_tensors_of_every_frame_dtype(dtype: torch.dtype) -> None:
    t = (torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8) * 0.37).to(dtype)
    strided = t.transpose(1, 2)  # not contiguous: compacted row-major
    got = _empty_like_meta(_tensor_meta(strided))
    _bytes_of(got)[:] = wire_bytes(strided)
    assert got.dtype == dtype and got.shape == strided.shape and torch.equal(got, strided)


def test_receive_buffers_must_be_host_tensors() -> None:
    with pytest.raises(AssertionError):
        _bytes_of(torch.zeros(4, 4).t())  # a strided view cannot take a frame in place


# --- scripts/gpu-check.sh ---------------------------------------------------------------------

@no_gpu
def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "no CUDA GPU" in r.stdout and "nothing GPU-specific is verified" in r.stdout
    result = json.loads(lines[-1])
    assert result["gpu"] is False and result["ok"] is True


def test_gpu_check_selects_exactly_the_gpu_guarded_tests() -> None:
    """``pytest -m gpu`` over the files gpu-check.sh greps: the CUDA tests, not the CPU tests
    beside them, nor a test guarded the other way (runs only without a GPU)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "cuda.is_available" in p.read_text())
    assert "tests/test_device_wiring.py" in files and "tests/test_engine_device.py" in files
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                        "-p", "no:cacheprovider", *files], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    selected = {line.split("::")[1].split("[")[0] for line in r.stdout.splitlines() if "::" in line}
    assert {"test_cuda_engine_matches_cpu", "test_cuda_copies_through_pinned_staging",
            "test_cuda_replica_computes_on_its_gpu",
            "test_cuda_stage_sends_host_bytes_and_gives_the_cpu_logits"} <= selected
    assert not selected & {"test_cuda_without_a_gpu_says_so", "test_wire_bytes_of_a_host_tensor_"
                           "are_its_own_bytes", "test_gpu_check_without_a_gpu_says_so_and_exits_0"}


# --- CUDA (a GPU only) -----------------------------------------------------------------------

@needs_gpu
def test_cuda_replica_computes_on_its_gpu(tiny_packed: Path, replica: Any) -> None:
    r = replica(spec_doc(resources={"num_gpus": 1}))  # device by default: cuda
    (span,) = [s for s in r.profile.spans if s.name == "materialize"]
    assert r.profile.device == "cuda:0" == span.attrs["device"]
    assert span.attrs["bytes_copied"] == tensor_bytes(tiny_packed)  # pinned staging, copy stream
    assert r.llm.shards[0].embed.is_cuda and r.llm.shards[0].layers[0].qkv_w.is_cuda
    assert tokens_of(r.loop, r.llm.tokenizer) == reference(tiny_packed)


@needs_gpu
def test_cuda_member_shards_are_on_the_gpu(tiny_packed: Path, coordinator: Coordinator) -> None:
    cfg = EngineConfig(device="cuda", max_batch_size=4, max_seq_len=256)
    holder = member(tiny_packed, coordinator, cfg, DeviceLoader("cuda", staging_bytes=1 << 16))
    try:
        shard = holder._shard(0, holder.manifest.config.num_layers)
        assert shard.device.type == "cuda" and shard.layers[0].qkv_w.is_cuda
        assert holder.mover.num_bytes_copied == tensor_bytes(tiny_packed)
        assert tokens_of(holder.loop, holder.loop.engine.tokenizer) == reference(tiny_packed)
    finally:
        holder.close()


@needs_gpu
def test_cuda_wire_bytes_are_the_tensor_s_bytes_on_the_host() -> None:
    t = (torch.arange(64, dtype=torch.float32) * 0.1).to(torch.bfloat16).reshape(4, 16)
    assert bytes(wire_bytes(t.cuda())) == bytes(wire_bytes(t))
    assert bytes(wire_bytes(t.cuda().t())) == bytes(wire_bytes(t.t()))


@needs_gpu
def test_cuda_stage_sends_host_bytes_and_gives_the_cpu_logits(tiny_packed: Path) -> None:
    """A head whose first stage is on the GPU sends its hidden states to a stage whose shard is
    on the GPU too; the logits that come back equal the CPU model's."""
    m = read_manifest(tiny_packed)
    weights = merge_block_tensors([load_block(tiny_packed, m, i) for i in range(m.num_blocks)])
    split, n = m.blocks[m.num_blocks // 2].layer_start, m.config.num_layers
    server_t = ZmqTransport(secret=SECRET, name="gpu-stage")
    server = StageServer(ModelShard(m.config, weights, split, n, torch.float32, "cuda"), server_t, 1)
    thread = threading.Thread(target=server.serve, kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    try:
        with ZmqTransport(secret=SECRET, name="gpu-head") as head_t:
            first = ModelShard(m.config, weights, 0, split, torch.float32, "cuda")
            remote = RemoteStage(head_t, server_t.address, split, n, timeout_s=30)
            ids, batch = torch.tensor([[4, 5, 6, 7]]), ForwardBatch((0,), (0,), 4)
            h = first.forward(ids, batch, first.new_kv_cache(1))
            assert h.is_cuda
            got = remote.forward(h, batch)
        cpu = ModelShard(m.config, weights, 0, n, torch.float32, "cpu")
        want = cpu.forward(ids, batch, cpu.new_kv_cache(1))
        assert got.device.type == "cpu" and torch.allclose(got, want, atol=1e-3, rtol=1e-3)
        assert server.requests_served == 1
    finally:
        server.stop()
        thread.join(5)
        server_t.close()
