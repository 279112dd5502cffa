"""Scale-out: how fast new nodes get a model over shaped links, PipeCast vs the baselines.

On an emulated cluster (``EmulatedCluster``: network namespaces, every host's link shaped to
``--rate`` in and out), host 1 (and host 2 for K = 2) hold the model in RAM (/dev/shm) and every
other host is a target. Each algorithm runs as one process per host, all started at one shared
wall-clock time: a PipeCast node agent (``python -m faascale.pipecast.agent``) for PipeCast K=1
and K=2 (the coordinator's plans for a model in pieces: ``k_way(..., relay="chain")``, one chain
per source with rotated orders), the whole-block plans (``binomial_pipeline``, ``k_way``
binomial) run in pieces, PipeCast with whole blocks and with 1 and 16 MiB pieces (the piece-size
sweep), binary tree and naive (one source unicasts the model to each target in turn), and
``benchmarks/gloo_broadcast.py`` for
``torch.distributed`` broadcast (gloo). Agents receive into preallocated files in /dev/shm and
verify every block against the manifest; gloo receives into memory and verifies nothing.

Per run, from every target's block arrival times (seconds since the shared start):
- all hold: when every target holds every block;
- first servable: when the targets *together* hold every block (the earliest a temporary pipeline
  could serve; FaaScale's execute-while-load);
and, for reference, the physical limit (model bytes / link rate: one unicast), a measured single
unicast (host 1 -> host 2 through the agents) and a link model (each send holds both links for
size / rate per piece, no barriers: what the plan would take if only the links mattered).
Targets (issue 16): PipeCast all-hold <= 1.1 x the single unicast (and <= 0.3 x naive) at 8
nodes; with K = 2 sources, first servable <= 1.1 x model bytes / (K x link rate); from zero
with 4 nodes, first servable <= 0.35 x one node's store load.

From zero (``benchmarks/scaleout_from_zero.py``; its docstring says how it runs): 4 nodes at
``--rate``, no holder, the model in a real S3 store (Ceph RGW) on an emulated host of its own
whose link is 4 x the node rate (an object store serves many clients at once, each limited by
its own NIC: the store's link is not the bottleneck; its CPU is this machine's, shared). Three
systems (four in the full run: the ablation `from-zero-unordered` is from zero without store
first, ``admission.py``): one node's store load (host 1 alone loads the whole model from the store: the
baseline), every node loading it at once (no PipeCast), and from zero (4 PipeCast members that
hold nothing: the coordinator plans each to load a different part from the store and the rest
from the others; first servable = their blocks together cover the model, from the
coordinator's own record). Each ``--reps`` times, interleaved, best of as below; the bytes each
member took from the store (at most half the model: issue 16), CPU busy and the nodes' CPU
seconds per GB received next to them. Unlike the runs below, these allocate as blocks come
(block stores and members as on the platform): their page faults are inside the timed window.
Needs Ceph (``scripts/ensure-ceph.sh``); ``--no-from-zero`` skips it.

Repetitions: every system in a configuration runs ``--reps`` times (default 2; 1 with
``--quick``), the systems interleaved (rep 1 of every system, then rep 2, ...), and the run with
the shortest all-hold time is kept for every system alike (best of N; its first-servable time is
that same run's). Every run's all-hold time is listed too. Nothing is estimated: a system that is
not run in a configuration has no row there (naive is not run at ``--low-rate``: one repetition
is 7 unicasts in turn).

Every process allocates its destination memory before the shared start (agents: ``prepare``,
preallocated landing files with their pages faulted in; gloo: its tensors; raw TCP: one reused
buffer), so the clock measures moving bytes, not this VM's page faults.

The machine's CPU is measured during every run (/proc/stat: all cores, kernel included, as the
shaped veth links cost CPU too): a run that keeps the cores at least 85 % busy counts as
CPU-bound, not link-bound. The full run repeats the 8-node runs of the larger model at
``--low-rate`` (250 Mbit/s: a quarter of the bytes per second, so a quarter of the CPU per
second for the same work) to tell the two apart; the report prints the CPU busy it measured.

    python benchmarks/scaleout.py [--quick] [--rate 1gbit] [--low-rate 250mbit|none]
                                  [--reps N] [--models smollm2,synthetic] [--no-report]
                                  [--no-from-zero]

``--quick`` (about 5 min): SmolLM2 only, 4 nodes, every system once, and from zero once (one
node's store load and from zero, not every node at once; keys end ``_4n``); no docs section. The full run: both models at 8 nodes (every system)
and 4 nodes, both from zero (4 nodes), and the larger model at 8 nodes at ``--low-rate``.

JSON keys: unprefixed = the larger model's, ``<model>_`` = per model (e.g.
``<model>_pipecast_all_vs_unicast_8n``, ``<model>_pipecast_all_vs_naive_8n``,
``<model>_first_servable_vs_limit_k2``), ``<low-rate>_`` = the same at the low rate; the suffix
``_8n`` is the node count (``_4n`` with ``--quick``). Each ratio is a ratio of *times*, so lower
is better for the first system named:
- ``pipecast_all_vs_unicast_8n``, ``pipecast_k2_all_vs_unicast_8n``: PipeCast (K=1, K=2) all-hold
  time / the single unicast's (1 = every target as fast as one unicast; above 1 = slower; target
  <= 1.1);
- ``pipecast_all_vs_naive_8n``, ``pipecast_all_vs_gloo_8n``: PipeCast K=1 all-hold time /
  naive's, / gloo's (below 1 = PipeCast faster; target vs naive <= 0.3);
- ``pipecast_all_vs_link_model_8n``: PipeCast K=1 measured all-hold / its link model (1 = as fast
  as the links allow for that plan; above 1 = slower);
- ``no_admission_vs_admission_8n``: PipeCast K=1 without credits / with (above 1 = credits help);
- ``pieces_vs_whole_k1_8n``, ``pieces_vs_whole_k2_8n``: PipeCast all-hold in pieces / with whole
  blocks (below 1 = pieces faster);
- ``chain_vs_binomial_k1_8n``: PipeCast K=1 (chain) all-hold / the binomial pipeline's, both in
  pieces (below 1 = the chain faster);
- ``unicast_vs_limit``: single unicast time / (bytes / rate) (1 = at the physical limit; above 1
  = slower);
- ``first_servable_vs_limit_k1``, ``first_servable_vs_limit_k2``: first-servable time / (bytes /
  (K x rate)) (1 = at the limit; above 1 = slower; target for K=2 <= 1.1);
- ``from_zero_first_servable_vs_store_load_4n`` (issue 16's
  ``from_zero_first_servable_vs_store_load``, always at 4 nodes): from-zero first servable / one
  node's store load (lower = better; target <= 0.35);
  ``from_zero_first_servable_link_model_vs_limit_4n``: the same plan's first servable if only
  the links mattered / (bytes / rate) (lower = better: the floor the block sizes allow);
  ``from_zero_all_vs_store_load_4n``: from-zero all hold / one node's store load (below 1 = all
  four sooner than one alone; lower = better); ``from_zero_all_vs_store_load_all_4n``: from-zero
  all hold / every node loading on its own at once (below 1 = PipeCast faster);
  ``store_load_all_vs_store_load_4n``: every node at once / one node alone (1 = the store serves
  four as fast as one; above 1 = slower); ``store_load_vs_limit``: one node's store load /
  (bytes / rate) (1 = at the link rate; above 1 = slower).
``unicast_gbps`` and ``tcp_gbps`` are goodputs; ``cpu_busy_pipecast_8n`` a fraction;
``cpu_s_per_gb_pipecast_8n`` the K=1 agents' CPU seconds per GB received. The issue-16
targets, in the full run only (absent with ``--quick``): ``pass_all_vs_unicast`` (true when
``pipecast_all_vs_unicast_8n`` <= 1.1), ``pass_all_vs_naive`` (true when
``pipecast_all_vs_naive_8n`` <= 0.3), ``pass_first_servable_k2`` (true when
``first_servable_vs_limit_k2`` <= 1.1), ``pass_from_zero_first_servable`` (true when
``from_zero_first_servable_vs_store_load_4n`` <= 0.35). From zero also:
``from_zero_store_share_max_4n`` (the largest fraction of the model one member took from the
store; at most 0.5), ``from_zero_cpu_busy_4n``, ``from_zero_cpu_s_per_gb_4n`` (the members' CPU
seconds per GB received), ``store_load_cpu_s_per_gb`` and the times in seconds
(``store_load_s``, ``from_zero_first_servable_s_4n``, ``from_zero_all_hold_s_4n``, ...).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scaleout_from_zero as zero  # noqa: E402
from benchmarks import scaleout_from_zero_report as zero_report  # noqa: E402
from benchmarks.common import FIGURES, emit  # noqa: E402
from benchmarks.scaleout_report import figure, headline, report, rows, text  # noqa: E402
from benchmarks.scaleout_runs import (  # noqa: E402
    GB,
    NO_ADMISSION,
    QUICK_NODES,
    STATISTIC,
    TARGET_NODES,
    Bench,
    Run,
    prepare_model,
    run_cluster,
)
from faascale.pipecast.emulated import EmulatedCluster  # noqa: E402

LOW_RATE = "250mbit"  # a quarter of 1 Gbit/s: a quarter of the CPU per second for the same bytes
ALGORITHMS = ["tcp", "unicast", "pipecast-k1", "pipecast-k2", "pipecast-k1" + NO_ADMISSION,
              "pipecast-k1-whole", "pipecast-k2-whole", "pipecast-k2-p1", "pipecast-k2-p16",
              "binomial-k1", "binomial-k2", "binary-tree", "naive", "gloo"]
AT_4_NODES = ["unicast", "pipecast-k1", "pipecast-k2", "binomial-k1", "binomial-k2",
              "binary-tree", "naive", "gloo"]
# Naive is left out at the low rate: one repetition is 7 unicasts of the larger model in turn.
AT_LOW_RATE = ["tcp", "unicast", "pipecast-k1", "pipecast-k2", "pipecast-k1-whole"]


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"SmolLM2, {QUICK_NODES} nodes, every system once; no docs section")
    ap.add_argument("--rate", default="1gbit", help="link rate (tc units)")
    ap.add_argument("--low-rate", default=LOW_RATE,
                    help="full run: also the 8-node PipeCast runs at this rate ('none': skip)")
    ap.add_argument("--reps", type=int, default=None,
                    help="runs per system, the same for every system (best is kept; default 2, "
                         "1 with --quick)")
    ap.add_argument("--models", default=None, help="comma list of smollm2,synthetic")
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--no-from-zero", action="store_true",
                    help="skip the from-zero case (it needs Ceph RGW: scripts/ensure-ceph.sh)")
    args = ap.parse_args()
    ok, why = EmulatedCluster.available()
    if not ok:
        raise SystemExit(f"the emulated cluster is unavailable here: {why}")
    if not args.no_from_zero and shutil.which("radosgw") is None:
        raise SystemExit("the from-zero case needs Ceph RGW: run scripts/ensure-ceph.sh (or pass "
                         "--no-from-zero)")
    reps = args.reps or (1 if args.quick else 2)
    keys = (args.models or ("smollm2" if args.quick else "smollm2,synthetic")).split(",")
    t_start = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="faascale-scaleout-", dir="/var/tmp"))
    shm_root = Path(tempfile.mkdtemp(prefix="faascale-scaleout-", dir="/dev/shm"))
    runs: list[Run] = []
    zero_runs: list[zero.ZeroRun] = []
    low_rate = None
    try:
        models = {k: prepare_model(k, work, shm_root) for k in keys}
        print(f"models ready in {time.perf_counter() - t_start:.0f} s: " + ", ".join(
            f"{m.key} {m.nbytes / GB:.3f} GB in {len(m.block_bytes)} blocks"
            for m in models.values()), flush=True)
        bench = Bench(work, shm_root)
        if args.quick:
            runs += run_cluster(bench, QUICK_NODES, args.rate, list(models.values()),
                                ["tcp", "pipecast-k1-whole", "pipecast-k2-whole", *AT_4_NODES],
                                reps)
        else:
            runs += run_cluster(bench, 8, args.rate, list(models.values()), ALGORITHMS, reps)
            runs += run_cluster(bench, 4, args.rate, list(models.values()), AT_4_NODES, reps)
        if not args.no_from_zero:
            # --quick: the baseline and from zero only (every node at once adds half a minute)
            zero_runs = zero.run_from_zero(
                work, shm_root, list(models.values()), args.rate, reps,
                systems=(zero.STORE_LOAD, zero.FROM_ZERO) if args.quick else zero.SYSTEMS)
        low_rate = None if args.quick or args.low_rate == "none" else args.low_rate
        if low_rate:
            largest = max(models.values(), key=lambda m: m.nbytes)  # the headline model
            runs += run_cluster(bench, 8, low_rate, [largest], AT_LOW_RATE, reps)
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    table = rows(models, runs)
    zero_table = zero_report.table(zero_runs, models) if zero_runs else []
    print()
    print(text(table))
    if zero_table:
        print(f"\nFrom zero ({zero.NODES} nodes, no holder, the model in Ceph RGW on its own host):")
        print(text(zero_table))
    print(f"\nx unicast: all-hold / the measured single unicast at the same size and rate; "
          f"x limit: / (model bytes / link rate); x limit/K: first servable / (model bytes / "
          f"(K x rate)). Every system {reps} run(s), interleaved; the {STATISTIC} of {reps} (shortest "
          f"all hold) shown for every system; {elapsed:.0f} s; load average {load_before} before, "
          f"{load_after} after.")
    res = headline(runs, models, args.rate, QUICK_NODES if args.quick else TARGET_NODES)
    res |= zero_report.headline(zero_runs, models, target=not args.quick)
    if low_rate:
        res |= {f"{low_rate}_{k}": v for k, v in headline(runs, models, low_rate).items()
                if k[0].isalpha() and not k.startswith(("pass_", "headline", "bytes"))}
    res |= {"quick": args.quick, "reps": reps, "statistic": f"{STATISTIC} of {reps}",
            "rate": args.rate, "low_rate": low_rate,
            "elapsed_s": round(elapsed, 1),
            "errors": sum(len(r.errors) for r in [*runs, *zero_runs])}
    if not args.quick and not args.no_report:
        fig = FIGURES / "scaleout.png"
        has_fig = figure(runs, models, args.rate, fig)
        report(table, runs, models, res, args.rate, low_rate, reps, elapsed, load_before,
               load_after, has_fig, zero_table, zero_runs)
    emit({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})




if __name__ == "__main__":
    main()
