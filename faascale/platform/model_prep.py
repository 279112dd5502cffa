"""Per-model state a warm runtime prepares before a replica needs it.

A replica's start reads its model's packed metadata (the manifest and ``tokenizer.json``) from the
object store, which first means creating a store client (boto3: ~1 s of CPU on a 0.35-core node),
then parses the tokenizer and compiles the chat template (~0.6 s there). None of it depends on
the replica: it depends only on the model, and the platform knows every deployed model before
any burst. So:

- the platform publishes each deployed function's model location in Ray's internal KV store
  (``publish``, from ``ServeBackend.deploy``; ``unpublish`` on delete), which every Ray process of
  the cluster can read without submitting a task (a pooled worker has no job);
- each warm runtime (``warm_runtime.py``) runs a ``Preparer`` thread while it waits: it reads the
  published locations every ``POLL_S`` and prepares each model once (``prepare``: the store client,
  the verified metadata, the parsed tokenizer with its chat template compiled), at most
  ``MAX_MODELS``; the thread ends as soon as the process becomes an actor;
- a replica constructed in that process ``take``s its model's prepared state (waiting for a
  preparation in progress rather than doing it twice), and parses nothing. A replica that finds
  none (a cold runtime, a model deployed a moment ago) reads and parses as before.

What it costs: one store client and the parsed tokenizer per deployed model in every idle
runtime (SmolLM2's: a few MB), and the two metadata GETs per model per runtime, ahead of need.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
KV_NAMESPACE = "faascale"
KV_PREFIX = "models/"  # + function name -> the packed model's location
POLL_S = 2.0
MAX_MODELS = 8  # models prepared per runtime at most (the first published, by name)
RETRY_S = 60.0  # a model whose preparation failed is tried again after this
TAKE_WAIT_S = 10.0  # a replica waits this long for its model's preparation in progress
# A worker Ray started for a waiting actor (not for the pool) is handed it within this of its
# preload's end; preparing in it would only take CPU from that actor's start.
START_DELAY_S = 1.0


@dataclass
class PreparedModel:
    """A model's state before any replica: what ``_start_with_tiers`` would read and parse."""

    location: str
    store: Any  # the open ObjectStore the metadata came from (reused by the replica)
    prefix: str
    manifest: Any  # ModelManifest
    tokenizer_json: str
    tokenizer: Any  # faascale.engine.tokenizer.Tokenizer, chat template compiled
    prepared_at_s: float  # epoch seconds, when it was ready
    prepare_s: float  # how long the preparation took
    manifest_digest: str = ""  # of the manifest read (a replica uses it only if it was deployed)


def prepare(location: str, expect_digest: str = "") -> PreparedModel:
    """Open the model's store, read and verify its metadata, parse its tokenizer, compile its
    chat template. ``expect_digest``: the deployed manifest's digest (ManifestMismatch for any
    other; without it the digest read is recorded and the taker compares). Raises what the store
    or the checkpoint raise."""
    from faascale.engine.tokenizer import Tokenizer
    from faascale.memory_tier.node import split_location
    from faascale.memory_tier.packed import read_packed_metadata_digest
    from faascale.memory_tier.store import open_store

    t0 = time.time()
    store_uri, prefix = split_location(location)
    store = open_store(store_uri)
    manifest, digest, tokenizer_json = read_packed_metadata_digest(store, prefix, expect_digest)
    tokenizer = Tokenizer(tokenizer_json, manifest.tokenizer)
    tokenizer.compile_chat_template()
    now = time.time()
    return PreparedModel(location, store, prefix, manifest, tokenizer_json, tokenizer, now,
                         now - t0, digest)


# --- the published locations (Ray's internal KV: the platform writes, runtimes read) ----------

def publish(function: str, location: str) -> None:
    """Tell every warm runtime of the cluster that ``function`` serves the model at ``location``.
    Advice only: never raises."""
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(KV_PREFIX + function, location, overwrite=True,
                                     namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - without it runtimes only prepare less
        log.warning("model location of %s not published: %s", function, exc)


def unpublish(function: str) -> None:
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(KV_PREFIX + function, namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001
        log.warning("model location of %s not unpublished: %s", function, exc)


def published_locations() -> list[str]:
    """The locations published, one per model, ordered by function name; [] without Ray."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return []
    keys = sorted(internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE))
    out: list[str] = []
    for key in keys:
        value = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if value and value.decode() not in out:
            out.append(value.decode())
    return out


def process_is_idle() -> bool:
    """This Ray worker hosts no actor yet (it waits in the pool)."""
    import ray

    return ray._private.worker.global_worker.actor_id.is_nil()


# --- the runtime's side: prepare while idle, hand over to the replica --------------------------

class Preparer:
    """Prepares the published models in this process while it is idle (a daemon thread)."""

    def __init__(self, *, locations: Callable[[], list[str]] = published_locations,
                 prepare: Callable[[str], PreparedModel] = prepare,
                 idle: Callable[[], bool] = process_is_idle, poll_s: float = POLL_S,
                 max_models: int = MAX_MODELS, start_delay_s: float = START_DELAY_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_prepared: Callable[[list[str]], None] | None = None,
                 warm_up: Callable[[], None] | None = None) -> None:
        """``warm_up``: run once, while idle, before the first model is prepared (the runtime's
        model-independent work that needs Ray, ``warm_runtime.load_actor_classes``)."""
        self._locations, self._prepare, self._idle = locations, prepare, idle
        self._warm_up = warm_up
        self.poll_s, self.max_models, self._clock = poll_s, max_models, clock
        self.start_delay_s = start_delay_s
        self._on_prepared = on_prepared  # called with the prepared locations after each change
        self._ready: dict[str, PreparedModel] = {}
        self._failed: dict[str, float] = {}  # location -> when its preparation failed
        self._busy: str | None = None  # the location being prepared now
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Preparer:
        self._thread = threading.Thread(target=self._run, name="model-prep", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        self._stop.wait(self.start_delay_s)  # a worker started for an actor gets it by then
        if self._warm_up is not None and not self._stop.is_set() and self._idle():
            try:
                self._warm_up()
            except Exception as exc:  # noqa: BLE001 - only the start it would have shortened
                log.debug("runtime warm-up failed: %s", exc)
        while not self._stop.is_set():
            try:
                if not self._idle():
                    break
                self.step()
            except Exception as exc:  # noqa: BLE001 - Ray going away: the thread just ends
                log.debug("model preparation stopped: %s", exc)
                break
            self._stop.wait(self.poll_s)
        with self._cond:
            self._busy = None
            self._cond.notify_all()

    def step(self) -> int:
        """One pass: prepare every published model not prepared yet (within ``max_models``);
        forget the ones no longer published. Returns the models prepared in this pass."""
        wanted = self._locations()[: self.max_models]
        with self._cond:
            for gone in set(self._ready) - set(wanted):
                del self._ready[gone]
        done = 0
        for location in wanted:
            if self._stop.is_set():
                break
            if not self._idle():  # the process became an actor meanwhile
                break
            with self._cond:
                failed_at = self._failed.get(location)
                if location in self._ready or (failed_at is not None
                                               and self._clock() - failed_at < RETRY_S):
                    continue
                self._busy = location
            try:
                prepared = self._prepare(location)
            except Exception as exc:  # noqa: BLE001 - the replica will read it itself
                log.warning("could not prepare %s ahead: %s", location, exc)
                with self._cond:
                    self._failed[location] = self._clock()
                    self._busy = None
                    self._cond.notify_all()
                continue
            with self._cond:
                self._ready[location] = prepared
                self._busy = None
                self._cond.notify_all()
            done += 1
            if self._on_prepared is not None:
                self._on_prepared(self.prepared())
        return done

    def take(self, location: str, wait_s: float = TAKE_WAIT_S,
             expect_digest: str = "") -> PreparedModel | None:
        """The model's prepared state, handed over (and this preparer stopped: the process is a
        replica now); waits up to ``wait_s`` for a preparation of it in progress. None if the
        model was not prepared here, or if what was prepared is not the manifest deployed
        (``expect_digest``; the replica then reads it itself and is refused)."""
        self.stop()
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._busy == location and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            prepared = self._ready.pop(location, None)
            self._ready.clear()  # the rest is for other replicas: this process will not use it
        if prepared is not None and expect_digest and prepared.manifest_digest != expect_digest:
            log.warning("%s changed since it was prepared ahead; not using it", location)
            return None
        return prepared

    def prepared(self) -> list[str]:
        with self._cond:
            return list(self._ready)


_PREPARER: Preparer | None = None


def start_preparer(**kwargs: Any) -> Preparer:
    """The process's preparer (one), started; the warm runtime calls this once it is ready."""
    global _PREPARER
    if _PREPARER is None:
        _PREPARER = Preparer(**kwargs).start()
    return _PREPARER


def take(location: str, wait_s: float = TAKE_WAIT_S,
         expect_digest: str = "") -> PreparedModel | None:
    """What this process prepared for the model at ``location`` (None in a cold runtime, or when
    it is not the deployed manifest ``expect_digest``)."""
    return (_PREPARER.take(location, wait_s, expect_digest) if _PREPARER is not None
            else None)
