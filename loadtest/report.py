"""A report a person can read: the SLO summary with a figure of the load and its latencies.

Runs after Locust, in a process without gevent (the CLI's). ``write_report(prefix)`` reads
``PREFIX.json`` and ``PREFIX.records.json`` (written by the locustfile) and writes
``PREFIX.report.md`` with ``PREFIX.png`` embedded: requests sent per second, and each request's
TTFT at its send time against the target. Without matplotlib the report has no figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from loadtest.workload import RequestRecord, SloSummary, summary_markdown


def load_records(prefix: str | Path) -> list[RequestRecord]:
    data = json.loads(Path(f"{prefix}.records.json").read_text())
    return [RequestRecord(**{**r, "tbt_s": tuple(r.get("tbt_s") or ())}) for r in data]


def figure(records: list[RequestRecord], slo_ttft_s: float, path: Path, title: str) -> bool:
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
    png = prefix.with_name(prefix.name + ".png")
    text = summary_markdown(summary, title)
    if figure(records, summary.slo_ttft_s if math.isfinite(summary.slo_ttft_s) else 0, png, title):
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
