"""The gateway's native invoke route, ``POST /v1/functions/{name}/invoke``: a prompt or messages
in, the text (or SSE events of it) and usage out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from faascale.platform import openai_api as oa
from faascale.platform.gateway_context import Gateway, invoker, parse_body
from faascale.platform.streams import sse

router = APIRouter()


@router.post("/v1/functions/{name}/invoke", dependencies=[invoker])
async def invoke(name: str, request: Request, gw: Gateway) -> Any:
    async def run() -> Any:
        body = await parse_body(request, oa.InvokeRequest)
        payload = gw.accepted(name, body, lambda: body.payload(gw.max_tokens_default(name)))
        stream = await gw.token_stream(name, payload)
        if body.stream:
            async def events() -> AsyncIterator[dict[str, Any]]:
                async for c in stream:
                    yield {"text": c["text"], "finished": c["finished"],
                           "finish_reason": c["finish_reason"]}
            return sse(events(), stream, gw.stream_error)
        text, last = await gw.collect(stream)
        return {"function": name, "text": text, "finish_reason": last.get("finish_reason"),
                "usage": oa.usage_of(last)}

    return await gw.counted("invoke", name, run)
