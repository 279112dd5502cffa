"""A report a person can read: the SLO summary with a figure of the load and its latencies.

Runs after Locust, in a process without gevent (the CLI's). ``write_report(prefix)`` reads
``PREFIX.json`` and ``PREFIX.records.json`` (written by the locustfile) and writes
``PREFIX.report.md`` with ``PREFIX.png`` embedded: requests sent per second with the replicas
serving and starting (``PREFIX.replicas.jsonl``, recorded by ``faascale loadtest`` while the test
ran), and each request's TTFT at its send time against the target; and the cost, in
replica-seconds. Without matplotlib the report has no figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from loadtest.workload import (ReplicaSample, RequestRecord, SloSummary, replica_seconds,
                               summary_markdown)


def load_records(prefix: str | Path) -> list[RequestRecord]:
    data = json.loads(Path(f"{prefix}.records.json").read_text())
    return [RequestRecord(**{**r, "tbt_s": tuple(r.get("tbt_s") or ())}) for r in data]


def load_replicas(prefix: str | Path, started_epoch_s: float | None) -> list[ReplicaSample]:
    """The replicas over the test (all its functions together), times from the test's start;
    empty without a record or a start time."""
    path = Path(f"{prefix}.replicas.jsonl")
    if started_epoch_s is None or not path.exists():
        return []
    rounds: dict[float, list[int]] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            n = rounds.setdefault(float(r["epoch_s"]), [0, 0, 0])
            n[0] += int(r["running"])
            n[1] += int(r["starting"])
            n[2] += int(r.get("full", r["running"]))  # older records: every serving replica
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the test ended
    return [ReplicaSample(t - started_epoch_s, run, start, full)
            for t, (run, start, full) in sorted(rounds.items())]


def figure(records: list[RequestRecord], slo_ttft_s: float, path: Path, title: str,
           replicas: list[ReplicaSample] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if records:
        end = max(r.sent_s for r in records)
        counts = [0] * (int(end) + 1)
        for r in records:
            counts[int(r.sent_s)] += 1
        ax1.bar(range(len(counts)), counts, width=1.0, align="edge", color="tab:gray")
        ok = [r for r in records if r.error is None and r.ttft_s is not None]
        bad = [r for r in records if r.error is not None]
        ax2.scatter([r.sent_s for r in ok], [r.ttft_s for r in ok], s=8, label="TTFT")
        if bad:
            ax2.scatter([r.sent_s for r in bad], [0] * len(bad), s=14, marker="x", color="red",
                        label="failed")
    if replicas:
        ax3 = ax1.twinx()
        ax3.step([p.t_s for p in replicas], [p.running for p in replicas], where="post",
                 color="tab:blue", label="replicas serving")
        ax3.step([p.t_s for p in replicas], [p.running + p.starting for p in replicas],
                 where="post", color="tab:blue", ls="--", alpha=0.6, label="serving + starting")
        ax3.set_ylabel("replicas")
        ax3.set_ylim(0, max(p.running + p.starting for p in replicas) + 1)
        ax3.legend(fontsize=8, loc="upper right")
    ax2.axhline(slo_ttft_s, color="tab:red", lw=0.8, ls="--", label="TTFT target")
    ax1.set_ylabel("requests sent / s")
    ax2.set_ylabel("TTFT (s)")
    ax2.set_xlabel("time since the test started (s)")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(prefix: str | Path, title: str) -> Path:
    prefix = Path(prefix)
    data = json.loads(Path(f"{prefix}.json").read_text())  # the summary, and when it started
    summary = SloSummary(**{f.name: data[f.name] for f in fields(SloSummary) if f.name in data})
    records = load_records(prefix)
    replicas = load_replicas(prefix, data.get("started_epoch_s"))
    png = prefix.with_name(prefix.name + ".png")
    text = summary_markdown(summary, title)
    if replicas:
        end_s = replicas[-1].t_s
        text += (f"\nReplicas: at most {max(p.running for p in replicas)} serving; "
                 f"{replica_seconds(replicas, end_s):.0f} replica-seconds (serving + starting) "
                 f"over the {end_s:.0f} s recorded.\n")
    if figure(records, summary.slo_ttft_s if math.isfinite(summary.slo_ttft_s) else 0, png, title,
              replicas):
        text += f"\n![load and TTFT]({png.name})\n"
    per = Path(f"{prefix}.functions.json")
    if per.exists():
        text += "\n| function | requests | failed | TTFT p50 | TTFT p99 | SLO attainment |\n"
        text += "|---|---|---|---|---|---|\n"
        for fn, d in json.loads(per.read_text()).items():
            s = SloSummary(**d)
            text += (f"| {fn} | {s.requests} | {s.failed} | {s.ttft_s.get('p50', math.nan) * 1000:.0f}"
                     f" ms | {s.ttft_s.get('p99', math.nan) * 1000:.0f} ms | "
                     f"{s.slo_attainment * 100:.1f} % |\n")
    out = prefix.with_name(prefix.name + ".report.md")
    out.write_text(text)
    return out
