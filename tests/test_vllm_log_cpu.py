"""The vLLM log parser on our own real vLLM 0.32 CPU logs (tests/data/vllm_logs): every value is
checked against the numbers the log's own lines state, read here with independent simple regexes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faascale.coldstart.vllm_log import STEPS, parse_vllm_log, parse_vllm_log_file

LOGS = Path(__file__).parent / "data" / "vllm_logs"
API_LOGS = sorted(LOGS.glob("cpu-0.32-api-*.log"))
OFFLINE_LOG = LOGS / "cpu-0.32-offline-llm-compiled-aot-miss.log"
ALL_LOGS = [*API_LOGS, OFFLINE_LOG]


def _stated(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def _clock_s(line: str) -> int:
    """Seconds of the day of a ``LEVEL MM-DD HH:MM:SS [file.py:N]`` line (0.32: whole seconds)."""
    m = re.search(r"(?:INFO|WARNING|DEBUG|ERROR) \d\d-\d\d (\d\d):(\d\d):(\d\d) \[", line)
    assert m, line
    h, mi, s = (int(x) for x in m.groups())
    return 3600 * h + 60 * mi + s


def _line(text: str, needle: str) -> str:
    return next(ln for ln in text.splitlines() if needle in ln and re.search(r"\d\d:\d\d:\d\d \[", ln))


def _first_timed(text: str) -> str:
    return next(ln for ln in text.splitlines()
                if re.search(r"(?:INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[", ln))


def test_the_real_logs_are_here_and_small() -> None:
    assert len(API_LOGS) == 3 and OFFLINE_LOG.is_file()
    for p in ALL_LOGS:
        assert 5_000 < p.stat().st_size < 200_000, p.name


@pytest.mark.parametrize("path", ALL_LOGS, ids=lambda p: p.name)
def test_cpu_log_steps_match_the_logs_own_lines(path: Path) -> None:
    text = path.read_text()
    r = parse_vllm_log_file(path)
    eager = "'enforce_eager': True" in text
    assert r.version == re.search(r"LLM engine \(v([\d.]+)\)", text).group(1) == "0.32.0"
    assert r.platform == "cpu"
    expected_steps = ("bootstrap", "model_loading", "kv_cache") if eager else (
        "bootstrap", "model_loading", "torch_compile", "kv_cache")
    assert tuple(r.steps_s) == expected_steps
    # bootstrap: the first timestamped line to "Starting to load model"
    t0 = _clock_s(_first_timed(text))
    assert r.steps_s["bootstrap"] == _clock_s(_line(text, "Starting to load model")) - t0
    # model loading: the stated model init plus the stated weight load (no "Model loading took")
    init_s = _stated(text, r"Initializing model took ([\d.]+) seconds")
    weights_s = _stated(text, r"Loading weights took ([\d.]+) seconds")
    assert init_s is not None and weights_s is not None
    assert r.steps_s["model_loading"] == pytest.approx(init_s + weights_s)
    assert r.details_s["model_init"] == init_s and r.details_s["weights"] == weights_s
    engine_s = _stated(text, r"warmup model\) took ([\d.]+) s")
    assert r.details_s["init_engine"] == engine_s
    if eager:
        # nothing but the KV cache's allocation inside the init-engine line
        assert "Warming up model" not in text and r.compile_cache == "none"
        assert r.steps_s["kv_cache"] == engine_s
    else:
        profile_s = _stated(text, r"Initial profiling/warmup run took ([\d.]+) s")
        warmup_s = (_clock_s(_line(text, "Warming up done.")) -
                    _clock_s(_line(text, "Warming up model for the compilation")))
        assert r.details_s["compile_warmup"] == warmup_s
        assert r.steps_s["torch_compile"] == pytest.approx(warmup_s - profile_s)
        assert r.steps_s["kv_cache"] == profile_s
        assert r.compile_cache == "miss"
        # the warm-up is most of the init-engine line (whole-second timestamps)
        assert abs(warmup_s - engine_s) < 1.5
    assert ("aot_cache_miss" in r.flags) == ("Compiling model again due to a load failure" in text)
    assert "cuda_graphs" not in r.steps_s and "tokenizer" not in r.steps_s
    assert not any("steps not found" in w for w in r.warnings)
    assert any("cuda_graphs" in n for n in r.notes)
    assert sum(r.steps_s.values()) <= r.total_s
    assert all(v >= 0 for v in (*r.steps_s.values(), *r.details_s.values()))


@pytest.mark.parametrize("path", API_LOGS, ids=lambda p: p.name)
def test_api_server_total_ends_at_its_ready_line(path: Path) -> None:
    text = path.read_text()
    r = parse_vllm_log_file(path)
    ready = _clock_s(_line(text, "Starting vLLM server on http"))
    assert r.total_s == r.details_s["api_ready"] == ready - _clock_s(_first_timed(text))
    assert "INFO:     Application startup complete." in text  # uvicorn's untimed line is not it
    assert r.warnings == ()


def test_offline_llm_start_ends_at_init_engine_with_one_warning() -> None:
    text = OFFLINE_LOG.read_text()
    r = parse_vllm_log_file(OFFLINE_LOG)
    assert r.total_s == _clock_s(_line(text, "init engine (profile")) - _clock_s(_first_timed(text))
    assert "api_ready" not in r.details_s
    assert len(r.warnings) == 1 and "no ready line" in r.warnings[0]
    assert r.flags == ("aot_cache_miss",)


def _log(*lines: tuple[str, str]) -> str:
    return "\n".join(f"(Worker pid=1) INFO 05-01 {ts} [cpu_model_runner.py:1] {msg}" for ts, msg in lines)


def test_cpu_aot_cache_hit_is_a_hit_without_a_load_warning() -> None:
    r = parse_vllm_log(_log(
        ("10:00:00", "non-default args: {}"),
        ("10:00:01", "Initializing a V1 LLM engine (v0.32.0) with config: model='m'"),
        ("10:00:05", "Starting to load model m..."),
        ("10:00:05", "Initializing model took 0.200000 seconds"),
        ("10:00:06", "Loading weights took 0.50 seconds"),
        ("10:00:06", "Warming up model for the compilation..."),
        ("10:00:07", "[backbone] Directly load AOT compilation from path /c/model"),
        ("10:00:09", "[backbone] Initial profiling/warmup run took 1.25 s"),
        ("10:00:10", "Warming up done."),
        ("10:00:10", "init engine (profile, create kv cache, warmup model) took 4.10 s"),
        ("10:00:11", "Starting vLLM server on http://127.0.0.1:8000"),
    ))
    assert r.compile_cache == "hit" and r.flags == ()
    assert r.steps_s == {"bootstrap": 5.0, "model_loading": 0.7, "torch_compile": 2.75, "kv_cache": 1.25}
    assert r.total_s == 11.0 and r.warnings == ()


def test_untimed_uvicorn_ready_line_alone_gives_no_api_ready() -> None:
    text = _log(("10:00:00", "non-default args: {}"), ("10:00:03", "Starting to load model m"),
                ("10:00:04", "init engine (profile, create kv cache, warmup model) took 0.50 s"))
    r = parse_vllm_log(text + "\nINFO:     Application startup complete.\n")
    assert "api_ready" not in r.details_s and r.total_s == 4.0
    assert tuple(STEPS) == ("bootstrap", "tokenizer", "model_loading", "torch_compile", "kv_cache",
                            "cuda_graphs")
