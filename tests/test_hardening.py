"""Faults and careless clients against a real platform (`faascale up`, real HTTP, replica
processes stopped or killed by pid): each ends the requests it hits with a clear error within a
bound, frees what they held, and loses or duplicates nothing.

Each fault test counts requests sent, completed, failed with a clear error, lost (no answer, or
an answer cut without an error: must be 0) and duplicated (a token delivered twice: must be 0).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from test_platform import Platform, free_port, tiny_doc

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent / "data"
LONG = {"prompt": "x", "max_tokens": 2500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-hardening"), free_port())
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    yield p
    p.cli("down", timeout=120)


def wait_in_flight(platform: Platform, name: str, predicate: Any, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while not predicate(n := platform.status(name)["gateway"]["in_flight"]):
        assert time.monotonic() < deadline, f"in flight stayed {n}"
        time.sleep(0.05)
    return n


def stream_lines(platform: Platform, url: str, body: dict[str, Any], into: list[str]) -> None:
    with platform.http() as h, h.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        into.extend(ln for ln in r.iter_lines() if ln.startswith("data: "))


def two_requests_then(platform: Platform, name: str, sig: int) -> tuple[Any, list[str], float]:
    """Run a plain and a streamed long request on ``name``'s only replica; once both run (the
    stream has 3 lines), send it ``sig``. Returns the plain response, the stream's data lines and
    the seconds from the signal to both ends."""
    pid = platform.status(name)["cold_starts"][0]["pid"]
    url = f"/v1/functions/{name}/invoke"
    streamed: list[str] = []
    with cf.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(platform.http().post, url, json=LONG)
        streaming = pool.submit(stream_lines, platform, url, LONG, streamed)
        deadline = time.monotonic() + 60
        while platform.status(name)["gateway"]["in_flight"] < 2 or len(streamed) < 3:
            assert time.monotonic() < deadline, "the two requests never ran"
            time.sleep(0.05)
        os.kill(pid, sig)
        sent = time.monotonic()
        r = plain.result(timeout=30)
        streaming.result(timeout=30)
        return r, streamed, time.monotonic() - sent


def events_of(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]


def test_a_client_that_leaves_before_its_first_token_frees_its_slot(platform: Platform) -> None:
    """A streamed request waits for its first token (the handler holds it 3 s, as a cold start
    would); its client hangs up. When the token arrives the response is dropped before its body
    starts, which used to leak the request's in-flight slot for ever (here, with one replica,
    target 1 and no queue: 2 slots, so two such clients meant 429 for every later request).
    Sent 4 (two abandoned), completed 2, lost 0."""
    name = "tiny-abandoned"  # capacity: 1 replica x 2 x target 1 + 0 queued = 2 in flight
    doc = tiny_doc(name, min_replicas=1, max_replicas=1, target_concurrency=1,
                   max_queued_requests=0)
    r = platform.http("admin").post("/v1/functions", json={
        **doc, "handler": "delay:preprocess", "base_dir": str(DATA / "slow-fn")})
    assert r.status_code in (200, 201), r.text
    body = json.dumps({"prompt": "slow", "max_tokens": 8, "stream": True}).encode()
    request = (f"POST /v1/functions/{name}/invoke HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {platform.tokens['invoke']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    clients = [socket.create_connection(("127.0.0.1", platform.port)) for _ in range(2)]
    for c in clients:
        c.sendall(request + body)
    wait_in_flight(platform, name, lambda n: n == 2, 30)  # both wait for their first token
    for c in clients:
        c.close()  # gone before a byte of the response
    wait_in_flight(platform, name, lambda n: n == 0, 30)
    with cf.ThreadPoolExecutor(2) as pool:  # both slots are there to take
        done = [pool.submit(platform.http().post, f"/v1/functions/{name}/invoke",
                            json={**LONG, "max_tokens": 8}) for _ in range(2)]
        assert [f.result().status_code for f in done] == [200, 200]
    assert platform.status(name)["gateway"]["in_flight"] == 0
    platform.cli("delete", name)


def test_a_stopped_replica_ends_its_requests_with_a_stall_error(platform: Platform) -> None:
    """The replica is stopped (SIGSTOP) under a plain and a streamed request: after
    ``stall_timeout_s`` (2 s) without a token the plain one gets 504 ``stream_stalled`` and the
    stream ends with that error event after the tokens it had (no [DONE]); both slots are freed;
    once continued (SIGCONT) the replica serves again. Sent 3, completed 1, failed with a clear
    error 2, lost 0, duplicated 0."""
    name = "tiny-stalled"
    doc = tiny_doc(name, min_replicas=1, max_replicas=1)
    doc["scaling"]["stall_timeout_s"] = 2
    platform.deploy(doc)
    pid = platform.status(name)["cold_starts"][0]["pid"]
    try:
        r, streamed, ended_s = two_requests_then(platform, name, signal.SIGSTOP)
        assert platform.status(name)["gateway"]["in_flight"] == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.status_code == 504 and r.json()["error"]["type"] == "stream_stalled", r.text
    events = events_of(streamed)
    assert "data: [DONE]" not in streamed
    assert events[-1]["error"]["type"] == "stream_stalled", events[-1]
    assert events[-1]["error"]["code"] == 504
    assert all("error" not in e and not e["finished"] for e in events[:-1])
    assert 1 <= ended_s < 6, ended_s  # the 2 s count from the last token, just before the stop
    again = platform.http().post(f"/v1/functions/{name}/invoke", json={**LONG, "max_tokens": 4})
    assert again.status_code == 200, again.text
    platform.cli("delete", name)


def test_a_replica_killed_mid_request_ends_both_requests_with_a_typed_503(
        platform: Platform) -> None:
    """The only replica is killed (SIGKILL, by pid) while a plain and a streamed request run on
    it: the plain one gets 503 ``replica_unavailable`` (nothing was sent: safe to retry), the
    stream ends with that error event after the tokens it had, no [DONE], nothing after; both
    end within 5 s of the kill. Sent 2, failed with a clear error 2, lost 0, duplicated 0."""
    name = "tiny-doomed"
    platform.deploy(tiny_doc(name, min_replicas=1, max_replicas=1))
    r, streamed, ended_s = two_requests_then(platform, name, signal.SIGKILL)
    assert r.status_code == 503 and r.json()["error"]["type"] == "replica_unavailable", r.text
    assert r.headers["retry-after"] == "1"
    events = events_of(streamed)
    assert "data: [DONE]" not in streamed
    assert events[-1]["error"]["type"] == "replica_unavailable", events[-1]
    assert all("error" not in e and not e["finished"] for e in events[:-1])  # tokens, no repeat
    assert ended_s < 5, ended_s
    platform.cli("delete", name)


HEALTHY_TOKENS = 500  # long enough to outlast the bad inputs (asserted)


def test_bad_inputs_beside_three_healthy_streams_touch_nothing(platform: Platform) -> None:
    """Three greedy streams run on one replica while every bad input of the hardening issue is
    sent to the same function: each bad one gets its answer (a 4xx naming the field, or for a
    temperature below vLLM's 1e-5, greedy sampling, as vLLM does), and the three streams finish
    with exactly the text each gets alone (nothing lost, nothing twice)."""
    name = "tiny-beside"
    platform.deploy(tiny_doc(name, min_replicas=1, max_replicas=1, target_concurrency=8))
    url = f"/v1/functions/{name}/invoke"
    healthy = [{"prompt": f"healthy stream {i}", "max_tokens": HEALTHY_TOKENS, "ignore_eos": True,
                "temperature": 0} for i in range(3)]

    def stream_text(body: dict[str, Any]) -> tuple[str, int, str]:
        """The stream's text, how many chunks brought it, and its finish reason."""
        lines: list[str] = []
        stream_lines(platform, url, body, lines)
        assert lines and lines[-1] == "data: [DONE]", lines[-2:]
        chunks = events_of(lines)
        assert not [c for c in chunks if "error" in c], chunks
        assert chunks[-1]["finished"] and not any(c["finished"] for c in chunks[:-1]), chunks[-2:]
        return ("".join(c["text"] for c in chunks), len(chunks), chunks[-1]["finish_reason"])

    # alone: through the same replica (the same threads, so the same float sums: over hundreds
    # of tokens of a random model, another thread count can break a near-tie another way)
    alone = [stream_text(b) for b in healthy]
    assert all(why == "length" and n > 1 for _, n, why in alone), [a[1:] for a in alone]
    bad: list[tuple[str, dict[str, Any], Any]] = [  # (what, request, check of the response)
        ("temperature 1e-45", {"json": {"prompt": "x", "max_tokens": 4, "temperature": 1e-45}},
         lambda r: r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4),
        ("seed 2^64", {"json": {"prompt": "x", "seed": 18446744073709551616}},
         lambda r: r.status_code == 400 and "seed" in r.json()["error"]["message"]),
        ("max_tokens 1e8", {"json": {"prompt": "x", "max_tokens": 100_000_000}},
         lambda r: r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]),
        ("temperature 7", {"json": {"prompt": "x", "temperature": 7}},
         lambda r: r.status_code == 422 and "temperature" in r.json()["error"]["message"]),
        ("top_p -1", {"json": {"prompt": "x", "top_p": -1}},
         lambda r: r.status_code == 422 and "top_p" in r.json()["error"]["message"]),
        ("not JSON", {"content": b"{not json"},
         lambda r: r.status_code == 400 and "JSON" in r.json()["error"]["message"]),
        ("a 3 MB prompt", {"json": {"prompt": "x" * (3 << 20)}},
         lambda r: r.status_code == 413),
        ("a non-ASCII token", {"json": {"prompt": "x"},
                               "headers": {"Authorization": b"Bearer caf\xe9"}},
         lambda r: r.status_code == 401),
    ]
    model_chat = (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    with cf.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_text, b) for b in healthy]
        wait_in_flight(platform, name, lambda n: n >= 3, 60)  # all three are running
        answers = []
        with platform.http("invoke") as h:
            for _, kwargs, _ in bad:
                answers.append(h.post(url, **kwargs))
            lone = h.post("/v1/chat/completions", content=model_chat,
                          headers={"Content-Type": "application/json"})
        still_running = platform.status(name)["gateway"]["in_flight"]
        together = [f.result(timeout=120) for f in streams]
    wrong = [(what, r.status_code, r.text[:200]) for (what, _, check), r in zip(bad, answers)
             if not check(r)]
    assert not wrong, wrong
    assert lone.status_code == 404 and "DNS labels" in lone.json()["error"]["message"], lone.text
    assert still_running >= 3, "the streams ended before the bad inputs were all answered"
    same = sum(t[0] == a[0] and t[2] == "length" for t, a in zip(together, alone))
    print(f"beside {len(bad) + 1} bad inputs: 3 healthy streams sent, {same} completed with "
          f"the text each got alone, failed 0, lost {3 - same}")
    # every token, in order, none twice, none missing: the text each stream got alone
    assert [t[0] for t in together] == [a[0] for a in alone]
    assert all(t[2] == "length" for t in together), [t[1:] for t in together]
    platform.cli("delete", name)
