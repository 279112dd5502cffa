"""Our engine vs transformers on the same weights: logits, decode steps, chained layer ranges."""

from __future__ import annotations

import mmap
from pathlib import Path
import warnings

import pytest
import torch
import torch.nn.functional as F

from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine import cpu_decode, gemv, model
from faascale.engine.model import (SPLIT_MAX_ROWS, ForwardBatch, _gemv_threads, _linear,
                                   _rms_norm, _split_linear, _split_parts)
from faascale.engine.random_model import pack_random, tiny_config
from faascale.engine.sampling import SamplingParams
from support import hf_model_from_packed

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill_then_decode(llm: LLM, ids: torch.Tensor, extra: torch.Tensor) -> list[torch.Tensor]:
    """All-position logits of a prefill, then one logits row per decode step of ``extra``."""
    shard = llm.shards[0]
    cache = shard.new_kv_cache(2)
    n = ids.shape[1]
    outs = [shard.forward(ids, ForwardBatch((1,), (0,), n), cache, all_logits=True)[0]]
    for i in range(extra.shape[1]):
        outs.append(shard.forward(extra[:, i:i + 1], ForwardBatch((1,), (n + i,), 1), cache))
    return outs


CONFIGS = {
    # Llama 3 RoPE scaling, GQA, untied head (the bundled tiny-llama).
    "llama3": dict(),
    # Qwen2: q/k/v bias (no o bias), tied embeddings, plain RoPE.
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True,
                  rope_scaling=None, rope_theta=1e6),
    # Mistral with a sliding window shorter than the test sequence, linear RoPE scaling.
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=12, num_kv_heads=1,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Llama 2 style: MHA (no GQA), attention and MLP biases.
    "llama2-bias": dict(num_kv_heads=4, attention_bias=True, mlp_bias=True, rope_scaling=None,
                        rope_theta=10000.0),
}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest):
    """Torch's intra-op threads for one test (2: the CPU decode path that splits projections
    into row groups, ``model._split_parts``; 1: the libraries' own GEMV)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, variant: str, threads: int) -> None:
    cfg = tiny_config(**CONFIGS[variant])
    pack_random(tmp_path / variant, seed=7, num_blocks=3, config=cfg)
    llm = LLM.load(tmp_path / variant, EngineConfig())
    hf = hf_model_from_packed(tmp_path / variant)
    ids, extra = _ids(24, cfg.vocab_size), _ids(6, cfg.vocab_size, seed=2)
    ours = _prefill_then_decode(llm, ids, extra)
    with torch.no_grad():
        ref = hf(torch.cat([ids, extra], dim=1)).logits[0]
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (ours[0] - ref[:24]).abs().max() <= 1e-4
    for i, row in enumerate(ours[1:]):
        assert (row[0] - ref[24 + i]).abs().max() <= 1e-4, f"decode step {i}"


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_compiled_batch1_decode_gives_the_torch_layers_numbers(
        tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu_decode.py's one-call layers against the torch layer on the same decode steps: biases,
    MHA and GQA, a sliding window shorter than the sequence, the cache each step writes and the
    next reads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the compiled path's condition
    cfg = tiny_config(**CONFIGS[variant])
    pack_random(tmp_path / variant, seed=7, num_blocks=3, config=cfg)
    llm = LLM.load(tmp_path / variant, EngineConfig())
    calls = []
    real = cpu_decode.decode_layer
    monkeypatch.setattr(cpu_decode, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, extra = _ids(24, cfg.vocab_size), _ids(6, cfg.vocab_size, seed=2)
    compiled = _prefill_then_decode(llm, ids, extra)
    assert len(calls) == 6 * cfg.num_layers  # every decode step, every layer; not the prefill
    monkeypatch.setattr(model, "COMPILED_DECODE", False)
    reference = _prefill_then_decode(llm, ids, extra)
    assert len(calls) == 6 * cfg.num_layers
    for i, (a, b) in enumerate(zip(compiled[1:], reference[1:])):
        assert b.abs().max() > 1.0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"decode step {i}"


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_a_decode_projection_computes_x_times_w_transposed(threads: int, rows: int,
                                                           bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=gen)
    x = torch.randn(rows, 1, 40, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    one_row = rows == 1
    # one row: gemv.py's kernel on every thread; a few: 96 rows in one group per thread
    assert _gemv_threads(x, w) == (threads if one_row and threads > 1 else 0)
    assert _split_parts(x, w) == threads
    out = _linear(x, w, b)
    assert out.shape == (rows, 1, 96)
    assert torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    if threads > 1 and not one_row:  # and _linear took the split path
        assert torch.equal(_split_linear(x, w, b, threads), out)


def test_the_decode_paths_apply_only_where_they_were_measured_to_pay(threads: int) -> None:
    w = torch.randn(96, 40)
    one_row, two_rows = torch.randn(1, 40), torch.randn(2, 40)
    assert _split_parts(two_rows, w) == threads
    assert _split_parts(torch.randn(SPLIT_MAX_ROWS + 1, 40), w) == 1  # prefill: library GEMM
    assert _split_parts(two_rows.bfloat16(), w.bfloat16()) == 1  # bf16 gained nothing
    assert _gemv_threads(one_row.bfloat16(), w.bfloat16()) == 0
    assert _split_parts(two_rows, torch.randn(40, 96).t()) == 1  # a non-contiguous weight
    assert _gemv_threads(one_row, torch.randn(40, 96).t()) == 0
    assert _split_parts(two_rows, torch.randn(95, 40)) == 1  # 95 rows: no even split ...
    assert _gemv_threads(one_row, torch.randn(95, 40)) == (threads if threads > 1 else 0)  # any
    # the LM head keeps oneDNN / F.linear for more than one row: same numbers either way
    assert torch.allclose(_linear(two_rows, w, head=True), F.linear(two_rows, w), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 95, 4096])
def test_the_gemv_kernel_gives_every_row_the_same_sum_on_any_thread_count(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 576, generator=gen)
    x = torch.randn(1, 576, generator=gen)
    ref = gemv.gemv(x, w, 1)
    assert ref.shape == (1, rows)
    assert torch.allclose(ref, F.linear(x, w), atol=1e-4)
    for parts in range(2, min(4, gemv.max_parts()) + 1):
        assert torch.equal(gemv.gemv(x, w, parts), ref), parts  # the split changes no bit


def test_the_gemv_kernel_reads_read_only_weights_and_keeps_nan_and_inf(tmp_path: Path) -> None:
    w = torch.randn(8, 16)
    path = tmp_path / "w.bin"
    path.write_bytes(w.numpy().tobytes())
    with path.open("rb") as f:  # mapped read-only, as a HOST tier's blocks are
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the buffer is not writable"
        ro = torch.frombuffer(mapped, dtype=torch.float32).view(8, 16)
    x = torch.randn(1, 16)
    assert torch.allclose(gemv.gemv(x, ro, 1), F.linear(x, w), atol=1e-5)
    x[0, 3] = float("nan")
    assert gemv.gemv(x, ro, 1).isnan().all()  # IEEE NaN: no finite-math shortcut
    x[0, 3] = float("inf")
    w_pos = w.abs() + 1.0
    assert torch.isinf(gemv.gemv(x, w_pos, 1)).all()
    del ro
    mapped.close()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rms_norm_as_the_layer_norm_of_x_and_minus_x_gives_rms_norm(scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 576, generator=gen) * scale + 0.5 * scale  # a nonzero mean too
    w = torch.randn(576, generator=gen)
    ref = F.rms_norm(x, (576,), w, 1e-5)
    ours = _rms_norm(x, w, 1e-5, torch.cat((w, w)))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert not torch.allclose(ours, x * w, rtol=1e-2)  # it normalized


def test_a_cpu_float32_shard_norms_through_the_doubled_weights(tiny_packed: Path) -> None:
    shard = LLM.load(tiny_packed, EngineConfig()).shards[0]
    layer = shard.layers[0]
    assert torch.equal(shard._doubled_of(layer.post_norm),
                       torch.cat((layer.post_norm, layer.post_norm)))
    assert LLM.load(tiny_packed, EngineConfig(dtype="bfloat16")).shards[0]._doubled is None


def test_chained_layer_ranges_give_the_same_tokens(tiny_packed: Path) -> None:
    whole = LLM.load(tiny_packed, EngineConfig(max_batch_size=4))
    chained = LLM.load(tiny_packed, EngineConfig(max_batch_size=4), layer_splits=[2, 3, 6])
    assert [(s.layer_start, s.layer_end) for s in chained.shards] == [(0, 2), (2, 3), (3, 6), (6, 8)]
    prompts = ["hello world", "faascale", "0123456789"]
    a = [c.token_ids for c in whole.generate(prompts, GREEDY)]
    b = [c.token_ids for c in chained.generate(prompts, GREEDY)]
    assert a == b and all(len(t) == 32 for t in a)


def test_middle_shard_maps_hidden_to_hidden(tiny_packed: Path) -> None:
    llm = LLM.load(tiny_packed, EngineConfig(), layer_splits=[3, 5])
    first, middle, last = llm.shards
    ids = _ids(10, llm.manifest.config.vocab_size)
    batch = ForwardBatch((0,), (0,), 10)
    h1 = first.forward(ids, batch, first.new_kv_cache(1))
    h2 = middle.forward(h1, batch, middle.new_kv_cache(1))
    logits = last.forward(h2, batch, last.new_kv_cache(1))
    hidden = llm.manifest.config.hidden_size
    assert h1.shape == h2.shape == (1, 10, hidden) and not torch.equal(h1, h2)
    assert logits.shape == (1, llm.manifest.config.vocab_size)
    whole = LLM.load(tiny_packed, EngineConfig()).shards[0]
    ref = whole.forward(ids, batch, whole.new_kv_cache(1))
    assert torch.allclose(logits, ref, atol=1e-5)


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers(smollm2_packed: Path, smollm2_llm: LLM) -> None:
    hf = hf_model_from_packed(smollm2_packed)
    prompt = smollm2_llm.tokenizer.encode("The capital of France is")
    # Both sides decode through EOS (ours: ignore_eos). Not min_new_tokens: that would make
    # transformers mask the EOS logit, a different distribution, not a different engine.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ref) == 32
    ours = smollm2_llm.generate([prompt], GREEDY)[0].token_ids
    assert list(ours) == ref
