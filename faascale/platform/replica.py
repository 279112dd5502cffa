"""The replica: one Serve deployment replica serving one function's model with continuous batching.

Its contract with the gateway is ``generate(request) -> async stream of dicts``: token chunks
``{"index", "text", "token_id", "finished", "finish_reason", "num_prompt_tokens",
"num_output_tokens"}`` (with log-probabilities when asked; every choice of a request merged:
``generation``), or a single ``{"error": {"status", "type", "message"}}`` item for a request it
rejects (prompt too long, bad sampling parameters, a handler that raises), sent before any token.
"""

# ruff: noqa: E402 - the heavy imports are timed (the ``imports`` step of a start)
from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

_IMPORTS_STARTED_S = time.time()  # the replica's heavy imports (torch, Ray, the engine) below

from faascale.actor_logs import timestamp_logs
from faascale.coldstart.estimate import needs_estimates, source_for_replica
from faascale.coldstart.start_source import ColdStartEstimate
from faascale.coldstart.profile import StartupRecorder, machine_facts, model_facts, source_of
from faascale.coldstart.start_steps import (PROCESS_SPAN_MAX_S, build_engine_loop,
                                            cold_process_spans, device_ready, load_packed,
                                            materialize, warm_up)
from faascale.engine.checkpoint import block_tensors
from faascale.engine.llm import LLM
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.device import DeviceLoader
from faascale.memory_tier.node import TierConfig, node_blocks_actor, split_location
from faascale.memory_tier.packed import check_manifest, download_packed, read_packed_metadata
from faascale.memory_tier.store import open_store
from faascale.memory_tier.tier_files import map_block
from faascale.pipecast.member import Member, MemberError
from faascale.platform import events, model_prep
from faascale.platform.generation import Generation, Handler
from faascale.platform.pipecast_actor import locator, pipecast_actor, use_pieces
from faascale.platform.registry import STARTUP_PROFILE
from faascale.platform.spec import parse_function_spec

_IMPORTS_DONE_S = time.time()
log = logging.getLogger(__name__)
PIPECAST_ENABLED = os.environ.get("FAASCALE_PIPECAST", "1") != "0"
# "1": copy from peers even when this node's tiers hold the model (a node whose disk is slower
# than its network; and how a one-node test makes a replica take the PipeCast path).
PREFER_PEERS_ENV = "FAASCALE_PIPECAST_PREFER_PEERS"
MEMBER_SERVABLE_TIMEOUT_S = 120.0
# The coordinator actor answers at once, or restarts within seconds (test_faults_actors.py: 5-8
# s); a start asks it for no longer than this and then loads without it.
COORDINATOR_TIMEOUT_S = 15.0


class CoordinatorUnreachable(RuntimeError):
    """The PipeCast coordinator did not answer in ``COORDINATOR_TIMEOUT_S``."""


def load_handler(ref: str | None, base_dir: str) -> Handler | None:
    """Import ``module:function`` with the function's directory first on ``sys.path``."""
    if not ref:
        return None
    module_name, _, attr = ref.partition(":")
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"handler {ref} is not callable")
    return fn


class FunctionReplica:
    """Loads the packed model at construction, then streams completions for the gateway."""

    def __init__(self, spec_doc: dict[str, Any], base_dir: str, model_dir: str,
                 tiers: dict[str, Any] | None = None, manifest_digest: str = "") -> None:
        """``manifest_digest``: the deployed manifest's (``memory_tier.packed.manifest_digest``);
        any other manifest at ``model_dir`` fails the start with ManifestMismatch ("": unbound,
        a function deployed before digests were recorded)."""
        t0 = time.time()
        timestamp_logs()
        self._modules_before = set(sys.modules)  # what this start imports: a warm runtime, none
        self._manifest_digest = manifest_digest
        rec = self._rec = StartupRecorder()
        self._t0 = t0
        self._ordered_ref = events.last_scale_up_ref(str(spec_doc.get("name") or ""))
        self.runtime: dict[str, Any] = {}
        apply_thread_count()
        with rec.span("spec_tokenizer"):  # the rest of this step is in _start_with_tiers
            self.spec = parse_function_spec(spec_doc, base_dir)
            self.handler = load_handler(self.spec.handler, base_dir)
        self.replica_id = _replica_id()
        self._node_blocks = None
        self.member: Member | None = None
        self.chosen_source = ""  # the source the cold-start estimates picked ("" if none)
        self._ready_s: float | None = None
        self._first_token_reported = False
        try:
            # Every path moves its blocks to the spec's device through this loader (zero copy
            # on a CPU, pinned staging on a GPU) and synchronises it before the start ends.
            self._loader = DeviceLoader(self.spec.device)  # DeviceUnavailableError: no such GPU
            if tiers:  # through the node's block store: HOST hits when the model is warm here
                sources = self._start_with_tiers(model_dir, TierConfig(**tiers))
            else:
                check_manifest(Path(model_dir), manifest_digest)
                self.llm = load_packed(rec, model_dir, self.spec.engine_config(), self._loader,
                                       tier="DISK")
                sources = {"DISK": self.llm.manifest.num_blocks}
                self.loop = build_engine_loop(self.llm, rec, f"engine-{self.spec.name}",
                                              background_warmup=True)
        except Exception as exc:
            # Serve retries the start; the gateway answers waiting requests with this reason
            # instead of holding them until the cold-start timeout.
            error = events.start_error(exc)
            events.report({"function": self.spec.name, "kind": "start_failed", "at_s": time.time(),
                           "error": error, "pid": os.getpid()})
            manifest = getattr(getattr(self, "llm", None), "manifest", None)
            self._report_profile(manifest, {}, ok=False, error=error)
            raise
        t_loaded = time.time()
        self._ready_s = t_loaded
        self._report_profile(self.llm.manifest, sources)  # also judges the runtime
        events.report({"function": self.spec.name, "kind": "cold_start", "at_s": t_loaded,
                       "replica": self.replica_id, "load_s": t_loaded - t0,
                       "total_s": t_loaded - t0, "model_id": self.llm.manifest.model_id,
                       "bytes": self.llm.manifest.total_bytes, "sources": sources,
                       "chosen_source": self.chosen_source,
                       "warm_runtime": bool(self.runtime.get("warm")), "pid": os.getpid()})

    def _report_profile(self, manifest: Any, sources: dict[str, int], ok: bool = True,
                        error: str | None = None) -> None:
        """The start's ``StartupProfile`` to the events actor (stored in the registry), with the
        spans before the constructor and the runtime it found (warm or cold, ``process_spans``)."""
        try:
            # every path but a PipeCast join (which serves as its blocks come) starts the
            # model's warm-up as the start ends
            self.runtime = {**process_spans(self._rec, self._t0, _resolve(self._ordered_ref)),
                            "warmup": "none" if "PEER" in sources else "background",
                            "imported": imported_since(self._modules_before)}
            tokenizer_bytes = getattr(self, "_tokenizer_bytes", 0)
            self.profile = self._rec.finish(
                function=self.spec.name, replica=getattr(self, "replica_id", "?"),
                model_id=manifest.model_id if manifest is not None else "",
                source=source_of(sources), weight_bytes=manifest.total_bytes if manifest else 0,
                machine=machine_facts(),
                model=model_facts(manifest, tokenizer_bytes) if manifest is not None else {},
                ok=ok, error=error, runtime=getattr(self, "runtime", {}),
                device=str(self._loader.device) if hasattr(self, "_loader") else "")
            events.report({"function": self.spec.name, "kind": STARTUP_PROFILE,
                           "at_s": time.time(), "profile": self.profile.to_dict()})
        except Exception as exc:  # a profile must never fail a start
            log.warning("startup profile not reported: %s", exc)

    def _start_with_tiers(self, location: str, tiers: TierConfig) -> dict[str, int]:
        """Load the model and start the engine; returns blocks per source.

        With the platform's PipeCast coordinator running: a replica whose node does not hold the
        whole model, when some replica already serves it, joins a multicast from the replicas
        that hold it and serves as soon as it can, through a temporary pipeline while it loads
        (``Member``). Otherwise it loads through the node's block store and joins as a holder, a
        source for the next replicas elsewhere."""
        import ray

        rec = self._rec
        t_spec = time.time()
        # a warm runtime read and parsed it while idle (used only if it is the deployed manifest)
        prepared = model_prep.take(location, expect_digest=self._manifest_digest)
        if prepared is not None:
            store, prefix = prepared.store, prepared.prefix
            manifest, tokenizer_json = prepared.manifest, prepared.tokenizer_json
        else:
            store_uri, prefix = split_location(location)
            store = open_store(store_uri)
            manifest, tokenizer_json = read_packed_metadata(store, prefix, self._manifest_digest)
        self._tokenizer_bytes = len(tokenizer_json.encode())
        if self.spec.scaling.load_from == "store":
            return self._start_from_store(store, prefix, manifest, tiers, t_spec)
        t_meta = time.time()
        self._node_blocks = node_blocks_actor(tiers)
        self._manifest_json = manifest.to_json()
        # ``scaling.pipecast: false`` (or FAASCALE_PIPECAST=0): plain tier loads, no multicast
        coordinator = (pipecast_actor() if PIPECAST_ENABLED and self.spec.scaling.pipecast
                       else None)
        peers_first = os.environ.get(PREFER_PEERS_ENV) == "1"
        local = (self._node_blocks.local_blocks.remote(self._manifest_json)
                 if coordinator is not None else None)
        has_source = (coordinator.has_source.remote(manifest.model_id)
                      if coordinator is not None else None)
        sink = events.sink() if coordinator is not None else None
        pins = sink.pinned.remote(self.spec.name) if sink is not None else None
        held = (self._node_blocks.model_tiers.remote(self._manifest_json)
                if coordinator is not None else None)
        t_actors = time.time()
        tokenizer = (prepared.tokenizer if prepared is not None  # else parsed while Ray answers
                     else Tokenizer(tokenizer_json, manifest.tokenizer))
        cfg = self.spec.engine_config()
        self.llm = LLM(manifest, tokenizer, [], cfg)  # prompts and the manifest; shards below
        t_end = time.time()
        # where this step's time goes: the model's metadata from the store, the actor handles
        # and the questions sent to them, the tokenizer's parse
        rec.add("spec_tokenizer", t_spec, t_end, metadata_s=round(t_meta - t_spec, 4),
                actors_s=round(t_actors - t_meta, 4), tokenizer_s=round(t_end - t_actors, 4),
                prepared_ahead=prepared is not None,
                **({"prepared_before_s": round(t_spec - prepared.prepared_at_s, 3)}
                   if prepared is not None else {}))
        self.chosen_source = (_chosen_source(sink, self.spec.name, pins, held, peers_first)
                              if sink is not None else "")
        # The estimates pick the source (the same comparison the autoscaler made, with HOST and
        # DISK meaning this node); without estimates, peers when this node lacks the model.
        use_peers = coordinator is not None and (
            self.chosen_source == "PEER" if self.chosen_source
            else peers_first or ray.get(local) < manifest.num_blocks)
        if use_peers and _answer(has_source, False, "whether a peer holds the model"):
            t_fetch = time.time()
            member = None
            try:
                member = self._join(coordinator, manifest, tokenizer, tiers, [],
                                    on_full=self._adopt, store_loader=self._store_loader(location))
                member.wait_servable(MEMBER_SERVABLE_TIMEOUT_S)
            except (MemberError, CoordinatorUnreachable) as exc:  # load the usual way
                log.warning("PipeCast could not bring the model here (%s); loading from tiers", exc)
                if member is not None:
                    member.close()
            else:
                # Servable (through a pipeline while the rest arrives) is this start's end; the
                # member moved the blocks it serves to the device (``Member._shard``).
                device = device_ready(self._loader)
                rec.add("weight_fetch", t_fetch, time.time(), tier={"PEER": manifest.num_blocks},
                        bytes=manifest.total_bytes, servable_through_pipeline=not member.full,
                        **device)
                self.member, self.loop = member, member.loop
                return {"PEER": manifest.num_blocks}
        with rec.span("weight_fetch", bytes=manifest.total_bytes) as attrs:
            placed = ray.get(self._node_blocks.fetch_model.remote(
                self._manifest_json, location, self.spec.scaling.keep_alive_s))
            sources = dict(Counter(source for _, source in placed))
            attrs["tier"] = sources
        if coordinator is not None:
            try:
                with rec.span("materialize", kv_cache_included=True) as span:
                    self.member = self._join(coordinator, manifest, tokenizer, tiers,
                                             [path for path, _ in placed])
                    span.update(device_ready(self._loader))
            except CoordinatorUnreachable as exc:  # serve alone; not a source for others
                log.warning("serving without PipeCast: %s", exc)
        if self.member is not None:
            self.loop = self.member.loop
            if self.member.full:  # a holder serves its own copy at once
                warm_up(self.loop, self.llm, wait=False)
        else:
            self.llm = materialize(rec, manifest, tokenizer, lambda: [
                block_tensors(info, map_block(Path(path)))
                for info, (path, _) in zip(manifest.blocks, placed)], cfg, self._loader)
            self.loop = build_engine_loop(self.llm, rec, f"engine-{self.spec.name}",
                                          background_warmup=True)
        return sources

    def _start_from_store(self, store: Any, prefix: str, manifest: Any, tiers: TierConfig,
                          t_spec: float) -> dict[str, int]:
        """``scaling.load_from: store``: download every block from the object store (verified,
        4 blocks in flight, as the node store fetches) into this replica's own directory in host
        memory, which no other replica reads and which goes with this replica. No node tier is
        read or filled: every start pays the store."""
        rec = self._rec
        self._private = Path(f"{tiers.host_dir}-private") / _safe(self.replica_id)
        shutil.rmtree(self._private, ignore_errors=True)
        rec.add("spec_tokenizer", t_spec, time.time())
        with rec.span("weight_fetch", tier={"REMOTE": manifest.num_blocks},
                      bytes=manifest.total_bytes):
            download_packed(store, prefix, self._private, expect_digest=self._manifest_digest)
        self.llm = load_packed(rec, self._private, self.spec.engine_config(), self._loader,
                               verify=False)  # verified as it downloaded
        self.loop = build_engine_loop(self.llm, rec, f"engine-{self.spec.name}",
                                      background_warmup=True)
        return {"REMOTE": manifest.num_blocks}

    def _store_loader(self, location: str) -> Callable[[int], Path]:
        """How this replica's PipeCast agent loads a block from the object store in a plan (a
        scale from zero shared with other new replicas): through the node's block store."""
        import ray

        def load(index: int) -> Path:
            return Path(ray.get(self._node_blocks.fetch_block.remote(
                self._manifest_json, location, index, self.spec.scaling.keep_alive_s)))
        return load

    def _join(self, coordinator: Any, manifest: Any, tokenizer: Tokenizer, tiers: TierConfig,
              held_paths: list[str], on_full: Callable[[Member], None] | None = None,
              store_loader: Callable[[int], Path] | None = None) -> Member:
        """Join PipeCast as ``self.replica_id``: with ``held_paths`` (the block files this
        replica mapped) as a holder, else as a new replica with an empty directory."""
        import ray

        try:
            contact = ray.get(coordinator.contact.remote(), timeout=COORDINATOR_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            raise CoordinatorUnreachable(f"the PipeCast coordinator did not answer within "
                                         f"{COORDINATOR_TIMEOUT_S:.0f} s ({exc})") from exc
        self._holdings = Path(f"{tiers.host_dir}-pipecast") / _safe(self.replica_id)
        shutil.rmtree(self._holdings, ignore_errors=True)
        self._holdings.mkdir(parents=True)
        for info, path in zip(manifest.blocks, held_paths):
            (self._holdings / info.file).symlink_to(path)
        member = Member(_safe(self.replica_id), manifest, tokenizer, self._holdings,
                        self.spec.engine_config(), secret=contact.secret, mover=self._loader,
                        coordinator=contact.address, bind_host=contact.bind_host(),
                        function=self.spec.name,
                        on_full=on_full, store_loader=store_loader, pieces=use_pieces())
        member.locate = locator(coordinator, COORDINATOR_TIMEOUT_S)
        return member

    def _adopt(self, member: Member) -> None:
        """PipeCast brought every block: keep them in the node's HOST tier too (warm for the
        next replica here, and after this one retires)."""
        if self._node_blocks is not None:
            paths = [str(member.agent.path(i)) for i in range(member.manifest.num_blocks)]
            self._node_blocks.adopt_model.remote(self._manifest_json, paths,
                                                 self.spec.scaling.keep_alive_s)

    def check_health(self) -> None:
        """Serve's health check (every few seconds): a replica PipeCast gave up on after it
        started serving (its sources died and nobody live holds some blocks) is unhealthy, so
        Serve replaces it with one that loads from the tiers and the object store."""
        member = self.member
        if member is not None and member.error is not None and not member.full:
            raise RuntimeError(f"PipeCast could not finish loading this replica: {member.error}")

    def info(self) -> dict[str, Any]:
        m = self.llm.manifest
        engine = self.loop.engine
        progress = self.member.progress() if self.member is not None else {
            "blocks_present": m.num_blocks, "mode": "full"}
        return {"replica": self.replica_id, "model_id": m.model_id,
                "blocks_present": progress["blocks_present"], "blocks_needed": m.num_blocks,
                "route": progress["mode"], "running": engine.num_running,
                "waiting": engine.num_waiting}

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The gateway's request: every choice's chunks, merged (``generation.Generation``)."""
        gen = Generation(self.llm, self.loop, self.spec.engine.max_seq_len, self.handler,
                         self.spec.handler)
        async for chunk in gen.generate(request):
            if (not self._first_token_reported and self._ready_s is not None
                    and "error" not in chunk):
                self._report_first_token()
            yield chunk

    def _report_first_token(self) -> None:
        """The first token this replica made after it was ready: the start's last step."""
        self._first_token_reported = True
        now = time.time()
        events.report({"function": self.spec.name, "kind": "first_token", "at_s": now,
                       "replica": self.replica_id, "after_ready_s": now - (self._ready_s or now)})

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown: stop the engine, hand the blocks back to the
        node's store, where they stay warm in HOST for the function's keep-alive."""
        member = getattr(self, "member", None)
        if member is not None:
            self.member = None
            member.close()
            shutil.rmtree(self._holdings, ignore_errors=True)  # HOST keeps its own links
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop(timeout_s=1.0)
        if getattr(self, "_private", None) is not None:  # load_from: store keeps nothing
            shutil.rmtree(self._private, ignore_errors=True)
        if getattr(self, "_node_blocks", None) is not None:
            try:
                self._node_blocks.release_model.remote(self._manifest_json,
                                                       self.spec.scaling.keep_alive_s)
            except Exception:  # Ray is shutting down: the store's sweep still expires them
                pass


def apply_thread_count() -> None:
    """torch's CPU threads as Ray assigned them (``OMP_NUM_THREADS``, set per actor from its
    ``num_cpus``). A cold worker imports torch after Ray set it; a warm runtime imported torch
    before, so without this the two would compute with different thread counts. A function's
    ``engine.num_threads`` still wins (``LLM``)."""
    import torch

    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        return
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _resolve(ref: Any, timeout_s: float = 0.5) -> Any:
    """An ObjectRef's value, or None if there is none or it does not come in time (asked at the
    constructor's start, it has had the whole start to arrive; the start must not wait on it)."""
    if ref is None:
        return None
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # the sink is busy or gone: judge the runtime without it
        log.debug("no answer from the events actor: %s", exc)
        return None


def imported_since(before: set[str], limit: int = 40) -> list[str]:
    """The packages first imported since ``before`` (``sys.modules`` then), sorted, at most
    ``limit``: the imports on a start's path, which a warm runtime should have done already."""
    new = {name.split(".")[0] if not name.startswith(("faascale.", "ray.")) else name
           for name in set(sys.modules) - before}
    return sorted(new)[:limit]


def process_spans(rec: StartupRecorder, constructor_s: float,
                  ordered_s: float | None = None) -> dict[str, Any]:
    """The spans of this start before the constructor, and the runtime it found (the profile's
    ``runtime``). A warm runtime (a pooled worker that started, imported and warmed its kernels
    before this replica was ordered, ``warm_runtime.py``) contributes zero-length ``process`` and
    ``imports`` spans: none of that was on this start's path. A cold one contributes ``process``
    (creation to the imports), ``imports`` and, when the worker ran it, ``kernel_warmup``; a
    worker reused after minutes is not a start, so spans older than PROCESS_SPAN_MAX_S are left
    out."""
    runtime_mod = sys.modules.get("faascale.platform.warm_runtime")
    if runtime_mod is not None:  # preloaded by Ray (the pool is on), warm or started on demand
        runtime = {"preloaded": True, **runtime_mod.runtime_state(constructor_s, ordered_s)}
        if runtime["warm"]:
            rec.add("process", constructor_s, constructor_s, warm=True)
            rec.add("imports", constructor_s, constructor_s, warm=True)
            return runtime
        imports = (runtime_mod.STARTED_S, runtime_mod.IMPORTED_S)
        if 0 <= constructor_s - runtime_mod.READY_S < PROCESS_SPAN_MAX_S:
            rec.add("kernel_warmup", runtime_mod.IMPORTED_S, runtime_mod.READY_S)
    else:
        runtime = {"preloaded": False, "warm": False}
        imports = (_IMPORTS_STARTED_S, _IMPORTS_DONE_S)
    cold_process_spans(rec, constructor_s, imports)
    return runtime


def _chosen_source(sink: Any, function: str, pins_ref: Any, held_ref: Any,
                   prefer_peers: bool) -> str:
    """``estimate.source_for_replica`` over the actors' answers: this node's tiers (``held_ref``),
    the function's pinned estimates (``pins_ref``) and, only where they can change the answer
    (``estimate.needs_estimates``), its computed estimates; "" if they are not there in time (the
    start must not wait on advice)."""
    import ray

    try:
        tiers = ray.get(held_ref, timeout=5.0)
        held = {"HOST": tiers["HOST"] == tiers["blocks"], "DISK": tiers["DISK"] == tiers["blocks"]}
        found = ray.get(pins_ref, timeout=5.0)
        if not found and needs_estimates(held, prefer_peers):
            found = ray.get(sink.estimates.remote(function), timeout=5.0)
    except Exception as exc:
        log.warning("no cold-start estimates (%s); choosing the source the usual way", exc)
        return ""
    return source_for_replica([ColdStartEstimate.from_dict(e) for e in found], held,
                              prefer_peers)


def _answer(ref: Any, default: Any, what: str) -> Any:
    """``ray.get(ref)`` bounded by ``COORDINATOR_TIMEOUT_S``; ``default`` (logged) when the
    actor does not answer in time or is gone."""
    import ray

    try:
        return ray.get(ref, timeout=COORDINATOR_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
        log.warning("no answer on %s within %.0f s (%s)", what, COORDINATOR_TIMEOUT_S, exc)
        return default


def _safe(replica_id: str) -> str:
    """A replica id as a PipeCast node name and a directory name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in replica_id)[:100]


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests)
        return f"local-{os.getpid()}"
