"""vLLM startup logs (0.8 to 0.33, GPU and CPU backends) to the six cold-start steps of *Breaking the
Ice* (MLSys 2026).

Pure: ``parse_vllm_log(text)`` reads the text and returns a frozen ``VllmStartup``; only
``parse_vllm_log_file`` touches the file system. A log that is cut short, comes from an unknown
version or lacks lines gives a partial result plus ``warnings``; only an empty or non-vLLM text
(or an unreadable file) raises ``VllmLogError``.

A line's timestamp is its ``LEVEL MM-DD HH:MM:SS[.mmm] [file.py:N]`` header, found anywhere in the
line, so prefixes such as ``(EngineCore_0 pid=…)``, ``(APIServer pid=…)`` and k9s ``│`` boxes do
not matter; ``**bold**`` markers are removed first. Logs have no year, so gaps across New Year are
not handled. Times stated in a line always win; a timestamp gap is used only where no line states
the time, and every such fallback adds a warning; the one exception is the CPU backend's compile
warm-up, which no line of any version states: its gap is the rule there, said in ``notes``.

Steps (``steps_s``) and how each is derived:

- ``bootstrap``: no line states it. The paper's definition when its anchors are present: first
  line → ``Chunked prefill is enabled`` plus ``Waiting for init message from front-end`` →
  ``Starting to load model`` (0.10 V1). Otherwise first line → ``Starting to load model`` minus a
  stated tokenizer time. Only when the log starts at process start, i.e. an early line
  (``No plugins for group``, ``Automatically detected platform``, ``vLLM API server version``,
  ``non-default args``, ``Initializing a V… engine``) precedes ``Starting to load model``.
- ``tokenizer``: ``NEW: Init Tokenizer took X seconds`` (the paper authors' patch; stock vLLM has
  no such line, so the tokenizer stays inside bootstrap).
- ``model_loading``: ``Model loading took … GiB [memory] and X seconds`` (0.8 V0 and V1, and the
  ``GiB memory`` wording of ≥ 0.11). Without it (0.32's CPU worker logs none): ``Initializing
  model took X`` + ``Loading weights took Y`` (the paper's avg-file rule, model_init +
  load_weights); fallback the gap ``Starting to load model`` → ``Loading weights took`` line.
- ``torch_compile``: ``torch.compile takes|took X s in total`` (Dynamo + Inductor compile) plus
  the cached-graph load (``Directly load the compiled graph(s) … took X s``, 0.10+). Without the
  total line: Dynamo + compile + load. A 0.8–0.9 cache hit (``Directly load the compiled graph
  for shape None from the cache``, no time) takes the load from the gap Dynamo line → total line.
  CPU backend (0.32; no compile line states a time): the warm-up bracket ``Warming up model for
  the compilation...`` → ``Warming up done.`` (``details_s["compile_warmup"]``, a timestamp gap
  of whole seconds in 0.32's log format) minus the profiling run that vLLM states inside it
  (``Initial profiling/warmup run took X s``, which is ``kv_cache``): the warm-up is one
  ``profile_run`` whose first forward compiles (Dynamo, Inductor, the AOT save) and whose timed
  dummy run comes after. An AOT compile-cache load failure (``Compiling model again due to a
  load failure``) adds the flag ``aot_cache_miss``; ``--enforce-eager`` logs no warm-up and
  ``torch_compile`` does not occur.
- ``kv_cache``: ``Memory profiling takes X seconds`` (0.8 V0 ``worker.py``, V1 ``gpu_worker.py``)
  minus the torch.compile total and the cached load, since V1 and 0.8 V0 compile inside the
  profiling pass (the paper's ``profile_log.py`` rule; clamped at 0). Else ``Initial
  profiling/warmup run took X s`` (≥ 0.11, where compile runs before it; on the CPU backend the
  timed dummy run inside the warm-up). Else the gap from the last compile/model-loading line to
  ``Available KV cache memory`` / ``GPU KV cache size`` / ``# cuda|GPU blocks`` (a warning). Else
  ``init engine … took X`` minus ``torch_compile`` and ``cuda_graphs`` (an eager CPU start: the
  KV cache's allocation is all the init-engine line holds; a note).
- ``cuda_graphs``: ``Graph capturing finished in X secs`` (``%.0f`` in stock vLLM, two decimals in
  the paper's patch); fallback the gap from the first ``Capturing …`` line to ``init engine`` (or
  the last capture line). None on the CPU backend, nor with ``--enforce-eager``: a step that
  cannot occur is said in ``notes``, not in the "steps not found" warning.

Details (``details_s``): ``model_init`` (``NEW: Initializing Model took``), ``weights``
(``Loading weights took``), ``dynamo_transform`` (``Dynamo bytecode transform time``),
``graph_compile`` (sum of ``Compiling a graph for <shape|general shape|dynamic shape|compile
range …> takes X s``), ``graph_load``, ``torch_compile_total``, ``kv_cache_profile`` (``Memory
profiling takes``), ``profile_run``, ``graph_capture``, ``init_engine`` (``init engine (profile,
create kv cache, warmup model) took X seconds``), and, as offsets from the first timestamped line,
``engine_ready`` (``READY from local core engine``) and ``api_ready`` (the first timestamped
``Starting vLLM server on`` (0.32), ``Starting vLLM API server`` or ``Application startup
complete``; uvicorn's own untimed ``INFO:     Application startup complete.`` does not count),
and ``compile_warmup`` (the CPU warm-up bracket).

``total_s``: first line → API ready, else → engine ready (``READY`` line, or the ``init engine``
line when neither ready line is logged); only when the log starts at process start (see
bootstrap). An offline ``LLM(...)`` start has no API server: its total ends at the engine's ready
or init-engine line. Versions: ``Initializing a V0/V1 LLM engine (vX) with config``,
``Initializing an LLM engine (vX)``, ``vLLM API server version X``; outside 0.8–0.33 a warning says
the generic patterns were used.

Also reported: ``platform`` (``cpu`` from the CPU worker's lines, ``cuda`` from GPU lines, else
None), ``compile_cache`` (``none`` when torch.compile is off (eager), ``miss`` when a graph was
compiled (``Compiling a graph for``, ``saved AOT compiled function``, an AOT load failure),
``hit`` when compiled graphs were only loaded, else None), ``flags`` (``aot_cache_miss``) and
``notes`` (how a rule of this version applied, and the steps that cannot occur).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

STEPS = ("bootstrap", "tokenizer", "model_loading", "torch_compile", "kv_cache", "cuda_graphs")
KNOWN_VERSIONS = ((0, 8), (0, 33))

_TS = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d+))? \[")
_NUM = r"(\d+(?:\.\d+)?)"
_VERSION = (
    re.compile(r"Initializing an? (?:V\d )?LLM engine \(v(\d[\w.+-]*)\)"),
    re.compile(r"vLLM API server version:? v?(\d[\w.+-]*)"),
    re.compile(r"\bvLLM version:? v?(\d[\w.+-]*)"),
)
_STATED = {
    "tokenizer": re.compile(rf"Init Tokenizer took {_NUM} s"),
    "model_init": re.compile(rf"Initializing [Mm]odel took {_NUM} s"),
    "weights": re.compile(rf"Loading weights took {_NUM} s"),
    "model_loading": re.compile(rf"Model loading took [\d.]+ GiB(?: memory)? and {_NUM} s"),
    "dynamo_transform": re.compile(rf"Dynamo bytecode transform time: {_NUM} s"),
    "graph_load": re.compile(rf"Directly load the compiled graph.*?took {_NUM} s"),
    "torch_compile_total": re.compile(rf"torch\.compile (?:takes|took) {_NUM} s in total"),
    "kv_cache_profile": re.compile(rf"Memory profiling takes {_NUM} s"),
    "profile_run": re.compile(rf"Initial profiling/warmup run took {_NUM} s"),
    "graph_capture": re.compile(rf"Graph capturing finished in {_NUM} sec"),
    "init_engine": re.compile(rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s"),
}
_GRAPH_COMPILE = re.compile(rf"Compiling a graph for .+? takes {_NUM} s")
_LOAD_UNTIMED = re.compile(r"Directly load the compiled graph|Loaded AOT compiled function|Directly load AOT")
_EARLY = re.compile(r"No plugins for group|Automatically detected platform|vLLM API server version"
                    r"|non-default args|Initializing an? (?:V\d )?LLM engine")
_START_LOAD = re.compile(r"Starting to load model")
_CHUNKED = re.compile(r"Chunked prefill is enabled")
_WAIT_INIT = re.compile(r"Waiting for init message from front-end")
_COMPILE_ANY = re.compile(r"torch\.compile (?:takes|took)|Dynamo bytecode transform|Compiling a graph for"
                          r"|Directly load the compiled graph|Model loading took")
_KV_READY = re.compile(r"Available KV cache memory|GPU KV cache size|# (?:cuda|GPU) blocks")
_CAPTURE = re.compile(r"Capturing (?:a )?cuda ?graph|Capturing CUDA graph", re.IGNORECASE)
_ENGINE_READY = re.compile(r"READY from local core engine")
_API_READY = re.compile(r"Starting vLLM server on|Starting vLLM API server|Application startup complete")
_PATCHED = re.compile(r"\bNEW: .* took")  # the paper's patch (stock vLLM has no "NEW:" lines)
_CPU_WARMUP = re.compile(r"Warming up model for the compilation")
_CPU_WARMUP_DONE = re.compile(r"Warming up done\.")
_AOT_MISS = re.compile(r"Compiling model again due to a load failure")
_COMPILED = re.compile(r"Compiling a graph for|saved AOT compiled function|Store the \d+-th graph"
                       r"|Compiling model again due to a load failure")
_EAGER = re.compile(r"Enforce eager set|enforce_eager=True|TORCH_COMPILE_DISABLE")
_CPU = re.compile(r"\[cpu_(?:worker|model_runner)\.py:\d+\]|CPU KV cache size"
                  r"|Automatically detected platform cpu")
_CUDA = re.compile(r"\[gpu_(?:worker|model_runner)\.py:\d+\]|GPU KV cache size"
                   r"|Automatically detected platform (?:cuda|rocm)|Graph capturing finished")
_VLLM_MARK = re.compile(r"vllm|vLLM|\[[\w./-]+\.py:\d+\]")


class VllmLogError(ValueError):
    """The text is empty or not a vLLM log, or the file cannot be read."""


@dataclass(frozen=True)
class VllmStartup:
    """One startup: the six paper steps found, the finer stated times, the total, and warnings."""

    version: str | None
    steps_s: dict[str, float] = field(default_factory=dict)
    details_s: dict[str, float] = field(default_factory=dict)
    total_s: float | None = None
    warnings: tuple[str, ...] = ()
    platform: str | None = None  # "cpu", "cuda" (GPU lines), None: not told by the log
    compile_cache: str | None = None  # "hit", "miss", "none" (torch.compile off), None: unknown
    flags: tuple[str, ...] = ()  # "aot_cache_miss"
    notes: tuple[str, ...] = ()  # how a version's own rule applied; steps that cannot occur


@dataclass(frozen=True)
class _Line:
    text: str
    t_s: float | None  # seconds since 2000-01-01 (the log has no year)


def _timestamp_s(line: str) -> float | None:
    m = _TS.search(line)
    if m is None:
        return None
    mon, day, hh, mm, ss, frac = m.groups()
    try:
        dt = datetime(2000, int(mon), int(day), int(hh), int(mm), int(ss))
    except ValueError:
        return None
    return (dt - datetime(2000, 1, 1)).total_seconds() + (float(f"0.{frac}") if frac else 0.0)


def _version_tuple(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_vllm_log(text: str) -> VllmStartup:
    """Parse a vLLM startup log (or an excerpt of one). Raises ``VllmLogError`` only for an empty
    or non-vLLM text."""
    if not text.strip():
        raise VllmLogError("empty log: no vLLM startup lines")
    lines = [_Line(raw.replace("**", ""), _timestamp_s(raw)) for raw in text.splitlines()]
    warnings: list[str] = []
    notes: list[str] = []
    flags: list[str] = []

    def first(pattern: re.Pattern[str]) -> _Line | None:
        return next((ln for ln in lines if pattern.search(ln.text)), None)

    def last(pattern: re.Pattern[str]) -> _Line | None:
        return next((ln for ln in reversed(lines) if pattern.search(ln.text)), None)

    def gap(a: _Line | None, b: _Line | None) -> float | None:
        if a is None or b is None or a.t_s is None or b.t_s is None or b.t_s < a.t_s:
            return None
        return round(b.t_s - a.t_s, 3)

    details: dict[str, float] = {}
    for key, pattern in _STATED.items():
        hit = first(pattern)
        if hit is not None:
            details[key] = float(pattern.search(hit.text).group(1))  # type: ignore[union-attr]
    compiles = [float(m.group(1)) for ln in lines if (m := _GRAPH_COMPILE.search(ln.text))]
    if compiles:
        details["graph_compile"] = round(sum(compiles), 3)

    timed = [ln for ln in lines if ln.t_s is not None]
    known_line = any(p.search(ln.text) for ln in lines for p in
                     (*_STATED.values(), _GRAPH_COMPILE, _START_LOAD, _KV_READY, _EARLY, _ENGINE_READY))
    if not known_line and not any(_VLLM_MARK.search(ln.text) for ln in timed):
        raise VllmLogError("not a vLLM log: no timestamped vLLM line and no known startup line")

    version = None
    for pattern in _VERSION:
        hit = first(pattern)
        if hit is not None:
            version = pattern.search(hit.text).group(1).rstrip(".,")  # type: ignore[union-attr]
            break
    if version is None:
        warnings.append("version not stated in the log; parsed with the generic patterns")
    else:
        vt = _version_tuple(version)
        if vt is None or not KNOWN_VERSIONS[0] <= vt <= KNOWN_VERSIONS[1]:
            warnings.append(f"vLLM {version} is outside the known 0.8–0.33 formats; parsed with "
                            "the generic patterns")

    platform = "cpu" if first(_CPU) else ("cuda" if first(_CUDA) else None)
    eager = first(_EAGER) is not None
    compiled, loaded = first(_COMPILED), first(_LOAD_UNTIMED)
    compile_cache = ("none" if eager else "miss" if compiled else "hit" if loaded
                     or "graph_load" in details else None)
    if first(_AOT_MISS) is not None:
        flags.append("aot_cache_miss")
    not_expected = set()  # steps that cannot occur in this start
    if eager:
        not_expected |= {"torch_compile", "cuda_graphs"}
        notes.append("enforce eager: no torch_compile and no cuda_graphs step")
    elif platform == "cpu":
        not_expected.add("cuda_graphs")
        notes.append("CPU backend: no cuda_graphs step")
    if "tokenizer" not in details and not any(_PATCHED.search(ln.text) for ln in lines):
        not_expected.add("tokenizer")
        notes.append("stock vLLM states no tokenizer time: the tokenizer stays inside bootstrap")

    steps: dict[str, float] = {}
    t0 = timed[0] if timed else None
    start_load = first(_START_LOAD)
    early = first(_EARLY)
    from_start = (early is not None and t0 is not None and early.t_s is not None
                  and (start_load is None or start_load.t_s is None or early.t_s <= start_load.t_s))

    # bootstrap
    if from_start and start_load is not None:
        chunked, wait = first(_CHUNKED), first(_WAIT_INIT)
        a, b = gap(t0, chunked), gap(wait, start_load)
        if a is not None and b is not None and chunked is not None and wait is not None \
                and chunked.t_s is not None and wait.t_s is not None and chunked.t_s <= wait.t_s:
            steps["bootstrap"] = round(a + b, 3)
        elif (whole := gap(t0, start_load)) is not None:
            steps["bootstrap"] = round(max(0.0, whole - details.get("tokenizer", 0.0)), 3)
    else:
        warnings.append("log does not start at process start: no bootstrap step and no total")

    # tokenizer
    if "tokenizer" in details:
        steps["tokenizer"] = details["tokenizer"]

    # model loading
    if "model_loading" in details:
        steps["model_loading"] = details["model_loading"]
    elif "model_init" in details and "weights" in details:
        steps["model_loading"] = round(details["model_init"] + details["weights"], 6)
        notes.append("model_loading = 'Initializing model took' + 'Loading weights took' (no "
                     "'Model loading took' line)")
    elif (g := gap(start_load, first(_STATED["weights"]))) is not None:
        steps["model_loading"] = g
        warnings.append("model_loading from the timestamp gap 'Starting to load model' → "
                        "'Loading weights took'")

    # torch.compile
    load_untimed = first(_LOAD_UNTIMED)
    if "graph_load" not in details and load_untimed is not None:
        g = gap(first(_STATED["dynamo_transform"]), first(_STATED["torch_compile_total"]))
        if g is not None:
            details["graph_load"] = g
            warnings.append("graph_load from the timestamp gap 'Dynamo bytecode transform' → "
                            "'torch.compile takes' (the cache-load line states no time)")
        elif first(_CPU_WARMUP_DONE) is None:  # on the CPU the warm-up bracket holds the load
            warnings.append("compiled graphs loaded from the cache, but no time for the load")
    load_s = details.get("graph_load", 0.0)
    if "torch_compile_total" in details:
        steps["torch_compile"] = round(details["torch_compile_total"] + load_s, 3)
    elif "dynamo_transform" in details or "graph_compile" in details:
        steps["torch_compile"] = round(details.get("dynamo_transform", 0.0)
                                       + details.get("graph_compile", 0.0) + load_s, 3)
        warnings.append("no 'torch.compile takes … in total' line: torch_compile = Dynamo + "
                        "compile + load")
    warmup = gap(first(_CPU_WARMUP), first(_CPU_WARMUP_DONE))
    if warmup is not None:
        details["compile_warmup"] = warmup
        if "torch_compile" not in steps:
            steps["torch_compile"] = round(max(0.0, warmup - details.get("profile_run", 0.0)), 3)
            notes.append("torch_compile = the CPU warm-up ('Warming up model for the compilation' "
                         "→ 'Warming up done', timestamps) minus the profiling run it states")

    # KV cache
    if "kv_cache_profile" in details:
        compiled = steps.get("torch_compile", 0.0)
        steps["kv_cache"] = round(max(0.0, details["kv_cache_profile"] - compiled), 3)
    elif "profile_run" in details:
        steps["kv_cache"] = details["profile_run"]
    else:
        g = gap(last(_COMPILE_ANY), first(_KV_READY))
        if g is not None:
            steps["kv_cache"] = g
            warnings.append("kv_cache from the timestamp gap last compile/loading line → KV cache "
                            "line (no 'Memory profiling takes' line)")
        elif "init_engine" in details:
            rest = (details["init_engine"] - steps.get("torch_compile", 0.0)
                    - steps.get("cuda_graphs", 0.0))
            steps["kv_cache"] = round(max(0.0, rest), 3)
            notes.append("kv_cache = 'init engine … took' minus torch_compile and cuda_graphs (no "
                         "profiling line)")

    # CUDA graphs
    if "graph_capture" in details:
        steps["cuda_graphs"] = details["graph_capture"]
    else:
        capture = next((ln for ln in timed if _CAPTURE.search(ln.text)), None)
        end = first(_STATED["init_engine"]) or next(
            (ln for ln in reversed(timed) if _CAPTURE.search(ln.text)), None)
        if capture is not None and (g := gap(capture, end)) is not None:
            steps["cuda_graphs"] = g
            warnings.append("cuda_graphs from the timestamp gap first capture line → end of "
                            "capture (no 'Graph capturing finished' line)")

    # readiness and total
    engine_ready = first(_ENGINE_READY)
    api_ready = next((ln for ln in timed if _API_READY.search(ln.text)), None)
    total = None
    if from_start:
        if (g := gap(t0, engine_ready)) is not None:
            details["engine_ready"] = g
        if (g := gap(t0, api_ready)) is not None:
            details["api_ready"] = g
        total = details.get("api_ready", details.get("engine_ready"))
        if total is None and (g := gap(t0, first(_STATED["init_engine"]))) is not None:
            total = g
            warnings.append("no ready line (no API server: an offline LLM start?): total ends at "
                            "the 'init engine' line")
        if total is None:
            warnings.append("no ready or init-engine line: total unknown")

    missing = [s for s in STEPS if s not in steps and s not in not_expected]
    if missing:
        warnings.append(f"steps not found: {', '.join(missing)}")
    ordered = {s: steps[s] for s in STEPS if s in steps}
    return VllmStartup(version=version, steps_s=ordered, details_s=details, total_s=total,
                       warnings=tuple(warnings), platform=platform, compile_cache=compile_cache,
                       flags=tuple(flags), notes=tuple(notes))


def parse_vllm_log_file(path: str | Path) -> VllmStartup:
    """Read and parse one log file; ``VllmLogError`` if unreadable, empty or not a vLLM log."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise VllmLogError(f"cannot read vLLM log {p}: {exc}") from exc
    try:
        return parse_vllm_log(text)
    except VllmLogError as exc:
        raise VllmLogError(f"{p}: {exc}") from exc
