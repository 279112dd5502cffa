"""The replica of a function with ``engine.kind: vllm``: a vLLM OpenAI server behind our gateway.

Same contract with the gateway as ``replica.FunctionReplica`` (``generate``, ``info``,
``check_health``), same scaling (Serve, the platform's policies, scale to zero), same weights path:

1. ``spec_tokenizer``: the deployed manifest (its digest checked) and tokenizer from the store;
2. ``weight_fetch``: every block made local through the node's block store (HOST, DISK or the
   object store; pinned while the replica lives, warm for the function's keep-alive after);
3. ``hf_export``: the blocks written once per model and dtype as a Hugging Face folder in the
   node's shared memory beside the HOST tier (``<host_dir>-hf``; vLLM reads safetensors, not our
   blocks); a later replica of the model on the node finds it there (a zero-length step). The
   export stays until the platform stops (outside the HOST tier's capacity accounting);
4. the vLLM server's own start, profiled from its log as it arrives (``coldstart.vllm_follow``):
   the six *Breaking the Ice* steps and ``vllm_other`` (the rest up to ``/health``). Its log is
   kept in the state directory (``vllm_log_dir``) after the replica retires.

PipeCast does not apply: vLLM cannot serve while its weights arrive, so execute-while-load and the
temporary pipelines stay with the faascale engine (a vLLM replica still gets its blocks from the
node's tiers, which PipeCast's tier sources may have filled).

Requests are prepared here exactly as for our engine (``generation.Generation``: handler, chat
template from the packed tokenizer, ``n``, batches, echo, context checks, typed 400s) and sent to
vLLM as token ids (``vllm_client``).
"""

# ruff: noqa: E402 - the heavy imports are timed (the ``imports`` step of a start)
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

_IMPORTS_STARTED_S = time.time()

from faascale.coldstart.profile import StartupRecorder, machine_facts, model_facts, source_of
from faascale.coldstart.start_steps import cold_process_spans
from faascale.coldstart.vllm_run import (VllmProcess, VllmRunError, VllmServerConfig,
                                         resolve_python)
from faascale.engine.config import dtype_name, parse_dtype
from faascale.engine.hf_export import exported_hf_dir
from faascale.engine.llm import LLM
from faascale.engine.manifest import MANIFEST_FILE
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.node import TierConfig, node_blocks_actor, split_location
from faascale.memory_tier.packed import read_packed_metadata
from faascale.memory_tier.store import open_store
from faascale.platform import events
from faascale.platform.generation import Generation
from faascale.platform.registry import STARTUP_PROFILE
from faascale.platform.replica import _replica_id, _safe, load_handler
from faascale.platform.spec import parse_function_spec
from faascale.platform.vllm_client import VllmClient

_IMPORTS_DONE_S = time.time()
log = logging.getLogger(__name__)


def hf_cache_dir(tiers: TierConfig) -> Path:
    """Where a node keeps its Hugging Face exports: shared memory beside the HOST tier (the
    platform marks it as its own and removes it at exit)."""
    return Path(f"{tiers.host_dir}-hf")


def vllm_log_dir(tiers: TierConfig) -> Path:
    """Where a node's vLLM replicas write their logs: beside the DISK tier, in the platform's
    state directory (not in shared memory: a log must not cost RAM, and outlives its replica)."""
    return Path(tiers.disk_dir).parent / "vllm-logs"


def packed_view(manifest_json: str, tokenizer_json: str, tokenizer_file: str,
                blocks: list[tuple[str, str]], out: Path) -> Path:
    """A packed-model directory over block files held elsewhere (links into the node's tiers),
    what ``hf_export`` reads. ``blocks``: ``(file name, path)`` in block order."""
    out.mkdir(parents=True, exist_ok=True)
    for name, path in blocks:
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)
    (out / tokenizer_file).write_text(tokenizer_json)
    (out / MANIFEST_FILE).write_text(manifest_json)
    return out


def threads_bind(num_threads: int | None) -> str | None:
    """The cores vLLM's CPU worker binds: the first ``engine.num_threads`` this process may use,
    or None for all of them."""
    if not num_threads:
        return None
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:num_threads])


class VllmReplica:
    """Starts its vLLM server at construction (profiled), then streams completions from it."""

    def __init__(self, spec_doc: dict[str, Any], base_dir: str, model_dir: str,
                 tiers: dict[str, Any] | None = None, manifest_digest: str = "") -> None:
        import ray

        t0 = time.time()
        rec = self._rec = StartupRecorder()
        self._t0 = t0
        self.server: VllmProcess | None = None
        self._node_blocks = None
        self._ready_s: float | None = None
        self._first_token_reported = False
        self.manifest: Any = None
        with rec.span("spec_tokenizer") as span:
            self.spec = parse_function_spec(spec_doc, base_dir)
            self.handler = load_handler(self.spec.handler, base_dir)
            self.replica_id = _replica_id()
        vllm = self.spec.engine.vllm
        assert vllm is not None  # the spec fills the defaults for engine.kind: vllm
        if not tiers:
            raise ValueError("engine.kind: vllm replicas load through the node's tiers")
        tier_cfg = TierConfig(**tiers)
        try:
            with rec.span("spec_tokenizer") as span:
                store_uri, prefix = split_location(model_dir)
                manifest, tokenizer_json = read_packed_metadata(open_store(store_uri), prefix,
                                                                manifest_digest)
                self.manifest = manifest
                self._tokenizer_bytes = len(tokenizer_json.encode())
                tokenizer = Tokenizer(tokenizer_json, manifest.tokenizer)
                self.llm = LLM(manifest, tokenizer, [], self.spec.engine_config())  # prompts
                python = str(resolve_python())
                span["vllm_python"] = python
            self._node_blocks = node_blocks_actor(tier_cfg)
            self._manifest_json = manifest.to_json()
            with rec.span("weight_fetch", bytes=manifest.total_bytes) as span:
                placed = ray.get(self._node_blocks.fetch_model.remote(
                    self._manifest_json, model_dir, self.spec.scaling.keep_alive_s))
                self.sources = dict(Counter(source for _, source in placed))
                span["tier"] = self.sources
            dtype = dtype_name(parse_dtype(self.spec.model.dtype))
            work = self._view = hf_cache_dir(tier_cfg) / "views" / _safe(self.replica_id)
            with rec.span("hf_export", dtype=dtype) as span:
                view = packed_view(self._manifest_json, tokenizer_json, manifest.tokenizer.file,
                                   [(b.file, p) for b, (p, _) in zip(manifest.blocks, placed)],
                                   work)
                before = time.time()
                hf_dir = exported_hf_dir(view, hf_cache_dir(tier_cfg), dtype=dtype)
                span.update(dir=str(hf_dir), reused=time.time() - before < 0.05)
            shutil.rmtree(work, ignore_errors=True)  # the export is what vLLM reads
            cfg = VllmServerConfig(
                model_dir=str(hf_dir), python=python, dtype=dtype,
                max_model_len=self.spec.engine.max_seq_len, enforce_eager=vllm.enforce_eager,
                kv_cache_gib=vllm.kv_cache_gib,
                threads_bind=threads_bind(self.spec.engine.num_threads),
                served_name=self.spec.name, max_num_seqs=self.spec.engine.max_batch_size,
                gpu_memory_utilization=vllm.gpu_memory_utilization,
                cache_root=vllm.compile_cache_dir, extra_args=("--disable-uvicorn-access-log",))
            self.log_path = vllm_log_dir(tier_cfg) / f"{_safe(self.replica_id)}.log"
            self.server = VllmProcess(cfg, self.log_path)
            self.server.start()
            why = self.server.wait_ready(vllm.start_timeout_s)
            if why is not None:
                raise VllmRunError(self.server.failure(why))
            ready = self.server.ready_at_s
            assert ready is not None
            self.server.follower.stop()  # the start is over: stop reading the log
            self._add_vllm_spans(ready)
            self.client = VllmClient(self.server.base_url, self.spec.name,
                                     self.spec.engine.max_seq_len, manifest.config.vocab_size)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            events.report({"function": self.spec.name, "kind": "start_failed",
                           "at_s": time.time(), "error": error, "pid": os.getpid()})
            if self.server is not None and self.server.launched_at_s is not None:
                self._add_vllm_spans(time.time())
            self._report_profile(ok=False, error=error)
            self._shutdown()
            raise
        self._ready_s = ready
        self._report_profile()
        events.report({"function": self.spec.name, "kind": "cold_start", "at_s": ready,
                       "replica": self.replica_id, "load_s": ready - t0, "total_s": ready - t0,
                       "model_id": manifest.model_id, "bytes": manifest.total_bytes,
                       "sources": self.sources, "chosen_source": "", "warm_runtime": False,
                       "engine": "vllm", "pid": os.getpid()})

    def _add_vllm_spans(self, until_s: float) -> None:
        """vLLM's steps as parsed from its log so far, laid from its launch to ``until_s``."""
        assert self.server is not None and self.server.launched_at_s is not None
        follower = self.server.follower.follower
        try:
            follower.feed_file(self.log_path)  # whatever arrived since the last poll
        except OSError:
            pass
        self._rec.spans.extend(follower.spans(self.server.launched_at_s, until_s))

    def _report_profile(self, ok: bool = True, error: str | None = None) -> None:
        try:
            cold_process_spans(self._rec, self._t0, (_IMPORTS_STARTED_S, _IMPORTS_DONE_S))
            startup = self.server.follower.follower.startup if self.server else None
            manifest = self.manifest
            profile = self._rec.finish(
                function=self.spec.name, replica=self.replica_id,
                model_id=manifest.model_id if manifest is not None else "",
                source=source_of(getattr(self, "sources", {})),
                weight_bytes=manifest.total_bytes if manifest is not None else 0,
                machine=machine_facts(),
                model=(model_facts(manifest, getattr(self, "_tokenizer_bytes", 0))
                       if manifest is not None else {}),
                ok=ok, error=error,
                runtime={"warm": False, "engine": "vllm",
                         "vllm_log": str(getattr(self, "log_path", "")),
                         "vllm_version": startup.version if startup is not None else None,
                         "vllm_warnings": list(startup.warnings) if startup is not None else []},
                device=self.spec.device)
            self.profile = profile
            events.report({"function": self.spec.name, "kind": STARTUP_PROFILE,
                           "at_s": time.time(), "profile": profile.to_dict()})
        except Exception as exc:  # a profile must never fail a start
            log.warning("startup profile not reported: %s", exc)

    def check_health(self) -> None:
        """Serve's health check: the vLLM server process must be running."""
        server = self.server
        if server is None or not server.alive():
            raise RuntimeError(server.failure("the vLLM server exited") if server is not None
                               else "no vLLM server")

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"replica": self.replica_id, "model_id": m.model_id,
                "blocks_present": m.num_blocks, "blocks_needed": m.num_blocks,
                "route": "vllm", "running": None, "waiting": None}

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The gateway's request, prepared as for our engine and streamed from vLLM."""
        gen = Generation(self.llm, self.client, self.spec.engine.max_seq_len, self.handler,
                         self.spec.handler)
        async for chunk in gen.generate(request):
            if not self._first_token_reported and "error" not in chunk:
                self._first_token_reported = True
                now = time.time()
                events.report({"function": self.spec.name, "kind": "first_token", "at_s": now,
                               "replica": self.replica_id,
                               "after_ready_s": now - (self._ready_s or now)})
            yield chunk

    def _shutdown(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        view = getattr(self, "_view", None)
        if view is not None:  # links into the tiers and a tokenizer copy, in shared memory
            shutil.rmtree(view, ignore_errors=True)
        if self._node_blocks is not None:
            try:
                self._node_blocks.release_model.remote(self._manifest_json,
                                                       self.spec.scaling.keep_alive_s)
            except Exception:  # Ray is shutting down: the store's sweep still expires them
                pass
            self._node_blocks = None

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown: stop vLLM (its whole process group), hand the
        blocks back to the node's store (warm in HOST for the keep-alive)."""
        self._shutdown()
