"""A vLLM startup log as it arrives: the steps so far, the step in progress, and the spans of a
``StartupProfile``.

``VllmLogFollower`` is fed text (``feed(chunk)``, any chunk boundaries) and keeps the log's text.
``step_in_progress`` is updated on each feed from the new complete lines only (one regex per line);
``startup`` re-parses the complete lines with ``vllm_log.parse_vllm_log`` when asked and the text
changed since (≈4 ms for a 22 KB API-server log, ≈36 ms for 230 KB on this machine's 2 cores), so
feeding is cheap however often a reader polls. Thread-safe: a follower thread feeds while another
thread reads.

``startup_spans`` lays a parsed startup on the wall clock of one process: the six steps that were
found, in ``vllm_log.STEPS`` order, one after another from ``launched_at_s`` (when the process was
spawned) with their parsed durations, then ``vllm_other`` up to ``ready_at_s`` (when it answered):
the interpreter's start and imports before vLLM logs its first timestamped line, the API server
after the engine, the readiness poll. Parsed steps that add up to more than the measured interval
(whole-second timestamps, a clock step) are scaled to fit, and each span says so. Every span's
attrs carry ``{"from": "vllm log"}``.

``VllmLogFollower.feed_file(path)`` feeds what a log file gained since the follower last read it
(whole UTF-8 characters across reads; a truncated file is read again from its start);
``follow_file`` calls it at a bounded polling interval until a stop event, then once more (a
thread's body), and ``FileFollower`` runs that in a daemon thread. Only these touch the file
system.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from faascale.coldstart.profile import Span, StartupProfile
from faascale.coldstart.vllm_log import STEPS, VllmLogError, VllmStartup, parse_vllm_log

OTHER = "vllm_other"
FROM_LOG = {"from": "vllm log"}

# The step a start is in after a line: a line takes the first pattern it matches, and the last
# line that matched one sets the step; None: the server is ready (no step after that).
_MARKERS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"Starting vLLM server on|Starting vLLM API server|Application startup complete"
                r"|READY from local core engine"), None),
    (re.compile(r"init engine \(profile|Graph capturing finished"), OTHER),
    (re.compile(r"Capturing (?:a )?cuda ?graph|Capturing CUDA graph", re.IGNORECASE), "cuda_graphs"),
    (re.compile(r"torch\.compile (?:takes|took) [\d.]+ s in total|saved AOT compiled function"
                r"|Directly load AOT compilation|Memory profiling takes|Initial profiling/warmup run"
                r"|Warming up done|KV cache size|Available KV cache memory"), "kv_cache"),
    (re.compile(r"Dynamo bytecode transform|Compiling a graph for|Starting torch\.compile"
                r"|Warming up model for the compilation|Compiling model again"
                r"|Directly load the compiled graph"), "torch_compile"),
    (re.compile(r"Starting to load model"), "model_loading"),
    (re.compile(r"Init Tokenizer took"), "model_loading"),
)
_VLLM_LINE = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR) \d\d-\d\d \d\d:\d\d:\d\d")  # bootstrap


class VllmLogFollower:
    """The log of one vLLM start, fed as it arrives. ``feed`` never raises on odd text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text: list[str] = []  # complete lines' text, in chunks
        self._partial = ""  # the text after the last newline
        self._num_lines = 0
        self._step: str | None = None
        self._seen_line = False
        self._ready = False
        self._cached: VllmStartup | None = None
        self._cached_at_lines = -1
        self._file_offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._file_lock = threading.Lock()  # one reader of the file at a time

    def feed(self, chunk: str) -> None:
        """Add text as it arrived (a line may be split across chunks; mutates the follower)."""
        if not chunk:
            return
        with self._lock:
            text = self._partial + chunk
            cut = text.rfind("\n")
            if cut < 0:
                self._partial = text
                return
            complete, self._partial = text[:cut + 1], text[cut + 1:]
            self._text.append(complete)
            for line in complete.splitlines():
                self._num_lines += 1
                self._mark(line)

    def feed_file(self, path: str | Path, read_bytes: int = 1 << 20, final: bool = False) -> int:
        """Feed what ``path`` gained since this follower last read it; returns the bytes read (0
        for a missing file). ``final`` also flushes a trailing partial UTF-8 character (bad bytes
        become U+FFFD). Raises OSError for a file that exists and cannot be read."""
        got = 0
        with self._file_lock:
            try:
                with Path(path).open("rb") as f:
                    f.seek(0, 2)
                    if f.tell() < self._file_offset:  # truncated: a new log under the same name
                        self._file_offset = 0
                        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                    f.seek(self._file_offset)
                    while data := f.read(read_bytes):
                        got += len(data)
                        self.feed(self._decoder.decode(data))
                    self._file_offset += got
            except FileNotFoundError:
                pass
            if final:
                self.feed(self._decoder.decode(b"", final=True))
        return got

    @property
    def file_offset(self) -> int:
        """Bytes of the file fed so far (``feed_file``)."""
        with self._file_lock:
            return self._file_offset

    def _mark(self, line: str) -> None:
        for pattern, step in _MARKERS:
            if pattern.search(line):
                self._seen_line = True
                if step is None:
                    self._ready = True
                elif not self._ready:
                    self._step = step
                return
        if _VLLM_LINE.search(line):
            self._seen_line = True
            self._step = self._step or "bootstrap"

    @property
    def text(self) -> str:
        """Everything fed so far, the unfinished last line included."""
        with self._lock:
            return "".join(self._text) + self._partial

    @property
    def ready(self) -> bool:
        """A ready line (API server, or the engine's READY) has arrived."""
        with self._lock:
            return self._ready

    @property
    def step_in_progress(self) -> str | None:
        """The step of the last marker line (``bootstrap`` … ``cuda_graphs``, ``vllm_other``
        after the engine's init); None before any vLLM line and once ready."""
        with self._lock:
            return None if self._ready or not self._seen_line else self._step

    @property
    def startup(self) -> VllmStartup | None:
        """The parse of the complete lines so far (cached until more arrive); None while they are
        not yet a vLLM log."""
        with self._lock:
            if self._cached_at_lines != self._num_lines:
                try:
                    self._cached = parse_vllm_log("".join(self._text))
                except VllmLogError:
                    self._cached = None
                self._cached_at_lines = self._num_lines
            return self._cached

    def final(self) -> VllmStartup:
        """The parse of everything fed, the unfinished last line included; ``VllmLogError`` if it
        is not a vLLM log."""
        return parse_vllm_log(self.text)

    def spans(self, launched_at_s: float, ready_at_s: float) -> tuple[Span, ...]:
        """``startup_spans`` of everything fed; while that is not (yet) a vLLM log (a start that
        failed early), the one ``vllm_other`` span. Never raises for the text; ValueError if
        ``ready_at_s`` is before ``launched_at_s``."""
        try:
            startup = self.final()
        except VllmLogError:
            startup = VllmStartup(version=None)
        return startup_spans(startup, launched_at_s, ready_at_s)


def startup_spans(startup: VllmStartup, launched_at_s: float, ready_at_s: float
                  ) -> tuple[Span, ...]:
    """The found steps one after another from ``launched_at_s``, then ``vllm_other`` up to
    ``ready_at_s`` (≥ 0 s). Steps adding up to more than the interval are scaled to fit (attrs
    ``scaled_by``, ``log_s``). ``torch_compile`` carries the compile cache and flags. Raises
    ValueError if ``ready_at_s`` is before ``launched_at_s``."""
    interval_s = ready_at_s - launched_at_s
    if interval_s < 0:
        raise ValueError(f"ready at {ready_at_s} is before the launch at {launched_at_s}")
    found = [(name, startup.steps_s[name]) for name in STEPS if name in startup.steps_s]
    parsed_s = sum(d for _, d in found)
    scale = interval_s / parsed_s if parsed_s > interval_s else 1.0
    spans = []
    t = launched_at_s
    for name, duration_s in found:
        attrs: dict[str, Any] = dict(FROM_LOG)
        if scale != 1.0:
            attrs.update(scaled_by=round(scale, 6), log_s=duration_s)
        if name == "torch_compile":
            attrs.update(compile_cache=startup.compile_cache, flags=list(startup.flags))
        end = min(ready_at_s, t + duration_s * scale)
        spans.append(Span(name, t, end, attrs))
        t = end
    other: dict[str, Any] = dict(FROM_LOG)
    if scale != 1.0:
        other["scaled_by"] = round(scale, 6)
    spans.append(Span(OTHER, t, max(t, ready_at_s), other))
    return tuple(spans)


def vllm_startup_profile(startup: VllmStartup, *, launched_at_s: float, ready_at_s: float,
                         function: str, replica: str, model_id: str, source: str,
                         weight_bytes: int, machine: Mapping[str, Any] | None = None,
                         model: Mapping[str, Any] | None = None, device: str = "cpu"
                         ) -> StartupProfile:
    """A ``StartupProfile`` of one vLLM start from its parsed log (``startup_spans``); the runtime
    says ``engine: vllm``, the version, the compile cache and the flags."""
    runtime = {"engine": "vllm", "warm": False, "vllm_version": startup.version,
               "compile_cache": startup.compile_cache, "flags": list(startup.flags),
               "log_total_s": startup.total_s}
    return StartupProfile(function=function, replica=replica, model_id=model_id,
                          started_at_s=launched_at_s, source=source, weight_bytes=weight_bytes,
                          spans=startup_spans(startup, launched_at_s, ready_at_s),
                          machine=dict(machine or {}), model=dict(model or {}), runtime=runtime,
                          device=device)


def follow_file(path: str | Path, follower: VllmLogFollower, stop: threading.Event,
                poll_s: float = 0.05, *, max_poll_s: float = 0.5, read_bytes: int = 1 << 20,
                sleep: Callable[[float], Any] | None = None) -> int:
    """Feed ``follower`` with ``path`` as it grows (``feed_file``) until ``stop`` is set, then read
    once more; returns the file's bytes fed. A missing file is waited for; polls back off from
    ``poll_s`` to ``max(poll_s, max_poll_s)`` while nothing arrives (``sleep`` defaults to
    ``stop.wait``, so a stop wakes it). Raises OSError only for a file that exists and cannot be
    read."""
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0, not {poll_s}")
    max_poll_s = max(poll_s, max_poll_s)
    wait = sleep or stop.wait
    delay = poll_s
    while True:
        stopping = stop.is_set()
        got = follower.feed_file(path, read_bytes, final=stopping)
        if stopping:
            return follower.file_offset
        if got:
            delay = poll_s
        wait(delay)
        if not got:
            delay = min(max_poll_s, delay * 2)


class FileFollower:
    """``follow_file`` in a daemon thread: ``start()``, read ``follower`` any time, ``stop()``."""

    def __init__(self, path: str | Path, follower: VllmLogFollower | None = None, *,
                 poll_s: float = 0.05, max_poll_s: float = 0.5) -> None:
        self.path = Path(path)
        self.follower = follower or VllmLogFollower()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(poll_s, max_poll_s),
                                        name=f"vllm-log:{self.path.name}", daemon=True)

    def _run(self, poll_s: float, max_poll_s: float) -> None:
        try:
            follow_file(self.path, self.follower, self._stop, poll_s=poll_s, max_poll_s=max_poll_s)
        except BaseException as exc:  # noqa: BLE001 - handed to stop()'s caller
            self._error = exc

    def start(self) -> FileFollower:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> VllmLogFollower:
        """Stop after one last read; re-raises what the thread raised (OSError)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error
        return self.follower
