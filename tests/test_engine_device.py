"""The device-generic engine: ``EngineConfig.device`` parsed and resolved with typed errors, the
engine on ``cpu``/``auto`` through the one code path (zero-copy weights, same tokens), weights
through a ``DeviceLoader``, the pieces the GPU path relies on run on CPU tensors (one host copy
per step, the KV cache's per-forward index, rotary slices, whole K/V heads); the CUDA path where
a GPU exists (a plain skip otherwise: hardware, a skip in CI too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import (ConfigError, DeviceUnavailableError, EngineConfig,
                                    check_device_name, resolve_device)
from faascale.engine.kv_cache import KVCache
from faascale.engine.llm import LLM
from faascale.engine.model import (ForwardBatch, ModelShard, Rotary, _attention, _rotate,
                                   whole_kv_heads)
from faascale.engine.sampling import (SamplingParams, _greedy_step, _packed_tolist, logprobs_of,
                                      sample, sample_step)
from faascale.memory_tier.device import DeviceLoader

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="hardware absent: needs a CUDA GPU (a skip in CI too)")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello", "The quick brown fox jumps over", "a", "0123 4567 89", "zzzz"]


def _staggered(llm: LLM, params: SamplingParams = GREEDY) -> dict[str, tuple[int, ...]]:
    """Greedy tokens of PROMPTS arriving one every 2 steps into a 4-slot batch: prefills,
    decode at mixed positions (masks, scattered KV writes), slots reused."""
    engine = llm.new_engine()
    got: dict[str, list[int]] = {p: [] for p in PROMPTS}
    pending, steps = list(PROMPTS), 0
    while pending or engine.has_unfinished():
        if pending and steps % 2 == 0:
            p = pending.pop(0)
            engine.add_request(p, llm.tokenizer.encode(p), params)
        for out in engine.step():
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
        steps += 1
    return {p: tuple(t) for p, t in got.items()}


# --- the setting ----------------------------------------------------------------------------

def test_device_names_are_checked_at_the_edge() -> None:
    assert EngineConfig().device == "cpu"
    for name in ("cpu", "cuda", "cuda:0", "cuda:3", "auto"):
        assert EngineConfig(device=name).device == name == check_device_name(name)
    for bad in ("meta", "mps", "xpu", "CPU", "cuda:", "cuda:-1", "cuda:x", "cuda:0 ", "", "cpu:0"):
        with pytest.raises(ConfigError, match="device: .* is not supported"):
            EngineConfig(device=bad)


def test_auto_and_cpu_resolve_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda", torch.cuda.current_device())
        assert resolve_device("cuda").index is not None  # indexed: tensor.device compares equal
    else:
        assert EngineConfig(device="auto").resolve_device() == torch.device("cpu")


def test_a_gpu_this_machine_lacks_is_a_typed_error(tiny_packed: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="cuda:4096"):
        EngineConfig(device="cuda:4096").resolve_device()
    assert issubclass(DeviceUnavailableError, ConfigError)  # mapped like any config error
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="is_available"):
            LLM.load(tiny_packed, EngineConfig(device="cuda"))


def test_a_shard_on_the_meta_device_is_a_typed_error(tiny_packed: Path) -> None:
    """No fake: the real shard constructor, given a device torch has but the engine does not run
    on, fails before it touches a weight."""
    m = read_manifest(tiny_packed)
    weights = {k: v for i in range(m.num_blocks) for k, v in load_block(tiny_packed, m, i).items()}
    for bad in ("meta", torch.device("meta"), "mps"):
        with pytest.raises(ConfigError, match="device"):
            ModelShard(m.config, weights, 0, m.config.num_layers, device=bad)


# --- the engine on CPU, through the device-generic path ------------------------------------

def test_cpu_and_auto_run_the_same_path_zero_copy(tiny_packed: Path) -> None:
    base = LLM.load(tiny_packed, EngineConfig(max_batch_size=4, max_seq_len=96))
    expected = _staggered(base)
    m = read_manifest(tiny_packed)
    names = ["cpu"] + ([] if torch.cuda.is_available() else ["auto"])
    for name in names:
        llm = LLM.load(tiny_packed, EngineConfig(max_batch_size=4, max_seq_len=96, device=name))
        shard = llm.shards[0]
        assert shard.device == torch.device("cpu")
        chain = llm.new_engine().runner
        assert all(t.device.type == "cpu" for t in chain.caches[0].k)
        assert _staggered(llm) == expected
    # weights are the mapped block tensors themselves (zero copy), as before
    blocks = [load_block(tiny_packed, m, i) for i in range(m.num_blocks)]
    llm = LLM.from_blocks(m, read_tokenizer_json(tiny_packed, m), blocks,
                          EngineConfig(device="cpu"))
    mapped = {k: t.data_ptr() for b in blocks for k, t in b.items()}
    assert llm.shards[0].layers[0].qkv_w.data_ptr() == mapped["layers.0.qkv.weight"]
    assert llm.shards[0].embed.data_ptr() == mapped["embed.weight"]


def test_weights_through_a_device_loader(tiny_packed: Path) -> None:
    """``LLM.from_blocks(mover=...)``: the loader's copy (the staging ring on CPU tensors) gives
    the same tokens as the zero-copy mapping, over its own memory."""
    m = read_manifest(tiny_packed)
    blocks = [load_block(tiny_packed, m, i) for i in range(m.num_blocks)]
    cfg = EngineConfig(max_batch_size=4, max_seq_len=96)
    tok = read_tokenizer_json(tiny_packed, m)
    mapped = LLM.from_blocks(m, tok, blocks, cfg)
    copied = LLM.from_blocks(m, tok, blocks, cfg,
                             mover=DeviceLoader("cpu", staging_bytes=4096, copy=True))
    w_mapped, w_copied = mapped.shards[0].layers[1].gate_up_w, copied.shards[0].layers[1].gate_up_w
    assert torch.equal(w_mapped, w_copied) and w_mapped.data_ptr() != w_copied.data_ptr()
    assert _staggered(copied) == _staggered(mapped)


def test_logits_stay_on_the_shards_device(tiny_packed: Path) -> None:
    shard = LLM.load(tiny_packed).shards[0]
    cache = shard.new_kv_cache(2)
    assert cache.device == shard.device
    logits = shard.forward(torch.tensor([[5, 6, 7]]), ForwardBatch((1,), (0,), 3), cache)
    assert logits.device == shard.device and logits.dtype == torch.float32


# --- what the GPU path relies on, run on CPU tensors -----------------------------------------

def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 50, generator=g) * 3
    x[1, 7] = float("nan")
    x[2, :] = float("nan")
    x[3, 11] = float("inf")
    x[4, 20:] = float("-inf")
    return x


def test_sample_step_is_sample_then_logprobs_on_cpu() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, seed=1, logprobs=0),
              SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=1.2, seed=2),
              SamplingParams(temperature=0.9, top_p=0.8, top_k=5, seed=3, logprobs=2)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]  # noqa: E731
    tokens, lps = sample_step(logits, params, gens())
    assert tokens == sample(logits, params, gens())
    rows = [0, 2, 3, 5]
    want = logprobs_of(logits[rows], [tokens[i] for i in rows], [3, 0, 5, 2])
    assert [lps[i] for i in rows] == want and lps[1] is None and lps[4] is None


def test_the_one_copy_greedy_path_gives_the_cpu_answers() -> None:
    """``_greedy_step`` is what runs on a GPU when every row is greedy (argmax and log-probs on
    the device, one copy back): on CPU tensors it gives exactly the CPU path's numbers, NaN and
    infinite rows included."""
    logits = _logits()
    params = [SamplingParams(temperature=0, logprobs=k) for k in (2, None, 4, 0, None, 20)]
    gens = [None] * 6
    assert _greedy_step(logits, params) == sample_step(logits, params, gens)
    no_lp = [SamplingParams(temperature=0)] * 6
    assert _greedy_step(logits, no_lp) == sample_step(logits, no_lp, gens)


def test_one_packed_copy_gives_what_tolist_gives() -> None:
    ts = [torch.tensor([3, 0, 49151]), torch.tensor([-0.125, -9999.0, 1e-30]),
          torch.randn(3, 4), torch.tensor([[1, 2], [3, 4]]), torch.empty(2, 0)]
    packed = _packed_tolist(ts)
    assert packed == [t.tolist() for t in ts]


def test_kv_index_is_built_once_per_forward() -> None:
    cache = KVCache(2, 6, 2, 4, torch.float32, chunk_tokens=8)
    cache.ensure_capacity(8)
    idx = cache.index((0, 1, 2), (5, 5, 5))
    assert idx.slot_idx is None and idx.pos_idx is None  # views, a block write
    idx = cache.index((1, 4), (3, 6))
    assert idx.slot_idx.tolist() == [1, 4] and idx.pos_idx.tolist() == [3, 6]
    idx = cache.index((2, 3), (1, 7))  # contiguous slots, mixed starts: scatter write, view read
    assert idx.slot_idx.tolist() == [2, 3] and idx.pos_idx.tolist() == [1, 7]
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    other = KVCache(2, 6, 2, 4, torch.float32, chunk_tokens=8)
    other.ensure_capacity(8)
    for c, index in ((cache, cache.index((1, 4), (3, 6))), (other, None)):
        c.write(1, (1, 4), (3, 6), k, v, index)
    assert torch.equal(cache.k[1], other.k[1]) and torch.equal(cache.v[1], other.v[1])
    read = cache.read(1, (1, 4), 8, cache.index((1, 4), (3, 6)))
    for a, b in zip(read, other.read(1, (1, 4), 8)):
        assert torch.equal(a, b)


def test_rotary_slices_and_gathers_the_same_rows(tiny_packed: Path) -> None:
    cfg = read_manifest(tiny_packed).config
    rot = Rotary(cfg, torch.float32)
    cos_u, sin_u = rot.tables((9, 9), 3)
    assert cos_u.shape == (1, 1, 3, cfg.head_dim)
    cos_g, sin_g = rot.tables((4, 9), 3)
    assert cos_g.shape == (2, 1, 3, cfg.head_dim)
    assert torch.equal(cos_g[1], cos_u[0]) and torch.equal(sin_g[1], sin_u[0])
    # the folded sign is the reference's rotate_half, bit for bit
    x = torch.randn(2, 4, 3, cfg.head_dim)
    half = cfg.head_dim // 2
    sin_ref = sin_g.clone()
    sin_ref[..., :half] = -sin_ref[..., :half]
    ref = x * cos_g + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin_ref
    assert torch.equal(_rotate(x, cos_g, sin_g), ref)
    assert rot.tables((300,), 1)[0].shape[2] == 1 and rot.cos.shape[0] >= 301  # grows


def test_whole_kv_heads_where_sdpa_cannot_group() -> None:
    assert not whole_kv_heads("cpu", torch.float32, True)
    assert not whole_kv_heads("cuda", torch.bfloat16, False)  # flash: enable_gqa
    assert not whole_kv_heads("cuda", torch.float16, False)
    assert whole_kv_heads("cuda", torch.bfloat16, True)  # a mask: the efficient kernel
    assert whole_kv_heads("cuda", torch.float32, False)
    assert whole_kv_heads("cuda", torch.bfloat16, False, flash_capable=False)  # before sm80
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g),
               torch.randn(2, 2, 5, 8, generator=g))
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        grouped = _attention(q, k, v, m, False, whole_heads=False)
        assert torch.allclose(_attention(q, k, v, m, False, whole_heads=True), grouped, atol=1e-6)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert torch.allclose(_attention(q, k, v, None, False), ref, atol=1e-6)


# --- CUDA (a GPU only) -----------------------------------------------------------------------

class _DeviceToHost(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that bring CUDA data to the host (copies to CPU, ``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.is_cuda for t in ins) and (func is torch.ops.aten._local_scalar_dense.default
                                            or any(o.device.type == "cpu" for o in outs)):
            self.count += 1
        return out


@needs_gpu
def test_cuda_engine_matches_cpu(tiny_packed: Path) -> None:
    cfg = EngineConfig(max_batch_size=4, max_seq_len=96)
    cpu = LLM.load(tiny_packed, cfg)
    gpu = LLM.load(tiny_packed, EngineConfig(max_batch_size=4, max_seq_len=96, device="cuda"),
                   mover=DeviceLoader("cuda", staging_bytes=1 << 16))
    shard = gpu.shards[0]
    assert shard.device.type == "cuda" and shard.layers[0].qkv_w.is_cuda and shard.embed.is_cuda
    assert all(t.is_cuda for t in gpu.new_engine().runner.caches[0].k)
    ids = torch.tensor([list(range(3, 40))])
    a = cpu.shards[0].forward(ids, ForwardBatch((0,), (0,), 37), cpu.shards[0].new_kv_cache(1),
                              all_logits=True)
    b = shard.forward(ids, ForwardBatch((0,), (0,), 37), shard.new_kv_cache(1), all_logits=True)
    assert b.is_cuda and torch.allclose(a, b.cpu(), atol=1e-3, rtol=1e-3)
    assert _staggered(gpu) == _staggered(cpu)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=7, ignore_eos=True)
    assert _staggered(gpu, seeded) == _staggered(cpu, seeded)  # the CPU generator draws alike


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_attention_never_falls_back_to_the_math_kernel(tiny_packed: Path, dtype: str) -> None:
    """Flash or memory-efficient SDPA only (the math kernel disabled): prefill, decode at mixed
    positions with a mask, chunked prefill."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    llm = LLM.load(tiny_packed, EngineConfig(dtype=dtype, device="cuda", max_batch_size=4,
                                             max_seq_len=96))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = _staggered(llm)
    assert all(len(t) == GREEDY.max_tokens for t in got.values())


@needs_gpu
def test_one_device_to_host_copy_per_decode_step(tiny_packed: Path) -> None:
    llm = LLM.load(tiny_packed, EngineConfig(device="cuda", max_batch_size=4, max_seq_len=96))
    for params in ([SamplingParams(temperature=0, logprobs=k) for k in (None, 3, None, 1)],
                   [SamplingParams(temperature=0.8, seed=i, logprobs=2) for i in range(4)]):
        engine = llm.new_engine()
        for i, p in enumerate(params):
            engine.add_request(f"r{i}", [5 + i, 6, 7 + i], SamplingParams(
                **{**p.__dict__, "max_tokens": 4, "ignore_eos": True}))
        while engine.num_waiting:
            engine.step()
        reqs = sorted(engine.running.values(), key=lambda r: r.slot)
        with _DeviceToHost() as counter:
            outs = engine._decode(reqs)
        assert len(outs) == 4 and counter.count == 1


@needs_gpu
def test_cuda_hidden_states_from_the_host_are_moved_in(tiny_packed: Path) -> None:
    """A middle shard takes a remote stage's CPU hidden states and computes on its GPU."""
    cpu = LLM.load(tiny_packed, layer_splits=[3])
    gpu = LLM.load(tiny_packed, EngineConfig(device="cuda"), layer_splits=[3])
    ids, batch = torch.tensor([[4, 5, 6, 7]]), ForwardBatch((0,), (0,), 4)
    h = cpu.shards[0].forward(ids, batch, cpu.shards[0].new_kv_cache(1))
    want = cpu.shards[1].forward(h, batch, cpu.shards[1].new_kv_cache(1))
    got = gpu.shards[1].forward(h, batch, gpu.shards[1].new_kv_cache(1))
    assert got.is_cuda and torch.allclose(got.cpu(), want, atol=1e-3, rtol=1e-3)
