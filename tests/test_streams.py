"""The gateway's token stream and SSE response (faascale.platform.streams): its in-flight slot is
released exactly once however the stream ends, including a response that never starts its body
(a client gone before the first byte, under either ASGI disconnect protocol), and a stream with
no token within its stall timeout ends with :class:`StreamStalled`. A scripted response
generator stands in for Serve's; the responses are Starlette's own, called as an ASGI server
calls them. (The same behaviour against a real platform: test_hardening.py.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from faascale.platform.streams import StreamStalled, TokenStream, sse


class ScriptedGen:
    """Serve's response generator as the gateway uses it: ``__anext__`` and ``cancel``."""

    def __init__(self, items: list[dict[str, Any]], then_hang: bool = False) -> None:
        self.items, self.then_hang, self.cancelled = list(items), then_hang, 0

    async def __anext__(self) -> dict[str, Any]:
        if self.items:
            await asyncio.sleep(0)
            return self.items.pop(0)
        if self.then_hang:
            await asyncio.sleep(3600)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled += 1


def tok(text: str, finished: bool = False) -> dict[str, Any]:
    return {"text": text, "finished": finished}


def make(items: list[dict[str, Any]], then_hang: bool = False,
         stall_timeout_s: float = 5.0) -> tuple[TokenStream, ScriptedGen, list, list[int]]:
    gen, seen, closes = ScriptedGen(items[1:], then_hang), [], []
    stream = TokenStream(items[0], gen, stall_timeout_s=stall_timeout_s, on_item=seen.append,
                         on_close=lambda: closes.append(1))
    return stream, gen, seen, closes


async def drain(stream: TokenStream) -> list[dict[str, Any]]:
    return [item async for item in stream]


def test_a_finished_stream_hands_out_every_item_once_then_closes_once() -> None:
    items = [tok("a"), tok("b"), tok("c", finished=True)]
    stream, gen, seen, closes = make(items)
    assert asyncio.run(drain(stream)) == items
    assert seen == items and closes == [1] and gen.cancelled == 1
    stream.close()
    assert closes == [1] and gen.cancelled == 1  # idempotent


def test_a_first_item_that_finishes_ends_the_stream_without_reading_more() -> None:
    stream, gen, seen, closes = make([tok("only", finished=True), tok("never")])
    assert [i["text"] for i in asyncio.run(drain(stream))] == ["only"]
    assert gen.items == [tok("never")] and closes == [1]


def test_no_token_within_the_stall_timeout_raises_and_frees_the_slot() -> None:
    stream, gen, seen, closes = make([tok("a"), tok("b")], then_hang=True, stall_timeout_s=0.2)

    async def run() -> tuple[list[str], float]:
        got, t0 = [], asyncio.get_running_loop().time()
        with pytest.raises(StreamStalled, match="no token for 0.2 s"):
            async for item in stream:
                got.append(item["text"])
        return got, asyncio.get_running_loop().time() - t0

    got, waited_s = asyncio.run(run())
    assert got == ["a", "b"] and 0.2 <= waited_s < 1.0
    assert closes == [1] and gen.cancelled == 1


def test_an_error_from_the_replica_closes_the_stream_and_propagates() -> None:
    class Dead(ScriptedGen):
        async def __anext__(self) -> dict[str, Any]:
            raise RuntimeError("actor died")

    closes: list[int] = []
    stream = TokenStream(tok("a"), Dead([]), stall_timeout_s=5, on_item=lambda i: None,
                         on_close=lambda: closes.append(1))

    async def run() -> None:
        async for _ in stream:
            pass

    with pytest.raises(RuntimeError, match="actor died"):
        asyncio.run(run())
    assert closes == [1]


def _response(stream: TokenStream, error_event=lambda exc: None):
    async def events():
        async for c in stream:
            yield c
    return sse(events(), stream, error_event)


def _scope(spec_version: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version},
            "method": "POST", "path": "/", "headers": []}


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_before_the_first_byte_frees_the_slot(spec_version: str) -> None:
    """ASGI 2.3: the server reports the disconnect through ``receive``; 2.4: ``send`` raises
    OSError. Either way the response ends without iterating the body (before the fix the slot
    was released only by the body's own ``finally``, which an unstarted body never runs)."""
    stream, gen, seen, closes = make([tok("a"), tok("b"), tok("c", finished=True)])

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if spec_version == "2.4":
            raise OSError("connection reset")
        await asyncio.sleep(3600)  # 2.3: a send never completes; the disconnect wins

    async def run() -> None:
        try:
            await _response(stream)(_scope(spec_version), receive, send)
        except Exception as exc:  # 2.4: Starlette's ClientDisconnect
            assert type(exc).__name__ == "ClientDisconnect"

    asyncio.run(asyncio.wait_for(run(), 10))
    assert closes == [1] and gen.cancelled == 1


def test_the_response_streams_every_event_then_done_and_types_a_stall() -> None:
    stream, gen, seen, closes = make([tok("a"), tok("b")], then_hang=True, stall_timeout_s=0.2)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def error_event(exc: BaseException) -> dict[str, Any] | None:
        return {"error": {"type": "stream_stalled"}} if isinstance(exc, StreamStalled) else None

    asyncio.run(asyncio.wait_for(_response(stream, error_event)(_scope("2.4"), receive, send),
                                 10))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line]
    assert events == [tok("a"), tok("b"), {"error": {"type": "stream_stalled"}}]  # no [DONE]
    assert closes == [1]
