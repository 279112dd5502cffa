"""The coordinator process: ``python -m faascale.pipecast.service`` (emulated cluster, benchmarks).

Arguments, the control transport, a ``Coordinator`` polled until ``--until-file`` appears or the
timeout, its ``progress()`` written to ``--record`` as it changes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from faascale.pipecast.plan_io import CONTROL_FRAME_BYTES, write_json
from faascale.pipecast.service import (DEAD_AFTER_S, HUNG_AFTER_S, JOIN_WINDOW_S, POLL_S,
                                       Coordinator)
from faascale.pipecast.transport import TransportError
from faascale.pipecast.zmq_transport import ZmqTransport


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faascale.pipecast.service",
                                description="Run a PipeCast coordinator.")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--expect", action="append", default=[], metavar="MODEL_ID:N",
                   help="a scale intent: N new replicas of MODEL_ID are coming")
    p.add_argument("--join-window-s", type=float, default=JOIN_WINDOW_S)
    p.add_argument("--dead-after-s", type=float, default=DEAD_AFTER_S)
    p.add_argument("--hung-after-s", type=float, default=HUNG_AFTER_S)
    p.add_argument("--epoch-clock", action="store_true",
                   help="time the record in epoch seconds (to compare with other processes)")
    p.add_argument("--record", type=Path, help="write progress() here (JSON) as it changes")
    p.add_argument("--until-file", type=Path, help="run until this file exists")
    p.add_argument("--timeout-s", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print ``ready <address>``, coordinate until ``--until-file`` appears or the timeout, writing
    ``--record`` every ~0.2 s and at the end. Exit 0; 2 on bad input."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(message)s")
    try:
        intents = [(mid, int(n)) for mid, _, n in (e.rpartition(":") for e in args.expect)]
        transport = ZmqTransport(secret=args.secret_file.read_bytes(), name="coordinator",
                                 bind_host=args.bind, port=args.port, recv_hwm=256,
                                 max_payload_bytes=CONTROL_FRAME_BYTES)
    except (OSError, ValueError, TransportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with transport:
        coord = Coordinator(transport, join_window_s=args.join_window_s,
                            dead_after_s=args.dead_after_s, hung_after_s=args.hung_after_s,
                            clock=time.time if args.epoch_clock else time.monotonic)
        for model_id, n in intents:
            coord.expect(model_id, n)
        print(f"ready {transport.address}", flush=True)
        deadline, written = time.monotonic() + args.timeout_s, 0.0
        while time.monotonic() < deadline and not (args.until_file and args.until_file.exists()):
            coord.poll(POLL_S)
            if args.record and time.monotonic() - written > 0.2:
                write_json(args.record, coord.progress())
                written = time.monotonic()
        if args.record:
            write_json(args.record, coord.progress())
    return 0
