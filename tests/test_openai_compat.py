"""The OpenAI API fields clients send (issue 19), through the real gateway app served by uvicorn
on loopback and the real `openai` client, to a replica's real request path (`Generation` over a
tiny Llama's engine loop) in this process: Ray Serve's hop is the only thing left out (the
platform tests cover it). Log-probabilities are checked against an independent full forward of
the same model (log-softmax of its logits).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from openai import BadRequestError, OpenAI

from faascale.engine.config import EngineConfig
from faascale.engine.engine import ShardChain
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.model import ForwardBatch
from faascale.engine.sampling import SamplingParams
from faascale.platform.auth import Tokens
from faascale.platform.gateway import create_app
from faascale.platform.gateway_context import GatewayContext
from faascale.platform.generation import Generation
from faascale.platform.registry import Registry
from faascale.platform.server import free_port
from faascale.platform.spec import parse_function_spec

NAME = "tiny"
MAX_SEQ_LEN = 128
TOKENS = Tokens(admin="admin-token", invoke="invoke-token")


@dataclass
class Counts:
    running: int = 1
    starting: int = 0
    stopping: int = 0


class Answer:
    """Serve's response generator as the gateway uses it, over the replica's own generator
    (run on the gateway's event loop: the engine loop is thread-safe)."""

    def __init__(self, agen: Any) -> None:
        self.agen = agen

    async def __anext__(self) -> dict[str, Any]:
        return await self.agen.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self.agen.aclose())


class InProcessReplica:
    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.payloads: list[dict[str, Any]] = []

    def options(self, stream: bool) -> "InProcessReplica":
        return self

    @property
    def generate(self) -> "InProcessReplica":
        return self

    def remote(self, payload: dict[str, Any]) -> Answer:
        self.payloads.append(payload)
        return Answer(self.generation.generate(payload))


class Backend:
    def __init__(self, replica: InProcessReplica) -> None:
        self.replica = replica

    def deploy(self, record: Any) -> None: ...

    def delete(self, name: str) -> None: ...

    def handle(self, name: str) -> InProcessReplica:
        return self.replica

    def counts(self) -> dict[str, Counts]:
        return {NAME: Counts()}


@pytest.fixture(scope="module")
def served(tiny_packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("compat")
    cfg = EngineConfig(max_batch_size=8, max_seq_len=MAX_SEQ_LEN)
    llm = LLM.load(tiny_packed, cfg)
    loop = EngineLoop(llm.new_engine())
    replica = InProcessReplica(Generation(llm, loop, MAX_SEQ_LEN))
    registry = Registry(tmp / "registry.db")
    spec = parse_function_spec({"name": NAME, "model": {"source": "random://tiny-llama"},
                                "engine": {"max_seq_len": MAX_SEQ_LEN},
                                "resources": {"num_cpus": 0}}, tmp)
    registry.put(spec, str(tiny_packed), "tiny-model-id")
    ctx = GatewayContext(registry=registry, backend=Backend(replica), tokens=TOKENS,
                         resolve_model=lambda spec: ("", "", ""), report=lambda intent: None,
                         logs=lambda name, tail: [])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKENS.invoke, max_retries=0)
    yield client, llm, replica, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    loop.stop()


def reference(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full-sequence forward: row i is the distribution of token i + 1."""
    logits = ShardChain(llm.shards, 1).forward(torch.tensor([ids]),
                                               ForwardBatch((0,), (0,), len(ids)), all_logits=True)
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_completions_echo_logprobs_equal_the_models_for_prompt_and_completion(served) -> None:
    client, llm, _, _ = served
    ids = llm.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                    logprobs=2, echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(llm.tokenizer.decode(ids))
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    generated = list(llm.generate([ids], greedy)[0].token_ids)  # the same greedy tokens
    ref = reference(llm, ids + generated)
    want = [float(ref[i - 1, tok]) for i, tok in enumerate(ids + generated) if i > 0]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for got, top in zip(lp.token_logprobs[len(ids):], lp.top_logprobs[len(ids):]):
        # greedy: the chosen token is the most likely (the dict is keyed by token text, so two
        # byte tokens that are each half a character share one key, as in vLLM)
        assert got == pytest.approx(max(top.values()), abs=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6


def test_lm_eval_scoring_request_shape(served) -> None:
    """What lm-eval's local-completions sends to score continuations: token-id prompts in a
    batch, echo, logprobs 1, max_tokens 1; it sums token_logprobs[ctxlen:-1] per choice."""
    client, llm, _, _ = served
    ctx = llm.tokenizer.encode("Paris is in", add_special_tokens=False)
    conts = [llm.tokenizer.encode(c, add_special_tokens=False) for c in (" France", " Spain")]
    out = client.completions.create(model=NAME, prompt=[ctx + c for c in conts], max_tokens=1,
                                    temperature=0, logprobs=1, echo=True, seed=1234)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, cont in zip(out.choices, conts):
        ref = reference(llm, ctx + cont)
        want = sum(float(ref[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
        got = sum(choice.logprobs.token_logprobs[len(ctx):-1])
        assert got == pytest.approx(want, abs=1e-3)
        assert len(choice.logprobs.token_logprobs) == len(ctx) + len(cont) + 1


def test_streamed_logprobs_equal_the_whole_answers(served) -> None:
    client, llm, _, _ = served
    kwargs = dict(model=NAME, prompt="hello", max_tokens=5, temperature=0, logprobs=1,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values = [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
    assert tokens == whole.tokens and values == pytest.approx(whole.token_logprobs)


def test_chat_logprobs_top_logprobs_and_n(served) -> None:
    client, _, _, _ = served
    messages = [{"role": "user", "content": "hi there"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                         temperature=0, n=3, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 1  # greedy
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
    assert out.usage.completion_tokens == 12
    # streamed, three choices interleave; each ends once, with the same text
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for chunk in client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                                temperature=0, n=3, stream=True,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finishes[c.index] = finishes.get(c.index, 0) + bool(c.finish_reason)
    assert texts == {i: out.choices[0].message.content for i in range(3)}
    assert finishes == {0: 1, 1: 1, 2: 1}


def test_seeded_choices_are_reproducible_and_distinct(served) -> None:
    client, _, _, _ = served
    kwargs = dict(model=NAME, prompt="abc", max_tokens=8, temperature=1.0, seed=5, n=4,
                  extra_body={"ignore_eos": True})
    a = [c.text for c in client.completions.create(**kwargs).choices]
    b = [c.text for c in client.completions.create(**kwargs).choices]
    assert a == b and len(set(a)) > 1


def test_batched_prompts_times_n_are_numbered_as_openai_does(served) -> None:
    client, _, _, _ = served
    prompts = ["a", "bb", "ccc"]
    out = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    alone = {p: client.completions.create(model=NAME, prompt=p, max_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
             for p in prompts}
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [alone[p] for p in prompts for _ in range(2)]
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 18


@pytest.mark.parametrize("kwargs, field", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(served, kwargs, field) -> None:
    client, _, replica, _ = served
    before = len(replica.payloads)
    with pytest.raises(BadRequestError, match=field):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=2, **kwargs)
    assert len(replica.payloads) == before  # refused at the gateway: nothing ran


def test_plain_text_response_format_is_served(served) -> None:
    client, _, _, _ = served
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=2, response_format={"type": "text"})
    assert out.choices[0].finish_reason in ("length", "stop")


def test_max_tokens_beyond_the_context_names_both_numbers(served) -> None:
    client, _, _, _ = served
    with pytest.raises(BadRequestError, match=rf"maximum context length is {MAX_SEQ_LEN} tokens"
                       r".*asks for 1003 \(3 in the prompt, 1000 in the completion\)"):
        client.completions.create(model=NAME, prompt="abc", max_tokens=1000)


def test_tokenize_detokenize_and_tokenizer_info_like_vllm(served) -> None:
    _, llm, _, url = served
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKENS.invoke}"}) as h:
        r = h.post("/tokenize", json={"model": NAME, "prompt": "héllo", "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == llm.tokenizer.encode("héllo")
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_SEQ_LEN
        assert len(body["token_strs"]) == body["count"]
        # no model: the only deployed function (what lm-eval's remote tokenizer sends)
        assert h.post("/tokenize", json={"prompt": "héllo"}).json()["tokens"] == body["tokens"]
        chat = h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert chat["tokens"] == llm.tokenizer.encode(text, add_special_tokens=False)
        back = h.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
        assert back.endswith("héllo")
        info = h.get("/tokenizer_info").json()
        assert info["eos_token"] == llm.tokenizer.info.eos_token
        assert info["model_max_length"] == MAX_SEQ_LEN
        assert h.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert h.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert h.post("/tokenize", json={}).status_code == 400
        assert h.get("/tokenizer_info").status_code == 200
        no_auth = httpx.post(f"{url}/tokenize", json={"prompt": "x"})
        assert no_auth.status_code == 401


def test_model_cards_carry_the_context_and_the_source(served) -> None:
    client, _, _, _ = served
    card = client.models.list().data[0].model_dump()
    assert card["id"] == NAME and card["max_model_len"] == MAX_SEQ_LEN
    assert card["root"] == "random://tiny-llama"


def test_metrics_under_vllms_names(served) -> None:
    """KEDA, inference-perf and Dynamo's planner read vLLM's series: the gateway exports them."""
    client, _, _, url = served

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        out = {}
        for line in text.splitlines():
            if line.startswith("vllm:") and f'model_name="{NAME}"' in line:
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    before = scrape()
    client.completions.create(model=NAME, prompt="abcd", n=2, max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = scrape()

    def grew(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert grew(f'vllm:prompt_tokens_total{{model_name="{NAME}"}}') == 8  # 4 per choice
    assert grew(f'vllm:generation_tokens_total{{model_name="{NAME}"}}') == 10
    assert grew(f'vllm:request_success_total{{finished_reason="length",model_name="{NAME}"}}') == 2
    assert grew(f'vllm:time_to_first_token_seconds_count{{model_name="{NAME}"}}') == 1
    assert grew(f'vllm:e2e_request_latency_seconds_count{{model_name="{NAME}"}}') == 1
    assert after[f'vllm:num_requests_running{{model_name="{NAME}"}}'] == 0
    assert after[f'vllm:num_requests_waiting{{model_name="{NAME}"}}'] == 0
