"""What every gateway route shares: the platform's wiring (``GatewayContext``), typed API errors,
auth dependencies, body parsing, and the per-process ``RequestContext``: deployed records and
Serve handles, replica counts kept fresh in the background, in-flight accounting, scale from
zero, and a request's token stream opened, collected or typed as an SSE error event.

Routers reach the ``RequestContext`` through the ``gateway`` dependency (``app.state.gateway``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from faascale.platform.auth import Role, Tokens, bearer
from faascale.platform.metrics import UNKNOWN_FUNCTION, Metrics
from faascale.platform.registry import FunctionRecord, Registry, UnreadableRecord
from faascale.platform.spec import DNS_LABEL
from faascale.platform.streams import StreamStalled, TokenStream

_DNS_LABEL = re.compile(DNS_LABEL)
T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
REPLICA_DIED = ("the replica serving this request stopped before it finished (it retired or "
                "failed); retry")
STALLED = "the replica stopped producing tokens; the stream was ended (retry)"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray's word that the replica's actor died under a call."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


class Backend(Protocol):
    """What the gateway needs from Ray Serve (serve_app.ServeBackend; a fake in unit tests)."""

    def deploy(self, record: FunctionRecord) -> None: ...

    def delete(self, name: str) -> None: ...

    def handle(self, name: str) -> Any: ...

    def counts(self) -> dict[str, Any]: ...


@dataclass
class GatewayContext:
    registry: Registry
    backend: Backend
    tokens: Tokens
    # FunctionSpec -> (packed model location, model id, manifest digest)
    resolve_model: Callable[[Any], tuple[str, str, str]]
    report: Callable[[dict[str, Any]], None]  # scale intents to the events sink
    logs: Callable[[str, int], list[str]]  # (function, tail) -> log lines of its replicas
    tier_stats: Callable[[], dict[str, Any]] = dict  # node -> its block store's occupancy and hits
    pipecast: Callable[[], dict[str, Any]] = dict  # model id -> PipeCast members, pipelines, record
    warm_pool: Callable[[], list[dict[str, Any]]] = list  # per node: warm runtimes (warm_pool.py)
    estimates: Callable[[str], list[dict[str, Any]]] = lambda name: []  # cold-start estimates
    pin_estimates: Callable[[str, list[dict[str, Any]] | None], None] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], float] = time.time
    max_body_bytes: int = MAX_BODY_BYTES
    counts_refresh_s: float = 1.0  # replica counts for scale-from-zero; Serve itself reacts at once
    metrics_token: str | None = None  # /metrics needs it (or the admin token); None: open
    metrics_refresh_s: float = 1.0  # /metrics asks Serve, SQLite and the nodes at most this often
    metrics_wait_s: float = 5.0  # longest a scrape waits for that; then the last values are served


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body validated as ``model`` whatever the Content-Type (curl -d sends form type).
    Raises ApiError 400 for non-JSON and 422 naming the bad fields."""
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        raise ApiError(400, "body: not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                           for e in exc.errors())
        raise ApiError(422, f"invalid request: {fields}", "invalid_request") from None


class RequestContext:
    """Per-process gateway state shared by every request: cached records and handles, replica
    counts, in-flight and waiting requests, recent replica start failures."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx, self.metrics = ctx, ctx.metrics
        self.handles: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}
        self.counts_at = 0.0
        self.in_flight: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, int] = defaultdict(int)
        self.zero_intent_at: dict[str, float] = {}
        self.records: dict[str, FunctionRecord] = {}
        self.start_failures: dict[str, tuple[float, str]] = {}  # function -> (at_s, error), newest
        self.last_failure_id = 0
        self._refresher: asyncio.Task[None] | None = None
        self.tokenizers: Any = None  # tokenize_routes.TokenizerCache, made on first use

    # ------------------------------------------------------------------ functions

    def record(self, name: str) -> FunctionRecord:
        rec = self.records.get(name)
        if rec is None and not _DNS_LABEL.match(name):  # never deployable: never looked up
            raise ApiError(404, f"function {name.encode('ascii', 'backslashreplace').decode()!r} "
                           "is not deployed (names are DNS labels)", "not_found")
        if rec is None:
            try:
                rec = self.ctx.registry.get(name)
            except UnreadableRecord as exc:  # the others still serve
                raise ApiError(503, str(exc), "unreadable_function") from None
            if rec is None:
                raise ApiError(404, f"function {name!r} is not deployed", "not_found")
            self.records[name] = rec
        return rec

    def accepted(self, name: str, body: Any, extract: Callable[[], T]) -> T:
        """What a request asks for (``extract``), once its function exists (else 404) and its
        body asks for nothing faascale cannot honour (``body.check_supported``; else a 400
        naming the field)."""
        self.record(name)
        try:
            body.check_supported()
            return extract()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def label(self, name: str) -> str:
        """``name`` as a metric label value: a deployed function's name, else UNKNOWN_FUNCTION
        (the names clients make up must not grow the label set)."""
        try:
            self.record(name)
        except ApiError:
            return UNKNOWN_FUNCTION
        return name

    def forget(self, name: str) -> None:
        self.records.pop(name, None)
        self.handles.pop(name, None)

    def handle(self, name: str) -> Any:
        h = self.handles.get(name)
        if h is None:
            h = self.handles[name] = self.ctx.backend.handle(name).options(stream=True)
        return h

    def max_tokens_default(self, name: str) -> int:
        return min(256, self.record(name).spec.engine.max_seq_len)

    # ------------------------------------------------------------------ replica counts

    def ensure_refresher(self) -> None:
        """Keep replica counts fresh in the background, so no request waits on the controller."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh_counts()
            try:
                await self.refresh_start_failures()
            except Exception as exc:
                log.warning("start failures unavailable: %s", exc)
            await asyncio.sleep(self.ctx.counts_refresh_s)

    async def refresh_start_failures(self) -> None:
        """The newest replica start failure of every function (replicas report them)."""
        for i, function, _, data in await run_in_threadpool(
                self.ctx.registry.events_since, self.last_failure_id, ("start_failed",)):
            self.last_failure_id = i
            self.start_failures[function] = (float(data.get("at_s", 0.0)), str(data.get("error", "")))

    async def refresh_counts(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or now - self.counts_at > self.ctx.counts_refresh_s:
            self.counts_at = now
            try:
                self.counts = await run_in_threadpool(self.ctx.backend.counts)
            except Exception as exc:  # the controller is busy or restarting: keep the last view
                log.warning("replica counts unavailable: %s", exc)
        return self.counts

    # ------------------------------------------------------------------ a request's stream

    async def token_stream(self, name: str, payload: dict[str, Any]) -> TokenStream:
        """The request's token stream, holding one in-flight slot until it is closed. Its first
        chunk is fetched before any response is sent, so a rejected request still gets its 4xx."""
        t0 = time.perf_counter()
        spec, m = self.record(name).spec, self.metrics
        # Replicas take 2x their target concurrency (Serve's max_ongoing_requests); beyond what
        # every replica can hold plus the function's queue allowance, shed load now.
        capacity = spec.scaling.max_replicas * 2 * spec.target_concurrency + \
            spec.scaling.max_queued_requests
        if self.in_flight[name] >= capacity:
            raise ApiError(429, f"function {name!r} has {self.in_flight[name]} requests in flight "
                           f"(limit {capacity}); retry later", "rate_limited", {"Retry-After": "1"})
        self.in_flight[name] += 1
        self._gauges(name)

        def release() -> None:
            self.in_flight[name] -= 1
            self._gauges(name)

        try:
            first, gen = await self._open(name, payload)
        except BaseException:
            release()
            raise
        last = first_s = time.perf_counter()
        m.ttft.labels(name).observe(first_s - t0)
        m.vllm.ttft.labels(name).observe(first_s - t0)
        generated = 0

        def on_item(item: dict[str, Any]) -> None:
            nonlocal last, generated
            now = time.perf_counter()
            if item is not first:  # a chunk of k tokens (a stream behind its engine): k gaps
                k = max(1, len(item.get("token_ids") or ()))
                for hist in (m.itl.labels(name), m.vllm.itl.labels(name)):
                    for _ in range(k):
                        hist.observe((now - last) / k)
            last = now
            if item.get("finished"):
                m.tokens.labels(name, "prompt").inc(item["num_prompt_tokens"])
                m.tokens.labels(name, "completion").inc(item["num_output_tokens"])
                m.vllm.finished(name, item)
                generated += int(item["num_output_tokens"])

        def on_close() -> None:
            release()
            end_s = time.perf_counter()
            m.e2e.labels(name).observe(end_s - t0)
            m.vllm.e2e.labels(name).observe(end_s - t0)
            if generated > 1:
                m.vllm.tpot.labels(name).observe((end_s - first_s) / (generated - 1))

        # every choice (a batch of prompts x n) ends with its own finished item
        num_choices = len(payload.get("batch") or [None]) * int(payload.get("n", 1))
        return TokenStream(first, gen, stall_timeout_s=spec.scaling.stall_timeout_s,
                           on_item=on_item, on_close=on_close, num_choices=num_choices)

    def _gauges(self, name: str) -> None:
        """The request gauges of ``name`` after its in-flight or waiting count changed."""
        m, in_flight, waiting = self.metrics, self.in_flight[name], self.waiting[name]
        m.in_flight.labels(name).set(in_flight)
        m.queue.labels(name).set(waiting)
        m.vllm.running.labels(name).set(in_flight - waiting)
        m.vllm.waiting.labels(name).set(waiting)

    async def _open(self, name: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Send a request to the function and wait (bounded) for its first item."""
        spec = self.record(name).spec
        self.ensure_refresher()
        counts = self.counts.get(name)  # at most counts_refresh_s old
        if counts is None or counts.running + counts.starting == 0:
            self._scale_from_zero(name)
        self.waiting[name] += 1
        self._gauges(name)
        gen = self.handle(name).generate.remote(payload)
        try:
            first = await self._first_item(name, gen, spec.scaling.cold_start_timeout_s)
        except StopAsyncIteration:
            raise ApiError(502, f"function {name!r} ended the stream without output",
                           "bad_gateway") from None
        finally:
            self.waiting[name] -= 1
            self._gauges(name)
        if "error" in first:
            e = first["error"]
            raise ApiError(int(e.get("status", 400)), str(e.get("message")), str(e.get("type")))
        return first, gen

    async def _first_item(self, name: str, gen: Any, timeout_s: float) -> dict[str, Any]:
        """The stream's first item, waiting at most ``timeout_s``. A replica start that failed
        after this request arrived, with no replica running, ends the wait early with its
        reason (Serve keeps retrying the start; the client retries after Retry-After)."""
        since_s, deadline = time.time(), time.monotonic() + timeout_s
        pending = asyncio.ensure_future(gen.__anext__())
        while True:
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, min(1.0, left)))
            if done:
                return pending.result()
            failure = self.start_failures.get(name)
            counts = self.counts.get(name)
            if failure and failure[0] >= since_s and not (counts and counts.running):
                pending.cancel()
                gen.cancel()
                raise ApiError(503, f"function {name!r}: its replica failed to start: {failure[1]}",
                               "start_failed", {"Retry-After": "5"})
            if left <= 0:
                pending.cancel()
                gen.cancel()
                raise ApiError(503, f"function {name!r} did not produce a token within "
                               f"{timeout_s:.0f} s (cold start timeout)", "unavailable",
                               {"Retry-After": "5"})

    def _scale_from_zero(self, name: str) -> None:
        """Serve does not call custom policies from zero: raise the intent here, once per burst."""
        now = self.ctx.clock()
        if now - self.zero_intent_at.get(name, 0.0) < 5.0:
            return
        self.zero_intent_at[name] = now
        self.ctx.report({"function": name, "kind": "scale_intent", "from_replicas": 0,
                         "to_replicas": 1, "reason": "request at zero", "at_s": now,
                         "ongoing_requests": self.in_flight[name] + 1})

    async def collect(self, stream: TokenStream) -> tuple[str, dict[str, Any]]:
        """The whole answer (its text and last item), the stream closed however it ends."""
        items = await self.collect_items(stream)
        return "".join(c["text"] for c in items), (items[-1] if items else {})

    @staticmethod
    async def collect_items(stream: TokenStream) -> list[dict[str, Any]]:
        """Every item of the stream (all choices'), the stream closed however it ends. Raises
        ApiError 504 if the replica stalled."""
        items = []
        try:
            async for c in stream:
                items.append(c)
        except StreamStalled as exc:
            raise ApiError(504, f"{STALLED}: {exc}", "stream_stalled") from None
        finally:
            stream.close()
        return items

    @staticmethod
    def stream_error(exc: BaseException) -> dict[str, Any] | None:
        """The SSE error event that ends a stream for ``exc`` (None: not ours to type)."""
        if isinstance(exc, StreamStalled):
            log.warning("a stream stalled: %s", exc)
            return error_body(504, f"{STALLED}: {exc}", "stream_stalled")
        if replica_died(exc):
            log.warning("a replica died under a stream: %s", str(exc).splitlines()[0])
            return error_body(503, REPLICA_DIED, "replica_unavailable")  # typed, not cut
        return None

    async def counted(self, endpoint: str, name: str, make: Callable[[], Any]) -> Any:
        """``await make()``, counted in ``faascale_requests_total`` under its status."""
        try:
            response = await make()
        except ApiError as exc:
            self.metrics.requests.labels(self.label(name), endpoint, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(self.label(name), endpoint, "200").inc()
        return response


# ---------------------------------------------------------------------- dependencies

async def gateway(request: Request) -> RequestContext:
    return request.app.state.gateway


Gateway = Annotated[RequestContext, Depends(gateway)]


def _require(required: Role) -> Callable[[Request], Any]:
    async def check(request: Request) -> Role:
        tokens = request.app.state.gateway.ctx.tokens
        role = tokens.role_of(bearer(request.headers.get("authorization")))
        if role is None:
            raise ApiError(401, "missing or invalid bearer token", "unauthorized",
                           {"WWW-Authenticate": "Bearer"})
        if required is Role.ADMIN and role is not Role.ADMIN:
            raise ApiError(403, "this operation needs the admin token", "forbidden")
        return role

    return check


admin = Depends(_require(Role.ADMIN))
invoker = Depends(_require(Role.INVOKE))
