"""The steps of one replica start that the Serve replica (``platform.replica``) and the probe
(``probe.py``) share, each timed into a ``StartupRecorder``: a cold runtime's ``process`` and
``imports`` spans, the engine with its KV caches (``kv_cache``) and the warm-up (``warmup``)."""

from __future__ import annotations

from faascale.coldstart.profile import StartupRecorder, process_started_at_s
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.sampling import SamplingParams

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
