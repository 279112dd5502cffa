"""The replica: one Serve deployment replica serving one function's model with continuous batching.

Its contract with the gateway is ``generate(request) -> async stream of dicts``: token chunks
``{"text", "token_id", "finished", "finish_reason", "num_prompt_tokens", "num_output_tokens"}``,
or a single ``{"error": {"status", "type", "message"}}`` item for a request it rejects (prompt too
long, bad sampling parameters, a handler that raises), sent before any token.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from faascale.engine.checkpoint import block_tensors
from faascale.engine.engine import PromptTooLongError
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.sampling import SamplingParams, SamplingParamsError
from faascale.engine.tokenizer import ChatTemplateError, Tokenizer
from faascale.memory_tier.block_store import map_block
from faascale.memory_tier.node import TierConfig, node_blocks_actor, split_location
from faascale.memory_tier.object_store import open_store, read_packed_metadata
from faascale.platform import events
from faascale.platform.spec import parse_function_spec

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class HandlerError(Exception):
    """The function's handler raised or returned something that is not a request."""


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


def _error(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "type": kind, "message": message}}


class FunctionReplica:
    """Loads the packed model at construction, then streams completions for the gateway."""

    def __init__(self, spec_doc: dict[str, Any], base_dir: str, model_dir: str,
                 tiers: dict[str, Any] | None = None) -> None:
        t0 = time.time()
        self.spec = parse_function_spec(spec_doc, base_dir)
        self.handler = load_handler(self.spec.handler, base_dir)
        self._node_blocks = None
        try:
            if tiers:  # through the node's block store: HOST hits when the model is warm here
                self.llm, sources = self._load_through_tiers(model_dir, TierConfig(**tiers))
            else:
                self.llm = LLM.load(model_dir, self.spec.engine_config())
                sources = {"DISK": self.llm.manifest.num_blocks}
        except Exception as exc:
            # Serve retries the start; the gateway answers waiting requests with this reason
            # instead of holding them until the cold-start timeout.
            events.report({"function": self.spec.name, "kind": "start_failed", "at_s": time.time(),
                           "error": f"{type(exc).__name__}: {exc}", "pid": os.getpid()})
            raise
        t_loaded = time.time()
        self.loop = EngineLoop(self.llm.new_engine(), name=f"engine-{self.spec.name}")
        self.replica_id = _replica_id()
        events.report({"function": self.spec.name, "kind": "cold_start", "at_s": time.time(),
                       "replica": self.replica_id, "load_s": t_loaded - t0,
                       "total_s": time.time() - t0, "model_id": self.llm.manifest.model_id,
                       "bytes": self.llm.manifest.total_bytes, "sources": sources,
                       "pid": os.getpid()})

    def _load_through_tiers(self, location: str, tiers: TierConfig) -> tuple[LLM, dict[str, int]]:
        import ray

        store_uri, prefix = split_location(location)
        manifest, tokenizer_json = read_packed_metadata(open_store(store_uri), prefix)
        self._node_blocks = node_blocks_actor(tiers)
        placing = self._node_blocks.fetch_model.remote(
            manifest.to_json(), location, self.spec.scaling.keep_alive_s)
        tokenizer = Tokenizer(tokenizer_json, manifest.tokenizer)  # parsed while blocks arrive
        placed = ray.get(placing)
        self._manifest_json = manifest.to_json()
        blocks = [block_tensors(info, map_block(Path(path)))
                  for info, (path, _) in zip(manifest.blocks, placed)]
        llm = LLM.from_blocks(manifest, tokenizer, blocks, self.spec.engine_config())
        return llm, dict(Counter(source for _, source in placed))

    def info(self) -> dict[str, Any]:
        m = self.llm.manifest
        engine = self.loop.engine
        return {"replica": self.replica_id, "model_id": m.model_id, "blocks_present": m.num_blocks,
                "blocks_needed": m.num_blocks, "running": engine.num_running,
                "waiting": engine.num_waiting}

    def _prepare(self, request: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        if self.handler is not None:
            try:
                request = self.handler(dict(request))
            except Exception as exc:
                raise HandlerError(f"handler {self.spec.handler} failed: {exc}") from None
            if not isinstance(request, dict):
                raise HandlerError(f"handler {self.spec.handler} must return a dict")
        params = SamplingParams(**{**request.get("params", {}),
                                   "stop": tuple(request.get("params", {}).get("stop") or ())})
        if request.get("messages") is not None:
            ids = self.llm.prompt_ids(request["messages"])
        elif request.get("prompt_ids") is not None:
            ids = self.llm.prompt_ids([int(t) for t in request["prompt_ids"]])
        else:
            ids = self.llm.prompt_ids(str(request.get("prompt", "")))
        return ids, params

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            ids, params = self._prepare(request)
            stream = self.loop.asubmit(ids, params)
        except PromptTooLongError as exc:
            yield _error(400, "context_length_exceeded", str(exc))
            return
        except (SamplingParamsError, ChatTemplateError, ValueError, TypeError) as exc:
            yield _error(400, "invalid_request", str(exc))
            return
        except HandlerError as exc:
            yield _error(422, "handler_error", str(exc))
            return
        async for out in stream:
            yield {"text": out.text, "token_id": out.token_id, "finished": out.finished,
                   "finish_reason": out.finish_reason, "num_prompt_tokens": out.num_prompt_tokens,
                   "num_output_tokens": out.num_output_tokens}

    def __del__(self) -> None:
        """Serve calls this on graceful shutdown: stop the engine, hand the blocks back to the
        node's store, where they stay warm in HOST for the function's keep-alive."""
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop(timeout_s=1.0)
        if getattr(self, "_node_blocks", None) is not None:
            try:
                self._node_blocks.release_model.remote(self._manifest_json,
                                                       self.spec.scaling.keep_alive_s)
            except Exception:  # Ray is shutting down: the store's sweep still expires them
                pass


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests)
        return f"local-{os.getpid()}"
