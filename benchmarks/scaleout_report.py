"""The report of ``benchmarks/scaleout.py``: its runs as a table, the figure, the JSON ratios
against the issue's targets, and the docs section, every statement of which is computed from the
runs."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import scaleout_from_zero as zero
from benchmarks import scaleout_from_zero_report as zero_report
from benchmarks.common import CPU_BOUND_BUSY, command_line, git_rev, machine, write_section
from benchmarks.scaleout_runs import GB, NO_ADMISSION, STATISTIC, TARGET_NODES, Model, Run
from faascale.engine.blockio import DEFAULT_PIECE_BYTES
from faascale.pipecast.emulated import rate_bits_per_s

TARGET_ALL_VS_UNICAST, TARGET_ALL_VS_NAIVE, TARGET_FIRST_VS_LIMIT = 1.1, 0.3, 1.1  # issue 16
ORDER = ["pipecast-k1", "pipecast-k2", "pipecast-k1" + NO_ADMISSION, "pipecast-k1-whole",
         "pipecast-k2-whole", "pipecast-k2-p1", "pipecast-k2-p16", "binomial-k1", "binomial-k2",
         "binary-tree", "naive", "gloo", "unicast", "tcp"]
_MIB = 1 << 20
LABELS = {"pipecast-k1": f"PipeCast K=1 (chain, {DEFAULT_PIECE_BYTES // _MIB} MiB pieces)",
          "pipecast-k2": (f"PipeCast K=2 (2 rotated chains, {DEFAULT_PIECE_BYTES // _MIB} MiB "
                          "pieces)"),
          "pipecast-k1" + NO_ADMISSION: "PipeCast K=1 without admission (ablation)",
          "pipecast-k1-whole": "PipeCast K=1, whole blocks (ablation: no pieces)",
          "pipecast-k2-whole": "PipeCast K=2, whole blocks (ablation: no pieces)",
          "pipecast-k2-p1": "PipeCast K=2, 1 MiB pieces",
          "pipecast-k2-p16": "PipeCast K=2, 16 MiB pieces",
          "binomial-k1": "binomial pipeline K=1 (the whole-block plan, in pieces)",
          "binomial-k2": "binomial pipelines K=2 (the whole-block plan, in pieces)",
          "binary-tree": "binary tree", "naive": "naive", "gloo": "torch.distributed (gloo)",
          "unicast": "single unicast (1 target)", "tcp": "raw TCP unicast (link check)"}


def group(runs: Sequence[Run], model: str, n: int, rate: str) -> dict[str, Run]:
    return {r.algorithm: r for r in runs if (r.model, r.num_hosts, r.rate) == (model, n, rate)}


def rows(models: Mapping[str, Model], runs: Sequence[Run]) -> list[list[str]]:
    header = ["model", "nodes", "link", "algorithm", "all hold s", "x unicast", "x limit",
              "first servable s", "x limit/K", "link model s", "CPU busy", "agents CPU s",
              "agents CPU s/GB", "all hold, every run s"]
    table = [header]
    for key in dict.fromkeys(r.model for r in runs):
        m = models[key]
        for n, rate in dict.fromkeys((r.num_hosts, r.rate) for r in runs if r.model == key):
            g = group(runs, key, n, rate)
            limit_s = m.nbytes * 8 / rate_bits_per_s(rate)
            uni = g.get("unicast")
            table.append([key, str(n), rate, "physical limit (bytes / rate)", f"{limit_s:.2f}",
                          f"{limit_s / uni.all_hold_s:.2f}" if uni else "", "1.00", "", "", "",
                          "", "", "", ""])
            for name in [a for a in ORDER if a in g]:
                r = g[name]
                first_limit_s = limit_s / r.sources
                table.append([
                    key, str(n), rate, LABELS[name],
                    f"{r.all_hold_s:.2f}", f"{r.all_hold_s / uni.all_hold_s:.2f}" if uni else "",
                    f"{r.all_hold_s / limit_s:.2f}", f"{r.first_servable_s:.2f}",
                    f"{r.first_servable_s / first_limit_s:.2f}",
                    "" if r.link_model_s is None else f"{r.link_model_s:.2f}",
                    f"{r.cpu_busy:.0%}", f"{r.agent_cpu_s:.1f}",
                    "" if name == "gloo" else f"{r.cpu_s_per_gb(m.nbytes):.2f}",
                    " / ".join(f"{x:.2f}" for x in r.reps_all_hold_s)])
    return table


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in table[1:])])


def text(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)


def figure(runs: Sequence[Run], models: Mapping[str, Model], rate: str, path: Path) -> bool:
    """Block arrival per node over time, PipeCast K=1 vs naive, 8 nodes, one row per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k in models if {"pipecast-k1", "naive"} <= set(group(runs, k, 8, rate))]
    if not keys:
        return False
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        g = group(runs, key, 8, rate)
        limit_s = models[key].nbytes * 8 / rate_bits_per_s(rate)
        xmax = max(g["pipecast-k1"].all_hold_s, g["naive"].all_hold_s) * 1.03
        for ax, name in zip(row, ["pipecast-k1", "naive"]):
            r = g[name]
            num_blocks = len(models[key].block_bytes)
            for y, (node, arr) in enumerate(sorted(r.arrival_s.items())):
                for b, s in arr.items():
                    ax.scatter(s, y, c=[plt.cm.viridis(b / max(1, num_blocks - 1))], s=22,
                               marker="s", zorder=3)
            ax.axvspan(r.first_servable_s, r.all_hold_s, color="tab:orange", alpha=0.15,
                       label="temporary pipelines can serve")
            ax.axvline(r.first_servable_s, color="tab:orange", ls="--",
                       label=f"first servable {r.first_servable_s:.1f} s")
            ax.axvline(r.all_hold_s, color="tab:red", ls="-",
                       label=f"all hold {r.all_hold_s:.1f} s")
            ax.axvline(limit_s, color="gray", ls=":", label=f"bytes / rate {limit_s:.1f} s")
            ax.set_yticks(range(len(r.arrival_s)), sorted(r.arrival_s))
            ax.set_xlim(0, xmax)
            ax.set_xlabel("seconds since start")
            ax.set_title(f"{key}: {LABELS[name]}, 8 nodes, {rate}")
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Block arrival per target (colour = block index)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def headline(runs: Sequence[Run], models: Mapping[str, Model], rate: str,
             n: int = TARGET_NODES) -> dict[str, Any]:
    """Per model ratios at ``n`` nodes (prefix ``<model>_``; suffix ``_<n>n`` where the node
    count matters); the unprefixed keys are the largest model's. Directions: the module's
    docstring."""
    res: dict[str, Any] = {}
    keys = sorted(models, key=lambda k: models[k].nbytes)
    sfx = f"_{n}n"
    for key in keys:
        g8, m = group(runs, key, n, rate), models[key]
        limit_s = m.nbytes * 8 / rate_bits_per_s(rate)
        vals: dict[str, Any] = {}
        if "unicast" in g8:
            vals["unicast_vs_limit"] = g8["unicast"].all_hold_s / limit_s
            vals["unicast_gbps"] = m.nbytes * 8 / g8["unicast"].all_hold_s / 1e9
        if {"pipecast-k1", "unicast"} <= set(g8):
            vals[f"pipecast_all_vs_unicast{sfx}"] = (g8["pipecast-k1"].all_hold_s
                                                     / g8["unicast"].all_hold_s)
        if {"pipecast-k2", "unicast"} <= set(g8):
            vals[f"pipecast_k2_all_vs_unicast{sfx}"] = (g8["pipecast-k2"].all_hold_s
                                                        / g8["unicast"].all_hold_s)
        if {"pipecast-k1", "naive"} <= set(g8):
            vals[f"pipecast_all_vs_naive{sfx}"] = (g8["pipecast-k1"].all_hold_s
                                                   / g8["naive"].all_hold_s)
        if "pipecast-k2" in g8:
            vals["first_servable_vs_limit_k2"] = g8["pipecast-k2"].first_servable_s / (limit_s / 2)
        if "pipecast-k1" in g8:
            vals["first_servable_vs_limit_k1"] = g8["pipecast-k1"].first_servable_s / limit_s
            vals[f"cpu_busy_pipecast{sfx}"] = g8["pipecast-k1"].cpu_busy
            vals[f"cpu_s_per_gb_pipecast{sfx}"] = g8["pipecast-k1"].cpu_s_per_gb(m.nbytes)
        for k in ("1", "2"):
            if {f"pipecast-k{k}", f"pipecast-k{k}-whole"} <= set(g8):
                vals[f"pieces_vs_whole_k{k}{sfx}"] = (g8[f"pipecast-k{k}"].all_hold_s
                                                      / g8[f"pipecast-k{k}-whole"].all_hold_s)
        if {"pipecast-k1", "binomial-k1"} <= set(g8):
            vals[f"chain_vs_binomial_k1{sfx}"] = (g8["pipecast-k1"].all_hold_s
                                                  / g8["binomial-k1"].all_hold_s)
            vals[f"pipecast_all_vs_link_model{sfx}"] = (g8["pipecast-k1"].all_hold_s
                                                        / g8["pipecast-k1"].link_model_s)
        if "tcp" in g8:
            vals["tcp_gbps"] = m.nbytes * 8 / g8["tcp"].all_hold_s / 1e9
        if {"pipecast-k1", "pipecast-k1" + NO_ADMISSION} <= set(g8):
            vals[f"no_admission_vs_admission{sfx}"] = (g8["pipecast-k1" + NO_ADMISSION].all_hold_s
                                                       / g8["pipecast-k1"].all_hold_s)
        if {"pipecast-k1", "gloo"} <= set(g8):
            vals[f"pipecast_all_vs_gloo{sfx}"] = (g8["pipecast-k1"].all_hold_s
                                                  / g8["gloo"].all_hold_s)
        res |= {f"{key}_{k}": v for k, v in vals.items()}
        res["bytes" if key == keys[-1] else f"{key}_bytes"] = m.nbytes
        if key == keys[-1]:
            res |= vals | {"headline_model": key}
    if n != TARGET_NODES:
        return res
    if "pipecast_all_vs_unicast_8n" in res:
        res["pass_all_vs_unicast"] = res["pipecast_all_vs_unicast_8n"] <= TARGET_ALL_VS_UNICAST
    if "pipecast_all_vs_naive_8n" in res:
        res["pass_all_vs_naive"] = res["pipecast_all_vs_naive_8n"] <= TARGET_ALL_VS_NAIVE
    if "first_servable_vs_limit_k2" in res:
        res["pass_first_servable_k2"] = res["first_servable_vs_limit_k2"] <= TARGET_FIRST_VS_LIMIT
    return res



def report(table: list[list[str]], runs: Sequence[Run], models: Mapping[str, Model],
           res: Mapping[str, Any], rate: str, low_rate: str | None, reps: int, elapsed: float,
           load_before: str, load_after: str, has_fig: bool,
           zero_table: list[list[str]] | None = None,
           zero_runs: Sequence[zero.ZeroRun] = ()) -> None:
    """The docs section; every statement about a result is computed from ``runs`` / ``res``."""
    def fmt(key: str) -> str:
        return f"{res[key]:.2f}" if isinstance(res.get(key), float) else "n/a"

    def verdict(key: str) -> str:
        return "n/a" if key not in res else ("**pass**" if res[key] else "**fail**")

    def limit_s(r: Run) -> float:
        return models[r.model].nbytes * 8 / rate_bits_per_s(r.rate)

    targets = "\n".join(
        f"| {m.key} | {fmt(f'{m.key}_pipecast_all_vs_unicast_8n')} | "
        f"{fmt(f'{m.key}_pipecast_all_vs_naive_8n')} | "
        f"{fmt(f'{m.key}_first_servable_vs_limit_k2')} |" for m in models.values())
    pipecast8 = [r for r in runs if r.num_hosts == 8 and r.algorithm.startswith("pipecast")]
    cpu = "\n".join(
        f"- {r.model}, {r.rate}, {LABELS[r.algorithm]}: CPU busy {r.cpu_busy:.0%}"
        f"{' (CPU-bound: >= ' + format(CPU_BOUND_BUSY, '.0%') + ')' if r.cpu_busy >= CPU_BOUND_BUSY else ''}"
        f", measured / link model {r.all_hold_s / r.link_model_s:.2f}"
        for r in pipecast8 if r.link_model_s)
    shape = ", ".join(f"{r.link_model_s / limit_s(r):.2f}x ({r.model})" for r in pipecast8
                      if r.rate == rate and r.algorithm == "pipecast-k1" and r.link_model_s)
    sweep_lines = []
    for key in models:
        g = group(runs, key, TARGET_NODES, rate)
        default = f"{DEFAULT_PIECE_BYTES // _MIB} MiB"
        sizes = [(label, g[a]) for label, a in (("whole blocks", "pipecast-k2-whole"),
                                                ("1 MiB", "pipecast-k2-p1"),
                                                (default, "pipecast-k2"),
                                                ("16 MiB", "pipecast-k2-p16")) if a in g]
        if len(sizes) >= 2:
            fastest = min(sizes, key=lambda x: x[1].all_hold_s)
            sweep_lines.append(
                f"- {key}: " + ", ".join(
                    f"{label} {r.all_hold_s:.2f} s ({r.cpu_s_per_gb(models[key].nbytes):.2f} "
                    "CPU s/GB)" for label, r in sizes)
                + f"; shortest: {fastest[0]}")
    sweep = "\n".join(sweep_lines) or "(not run)"
    smol = models.get("smollm2")
    smol_big = "" if smol is None else (
        f" SmolLM2's first and last blocks hold its embeddings (tied, so the last block carries a "
        f"copy) and are {(smol.block_bytes[0] + smol.block_bytes[-1]) / smol.nbytes:.0%} of its "
        f"bytes.")
    rates_line = ""
    if low_rate:
        largest = max(models.values(), key=lambda m: m.nbytes).key
        k1 = {r.rate: r for r in pipecast8 if r.model == largest and r.algorithm == "pipecast-k1"}
        if {rate, low_rate} <= set(k1) and k1[rate].link_model_s and k1[low_rate].link_model_s:
            hi, lo = (k1[x].all_hold_s / k1[x].link_model_s for x in (rate, low_rate))
            trend = ("smaller at the lower rate" if lo < hi - 0.05 else
                     "larger at the lower rate" if lo > hi + 0.05 else "about the same at both rates")
            rates_line = (
                f"\n\n{largest}, PipeCast K=1, 8 nodes: measured / link model {hi:.2f} at {rate} "
                f"(CPU busy {k1[rate].cpu_busy:.0%}) and {lo:.2f} at {low_rate} (CPU busy "
                f"{k1[low_rate].cpu_busy:.0%}): the ratio is {trend}.")
    model_lines = "\n".join(f"- {m.label}: {m.nbytes / GB:.3f} GB, blocks of "
                            f"{min(m.block_bytes) / 1e6:.0f}-{max(m.block_bytes) / 1e6:.0f} MB"
                            for m in models.values())
    configs = "; ".join(
        f"{n} nodes at {r_}: {', '.join(LABELS[a] for a in algs)}"
        for n, r_, algs in dict.fromkeys(
            (r.num_hosts, r.rate, tuple(a for a in ORDER if a in group(runs, r.model, r.num_hosts, r.rate)))
            for r in runs))
    low_note = "" if not low_rate else (
        f" At {low_rate} only the larger model runs, and naive is not run there (one repetition "
        f"would be {TARGET_NODES - 1} unicasts of it in turn); nothing is estimated in its place.")
    zero_section = "" if not zero_runs or not zero_table else zero_report.section(
        zero_runs, models, res, markdown(zero_table), reps)
    write_section("scaleout", f"""## Scale-out: multicast to new nodes (`benchmarks/scaleout.py`)

Command: `{command_line()}` at `{git_rev()}`,
{time.strftime('%Y-%m-%d')}, {elapsed:.0f} s. Machine: {machine()}.
Load average {load_before} before, {load_after} after.

Emulated cluster (`faascale/pipecast/emulated.py`): network namespaces on one bridge, every host's
link shaped to {rate} in and out (htb, 50 ms byte FIFOs); host 1 (and host 2 for K=2) hold the
model in /dev/shm, every other host is a target; 8 hosts = 7 targets (6 for K=2). One process per
host, all started at one wall-clock time once every process is ready and has allocated its
destination memory. PipeCast, the binomial pipelines, binary tree, naive and the single unicast
are the same node agent (`faascale/pipecast/agent.py`) running different plans: a block moves as
pieces ({DEFAULT_PIECE_BYTES // _MIB} MiB unless the row says otherwise; the manifest lists each
piece's blake3), each landing in a preallocated /dev/shm file, verified (frame blake3 = manifest
checksum) and forwarded at once (cut-through); a node receives one block at a time in plan step
order (credits; the ablation row runs K=1 without them) and sends one at a time in step order,
with no global barrier. PipeCast K=1 and K=2 are the coordinator's plans for a model in pieces
(rotated chains); the binomial rows are its plans for whole blocks, run here in pieces. gloo =
`torch.distributed.broadcast` per block (a binomial tree over whole blocks), into memory, no
verification. Raw TCP = `sendfile` of the block files to one socket: what the link itself delivers.

Repetitions: every system in a configuration ran {reps} time(s), the systems interleaved (run 1 of
each, then run 2, ...); every row shows the {STATISTIC} of {reps} (the run with the shortest all-hold
time; its first-servable time is that run's), and the last column lists every run's all-hold time.
Configurations: {configs}.{low_note}

{model_lines}

All hold = every target holds every block; first servable = the targets together hold every block
(a temporary pipeline could serve). x unicast = / the measured single unicast (host 1 -> host 2
through the agent, same configuration); x limit = / (model bytes / link rate); x limit/K = first
servable / (model bytes / (K x link rate)). Link model = the same plan if only the links mattered:
each piece holds both ends' links for size / rate, sends in step order per node, receives in step
order per node. CPU busy = all {os.cpu_count()} cores, kernel included, over the run (the shaped
veth links, ZeroMQ, blake3 and the copies of all hosts share this machine); agents CPU s/GB =
the agents' CPU seconds per GB the targets received.

{markdown(table)}

Piece size (PipeCast K=2, 8 nodes, {rate}; all hold and CPU per GB received):

{sweep}

Targets (issue 16), 8 nodes, {rate}: PipeCast K=1 all hold <= {TARGET_ALL_VS_UNICAST} x unicast
and <= {TARGET_ALL_VS_NAIVE} x naive; K=2 first servable <= {TARGET_FIRST_VS_LIMIT} x bytes /
(2 x rate).

| model | K=1 all hold / unicast | K=1 all hold / naive | K=2 first servable / limit |
|---|---|---|---|
{targets}

Headline ({res.get('headline_model')}, the larger model): all hold vs unicast
{verdict('pass_all_vs_unicast')}, vs naive {verdict('pass_all_vs_naive')}, K=2 first servable
{verdict('pass_first_servable_k2')}.

CPU or link? 8-node PipeCast runs (a run counts as CPU-bound when the machine's CPU was at least
{CPU_BOUND_BUSY:.0%} busy over it):

{cpu}{rates_line}

The link model is computed from the plan and the block sizes alone: PipeCast K=1 to 8 nodes at
{rate} needs {shape or 'n/a'} the physical limit if only the links mattered.{smol_big}
What the link model leaves out (not measured separately here): every host's copies, hashes and
shaped veth links share the machine's {os.cpu_count()} cores (a run above
{CPU_BOUND_BUSY:.0%} busy is bound by them, not by the links); and a credit crosses the
receiver's shaped egress queue (up to 50 ms behind its own outgoing piece) before the next
sender may start.
{"" if not has_fig else chr(10) + "![scale-out block arrival](figures/scaleout.png)" + chr(10)}
{zero_section}""")
