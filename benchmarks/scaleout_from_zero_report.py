"""The report of the from-zero case (``benchmarks/scaleout_from_zero.py``, run by
``benchmarks/scaleout.py``): the plan's link model, the JSON keys, the table and the paragraph,
every statement of which is computed from the runs.

Keys (``scaleout.py`` emits them: ``<model>_`` prefixed per model, unprefixed for the larger
model; ``_4n`` = 4 nodes, in the full run and with ``--quick`` alike). Each ratio is of times,
so lower is better for the first one named:

- ``from_zero_first_servable_vs_store_load_4n`` (issue 16's
  ``from_zero_first_servable_vs_store_load``): from-zero first servable / one node's store load
  (lower = better: the share of a lone load after which the new replicas can serve through a
  temporary pipeline; target <= 0.35, ``pass_from_zero_first_servable`` in the full run);
- ``from_zero_first_servable_link_model_vs_limit_4n``: the plan's first servable if only the
  links mattered / (model bytes / rate) (lower = better: the floor the block sizes and the plan
  allow, the ratio above with the store load at the link rate);
- ``from_zero_all_vs_store_load_4n``: from-zero all hold / one node's store load (lower =
  better; below 1 = all four hold the model sooner than one node loads it alone);
- ``from_zero_all_vs_store_load_all_4n``: from-zero all hold / every node loading the model
  from the store at once (below 1 = PipeCast from zero faster than no PipeCast);
- ``store_load_all_vs_store_load_4n``: every node loading at once / one node alone (1 = the
  store and this machine serve N readers as fast as one; above 1 = slower);
- ``store_load_vs_limit``: one node's store load / (model bytes / rate) (1 = at the node's link
  rate; above 1 = slower);
- ``from_zero_first_servable_store_first_vs_unordered_4n`` and
  ``from_zero_all_store_first_vs_unordered_4n`` (full run): from zero's first servable, and its
  all hold, / the ablation's (below 1 = store first is faster; above 1 = slower), each from the
  kept repetitions.

Also ``store_load_s``, ``store_load_all_s_4n``, ``from_zero_first_servable_s_4n``,
``from_zero_all_hold_s_4n`` (seconds), ``from_zero_store_share_max_4n`` (the largest fraction
of the model one member took from the store; at most 0.5), ``from_zero_cpu_busy_4n`` (a
fraction), ``from_zero_cpu_s_per_gb_4n`` and ``store_load_cpu_s_per_gb`` (CPU s per GB
received).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from benchmarks.common import CPU_BOUND_BUSY
from benchmarks.scaleout_from_zero import (LABELS, MAX_STORE_SHARE, NODES,
                                           STORE_LOAD, STORE_LOAD_ALL, FROM_ZERO,
                                           FROM_ZERO_UNORDERED, SYSTEMS,
                                           TARGET_FIRST_VS_STORE_LOAD, ModelLike, ZeroRun)
from faascale.engine.blockio import DEFAULT_PIECE_BYTES
from faascale.memory_tier.node import FETCH_PARALLEL_BLOCKS
from faascale.pipecast.coordinator import STORE, ScaleOutRequest, plan_scale_out
from faascale.pipecast.emulated import rate_bits_per_s
from faascale.pipecast.schedule import MulticastPlan
from faascale.pipecast.timing import Timeline, simulate


def link_model(block_bytes: Sequence[int], rate: str, nodes: int = NODES) -> Timeline:
    """The coordinator's from-zero plan (``plan_scale_out``, no holder) if only the links
    mattered: every node's link at ``rate`` both ways, the store's never the bottleneck (each
    node's loads from it come one after another, as the agent runs them, over the node's own
    link: one store sender per node in the model), pieces of ``DEFAULT_PIECE_BYTES`` forwarded
    as they land (a block loaded from the store is forwarded once whole: slightly optimistic)."""
    names = tuple(f"r{i}" for i in range(1, nodes + 1))
    plan = plan_scale_out(ScaleOutRequest("model", len(block_bytes), tuple(block_bytes), names,
                                          cut_through=True))
    moves = tuple(replace(t, src=f"{STORE}>{t.dst}") if t.src == STORE else t
                  for t in plan.transfers)
    stores = tuple(sorted({t.src for t in moves if t.src.startswith(f"{STORE}>")}))
    per_node = MulticastPlan(plan.algorithm, stores, plan.targets, plan.num_blocks, moves,
                             initial={t: frozenset() for t in plan.targets})
    return simulate(per_node, block_bytes, rate_bits_per_s(rate) / 1e9,
                    piece_bytes=DEFAULT_PIECE_BYTES)


def by_model(runs: Sequence[ZeroRun]) -> dict[str, dict[str, ZeroRun]]:
    out: dict[str, dict[str, ZeroRun]] = {}
    for r in runs:
        out.setdefault(r.model, {})[r.system] = r
    return out


def headline(runs: Sequence[ZeroRun], models: Mapping[str, ModelLike],
             target: bool = False) -> dict[str, Any]:
    """Per model (prefix ``<model>_``) and unprefixed for the largest: the from-zero times and
    ratios, the store shares and CPU. Directions: the module's docstring. With ``target`` (the
    full run), ``pass_from_zero_first_servable`` for the largest model."""
    res: dict[str, Any] = {}
    groups = by_model(runs)
    keys = sorted((k for k in groups if k in models), key=lambda k: models[k].nbytes)
    sfx = f"_{NODES}n"
    for key in keys:
        g, m = groups[key], models[key]
        vals: dict[str, Any] = {}
        one = g[STORE_LOAD].all_hold_s if STORE_LOAD in g else None
        if STORE_LOAD in g:
            vals["store_load_s"] = one
            vals["store_load_vs_limit"] = one / (m.nbytes * 8 / rate_bits_per_s(g[STORE_LOAD].rate))
            vals["store_load_cpu_s_per_gb"] = g[STORE_LOAD].cpu_s_per_gb(m.nbytes)
        if STORE_LOAD_ALL in g:
            vals[f"store_load_all_s{sfx}"] = g[STORE_LOAD_ALL].all_hold_s
            if one:
                vals["store_load_all_vs_store_load" + sfx] = g[STORE_LOAD_ALL].all_hold_s / one
        if FROM_ZERO in g:
            z = g[FROM_ZERO]
            vals[f"from_zero_first_servable_s{sfx}"] = z.first_servable_s
            vals[f"from_zero_all_hold_s{sfx}"] = z.all_hold_s
            vals[f"from_zero_store_share_max{sfx}"] = max(z.store_bytes.values()) / m.nbytes
            vals[f"from_zero_cpu_busy{sfx}"] = z.cpu_busy
            vals[f"from_zero_cpu_s_per_gb{sfx}"] = z.cpu_s_per_gb(m.nbytes)
            if one:
                vals["from_zero_first_servable_vs_store_load" + sfx] = z.first_servable_s / one
                vals["from_zero_all_vs_store_load" + sfx] = z.all_hold_s / one
            if STORE_LOAD_ALL in g:
                vals["from_zero_all_vs_store_load_all" + sfx] = (
                    z.all_hold_s / g[STORE_LOAD_ALL].all_hold_s)
            if FROM_ZERO_UNORDERED in g:
                u = g[FROM_ZERO_UNORDERED]
                vals["from_zero_first_servable_store_first_vs_unordered" + sfx] = (
                    z.first_servable_s / u.first_servable_s)
                vals["from_zero_all_store_first_vs_unordered" + sfx] = z.all_hold_s / u.all_hold_s
            model_s = link_model(m.block_bytes, z.rate).first_union_s
            if model_s is not None:
                vals["from_zero_first_servable_link_model_vs_limit" + sfx] = model_s / (
                    m.nbytes * 8 / rate_bits_per_s(z.rate))
        res |= {f"{key}_{k}": v for k, v in vals.items()}
        if key == keys[-1]:
            res |= vals
    ratio = res.get("from_zero_first_servable_vs_store_load" + sfx)
    if target and ratio is not None:
        res["pass_from_zero_first_servable"] = ratio <= TARGET_FIRST_VS_STORE_LOAD
    return res


def verdict(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return "**pass**" if ratio <= TARGET_FIRST_VS_STORE_LOAD else "**miss**"


def table(runs: Sequence[ZeroRun], models: Mapping[str, ModelLike]) -> list[list[str]]:
    """One row per model and system, after the link model's two rows; x store load = / one
    node's store load (the link model's rows: / its own, bytes / rate)."""
    header = ["model", "nodes", "link (store's)", "system", "first servable s",
              "x store load", "first pipeline s", "all hold s", "x store load",
              "from the store per node MB (share)", "store goodput per node Gbit/s", "CPU busy",
              "nodes' CPU s/GB", "store CPU s", "first servable, every run s",
              "all hold, every run s"]
    out = [header]
    for key, g in by_model(runs).items():
        m = models[key]
        base = g[STORE_LOAD].all_hold_s if STORE_LOAD in g else None
        any_run = next(iter(g.values()))
        limit_s = m.nbytes * 8 / rate_bits_per_s(any_run.rate)
        model = link_model(m.block_bytes, any_run.rate)
        blank = [""] * 7
        out.append([key, "1", any_run.rate, "link model: one node's store load (bytes / rate)",
                    f"{limit_s:.2f}", "1.00", "", f"{limit_s:.2f}", "1.00", *blank])
        if model.first_union_s is not None:
            out.append([key, str(NODES), any_run.rate,
                        "link model: from zero (the plan, if only the links mattered)",
                        f"{model.first_union_s:.2f}", f"{model.first_union_s / limit_s:.2f}", "",
                        f"{model.all_done_s:.2f}", f"{model.all_done_s / limit_s:.2f}", *blank])
        for system in SYSTEMS:
            r = g.get(system)
            if r is None:
                continue
            goodput = [x for x in (r.store_gbps(n) for n in r.store_bytes) if x is not None]
            out.append([
                key, str(r.num_nodes), f"{r.rate} ({r.store_rate})", LABELS[system],
                f"{r.first_servable_s:.2f}",
                f"{r.first_servable_s / base:.2f}" if base else "",
                "" if r.pipeline_s is None else f"{r.pipeline_s:.2f}",
                f"{r.all_hold_s:.2f}", f"{r.all_hold_s / base:.2f}" if base else "",
                ", ".join(f"{b / 1e6:.0f} ({b / m.nbytes:.0%})" for b in r.store_bytes.values()),
                ", ".join(f"{x:.2f}" for x in goodput),
                f"{r.cpu_busy:.0%}", f"{r.cpu_s_per_gb(m.nbytes):.2f}", f"{r.store_cpu_s:.1f}",
                " / ".join(f"{x:.2f}" for x in r.reps_first_servable_s),
                " / ".join(f"{x:.2f}" for x in r.reps_all_hold_s)])
    return out


def overlapped(run: ZeroRun) -> list[str]:
    """The nodes that had a block from a peer in place before the last of their blocks from the
    store (both came over the node's one link at once)."""
    out = []
    for node, arrival in run.arrival_s.items():
        mine = set(run.store_blocks.get(node, ()))
        store = [s for b, s in arrival.items() if b in mine]
        peers = [s for b, s in arrival.items() if b not in mine]
        if store and peers and min(peers) < max(store):
            out.append(node)
    return out


def section(runs: Sequence[ZeroRun], models: Mapping[str, ModelLike], res: Mapping[str, Any],
            rendered_table: str, reps: int) -> str:
    """The report's from-zero paragraph: how it ran, the table, and per model what it measured
    against the target (every figure computed from ``runs``)."""
    groups = by_model(runs)
    if not groups:
        return ""
    any_run = runs[0]
    sfx = f"_{NODES}n"
    lines = []
    for key, g in groups.items():
        m = models[key]
        one, every, z = g.get(STORE_LOAD), g.get(STORE_LOAD_ALL), g.get(FROM_ZERO)
        if one is None or z is None:
            continue
        limit_s = m.nbytes * 8 / rate_bits_per_s(z.rate)
        ratio = z.first_servable_s / one.all_hold_s
        floor = (link_model(m.block_bytes, z.rate).first_union_s or 0.0) / limit_s
        share = max(z.store_bytes.values()) / m.nbytes
        alone = one.store_gbps("h1")
        member_gbps = [x for x in (z.store_gbps(n) for n in z.store_bytes) if x is not None]
        text = (f"- {key}: from zero, first servable {z.first_servable_s:.2f} s = {ratio:.2f} x "
                f"one node's store load ({one.all_hold_s:.2f} s; {one.all_hold_s / limit_s:.2f} x "
                f"bytes / rate): {verdict(ratio)} against <= {TARGET_FIRST_VS_STORE_LOAD}. "
                f"On the links alone the plan would reach {floor:.2f} x bytes / rate. All hold "
                f"{z.all_hold_s:.2f} s = {z.all_hold_s / one.all_hold_s:.2f} x one node's store "
                "load")
        if every is not None:
            text += (f" and {z.all_hold_s / every.all_hold_s:.2f} x every node loading on its own "
                     f"({every.all_hold_s:.2f} s, {every.all_hold_s / one.all_hold_s:.2f} x one "
                     "alone)")
        bound = " (CPU-bound)" if z.cpu_busy >= CPU_BOUND_BUSY else ""
        text += (f". From the store: at most {share:.0%} of the model per member "
                 f"({'within' if share <= MAX_STORE_SHARE else 'above'} 1/2). CPU busy "
                 f"{z.cpu_busy:.0%}{bound}; the members' CPU {z.cpu_s_per_gb(m.nbytes):.2f} s per "
                 f"GB received, one node alone {one.cpu_s_per_gb(m.nbytes):.2f}.")
        unordered = g.get(FROM_ZERO_UNORDERED)
        if unordered is not None:
            text += (f" Store first off (the ablation): first servable "
                     f"{unordered.first_servable_s:.2f} s, all hold {unordered.all_hold_s:.2f} s; "
                     f"store first {z.first_servable_s / unordered.first_servable_s:.2f} x and "
                     f"{z.all_hold_s / unordered.all_hold_s:.2f} x those (below 1 = faster; "
                     "every run's in the table).")
        if ratio > TARGET_FIRST_VS_STORE_LOAD:
            why = []
            if floor > TARGET_FIRST_VS_STORE_LOAD:
                why.append(f"the plan's own floor on the links ({floor:.2f} x) is above the "
                           "target: the member with the most to load from the store needs that "
                           "long before the parts cover the model")
            if alone and member_gbps and max(member_gbps) < 0.9 * alone:
                why.append(f"each member read the store at {min(member_gbps):.2f}-"
                           f"{max(member_gbps):.2f} Gbit/s against {alone:.2f} alone, while the "
                           f"machine's {os.cpu_count()} cores were {z.cpu_busy:.0%} busy")
            early = overlapped(z)
            if early:
                why.append(f"{len(early)} of {len(z.arrival_s)} members ({', '.join(early)}) "
                           "had blocks from peers in place before their last block from the "
                           "store: their links carried both at once, so their parts of the "
                           "model came later than their store loads alone would have")
            if why:
                text += " In the way: " + "; ".join(why) + "."
        lines.append(text)
    verdict_line = ""
    ratio = res.get("from_zero_first_servable_vs_store_load" + sfx)
    if "pass_from_zero_first_servable" in res and ratio is not None:
        verdict_line = (f"\n\nHeadline (the larger model): from zero first servable "
                        f"{verdict(ratio)} ({ratio:.2f} x one node's store load, target <= "
                        f"{TARGET_FIRST_VS_STORE_LOAD}).")
    return f"""### From zero: {NODES} nodes, no holder, the model in an object store

{NODES} node hosts at {any_run.rate}; the store is Ceph RGW (one mon, one in-memory OSD,
radosgw) on an emulated host of its own whose link is {any_run.store_rate} ({NODES} x a node's:
an object store serves many clients at once, each limited by its own NIC, so the store's link
is not the bottleneck); the PipeCast coordinator runs on another host. One node's store load =
host 1 alone loads the whole model from the store through a block store of its own (built as a
PipeCast member's store loader, {FETCH_PARALLEL_BLOCKS} blocks at a time); every node = the same on
all {NODES} hosts at once (no PipeCast); from zero = {NODES} PipeCast members holding nothing,
planned by the coordinator from the store: each loads a different part from it and the rest
from the others. Times since the coordinator planned (from zero) or the shared start; first
servable = the nodes' blocks together cover the model (a temporary pipeline can serve), first
pipeline = when the coordinator formed one. Link model rows: the plan if only the links
mattered, and bytes / rate for one node. Every system ran {reps} time(s), interleaved; each row
is the best of {reps} (the shortest all hold). Store goodput = a node's bytes from the store /
when its last block from the store was in place; store CPU s = RGW, its OSD and mon over the
run. All of it shares this machine's {os.cpu_count()} cores.

{rendered_table}

{chr(10).join(lines)}{verdict_line}
"""
