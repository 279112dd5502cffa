"""The pure parts of ``engine.kind: vllm``: our sampling parameters as vLLM's completions body,
vLLM's stream chunks (the fields of its ``CompletionStreamResponse`` with ``return_token_ids`` and
``return_tokens_as_token_ids``) as our outputs, the server's command line, the spec's checks.
The whole path runs for real in test_platform_vllm.py."""

from __future__ import annotations

import os

import pytest

from faascale.coldstart.vllm_run import VllmServerConfig, server_command, server_env
from faascale.engine.engine import PromptTooLongError
from faascale.engine.sampling import SamplingParams, SamplingParamsError
from faascale.platform.spec import SpecError, parse_function_spec
from faascale.platform.vllm_client import INT64_MAX, VllmClient, outputs_of, request_body
from faascale.platform.server import export_vllm_python
from faascale.platform.vllm_replica import threads_bind


def test_request_body_carries_every_sampling_field_and_cuts_max_tokens_to_the_context() -> None:
    params = SamplingParams(max_tokens=100, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                            stop=("\n\n",), stop_token_ids=(2,), ignore_eos=True, logprobs=2)
    body = request_body("f", [1, 2, 3], params, max_model_len=50)
    assert body["prompt"] == [1, 2, 3] and body["model"] == "f" and body["stream"] is True
    assert body["max_tokens"] == 47  # 50 - 3: what the context holds, as our engine stops there
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.7, 0.9, 5, 3)
    assert body["stop"] == ["\n\n"] and body["stop_token_ids"] == [2]
    assert body["ignore_eos"] is True and body["logprobs"] == 2
    assert body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    plain = request_body("f", [1], SamplingParams(max_tokens=4), max_model_len=50)
    assert plain["top_k"] == -1 and "seed" not in plain and "logprobs" not in plain


@pytest.mark.parametrize(("ids", "params", "error", "field"), [
    ([1] * 50, SamplingParams(), PromptTooLongError, "prompt:"),
    ([1], SamplingParams(seed=INT64_MAX + 1), SamplingParamsError, "seed:"),
    ([1], SamplingParams(prompt_logprobs=1), SamplingParamsError, "prompt_logprobs:"),
])
def test_request_body_rejects_what_vllm_cannot_run_naming_the_field(
        ids: list[int], params: SamplingParams, error: type, field: str) -> None:
    with pytest.raises(error, match=field):
        request_body("f", ids, params, max_model_len=50)


def test_client_checks_the_prompt_ids_before_sending() -> None:
    client = VllmClient("http://127.0.0.1:9", "f", 64, vocab_size=100)
    with pytest.raises(ValueError, match=r"prompt: token ids must be in \[0, 100\)"):
        client.asubmit([5, 100], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        client.asubmit([], SamplingParams())
    stream = client.asubmit([5, 6], SamplingParams(max_tokens=3))
    assert stream.request_id.startswith("vllm-")


def chunk(text: str, ids: list[int], reason: str | None = None,
          logprobs: dict | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": "f",
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": reason, "stop_reason": None, "token_ids": ids}]}


def test_stream_chunks_become_one_output_per_token_with_the_text_on_the_last() -> None:
    one = outputs_of(chunk(" Red", [3123]), "r", num_prompt_tokens=7, num_output_tokens=0,
                     logprobs_k=None)
    assert [(o.token_id, o.text, o.finished, o.num_output_tokens) for o in one] == [
        (3123, " Red", False, 1)]
    assert one[0].num_prompt_tokens == 7
    two = outputs_of(chunk(" and blue", [284, 4011], "length"), "r", 7, 1, None)
    assert [(o.token_id, o.text, o.finished, o.finish_reason, o.num_output_tokens)
            for o in two] == [(284, "", False, None, 2), (4011, " and blue", True, "length", 3)]
    # the end alone (text held back for a stop string, flushed with the reason)
    end = outputs_of(chunk("!", [], "stop"), "r", 7, 3, None)
    assert [(o.token_id, o.text, o.finished, o.finish_reason) for o in end] == [
        (None, "!", True, "stop")]
    assert outputs_of(chunk("", []), "r", 7, 3, None) == []


def test_log_probabilities_by_token_id_most_likely_first_and_cut_to_k() -> None:
    lp = {"tokens": ["token_id:5", "token_id:9"], "token_logprobs": [-0.5, -1.25],
          "top_logprobs": [{"token_id:5": -0.5, "token_id:8": -0.25, "token_id:1": -3.0},
                           {"token_id:9": -1.25, "token_id:2": -0.75}],
          "text_offset": [0, 1]}
    outs = outputs_of(chunk("ab", [5, 9], None, lp), "r", 2, 0, logprobs_k=2)
    assert [o.logprobs[0].token_id for o in outs] == [5, 9]
    assert outs[0].logprobs[0].logprob == -0.5
    assert outs[0].logprobs[0].top == ((8, -0.25), (5, -0.5))
    assert outs[1].logprobs[0].top == ((2, -0.75), (9, -1.25))


def test_a_replicas_server_is_vllms_openai_server_with_the_functions_settings(tmp_path) -> None:
    cfg = VllmServerConfig(model_dir="/m", python="/v/bin/python", max_model_len=2048,
                           enforce_eager=True, kv_cache_gib=2, threads_bind="0,1",
                           served_name="f", max_num_seqs=4, gpu_memory_utilization=0.8,
                           cache_root="/c")
    argv = server_command(cfg, 8123)
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(argv[3::2], argv[4::2]))
    assert pairs["--model"] == "/m" and pairs["--served-model-name"] == "f"
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123"
    assert pairs["--max-num-seqs"] == "4" and pairs["--gpu-memory-utilization"] == "0.8"
    assert "--enforce-eager" in argv
    env = server_env(cfg, {"PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert env["VLLM_CACHE_ROOT"] == "/c" and env["PATH"] == "/bin"
    assert threads_bind(None) is None
    assert threads_bind(1) == str(min(os.sched_getaffinity(0)))


def test_the_platform_exports_the_vllm_interpreter_it_finds_for_its_workers(tmp_path,
                                                                             monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env: dict[str, str] = {}
    assert export_vllm_python(env) is None and env == {}  # replicas will say: make vllm-env
    py = tmp_path / ".venv-vllm" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    assert export_vllm_python(env) == str(py) == env["FAASCALE_VLLM_PYTHON"]


def test_spec_engine_kind_vllm_fills_its_settings_and_names_bad_fields() -> None:
    base = {"name": "f", "model": {"source": "bundled://smollm2-135m-instruct"}}
    spec = parse_function_spec({**base, "engine": {"kind": "vllm"}})
    assert spec.engine.vllm is not None and spec.engine.vllm.enforce_eager is False
    assert parse_function_spec(base).engine.kind == "faascale"
    cases = [
        ({"engine": {"vllm": {"enforce_eager": True}}}, "engine.vllm"),
        ({"engine": {"kind": "vllm"}, "scaling": {"load_from": "store", "pipecast": False}},
         "scaling.load_from"),
        ({"engine": {"kind": "tgi"}}, "engine.kind"),
        ({"engine": {"kind": "vllm", "vllm": {"kv_cache_gib": 0}}}, "engine.vllm.kv_cache_gib"),
        ({"engine": {"kind": "vllm", "vllm": {"kv_cache_gib": 0.5}}}, "engine.vllm.kv_cache_gib"),
        ({"engine": {"kind": "vllm", "vllm": {"swap": 1}}}, "engine.vllm.swap"),
    ]
    for extra, field in cases:
        with pytest.raises(SpecError) as err:
            parse_function_spec({**base, **extra})
        assert field in [f for f, _ in err.value.fields], (extra, err.value.fields)


class _Refusing:
    """An engine whose every choice vLLM refuses (a 4xx) before any token, or fails later."""

    def __init__(self, tokens_first: int) -> None:
        self.tokens_first = tokens_first

    def asubmit(self, ids, params):  # noqa: ANN001, ANN201 - the EngineLoop.asubmit shape
        from faascale.engine.engine import StepOutput
        from faascale.platform.vllm_client import VllmRejected

        outer = self

        class Stream:
            async def batches(self):  # noqa: ANN202
                for i in range(outer.tokens_first):
                    yield [StepOutput("r", 7, "x", False, None, len(ids), i + 1)]
                raise VllmRejected(400, "This model's maximum context length is 8 tokens")

            def abort(self) -> None:
                pass
        return Stream()


def test_vllm_refusing_a_choice_before_any_token_is_a_typed_400_and_later_an_error(
        tiny_packed) -> None:
    import asyncio

    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM
    from faascale.platform.generation import Generation
    from faascale.platform.vllm_client import VllmRejected

    llm = LLM.load(tiny_packed, EngineConfig(max_batch_size=2, max_seq_len=64))

    def run(engine: _Refusing, n: int) -> list[dict]:
        gen = Generation(llm, engine, 64)  # type: ignore[arg-type]

        async def go() -> list[dict]:
            return [c async for c in gen.generate({"prompt": "hi", "n": n,
                                                   "params": {"max_tokens": 4}})]
        return asyncio.run(go())

    for n in (1, 3):  # one choice, and several merged
        (item,) = run(_Refusing(tokens_first=0), n)
        assert item["error"]["status"] == 400 and "maximum context length" in item["error"]["message"]
    with pytest.raises(VllmRejected):  # after tokens went out, it cannot become a 400
        run(_Refusing(tokens_first=1), 1)
