"""The gateway: FastAPI app for management, invoke and the OpenAI-compatible API.

Served by uvicorn in the platform process (not through Serve's HTTP proxy): a request reaches the
function's replica in one hop through a cached Serve handle, auth/limits/queueing are decided
before anything enters Ray, and the gateway adds ~1 ms (benchmarks/gateway.py) instead of a
second proxy hop.

Every error is JSON ``{"error": {"message", "type", "code"}}`` with a 4xx status; an unexpected
exception is a 500 with a generic message (the traceback goes to the platform log, not the client).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from faascale.coldstart.profile import StartupProfile, summarize
from faascale.engine.checkpoint import CheckpointError
from faascale.memory_tier.object_store import StoreError, StoreUnavailable
from faascale.platform import openai_api as oa
from faascale.platform.auth import Role, Tokens, bearer
from faascale.platform.metrics import Metrics
from faascale.platform.registry import STARTUP_PROFILE, FunctionRecord, Registry
from faascale.platform.spec import DNS_LABEL, SpecError, parse_function_spec
from faascale.platform.streams import StreamStalled, TokenStream, sse

_DNS_LABEL = re.compile(DNS_LABEL)
log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


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
    resolve_model: Callable[[Any], tuple[str, str]]  # FunctionSpec -> (packed dir, model id)
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


class _State:
    """Per-process gateway state: cached handles, replica counts, in-flight requests."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.handles: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}
        self.counts_at = 0.0
        self.in_flight: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, int] = defaultdict(int)
        self.zero_intent_at: dict[str, float] = {}
        self.records: dict[str, FunctionRecord] = {}
        self.last_event_id = 0
        self.start_failures: dict[str, tuple[float, str]] = {}  # function -> (at_s, error), newest
        self.last_failure_id = 0
        self._refresher: asyncio.Task[None] | None = None

    def record(self, name: str) -> FunctionRecord:
        rec = self.records.get(name)
        if rec is None and not _DNS_LABEL.match(name):  # never deployable: never looked up
            raise ApiError(404, f"function {name.encode('ascii', 'backslashreplace').decode()!r} "
                           "is not deployed (names are DNS labels)", "not_found")
        if rec is None:
            rec = self.ctx.registry.get(name)
            if rec is None:
                raise ApiError(404, f"function {name!r} is not deployed", "not_found")
            self.records[name] = rec
        return rec

    def forget(self, name: str) -> None:
        self.records.pop(name, None)
        self.handles.pop(name, None)

    def handle(self, name: str) -> Any:
        h = self.handles.get(name)
        if h is None:
            h = self.handles[name] = self.ctx.backend.handle(name).options(stream=True)
        return h

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


REPLICA_DIED = ("the replica serving this request stopped before it finished (it retired or "
                "failed); retry")
STALLED = "the replica stopped producing tokens; the stream was ended (retry)"


def _replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray's word that the replica's actor died under a call."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def _err(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, kind), status_code=status, headers=headers)


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


def _pipecast_summary(model: dict[str, Any] | None) -> dict[str, Any] | None:
    """A function's PipeCast view for ``status``: members (blocks, route), the running scale-out
    (plan, pipelines, bytes moved) and the last finished one, without the block-by-block record."""
    if model is None:
        return None
    active = model["active"]
    last = model["finished"][-1] if model["finished"] else None
    drop = ("record",)
    return {"members": model["members"], "blocks_needed": model["blocks_needed"],
            "pipeline_serves": model["pipeline_serves"],
            "active": None if active is None else {k: v for k, v in active.items() if k not in drop},
            "last": None if last is None else {
                **{k: v for k, v in last.items() if k not in drop},
                "took_s": last["done_s"] - last["started_s"]}}


def _coldstart_summary(profiles: list[StartupProfile]) -> dict[str, Any]:
    """The last measured start (steps, source) and the per-step summary of recent starts."""
    ok = [p for p in profiles if p.ok]
    last = ok[0] if ok else None
    return {"last": None if last is None else {
                "replica": last.replica, "source": last.source, "total_s": last.total_s,
                "steps_s": last.steps(), "at_s": last.started_at_s, "warm": last.warm,
                "fixed_s": last.fixed_s},
            "starts": len(ok), "failed": len(profiles) - len(ok),
            "summary": [dataclasses.asdict(x) for x in summarize(ok)]}


def create_app(ctx: GatewayContext) -> FastAPI:
    app = FastAPI(title="faascale", version="0.1", docs_url="/docs", redoc_url=None)
    st = _State(ctx)
    app.state.gateway = st
    m = ctx.metrics

    # ------------------------------------------------------------------ errors

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
        if _replica_died(exc):  # nothing of this response was sent yet: safe to retry
            log.warning("a replica died under a request: %s", str(exc).splitlines()[0])
            return _err(503, REPLICA_DIED, "replica_unavailable", {"Retry-After": "1"})
        log.exception("unexpected gateway error")
        return _err(500, "internal error; see the platform log", "internal_error")

    # ------------------------------------------------------------------ auth

    def auth(required: Role) -> Callable[[Request], Role]:
        def check(request: Request) -> Role:
            role = ctx.tokens.role_of(bearer(request.headers.get("authorization")))
            if role is None:
                raise ApiError(401, "missing or invalid bearer token", "unauthorized",
                               {"WWW-Authenticate": "Bearer"})
            if required is Role.ADMIN and role is not Role.ADMIN:
                raise ApiError(403, "this operation needs the admin token", "forbidden")
            return role

        return check

    admin = Depends(auth(Role.ADMIN))
    invoker = Depends(auth(Role.INVOKE))

    # ------------------------------------------------------------------ health, metrics

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "functions": len(await run_in_threadpool(ctx.registry.list))}

    @app.get("/health")
    async def health() -> Response:
        """vLLM's liveness probe (200, empty body): what OpenAI-server clients such as guidellm
        check before they start."""
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        counts = await st.refresh_counts(force=True)
        m.replicas.clear()
        for name, c in counts.items():
            for state in ("running", "starting", "stopping"):
                m.replicas.labels(name, state).set(getattr(c, state))
        for i, function, kind, data in await run_in_threadpool(
                ctx.registry.events_since, st.last_event_id,
                ("cold_start", "scale_intent", STARTUP_PROFILE)):
            st.last_event_id = i
            if kind == "cold_start" and "total_s" in data:
                m.cold_start.labels(function).observe(float(data["total_s"]))
            elif kind == STARTUP_PROFILE and isinstance(data.get("profile"), dict):
                try:
                    profile = StartupProfile.from_dict(data["profile"])
                except (KeyError, TypeError, ValueError):
                    continue
                if profile.ok:
                    for step, seconds in profile.steps().items():
                        m.startup_step.labels(function, step, profile.source).observe(seconds)
            elif kind == "scale_intent":
                up = int(data.get("to_replicas", 0)) > int(data.get("from_replicas", 0))
                m.scale_events.labels(function, "up" if up else "down",
                                      str(data.get("reason", ""))).inc()
        for node, stats in (await run_in_threadpool(ctx.tier_stats)).items():
            for tier, t in stats["tiers"].items():
                m.tier_bytes.labels(node, tier).set(t["used_bytes"])
                m.tier_capacity.labels(node, tier).set(t["capacity_bytes"])
            for tier, hits in stats["hits"].items():
                m.tier_hits.labels(node, tier).set(hits)
        for pool in ctx.warm_pool():
            m.warm_idle.labels(pool["node"]).set(pool["idle"])
            m.warm_target.labels(pool["node"]).set(pool["target"])
            m.warm_taken.labels(pool["node"]).set(pool["taken_total"])
        m.pipecast_blocks.clear()
        for model in (await pipecast_progress()).values():
            fn = model["function"]
            for replica, member in model["members"].items():
                m.pipecast_blocks.labels(fn, replica).set(member["blocks"])
            active = model["active"] or {}
            m.pipecast_pipelines.labels(fn).set(len(active.get("pipelines", ())))
            m.pipecast_bytes.labels(fn).set(active.get("bytes_moved", 0) + sum(
                f["bytes_moved"] for f in model["finished"]))
            m.pipecast_serves.labels(fn).set(model["pipeline_serves"])
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ management

    @app.post("/v1/functions", status_code=201, dependencies=[admin])
    async def deploy(request: Request) -> JSONResponse:
        try:
            doc = json.loads(await request.body() or b"null")
        except ValueError:
            raise ApiError(400, "body: not valid JSON") from None
        if not isinstance(doc, dict):
            raise ApiError(422, "invalid function spec: body must be a JSON object", "invalid_spec")
        base_dir = str(doc.pop("base_dir", "."))
        try:
            spec = parse_function_spec(doc, base_dir)
        except SpecError as exc:
            raise ApiError(422, str(exc), "invalid_spec") from None
        try:
            model_dir, model_id = await run_in_threadpool(ctx.resolve_model, spec)
        except StoreUnavailable as exc:  # the object store is down: retry later, not a bad spec
            raise ApiError(503, f"model: {exc}", "store_unavailable", {"Retry-After": "5"}) from None
        except (ValueError, OSError, StoreError, CheckpointError) as exc:  # bad or missing model
            raise ApiError(422, f"model: {exc}", "invalid_model") from None
        existed = await run_in_threadpool(ctx.registry.get, spec.name) is not None
        now = ctx.clock()
        try:  # deploy first: a function Serve refused is not registered
            await run_in_threadpool(ctx.backend.deploy, FunctionRecord(spec, model_dir, model_id, now, now))
        except Exception as exc:
            log.exception("deploying %s failed", spec.name)
            raise ApiError(500, f"deploying {spec.name!r} failed: {str(exc).splitlines()[0][:300]}",
                           "deploy_failed") from None
        record = await run_in_threadpool(ctx.registry.put, spec, model_dir, model_id)
        st.forget(spec.name)
        await run_in_threadpool(ctx.registry.add_event, spec.name, "deploy",
                                {"model_id": model_id, "update": existed})
        return JSONResponse(await _status(record), status_code=200 if existed else 201)

    @app.get("/v1/functions", dependencies=[invoker])
    async def list_functions() -> dict[str, Any]:
        counts = await st.refresh_counts()
        records = await run_in_threadpool(ctx.registry.list)
        return {"functions": [_summary(r, counts.get(r.name)) for r in records]}

    @app.get("/v1/functions/{name}", dependencies=[invoker])
    async def get_function(name: str) -> dict[str, Any]:
        record = await run_in_threadpool(ctx.registry.get, name)
        if record is None:
            raise ApiError(404, f"function {name!r} is not deployed", "not_found")
        return await _status(record)

    @app.delete("/v1/functions/{name}", dependencies=[admin])
    async def delete_function(name: str) -> dict[str, Any]:
        if await run_in_threadpool(ctx.registry.get, name) is None:
            raise ApiError(404, f"function {name!r} is not deployed", "not_found")
        await run_in_threadpool(ctx.backend.delete, name)
        await run_in_threadpool(ctx.registry.delete, name)
        await run_in_threadpool(ctx.registry.add_event, name, "delete", {})
        st.forget(name)
        return {"deleted": name}

    @app.post("/v1/functions/{name}/scale", dependencies=[admin])
    async def scale(name: str, request: Request) -> dict[str, Any]:
        body = await parse_body(request, oa.DeployScale)
        record = await run_in_threadpool(ctx.registry.get, name)
        if record is None:
            raise ApiError(404, f"function {name!r} is not deployed", "not_found")
        doc = record.spec.to_document()
        doc["scaling"].update({k: v for k, v in body.model_dump().items() if v is not None})
        try:
            spec = parse_function_spec(doc, record.spec.base_dir)
        except SpecError as exc:
            raise ApiError(422, str(exc), "invalid_spec") from None
        record = await run_in_threadpool(ctx.registry.put, spec, record.model_dir, record.model_id)
        st.forget(name)
        await run_in_threadpool(ctx.backend.deploy, record)
        await run_in_threadpool(ctx.registry.add_event, name, "scale_config",
                                {"min_replicas": spec.scaling.min_replicas,
                                 "max_replicas": spec.scaling.max_replicas})
        return await _status(record)

    @app.get("/v1/functions/{name}/startups", dependencies=[invoker])
    async def startups(name: str, last: int = 20) -> dict[str, Any]:
        """The function's recent replica starts (``StartupProfile``s, newest first), the
        per-step summary over them, and the cold-start estimates per source."""
        st.record(name)
        profiles = await stored_profiles(name, max(1, min(last, 500)))
        return {"function": name, "profiles": [p.to_dict() for p in profiles],
                "summary": [dataclasses.asdict(x) for x in summarize(profiles)],
                "estimates": await cold_start_estimates(name)}

    @app.post("/v1/functions/{name}/startups", status_code=201, dependencies=[admin])
    async def add_startups(name: str, request: Request) -> dict[str, Any]:
        """Store starts measured elsewhere (``faascale coldstart profile`` runs them in fresh
        processes): they count for the estimates like the platform's own."""
        body = await parse_body(request, oa.StartupProfiles)
        st.record(name)
        for p in body.profiles:
            profile = StartupProfile.from_dict(p.model_dump())
            await run_in_threadpool(ctx.registry.add_event, name, STARTUP_PROFILE,
                                    {"profile": {**profile.to_dict(), "function": name}},
                                    profile.started_at_s)
        return {"function": name, "stored": len(body.profiles)}

    async def stored_profiles(name: str, last: int) -> list[StartupProfile]:
        events = await run_in_threadpool(ctx.registry.events, name, STARTUP_PROFILE, last)
        out = []
        for e in events:
            try:
                out.append(StartupProfile.from_dict(e["profile"]))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    @app.put("/v1/functions/{name}/estimates", dependencies=[admin])
    async def pin_estimates(name: str, request: Request) -> dict[str, Any]:
        """Pin the function's cold-start estimates (an operator forcing how replicas load), or
        unpin them with ``{"estimates": null}``."""
        body = await parse_body(request, oa.PinEstimates)
        st.record(name)
        if ctx.pin_estimates is None:
            raise ApiError(501, "this platform has no estimates to pin", "not_supported")
        pins = None if body.estimates is None else [e.model_dump() for e in body.estimates]
        await run_in_threadpool(ctx.pin_estimates, name, pins)
        return {"function": name, "estimates": await cold_start_estimates(name)}

    async def cold_start_estimates(name: str) -> list[dict[str, Any]]:
        try:
            return await run_in_threadpool(ctx.estimates, name)
        except Exception as exc:  # the events actor is restarting: status must still answer
            log.warning("cold-start estimates unavailable: %s", exc)
            return []

    @app.get("/v1/functions/{name}/logs", dependencies=[admin])
    async def logs(name: str, tail: int = 200) -> dict[str, Any]:
        st.record(name)
        return {"function": name, "lines": await run_in_threadpool(ctx.logs, name, max(1, min(tail, 5000)))}

    async def pipecast_progress() -> dict[str, Any]:
        try:
            return await run_in_threadpool(ctx.pipecast)
        except Exception as exc:  # the coordinator is restarting: status must still answer
            log.warning("PipeCast progress unavailable: %s", exc)
            return {}

    async def _status(record: FunctionRecord) -> dict[str, Any]:
        counts = await st.refresh_counts(force=True)
        events = await run_in_threadpool(ctx.registry.events, record.name, None, 50)
        out = _summary(record, counts.get(record.name))
        out.update({
            "spec": record.spec.to_document(),
            "model_dir": record.model_dir,
            "scale_events": [e for e in events if e["kind"] == "scale_intent"][:10],
            "cold_starts": [e for e in events if e["kind"] == "cold_start"][:10],
            "start_failures": [e for e in events if e["kind"] == "start_failed"][:5],
            "gateway": {"in_flight": st.in_flight[record.name],
                        "waiting_first_token": st.waiting[record.name]},
            "nodes": await run_in_threadpool(ctx.tier_stats),
            "warm_pool": ctx.warm_pool(),
            "pipecast": _pipecast_summary((await pipecast_progress()).get(record.model_id)),
            "estimates": await cold_start_estimates(record.name),
            "coldstart": _coldstart_summary(await stored_profiles(record.name, 20)),
        })
        return out

    # ------------------------------------------------------------------ invoke

    async def open_stream(name: str, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Send a request to the function and wait (bounded) for its first item."""
        spec = st.record(name).spec
        st.ensure_refresher()
        counts = st.counts.get(name)  # at most counts_refresh_s old
        if counts is None or counts.running + counts.starting == 0:
            await _scale_from_zero(name)
        st.waiting[name] += 1
        m.queue.labels(name).set(st.waiting[name])
        gen = st.handle(name).generate.remote(payload)
        try:
            first = await _first_item(name, gen, spec.scaling.cold_start_timeout_s)
        except StopAsyncIteration:
            raise ApiError(502, f"function {name!r} ended the stream without output",
                           "bad_gateway") from None
        finally:
            st.waiting[name] -= 1
            m.queue.labels(name).set(st.waiting[name])
        if "error" in first:
            e = first["error"]
            raise ApiError(int(e.get("status", 400)), str(e.get("message")), str(e.get("type")))
        return first, gen

    async def _first_item(name: str, gen: Any, timeout_s: float) -> dict[str, Any]:
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
            failure = st.start_failures.get(name)
            counts = st.counts.get(name)
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

    async def _scale_from_zero(name: str) -> None:
        """Serve does not call custom policies from zero: raise the intent here, once per burst."""
        now = ctx.clock()
        if now - st.zero_intent_at.get(name, 0.0) < 5.0:
            return
        st.zero_intent_at[name] = now
        intent = {"function": name, "kind": "scale_intent", "from_replicas": 0, "to_replicas": 1,
                  "reason": "request at zero", "at_s": now, "ongoing_requests": st.in_flight[name] + 1}
        ctx.report(intent)

    async def chunks(name: str, payload: dict[str, Any]) -> TokenStream:
        """The request's token stream, holding one in-flight slot until it is closed. Its first
        chunk is fetched before any response is sent, so a rejected request still gets its 4xx."""
        t0 = time.perf_counter()
        spec = st.record(name).spec
        # Replicas take 2x their target concurrency (Serve's max_ongoing_requests); beyond what
        # every replica can hold plus the function's queue allowance, shed load now.
        capacity = spec.scaling.max_replicas * 2 * spec.target_concurrency + \
            spec.scaling.max_queued_requests
        if st.in_flight[name] >= capacity:
            raise ApiError(429, f"function {name!r} has {st.in_flight[name]} requests in flight "
                           f"(limit {capacity}); retry later", "rate_limited", {"Retry-After": "1"})
        st.in_flight[name] += 1
        m.in_flight.labels(name).set(st.in_flight[name])

        def release() -> None:
            st.in_flight[name] -= 1
            m.in_flight.labels(name).set(st.in_flight[name])

        try:
            first, gen = await open_stream(name, payload)
        except BaseException:
            release()
            raise
        last = time.perf_counter()
        m.ttft.labels(name).observe(last - t0)

        def on_item(item: dict[str, Any]) -> None:
            nonlocal last
            now = time.perf_counter()
            if item is not first:
                m.itl.labels(name).observe(now - last)
            last = now
            if item.get("finished"):
                m.tokens.labels(name, "prompt").inc(item["num_prompt_tokens"])
                m.tokens.labels(name, "completion").inc(item["num_output_tokens"])

        def on_close() -> None:
            release()
            m.e2e.labels(name).observe(time.perf_counter() - t0)

        return TokenStream(first, gen, stall_timeout_s=spec.scaling.stall_timeout_s,
                           on_item=on_item, on_close=on_close)

    async def collect(stream: TokenStream) -> tuple[str, dict[str, Any]]:
        text, last = [], {}
        try:
            async for c in stream:
                text.append(c["text"])
                last = c
        except StreamStalled as exc:
            raise ApiError(504, f"{STALLED}: {exc}", "stream_stalled") from None
        finally:
            stream.close()
        return "".join(text), last

    def stream_error(exc: BaseException) -> dict[str, Any] | None:
        """The SSE error event that ends a stream for ``exc`` (None: not ours to type)."""
        if isinstance(exc, StreamStalled):
            log.warning("a stream stalled: %s", exc)
            return _error_body(504, f"{STALLED}: {exc}", "stream_stalled")
        if _replica_died(exc):
            log.warning("a replica died under a stream: %s", str(exc).splitlines()[0])
            return _error_body(503, REPLICA_DIED, "replica_unavailable")  # typed, not cut
        return None

    def counted(endpoint: str, name: str, code: int) -> None:
        m.requests.labels(name, endpoint, str(code)).inc()

    async def guarded(endpoint: str, name: str, make: Callable[[], Any]) -> Any:
        try:
            response = await make()
        except ApiError as exc:
            counted(endpoint, name, exc.status)
            raise
        counted(endpoint, name, 200)
        return response

    def max_tokens_default(name: str) -> int:
        return min(256, st.record(name).spec.engine.max_seq_len)

    @app.post("/v1/functions/{name}/invoke", dependencies=[invoker])
    async def invoke(name: str, request: Request) -> Any:
        async def run() -> Any:
            body = await parse_body(request, oa.InvokeRequest)
            st.record(name)
            try:
                body.check_supported()
                payload = body.payload(max_tokens_default(name))
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            stream = await chunks(name, payload)
            if body.stream:
                async def events() -> AsyncIterator[dict[str, Any]]:
                    async for c in stream:
                        yield {"text": c["text"], "finished": c["finished"],
                               "finish_reason": c["finish_reason"]}
                return sse(events(), stream, stream_error)
            text, last = await collect(stream)
            return {"function": name, "text": text, "finish_reason": last.get("finish_reason"),
                    "usage": oa.usage_of(last)}

        return await guarded("invoke", name, run)

    @app.get("/v1/models", dependencies=[invoker])
    async def models() -> dict[str, Any]:
        records = await run_in_threadpool(ctx.registry.list)
        return {"object": "list", "data": [{"id": r.name, "object": "model",
                                            "created": int(r.created_s), "owned_by": "faascale"}
                                           for r in records]}

    @app.post("/v1/completions", dependencies=[invoker])
    async def completions(request: Request) -> Any:
        body = await parse_body(request, oa.CompletionRequest)
        name = body.model

        async def run() -> Any:
            st.record(name)
            try:
                body.check_supported()
                prompt = body.single_prompt()
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            payload = {"params": body.params(16),  # OpenAI's default max_tokens for completions
                       "max_tokens_requested": body.max_tokens is not None}
            payload["prompt_ids" if isinstance(prompt, list) else "prompt"] = prompt
            stream = await chunks(name, payload)
            rid = oa.new_id("cmpl")
            if body.stream:
                async def events() -> AsyncIterator[dict[str, Any]]:
                    async for c in stream:
                        finish = oa.openai_finish(c["finish_reason"]) if c["finished"] else None
                        yield oa.completion_chunk(rid, name, c["text"], finish)
                        if c["finished"] and body.include_usage:
                            yield oa.usage_chunk(rid, name, "text_completion",
                                                 oa.usage_of(c))
                return sse(events(), stream, stream_error)
            text, last = await collect(stream)
            return oa.completion_response(rid, name, text, oa.openai_finish(last.get("finish_reason")),
                                          oa.usage_of(last))

        return await guarded("completions", name, run)

    @app.post("/v1/chat/completions", dependencies=[invoker])
    async def chat(request: Request) -> Any:
        body = await parse_body(request, oa.ChatRequest)
        name = body.model

        async def run() -> Any:
            st.record(name)
            try:
                body.check_supported()
                messages = body.chat_messages()
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            params = body.params(max_tokens_default(name))
            if body.max_completion_tokens:
                params["max_tokens"] = body.max_completion_tokens
            stream = await chunks(name, {"messages": messages, "params": params,
                                         "max_tokens_requested": bool(body.max_tokens
                                                                      or body.max_completion_tokens)})
            rid = oa.new_id("chatcmpl")
            if body.stream:
                async def events() -> AsyncIterator[dict[str, Any]]:
                    yield oa.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None)
                    async for c in stream:
                        if c["text"]:
                            yield oa.chat_chunk(rid, name, {"content": c["text"]}, None)
                        if c["finished"]:
                            yield oa.chat_chunk(rid, name, {}, oa.openai_finish(c["finish_reason"]))
                            if body.include_usage:
                                yield oa.usage_chunk(rid, name, "chat.completion.chunk",
                                                     oa.usage_of(c))
                return sse(events(), stream, stream_error)
            text, last = await collect(stream)
            return oa.chat_response(rid, name, text, oa.openai_finish(last.get("finish_reason")),
                                    oa.usage_of(last))

        return await guarded("chat", name, run)

    return BodyLimit(app, ctx.max_body_bytes)  # type: ignore[return-value]


def _summary(record: FunctionRecord, counts: Any) -> dict[str, Any]:
    s = record.spec
    return {
        "name": record.name,
        "model_id": record.model_id,
        "created_s": record.created_s,
        "replicas": {"running": getattr(counts, "running", 0),
                     "starting": getattr(counts, "starting", 0),
                     "stopping": getattr(counts, "stopping", 0),
                     "min": s.scaling.min_replicas, "max": s.scaling.max_replicas},
        "status": getattr(counts, "status", "NOT_DEPLOYED") if counts else "NOT_DEPLOYED",
        "message": getattr(counts, "message", "") if counts else "",
    }
