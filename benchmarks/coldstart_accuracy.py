"""How well the startup-latency model predicts starts it was not fitted on.

Part 1, vLLM (the *Breaking the Ice* data, ``--data``, default ``../shared/coldstart-data``):
leave one model out (each model's starts predicted by a fit on the *other* models only) for

- **ours** (``faascale.coldstart.model.VLLM``: bytes over the source's bandwidth, compile cache
  hit/miss/off, active parameters, capture sizes x layers, per-setting offsets);
- **the paper's per-step linear model** (``PAPER_BASELINE``: one line per step on one feature),

both fitted on the same pooling and scored on the same rows (``model.compare_loo``), so the
ratio compares model forms only. Two poolings, each applied to both designs:

- **per node** (headline): one fit per node over all its scenarios, as the platform and
  ``faascale coldstart predict`` fit;
- **per scenario**: one fit per scenario (one campaign), as the paper fits its predictor; a
  scenario with a single model cannot leave it out, so neither design scores its rows.

Every feature comes from the rows' labels and the models' metadata (``dataset.py``), none from a
measured time. A data check is printed beside the result (reported only, never a feature):
disk-labelled rows whose measured load bandwidth exceeds ``SUSPECT_FACTOR`` x their scenario's
median, and how much of our error they carry.

Part 2, our engine (``--no-engine`` skips it): real fresh-process cold starts from HOST, DISK and
a Ceph RGW S3, leave one model out (``benchmarks/coldstart_engine.py``).

    python benchmarks/coldstart_accuracy.py [--quick] [--no-engine] [--no-report] [--data DIR]

``--quick``: one start per (model, tier) instead of four; it writes no report and draws the
figure into a temporary directory, the same code paths otherwise (about 1-2 min).

The last line of stdout is JSON. How its comparison keys read:

- ``loo_mape_vs_baseline``: ours / baseline leave-one-model-out MAPE on the rows both scored,
  per-node pooling; < 1 = ours better.
- ``per_scenario_loo_mape_vs_baseline``: the same, per-scenario pooling; < 1 = ours better.
- ``loo_mape_pct``/``baseline_loo_mape_pct`` (and ``per_scenario_...``): each design on every row
  it scored (``starts``/``baseline_starts``); ``..._common``: on the ``common_starts`` rows.
- ``suspect_rows_ape_share``: the suspect rows' share of our summed absolute percentage errors
  (0-1; higher = more of our error is in rows whose label looks wrong).
- ``engine_loo_err_pct``: (predicted - measured) / measured x 100 per model/tier, signed (> 0 =
  over-predicted); ``engine_loo_mape_pct``/``engine_loo_max_abs_err_pct``: its mean/largest
  absolute value; ``engine_in_sample_max_abs_err_pct``: the same for the in-sample fit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FIGURES, ROOT, command_line, emit, git_rev, machine, write_section  # noqa: E402
from faascale.coldstart.dataset import load_dataset  # noqa: E402
from faascale.coldstart.model import (PAPER_BASELINE, VLLM, Accuracy, Comparison,  # noqa: E402
                                      Observation, Prediction, accuracy, compare_loo)

Pairs = list[tuple[Observation, Prediction]] | tuple[tuple[Observation, Prediction], ...]
POOLINGS = (("machine", "per node"), ("setting", "per scenario"))
SUSPECT_FACTOR = 3.0


def _ape(o: Observation, p: Prediction) -> float:
    return abs(p.total_s - o.total_s) / o.total_s * 100


def by_node(pairs: Pairs) -> dict[str, Accuracy]:
    groups: dict[str, list[tuple[Observation, Prediction]]] = defaultdict(list)
    for o, p in pairs:
        groups[o.setting.machine].append((o, p))
    return {n: accuracy(v) for n, v in sorted(groups.items())}


def _cmp(a: float, b: float) -> str:
    return "better than" if a < b else ("as good as" if a == b else "worse than")


def suspect_rows(observations: list[Observation]) -> list[tuple[Observation, float, float]]:
    """Disk-labelled rows loading over ``SUSPECT_FACTOR`` x their scenario's median bandwidth:
    (row, its GB/s, the scenario's median GB/s). A data check for the report, not a feature."""
    bw: dict[str, list[tuple[Observation, float]]] = defaultdict(list)
    for o in observations:
        load = o.steps_s.get("load_weights", 0.0)
        if o.setting.weights_source.startswith("disk") and load > 0:
            bw[o.setting.setting].append((o, o.model.weight_bytes / 1e9 / load))
    out = []
    for rows in bw.values():
        median = statistics.median(b for _, b in rows)
        out += [(o, b, median) for o, b in rows if b > SUSPECT_FACTOR * median]
    return out


def vllm_part(data: Path) -> tuple[dict[str, Any], str, Comparison]:
    ds = load_dataset(data)
    t0 = time.perf_counter()
    comparisons = {pool: compare_loo(VLLM, PAPER_BASELINE, ds.observations, pool)
                   for pool, _ in POOLINGS}
    fit_s = time.perf_counter() - t0
    head = comparisons["machine"]
    lines = ["| pooling | machine | starts scored: ours / baseline / both | ours LOO MAPE | ours MAE "
             "| paper-style LOO MAPE | paper-style MAE | ours ÷ paper-style |",
             "|---|---|---|---|---|---|---|---|"]
    result: dict[str, Any] = {}
    verdicts = []
    for pool, name in POOLINGS:
        c = comparisons[pool]
        scored_a, scored_b = by_node(c.ours), by_node(c.baseline)
        ours_n, base_n = by_node(c.ours_common), by_node(c.baseline_common)
        for n in sorted(scored_a.keys() | scored_b.keys()):
            o, b = ours_n.get(n), base_n.get(n)
            counts = (f"{scored_a[n].n if n in scored_a else 0} / "
                      f"{scored_b[n].n if n in scored_b else 0} / {o.n if o else 0}")
            if o and b:
                lines.append(f"| {name} | {n} | {counts} | {o.mape_pct:.2f} % | {o.mae_s:.2f} s | "
                             f"{b.mape_pct:.2f} % | {b.mae_s:.2f} s | "
                             f"{o.mape_pct / b.mape_pct:.2f}× |")
            else:
                lines.append(f"| {name} | {n} | {counts} | - | - | - | - | - |")
        a, b = accuracy(c.ours_common), accuracy(c.baseline_common)
        lines.append(f"| {name} | **all** | {len(c.ours)} / {len(c.baseline)} / {a.n} | "
                     f"**{a.mape_pct:.2f} %** | {a.mae_s:.2f} s | **{b.mape_pct:.2f} %** | "
                     f"{b.mae_s:.2f} s | **{c.mape_ratio:.2f}×** |")
        prefix = "" if pool == "machine" else "per_scenario_"
        result.update({
            f"{prefix}loo_mape_pct": round(accuracy(c.ours).mape_pct, 3),
            f"{prefix}loo_mae_s": round(accuracy(c.ours).mae_s, 3),
            f"{prefix}baseline_loo_mape_pct": round(accuracy(c.baseline).mape_pct, 3),
            f"{prefix}baseline_loo_mae_s": round(accuracy(c.baseline).mae_s, 3),
            f"{prefix}loo_mape_pct_common": round(a.mape_pct, 3),
            f"{prefix}baseline_loo_mape_pct_common": round(b.mape_pct, 3),
            f"{prefix}loo_mape_vs_baseline": round(c.mape_ratio, 3),
            f"{prefix}starts": len(c.ours), f"{prefix}baseline_starts": len(c.baseline),
            f"{prefix}common_starts": a.n,
        })
        verdicts.append(f"{name}, ours is {_cmp(a.mape_pct, b.mape_pct)} the paper-style lines on "
                        f"the same {a.n} starts ({a.mape_pct:.2f} % vs {b.mape_pct:.2f} %, "
                        f"ratio {c.mape_ratio:.2f})")
    table = "\n".join(lines)

    dense = [i for i, (o, _) in enumerate(head.ours_common) if not o.model.moe_experts]
    moe = [i for i, (o, _) in enumerate(head.ours_common) if o.model.moe_experts]
    part = {k: (accuracy([head.ours_common[i] for i in idx]),
                accuracy([head.baseline_common[i] for i in idx])) for k, idx in
            (("dense", dense), ("moe", moe))}
    moe_names = sorted({head.ours_common[i][0].model.name for i in moe})
    for k, (a, b) in part.items():
        result[f"loo_mape_pct_{k}"] = round(a.mape_pct, 3)
        result[f"baseline_loo_mape_pct_{k}"] = round(b.mape_pct, 3)
    result["loo_mape_pct_by_machine"] = {n: round(v.mape_pct, 3)
                                         for n, v in by_node(head.ours_common).items()}
    result["baseline_loo_mape_pct_by_machine"] = {n: round(v.mape_pct, 3)
                                                  for n, v in by_node(head.baseline_common).items()}

    apes = {id(o): _ape(o, p) for o, p in head.ours}
    suspects = suspect_rows(ds.observations)
    share = (sum(apes.get(id(o), 0.0) for o, _, _ in suspects) / sum(apes.values())
             if apes else 0.0)
    result["suspect_rows"] = [f"{o.setting.setting}/{o.model.name}" for o, _, _ in suspects]
    result["suspect_rows_ape_share"] = round(share, 3)
    result["fit_all_loo_s"] = round(fit_s, 3)
    suspect_txt = ("; ".join(f"{o.model.name} on {o.setting.setting} ({o.setting.weights_source}): "
                             f"{b:.2f} GB/s against the scenario's median {m:.2f} GB/s, our error "
                             f"{apes[id(o)]:.0f} %" if id(o) in apes else
                             f"{o.model.name} on {o.setting.setting}: {b:.2f} GB/s vs {m:.2f} GB/s"
                             for o, b, m in suspects) or "none")
    worst = sorted(head.ours, key=lambda op: -_ape(*op))[:5]
    worst_txt = "; ".join(f"{o.model.name} on {o.setting.setting}: {p.total_s:.1f} s predicted, "
                          f"{o.total_s:.1f} s measured ({_ape(o, p):.0f} %)" for o, p in worst)
    (da, db), (ma, mb) = part["dense"], part["moe"]
    text = (table + "\n\n" + "Per " + "; per ".join(v.removeprefix("per ") for v in verdicts)
            + ".\n\n"
            f"Per node, on the common rows: dense models ours {da.mape_pct:.2f} %, paper-style "
            f"{db.mape_pct:.2f} % ({da.n} starts); MoE models ({', '.join(moe_names) or 'none'}) "
            f"ours {ma.mape_pct:.2f} %, paper-style {mb.mape_pct:.2f} % ({ma.n} starts). Largest "
            f"errors (ours, per node): {worst_txt}.\n\n"
            f"Data check (reported, not used by any fit): disk-labelled rows loading faster than "
            f"{SUSPECT_FACTOR:.0f}× their scenario's median bandwidth: {suspect_txt}. They carry "
            f"{share * 100:.0f} % of our summed absolute percentage errors per node. Their labels "
            f"are kept: a feature may only use what is known before a start.")
    print(table)
    print(text.split("\n\n", 1)[1])
    return result, text, head


def figure(c: Comparison, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*VLLM.groups, "total"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.5))
    for ax, g in zip(axes.flat, groups):
        for pairs, label, color in ((c.baseline_common, "paper-style line per step", "tab:orange"),
                                    (c.ours_common, "ours", "tab:blue")):
            xs = [o.total_s if g == "total" else sum(o.steps_s.get(s, 0.0) for s in VLLM.groups[g])
                  for o, _ in pairs]
            ys = [p.total_s if g == "total" else p.groups_s[g] for _, p in pairs]
            ax.scatter(xs, ys, s=12, alpha=0.7, label=label, color=color)
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([0, hi], [0, hi], color="gray", lw=0.8)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_title(g)
        ax.set_xlabel("measured (s)")
        ax.set_ylabel("predicted (s)")
    axes.flat[-1].axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one engine start per model and tier, no report (about 1-2 min)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "coldstart-data"))
    ap.add_argument("--no-engine", action="store_true", help="only the vLLM data part")
    ap.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    result, vllm_text, head = vllm_part(Path(args.data))
    with tempfile.TemporaryDirectory(prefix="faascale-coldstart-fig-") as tmp:
        report = not (args.quick or args.no_report)
        fig_path = (FIGURES if report else Path(tmp)) / "coldstart_accuracy.png"
        figure(head, fig_path, "vLLM 0.10 starts, leave one model out, per node, rows both "
                               "designs scored: predicted vs measured")
        engine_text = ""
        if not args.no_engine:
            from benchmarks.coldstart_engine import engine_part

            engine_result, engine_text = engine_part(quick=args.quick)
            result.update(engine_result)
        result["quick"] = args.quick
        section = f"""## Cold-start prediction accuracy (`benchmarks/coldstart_accuracy.py`)

`{command_line()}` on {machine()}, at `{git_rev()}`.

### vLLM starts (the *Breaking the Ice* data, vLLM 0.10.1.1, three GPU nodes)

Leave one model out: every start is predicted by a fit on the other models only, ours and the
paper-style per-step lines fitted on the same pooling (per node: one fit per node over all its
scenarios; per scenario: one fit per campaign) and compared on the rows both scored. Totals are
the data's `total_time` (the sum of the steps); starts are the per-model means of each scenario
(5 runs each), {len(head.ours)} scored per node over {len({o.model.name for o, _ in head.ours})}
models. Every feature comes from the rows' labels and the models' metadata.

{vllm_text}

![predicted vs measured per step](figures/{fig_path.name})

{engine_text}
"""
        if report:
            write_section("coldstart_accuracy", section)
    emit(result)


if __name__ == "__main__":
    main()
