"""Timestamps on faascale's log lines inside Ray actor processes.

A Ray worker installs no handler for the ``faascale`` loggers, so their warnings reach the
worker's stderr file through Python's last-resort handler: the message alone, no time. Lines
such as "no heartbeat for 5.1 s" cannot be ordered against a request or a replica's start
without it. ``timestamp_logs`` (called by the actors' constructors: the replica, the PipeCast
coordinator, a node's tier actor) gives the ``faascale`` logger one handler with the time, the
level and the logger's name, at INFO, and stops it propagating to the root logger (which a
worker does not print). Only in a Ray worker process: a driver, a test or the platform server
keep their own logging. Idempotent per process.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_faascale_actor_handler"


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor's or a task's), not a driver."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - an older or half-initialised Ray: not a worker we know
        return False


def timestamp_logs(level: int = logging.INFO) -> logging.Handler | None:
    """In a Ray worker, install (once) and return the handler of the ``faascale`` logger;
    elsewhere None, and nothing changes."""
    if not in_ray_worker():
        return None
    logger = logging.getLogger("faascale")
    for h in logger.handlers:
        if getattr(h, _MARK, False):
            return h
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
