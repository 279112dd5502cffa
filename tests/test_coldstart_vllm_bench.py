"""``benchmarks/coldstart_vllm.py`` without vLLM: the random-weight model folders it starts (sizes
match the published checkpoints; a tiny one is written, read back by the data format and loaded by
transformers), the plan of missing starts, and the evaluation on a synthetic data folder in the
*Breaking the Ice* format (generated from known per-step lines: the fit must recover them for
models it never saw, and beat the paper-style lines); ``--quick`` on such a folder starts nothing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import coldstart_vllm as bench  # noqa: E402
from benchmarks.vllm_models import (ARCHS, BY_NAME, Arch, config_json, ensure_model,  # noqa: E402
                                    synthetic_tokenizer_json, synthetic_vocab)
from faascale.coldstart.dataset import load_dataset  # noqa: E402
from faascale.coldstart.model import ModelFeatures  # noqa: E402
from faascale.coldstart.vllm_data import MODEL_COLUMNS, RUN_COLUMNS, add_runs, model_row  # noqa: E402

# Parameter counts of the published checkpoints (their safetensors), all layers kept.
PUBLISHED = {"llama-68m": 68_030_208, "llama-160m": 162_417_408, "smollm2-135m": 134_515_008,
             "smollm2-360m": 361_821_120, "qwen2.5-0.5b": 494_032_768,
             "llama-3.2-1b-2l": 1_235_814_400, "tinyllama-1.1b-10l": 1_100_048_384,
             "mistral-7b-2l": 7_241_732_096}
FULL_LAYERS = {"llama-3.2-1b-2l": 16, "tinyllama-1.1b-10l": 22, "mistral-7b-2l": 32}

TINY = Arch("tiny-qwen2", "Qwen2ForCausalLM", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
            tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
            max_position_embeddings=256, source="test")
TINY_LLAMA3 = replace(BY_NAME["llama-3.2-1b-2l"], name="tiny-llama3", hidden_size=32,
                      intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=300, tie_word_embeddings=False, dtype="float32")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_architectures_have_the_published_sizes(arch: Arch) -> None:
    full = replace(arch, num_hidden_layers=FULL_LAYERS.get(arch.name, arch.num_hidden_layers))
    assert full.num_params == PUBLISHED[arch.name]
    assert arch.weight_bytes <= 1.5e9  # one start fits this machine
    cfg = config_json(arch)
    assert cfg["architectures"] == [arch.architecture] and cfg["vocab_size"] == arch.vocab_size
    assert cfg["eos_token_id"] == arch.vocab_size - 1


def test_synthetic_tokenizer_has_exactly_the_vocabulary() -> None:
    from tokenizers import Tokenizer

    vocab, merges = synthetic_vocab(1000, seed=3)
    assert len(vocab) == 997 and len(merges) == 997 - 256
    assert all(a in vocab and b in vocab and vocab[a + b] > max(vocab[a], vocab[b])
               for a, b in merges)  # every merge joins two earlier tokens
    text = synthetic_tokenizer_json(1000, seed=3)
    assert text == synthetic_tokenizer_json(1000, seed=3)  # deterministic
    tok = Tokenizer.from_str(text)
    assert tok.get_vocab_size() == 1000 and tok.token_to_id("<|im_end|>") == 999
    ids = tok.encode("hello, wörld <|im_end|>").ids
    assert ids[-1] == 999 and tok.decode(ids, skip_special_tokens=True) == "hello, wörld "


def test_a_model_folder_is_written_once_read_back_and_loads(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch in (TINY, TINY_LLAMA3):
        folder = ensure_model(arch, tmp_path)
        row = model_row(folder)
        assert tuple(row) == MODEL_COLUMNS
        assert float(row["size_b_params"]) * 1e9 == pytest.approx(arch.num_params, abs=1)
        assert int(row["weight_bytes"]) == arch.weight_bytes
        assert (row["layers"], row["vocab_size"]) == ("2", str(arch.vocab_size))
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("hi there", return_tensors="pt").input_ids
        with torch.no_grad():
            assert model(ids).logits.shape == (1, ids.shape[1], arch.vocab_size)
    weights = tmp_path / TINY.name / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    ensure_model(TINY, tmp_path)  # reused
    assert weights.stat().st_mtime_ns == before[0]
    ensure_model(TINY, tmp_path, seed=1)  # another spec: rebuilt, other weights
    assert weights.read_bytes() != before[1]
    ensure_model(TINY, tmp_path / "again")  # same seed elsewhere: the same bytes
    assert (tmp_path / "again" / TINY.name / "model.safetensors").read_bytes() == before[1]


def test_plan_adds_only_missing_starts_round_by_round() -> None:
    a, b = ARCHS[0], ARCHS[1]
    settings = bench.SETTINGS  # eager x2, compiled x1, eager_disk x1
    done = {(a.name, "h_eager"): 2, (b.name, "h_eager"): 1, (a.name, "h_compiled"): 1}
    jobs = [(j.arch.name, j.setting.key) for j in bench.plan([a, b], settings, done, "h")]
    assert jobs == [(b.name, "compiled"), (a.name, "eager_disk"), (b.name, "eager_disk"),
                    (b.name, "eager")]
    assert len(bench.plan(ARCHS, settings, {}, "h")) == len(ARCHS) * 4


def test_architecture_inspected_reads_vllms_model_info_cache(tmp_path: Path) -> None:
    assert not bench.architecture_inspected("Qwen2ForCausalLM", tmp_path)
    (tmp_path / "modelinfos").mkdir()
    (tmp_path / "modelinfos" / "vllm-model_executor-models-qwen2-Qwen2ForCausalLM.json").write_text("{}")
    assert bench.architecture_inspected("Qwen2ForCausalLM", tmp_path)
    assert not bench.architecture_inspected("LlamaForCausalLM", tmp_path)
    assert bench.default_cache_root({"VLLM_CACHE_ROOT": "/x"}) == Path("/x")


def _features(arch: Arch) -> ModelFeatures:
    return ModelFeatures(name=arch.name, params_b=arch.num_params / 1e9,
                         layers=arch.num_hidden_layers, hidden_size=arch.hidden_size,
                         vocab_size=arch.vocab_size, tokenizer_mb=arch.vocab_size * 5.3e-5,
                         num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_key_value_heads,
                         ffn_dim=arch.intermediate_size, weight_bytes_override=arch.weight_bytes)


def _synthetic_steps(m: ModelFeatures, key: str, rng: random.Random) -> dict[str, float]:
    """Per-step seconds from known lines (the physics the model's features name), 1 % noise."""
    noise = lambda: 1 + rng.uniform(-0.01, 0.01)  # noqa: E731
    gb = m.weight_bytes / 1e9
    compiled = key == "compiled"
    steps = {"framework_bootstrap": (26 + 1.2 * m.tokenizer_mb + 1.5 * gb + compiled) * noise(),
             "model_init": 0.15 * noise(),
             "load_weights": (0.1 + gb / (0.85 if key == "eager_disk" else 6.0)) * noise(),
             "kv_cache_profiling": ((0.5 + 25 * m.body_params_b + 5 * m.vocab_hidden_b) if compiled
                                    else (0.3 + 1.0 * m.vocab_hidden_b)) * noise()}
    if compiled:
        steps["graph_compile_general_shape"] = (12 + 2.0 * m.layers) * noise()
    return steps


def _row(arch: Arch, m: ModelFeatures, setting: bench.Setting, run: int,
         steps: dict[str, float]) -> dict[str, str]:
    row = {c: "" for c in RUN_COLUMNS}
    row.update(scenario=bench.scenario("h", setting), node="h", weights_source=setting.weights_source,
               compile_cache_observed="none" if setting.enforce_eager else "miss", run=str(run),
               label=f"run{run}", model=arch.name, variant="dtype_float32")
    row.update({k: f"{v:.6g}" for k, v in steps.items()})
    total = sum(steps.values())
    row.update(total_time=f"{total:.6g}", actual_total_time=f"{total:.6g}")
    return row


def synthetic_folder(folder: Path, seed: int = 0) -> Path:
    """A data folder of the benchmark's 8 models x 3 settings (2 eager starts, 1 of the others)."""
    rng = random.Random(seed)
    for arch in ARCHS:
        m = _features(arch)
        model = {c: "" for c in MODEL_COLUMNS}
        model.update(model=arch.name, size_b_params=f"{m.params_b:.6g}", layers=str(m.layers),
                     num_key_value_heads=str(m.num_key_value_heads),
                     num_attention_heads=str(m.num_attention_heads), hidden_size=str(m.hidden_size),
                     ffn_dim=str(m.ffn_dim), vocab_size=str(m.vocab_size),
                     tokenizer_size_mb=f"{m.tokenizer_mb:.4g}", weight_bytes=str(arch.weight_bytes))
        rows = [_row(arch, m, s, k + 1, _synthetic_steps(m, s.key, rng))
                for s in bench.SETTINGS for k in range(s.runs)]
        add_runs(folder, model, rows)
    return folder


def test_evaluation_recovers_known_lines_for_unseen_models(tmp_path: Path) -> None:
    ds = load_dataset(synthetic_folder(tmp_path / "data"))
    assert len(ds.models) == len(ARCHS) and len(ds.observations) == 3 * len(ARCHS)
    ev = bench.evaluate(ds.observations)
    assert ev["vllm_cpu_starts_scored"] == 3 * len(ARCHS)
    assert ev["vllm_cpu_loo_mape_pct"] < 1.5, ev["vllm_cpu_loo_mape_pct"]
    assert ev["vllm_cpu_baseline_loo_mape_pct"] > 3 * ev["vllm_cpu_loo_mape_pct"]
    assert ev["vllm_cpu_loo_mape_vs_baseline"] == pytest.approx(
        ev["vllm_cpu_loo_mape_pct"] / ev["vllm_cpu_baseline_loo_mape_pct"], abs=2e-3)
    assert ev["vllm_cpu_extremes"] == ["qwen2.5-0.5b", "mistral-7b-2l"]
    assert len(ev["vllm_cpu_extremes_err_pct"]) == 6 and ev["vllm_cpu_extremes_mape_pct"] < 3
    assert set(ev["vllm_cpu_loo_step_mape_pct"]) == {"bootstrap", "model_loading", "torch_compile",
                                                    "kv_cache"}
    assert set(ev["vllm_cpu_loo_mape_pct_by_setting"]) == {"h_eager", "h_compiled", "h_eager_disk"}
    spread, pairs = bench.repeat_spread(load_dataset(tmp_path / "data", runs="each").observations)
    assert pairs == len(ARCHS) and spread is not None and spread < 1.0
    text = bench.report_text(ev, ds.observations, bench.recorded_runs(tmp_path / "data"), BY_NAME)
    assert all(a.name in text for a in ARCHS) and "paper-style" in text


def test_held_out_leaves_all_named_models_out_at_once() -> None:
    rng = random.Random(1)
    from faascale.coldstart.model import VLLM, Observation, StartSetting

    obs = [Observation(_features(a), StartSetting("h", "h_eager", "pagecache", "none"),
                       _synthetic_steps(_features(a), "eager", rng)) for a in ARCHS]
    pairs = bench.held_out(VLLM, obs, ["qwen2.5-0.5b", "mistral-7b-2l"])
    assert sorted(o.model.name for o, _ in pairs) == ["mistral-7b-2l", "qwen2.5-0.5b"]
    assert bench.extremes(obs) == ("qwen2.5-0.5b", "mistral-7b-2l")
    assert bench.extremes([]) == ()


def _quick(data: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    env = {**os.environ, "FAASCALE_VLLM_PYTHON": str(data / "no-vllm" / "python")}
    res = subprocess.run([sys.executable, "benchmarks/coldstart_vllm.py", "--quick", "--data",
                          str(data)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def test_quick_evaluates_a_folder_without_starting_vllm(tmp_path: Path) -> None:
    report = ROOT / "docs" / "benchmarks.md"
    before = report.read_text() if report.exists() else None
    data = synthetic_folder(tmp_path / "data")
    _, out = _quick(data)
    assert out["quick"] is True and out["vllm_cpu_starts_added"] == 0
    assert out["vllm_cpu_runs"] == 4 * len(ARCHS) and len(out["vllm_cpu_models"]) == len(ARCHS)
    assert isinstance(out["vllm_cpu_loo_mape_pct"], float) and out["vllm_cpu_loo_mape_vs_baseline"] < 1
    assert (report.read_text() if report.exists() else None) == before  # --quick writes no report
    res, skipped = _quick(tmp_path / "empty")  # no data and no vLLM: says why
    assert skipped["vllm_cpu_skipped"] == bench.VLLM_MISSING and "vllm_cpu_loo_mape_pct" not in skipped
