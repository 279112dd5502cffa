"""The gateway's ``/metrics`` (issue 18): bounded label values, an optional token, one backend
fetch per refresh however many scrapes, and a bounded wait on a hung backend.

The real app (``create_app``) over a real SQLite registry, called as an ASGI server calls it; a
fake stands in for Ray Serve (``Backend``): its replica counts are counted and can hang, its
handle streams one scripted answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from faascale.platform.auth import METRICS_TOKEN_ENV, Tokens, metrics_token_from_env
from faascale.platform.gateway import create_app
from faascale.platform.gateway_context import GatewayContext
from faascale.platform.metrics import UNKNOWN_FUNCTION
from faascale.platform.registry import Registry
from faascale.platform.spec import parse_function_spec

TOKENS = Tokens(admin="admin-token", invoke="invoke-token")
INVOKE = {"Authorization": "Bearer invoke-token"}
DEPLOYED = "tiny-known"


@dataclass
class Counts:
    running: int = 1
    starting: int = 0
    stopping: int = 0


class OneAnswer:
    """Serve's response generator as the gateway uses it: one finished item."""

    def __init__(self) -> None:
        self.items = [{"text": "hi", "finished": True, "finish_reason": "stop",
                       "num_prompt_tokens": 3, "num_output_tokens": 1}]

    async def __anext__(self) -> dict[str, Any]:
        if self.items:
            return self.items.pop(0)
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class FakeHandle:
    def options(self, stream: bool) -> FakeHandle:
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, payload: dict[str, Any]) -> OneAnswer:
        return OneAnswer()


class FakeBackend:
    """Ray Serve as the gateway sees it; ``counts`` is counted, takes ``delay_s`` and waits for
    ``release`` (set: no wait)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.count_calls = delay_s, 0
        self.release = threading.Event()
        self.release.set()

    def deploy(self, record: Any) -> None:
        pass

    def delete(self, name: str) -> None:
        pass

    def handle(self, name: str) -> FakeHandle:
        return FakeHandle()

    def counts(self) -> dict[str, Counts]:
        self.count_calls += 1
        self.release.wait()
        time.sleep(self.delay_s)
        return {DEPLOYED: Counts()}


def make_app(tmp_path: Path, backend: FakeBackend, **settings: Any) -> tuple[Any, dict[str, int]]:
    """The gateway app with DEPLOYED in its registry, and the calls each other view got."""
    registry = Registry(tmp_path / "registry.db")
    spec = parse_function_spec({"name": DEPLOYED, "model": {"source": "random://tiny-llama"},
                                "resources": {"num_cpus": 0}}, tmp_path)
    registry.put(spec, str(tmp_path / "model"), "model-id")
    calls = {"tiers": 0, "events": 0}

    def tier_stats() -> dict[str, Any]:
        calls["tiers"] += 1
        return {"node1": {"tiers": {"HOST": {"used_bytes": 1, "capacity_bytes": 2}},
                          "hits": {"HOST": 3}, "host_full": 4, "disk_full": 5}}

    events_since = registry.events_since

    def counted_events(*args: Any) -> Any:
        calls["events"] += 1
        return events_since(*args)

    registry.events_since = counted_events  # type: ignore[method-assign]
    ctx = GatewayContext(registry=registry, backend=backend, tokens=TOKENS,
                         resolve_model=lambda spec: ("", "", ""), report=lambda intent: None,
                         logs=lambda name, tail: [], tier_stats=tier_stats, **settings)
    return create_app(ctx), calls


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                             timeout=30)


def function_labels(metrics: str) -> set[str]:
    return set(re.findall(r'[{,]function="([^"]*)"', metrics))


def made_up_name(rng: random.Random) -> str:
    """A model name no one deployed: a DNS label, or anything a client may send in a path
    segment (no ``/``)."""
    if rng.random() < 0.5:
        return "fn-" + "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
    chars = string.ascii_letters + string.punctuation.replace("/", "") + "é☃ \udcff"
    return "x" + "".join(rng.choices(chars, k=rng.randint(1, 40)))


def test_made_up_model_names_add_no_label_values(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, FakeBackend(), metrics_refresh_s=0.0)
    rng = random.Random(18)

    async def run() -> tuple[str, str, dict[str, int]]:
        async with client(app) as c:
            ok = await c.post(f"/v1/functions/{DEPLOYED}/invoke", headers=INVOKE,
                              json={"prompt": "hello", "max_tokens": 1})
            assert ok.status_code == 200, ok.text
            before = (await c.get("/metrics")).text
            sent = {"chat": 0, "completions": 0, "invoke": 0}
            for i in range(1000):
                name = made_up_name(rng)
                endpoint = ("chat", "completions", "invoke")[i % 3]
                if endpoint == "chat":  # json.dumps escapes a lone surrogate as JSON does
                    r = await c.post("/v1/chat/completions", headers=INVOKE, content=json.dumps({
                        "model": name, "messages": [{"role": "user", "content": "hi"}]}))
                elif endpoint == "completions":
                    r = await c.post("/v1/completions", headers=INVOKE,
                                     content=json.dumps({"model": name, "prompt": "hi"}))
                else:
                    path = quote(name.encode("utf-8", "surrogatepass"), safe="")
                    r = await c.post(f"/v1/functions/{path}/invoke", headers=INVOKE,
                                     json={"prompt": "hi"})
                assert r.status_code == 404, (name, r.status_code, r.text)
                assert r.json()["error"]["type"] == "not_found"
                sent[endpoint] += 1
            return before, (await c.get("/metrics")).text, sent

    before, after, sent = asyncio.run(run())
    assert DEPLOYED in function_labels(before)
    assert function_labels(after) <= function_labels(before) | {UNKNOWN_FUNCTION}
    assert re.search(rf'faascale_requests_total{{code="200",endpoint="invoke",function="{DEPLOYED}"}} 1',
                     after)
    for endpoint, n in sent.items():
        assert re.search(rf'faascale_requests_total{{code="404",endpoint="{endpoint}",'
                         rf'function="{UNKNOWN_FUNCTION}"}} {n}\.0', after), endpoint
    series = [ln for ln in after.splitlines() if ln.startswith("faascale_requests_total{")]
    assert len(series) == 4, series  # the deployed function's 200 and one 404 per endpoint


def test_metrics_needs_its_token_when_one_is_set(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, FakeBackend(), metrics_token="metrics-token")
    (tmp_path / "open").mkdir()
    open_app, _ = make_app(tmp_path / "open", FakeBackend())

    async def run() -> None:
        async with client(app) as c:
            anon = await c.get("/metrics")
            assert anon.status_code == 401 and anon.headers["www-authenticate"] == "Bearer"
            assert anon.json()["error"]["type"] == "unauthorized"
            wrong = await c.get("/metrics", headers={"Authorization": "Bearer metrics-tokeN"})
            assert wrong.status_code == 401
            assert (await c.get("/metrics", headers=INVOKE)).status_code == 403
            for token in ("metrics-token", "admin-token"):
                r = await c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200 and "faascale_replicas{" in r.text, token
            assert (await c.get("/healthz")).status_code == 200  # probes stay open
        async with client(open_app) as c:  # no token set: open, as Prometheus expects
            assert (await c.get("/metrics")).status_code == 200

    asyncio.run(run())


def test_the_metrics_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(METRICS_TOKEN_ENV, raising=False)
    assert metrics_token_from_env() is None
    monkeypatch.setenv(METRICS_TOKEN_ENV, "")
    assert metrics_token_from_env() is None
    monkeypatch.setenv(METRICS_TOKEN_ENV, "s3cret")
    assert metrics_token_from_env() == "s3cret"
    for bad in ("two words", "caf\u00e9", "line\nbreak"):
        monkeypatch.setenv(METRICS_TOKEN_ENV, bad)
        with pytest.raises(ValueError, match=METRICS_TOKEN_ENV):
            metrics_token_from_env()


def test_concurrent_scrapes_share_one_backend_refresh(tmp_path: Path) -> None:
    backend = FakeBackend(delay_s=0.3)
    app, calls = make_app(tmp_path, backend, metrics_refresh_s=1.0)

    async def run() -> list[httpx.Response]:
        async with client(app) as c:
            scrapes = await asyncio.gather(*(c.get("/metrics") for _ in range(20)))
            again = await c.get("/metrics")  # within the refresh interval: no fetch
            assert (backend.count_calls, calls["tiers"], calls["events"]) == (1, 1, 1)
            await asyncio.sleep(1.1)
            later = await c.get("/metrics")  # the interval passed: one more
            assert (backend.count_calls, calls["tiers"], calls["events"]) == (2, 2, 2)
            return [*scrapes, again, later]

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert all(f'faascale_replicas{{function="{DEPLOYED}",state="running"}} 1.0' in r.text
               for r in responses)
    assert all('faascale_tier_hits{node="node1",tier="HOST"} 3.0' in r.text for r in responses)
    assert all('faascale_tier_no_room_blocks{node="node1",tier="HOST"} 4.0' in r.text and
               'faascale_tier_no_room_blocks{node="node1",tier="DISK"} 5.0' in r.text
               for r in responses)


def test_a_scrape_while_the_backend_hangs_returns_within_the_bound(tmp_path: Path) -> None:
    backend = FakeBackend()
    app, calls = make_app(tmp_path, backend, metrics_refresh_s=0.0, metrics_wait_s=0.5)

    def age(metrics: str, source: str) -> float:
        found = re.search(rf'faascale_metrics_age_seconds{{source="{source}"}} (\S+)', metrics)
        assert found, metrics
        return float(found.group(1))

    async def run() -> None:
        async with client(app) as c:
            fresh = await c.get("/metrics")
            assert age(fresh.text, "replicas") < 0.5
            backend.release.clear()  # Serve's controller stops answering
            try:
                t0 = time.monotonic()
                hung = await c.get("/metrics")
                hung_s = time.monotonic() - t0
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                again = await c.get("/metrics")  # the hung fetch is past its bound: no wait
                again_s = time.monotonic() - t0
            finally:
                backend.release.set()
            assert hung.status_code == again.status_code == 200
            assert 0.4 <= hung_s < 1.5, hung_s
            assert again_s < 0.3, again_s
            assert backend.count_calls == 2  # one fetch, still running, shared by both
            # the last values, and how old they are; the other views stayed fresh
            assert f'faascale_replicas{{function="{DEPLOYED}",state="running"}} 1.0' in again.text
            assert age(again.text, "replicas") >= 0.8
            assert age(again.text, "tiers") < 0.5 and calls["tiers"] == 3
            await asyncio.sleep(0.2)  # the released fetch lands
            assert age((await c.get("/metrics")).text, "replicas") < 0.5

    asyncio.run(run())


def test_a_view_never_fetched_has_an_infinite_age(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.release.clear()
    app, _ = make_app(tmp_path, backend, metrics_wait_s=0.2)

    async def run() -> str:
        async with client(app) as c:
            try:
                return (await c.get("/metrics")).text
            finally:
                backend.release.set()

    text = asyncio.run(run())
    assert 'faascale_metrics_age_seconds{source="replicas"} +Inf' in text
    assert "faascale_replicas{" not in text
