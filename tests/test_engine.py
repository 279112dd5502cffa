"""Continuous batching, sampling, stop conditions, aborts and the threaded engine loop."""

from __future__ import annotations

import asyncio
from dataclasses import replace
import threading
from pathlib import Path

import pytest
import torch

from faascale.engine.config import EngineConfig
from faascale.engine.engine import DuplicateRequestError, PromptTooLongError, ShardChain
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.sampling import SamplingParams, SamplingParamsError

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = ["hello", "The quick brown fox jumps over", "a", "0123 4567 89", "zzzz", "ok then"]


@pytest.fixture()
def tiny(tiny_packed: Path) -> LLM:
    return LLM.load(tiny_packed, EngineConfig(max_batch_size=4, max_seq_len=96,
                                              max_prefill_tokens_per_step=16))


def test_batched_requests_get_the_tokens_they_get_alone(tiny: LLM) -> None:
    alone = {p: tiny.generate(p, GREEDY)[0].token_ids for p in PROMPTS}
    # Staggered arrivals into a 4-slot batch with a 16-token prefill budget: requests join and
    # leave between steps, some wait for a slot, slots are reused.
    engine = tiny.new_engine()
    got: dict[str, list[int]] = {p: [] for p in PROMPTS}
    pending = list(PROMPTS)
    steps = 0
    max_running = 0
    while pending or engine.has_unfinished():
        if pending and steps % 3 == 0:
            p = pending.pop(0)
            engine.add_request(p, tiny.tokenizer.encode(p), GREEDY)
        for out in engine.step():
            if out.token_id is not None:
                got[out.request_id].append(out.token_id)
        max_running = max(max_running, engine.num_running)
        steps += 1
    assert max_running == 4  # the batch really filled up
    assert {p: tuple(t) for p, t in got.items()} == alone


def test_mixed_lengths_decode_together(tiny: LLM) -> None:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 17, 9, 1)]
    outs = tiny.generate(PROMPTS[:4], params)
    assert [o.num_output_tokens for o in outs] == [3, 17, 9, 1]
    assert all(o.finish_reason == "length" for o in outs)
    for o, p, prm in zip(outs, PROMPTS, params):
        assert o.token_ids == tiny.generate(p, prm)[0].token_ids


def test_seed_makes_sampling_reproducible(tiny: LLM) -> None:
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                       ignore_eos=True)
    a = tiny.generate("hello", p)[0].token_ids
    b = tiny.generate(["hello", "other prompt"], [p, p])[0].token_ids  # batched with another
    c = tiny.generate("hello", SamplingParams(**{**p.__dict__, "seed": 99}))[0].token_ids
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny: LLM) -> None:
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=1, ignore_eos=True)
    assert tiny.generate("hello", p)[0].token_ids == tiny.generate(
        "hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids


def test_a_request_whose_numbers_overflow_hurts_no_other(tiny: LLM) -> None:
    """temperature 1e-45 divides the logits into inf (softmax: NaN): it samples greedily, as
    vLLM does below 1e-5, and the request batched beside it gets exactly its tokens alone."""
    healthy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    alone = tiny.generate("The quick brown fox jumps over", healthy)[0].token_ids
    tiny_t = SamplingParams(max_tokens=30, temperature=1e-45, ignore_eos=True)
    outs = tiny.generate(["hello", "The quick brown fox jumps over"], [tiny_t, healthy])
    assert outs[1].token_ids == alone and outs[1].finish_reason == "length"
    assert outs[0].token_ids == tiny.generate("hello", healthy)[0].token_ids  # greedy


def test_sampling_never_fails_on_non_finite_logits() -> None:
    from faascale.engine.sampling import sample

    logits = torch.tensor([[0.0, float("nan"), 1.0, float("-inf")],
                           [float("nan")] * 4,
                           [0.0, float("inf"), 1.0, 2.0],
                           [1.0, 2.0, 3.0, 4.0]])
    hot = SamplingParams(temperature=1.0, seed=3)
    got = sample(logits, [hot, hot, SamplingParams(temperature=0.0), hot],
                 [torch.Generator().manual_seed(3) for _ in range(4)])
    assert got[0] == 2 and got[1] == 0 and got[2] == 1  # the largest finite (or +inf) logit
    assert 0 <= got[3] < 4
    # every row greedy (the argmax over the logits as they are, cleaned only when a pick is not
    # finite): the same picks, NaN never chosen
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 4, [None] * 4) == [2, 0, 1, 3]
    assert sample(logits[3:], [greedy], [None]) == [3]


def test_seed_outside_64_bits_is_a_typed_error() -> None:
    with pytest.raises(SamplingParamsError, match=r"seed: must be in \[0, 2\^64 - 1\]"):
        SamplingParams(seed=2**64)
    with pytest.raises(SamplingParamsError, match="seed"):
        SamplingParams(seed=-1)
    SamplingParams(seed=2**64 - 1)  # the largest one torch takes


def test_top_p_restricts_to_the_nucleus() -> None:
    from faascale.engine.sampling import sample

    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0, -10.0]])
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    picks = {sample(logits, [p], [g])[0] for g in gens}
    assert picks == {0}  # token 0 alone reaches p=0.5 (prob ~0.52)
    wide = SamplingParams(temperature=1.0, top_p=1.0)
    assert {sample(logits, [wide], [g])[0] for g in gens} == {0, 1}


def test_stop_string_truncates_and_finishes(tiny: LLM) -> None:
    full = tiny.generate("hello", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    text = full.text
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) == 5
    out = tiny.generate("hello", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == text[:5]


def test_stop_token_and_eos(tiny: LLM) -> None:
    full = tiny.generate("hello", GREEDY)[0].token_ids
    out = tiny.generate("hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop_token_ids=(full[3],)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(full[3])]


def test_length_limits(tiny: LLM) -> None:
    with pytest.raises(PromptTooLongError, match="96 tokens"):
        tiny.generate("x" * 200, GREEDY)
    out = tiny.generate("x" * 90, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.num_prompt_tokens + out.num_output_tokens == 96


def test_bad_requests_raise_typed_errors(tiny: LLM) -> None:
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    engine = tiny.new_engine()
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("a", [10**6], GREEDY)
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(DuplicateRequestError):
        engine.add_request("a", [1, 2], GREEDY)


def test_abort_frees_the_slot(tiny: LLM) -> None:
    engine = tiny.new_engine()
    for i in range(4):
        engine.add_request(f"r{i}", [1, 2, 3], GREEDY)
    engine.add_request("late", [4, 5], GREEDY)
    engine.step()
    assert engine.num_running == 4 and engine.num_waiting == 1
    assert engine.abort("r1") and not engine.abort("nope")
    outs = engine.step()
    assert any(o.request_id == "r1" and o.finish_reason == "abort" for o in outs)
    assert engine.num_running == 4 and engine.num_waiting == 0  # "late" took r1's slot


def test_resumed_request_continues_where_it_left_off(tiny: LLM) -> None:
    """A request re-admitted with its output ids (PipeCast switch-over) continues identically."""
    full = tiny.generate("hello", GREEDY)[0].token_ids
    engine = tiny.new_engine()
    engine.add_request("r", tiny.tokenizer.encode("hello"), GREEDY)
    engine.waiting["r"].output_ids.extend(full[:7])
    rest = []
    while engine.has_unfinished():
        rest += [o.token_id for o in engine.step() if o.token_id is not None]
    assert tuple(full[:7]) + tuple(rest[:len(full) - 7]) == full


def test_switch_runner_mid_generation_changes_no_token(tiny_packed: Path) -> None:
    """Three requests (seeded sampling and greedy) start on a 2-stage chain; after 5 steps the
    engine switches to the whole model: every request ends with exactly its unbroken tokens."""
    cfg = EngineConfig(max_batch_size=4, max_seq_len=96)
    split = LLM.load(tiny_packed, cfg, layer_splits=[3])
    whole = LLM.load(tiny_packed, cfg)
    params = [SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True), GREEDY,
              SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=1, ignore_eos=True)]
    prompts = ["hello", "The quick brown fox", "zz"]
    expected = [whole.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    engine = split.new_engine()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", split.tokenizer.encode(p), sp)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    for step in range(40):
        if step == 5:
            assert sorted(engine.switch_runner(whole.new_engine().runner)) == ["r0", "r1", "r2"]
        for o in engine.step():
            if o.token_id is not None:
                got[o.request_id].append(o.token_id)
        if not engine.has_unfinished():
            break
    assert [tuple(got[f"r{i}"]) for i in range(3)] == [tuple(e) for e in expected]
    other_model = ShardChain.__new__(ShardChain)  # only its config is read
    other_model.shards = [type("S", (), {"cfg": replace(whole.manifest.config, vocab_size=300)})()]
    with pytest.raises(ValueError, match="different model"):
        engine.switch_runner(other_model)


def test_engine_loop_serves_threads_concurrently(tiny: LLM) -> None:
    expected = {p: tiny.generate(p, GREEDY)[0].token_ids for p in PROMPTS}
    loop = EngineLoop(tiny.new_engine())
    got: dict[str, tuple[int, ...]] = {}

    def client(p: str) -> None:
        got[p] = tuple(o.token_id for o in loop.submit(tiny.tokenizer.encode(p), GREEDY)
                       if o.token_id is not None)

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    loop.stop()
    assert got == expected


def test_engine_loop_async_streaming_and_cancel(tiny_packed: Path) -> None:
    llm = LLM.load(tiny_packed, EngineConfig(max_batch_size=4, max_seq_len=8192))
    loop = EngineLoop(llm.new_engine())
    endless = SamplingParams(max_tokens=8000, temperature=0, ignore_eos=True)  # ~10 s of decoding

    async def main() -> tuple[list[str], int]:
        texts = [o.text async for o in loop.asubmit(llm.tokenizer.encode("hello"), GREEDY)]
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in loop.asubmit(llm.tokenizer.encode("bye"), endless):
                seen += 1

        task = asyncio.create_task(consume())
        while seen < 3:
            await asyncio.sleep(0.005)
        task.cancel()  # what a server does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        return texts, seen

    texts, seen = asyncio.run(main())
    assert "".join(texts) == llm.generate("hello", GREEDY)[0].text and seen >= 3
    for _ in range(100):  # the abort reaches the engine thread within a step or two
        if not loop.engine.has_unfinished():
            break
        threading.Event().wait(0.01)
    assert loop.engine.num_running == 0
    with pytest.raises(PromptTooLongError):
        loop.submit([1] * 9000, GREEDY)
    loop.stop()
