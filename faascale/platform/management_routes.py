"""The gateway's management routes, ``/v1/functions...``: deploy, list, status, delete, scale,
replica logs, startup profiles and pinned cold-start estimates."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from faascale.coldstart.profile import StartupProfile, summarize
from faascale.engine.manifest import CheckpointError
from faascale.memory_tier.store import StoreError, StoreUnavailable
from faascale.platform import openai_api as oa
from faascale.platform.gateway_context import (ApiError, Gateway, RequestContext, admin, invoker,
                                               parse_body)
from faascale.platform.registry import STARTUP_PROFILE, FunctionRecord, UnreadableRecord
from faascale.platform.spec import SpecError, parse_function_spec

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/functions", status_code=201, dependencies=[admin])
async def deploy(request: Request, gw: Gateway) -> JSONResponse:
    ctx = gw.ctx
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
        model_dir, model_id, digest = await run_in_threadpool(ctx.resolve_model, spec)
    except StoreUnavailable as exc:  # the object store is down: retry later, not a bad spec
        raise ApiError(503, f"model: {exc}", "store_unavailable", {"Retry-After": "5"}) from None
    except (ValueError, OSError, StoreError, CheckpointError) as exc:  # bad or missing model
        raise ApiError(422, f"model: {exc}", "invalid_model") from None
    existed = await run_in_threadpool(ctx.registry.exists, spec.name)
    now = ctx.clock()
    try:  # deploy first: a function Serve refused is not registered
        await run_in_threadpool(ctx.backend.deploy,
                                FunctionRecord(spec, model_dir, model_id, now, now, digest))
    except Exception as exc:
        log.exception("deploying %s failed", spec.name)
        raise ApiError(500, f"deploying {spec.name!r} failed: {str(exc).splitlines()[0][:300]}",
                       "deploy_failed") from None
    record = await run_in_threadpool(ctx.registry.put, spec, model_dir, model_id, digest)
    gw.forget(spec.name)
    await run_in_threadpool(ctx.registry.add_event, spec.name, "deploy",
                            {"model_id": model_id, "update": existed})
    return JSONResponse(await _status(gw, record), status_code=200 if existed else 201)


@router.get("/v1/functions", dependencies=[invoker])
async def list_functions(gw: Gateway) -> dict[str, Any]:
    counts = await gw.refresh_counts()
    records = await run_in_threadpool(gw.ctx.registry.list)
    return {"functions": [_summary(r, counts.get(r.name)) for r in records]}


@router.get("/v1/functions/{name}", dependencies=[invoker])
async def get_function(name: str, gw: Gateway) -> dict[str, Any]:
    return await _status(gw, await _deployed(gw, name))


@router.delete("/v1/functions/{name}", dependencies=[admin])
async def delete_function(name: str, gw: Gateway) -> dict[str, Any]:
    ctx = gw.ctx
    if not await run_in_threadpool(ctx.registry.exists, name):  # an unreadable row is deletable
        raise ApiError(404, f"function {name!r} is not deployed", "not_found")
    await run_in_threadpool(ctx.backend.delete, name)
    await run_in_threadpool(ctx.registry.delete, name)
    await run_in_threadpool(ctx.registry.add_event, name, "delete", {})
    gw.forget(name)
    return {"deleted": name}


@router.post("/v1/functions/{name}/scale", dependencies=[admin])
async def scale(name: str, request: Request, gw: Gateway) -> dict[str, Any]:
    ctx = gw.ctx
    body = await parse_body(request, oa.DeployScale)
    record = await _deployed(gw, name)
    doc = record.spec.to_document()
    doc["scaling"].update({k: v for k, v in body.model_dump().items() if v is not None})
    try:
        spec = parse_function_spec(doc, record.spec.base_dir)
    except SpecError as exc:
        raise ApiError(422, str(exc), "invalid_spec") from None
    record = await run_in_threadpool(ctx.registry.put, spec, record.model_dir, record.model_id,
                                     record.manifest_digest)
    gw.forget(name)
    await run_in_threadpool(ctx.backend.deploy, record)
    await run_in_threadpool(ctx.registry.add_event, name, "scale_config",
                            {"min_replicas": spec.scaling.min_replicas,
                             "max_replicas": spec.scaling.max_replicas})
    return await _status(gw, record)


@router.get("/v1/functions/{name}/startups", dependencies=[invoker])
async def startups(name: str, gw: Gateway, last: int = 20) -> dict[str, Any]:
    """The function's recent replica starts (``StartupProfile``s, newest first), the
    per-step summary over them, and the cold-start estimates per source."""
    gw.record(name)
    profiles = await _stored_profiles(gw, name, max(1, min(last, 500)))
    return {"function": name, "profiles": [p.to_dict() for p in profiles],
            "summary": [dataclasses.asdict(x) for x in summarize(profiles)],
            "estimates": await _cold_start_estimates(gw, name)}


@router.post("/v1/functions/{name}/startups", status_code=201, dependencies=[admin])
async def add_startups(name: str, request: Request, gw: Gateway) -> dict[str, Any]:
    """Store starts measured elsewhere (``faascale coldstart profile`` runs them in fresh
    processes): they count for the estimates like the platform's own."""
    body = await parse_body(request, oa.StartupProfiles)
    gw.record(name)
    for p in body.profiles:
        profile = StartupProfile.from_dict(p.model_dump())
        await run_in_threadpool(gw.ctx.registry.add_event, name, STARTUP_PROFILE,
                                {"profile": {**profile.to_dict(), "function": name}},
                                profile.started_at_s)
    return {"function": name, "stored": len(body.profiles)}


@router.put("/v1/functions/{name}/estimates", dependencies=[admin])
async def pin_estimates(name: str, request: Request, gw: Gateway) -> dict[str, Any]:
    """Pin the function's cold-start estimates (an operator forcing how replicas load), or
    unpin them with ``{"estimates": null}``."""
    body = await parse_body(request, oa.PinEstimates)
    gw.record(name)
    if gw.ctx.pin_estimates is None:
        raise ApiError(501, "this platform has no estimates to pin", "not_supported")
    pins = None if body.estimates is None else [e.model_dump() for e in body.estimates]
    await run_in_threadpool(gw.ctx.pin_estimates, name, pins)
    return {"function": name, "estimates": await _cold_start_estimates(gw, name)}


@router.get("/v1/functions/{name}/logs", dependencies=[admin])
async def logs(name: str, gw: Gateway, tail: int = 200) -> dict[str, Any]:
    gw.record(name)
    return {"function": name,
            "lines": await run_in_threadpool(gw.ctx.logs, name, max(1, min(tail, 5000)))}


# ---------------------------------------------------------------------- a function's status

async def _deployed(gw: RequestContext, name: str) -> FunctionRecord:
    """The registry's record of ``name`` (not the cache: management sees every change)."""
    try:
        record = await run_in_threadpool(gw.ctx.registry.get, name)
    except UnreadableRecord as exc:
        raise ApiError(503, str(exc), "unreadable_function") from None
    if record is None:
        raise ApiError(404, f"function {name!r} is not deployed", "not_found")
    return record


async def _stored_profiles(gw: RequestContext, name: str, last: int) -> list[StartupProfile]:
    events = await run_in_threadpool(gw.ctx.registry.events, name, STARTUP_PROFILE, last)
    out = []
    for e in events:
        try:
            out.append(StartupProfile.from_dict(e["profile"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


async def _cold_start_estimates(gw: RequestContext, name: str) -> list[dict[str, Any]]:
    try:
        return await run_in_threadpool(gw.ctx.estimates, name)
    except Exception as exc:  # the events actor is restarting: status must still answer
        log.warning("cold-start estimates unavailable: %s", exc)
        return []


async def _pipecast_progress(gw: RequestContext) -> dict[str, Any]:
    try:
        return await run_in_threadpool(gw.ctx.pipecast)
    except Exception as exc:  # the coordinator is restarting: status must still answer
        log.warning("PipeCast progress unavailable: %s", exc)
        return {}


async def _status(gw: RequestContext, record: FunctionRecord) -> dict[str, Any]:
    ctx = gw.ctx
    counts = await gw.refresh_counts(force=True)
    events = await run_in_threadpool(ctx.registry.events, record.name, None, 50)
    out = _summary(record, counts.get(record.name))
    out.update({
        "spec": record.spec.to_document(),
        "model_dir": record.model_dir,
        "manifest_digest": record.manifest_digest,  # replicas serve only this manifest
        "scale_events": [e for e in events if e["kind"] == "scale_intent"][:10],
        "cold_starts": [e for e in events if e["kind"] == "cold_start"][:10],
        "start_failures": [e for e in events if e["kind"] == "start_failed"][:5],
        "gateway": {"in_flight": gw.in_flight[record.name],
                    "waiting_first_token": gw.waiting[record.name]},
        "nodes": await run_in_threadpool(ctx.tier_stats),
        "warm_pool": ctx.warm_pool(),
        "pipecast": _pipecast_summary((await _pipecast_progress(gw)).get(record.model_id)),
        "estimates": await _cold_start_estimates(gw, record.name),
        "coldstart": _coldstart_summary(await _stored_profiles(gw, record.name, 20)),
    })
    return out


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
