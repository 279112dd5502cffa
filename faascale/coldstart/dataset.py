"""Reading a cold-start data folder in the format of the *Breaking the Ice* artifact.

A folder holds ``models.csv`` (one row of features per model) and ``startup_runs.csv`` (one row
per measured start or per mean of starts: the scenario, the node, where the weights came from, the
compile cache, the per-step seconds). Its README defines every column; this module turns the rows
into ``model.ModelFeatures``, ``model.StartSetting`` and ``model.Observation``. It reads files and
nothing else; the data stay where they are (the shared data have no licence to be copied).

One reading that the data need, stated where it happens, and one thing the reader does not do:

- **Weight bytes.** ``models.csv`` gives parameters, not bytes. Bytes are 2 per parameter unless a
  ``quantization`` or ``weight_bytes`` column says otherwise; without those columns, a model key
  naming gpt-oss is read as MXFP4 (the only format gpt-oss is released in).
- **The weights' source is the row's label, never the measured time.** A feature may only use
  what is known before a start: the model's metadata, the machine, the scenario as labelled
  (``weights_source``, plus the loader named in ``variant``). A row whose measured load time
  suggests another source keeps its label; docs/coldstart.md states where the data look
  mislabelled (the two Granite-4.0-H rows of ``n1_disk`` load at page-cache speed).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.coldstart.model import FeatureError, ModelFeatures, Observation, StartSetting, VLLM

MODEL_COLUMNS = ("model", "size_b_params", "layers", "hidden_size", "vocab_size",
                 "tokenizer_size_mb")
OPTIONAL_MODEL_COLUMNS = ("num_key_value_heads", "num_attention_heads", "ffn_dim",
                          "compiled_graph_size_kb", "moe_n_experts", "moe_n_active_experts",
                          "moe_active_size_b_params", "quantization", "weight_bytes")
RUN_COLUMNS = ("scenario", "node", "weights_source", "compile_cache_observed", "run", "model",
               "variant")
DEFAULT_CAPTURE_SIZES = 35  # vLLM 0.10 with max_capture_size 256: [1, 2, 4] + 8..256 step 8


class DatasetError(ValueError):
    """A data folder or a features file is missing, unreadable, or has bad values."""


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _number(row: dict[str, str], column: str, where: str, *, integer: bool = False,
            default: float | None = None) -> Any:
    raw = (row.get(column) or "").strip()
    if raw == "":
        if default is None:
            raise DatasetError(f"{where}: column {column} is empty")
        return int(default) if integer else default
    try:
        value = float(raw)
    except ValueError:
        raise DatasetError(f"{where}: column {column} is not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: column {column} is not finite: {raw!r}")
    if integer:
        if value != int(value):
            raise DatasetError(f"{where}: column {column} must be an integer: {raw!r}")
        return int(value)
    return value


def model_from_row(row: dict[str, str], where: str) -> ModelFeatures:
    """One ``models.csv``-style row as ``ModelFeatures`` (typed errors name row and column)."""
    name = (row.get("model") or "").strip()
    if not name:
        raise DatasetError(f"{where}: column model is empty")
    quant = (row.get("quantization") or "").strip().lower() or None
    if quant is None and "quantization" not in row and "gpt-oss" in name.lower():
        quant = "mxfp4"
    try:
        return ModelFeatures(
            name=name,
            params_b=_number(row, "size_b_params", where),
            layers=_number(row, "layers", where, integer=True),
            hidden_size=_number(row, "hidden_size", where, integer=True),
            vocab_size=_number(row, "vocab_size", where, integer=True),
            tokenizer_mb=_number(row, "tokenizer_size_mb", where),
            compiled_graph_kb=_number(row, "compiled_graph_size_kb", where, default=0.0),
            num_attention_heads=_number(row, "num_attention_heads", where, integer=True, default=0),
            num_key_value_heads=_number(row, "num_key_value_heads", where, integer=True, default=0),
            ffn_dim=_number(row, "ffn_dim", where, integer=True, default=0),
            moe_experts=_number(row, "moe_n_experts", where, integer=True, default=0),
            moe_active_experts=_number(row, "moe_n_active_experts", where, integer=True, default=0),
            moe_active_params_b=_number(row, "moe_active_size_b_params", where, default=0.0),
            quantization=quant,
            weight_bytes_override=_number(row, "weight_bytes", where, default=0.0) or None,
        )
    except FeatureError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def load_models(folder: Path) -> dict[str, ModelFeatures]:
    path = Path(folder) / "models.csv"
    rows = read_csv_rows(path, MODEL_COLUMNS)
    return {m.name: m for m in (model_from_row(r, f"{path} row {i + 2}")
                                for i, r in enumerate(rows))}


def capture_sizes(variant: str) -> int:
    """CUDA-graph capture sizes of a run, from its ``cuda-graph-sizes_…`` variant (vLLM 0.10:
    one value N means [1, 2, 4] + 8..N step 8, clipped to N; several values are the list)."""
    for part in variant.split(";"):
        if part.startswith("cuda-graph-sizes_"):
            values = [int(v) for v in part.removeprefix("cuda-graph-sizes_").split("_") if v]
            if len(values) == 1:
                n = values[0]
                return len([s for s in [1, 2, 4, *range(8, n + 1, 8)] if s <= n])
            return len(set(values))
    return DEFAULT_CAPTURE_SIZES


def _loader(variant: str) -> str:
    for part in variant.split(";"):
        if part.startswith("load-format_") and part != "load-format_safetensors":
            return part.removeprefix("load-format_")
    return ""


def _source(row: dict[str, str]) -> str:
    source = (row.get("weights_source") or "").strip() or "disk"
    loader = _loader(row.get("variant") or "")
    return f"{source}+{loader}" if loader else source


@dataclass(frozen=True)
class Dataset:
    models: dict[str, ModelFeatures]
    observations: list[Observation]
    settings: dict[str, StartSetting]


def load_dataset(folder: str | Path, *, runs: str = "mean") -> Dataset:
    """Models, observations (``runs``: ``mean`` rows, or ``each`` for the individual iterations;
    every feature from the row's labels and the model's metadata, none from its measured times)
    and the settings per scenario (for ``predict``: the scenario's node, its labelled source, the
    compile cache most of its rows saw, the default capture sizes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory")
    models = load_models(folder)
    path = folder / "startup_runs.csv"
    step_names = VLLM.step_names()
    rows = read_csv_rows(path, RUN_COLUMNS + step_names)
    observations = []
    caches: dict[str, Counter[str]] = {}
    nodes: dict[str, str] = {}
    labelled: dict[str, str] = {}
    for i, r in enumerate(rows):
        scenario, node = r["scenario"].strip(), r["node"].strip()
        if not scenario or not node:
            raise DatasetError(f"{path} row {i + 2}: scenario and node must be set")
        nodes.setdefault(scenario, node)
        labelled.setdefault(scenario, (r.get("weights_source") or "disk").strip())
        if r["run"] == "mean":
            caches.setdefault(scenario, Counter())[r["compile_cache_observed"]] += 1
        if r["model"] not in models:
            continue  # a run of a model without features cannot be used
        wanted = r["run"] == "mean" if runs == "mean" else r["run"] not in ("mean", "warmup")
        if not wanted:
            continue
        setting = StartSetting(machine=node, setting=scenario, weights_source=_source(r),
                               compile_cache=r["compile_cache_observed"] or "hit",
                               capture_sizes=capture_sizes(r.get("variant") or ""))
        steps = {s: _number(r, s, f"{path} row {i + 2}", default=0.0) for s in step_names}
        observations.append(Observation(models[r["model"]], setting, steps))
    settings = {s: StartSetting(machine=nodes[s], setting=s, weights_source=labelled[s],
                                compile_cache=(caches.get(s) or Counter(["hit"])).most_common(1)[0][0],
                                capture_sizes=DEFAULT_CAPTURE_SIZES)
                for s in nodes}
    return Dataset(models=models, observations=observations, settings=settings)
