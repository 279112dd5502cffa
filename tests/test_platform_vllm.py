"""``engine.kind: vllm`` for real: SmolLM2 deployed on the platform with a vLLM (CPU build) server
per replica, invoked through the openai client (streaming), scaled to zero and back, each start
profiled from vLLM's own log.

Needs vLLM's venv (`make vllm-env`, which `make test` runs): skips without it, fails under CI=true.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import requires
from test_platform import ROOT, Platform

from faascale.coldstart.vllm_log import parse_vllm_log_file
from faascale.coldstart.vllm_run import process_alive
from faascale.platform.server import free_port

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = [pytest.mark.slow,
              requires(VLLM_PY.exists(), f"vLLM's venv is missing ({VLLM_PY}): run make vllm-env")]
NAME = "smollm2-vllm"
PROMPT = "Name three colours of the rainbow."
MAX_TOKENS = 24
STEPS = ("bootstrap", "model_loading", "kv_cache")  # on a CPU with --enforce-eager (no compile)


def vllm_doc(**scaling: Any) -> dict[str, Any]:
    return {"name": NAME,
            "model": {"source": "bundled://smollm2-135m-instruct", "dtype": "float32",
                      "blocks": 6},
            "engine": {"kind": "vllm", "max_seq_len": 2048, "max_batch_size": 4,
                       "vllm": {"enforce_eager": True, "kv_cache_gib": 1,
                                "start_timeout_s": 600}},
            "scaling": {"min_replicas": 0, "max_replicas": 1, "keep_alive_s": 10,
                        "downscale_delay_s": 1, **scaling},
            "resources": {"num_cpus": 0}}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-vllm"), free_port())
    p.env["FAASCALE_VLLM_PYTHON"] = str(VLLM_PY)
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    yield p
    p.cli("down", timeout=120)


def vllm_processes(model_dir: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and model_dir in cmd:
            out.append(proc)
    return out


def greedy_ours(platform: Platform) -> str:
    """The same chat message answered by our engine in this process, greedy."""
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM
    from faascale.engine.sampling import SamplingParams
    from faascale.engine.sources import resolve_packed

    packed = resolve_packed("bundled://smollm2-135m-instruct", dtype="float32", num_blocks=6,
                            cache_dir=platform.home / "test-models")
    llm = LLM.load(packed, EngineConfig(max_batch_size=1, max_seq_len=2048))
    return llm.generate([[{"role": "user", "content": PROMPT}]],
                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                       ignore_eos=True))[0].text


def startups(platform: Platform) -> list[dict[str, Any]]:
    r = platform.http().get(f"/v1/functions/{NAME}/startups")
    assert r.status_code == 200, r.text
    return r.json()["profiles"]


def span(profile: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in profile["spans"] if s["name"] == name)


def test_vllm_function_streams_scales_to_zero_and_back_with_profiled_starts(
        platform: Platform) -> None:
    import openai

    platform.deploy(vllm_doc())
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.tokens["invoke"],
                           timeout=900, max_retries=0)

    def ask() -> tuple[str, int]:
        stream = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == MAX_TOKENS, usage
        return "".join(pieces), len(pieces)

    # From zero: the request waits for a replica, whose vLLM server starts (profiled).
    text, chunks = ask()
    assert chunks > 1, "not streamed"
    (prof,) = startups(platform)  # reported as the replica became ready
    hf_dir = span(prof, "hf_export")["attrs"]["dir"]
    procs = vllm_processes(hf_dir)  # the replica's server (it lives for the keep-alive)
    assert len(procs) == 1, procs
    # vLLM (fp32, greedy) answers with what our engine makes of the same prompt and weights.
    assert text == greedy_ours(platform)

    # The start's profile: our steps, then vLLM's own, parsed from its log as it ran.
    assert prof["ok"], prof
    names = [s["name"] for s in prof["spans"]]
    for step in ("spec_tokenizer", "weight_fetch", "hf_export", *STEPS, "vllm_other"):
        assert step in names, (step, names)
    assert prof["runtime"]["engine"] == "vllm" and prof["runtime"]["vllm_version"] == "0.32.0"
    # Each vLLM step lasts what its log says (the parser, tested on its own, reads the lines).
    parsed = parse_vllm_log_file(prof["runtime"]["vllm_log"])
    for step in STEPS:
        s = span(prof, step)
        assert s["end_s"] - s["start_s"] == pytest.approx(parsed.steps_s[step], abs=0.01), step

    # Scale to zero: the replica retires, and its whole vLLM process group with it.
    platform.wait_replicas(NAME, lambda r: r["running"] == 0 and r["starting"] == 0, 180)
    deadline = time.monotonic() + 30  # (a zombie is gone: psutil's is_running counts it)
    while ((vllm_processes(hf_dir) or any(process_alive(p.pid) for p in procs))
           and time.monotonic() < deadline):
        time.sleep(0.5)
    assert not vllm_processes(hf_dir), "the vLLM server outlived its replica"
    assert not any(process_alive(p.pid) for p in procs), procs
    # What the replica put in shared memory beside HOST is the export alone (no per-replica
    # copies); its log outlives it, in the state directory (not RAM).
    kept = {p.name for p in Path(hf_dir).parent.iterdir() if not p.name.startswith(".")}
    assert kept <= {Path(hf_dir).name, "views"}, kept  # (and the instance's ownership mark)
    views = Path(hf_dir).parent / "views"
    assert not [p for p in views.glob("*") if prof["replica"] in p.name], list(views.glob("*"))
    log = Path(prof["runtime"]["vllm_log"])
    assert log.is_file() and platform.home in log.parents, log

    # And back: a second start from the node's tiers, its export reused from shared memory.
    again, _ = ask()
    assert again == text  # greedy: the same answer from a fresh vLLM
    newest = max(startups(platform), key=lambda p: p["started_at_s"])
    assert newest["ok"] and newest["started_at_s"] > prof["started_at_s"]
    assert span(newest, "hf_export")["attrs"]["reused"] is True
    assert span(newest, "weight_fetch")["attrs"]["tier"] == {"HOST": 6}
