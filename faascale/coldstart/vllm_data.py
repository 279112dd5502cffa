"""vLLM starts measured here, written as a *Breaking the Ice*-format data folder that
``dataset.load_dataset`` (and so ``faascale coldstart predict --data DIR``) reads.

A folder holds ``models.csv`` (one row per model, from its Hugging Face ``config.json``, the
safetensors headers and ``tokenizer.json``) and ``startup_runs.csv`` (one row per start, ``run``
1, 2, …, and one ``mean`` row per scenario and model, recomputed whenever runs are added), plus
``logs/`` with each start's log and its parse (``<label>.json``: the ``VllmStartup``, the
measured times and the ``StartupProfile``). Adding runs to a folder keeps the runs already there,
so one folder collects several models and settings (eager and compiled are two scenarios).

How a start becomes a row (columns as the shared data's README defines them):

- The steps are the parsed log's (``vllm_log``): ``model_init`` and ``load_weights`` from their
  lines, ``model_loading`` their step, ``kv_cache_profiling`` = ``kv_cache``, ``graph_capturing``
  = ``cuda_graphs``, ``tokenizer_init`` only where the log states it. On the CPU backend,
  ``torch_compile`` goes to ``graph_compile_general_shape`` on a compile-cache miss (every 0.32
  start so far: the AOT cache fails to load) and to ``graph_compile_cached`` on a hit; from a GPU
  log, the stated Dynamo, compile and cached-load times go to their columns.
- ``framework_bootstrap`` is the log's bootstrap **plus what no step covers**: the interpreter's
  start and vLLM's imports before its first timestamped line (≈8 s here; the paper's first line,
  ``No plugins for group``, comes at import time, so its bootstrap holds that part), the engine
  core's handshake and the API server after ``init engine`` and the readiness poll. So the steps
  add up to the measured start (spawn → first 200 from ``/health``, ``actual_total_time``), which
  is what the startup model predicts as the sum of the steps. The log's own bootstrap stays in
  the run's JSON.
- ``weights_source`` is the caller's label: ``pagecache`` by default (``vllm_profile`` reads the
  model folder once before such a start), ``disk`` when the folder's pages were evicted before the
  start; never inferred from the measured load time. ``compile_cache_observed`` is the log's ``compile_cache`` (``miss``,
  ``hit``, ``none`` for eager).
- ``compiled_graph_size_kb`` is left empty (the paper's graph-size tool is not run here), and the
  MoE columns too (dense models only).
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from faascale.coldstart.dataset import DatasetError
from faascale.coldstart.vllm_follow import vllm_startup_profile
from faascale.coldstart.vllm_log import STEPS
from faascale.coldstart.vllm_run import VllmRun

RUN_COLUMNS = (
    "scenario", "node", "gpu", "cpu", "weights_source", "compile_cache_setting",
    "compile_cache_observed", "source_file", "run", "label", "model", "variant", "detect_platform",
    "llm_imports", "get_model_info", "worker_init", "framework_bootstrap", "load_weights",
    "model_init", "model_loading", "dynamo_transform_time", "graph_compile_general_shape",
    "graph_compile_cached", "torch.compile", "kv_cache_profiling", "graph_capturing", "init_engine",
    "tokenizer_init", "total_time", "actual_total_time")
MODEL_COLUMNS = (
    "model", "size_b_params", "layers", "num_key_value_heads", "num_attention_heads",
    "hidden_size", "ffn_dim", "vocab_size", "tokenizer_size_mb", "compiled_graph_size_kb",
    "moe_n_experts", "moe_n_active_experts", "moe_active_size_b_params", "weight_bytes")
CONTEXT_COLUMNS = RUN_COLUMNS[:RUN_COLUMNS.index("detect_platform")]
NUMBER_COLUMNS = RUN_COLUMNS[len(CONTEXT_COLUMNS):]
# the columns whose sum is the start (``total_time``): what the startup model's steps read
SUM_COLUMNS = ("framework_bootstrap", "tokenizer_init", "model_init", "load_weights",
               "dynamo_transform_time", "graph_compile_cached", "graph_compile_general_shape",
               "kv_cache_profiling", "graph_capturing")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_totals(paths: Sequence[Path]) -> tuple[int, int]:
    """(parameters, tensor bytes) over safetensors files, from their JSON headers only."""
    params = nbytes = 0
    for path in paths:
        try:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable safetensors file ({exc})") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            start, end = info["data_offsets"]
            nbytes += end - start
    return params, nbytes


def model_row(hf_dir: str | Path, name: str | None = None) -> dict[str, str]:
    """A ``models.csv`` row for a Hugging Face folder (``DatasetError`` if it is not one)."""
    folder = Path(hf_dir)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{folder}: no readable config.json ({exc})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DatasetError(f"{folder}: no *.safetensors weights")
    params, nbytes = safetensors_totals(files)
    tok = folder / "tokenizer.json"
    tokenizer_mb = tok.stat().st_size / 1e6 if tok.is_file() else 0.0
    try:
        heads = int(cfg["num_attention_heads"])
        row = {"model": name or folder.name, "size_b_params": f"{params / 1e9:.6g}",
               "layers": str(int(cfg["num_hidden_layers"])),
               "num_key_value_heads": str(int(cfg.get("num_key_value_heads") or heads)),
               "num_attention_heads": str(heads), "hidden_size": str(int(cfg["hidden_size"])),
               "ffn_dim": str(int(cfg.get("intermediate_size") or 0)),
               "vocab_size": str(int(cfg["vocab_size"])), "tokenizer_size_mb": f"{tokenizer_mb:.4g}",
               "weight_bytes": str(nbytes)}
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{folder}/config.json: missing or bad field {exc}") from None
    return {c: row.get(c, "") for c in MODEL_COLUMNS}


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def run_row(run: VllmRun, *, model: str, scenario: str, run_index: int, eager: bool,
            machine: Mapping[str, Any], variant: str = "", weights_source: str = "pagecache",
            compile_cache_setting: str | None = None) -> dict[str, str]:
    """One ``startup_runs.csv`` row for a successful start (see the module docstring);
    ``weights_source`` labels where the weights were read from (``pagecache`` or ``disk``),
    ``compile_cache_setting`` how the compile cache was set up (default: off for eager, else
    vLLM's default)."""
    if not run.ok or run.startup is None or run.measured_s is None:
        raise ValueError(f"run {run.log_path} did not succeed: {run.error}")
    st = run.startup
    steps, details = st.steps_s, st.details_s
    compile_s = steps.get("torch_compile")
    cols: dict[str, float | None] = {
        "tokenizer_init": steps.get("tokenizer"), "model_init": details.get("model_init"),
        "load_weights": details.get("weights"), "model_loading": steps.get("model_loading"),
        "torch.compile": compile_s, "kv_cache_profiling": steps.get("kv_cache"),
        "graph_capturing": steps.get("cuda_graphs"), "init_engine": details.get("init_engine")}
    if cols["model_init"] is None and cols["load_weights"] is None:
        cols["load_weights"] = steps.get("model_loading")
    if st.platform == "cpu" or "torch_compile_total" not in details:
        cols["graph_compile_cached" if st.compile_cache == "hit" else
             "graph_compile_general_shape"] = compile_s
    else:
        cols["dynamo_transform_time"] = details.get("dynamo_transform")
        cols["graph_compile_general_shape"] = details.get("graph_compile")
        cols["graph_compile_cached"] = details.get("graph_load")
        if cols["graph_compile_general_shape"] is None:
            cols["graph_compile_general_shape"] = max(
                0.0, details["torch_compile_total"] - details.get("dynamo_transform", 0.0))
    covered = sum(v for k, v in cols.items() if k in SUM_COLUMNS and v is not None)
    cols["framework_bootstrap"] = max(steps.get("bootstrap", 0.0), run.measured_s - covered)
    cols["total_time"] = covered + cols["framework_bootstrap"]
    cols["actual_total_time"] = run.measured_s
    row = {"scenario": scenario, "node": str(machine.get("hostname") or socket.gethostname()),
           "gpu": str(machine.get("gpu") or ""), "cpu": str(machine.get("cpu_model") or ""),
           "weights_source": weights_source,
           "compile_cache_setting": compile_cache_setting or (
               "off (--enforce-eager)" if eager else "vLLM default (persistent AOT compile cache)"),
           "compile_cache_observed": st.compile_cache or "", "source_file": f"logs/{run.log_path.name}",
           "run": str(run_index), "label": run.log_path.name, "model": model, "variant": variant}
    return {c: row.get(c, _fmt(cols.get(c))) for c in RUN_COLUMNS}


def mean_row(rows: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The ``mean`` row of one scenario and model: each number column averaged over the runs
    that have it (empty where none does), the context of the first run."""
    out = {c: rows[0][c] for c in CONTEXT_COLUMNS}
    out.update(run="mean", label="mean", source_file="startup_runs.csv")
    observed = [r["compile_cache_observed"] for r in rows]
    out["compile_cache_observed"] = max(set(observed), key=observed.count)
    for c in NUMBER_COLUMNS:
        values = [float(r[c]) for r in rows if (r.get(c) or "").strip()]
        out[c] = _fmt(sum(values) / len(values)) if values else ""
    return out


def _read(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            if list(reader.fieldnames or []) != list(columns):
                raise DatasetError(f"{path}: other columns than this writer's; write to a new "
                                   "folder")
    except (OSError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    return rows


def _write(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def next_run_index(out_dir: str | Path, model: str, scenario: str) -> int:
    """1 + the highest run already in ``out_dir`` for this model and scenario."""
    rows = _read(Path(out_dir) / "startup_runs.csv", RUN_COLUMNS)
    done = [int(r["run"]) for r in rows if r["model"] == model and r["scenario"] == scenario
            and r["run"].isdigit()]
    return max(done, default=0) + 1


def add_runs(out_dir: str | Path, model: Mapping[str, str], rows: Sequence[Mapping[str, str]]
             ) -> list[dict[str, str]]:
    """Add ``rows`` (one model) to the folder: the model row replaced or added, the runs appended,
    the mean rows of the touched scenarios recomputed. Returns all of ``startup_runs.csv``."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    models = [m for m in _read(folder / "models.csv", MODEL_COLUMNS) if m["model"] != model["model"]]
    _write(folder / "models.csv", MODEL_COLUMNS, [*models, dict(model)])
    runs = _read(folder / "startup_runs.csv", RUN_COLUMNS)
    touched = {(r["scenario"], r["model"]) for r in rows}
    kept = [r for r in runs if not (r["run"] == "mean" and (r["scenario"], r["model"]) in touched)]
    kept += [dict(r) for r in rows]
    for scenario, name in sorted(touched):
        each = [r for r in kept if r["scenario"] == scenario and r["model"] == name
                and r["run"] != "mean"]
        kept.append(mean_row(each))
    _write(folder / "startup_runs.csv", RUN_COLUMNS, kept)
    return kept


def save_run_json(run: VllmRun, *, model: str, weight_bytes: int,
                  machine: Mapping[str, Any]) -> Path:
    """``<log>.json`` beside the log: the parse, the measured times and the ``StartupProfile``."""
    assert run.startup is not None and run.ready_at_s is not None
    profile = vllm_startup_profile(run.startup, launched_at_s=run.launched_at_s,
                                   ready_at_s=run.ready_at_s, function=model,
                                   replica=run.log_path.stem, model_id=model, source="DISK",
                                   weight_bytes=weight_bytes, machine=machine)
    out = run.log_path.with_suffix(".json")
    out.write_text(json.dumps({"startup": asdict(run.startup), "launched_at_s": run.launched_at_s,
                               "ready_at_s": run.ready_at_s, "measured_s": run.measured_s,
                               "steps": list(STEPS), "profile": profile.to_dict()}, indent=1))
    return out
