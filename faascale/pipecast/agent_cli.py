"""``python -m faascale.pipecast.agent``: one PipeCast node agent as its own process (see ``main``)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from faascale.pipecast.agent import NodeAgent
from faascale.pipecast.plan_io import AgentConfigError, BlockCatalog, plan_from_json, write_json
from faascale.pipecast.progress import MulticastError
from faascale.pipecast.transport import TransportError
from faascale.pipecast.zmq_transport import ZmqTransport

START_POLL_S = 0.002  # --start-file: how often to look for it (agents start within this)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m faascale.pipecast.agent",
                                 description="Run one node's part of a PipeCast multicast plan.")
    ap.add_argument("--plan", required=True, type=Path, help="plan JSON (plan_to_json)")
    ap.add_argument("--plan-id", required=True,
                    help="the run's epoch, the same for every agent of it and never reused "
                         "(e.g. random): frames of other runs, a replay of one, are refused")
    ap.add_argument("--name", required=True, help="this node's name in the plan")
    ap.add_argument("--bind", required=True, help="HOST:PORT the transport listens on")
    ap.add_argument("--peers", required=True, type=Path, help="JSON {node: tcp://host:port}")
    ap.add_argument("--blocks-dir", required=True, type=Path, help="the node's holdings")
    ap.add_argument("--model-dir", required=True, type=Path, help="a packed model (its manifest)")
    ap.add_argument("--secret-file", required=True, type=Path, help="the cluster secret")
    ap.add_argument("--local-dir", type=Path, help="the node's local tier, for local loads")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--start-at", type=float, default=0.0,
                       help="wall-clock time (epoch s) to start at, shared by all agents")
    start.add_argument("--start-file", type=Path,
                       help="wait for this file, then start at the epoch time it holds (for a "
                            "launcher that starts everyone once all agents print ready)")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--no-admission", action="store_true",
                    help="send without the receivers' credits (measurements only; all agents)")
    ap.add_argument("--report", required=True, type=Path, help="where to write the JSON report")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Bind, prepare (part files), print ``ready <address>``, wait for ``--start-at`` (or the
    time in ``--start-file``), execute, write the report:
    ``{"report": AgentReport, "start_epoch_s", "cpu_s", "error"}``. Exit 0 if the node's part
    completed, 1 on MulticastError (report written too), 2 on bad input."""
    args = _parse_args(argv)
    _keep_freed_memory()
    try:
        plan = plan_from_json(args.plan.read_text())
        peers = json.loads(args.peers.read_text())
        catalog = BlockCatalog.read(args.model_dir)
        host, _, port = args.bind.rpartition(":")
        transport = ZmqTransport(secret=args.secret_file.read_bytes(), name=args.name,
                                 bind_host=host, port=int(port), epochs_only=True,
                                 max_payload_bytes=catalog.max_frame_bytes)
        transport.open_epoch(args.plan_id)  # before ready: a faster peer's credits are taken
    except (AgentConfigError, OSError, ValueError, TransportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with transport:
        agent = NodeAgent(args.name, transport, catalog, args.blocks_dir,
                          local_dir=args.local_dir, admission=not args.no_admission)
        try:
            agent.prepare(plan)
        except (AgentConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ready {transport.address}", flush=True)
        start_at = _start_time(args)
        if start_at is None:
            print(f"error: {args.start_file} did not appear in {args.timeout_s} s",
                  file=sys.stderr)
            return 2
        time.sleep(max(0.0, start_at - time.time()))
        start_epoch_s, cpu0 = time.time(), _cpu_s()
        error = None
        try:
            report = agent.execute(plan, peers, args.timeout_s, args.plan_id)
        except MulticastError as e:
            report, error = e.report, str(e)
        except AgentConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = {"report": json.loads(report.to_json()), "start_epoch_s": start_epoch_s,
               "cpu_s": _cpu_s() - cpu0, "error": error}
    write_json(args.report, out)
    return 1 if error else 0


def _start_time(args: argparse.Namespace) -> float | None:
    """The shared start (epoch s); None if ``--start-file`` did not appear within the timeout."""
    if args.start_file is None:
        return args.start_at
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:  # a poll: the launcher writes it once (atomically)
        with contextlib.suppress(OSError, ValueError):
            return float(args.start_file.read_text())
        time.sleep(START_POLL_S)
    return None


def _keep_freed_memory() -> None:
    """Let freed large allocations stay in the heap. libzmq receives every block into a fresh
    malloc'd message; glibc serves sizes above 32 MiB with mmap and unmaps them on free, so each
    block landed in new pages: a fault per 4 KiB (a 1 GB model cost the receiver 0.7 s more CPU,
    2.6 s instead of 1.9 s, measured on 1 Gbit/s emulated links). Linux glibc only; else a no-op."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_MAX, 0)  # big allocations from the heap ...
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ... which is not trimmed after a free
    except (OSError, AttributeError):
        pass


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (ZeroMQ's I/O thread and blake3's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
