"""Log-probabilities from the engine: each new token's and the prompt's (completions' echo),
checked against an independent full forward of the same model (log-softmax of its logits)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from faascale.engine.config import EngineConfig
from faascale.engine.engine import ShardChain
from faascale.engine.llm import LLM
from faascale.engine.model import ForwardBatch
from faascale.engine.sampling import (MIN_LOGPROB, SamplingParams, SamplingParamsError,
                                      logprobs_of)
from faascale.pipecast.stage import StageChain

CFG = EngineConfig(max_batch_size=4, max_seq_len=96, max_prefill_tokens_per_step=64)


@pytest.fixture()
def tiny(tiny_packed: Path) -> LLM:
    return LLM.load(tiny_packed, CFG)


def reference_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of one fresh full-sequence forward [len(ids), vocab]: row i predicts ids[i+1]."""
    chain = ShardChain(llm.shards, 1)
    logits = chain.forward(torch.tensor([ids]), ForwardBatch((0,), (0,), len(ids)), all_logits=True)
    return torch.log_softmax(logits[0].float(), dim=-1)


def run(llm: LLM, prompt_ids: list[int], params: SamplingParams, engine=None) -> list:  # noqa: ANN001
    engine = engine or llm.new_engine()
    engine.add_request("r", prompt_ids, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == "r"]
    return outs


def test_greedy_token_logprobs_equal_log_softmax_of_the_logits(tiny: LLM) -> None:
    prompt = tiny.tokenizer.encode("The quick brown fox")
    outs = run(tiny, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                            logprobs=3))
    tokens = [o.token_id for o in outs]
    ref = reference_logprobs(tiny, prompt + tokens)
    assert len(outs) == 12 and all(len(o.logprobs) == 1 for o in outs)
    for i, o in enumerate(outs):
        row = ref[len(prompt) - 1 + i]
        lp = o.logprobs[0]
        assert lp.token_id == o.token_id
        assert lp.logprob == pytest.approx(float(row[o.token_id]), abs=1e-4)
        # greedy: the chosen token is the most likely one, and the alternatives come in order
        assert lp.top[0][0] == o.token_id and len(lp.top) == 3
        want = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_prompt_logprobs_score_every_prompt_token(tiny: LLM) -> None:
    prompt = tiny.tokenizer.encode("0123 4567 89 hello")
    outs = run(tiny, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                            prompt_logprobs=2, logprobs=1))
    first = outs[0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
    assert first.prompt_logprobs[0] is None
    ref = reference_logprobs(tiny, prompt)
    for i, lp in enumerate(first.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(ref[i - 1], 2).indices.tolist()
    # the one generated token is scored from the prompt's last position
    assert first.logprobs[0].logprob == pytest.approx(float(ref[-1, first.token_id]), abs=1e-4)


def test_prompt_logprobs_through_a_two_stage_pipeline_match_the_whole_model(
        tiny_packed: Path, tiny: LLM) -> None:
    split = LLM.load(tiny_packed, CFG, layer_splits=[2])
    chain = StageChain(split.shards, split.manifest.config, CFG.max_batch_size)
    engine = split.new_engine()
    engine.switch_runner(chain)
    prompt = tiny.tokenizer.encode("zz top")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    got = run(split, prompt, params, engine)[0].prompt_logprobs
    want = run(tiny, prompt, params)[0].prompt_logprobs
    assert got[0] is None and want[0] is None
    assert [g.logprob for g in got[1:]] == pytest.approx([w.logprob for w in want[1:]], abs=1e-4)


def test_a_request_asking_for_logprobs_changes_no_other_token(tiny: LLM) -> None:
    plain = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [o.token_id for o in run(tiny, tiny.tokenizer.encode("hello"), plain)]
    engine = tiny.new_engine()
    engine.add_request("a", tiny.tokenizer.encode("hello"), plain)
    engine.add_request("b", tiny.tokenizer.encode("ok then"),
                       SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True,
                                      logprobs=5, prompt_logprobs=5))
    got: dict[str, list] = {"a": [], "b": []}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].append(o)
    assert [o.token_id for o in got["a"]] == alone
    assert all(o.logprobs == () and o.prompt_logprobs is None for o in got["a"])
    assert all(len(o.logprobs) == 1 and len(o.logprobs[0].top) == 5 for o in got["b"])
    assert all(o.logprobs[0].logprob <= 0.0 for o in got["b"])


def test_the_stop_token_that_ends_a_request_is_scored(tiny: LLM) -> None:
    """EOS and stop tokens end a request without a token_id (nothing to print), but a scoring
    client (lm-eval: echo + max_tokens 1) needs that last token's log-probability too."""
    prompt = tiny.tokenizer.encode("hello")
    greedy = run(tiny, prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    first = greedy[0].token_id
    outs = run(tiny, prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=0,
                                            stop_token_ids=(first,)))
    assert len(outs) == 1
    last = outs[0]
    assert last.finished and last.finish_reason == "stop" and last.token_id is None
    assert len(last.logprobs) == 1 and last.logprobs[0].token_id == first
    assert last.logprobs[0].top == ()
    ref = reference_logprobs(tiny, prompt)
    assert last.logprobs[0].logprob == pytest.approx(float(ref[-1, first]), abs=1e-4)


def test_logprob_bounds_are_typed_errors() -> None:
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(SamplingParamsError, match=field):
            SamplingParams(**{field: 21})
        with pytest.raises(SamplingParamsError, match=field):
            SamplingParams(**{field: -1})


def test_non_finite_logits_give_json_safe_logprobs() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("nan"), 0.0, 0.0]])
    lps = logprobs_of(logits, [1, 0], [3, 1])
    assert lps[0].logprob == MIN_LOGPROB
    assert all(math.isfinite(v) for lp in lps for v in [lp.logprob, *(x for _, x in lp.top)])
    assert [t for t, _ in lps[0].top][:2] == [2, 0]
