"""The steps of one replica start that the Serve replica (``platform.replica``) and the probe
(``probe.py``) share, each timed into a ``StartupRecorder``: a cold runtime's ``process`` and
``imports`` spans, the weights on the engine's device (``materialize``), the engine with its KV
caches (``kv_cache``) and the warm-up (``warmup``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from faascale.coldstart.profile import StartupRecorder, process_started_at_s
from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.manifest import ModelManifest
from faascale.engine.sampling import SamplingParams
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.device import DeviceLoader

# A worker reused after minutes is not a start: its process and imports spans are left out when
# they ended longer ago than this before the start's own code began.
PROCESS_SPAN_MAX_S = 120.0


def cold_process_spans(rec: StartupRecorder, constructor_s: float,
                       imports_s: tuple[float, float]) -> None:
    """Add to ``rec`` this process's ``process`` span (its creation to its imports) and the
    ``imports`` span (``imports_s``: started, done; epoch seconds), each only if it ended less
    than PROCESS_SPAN_MAX_S before ``constructor_s``, when the start's own code began. No
    ``process`` span where the creation time is unknown (no /proc)."""
    born = process_started_at_s()
    if born is not None and 0 <= constructor_s - born < PROCESS_SPAN_MAX_S:
        rec.add("process", born, min(imports_s[0], constructor_s))
    if 0 <= constructor_s - imports_s[1] < PROCESS_SPAN_MAX_S:
        rec.add("imports", imports_s[0], imports_s[1])


def warm_up(loop: EngineLoop, llm: LLM, wait: bool = True) -> None:
    """One short greedy request through the engine (a prefill and a decode step), so the first
    user request does not pay for the first forward's allocations and kernel selection.

    ``wait=False``: submitted, not waited for. A replica starts it as its constructor returns:
    it runs while Serve marks the replica running and tells the routers (a control-loop tick and
    a broadcast, at least as long as the warm-up here), so it is off the start's path; a request
    that does come first is batched with it."""
    ids = llm.prompt_ids("Hello")[:8] or [0]
    stream = loop.submit(ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    if wait:
        for _ in stream:
            pass


def build_engine_loop(llm: LLM, rec: StartupRecorder, name: str,
                      background_warmup: bool = False) -> EngineLoop:
    """The engine (its KV caches) and its loop, then the warm-up, each timed in ``rec`` (with
    ``background_warmup``, the warm-up is started and not waited for: no ``warmup`` span)."""
    with rec.span("kv_cache"):
        loop = EngineLoop(llm.new_engine(), name=name)
    if background_warmup:
        warm_up(loop, llm, wait=False)
    else:
        with rec.span("warmup"):
            warm_up(loop, llm)
    return loop


def device_ready(loader: DeviceLoader) -> dict[str, Any]:
    """Wait until everything ``loader`` moved has landed and the device is idle (a GPU's copy
    and compute streams; nothing on a CPU), so a replica reports itself started only once its
    weights are there; returns the ``materialize`` span's device attributes (``device``,
    ``mover``, ``blocks_moved``, ``bytes_moved``, ``bytes_copied``: 0 on a CPU, zero copy) and
    the wait (``device_sync_s``)."""
    t0 = time.time()
    loader.synchronize(whole_device=True)
    return {**loader.stats(), "device_sync_s": round(time.time() - t0, 4)}


def materialize(rec: StartupRecorder, manifest: ModelManifest, tokenizer: Tokenizer,
                blocks: Callable[[], Sequence[Mapping[str, torch.Tensor]]], cfg: EngineConfig,
                loader: DeviceLoader, **attrs: Any) -> LLM:
    """The ``materialize`` step: ``blocks()`` (the mapped block tensors, mapped inside the span),
    each moved to ``cfg.device`` by ``loader`` (a ``DeviceLoader`` for that device: pinned
    staging on a copy stream on a GPU, zero copy on a CPU), the engine's shards built there and
    the device synchronised (``device_ready``: the span's attrs name the device and what moved).
    Raises DeviceUnavailableError when ``cfg.device`` is not on this machine."""
    with rec.span("materialize", **attrs) as span:
        llm = LLM.from_blocks(manifest, tokenizer, blocks(), cfg, mover=loader)
        span.update(device_ready(loader))
    return llm


def load_packed(rec: StartupRecorder, packed_dir: str | os.PathLike, cfg: EngineConfig,
                loader: DeviceLoader, verify: bool = True, **fetch_attrs: Any) -> LLM:
    """A packed directory's model on ``cfg.device``: manifest and tokenizer (a
    ``spec_tokenizer`` span), the blocks read and verified (a ``weight_fetch`` span with
    ``fetch_attrs``; with ``verify=False``, blocks this start already fetched and verified, they
    are only mapped, inside ``materialize``), then ``materialize``."""
    with rec.span("spec_tokenizer"):
        manifest = read_manifest(packed_dir)
        tokenizer = Tokenizer(read_tokenizer_json(packed_dir, manifest), manifest.tokenizer)

    def blocks() -> list[dict[str, torch.Tensor]]:
        return [load_block(packed_dir, manifest, i, verify) for i in range(manifest.num_blocks)]

    if verify:
        with rec.span("weight_fetch", bytes=manifest.total_bytes, **fetch_attrs):
            mapped = blocks()
        return materialize(rec, manifest, tokenizer, lambda: mapped, cfg, loader)
    return materialize(rec, manifest, tokenizer, blocks, cfg, loader)
