"""``faascale coldstart predict``: fit on a data folder, predict the starts a CSV asks for.

``--data DIR`` is a folder in the format of the *Breaking the Ice* artifact (``models.csv``,
``startup_runs.csv``), fitted with its rows' labels as given (``dataset.py``). ``--features
IN.csv`` has the columns of ``models.csv`` plus ``machine``, a ``scenario`` of the folder's
``startup_runs.csv`` (``n1_disk``, ``n2_pagecache``, ...). Optional columns override what the
scenario implies: ``weights_source`` (``disk``, ``pagecache``, ...), ``compile_cache`` (``hit``,
``miss``, ``none``), ``capture_sizes`` (CUDA-graph sizes), and ``quantization``/``weight_bytes``
describe the checkpoint. ``OUT.csv`` has one row per input row, in order: ``model``,
``machine``, ``predicted_total_s``, one column per step (the six steps of *Breaking the Ice*),
then ``predicted_low_s``/``predicted_high_s`` (the 90 % band from the fit's leave-one-model-out
errors) and the finer sub-steps.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from faascale.coldstart.dataset import (MODEL_COLUMNS, DatasetError, load_dataset, model_from_row,
                                        read_csv_rows)
from faascale.coldstart.model import VLLM, FeatureError, Prediction, fit_machines

STEP_COLUMNS = tuple(VLLM.groups)
FINE_COLUMNS = VLLM.step_names()


def predict_file(data_dir: str | Path, features_csv: str | Path, out_csv: str | Path
                 ) -> list[Prediction]:
    """Fit per machine on ``data_dir`` and write the predictions for ``features_csv``."""
    ds = load_dataset(data_dir)
    fits = fit_machines(VLLM, ds.observations)
    path = Path(features_csv)
    rows = read_csv_rows(path, (*MODEL_COLUMNS, "machine"))
    predictions = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 2}"
        scenario = (row.get("machine") or "").strip()
        if scenario not in ds.settings:
            raise DatasetError(f"{where}: machine {scenario!r} is not a scenario of {data_dir} "
                               f"(known: {', '.join(sorted(ds.settings))})")
        setting = ds.settings[scenario]
        changes: dict[str, object] = {}
        if (row.get("weights_source") or "").strip():
            changes["weights_source"] = row["weights_source"].strip()
        if (row.get("compile_cache") or "").strip():
            changes["compile_cache"] = row["compile_cache"].strip()
        if (row.get("capture_sizes") or "").strip():
            try:
                changes["capture_sizes"] = int(row["capture_sizes"])
            except ValueError:
                raise DatasetError(f"{where}: capture_sizes must be an integer") from None
        try:
            setting = dataclasses.replace(setting, **changes)
            model = model_from_row(row, where)
            predictions.append(fits[setting.machine].predict(model, setting))
        except FeatureError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    out = Path(out_csv)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "machine", "predicted_total_s", *STEP_COLUMNS,
                             "predicted_low_s", "predicted_high_s", *FINE_COLUMNS])
            for p in predictions:
                writer.writerow([p.model, p.setting, f"{p.total_s:.4f}",
                                 *(f"{p.groups_s[c]:.4f}" for c in STEP_COLUMNS),
                                 f"{p.low_s:.4f}", f"{p.high_s:.4f}",
                                 *(f"{p.steps_s[c]:.4f}" for c in FINE_COLUMNS)])
        tmp.replace(out)
    except OSError as exc:
        raise DatasetError(f"{out}: cannot write ({exc})") from None
    return predictions
