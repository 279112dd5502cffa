"""How well the startup-latency model predicts starts it was not fitted on.

Part 1, vLLM (the *Breaking the Ice* data, ``--data``, default ``../shared/coldstart-data``):
leave-one-model-out per machine. Each model's starts on a node are predicted by a fit on the
*other* models of that node only; MAPE and MAE of the total, per machine and overall, for

- **ours** (``faascale.coldstart.model.VLLM``: bytes over the source's bandwidth, compile cache
  hit/miss/off, active parameters, capture sizes × layers, per-setting offsets), fitted per node
  over all its scenarios, with the weights' observed source (the two page-cached Granite rows of
  the ``n1_disk`` sweep, see ``dataset.py``) and, beside it, with the sources as labelled;
- **the paper's per-step linear model** (``PAPER_BASELINE``), refitted the same way but per
  scenario, as the paper fits one campaign at a time (a scenario with one model cannot be held
  out, so its rows are compared on the common set too).

Part 2, our engine (``--engine``, on by default): real cold starts of tiny-llama, SmolLM2 and a
~0.5 GB synthetic Llama from each tier (HOST, DISK with its pages evicted, REMOTE from a local
object store), each in a fresh process (``faascale.coldstart.probe``). The same kind of model
(``OUR_ENGINE``) is fitted on one set of starts and predicts a second, independent set; and,
the harder test, leave one model out.

    python benchmarks/coldstart_accuracy.py [--quick] [--no-engine] [--no-report] [--data DIR]

Prints per-machine tables and ratios; writes the ``coldstart_accuracy`` section of
docs/benchmarks.md with a predicted-vs-measured figure per step; the last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FIGURES, ROOT, command_line, emit, git_rev, machine, write_section  # noqa: E402
from faascale.coldstart.dataset import load_dataset  # noqa: E402
from faascale.coldstart.model import (PAPER_BASELINE, VLLM, Accuracy, Observation,  # noqa: E402
                                      Prediction, accuracy, loo_by_model)

Pairs = list[tuple[Observation, Prediction]]


def per_scenario(observations: list[Observation]) -> list[Observation]:
    """The paper fits one campaign (scenario) at a time: make each scenario its own machine."""
    return [dataclasses.replace(o, setting=dataclasses.replace(o.setting, machine=o.setting.setting))
            for o in observations]


def key(o: Observation) -> tuple[str, str, str, int]:
    return (o.setting.setting, o.model.name, o.setting.weights_source, o.setting.capture_sizes)


def by_node(pairs: Pairs, nodes: dict[str, str]) -> dict[str, Accuracy]:
    groups: dict[str, Pairs] = defaultdict(list)
    for o, p in pairs:
        groups[nodes[o.setting.setting]].append((o, p))
    return {n: accuracy(v) for n, v in sorted(groups.items())}


def vllm_part(data: Path) -> tuple[dict[str, Any], str, Pairs, Pairs]:
    ds = load_dataset(data)
    labelled = load_dataset(data, relabel=False)
    nodes = {o.setting.setting: o.setting.machine for o in ds.observations}
    t0 = time.perf_counter()
    ours = loo_by_model(VLLM, ds.observations)
    fit_s = time.perf_counter() - t0
    ours_labelled = loo_by_model(VLLM, labelled.observations)
    base = loo_by_model(PAPER_BASELINE, per_scenario(ds.observations))
    common = {key(o) for o, _ in base}
    ours_common = [(o, p) for o, p in ours if key(o) in common]
    dense = [(o, p) for o, p in ours if not o.model.moe_experts]
    base_dense = [(o, p) for o, p in base if not o.model.moe_experts]
    moe = [(o, p) for o, p in ours if o.model.moe_experts]
    a, ab, ac, al = accuracy(ours), accuracy(base), accuracy(ours_common), accuracy(ours_labelled)
    ours_nodes, base_nodes = by_node(ours, nodes), by_node(base, nodes)

    lines = ["| machine | starts | ours LOO MAPE | ours MAE | paper-style LOO MAPE | paper-style MAE | ratio |",
             "|---|---|---|---|---|---|---|"]
    for n in ours_nodes:
        o, b = ours_nodes[n], base_nodes.get(n)
        lines.append(f"| {n} | {o.n} | {o.mape_pct:.2f} % | {o.mae_s:.2f} s | "
                     f"{b.mape_pct:.2f} % ({b.n}) | {b.mae_s:.2f} s | "
                     f"{o.mape_pct / b.mape_pct:.2f}× |" if b else f"| {n} | {o.n} | "
                     f"{o.mape_pct:.2f} % | {o.mae_s:.2f} s | - | - | - |")
    lines.append(f"| **all** | {a.n} | **{a.mape_pct:.2f} %** | {a.mae_s:.2f} s | "
                 f"**{ab.mape_pct:.2f} %** ({ab.n}) | {ab.mae_s:.2f} s | "
                 f"{ac.mape_pct / ab.mape_pct:.2f}× (common rows) |")
    table = "\n".join(lines)
    worst = sorted(ours, key=lambda op: -abs(op[1].total_s - op[0].total_s) / op[0].total_s)[:5]
    worst_txt = "; ".join(f"{o.model.name} on {o.setting.setting}: {p.total_s:.1f} s predicted, "
                          f"{o.total_s:.1f} s measured" for o, p in worst)
    result = {
        "loo_mape_pct": round(a.mape_pct, 3),
        "loo_mae_s": round(a.mae_s, 3),
        "loo_mape_pct_common_rows": round(ac.mape_pct, 3),
        "loo_mape_pct_as_labelled": round(al.mape_pct, 3),
        "loo_mape_pct_dense": round(accuracy(dense).mape_pct, 3),
        "loo_mape_pct_moe": round(accuracy(moe).mape_pct, 3),
        "baseline_loo_mape_pct": round(ab.mape_pct, 3),
        "baseline_loo_mape_pct_dense": round(accuracy(base_dense).mape_pct, 3),
        "baseline_loo_mae_s": round(ab.mae_s, 3),
        "loo_mape_pct_by_machine": {n: round(v.mape_pct, 3) for n, v in ours_nodes.items()},
        "baseline_loo_mape_pct_by_machine": {n: round(v.mape_pct, 3) for n, v in base_nodes.items()},
        "starts": a.n, "baseline_starts": ab.n, "fit_all_loo_s": round(fit_s, 3),
        "relabelled": [f"{r.scenario}/{r.model}" for r in ds.relabels],
    }
    print(table)
    print(f"as labelled (no source correction): ours {al.mape_pct:.2f} %; "
          f"dense only: ours {result['loo_mape_pct_dense']:.2f} %, paper-style "
          f"{result['baseline_loo_mape_pct_dense']:.2f} %; MoE: ours {result['loo_mape_pct_moe']:.2f} %")
    print("largest errors (ours):", worst_txt)
    text = (table + "\n\n" + f"As labelled (no correction of the page-cached Granite rows): ours "
            f"{al.mape_pct:.2f} %. Dense models only: ours {result['loo_mape_pct_dense']:.2f} %, "
            f"paper-style {result['baseline_loo_mape_pct_dense']:.2f} %. MoE models (Qwen1.5-MoE, "
            f"gpt-oss, Granite-4.0-H-32B): ours {result['loo_mape_pct_moe']:.2f} %. Largest "
            f"errors (ours): {worst_txt}.")
    return result, text, ours, base


def figure(ours: Pairs, base: Pairs, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*VLLM.groups, "total"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 7.5))
    for ax, g in zip(axes.flat, groups):
        for pairs, label, color in ((base, "paper-style line per step", "tab:orange"),
                                    (ours, "ours", "tab:blue")):
            xs = [o.total_s if g == "total" else sum(o.steps_s.get(s, 0.0) for s in VLLM.groups[g])
                  for o, _ in pairs]
            ys = [p.total_s if g == "total" else p.groups_s[g] for _, p in pairs]
            ax.scatter(xs, ys, s=12, alpha=0.7, label=label, color=color)
        lim = max([1e-3, *(o.total_s for o, _ in ours)]) if g == "total" else None
        lo, hi = ax.get_xlim() if lim is None else (0, lim * 1.05)
        hi = max(hi, ax.get_ylim()[1]) if g != "total" else hi
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
    ap.add_argument("--quick", action="store_true", help="fewer engine starts (< 2 min)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "coldstart-data"))
    ap.add_argument("--no-engine", action="store_true", help="only the vLLM data part")
    ap.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    result, vllm_text, ours, base = vllm_part(Path(args.data))
    fig_path = FIGURES / "coldstart_accuracy.png"
    figure(ours, base, fig_path, "vLLM 0.10 starts, leave one model out: predicted vs measured")
    engine_text = ""
    if not args.no_engine:
        from benchmarks.coldstart_engine import engine_part

        engine_result, engine_text = engine_part(quick=args.quick)
        result.update(engine_result)
    result["quick"] = args.quick
    if not args.no_report:
        write_section("coldstart_accuracy", f"""## Cold-start prediction accuracy (`benchmarks/coldstart_accuracy.py`)

`{command_line()}` on {machine()}, at `{git_rev()}`.

### vLLM starts (the *Breaking the Ice* data, vLLM 0.10.1.1, three GPU nodes)

Leave one model out: every start is predicted by a fit on the other models of its node. Totals
are the data's `total_time` (the sum of the steps); starts are the per-model means of each
scenario (5 runs each), {result['starts']} of them over 15 models.

{vllm_text}

![predicted vs measured per step](figures/{fig_path.name})

{engine_text}
""")
    emit(result)


if __name__ == "__main__":
    main()
