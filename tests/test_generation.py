"""A replica's request path without Ray: a batch of prompts × n choices as engine requests,
merged into one stream tagged by choice index; echo; rejections before any token; a closed
stream aborts every choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.sampling import SamplingParams
from faascale.platform.generation import MAX_CHOICES, Generation, expand

CFG = EngineConfig(max_batch_size=8, max_seq_len=64)


@pytest.fixture()
def gen(tiny_packed: Path):
    llm = LLM.load(tiny_packed, CFG)
    loop = EngineLoop(llm.new_engine())
    yield Generation(llm, loop, CFG.max_seq_len)
    loop.stop()


def collect(gen: Generation, request: dict) -> list[dict]:
    async def go() -> list[dict]:
        return [c async for c in gen.generate(request)]
    return asyncio.run(go())


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in chunks:
        out.setdefault(c["index"], []).append(c)
    return out


def test_expand_numbers_choices_as_openai_and_offsets_seeds() -> None:
    subs = expand({"batch": ["a", [5, 6]], "n": 3, "params": {"seed": 10}, "prompt": "x"})
    assert [i for i, _ in subs] == [0, 1, 2, 3, 4, 5]
    assert [s["params"]["seed"] for _, s in subs] == [10, 11, 12, 10, 11, 12]
    assert subs[0][1]["prompt"] == "a" and "prompt_ids" not in subs[0][1]
    assert subs[3][1]["prompt_ids"] == [5, 6] and "prompt" not in subs[3][1]
    with pytest.raises(ValueError, match="n:"):
        expand({"n": 0})
    with pytest.raises(ValueError, match=f"at most {MAX_CHOICES}"):
        expand({"batch": ["a"] * 20, "n": 13})


def test_a_batch_times_n_streams_every_choice_with_the_tokens_it_gets_alone(gen: Generation) -> None:
    greedy = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    chunks = collect(gen, {"batch": ["hello", "ok then"], "n": 2, "params": greedy})
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1, 2, 3]
    for index, prompt in [(0, "hello"), (1, "hello"), (2, "ok then"), (3, "ok then")]:
        alone = gen.llm.generate(prompt, SamplingParams(**greedy))[0]
        got = choices[index]
        # token_ids: a chunk holds every token made since the last (several when the consumer
        # fell behind, as on a loaded machine); token_id is only its last
        assert [t for c in got for t in c["token_ids"]] == list(alone.token_ids)
        assert got[-1]["finished"] and sum(c["finished"] for c in got) == 1


def test_seeded_choices_differ_and_repeat(gen: Generation) -> None:
    params = {"max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    a = by_choice(collect(gen, {"prompt": "hello", "n": 3, "params": params}))
    b = by_choice(collect(gen, {"prompt": "hello", "n": 3, "params": params}))
    texts = ["".join(c["text"] for c in a[i]) for i in range(3)]
    assert texts == ["".join(c["text"] for c in b[i]) for i in range(3)]
    assert len(set(texts)) > 1


def test_echo_and_logprobs_ride_on_each_choices_first_chunk(gen: Generation) -> None:
    params = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True, "logprobs": 1,
              "prompt_logprobs": 1}
    ids = gen.llm.tokenizer.encode("zz top")
    chunks = collect(gen, {"batch": [ids, "hello"], "echo": True, "params": params})
    choices = by_choice(chunks)
    first = choices[0][0]
    assert first["prompt_text"] == gen.llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert choices[1][0]["prompt_text"] == "hello"
    assert first["prompt_logprobs"][0][0] == ids[0] and first["prompt_logprobs"][0][2] is None
    assert len(first["prompt_logprobs"]) == len(ids)
    tok_id, tok, lp, top = first["prompt_logprobs"][1]
    assert tok_id == ids[1] and isinstance(tok, str) and lp <= 0 and len(top) == 1
    assert len(first["logprobs"]) == 1 and first["logprobs"][0][0] == first["token_id"]


def test_one_bad_prompt_rejects_the_whole_request_and_runs_nothing(gen: Generation) -> None:
    chunks = collect(gen, {"batch": ["hello", "x" * 500], "params": {"max_tokens": 2}})
    assert len(chunks) == 1 and chunks[0]["error"]["status"] == 400
    assert "context" in chunks[0]["error"]["message"]
    assert not gen.loop.engine.has_unfinished()


def test_closing_the_stream_aborts_every_choice(gen: Generation) -> None:
    async def go() -> None:
        agen = gen.generate({"prompt": "hello", "n": 4,
                             "params": {"max_tokens": 50, "temperature": 0.0, "ignore_eos": True}})
        await agen.__anext__()
        await agen.aclose()
        for _ in range(100):
            if gen.loop.engine.num_running + gen.loop.engine.num_waiting == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("choices still running after the stream closed")
    asyncio.run(go())


def test_a_slow_consumer_gets_the_tokens_merged_and_loses_none(gen: Generation) -> None:
    """A stream that takes longer per chunk than the engine per token gets several tokens per
    chunk (what keeps a stream through Serve at the engine's rate), and text, ids and
    log-probabilities add up to the unmerged answer. (Whether the first token comes alone depends
    on how soon the consumer's event loop runs after it is made: on a loaded machine the second
    may be made first, so that is not asserted.)"""
    params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}

    async def slow() -> list[dict]:
        chunks = []
        async for c in gen.generate({"prompt": "hello", "params": params}):
            chunks.append(c)
            await asyncio.sleep(0.05)
        return chunks
    chunks = asyncio.run(slow())
    alone = gen.llm.generate("hello", SamplingParams(max_tokens=24, temperature=0.0,
                                                     ignore_eos=True))[0]
    assert len(chunks) < 24 and max(len(c["token_ids"]) for c in chunks) > 1
    assert [t for c in chunks for t in c["token_ids"]] == list(alone.token_ids)
    assert "".join(c["text"] for c in chunks) == alone.text
    assert [lp[0] for c in chunks for lp in c["logprobs"]] == list(alone.token_ids)
    assert chunks[-1]["finished"] and chunks[-1]["num_output_tokens"] == 24
