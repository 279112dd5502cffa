"""The gateway's health and metrics routes: ``/healthz``, ``/health`` (vLLM's probe) and
``/metrics`` (Prometheus), with ``MetricsScraper``, what keeps ``/metrics`` cheap and bounded.

A scrape reports the gateway's own counters as they are, and five views fetched from elsewhere:
replica counts (Ray Serve's controller), events (SQLite: cold starts, scale intents, startup
profiles), block-store tiers (every node), warm runtimes and PipeCast progress. Each view is
fetched at most once per ``metrics_refresh_s`` however many scrapes arrive, by one fetch that
concurrent scrapes share; a scrape waits at most ``metrics_wait_s`` for the fetches it started
(none for one already running past its bound), then serves the last values.
``faascale_metrics_age_seconds{source}`` says how old each view is (+Inf: never fetched).

With ``metrics_token`` set, ``/metrics`` needs it (or the admin token) as a bearer token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from faascale.coldstart.profile import StartupProfile
from faascale.platform.auth import Role, bearer, same_token
from faascale.platform.gateway_context import ApiError, Gateway, RequestContext
from faascale.platform.registry import STARTUP_PROFILE

log = logging.getLogger(__name__)
EVENT_KINDS = ("cold_start", "scale_intent", STARTUP_PROFILE)


@dataclass
class _Source:
    """One view /metrics fetches from elsewhere: ``fetch`` blocks (it runs in a worker thread),
    ``apply`` writes its result into the metrics at once, on the event loop."""

    name: str
    fetch: Callable[[], Any]
    apply: Callable[[Any], None]
    fresh_at: float | None = None  # monotonic time of the last successful fetch
    tried_at: float | None = None  # ... of the last fetch started
    deadline: float = 0.0  # a scrape waits for the running fetch until then
    task: asyncio.Task[None] | None = None


class MetricsScraper:
    def __init__(self, gw: RequestContext) -> None:
        self.gw, self.ctx, self.m = gw, gw.ctx, gw.metrics
        self.last_event_id = 0
        self.sources = [
            _Source("replicas", self.ctx.backend.counts, self._replicas),
            _Source("events", lambda: self.ctx.registry.events_since(self.last_event_id,
                                                                      EVENT_KINDS), self._events),
            _Source("tiers", self.ctx.tier_stats, self._tiers),
            _Source("warm_pool", self.ctx.warm_pool, self._warm_pool),
            _Source("pipecast", self.ctx.pipecast, self._pipecast),
        ]

    async def render(self) -> bytes:
        """The exposition text, after waiting (bounded) for the views due a refresh."""
        now = time.monotonic()
        for s in self.sources:
            if s.task is None and (s.tried_at is None or
                                   now - s.tried_at >= self.ctx.metrics_refresh_s):
                s.tried_at, s.deadline = now, now + self.ctx.metrics_wait_s
                s.task = asyncio.get_running_loop().create_task(self._refresh(s))
        due = [(s.task, s.deadline) for s in self.sources if s.task and s.deadline > now]
        if due:  # not for a fetch past its bound: one hung backend delays one scrape, not all
            await asyncio.wait([t for t, _ in due], timeout=max(d for _, d in due) - now)
        now = time.monotonic()
        for s in self.sources:
            self.m.metrics_age.labels(s.name).set(math.inf if s.fresh_at is None
                                                  else now - s.fresh_at)
        return self.m.render()

    async def _refresh(self, s: _Source) -> None:
        try:
            data = await run_in_threadpool(s.fetch)
            s.apply(data)
            s.fresh_at = time.monotonic()
        except Exception as exc:  # a restarting actor or a locked database: keep the last values
            log.warning("metrics: %s unavailable: %s", s.name, exc)
        finally:
            s.task = None

    def _replicas(self, counts: dict[str, Any]) -> None:
        self.gw.counts, self.gw.counts_at = counts, time.monotonic()  # shared with scale from zero
        self.m.replicas.clear()
        for name, c in counts.items():
            for state in ("running", "starting", "stopping"):
                self.m.replicas.labels(name, state).set(getattr(c, state))

    def _events(self, events: list[tuple[int, str, str, dict[str, Any]]]) -> None:
        m = self.m
        for i, function, kind, data in events:
            self.last_event_id = i
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

    def _tiers(self, nodes: dict[str, Any]) -> None:
        for node, stats in nodes.items():
            for tier, t in stats["tiers"].items():
                self.m.tier_bytes.labels(node, tier).set(t["used_bytes"])
                self.m.tier_capacity.labels(node, tier).set(t["capacity_bytes"])
            for tier, hits in stats["hits"].items():
                self.m.tier_hits.labels(node, tier).set(hits)
            for tier, key in (("HOST", "host_full"), ("DISK", "disk_full")):
                self.m.tier_no_room.labels(node, tier).set(stats.get(key, 0))

    def _warm_pool(self, pools: list[dict[str, Any]]) -> None:
        for pool in pools:
            self.m.warm_idle.labels(pool["node"]).set(pool["idle"])
            self.m.warm_target.labels(pool["node"]).set(pool["target"])
            self.m.warm_taken.labels(pool["node"]).set(pool["taken_total"])

    def _pipecast(self, models: dict[str, Any]) -> None:
        m = self.m
        m.pipecast_blocks.clear()
        for model in models.values():
            fn = model["function"]
            for replica, member in model["members"].items():
                m.pipecast_blocks.labels(fn, replica).set(member["blocks"])
            active = model["active"] or {}
            m.pipecast_pipelines.labels(fn).set(len(active.get("pipelines", ())))
            m.pipecast_bytes.labels(fn).set(active.get("bytes_moved", 0) + sum(
                f["bytes_moved"] for f in model["finished"]))
            m.pipecast_serves.labels(fn).set(model["pipeline_serves"])


async def _metrics_reader(request: Request) -> None:
    """With a metrics token set: that token or the admin token, else 401 (403 for invoke)."""
    gw: RequestContext = request.app.state.gateway
    expected = gw.ctx.metrics_token
    if expected is None:
        return
    presented = bearer(request.headers.get("authorization"))
    if presented is not None and same_token(presented, expected):
        return
    role = gw.ctx.tokens.role_of(presented)
    if role is Role.ADMIN:
        return
    if role is Role.INVOKE:
        raise ApiError(403, "/metrics needs the metrics token (or the admin token)", "forbidden")
    raise ApiError(401, "missing or invalid bearer token", "unauthorized",
                   {"WWW-Authenticate": "Bearer"})


router = APIRouter()


@router.get("/healthz")
async def healthz(gw: Gateway) -> dict[str, Any]:
    return {"status": "ok", "functions": len(await run_in_threadpool(gw.ctx.registry.list))}


@router.get("/health")
async def health() -> Response:
    """vLLM's liveness probe (200, empty body): what OpenAI-server clients such as guidellm
    check before they start."""
    return Response(status_code=200)


@router.get("/metrics", dependencies=[Depends(_metrics_reader)])
async def metrics(request: Request) -> Response:
    scraper: MetricsScraper = request.app.state.metrics_scraper
    return Response(await scraper.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
