"""The startup-latency model: fitting, leave-one-model-out, the data reader and `coldstart predict`.

Synthetic data (generated here from known per-step lines) checks that the fit recovers what made
the data and generalizes to held-out models; the shared *Breaking the Ice* data (skipped when
``../shared`` is absent) checks the reader and the accuracy target.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from faascale.coldstart.dataset import (DatasetError, capture_sizes, load_dataset,
                                        model_from_row)
from faascale.coldstart.model import (PAPER_BASELINE, VLLM, FeatureError, ModelFeatures, Observation,
                                      StartSetting, accuracy, compare_loo, fit, loo_by_model, pooled)
from faascale.coldstart.predict import predict_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "coldstart-data"
needs_shared = pytest.mark.requires((SHARED / "startup_runs.csv").exists(),  # CI=true: fails
                                   reason=f"the shared data is absent: no {SHARED}/startup_runs.csv")

MODEL_HEADER = ["model", "size_b_params", "layers", "num_key_value_heads", "num_attention_heads",
                "hidden_size", "ffn_dim", "vocab_size", "tokenizer_size_mb",
                "compiled_graph_size_kb", "moe_n_experts", "moe_n_active_experts",
                "moe_active_size_b_params"]


def _model(name: str, params_b: float, layers: int, graph_kb: float, tok_mb: float = 5.0,
           **kw: object) -> ModelFeatures:
    return ModelFeatures(name=name, params_b=params_b, layers=layers, hidden_size=4096,
                         vocab_size=32000, tokenizer_mb=tok_mb, compiled_graph_kb=graph_kb, **kw)


# The "truth" of the synthetic machine: GB/s per source, seconds per graph KB, ...
TRUE = {"bootstrap": 8.0, "disk_gb_s": 0.5, "pagecache_gb_s": 8.0, "dynamo_s_per_kb": 0.005,
        "load_s_per_kb": 0.0045, "kv_s_per_b": 0.1, "capture_s_per_size_layer": 0.001}


def _synthetic_steps(m: ModelFeatures, s: StartSetting, rng: random.Random) -> dict[str, float]:
    noise = lambda: 1 + rng.uniform(-0.01, 0.01)  # noqa: E731
    bw = TRUE[f"{s.weights_source}_gb_s"]
    return {
        "framework_bootstrap": TRUE["bootstrap"] * noise(),
        "tokenizer_init": (0.05 + 0.03 * m.tokenizer_mb) * noise(),
        "model_init": 0.12,
        "load_weights": (0.05 + m.weight_bytes / 1e9 / bw) * noise(),
        "dynamo_transform_time": (0.5 + TRUE["dynamo_s_per_kb"] * m.compiled_graph_kb) * noise(),
        "graph_compile_cached": (0.3 + TRUE["load_s_per_kb"] * m.compiled_graph_kb) * noise(),
        "kv_cache_profiling": (1.0 + TRUE["kv_s_per_b"] * m.active_params_b) * noise(),
        "graph_capturing": (0.4 + TRUE["capture_s_per_size_layer"] * s.capture_sizes * m.layers)
        * noise(),
    }


def _synthetic(seed: int = 1) -> list[Observation]:
    rng = random.Random(seed)
    models = [_model(f"m{i}", params_b=p, layers=L, graph_kb=kb, tok_mb=t)
              for i, (p, L, kb, t) in enumerate([(0.5, 24, 700, 7), (3, 28, 980, 9), (7, 32, 1000, 2),
                                                 (13, 40, 1250, 2), (8, 32, 1120, 9), (4, 40, 1260, 7),
                                                 (6, 32, 1100, 3.5)])]
    obs = []
    for m in models:
        for scenario, source in (("a_disk", "disk"), ("a_pagecache", "pagecache")):
            s = StartSetting("a", scenario, source, "hit", 35)
            obs.append(Observation(m, s, _synthetic_steps(m, s, rng)))
    return obs


def test_weight_bytes_count_quantized_experts_not_parameters() -> None:
    dense = _model("dense", 8, 32, 1000)
    assert dense.weight_bytes == 16e9
    gpt_oss = ModelFeatures(name="gpt-oss-20b", params_b=21, layers=24, hidden_size=2880,
                            vocab_size=201088, tokenizer_mb=27, moe_experts=32,
                            moe_active_experts=4, moe_active_params_b=3.6, ffn_dim=2880,
                            quantization="mxfp4")
    experts = 24 * 32 * 3 * 2880 * 2880
    assert gpt_oss.weight_bytes == pytest.approx(experts * 4.25 / 8 + (21e9 - experts) * 2)
    assert 13e9 < gpt_oss.weight_bytes < 15e9  # the released checkpoint is 13.8 GB
    assert gpt_oss.active_params_b == 3.6 and dense.active_params_b == 8
    with pytest.raises(FeatureError, match="quantization"):
        _model("bad", 1, 2, 3, quantization="int3")
    with pytest.raises(FeatureError, match="layers"):
        _model("bad", 1, 0, 3)


def test_fit_recovers_the_lines_that_made_the_data() -> None:
    obs = _synthetic()
    fitted = fit(VLLM, obs, "a")
    load = fitted.steps["load_weights"].coefficients
    assert 1 / load["gb@disk"] == pytest.approx(TRUE["disk_gb_s"], rel=0.03)
    assert 1 / load["gb@pagecache"] == pytest.approx(TRUE["pagecache_gb_s"], rel=0.1)
    dyn = fitted.steps["dynamo_transform_time"].coefficients
    assert dyn["graph_kb"] == pytest.approx(TRUE["dynamo_s_per_kb"], rel=0.1)
    # A setting's offset is shrunk, not free: both scenarios have the same bootstrap here.
    boot = fitted.steps["framework_bootstrap"].coefficients
    assert abs(boot["setting=a_disk"]) < 0.1 and boot["1"] == pytest.approx(8.0, rel=0.02)
    # Steps that do not run are 0: a cache hit compiles nothing.
    p = fitted.predict(obs[0].model, obs[0].setting)
    assert p.steps_s["graph_compile_general_shape"] == 0.0
    assert p.total_s == pytest.approx(sum(p.steps_s.values()))
    assert p.groups_s["model_loading"] == pytest.approx(p.steps_s["model_init"]
                                                        + p.steps_s["load_weights"])
    assert p.low_s < p.total_s < p.high_s  # the LOO band is not empty


def test_leave_one_model_out_generalizes_and_beats_the_parameter_count_line() -> None:
    obs = _synthetic()
    # An MoE (all experts count for loading, few for compute) and an MXFP4 model nobody saw.
    rng = random.Random(7)
    odd = [_model("moe", 14.3, 24, 800, moe_experts=60, moe_active_experts=4,
                  moe_active_params_b=2.7),
           ModelFeatures(name="gpt-oss-like", params_b=21, layers=24, hidden_size=2880,
                         vocab_size=201088, tokenizer_mb=27, compiled_graph_kb=917, moe_experts=32,
                         moe_active_experts=4, moe_active_params_b=3.6, ffn_dim=2880,
                         quantization="mxfp4")]
    for m in odd:
        s = StartSetting("a", "a_disk", "disk", "hit", 35)
        obs.append(Observation(m, s, _synthetic_steps(m, s, rng)))
    ours = accuracy(loo_by_model(VLLM, obs))
    base = accuracy(loo_by_model(PAPER_BASELINE, obs))
    assert ours.n == base.n == len(obs)
    assert ours.mape_pct < 3.0, ours
    assert base.mape_pct > 2 * ours.mape_pct, (ours, base)


def test_a_source_never_measured_on_the_machine_is_refused() -> None:
    obs = [o for o in _synthetic() if o.setting.weights_source == "disk"]
    fitted = fit(VLLM, obs, "a")
    with pytest.raises(FeatureError, match="never|no fitted"):
        fitted.predict(obs[0].model, StartSetting("a", "a_disk", "REMOTE", "hit", 35))


def test_capture_sizes_follow_vllm_0_10() -> None:
    assert capture_sizes("") == 35
    assert capture_sizes("cuda-graph-sizes_56") == 10   # 1, 2, 4, 8 ... 56
    assert capture_sizes("cuda-graph-sizes_1") == 1
    assert capture_sizes("cuda-graph-sizes_1_2_4_8") == 4
    assert capture_sizes("load-format_tensorizer;cuda-graph-sizes_16") == 5


def _write_folder(folder: Path, obs: list[Observation]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    seen = {}
    for o in obs:
        seen[o.model.name] = o.model
    with (folder / "models.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MODEL_HEADER)
        for m in seen.values():
            w.writerow([m.name, m.params_b, m.layers, 8, 32, m.hidden_size, m.ffn_dim or 11008,
                        m.vocab_size, m.tokenizer_mb, m.compiled_graph_kb, m.moe_experts or "",
                        m.moe_active_experts or "", m.moe_active_params_b or ""])
    steps = VLLM.step_names()
    with (folder / "startup_runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "node", "weights_source", "compile_cache_observed", "run", "model",
                    "variant", *steps, "total_time"])
        for o in obs:
            w.writerow([o.setting.setting, o.setting.machine, o.setting.weights_source, "hit",
                        "mean", o.model.name, "", *(o.steps_s.get(s, "") for s in steps),
                        o.total_s])


def _features_csv(path: Path, rows: list[tuple[ModelFeatures, str]], drop: str = "") -> None:
    header = [c for c in MODEL_HEADER + ["machine"] if c != drop]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for m, machine in rows:
            row = {"model": m.name, "size_b_params": m.params_b, "layers": m.layers,
                   "num_key_value_heads": 8, "num_attention_heads": 32,
                   "hidden_size": m.hidden_size, "ffn_dim": 11008, "vocab_size": m.vocab_size,
                   "tokenizer_size_mb": m.tokenizer_mb, "compiled_graph_size_kb": m.compiled_graph_kb,
                   "moe_n_experts": "", "moe_n_active_experts": "", "moe_active_size_b_params": "",
                   "machine": machine}
            w.writerow({k: v for k, v in row.items() if k in header})


def test_predict_cli_writes_one_row_per_input_row(tmp_path: Path) -> None:
    obs = _synthetic()
    _write_folder(tmp_path / "data", obs)
    new = _model("new-9b", 9, 36, 1150, tok_mb=4)
    _features_csv(tmp_path / "in.csv", [(new, "a_disk"), (new, "a_pagecache"), (obs[0].model, "a_disk")])
    out = tmp_path / "out" / "pred.csv"
    r = subprocess.run([sys.executable, "-m", "faascale.cli", "coldstart", "predict", "--data",
                        str(tmp_path / "data"), "--features", str(tmp_path / "in.csv"), "--out",
                        str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert [(x["model"], x["machine"]) for x in rows] == [
        ("new-9b", "a_disk"), ("new-9b", "a_pagecache"), ("m0", "a_disk")]
    steps = ("bootstrap", "tokenizer", "model_loading", "torch_compile", "kv_cache", "cuda_graphs")
    for x in rows:
        assert float(x["predicted_total_s"]) == pytest.approx(sum(float(x[s]) for s in steps),
                                                              abs=1e-3)
    # Against the generating lines: a 9B model from disk loads 18 GB at 0.5 GB/s.
    rng = random.Random(0)
    truth = sum(_synthetic_steps(new, StartSetting("a", "a_disk", "disk", "hit", 35), rng).values())
    assert float(rows[0]["predicted_total_s"]) == pytest.approx(truth, rel=0.03)
    assert float(rows[0]["predicted_total_s"]) > float(rows[1]["predicted_total_s"]) + 30


@pytest.mark.parametrize("case, message", [
    ("machine", "machine 'nowhere' is not a scenario"),
    ("column", "missing column"),
    ("value", "layers is not a number"),
    ("data", "not a directory"),
])
def test_predict_cli_bad_input_is_one_error_line(tmp_path: Path, case: str, message: str) -> None:
    _write_folder(tmp_path / "data", _synthetic())
    m = _model("x", 1, 16, 700)
    _features_csv(tmp_path / "in.csv", [(m, "nowhere" if case == "machine" else "a_disk")],
                  drop="layers" if case == "column" else "")
    if case == "value":
        text = (tmp_path / "in.csv").read_text().splitlines()
        cells = text[1].split(",")
        cells[MODEL_HEADER.index("layers")] = "many"
        (tmp_path / "in.csv").write_text("\n".join([text[0], ",".join(cells)]) + "\n")
    data = tmp_path / ("missing" if case == "data" else "data")
    r = subprocess.run([sys.executable, "-m", "faascale.cli", "coldstart", "predict", "--data",
                        str(data), "--features", str(tmp_path / "in.csv"), "--out",
                        str(tmp_path / "out.csv")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.csv").exists()


# Measured at the commit that removed the outcome-derived source relabelling: ours 13.72 % over
# 81 starts, fitted per node, each model left out. The bound leaves ~10 % headroom for changes of
# the fit (not for a change of the data: the data are fixed).
SHARED_LOO_MAPE_BOUND_PCT = 15.0


@needs_shared
def test_shared_data_reader_and_the_accuracy_target() -> None:
    ds = load_dataset(SHARED)
    assert len(ds.models) == 18
    scenarios = {o.setting.setting for o in ds.observations}
    assert {"n1_disk", "n2_pagecache", "n3_pagecache", "n1_pagecache_nocompilecache"} <= scenarios
    n1_disk = [o for o in ds.observations if o.setting.setting == "n1_disk"]
    assert len(n1_disk) == 15 and all(o.setting.machine == "n1" for o in n1_disk)
    # Every row keeps its label: the Granite-4.0-H rows of n1_disk loaded at page-cache speed
    # (docs/coldstart.md), and are still "disk" here.
    granite = [o for o in n1_disk if o.model.name.startswith("granite4.0-h")]
    assert len(granite) == 2 and {o.setting.weights_source for o in n1_disk} == {"disk"}
    assert all(o.model.weight_bytes / 1e9 / o.steps_s["load_weights"] > 7 for o in granite)
    # Each observation's steps add up to the data's own total_time, and the compile cache read
    # from the rows is the one their experiment set (so it is known before the start).
    with (SHARED / "startup_runs.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == "mean"]
    totals = {(r["scenario"], r["model"], r["variant"]): float(r["total_time"]) for r in rows}
    assert any(o.total_s == pytest.approx(totals[("n1_disk", "llama3-3b", "")], abs=1e-6)
               for o in n1_disk)
    implied = {"warm": "hit", "VLLM_DISABLE_COMPILE_CACHE": "miss", "TORCH_COMPILE_DISABLE": "none"}
    for r in rows:
        assert [v for k, v in implied.items() if k in r["compile_cache_setting"]] == \
            [r["compile_cache_observed"]], r
    # Leave one model out, per node, ours and the paper-style lines on the same pooling: both
    # score every start, and ours meets the bound measured for the honest model.
    c = compare_loo(VLLM, PAPER_BASELINE, ds.observations, "machine")
    assert len(c.ours) == len(c.baseline) == len(c.ours_common) == len(ds.observations) == 81
    ours = accuracy(c.ours_common)
    assert ours.mape_pct <= SHARED_LOO_MAPE_BOUND_PCT, ours
    assert accuracy(loo_by_model(VLLM, ds.observations)).mape_pct == pytest.approx(ours.mape_pct)


def test_no_feature_depends_on_the_measured_outcome(tmp_path: Path) -> None:
    """A held-out model's measured times are perturbed in the data folder (its disk load made
    page-cache fast, every other step scaled): its leave-one-model-out predictions, features and
    settings must not move. The other models' predictions do move (the perturbed model is in
    their fits), which shows the perturbation reached the fit at all."""
    obs = _synthetic()
    held = "m3"

    def perturbed(o: Observation) -> Observation:
        if o.model.name != held:
            return o
        steps = {k: v * (0.05 if k == "load_weights" and o.setting.weights_source == "disk"
                         else 1.7) for k, v in o.steps_s.items()}
        return Observation(o.model, o.setting, steps)

    _write_folder(tmp_path / "a", obs)
    _write_folder(tmp_path / "b", [perturbed(o) for o in obs])
    before, after = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert [(o.model, o.setting) for o in before.observations] == \
        [(o.model, o.setting) for o in after.observations]
    assert before.settings == after.settings
    p_before = {(o.model.name, o.setting.setting): p.total_s
                for o, p in loo_by_model(VLLM, before.observations)}
    p_after = {(o.model.name, o.setting.setting): p.total_s
               for o, p in loo_by_model(VLLM, after.observations)}
    assert p_before.keys() == p_after.keys() and len(p_before) == len(obs)
    measured = {(o.model.name, o.setting.setting): o.total_s for o in after.observations}
    for k in p_before:
        if k[0] == held:
            assert p_after[k] == pytest.approx(p_before[k], rel=1e-9), k
            assert abs(measured[k] - p_after[k]) > 0.2 * measured[k], k  # the answer did move
    assert any(abs(p_after[k] - p_before[k]) > 0.01 * p_before[k] for k in p_before if k[0] != held)


def test_both_designs_are_compared_on_the_same_pooling_and_rows() -> None:
    obs = _synthetic()
    # A start from a loader only m0 was measured with: ours cannot predict it once m0 is left
    # out (it has no bandwidth for that source), the paper-style lines (no source) can.
    m0 = obs[0].model
    s = StartSetting("a", "a_streamer", "streamer", "hit", 35)
    obs.append(Observation(m0, s, {**obs[0].steps_s, "load_weights": 0.2}))
    c = compare_loo(VLLM, PAPER_BASELINE, obs, "machine")
    assert len(c.baseline) == len(c.ours) + 1 == len(obs)
    assert all(o.setting.weights_source != "streamer" for o, _ in c.ours)
    assert [o for o, _ in c.ours_common] == [o for o, _ in c.baseline_common] == \
        [o for o, _ in c.ours]
    a, b = accuracy(c.ours_common), accuracy(c.baseline_common)
    assert a.n == b.n == len(obs) - 1
    assert c.mape_ratio == pytest.approx(a.mape_pct / b.mape_pct)
    # Per setting, each scenario is its own fit group: the a_streamer row has no other model
    # there, so neither design scores it; the pairs carry the caller's observations.
    assert {o.setting.machine for o in pooled(obs, "setting")} == {"a_disk", "a_pagecache",
                                                                   "a_streamer"}
    per_setting = compare_loo(VLLM, PAPER_BASELINE, obs, "setting")
    assert len(per_setting.ours) == len(per_setting.baseline) == len(obs) - 1
    assert {o.setting.setting for o, _ in per_setting.baseline} == {"a_disk", "a_pagecache"}
    assert all(any(o is x for x in obs) for o, _ in per_setting.baseline)
    assert all(o.setting.machine == "a" for o, _ in per_setting.ours)
    with pytest.raises(ValueError, match="pooling"):
        pooled(obs, "node")


@needs_shared
def test_predict_on_shared_data_uses_the_scenario(tmp_path: Path) -> None:
    with (SHARED / "models.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert model_from_row(rows["gpt-oss-20b"], "x").quantization == "mxfp4"
    with (tmp_path / "in.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows["qwen-4b"], "machine"])
        w.writeheader()
        for machine in ("n1_disk", "n1_pagecache", "n2_pagecache"):
            w.writerow({**rows["llama3.1-8b-instruct"], "machine": machine})
    preds = predict_file(SHARED, tmp_path / "in.csv", tmp_path / "out.csv")
    disk, cached, l40s = (p.total_s for p in preds)
    # 16 GB at the n1 disk's ~0.55 GB/s vs its page cache: ~27 s more.
    assert 20 < disk - cached < 35
    assert 15 < l40s < 40
    with pytest.raises(DatasetError, match="not a scenario"):
        (tmp_path / "bad.csv").write_text(",".join([*rows["qwen-4b"], "machine"]) + "\n"
                                          + ",".join([*rows["qwen-4b"].values(), "n9"]) + "\n")
        predict_file(SHARED, tmp_path / "bad.csv", tmp_path / "o.csv")
