"""First token while scaling out: serving through a temporary pipeline vs waiting to be full.

Issue 5's benchmark part (b), end to end with the real runtime (``pipecast.service`` and
``pipecast.member`` processes) on the emulated cluster: host 1 runs the coordinator, hosts 1..K
the replicas serving SmolLM2 (K = 1 or 2 sources), the other hosts new replicas holding nothing.
The first new one gets a request the moment it joins. Measured from the coordinator's record (one clock, epoch s),
from the plan's start:

- ``first_servable_s``: the first temporary pipeline covering the model (the union of the new
  replicas' blocks);
- ``first_token_s``: the first token of that request, made through the pipeline;
- ``full_s``: when that replica held the whole model; without PipeCast's pipelines it would wait
  for this (the baseline, measured in the same run: ``full_s`` + its own first-token time on the
  whole model, which the run also measures after the switch);
- the physical limit: model bytes / link rate (the first servable copy cannot come sooner from
  one source).

JSON keys (the headline configuration: 8 hosts, K = 1; ``_k2``: 8 hosts, K = 2):
``pipeline_first_token_vs_full_wait`` and ``pipeline_first_token_vs_full_wait_k2`` = first token
through the pipeline ÷ first token if it waited to be full (< 1: pipelines answer sooner);
``first_servable_vs_limit`` and ``first_servable_vs_limit_k2`` = first servable ÷ (model bytes /
(K x link rate)) (1 = at the physical limit, > 1 = slower). Writes the ``pipeline_ttft`` section
of docs/benchmarks.md.

    python benchmarks/pipeline_ttft.py [--quick] [--rate 1gbit] [--no-report]

``--quick``: 4 hosts, K = 2 (the case where a pipeline forms: with K = 1 the plan is a chain in
pieces and the first new replica is full as soon as the union covers the model), one run, no
report (about 1-2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, emit, git_rev, machine, write_section  # noqa: E402
from faascale.engine.checkpoint import read_manifest  # noqa: E402
from faascale.engine.sources import resolve_packed  # noqa: E402
from faascale.pipecast.emulated import EmulatedCluster, rate_bits_per_s  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."
PORT = 7400


def run_once(packed: Path, hosts: int, sources: int, rate: str, max_tokens: int, work: Path,
             shm: Path) -> dict[str, Any]:
    """One scale-out: hosts 1..``sources`` serve the model, the others start new replicas that
    land blocks in ``shm`` (their HOST tier); the first new one gets the request."""
    manifest = read_manifest(packed)
    secret, until = work / "secret", work / "stop"
    secret.write_bytes(secrets.token_bytes(32))
    record, answer = work / "record.json", work / "answer.json"
    for f in (until, record, answer):
        f.unlink(missing_ok=True)
    py = [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(work / f"h{i}.log", "w") for i in range(hosts + 1)]  # noqa: SIM115
    try:
        with EmulatedCluster(hosts, rate=rate) as c:
            procs = [c.run(1, [*py, "faascale.pipecast.service", "--bind", c.host_address(1),
                               "--port", str(PORT), "--secret-file", str(secret),
                               "--expect", f"{manifest.model_id}:{hosts - sources}",
                               "--join-window-s", "60", "--epoch-clock", "--record", str(record),
                               "--until-file", str(until)],
                           stdout=logs[0], stderr=subprocess.STDOUT, env=env)]
            member = [*py, "faascale.pipecast.member", "--model-dir", str(packed),
                      "--coordinator", f"tcp://{c.host_address(1)}:{PORT}", "--secret-file",
                      str(secret), "--until-file", str(until)]
            for i in range(1, sources + 1):
                procs.append(c.run(i, [*member, "--name", f"s{i}", "--holdings-dir",
                                       str(packed), "--bind", c.host_address(i)],
                                   stdout=logs[i], stderr=subprocess.STDOUT, env=env))
            for i in range(sources + 1, hosts + 1):
                extra = ["--prompt", PROMPT, "--max-tokens", str(max_tokens), "--out",
                         str(answer)] if i == sources + 1 else []
                procs.append(c.run(i, [*member, "--name", f"r{i}", "--bind",
                                       c.host_address(i), "--holdings-dir", str(shm / f"r{i}"),
                                       *extra],
                                   stdout=logs[i], stderr=subprocess.STDOUT, env=env))
            deadline = time.monotonic() + 600
            while True:
                done = json.loads(record.read_text()).get(manifest.model_id, {}).get(
                    "finished", []) if record.exists() else []
                if done and answer.exists():
                    break
                if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                    raise SystemExit(f"the run failed; logs in {work}")
                time.sleep(0.2)
            until.touch()
            for p in procs:
                p.wait(30)
    finally:
        for f in logs:
            f.close()
        for i in range(1, hosts + 1):
            shutil.rmtree(shm / f"r{i}", ignore_errors=True)
    events = done[0]["record"]
    out = json.loads(answer.read_text())
    t0 = events[0]["at_s"]
    # With one source the plan is a chain in pieces: the first new replica is full as soon as the
    # new replicas together hold the model, so no temporary pipeline forms (nothing to gain).
    formed = next((e["at_s"] for e in events
                   if e["kind"] == "pipelines" and e["detail"]["formed"]), None)
    served = next((e for e in events if e["kind"] == "served"), None)
    head = f"r{sources + 1}"
    full = next(e["at_s"] for e in events if e["kind"] == "full" and e["detail"]["node"] == head)
    tokens = out["tokens"]
    first = out["submitted_epoch_s"] + tokens[0]["t_s"]
    # The replica's own first-token time on the whole model: the gap between the switch to full
    # and the first token made after it (one prefill of prompt + output so far, then a decode).
    after = [t for t in tokens if t["mode"] == "full"]
    full_first_token_s = (out["submitted_epoch_s"] + after[0]["t_s"] - full) if after else None
    return {"hosts": hosts, "sources": sources, "rate": rate, "model_bytes": manifest.total_bytes,
            "first_servable_s": None if formed is None else formed - t0,
            "first_token_s": first - t0,
            "served_stages": 0 if served is None else len(served["detail"]["stages"]),
            "served_before_any_full": served is not None and served["detail"]["full_replicas"] == [],
            "full_s": full - t0, "full_first_token_s": full_first_token_s,
            "all_hold_s": done[0]["done_s"] - t0,
            "tokens_pipeline": sum(t["mode"] == "pipeline" for t in tokens),
            "tokens": len(tokens)}


def _s(x: float | None) -> str:
    return "none formed" if x is None else f"{x:.2f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _verdict(ratio: float | None) -> str:
    return "no pipeline" if ratio is None else ("**pass**" if ratio <= 1.3 else "**miss**")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 hosts, K = 2, one run")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    ok, why = EmulatedCluster.available()
    if not ok:
        raise SystemExit(f"the emulated cluster is unavailable here: {why}")
    t_start = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    packed = resolve_packed("bundled://smollm2-135m-instruct", dtype="float32", num_blocks=6)
    work = Path(tempfile.mkdtemp(prefix="faascale-pttft-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="faascale-pttft-", dir="/dev/shm"))
    shapes = [(4, 2)] if args.quick else [(4, 1), (8, 1), (8, 2)]
    runs = []
    try:
        for n, k in shapes:
            runs.append(run_once(packed, n, k, args.rate, 96, work, shm))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    link_s = runs[0]["model_bytes"] * 8 / rate_bits_per_s(args.rate)
    rows = []
    for r in runs:
        wait_full = r["full_s"] + (r["full_first_token_s"] or 0.0)
        r["first_token_if_waiting_full_s"] = wait_full
        r["vs_full_wait"] = r["first_token_s"] / wait_full
        formed = r["first_servable_s"]
        r["first_servable_vs_limit"] = (None if formed is None
                                        else formed / (link_s / r["sources"]))
        rows.append(f"| {r['hosts']} | {r['sources']} | {_s(formed)} | {r['first_token_s']:.2f} | "
                    f"{wait_full:.2f} | **{r['vs_full_wait']:.2f}x** | {r['all_hold_s']:.2f} | "
                    f"{link_s / r['sources']:.2f} | {_x(r['first_servable_vs_limit'])} | "
                    f"{r['tokens_pipeline']}/{r['tokens']} |")
    head = next((r for r in runs if r["sources"] == 1 and r["hosts"] == 8), runs[0])
    k2 = next((r for r in runs if r["sources"] == 2), None)
    result = {"pipeline_first_token_s": round(head["first_token_s"], 3),
              "first_token_if_waiting_full_s": round(head["first_token_if_waiting_full_s"], 3),
              "pipeline_first_token_vs_full_wait": round(head["vs_full_wait"], 3),
              "first_servable_vs_limit": _round(head["first_servable_vs_limit"]),
              "served_before_any_full": all(r["served_before_any_full"] for r in runs
                                            if r["sources"] > 1),
              "hosts": head["hosts"], "sources": head["sources"]}
    if k2 is not None:
        result["first_servable_vs_limit_k2"] = _round(k2["first_servable_vs_limit"])
        result["pipeline_first_token_vs_full_wait_k2"] = round(k2["vs_full_wait"], 3)
    table = ("| hosts | sources K | first servable (s) | first token via pipeline (s) | first token if it "
             "waited to be full (s) | ratio | all hold (s) | limit: bytes / (K x link) (s) | "
             "servable / limit | tokens via pipeline |\n"
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
             + "\n".join(rows))
    print(table)
    k2_text = "" if k2 is None else (
        f", {_x(k2['first_servable_vs_limit'])} with K = 2 (first token "
        f"{k2['vs_full_wait']:.2f}x of waiting to be full)")
    ratio = head["first_servable_vs_limit"]
    k2_ratio = None if k2 is None else k2["first_servable_vs_limit"]
    if not args.no_report and not args.quick:
        elapsed = time.perf_counter() - t_start
        load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        write_section("pipeline_ttft", f"""## First token while scaling out (`benchmarks/pipeline_ttft.py`)

Command: `{command_line()}` at `{git_rev()}`,
{time.strftime('%Y-%m-%d')}, {elapsed:.0f} s. Machine: {machine()}.
Load average {load_before} before, {load_after} after.

The real runtime (`pipecast/service.py`, `pipecast/member.py`, one process per host) on the emulated
cluster, links {args.rate} in and out: hosts 1..K serve SmolLM2-135M fp32
({runs[0]['model_bytes'] / 1e9:.2f} GB, 6 blocks), every other host starts a new replica with
nothing; the first new replica gets a greedy request ({PROMPT!r}, 96 tokens) as it joins. Times
from the plan's start, from the coordinator's record. "If it waited to be full" = the moment
that replica held every block + its own first-token time on the whole model (measured in the
same run after its switch). The limit is model bytes / (K x link rate): the new replicas cannot
hold a servable union sooner.

{table}

What it says: at {head['hosts']} hosts with one source {"the request is answered through a temporary pipeline of partially loaded replicas " + ("before any new replica holds the model" if head["served_before_any_full"] else "only after a new replica already held the model") if head["first_servable_s"] is not None else "no temporary pipeline forms: the plan is a chain in pieces, so the first new replica holds the model as soon as the new replicas together do, and the request waits for it"}; its first token comes
{head['vs_full_wait']:.2f}x as late as waiting to be full would make it ({"sooner" if head['vs_full_wait'] < 1 else "not sooner"}). First servable is
{_x(ratio)} the limit with K = 1{k2_text}; target ≤ 1.3x:
{_verdict(ratio)} (K = 1){"" if k2 is None else f", {_verdict(k2_ratio)} (K = 2)"}.

The floor: the new replicas together hold the model only once the sources have sent every block
once (b / K of the plan's steps), so no plan makes first servable sooner than bytes / (K x link);
the gain over waiting to be full is the plan's steps after that.
""")
    emit(result)


if __name__ == "__main__":
    main()
