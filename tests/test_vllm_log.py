"""vLLM startup-log parser: the shared real logs (read in place, never copied) and synthetic text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faascale.coldstart.vllm_log import (
    STEPS,
    VllmLogError,
    parse_vllm_log,
    parse_vllm_log_file,
)
from support import requires

SHARED = Path(__file__).resolve().parents[2] / "shared"
LOGS = sorted((SHARED / "coldstart-logs").glob("*.log")) + sorted(
    (SHARED / "coldstart-data" / "logs").glob("*/*.txt"))
needs_logs = requires(bool(LOGS), f"the shared data is absent: no vLLM logs in {SHARED}/coldstart-logs "
                                  f"or {SHARED}/coldstart-data/logs")


def _stated(text: str, pattern: str) -> float | None:
    """The first number a line states, found with an independent, simple regex."""
    m = re.search(pattern, text.replace("**", ""))
    return float(m.group(1)) if m else None


@needs_logs  # without logs, one placeholder case (an empty parametrize would skip on its own)
@pytest.mark.parametrize("path", LOGS or [pytest.param(None, id="no-logs")], ids=lambda p: p.name)
def test_shared_log_values_match_its_own_lines(path: Path) -> None:
    text = path.read_text()
    r = parse_vllm_log_file(path)
    assert set(r.steps_s) <= set(STEPS)
    assert r.steps_s, "every shared log yields some step"
    expect_details = {
        "weights": r"Loading weights took ([\d.]+)",
        "dynamo_transform": r"transform time: ([\d.]+)",
        "torch_compile_total": r"torch\.compile takes ([\d.]+)",
        "kv_cache_profile": r"Memory profiling takes ([\d.]+)",
        "graph_capture": r"capturing finished in ([\d.]+)",
        "init_engine": r"warmup model\) took ([\d.]+)",
        "model_init": r"Initializing Model took ([\d.]+)",
    }
    for key, pattern in expect_details.items():
        assert r.details_s.get(key) == _stated(text, pattern), key
    assert r.steps_s.get("tokenizer") == _stated(text, r"Init Tokenizer took ([\d.]+)")
    loading = _stated(text, r"GiB and ([\d.]+) seconds")
    if loading is not None:
        assert r.steps_s["model_loading"] == loading
    assert r.steps_s.get("cuda_graphs") == _stated(text, r"capturing finished in ([\d.]+)")
    load = _stated(text, r"from the cache, took ([\d.]+)")
    if load is not None:
        assert r.details_s["graph_load"] == load
    compile_s = sum(float(x) for x in re.findall(r"Compiling a graph for .*? takes ([\d.]+)", text))
    if compile_s:
        assert r.details_s["graph_compile"] == pytest.approx(compile_s)
    total = _stated(text, r"torch\.compile takes ([\d.]+)")
    if total is not None:
        assert r.steps_s["torch_compile"] == pytest.approx(total + r.details_s.get("graph_load", 0.0))
    profile = _stated(text, r"Memory profiling takes ([\d.]+)")
    if profile is not None:
        assert r.steps_s["kv_cache"] == pytest.approx(max(0.0, profile - r.steps_s["torch_compile"]))
    stated_version = re.search(r"LLM engine \(v([\d.]+)\)", text)
    assert r.version == (stated_version.group(1) if stated_version else None)
    if r.total_s is not None:
        assert r.total_s > 0
        assert sum(r.steps_s.values()) <= r.total_s + 0.5
    assert all(v >= 0 for v in (*r.steps_s.values(), *r.details_s.values()))


@needs_logs
def test_full_paper_logs_give_all_six_steps_and_a_total() -> None:
    full = [p for p in LOGS if "No plugins for group" in p.read_text()
            or "Automatically detected platform" in p.read_text()]
    assert full
    for p in full:
        r = parse_vllm_log_file(p)
        assert tuple(r.steps_s) == STEPS, p.name
        assert r.total_s is not None and r.details_s["engine_ready"] == r.total_s


def _line(ts: str, msg: str, level: str = "INFO") -> str:
    return f"{level} 05-01 {ts} [somefile.py:1] {msg}"


def test_unknown_version_gives_partial_result_with_warning() -> None:
    text = "\n".join([
        _line("10:00:00", "Initializing an LLM engine (v0.4.2) with config: model='m'"),
        _line("10:00:03", "Loading weights took 2.50 seconds"),
    ])
    r = parse_vllm_log(text)
    assert r.version == "0.4.2"
    assert r.details_s["weights"] == 2.5
    assert any("0.4.2" in w and "outside" in w for w in r.warnings)
    assert any("steps not found" in w for w in r.warnings)


def test_timestamp_gaps_fill_in_where_no_line_states_a_time() -> None:
    text = "\n".join([
        _line("10:00:00.000", "Automatically detected platform cuda."),
        _line("10:00:04.000", "Starting to load model my/model..."),
        _line("10:00:09.500", "Loading weights took 5.00 seconds"),
        _line("10:00:12.000", "Dynamo bytecode transform time: 2.00 s"),
        _line("10:00:12.000", "Directly load the compiled graph for shape None from the cache"),
        _line("10:00:15.000", "torch.compile takes 2.00 s in total"),
        _line("10:00:16.000", "GPU KV cache size: 1,000 tokens"),
        _line("10:00:16.500", "Capturing a cudagraph on (PIECEWISE, 256)", "DEBUG"),
        _line("10:00:19.500", "init engine (profile, create kv cache, warmup model) took 9.00 seconds"),
        _line("10:00:21.000", "Application startup complete."),
    ])
    r = parse_vllm_log(text)
    assert r.steps_s["bootstrap"] == pytest.approx(4.0)
    assert r.steps_s["model_loading"] == pytest.approx(5.5)
    assert r.details_s["graph_load"] == pytest.approx(3.0)
    assert r.steps_s["torch_compile"] == pytest.approx(5.0)
    assert r.steps_s["kv_cache"] == pytest.approx(1.0)
    assert r.steps_s["cuda_graphs"] == pytest.approx(3.0)
    assert r.details_s["init_engine"] == 9.0
    assert r.total_s == pytest.approx(21.0) == r.details_s["api_ready"]
    assert sum(r.steps_s.values()) <= r.total_s
    assert sum("timestamp gap" in w for w in r.warnings) == 4


@pytest.mark.parametrize("text", ["", "   \n", "hello world\nthis is not a log\n", "{\"a\": 1}"])
def test_garbage_raises_typed_error(text: str) -> None:
    with pytest.raises(VllmLogError):
        parse_vllm_log(text)


def test_file_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(VllmLogError, match="cannot read"):
        parse_vllm_log_file(tmp_path / "missing.log")
    junk = tmp_path / "junk.log"
    junk.write_text("nothing to see\n")
    with pytest.raises(VllmLogError, match="junk.log"):
        parse_vllm_log_file(junk)


@needs_logs
def test_cli_prints_the_steps_and_rejects_a_non_log(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "faascale.cli", "coldstart", "parse-vllm",
                               *args], capture_output=True, text=True, timeout=60)

    path = next(p for p in LOGS if len(parse_vllm_log_file(p).steps_s) == len(STEPS))
    expected = parse_vllm_log_file(path)
    out = cli(str(path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps_s"] == pytest.approx(expected.steps_s)
    table = cli(str(path))
    assert table.returncode == 0 and "model_loading" in table.stdout
    assert f"{expected.steps_s['cuda_graphs']:.2f}" in table.stdout
    junk = tmp_path / "notes.txt"
    junk.write_text("shopping list: eggs, milk\n")
    bad = cli(str(junk))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    missing = cli(str(tmp_path / "absent.log"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
