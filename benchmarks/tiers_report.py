"""The output of ``benchmarks/tiers.py`` (its docstring says what is measured and how the
figures read): the per-tier lines, the tables against the targets, the figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.tiers_measure import GB, PARALLEL_BLOCKS, Sample

if TYPE_CHECKING:
    from benchmarks.tiers import Model, TierResult

TARGETS = {"HOST": 0.8, "DISK": 0.8, "REMOTE": 0.9}  # fraction of the physical limit
SPEEDUP_TARGET = 2.0  # vs safetensors from the same tier
TIERS = ("HOST", "DISK", "REMOTE")


def report_tier(r: TierResult) -> None:
    ph = ", ".join(f"{k} {v:.3f}" for k, v in breakdown(r.ours).items())
    lim = f" (1 reader {r.limit_sequential_s:.3f} s, {PARALLEL_BLOCKS} readers {r.limit_parallel_s:.3f} s)" \
        if r.limit_parallel_s else ""
    if r.read_bw_gbps:
        lim = f" (read bandwidth {r.read_bw_gbps:.2f} GB/s)"
    print(f"  {r.label:18} ours {r.ours.seconds:7.3f} s ({ph}) | limit {r.limit_s:.3f} s{lim} | "
          f"safetensors {r.baseline_s:.3f} s | copies behind the load {r.ours.background_s:.3f} s",
          flush=True)


def breakdown(s: Sample) -> dict[str, float]:
    """The best run's wall seconds by step; inside ``fetch`` (thread-seconds over the
    PARALLEL_BLOCKS fetching threads): ``get`` (REMOTE) and ``verify`` (blake3)."""
    p = s.phases
    out = {"fetch": p.get("fetch", 0.0)}
    for k in ("get", "verify"):
        if p.get(k):
            out[f"({k})"] = p[k]
    for k in ("map", "from_blocks", "touch"):
        out[k] = p.get(k, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def table(model: Model, res: dict[str, TierResult]) -> list[str]:
    gb = model.nbytes / GB
    lines = [f"{model.label}, {gb:.3f} GB of blocks",
             f"{'tier':18}{'ours s':>9}{'GB/s':>7}{'limit s':>9}{'ours/limit':>12}{'target':>12}"
             f"{'safet. s':>10}{'speedup':>9}{'target':>12}{'behind s':>10}"]
    for t in TIERS:
        r = res[t]
        ok1 = "pass" if r.vs_limit >= TARGETS[t] else "FAIL"
        ok2 = "pass" if r.speedup >= SPEEDUP_TARGET else "FAIL"
        lines.append(f"{r.label:18}{r.ours.seconds:9.3f}{gb / r.ours.seconds:7.2f}{r.limit_s:9.3f}"
                     f"{r.vs_limit:11.0%} {'>=' + format(TARGETS[t], '.0%') + ' ' + ok1:>12}"
                     f"{r.baseline_s:10.3f}{r.speedup:8.2f}x {'>=2x ' + ok2:>12}{r.ours.background_s:10.3f}")
    return lines


def markdown_table(model: Model, res: dict[str, TierResult]) -> str:
    gb = model.nbytes / GB
    rows = ["| tier | ours s (GB/s) | physical limit s | ours / limit (target) | safetensors s | "
            "speedup (target 2x) | where ours spends its time (s) | copies behind the load s |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
    for t in TIERS:
        r = res[t]
        ph = ", ".join(f"{k} {v:.3f}" for k, v in breakdown(r.ours).items()) + f"; {r.ours.faults} faults"
        ok1 = "pass" if r.vs_limit >= TARGETS[t] else "fail"
        ok2 = "pass" if r.speedup >= SPEEDUP_TARGET else "fail"
        rows.append(f"| {r.label} | {r.ours.seconds:.3f} ({gb / r.ours.seconds:.2f}) | {r.limit_s:.3f} | "
                    f"{r.vs_limit:.0%} ({TARGETS[t]:.0%}: {ok1}) | {r.baseline_s:.3f} | "
                    f"{r.speedup:.2f}x ({ok2}) | {ph} | {r.ours.background_s:.3f} |")
    return "\n".join(rows)


def figure(models: list[Model], results: dict[str, dict[str, TierResult]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = {"faascale": "#2b6cb0", "physical limit": "#e2e8f0", "safetensors": "#a0aec0"}
    width = 0.26
    for ax, tier in zip(axes, TIERS):
        for j, (name, color) in enumerate(colors.items()):
            vals = []
            for m in models:
                r = results[m.key][tier]
                vals.append({"faascale": r.ours.seconds, "physical limit": r.limit_s,
                             "safetensors": r.baseline_s}[name])
            xs = [i + (j - 1) * width for i in range(len(models))]
            bars = ax.bar(xs, vals, width, label=name, color=color, edgecolor="#2d3748")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(models)), [f"{m.key}\n{m.nbytes / GB:.2f} GB" for m in models])
        ax.set_title(results[models[0].key][tier].label, fontsize=10)
        ax.set_ylabel("seconds to loaded + touched (lower is better)", fontsize=8)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8)
    fig.suptitle("Model load time from each tier: faascale vs physical limit vs safetensors", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
