"""A warm runtime: the fixed part of a replica start, done by a Ray worker before any replica needs it.

With the warm pool on (``faascale up``; ``warm_pool.py``), Ray imports this module into every
Python worker it starts (``preload_python_modules``), idle workers included. Importing it

- imports torch, the engine, PipeCast's member and the replica module (the ``imports`` step of a
  cold start, ~1.6 s here at full CPU), and Ray Serve's own replica module that wraps ours
  (~1.1 s more);
- runs a tiny random Llama through a real ``Engine`` (a prefill and two decode steps), so torch's
  dispatcher, oneDNN's kernels, OpenMP's thread pool and the CPU decode kernels (numba, from
  their disk cache) exist before the first model arrives
  (model-independent; the replica's own warm-up on its model follows and is shorter);
- records ``READY_S``, when this runtime was ready;
- then, while it waits, prepares every deployed model's store client, metadata and parsed
  tokenizer (``model_prep.py``), which the replica started here takes instead of reading them.

No CUDA call happens here, on purpose: Ray chooses a GPU replica's device (``CUDA_VISIBLE_DEVICES``)
only when it places the replica's actor, and the first CUDA call of a process fixes the devices it
can see, so a context created here would bind the wrong GPU. The replica creates its CUDA context
itself (a ``device_init`` span of its start).

A replica started in this process calls ``runtime_state`` to learn whether its runtime was warm:
ready before the platform ordered the replica (the last scale-up intent of its function, from the
events actor), i.e. waiting idle for work rather than started, or still importing, for this
replica. Without a recorded order, ready at least ``WARM_MIN_IDLE_S`` before the constructor.
"""

# ruff: noqa: E402 - the imports are this module's work; their time is recorded
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED_S = time.time()

import torch  # noqa: F401

import faascale.platform.replica  # noqa: F401 - the engine, tiers, PipeCast, the Serve glue
# what open_store imports on use (neither imports boto3 until an S3Store is made); a replica start
# that finds its model unprepared opens the store itself (its profile lists what it imported)
import faascale.memory_tier.local_store  # noqa: F401
import faascale.memory_tier.s3_store  # noqa: F401

log = logging.getLogger(__name__)
try:  # Ray Serve's replica actor (its module: ~1.1 s of imports here), which wraps ours, and
    # its controller's: a replica actor's constructor takes a handle to the controller, and a
    # handle's first use in a process loads the actor's class, i.e. imports its module (with
    # Serve's proxy and pydantic.v1); 60 % of that constructor's 0.18 s in a pooled worker
    # (py-spy, benchmarks/replica_start.py, 2026-12-07)
    import ray.serve._private.controller  # noqa: F401
    import ray.serve._private.replica  # noqa: F401
except Exception as _exc:  # noqa: BLE001 - a Serve that moved them: only that part stays cold
    log.warning("warm runtime: Ray Serve's replica modules not preloaded: %s", _exc)
IMPORTED_S = time.time()
# A worker started for a replica (not waiting in the pool) runs its constructor within ~0.1 s of
# this module's end at full CPU and within ~0.5 s on a 0.35-core node (measured by
# benchmarks/replica_start.py); a runtime idle for longer than this was ready before the demand.
WARM_MIN_IDLE_S = 1.0
ORDER_WINDOW_S = 600.0  # an order older than this did not order the replica starting now
WARMUP_MODEL = "random://tiny-llama"


def _warm_kernels() -> str | None:
    """A tiny random Llama through the engine, and the CPU decode kernels loaded whatever this
    worker's thread count (a replica may run more threads than the idle worker: Ray sets
    ``OMP_NUM_THREADS`` per actor); None, or why it could not run (never raises: a failed
    warm-up leaves a cold runtime, not a broken worker)."""
    try:
        from faascale.engine import cpu_decode, gemv
        from faascale.engine.config import EngineConfig
        from faascale.engine.llm import LLM
        from faascale.engine.sampling import SamplingParams
        from faascale.engine.sources import resolve_packed

        cache = Path(tempfile.gettempdir()) / f"faascale-warm-{os.getuid()}"
        packed = resolve_packed(WARMUP_MODEL, num_blocks=2, cache_dir=cache)
        llm = LLM.load(packed, EngineConfig(max_batch_size=2, max_seq_len=64, kv_block_tokens=16))
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        gemv.warm()
        cpu_decode.warm()
        return None
    except Exception as exc:  # noqa: BLE001 - the runtime stays usable, only colder
        log.warning("warm runtime: kernel warm-up failed: %s", exc)
        return f"{type(exc).__name__}: {exc}"


WARMUP_ERROR = _warm_kernels()
READY_S = time.time()


def ready_marker(pid: int) -> Path:
    """The file a runtime writes when it is ready (its ``READY_S``): how a test or an operator on
    the node tells a warm runtime from one still importing (both are idle workers to Ray)."""
    return Path(tempfile.gettempdir()) / f"faascale-warm-{os.getuid()}" / "ready" / f"{pid}"


try:
    _marker = ready_marker(os.getpid())
    _marker.parent.mkdir(parents=True, exist_ok=True)
    _marker.write_text(f"{READY_S}\n")
except OSError as _exc:  # a read-only /tmp costs only the marker
    log.warning("warm runtime: no ready marker: %s", _exc)


def prepared_marker(pid: int) -> Path:
    """The file listing the model locations runtime ``pid`` has prepared (``model_prep.py``), one
    per line: how a test or an operator sees what a start there will not read or parse."""
    return ready_marker(pid).with_suffix(".models")


def _write_prepared(locations: list[str]) -> None:
    try:
        prepared_marker(os.getpid()).write_text("".join(f"{x}\n" for x in locations))
    except OSError:
        pass


from faascale.platform import model_prep  # noqa: E402


def _in_a_ray_worker() -> bool:
    import ray

    return ray._private.worker.global_worker.mode == ray.WORKER_MODE


def named_actors() -> list[tuple[str, str]]:
    """(name, namespace) of the actors a replica start talks to: Serve's controller (from
    Serve's replica actor), the events sink and the PipeCast coordinator (from ours)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from faascale.platform import events, pipecast_actor

    return [(SERVE_CONTROLLER_NAME, SERVE_NAMESPACE), (events.ACTOR_NAME, events.NAMESPACE),
            (pipecast_actor.ACTOR_NAME, pipecast_actor.NAMESPACE)]


def load_actor_classes() -> None:
    """Take a handle to each of ``named_actors()`` once, so that this process has loaded its class
    (from the GCS, unpickled) before a replica starts here and asks for it (one not running yet
    is left for the replica)."""
    import ray

    for name, namespace in named_actors():
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:  # not started (yet)
            continue


# the deployed models' store clients, metadata and tokenizers, prepared while this runtime waits
# (in a Ray worker only: a driver that imports this module has nothing to wait for)
PREPARER = (model_prep.start_preparer(on_prepared=_write_prepared, warm_up=load_actor_classes)
            if _in_a_ray_worker() else None)


def runtime_state(constructor_s: float, ordered_s: float | None = None) -> dict[str, Any]:
    """This process's runtime as a replica constructed at ``constructor_s`` found it.

    With ``ordered_s`` (when the platform last ordered a replica of this function, at most
    ``ORDER_WINDOW_S`` before the constructor): warm if the runtime was ready before that order.
    Without it (a replica no intent ordered, e.g. the deploy's minimum): warm if it had been idle
    for at least ``WARM_MIN_IDLE_S``, which on a slow node can take a worker started for this
    replica for a warm one, hence the order is preferred."""
    idle_s = constructor_s - READY_S
    if ordered_s is not None and 0 <= constructor_s - ordered_s < ORDER_WINDOW_S:
        warm, basis = READY_S <= ordered_s, "ready before the order"
    else:
        warm, basis = idle_s >= WARM_MIN_IDLE_S, f"idle for {WARM_MIN_IDLE_S:g} s"
    return {"warm": warm and WARMUP_ERROR is None, "basis": basis, "idle_s": round(idle_s, 3),
            "ready_before_order_s": (round(ordered_s - READY_S, 3) if ordered_s is not None
                                     else None),
            "imports_s": round(IMPORTED_S - STARTED_S, 3),
            "kernel_warmup_s": round(READY_S - IMPORTED_S, 3), "warmup_error": WARMUP_ERROR}
