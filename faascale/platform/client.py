"""HTTP client of the gateway, used by the CLI (httpx). One method per endpoint; errors are typed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from faascale.platform.state import StateDir


class PlatformError(Exception):
    """The platform is not running or answered with an error (the message is the server's)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PlatformClient:
    def __init__(self, url: str, token: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {token}"} if token else {})

    @classmethod
    def from_state(cls, state: StateDir, admin: bool = True) -> "PlatformClient":
        """The client of the platform recorded in ``state``; raises PlatformError if none runs."""
        from faascale.platform.auth import load_or_create_tokens

        info = state.read_platform()
        if info is None or not state.tokens_file.exists():
            raise PlatformError("no platform is running here; start one with `faascale up`")
        tokens = load_or_create_tokens(state.tokens_file)
        return cls(info.url, tokens.admin if admin else tokens.invoke)

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            raise PlatformError(f"{message} (HTTP {r.status_code})", r.status_code)
        return r.json()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            return self._check(self._http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise PlatformError(f"cannot reach the platform at {self.url}: {exc}") from None

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def deploy(self, spec_doc: dict[str, Any], base_dir: str) -> dict[str, Any]:
        return self._request("POST", "/v1/functions", json={**spec_doc, "base_dir": base_dir})

    def list(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/functions")["functions"]

    def status(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/functions/{name}")

    def delete(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/functions/{name}")

    def scale(self, name: str, min_replicas: int | None, max_replicas: int | None) -> dict[str, Any]:
        return self._request("POST", f"/v1/functions/{name}/scale",
                             json={"min_replicas": min_replicas, "max_replicas": max_replicas})

    def startups(self, name: str, last: int = 20) -> dict[str, Any]:
        return self._request("GET", f"/v1/functions/{name}/startups", params={"last": last})

    def add_startups(self, name: str, profiles: list[dict[str, Any]]) -> dict[str, Any]:
        return self._request("POST", f"/v1/functions/{name}/startups", json={"profiles": profiles})

    def logs(self, name: str, tail: int) -> list[str]:
        return self._request("GET", f"/v1/functions/{name}/logs", params={"tail": tail})["lines"]

    def invoke(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", f"/v1/functions/{name}/invoke", json={**body, "stream": False})

    def invoke_stream(self, name: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self._http.stream("POST", f"/v1/functions/{name}/invoke",
                                   json={**body, "stream": True}) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        yield json.loads(line[6:])
        except httpx.TransportError as exc:
            raise PlatformError(f"cannot reach the platform at {self.url}: {exc}") from None
