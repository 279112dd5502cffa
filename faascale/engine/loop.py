"""A background thread that drives an Engine, so many callers (threads or asyncio tasks) can stream.

Callers ``submit`` a prompt and iterate the returned stream (``for`` or ``async for``); the engine
thread batches everything that is in flight. Only the engine thread touches the Engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from faascale.engine.engine import Engine, StepOutput
from faascale.engine.sampling import SamplingParams

log = logging.getLogger(__name__)
SLOW_STEP_S = 2.0  # a step longer than this is logged (a pipeline stage starved, a stall)
_END = object()


class EngineFailure(RuntimeError):
    """The engine thread failed while this request was in flight."""


class RequestStream:
    """The outputs of one request. Iterate it once, either synchronously or asynchronously."""

    def __init__(self, request_id: str, loop: "EngineLoop",
                 aio_loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self._engine_loop = loop
        self._aio = aio_loop
        self._sync_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async_q: asyncio.Queue[Any] | None = asyncio.Queue() if aio_loop else None

    def _put(self, item: Any) -> None:  # engine thread
        if self._aio is not None:
            assert self._async_q is not None
            try:
                self._aio.call_soon_threadsafe(self._async_q.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                pass
        else:
            self._sync_q.put(item)

    def __iter__(self) -> Iterator[StepOutput]:
        while True:
            item = self._sync_q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        batches = self.batches()
        try:
            async for batch in batches:
                for item in batch:
                    yield item
        finally:  # closed early (the client went away): abort now, not when collected
            await batches.aclose()

    async def batches(self) -> AsyncIterator[list[StepOutput]]:
        """Like ``async for``, but each step hands over every output already queued (at least
        one, in order): a consumer slower than the engine (a stream whose per-item cost is more
        than a decode step) takes several tokens at once instead of falling further behind,
        and one that keeps up still gets each token as soon as it is made."""
        assert self._async_q is not None, "use asubmit() for async iteration"
        q = self._async_q
        try:
            while True:
                item, batch = await q.get(), []
                while True:
                    if item is _END or isinstance(item, BaseException):
                        if batch:
                            yield batch
                        if item is _END:
                            return
                        raise item
                    batch.append(item)
                    if item.finished or q.empty():
                        break
                    item = q.get_nowait()
                yield batch
                if batch[-1].finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.abort()  # the client went away: free the slot now
            raise

    def abort(self) -> None:
        self._engine_loop.abort(self.request_id)


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "faascale-engine",
                 on_unavailable: Callable[[Exception], None] | None = None) -> None:
        """``on_unavailable`` (engine thread) hears when the runner stops being able to run
        (``RunnerUnavailable``): requests then wait, streams open, until ``switch_runner``."""
        self.engine = engine
        self._on_unavailable = on_unavailable
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- callers' side

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        """Queue a request for synchronous iteration. Validates first (raises on a bad prompt)."""
        return self._submit(prompt_ids, params, request_id, None)

    def asubmit(self, prompt_ids: Sequence[int], params: SamplingParams,
                request_id: str | None = None) -> RequestStream:
        """Like submit, for ``async for`` in the running event loop."""
        return self._submit(prompt_ids, params, request_id, asyncio.get_running_loop())

    def _submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None,
                aio: asyncio.AbstractEventLoop | None) -> RequestStream:
        if self._stop.is_set():
            raise EngineFailure("the engine loop is stopped")
        self.engine.check_prompt(prompt_ids)
        rid = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(rid, self, aio)
        self._commands.put(("add", (rid, list(prompt_ids), params, stream)))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def switch_runner(self, runner: Any) -> None:
        """Run on ``runner`` from the next step (``Engine.switch_runner`` on the engine thread,
        between steps: in-flight streams continue without a gap or a repeat)."""
        self._commands.put(("switch", runner))

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout_s)

    # ---------------------------------------------------------------- engine thread

    def _apply(self, cmd: str, arg: Any) -> None:
        if cmd == "add":
            rid, ids, params, stream = arg
            try:
                self.engine.add_request(rid, ids, params)
                self._streams[rid] = stream
            except Exception as exc:  # a duplicate id or a prompt that became invalid
                stream._put(exc)
        elif cmd == "abort":
            if self.engine.abort(arg):
                self._streams.pop(arg, None)
        elif cmd == "switch":
            moved = self.engine.switch_runner(arg)
            log.info("switched runner; %d running requests resume on it", len(moved))

    def _run(self) -> None:
        while not self._stop.is_set():
            # Nothing to do, or nothing to run it on (waiting for switch_runner): sleep on commands.
            block = not self.engine.has_unfinished() or self.engine.unavailable is not None
            try:
                cmd, arg = self._commands.get(block=block)
                self._apply(cmd, arg)
                while True:
                    cmd, arg = self._commands.get_nowait()
                    self._apply(cmd, arg)
            except queue.Empty:
                pass
            if (self._stop.is_set() or not self.engine.has_unfinished()
                    or self.engine.unavailable is not None):
                continue
            began, running, waiting = time.monotonic(), len(self.engine.running), len(
                self.engine.waiting)
            try:
                outputs = self.engine.step()
                if (took := time.monotonic() - began) > SLOW_STEP_S:  # it held every request up
                    runner = getattr(self.engine.runner, "runner", self.engine.runner)
                    log.warning("an engine step took %.1f s on %s (%d running, %d waiting "
                                "before)", took, type(runner).__name__, running, waiting)
            except Exception as exc:  # our bug: fail every in-flight request rather than hang them
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._dispatch(outputs)
            if self.engine.unavailable is not None:
                log.warning("runner unavailable, %d requests wait for the next: %s",
                            len(self.engine.waiting), self.engine.unavailable)
                if self._on_unavailable is not None:
                    try:
                        self._on_unavailable(self.engine.unavailable)
                    except Exception:
                        log.exception("on_unavailable failed")
        self._fail_all(EngineFailure("the engine loop stopped"))

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, exc: Exception) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream._put(EngineFailure(f"request {rid} failed: {exc}"))
        self._streams.clear()  # the engine's abort records are emitted next step, to no one

