"""The gateway: the FastAPI app for management, invoke and the OpenAI-compatible API.

Served by uvicorn in the platform process (not through Serve's HTTP proxy): a request reaches the
function's replica in one hop through a cached Serve handle, auth/limits/queueing are decided
before anything enters Ray, and the gateway adds ~1 ms (benchmarks/gateway.py) instead of a
second proxy hop.

``create_app`` joins the routers (``management_routes``, ``invoke_routes``, ``openai_routes``,
``metrics_routes``) over one ``RequestContext`` (``gateway_context``), maps errors and limits the
body size. Every error is JSON ``{"error": {"message", "type", "code"}}`` with a 4xx status; an
unexpected exception is a 500 with a generic message (the traceback goes to the platform log, not
the client).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from faascale.platform import (invoke_routes, management_routes, metrics_routes, openai_routes,
                               tokenize_routes)
from faascale.platform.gateway_context import (REPLICA_DIED, ApiError, GatewayContext,
                                               RequestContext, error_body, replica_died)

log = logging.getLogger(__name__)


def _err(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while streaming."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = _err(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(ctx: GatewayContext) -> FastAPI:
    app = FastAPI(title="faascale", version="0.1", docs_url="/docs", redoc_url=None)
    gw = app.state.gateway = RequestContext(ctx)
    app.state.metrics_scraper = metrics_routes.MetricsScraper(gw)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _err(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_: Request, exc: _BodyTooLarge) -> JSONResponse:
        return _err(413, f"request body exceeds {ctx.max_body_bytes} bytes", "request_too_large")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                           for e in exc.errors())
        return _err(422, f"invalid request: {fields}", "invalid_request")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if replica_died(exc):  # nothing of this response was sent yet: safe to retry
            log.warning("a replica died under a request: %s", str(exc).splitlines()[0])
            return _err(503, REPLICA_DIED, "replica_unavailable", {"Retry-After": "1"})
        log.exception("unexpected gateway error")
        return _err(500, "internal error; see the platform log", "internal_error")

    for routes in (metrics_routes, management_routes, invoke_routes, openai_routes,
                   tokenize_routes):
        app.include_router(routes.router)
    return BodyLimit(app, ctx.max_body_bytes)  # type: ignore[return-value]
