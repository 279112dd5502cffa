"""A function's token stream as the gateway serves it, and the SSE response that carries it.

A :class:`TokenStream` holds one of the function's in-flight slots from the moment its first item
arrived until it is closed, and closes exactly once however it ends: finished, failed, stalled
(no item within ``stall_timeout_s``), closed by a client that left mid-stream, or never iterated
at all: a client that leaves between the first token and the response's first byte makes
Starlette drop the body unstarted, and an async generator that never started never runs its
``finally`` (the slot leaked and the function answered 429 for ever). :func:`sse` therefore ties
the close to the response's own end, not to the body's iteration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class StreamStalled(Exception):
    """No item arrived within the stream's stall timeout (a stuck or unreachable replica)."""


class TokenStream:
    """The items of one request: ``first``, then those of ``gen`` (a Serve response generator:
    ``__anext__`` and ``cancel``), until ``num_choices`` items said they finished (a request
    with ``n`` choices or a batch of prompts streams them interleaved). ``on_item(item)`` sees each item as it is handed out;
    ``on_close()`` runs once, after ``gen`` was cancelled (a no-op once it finished, and what
    frees the replica's slot when the client left)."""

    def __init__(self, first: dict[str, Any], gen: Any, *, stall_timeout_s: float,
                 on_item: Callable[[dict[str, Any]], None], on_close: Callable[[], None],
                 num_choices: int = 1) -> None:
        self._next: dict[str, Any] | None = first
        self._gen, self.stall_timeout_s = gen, stall_timeout_s
        self._on_item, self._on_close = on_item, on_close
        self._unfinished = num_choices  # the stream ends after this many finished items
        self._finished = self.closed = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.closed or self._finished:
            self.close()
            raise StopAsyncIteration
        if self._next is not None:
            item, self._next = self._next, None
        else:
            try:
                async with asyncio.timeout(self.stall_timeout_s):  # no task per token
                    item = await self._gen.__anext__()
            except TimeoutError:
                self.close()
                raise StreamStalled(f"no token for {self.stall_timeout_s:g} s") from None
            except BaseException:  # the end, a dead replica, the client's cancellation
                self.close()
                raise
        self._on_item(item)
        self._unfinished -= bool(item.get("finished"))
        self._finished = self._unfinished <= 0
        return item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._gen.cancel()
        finally:
            self._on_close()

    async def aclose(self) -> None:
        self.close()


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its token stream when the response ends, however."""

    def __init__(self, content: AsyncIterator[bytes], stream: TokenStream, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def sse_event(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse(events: AsyncIterator[dict[str, Any]], stream: TokenStream,
        error_event: Callable[[BaseException], dict[str, Any] | None],
        done: bool = True) -> StreamingResponse:
    """Server-sent events of ``events`` (made from ``stream``), then ``[DONE]``. An exception that
    ``error_event`` turns into an event ends the stream with that event (typed, not cut, no
    ``[DONE]``); any other propagates (Starlette cuts the connection)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for e in events:
                yield sse_event(e)
        except Exception as exc:
            error = error_event(exc)
            if error is None:
                raise
            yield sse_event(error)
            return
        if done:
            yield b"data: [DONE]\n\n"

    return _ClosingStreamingResponse(body(), stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
