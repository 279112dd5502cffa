"""The OpenAI-compatible clients people already use, unchanged, against a real platform (`faascale
up`, the bundled tiny-llama): guidellm, lm-eval (`local-completions` scoring a multiple-choice task
by log-likelihood, `local-chat-completions` generating) and litellm, each given only the base URL
and the invoke token.

They run from their own venv, ``.venv-clients`` (`make test` builds it: guidellm pins a click older
than ours, and they pull datasets, pandas... that faascale does not need), as subprocesses, with
nothing downloaded: tasks and data are written here, the tokenizer guidellm needs is the function's
own (its packed ``tokenizer.json``), lm-eval reads it from the gateway (``tokenizer_backend=remote``:
``/tokenizer_info``, ``/tokenize``, ``/detokenize``). Each test checks what the client reported
against an independent answer: the engine's own log-probabilities, or the gateway's answer to the
same request sent directly.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import requires
from test_platform import Platform, free_port

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / ".venv-clients" / "bin"
FUNCTION = "tiny-llama"
CLIENT_TIMEOUT_S = 300  # each client's run is 10-40 s here; most of it is importing torch

pytestmark = [
    pytest.mark.slow,
    requires(all((CLIENTS / exe).exists() for exe in ("python", "guidellm", "lm_eval")),
             "the clients' venv .venv-clients (guidellm, lm-eval, litellm) is missing: run "
             "`make test`, which builds it"),
]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-clients"), free_port())
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        r = p.cli("deploy", "functions/tiny-llama")
        assert r.returncode == 0, r.stdout + r.stderr
        yield p
    finally:
        p.cli("down", timeout=120)


@pytest.fixture(scope="module")
def same_model(platform: Platform, tiny_packed: Path) -> Path:
    """``tiny_packed`` (the conftest's pack: seed 0, 4 blocks), checked to be the very model the
    platform serves: the references below are computed from it."""
    manifest = json.loads((tiny_packed / "manifest.json").read_text())
    assert manifest["model_id"] == platform.status(FUNCTION)["model_id"]
    return tiny_packed


@pytest.fixture(scope="module")
def engine_llm(same_model: Path) -> Any:
    """The served model loaded whole by the engine, with its tokenizer."""
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM

    return LLM.load(same_model, EngineConfig(max_batch_size=1, max_seq_len=128))


def client_env(platform: Platform, home: Path) -> dict[str, str]:
    """The clients' environment: the token, no network (Hugging Face offline, litellm's local
    model-cost map), their caches in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(OPENAI_API_KEY=platform.tokens["invoke"], HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home / "hf"),
               LITELLM_LOCAL_MODEL_COST_MAP="True", TOKENIZERS_PARALLELISM="false",
               NO_COLOR="1", COLUMNS="200")
    return env


def run_client(platform: Platform, cwd: Path, *argv: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(CLIENTS / argv[0]), *argv[1:]], cwd=cwd,
                       env=client_env(platform, cwd) | (env or {}), capture_output=True, text=True,
                       timeout=CLIENT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (f"{argv[0]} exited {r.returncode}\n--- stdout (tail)\n"
                               f"{r.stdout[-4000:]}\n--- stderr (tail)\n{r.stderr[-6000:]}")
    return r


def gateway_chats(platform: Platform) -> float:
    """``faascale_requests_total`` for the function's chat route, answered 200."""
    with platform.http() as h:
        metrics = h.get("/metrics").text
    m = re.search(rf'faascale_requests_total{{code="200",endpoint="chat",function="{FUNCTION}"}} '
                  r"(\S+)", metrics)
    return float(m.group(1)) if m else 0.0


# --- guidellm --------------------------------------------------------------------------------

def hf_tokenizer_dir(packed: Path, out: Path) -> Path:
    """A Hugging Face tokenizer folder (what ``AutoTokenizer.from_pretrained`` reads) made of the
    function's packed ``tokenizer.json`` and its manifest's special tokens and chat template."""
    out.mkdir()
    tok = json.loads((packed / "manifest.json").read_text())["tokenizer"]
    (out / "tokenizer.json").write_bytes((packed / tok["file"]).read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok["bos_token"],
        "eos_token": tok["eos_token"], "add_bos_token": tok["add_bos_token"],
        "chat_template": tok["chat_template"], "model_max_length": 512}))
    return out


def test_guidellm_benchmarks_streaming_chat_with_no_errors(
        platform: Platform, same_model: Path, engine_llm: Any, tmp_path: Path) -> None:
    requests, prompt_tokens, output_tokens = 4, 16, 8
    tokenizer = hf_tokenizer_dir(same_model, tmp_path / "tokenizer")
    report_path = tmp_path / "benchmarks.json"
    chats_before = gateway_chats(platform)
    run_client(platform, tmp_path, "guidellm", "run",
               "--backend", f"kind=openai_http,target={platform.url},model={FUNCTION},"
                            f"api_key={platform.tokens['invoke']}",
               "--profile", "kind=synchronous",
               "--constraint", f"kind=max_requests,count={requests}",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                         f"output_tokens={output_tokens}",
               "--output", f"kind=json,path={report_path}",
               "--disable-console-interactive",
               # guidellm's main process stops reading its workers' updates when one poll of this
               # many seconds (default 0.1) finds none and its constraint has already shut the
               # group down: under load the last request's update can still be in transit, and
               # the report then counts 3 of 4 (seen once in a full suite). A second is ample.
               env={"GUIDELLM__MP_POLL_INTERVAL": "1.0"})
    # the gateway's own count: every request guidellm made was answered 200, none twice
    assert gateway_chats(platform) - chats_before == requests
    (bench,) = json.loads(report_path.read_text())["benchmarks"]
    assert bench["metrics"]["request_totals"] == {"successful": requests, "errored": 0,
                                                  "incomplete": 0, "total": requests}
    done = bench["requests"]["successful"]
    assert len(done) == requests and not bench["requests"]["errored"]

    tok = engine_llm.tokenizer
    with platform.http() as h:
        for req in done:
            body = json.loads(req["request_args"])["body"]
            assert body["model"] == FUNCTION and body["stream"] is True
            assert body["max_completion_tokens"] == output_tokens
            (message,) = body["messages"]
            parts = message["content"]
            text = parts if isinstance(parts, str) else "".join(p["text"] for p in parts)
            # the prompt has the configured size in the function's tokenizer ...
            assert len(tok.encode(text, add_special_tokens=False)) == prompt_tokens
            # ... and guidellm counted what the gateway reported: the chat prompt as /tokenize
            # counts it, and every requested token (it sends ignore_eos)
            counted = h.post("/tokenize", json={"model": FUNCTION, "messages": [message]})
            assert counted.status_code == 200, counted.text
            assert req["input_metrics"]["text_tokens"] == counted.json()["count"]
            assert req["output_metrics"]["text_tokens"] == output_tokens
            assert req["output"] and req["info"]["error"] is None


# --- lm-eval -----------------------------------------------------------------------------------

MC_DOCS = [  # answers are the first choice; acc is whatever the random model makes of them
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "Cats like to", "choices": ["sleep", "fly", "swim", "sing"], "answer": 0},
    # after "The a" the model's greedy next token is EOS: the one token lm-eval has generated
    # (and drops as the last) is the stop token, which must still be there
    {"question": "The", "choices": ["a", "sky"], "answer": 0},
]
GEN_DOCS = [{"prompt": "Say hello", "target": "hello"},
            {"prompt": "Count to three", "target": "1 2 3"}]
GEN_KWARGS = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0}
LM_EVAL_SEED = 1234  # the seed lm-eval's API models send


def write_task(dir_: Path, name: str, docs: list[dict[str, Any]], **config: Any) -> None:
    """A task lm-eval reads with ``--include_path``: its docs a local JSON file (the ``json``
    builder of datasets, offline)."""
    (dir_ / f"{name}.json").write_text(json.dumps(docs))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(dir_ / f"{name}.json")}},
            "test_split": "test", **config}
    (dir_ / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML


def lm_eval(platform: Platform, tmp: Path, task: str, model: str, model_args: str,
            *extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``task`` once; returns its results and its logged samples, by doc_id."""
    out = tmp / "out"
    run_client(platform, tmp, "lm_eval", "--model", model, "--model_args", model_args,
               "--tasks", task, "--include_path", str(tmp / "tasks"), "--output_path", str(out),
               "--log_samples", *extra)
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    (samples,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    lines = [json.loads(ln) for ln in Path(samples).read_text().splitlines() if ln.strip()]
    return json.loads(Path(results).read_text())["results"][task], sorted(
        lines, key=lambda s: s["doc_id"])


def reference_scores(llm: Any, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each continuation given its context, from one full forward of
    the engine's model (log_softmax of its logits), tokenised as lm-eval does: trailing spaces of
    the context move to the continuation, the whole string is encoded and the context's tokens
    split off."""
    import torch
    from test_logprobs import reference_logprobs

    out = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
        n_ctx = len(llm.tokenizer.encode(context, add_special_tokens=False))
        rows = reference_logprobs(llm, whole)[n_ctx - 1:len(whole) - 1]
        cont = torch.tensor(whole[n_ctx:])
        out.append((float(rows.gather(1, cont[:, None]).sum()),
                    bool((rows.argmax(dim=-1) == cont).all())))
    return out


def test_lm_eval_local_completions_scores_equal_the_engines_log_likelihoods(
        platform: Platform, engine_llm: Any, tmp_path: Path) -> None:
    """Log-likelihood scoring sends ``echo: true, logprobs: 1, max_tokens: 1`` with the prompts
    as token ids (batches of 4 here), tokenised by the gateway's /tokenize."""
    from test_logprobs import reference_logprobs

    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", "faascale_mc", MC_DOCS, output_type="multiple_choice",
               doc_to_text="{{question}}", doc_to_choice="{{choices}}",
               doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    token = platform.tokens["invoke"]
    results, samples = lm_eval(
        platform, tmp_path, "faascale_mc", "local-completions",
        f"model={FUNCTION},base_url={platform.url}/v1/completions,tokenizer_backend=remote,"
        f"auth_token={token},max_length=512", "--batch_size", "4")
    assert [s["doc_id"] for s in samples] == list(range(len(MC_DOCS)))
    accs = []
    for s, doc in zip(samples, MC_DOCS, strict=True):
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        assert pairs == [(doc["question"], " " + c) for c in doc["choices"]]
        got = [(float(ll), greedy == "True") for ((ll, greedy),) in s["resps"]]
        want = reference_scores(engine_llm, pairs)
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-3), s
        assert [g for _, g in got] == [g for _, g in want]
        best = max(range(len(want)), key=lambda i: want[i][0])
        accs.append(float(best == doc["answer"]))
        assert s["acc"] == accs[-1]
    assert results["acc,none"] == pytest.approx(sum(accs) / len(accs))
    ends = reference_logprobs(engine_llm, engine_llm.tokenizer.encode("The a"))[-1].argmax()
    assert int(ends) in engine_llm.manifest.config.eos_token_ids  # the last doc's case holds


def test_lm_eval_local_chat_completions_generates_what_the_gateway_answers(
        platform: Platform, tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", "faascale_gen", GEN_DOCS, output_type="generate_until",
               doc_to_text="{{prompt}}", doc_to_target="{{target}}",
               generation_kwargs=GEN_KWARGS, metric_list=[{"metric": "exact_match"}])
    results, samples = lm_eval(
        platform, tmp_path, "faascale_gen", "local-chat-completions",
        f"model={FUNCTION},base_url={platform.url}/v1/chat/completions",
        "--apply_chat_template")
    assert "exact_match,none" in results
    assert [s["doc_id"] for s in samples] == list(range(len(GEN_DOCS)))
    with platform.http() as h:
        for s, doc in zip(samples, GEN_DOCS, strict=True):
            ((chat, kwargs),) = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
            messages = json.loads(chat[0] if isinstance(chat, list) else chat)
            assert messages == [{"role": "user", "content": doc["prompt"]}]
            # the request lm-eval's local-chat-completions sends (greedy, so deterministic)
            r = h.post("/v1/chat/completions", json={
                "model": FUNCTION, "messages": messages, "max_tokens": kwargs["max_gen_toks"],
                "temperature": kwargs["temperature"], "stop": kwargs["until"],
                "seed": LM_EVAL_SEED})
            assert r.status_code == 200, r.text
            assert s["resps"] == [[r.json()["choices"][0]["message"]["content"]]]
    assert any(s["resps"][0][0] for s in samples), "every generation was empty"


# --- litellm -----------------------------------------------------------------------------------

LITELLM_SCRIPT = """
import json, sys
import litellm
a = json.loads(sys.argv[1])
kw = dict(model="openai/" + a["model"], api_base=a["url"] + "/v1", api_key=a["token"],
          messages=a["messages"], max_tokens=a["max_tokens"], temperature=0)
full = litellm.completion(**kw)
parts = [c.choices[0].delta.content or "" for c in litellm.completion(**kw, stream=True)
         if c.choices]
print(json.dumps({"text": full.choices[0].message.content,
                  "finish_reason": full.choices[0].finish_reason,
                  "usage": {k: getattr(full.usage, k) for k in
                            ("prompt_tokens", "completion_tokens", "total_tokens")},
                  "stream": parts}))
"""


def test_litellm_plain_and_streaming_give_the_openai_clients_text(
        platform: Platform, tmp_path: Path) -> None:
    from openai import OpenAI

    messages, max_tokens = [{"role": "user", "content": "hello there"}], 12
    (tmp_path / "litellm_check.py").write_text(LITELLM_SCRIPT)
    r = run_client(platform, tmp_path, "python", str(tmp_path / "litellm_check.py"), json.dumps(
        {"model": FUNCTION, "url": platform.url, "token": platform.tokens["invoke"],
         "messages": messages, "max_tokens": max_tokens}))
    got = json.loads(r.stdout.strip().splitlines()[-1])

    client = OpenAI(base_url=platform.url + "/v1", api_key=platform.tokens["invoke"])
    want = client.chat.completions.create(model=FUNCTION, messages=messages,
                                          max_tokens=max_tokens, temperature=0)
    assert want.choices[0].message.content
    assert got["text"] == want.choices[0].message.content
    assert got["finish_reason"] == want.choices[0].finish_reason
    assert got["usage"] == {"prompt_tokens": want.usage.prompt_tokens,
                            "completion_tokens": want.usage.completion_tokens,
                            "total_tokens": want.usage.total_tokens}
    assert len(got["stream"]) > 1, got["stream"]  # chunks (the gateway may coalesce tokens)
    assert "".join(got["stream"]) == want.choices[0].message.content
