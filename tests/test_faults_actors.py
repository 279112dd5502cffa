"""The platform's two actors killed under load: the PipeCast coordinator (``faascale-pipecast``)
and the events sink (``faascale-events``), each SIGKILLed by its pid (read from Ray's actor table)
while a steady stream of plain and streamed requests runs.

Each test counts requests sent, completed (exactly the engine's own greedy answer, once: a plain
body, or a stream of chunks ending in ``finished`` and ``[DONE]``), failed, lost (no answer, or a
cut or altered one) and duplicated (a request the gateway served twice, or a token delivered
twice: the answer would differ from the engine's); failed, lost and duplicated must be 0, since
neither actor is on a request's path. Each actor comes back within ``RESTART_BOUND_S`` (Ray
restarts it: ``max_restarts=-1``), and the platform is whole again: the coordinator's members
rejoin it, the sink records what happens next, and a scale-out (``faascale scale --min 2``) works.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from test_platform import ROOT, Platform, free_port, tiny_doc

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
RESTART_BOUND_S = 20.0  # kill -> the actor answers again from a new process (2 busy cores)
REJOIN_BOUND_S = 10.0  # the coordinator answers -> the serving replica is a member again

# A Ray driver in the platform's cluster: one line in (an actor's name), one JSON line out (its
# row of GCS's actor table: state, pid, restarts), until stdin closes.
PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="faascale", logging_level="ERROR", log_to_driver=False)
from ray._private import state
for line in sys.stdin:
    rows = [a for a in state.actors().values() if a["Name"] == line.strip()]
    rows.sort(key=lambda a: a["State"] != "ALIVE")
    row = rows[0] if rows else {}
    print(json.dumps({"state": row.get("State"), "pid": row.get("Pid"),
                      "restarts": row.get("NumRestarts")}), flush=True)
"""


class ActorTable:
    """Ask Ray (GCS's actor table) about the platform's named actors."""

    def __init__(self, platform: Platform) -> None:
        address = json.loads((platform.home / "platform.json").read_text())["ray_address"]
        self._proc = subprocess.Popen([sys.executable, "-c", PROBE, address], env=platform.env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def row(self, name: str) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(name + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, f"the Ray probe exited ({self._proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(30)


class Load:
    """Two clients, one plain and one streaming, each sending requests one after the other (a
    unique prompt each, starting with ``tag``) until ``stop``; every request's outcome is kept."""

    def __init__(self, platform: Platform, name: str, tag: str = "") -> None:
        self.platform, self.url = platform, f"/v1/functions/{name}/invoke"
        self.tag = tag
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(mode,), daemon=True)
                         for mode in ("plain", "stream")]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
            assert not t.is_alive(), "a client is stuck"

    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def _run(self, mode: str) -> None:
        with self.platform.http() as h:
            i = 0
            while not self._stop.is_set():
                prompt = f"{self.tag}{mode} request {i}"
                i += 1
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                        "temperature": 0}
                try:
                    out = self._plain(h, body) if mode == "plain" else self._stream(h, body)
                except httpx.HTTPError as exc:  # no answer at all: lost
                    out = {"status": None, "error": repr(exc)}
                with self._lock:
                    self.results.append({"prompt": prompt, "mode": mode, **out})
                time.sleep(0.05)  # steady, and leaves the cores to the restart

    def _plain(self, h: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
        r = h.post(self.url, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text}
        out = r.json()
        complete = (out["finish_reason"] == "length"
                    and out["usage"]["completion_tokens"] == MAX_TOKENS)
        return {"status": 200, "text": out["text"], "complete": complete}

    def _stream(self, h: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
        with h.stream("POST", self.url, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "error": r.read().decode()}
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return {"status": 200, "text": None, "complete": False, "error": lines[-1:]}
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        complete = (all("error" not in c for c in chunks) and chunks[-1]["finished"]
                    and not any(c["finished"] for c in chunks[:-1])
                    and chunks[-1]["finish_reason"] == "length")
        return {"status": 200, "text": "".join(c["text"] for c in chunks), "complete": complete}


def engine_answers(platform: Platform, prompts: list[str]) -> dict[str, str]:
    """What the engine itself answers (greedy, ``MAX_TOKENS``) to each prompt, alone."""
    from faascale.engine.llm import LLM
    from faascale.engine.sampling import SamplingParams
    from faascale.engine.sources import resolve_packed
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(ROOT / "functions" / "tiny-llama")
    packed = resolve_packed(spec.resolved_source(), num_blocks=spec.model.blocks,
                            cache_dir=platform.home / "objects" / "models")
    llm = LLM.load(packed, spec.engine_config())
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return {p: c.text for p, c in zip(prompts, llm.generate(prompts, params))}


def counts(platform: Platform, results: list[dict[str, Any]]) -> Counter[str]:
    """sent, completed, failed, lost, duplicated (see the module docstring)."""
    expected = engine_answers(platform, [r["prompt"] for r in results])
    c: Counter[str] = Counter(sent=len(results))
    for r, n in Counter(r["prompt"] for r in results).items():
        c["duplicated"] += n - 1  # the clients send each prompt once
    for r in results:
        if r["status"] == 200 and r["complete"] and r["text"] == expected[r["prompt"]]:
            c["completed"] += 1
        elif r["status"] == 200 and r["complete"]:  # whole, yet not the engine's tokens
            c["duplicated"] += 1
        elif r["status"] is not None and r["status"] >= 400:
            c["failed"] += 1
        else:
            c["lost"] += 1
    return c


def gateway_served(platform: Platform, name: str) -> float:
    """``faascale_requests_total`` for the function's invoke route, answered 200."""
    metrics = httpx.get(platform.url + "/metrics").text
    m = re.search(rf'faascale_requests_total{{code="200",endpoint="invoke",function="{name}"}} '
                  r"(\S+)", metrics)
    return float(m.group(1)) if m else 0.0


def kill_under_load(platform: Platform, table: ActorTable, actor: str, name: str,
                    back: Any) -> tuple[Counter[str], float, float, float]:
    """SIGKILL ``actor`` while the load runs; wait until it answers again from a new process and
    ``back()`` is true. Returns the counts, the seconds to the new process and to ``back``, and
    when (``time.time()``) it was killed."""
    before = table.row(actor)
    assert before["state"] == "ALIVE" and before["pid"], before
    served_before = gateway_served(platform, name)
    with Load(platform, name) as load:
        deadline = time.monotonic() + 60
        while load.done() < 6:
            assert time.monotonic() < deadline, load.results
            time.sleep(0.1)
        os.kill(before["pid"], signal.SIGKILL)
        killed, killed_at = time.monotonic(), time.time()
        while True:
            row = table.row(actor)
            if row["state"] == "ALIVE" and row["pid"] not in (None, 0, before["pid"]):
                break
            assert time.monotonic() - killed < 2 * RESTART_BOUND_S, f"not restarted: {row}"
            time.sleep(0.1)
        assert row["restarts"] == before["restarts"] + 1, (before, row)
        restarted_s = time.monotonic() - killed
        while not back():
            assert time.monotonic() - killed < 2 * RESTART_BOUND_S + REJOIN_BOUND_S, \
                f"{actor} restarted after {restarted_s:.1f} s, but the platform did not recover"
            time.sleep(0.2)
        back_s = time.monotonic() - killed
        after = load.done()
        while load.done() < after + 6:  # and the load goes on afterwards
            assert time.monotonic() - killed < 120, "the load stopped after the restart"
            time.sleep(0.1)
    c = counts(platform, load.results)
    c["gateway_served_200"] = int(gateway_served(platform, name) - served_before)
    print(f"{actor}: new process in {restarted_s:.2f} s, platform whole in {back_s:.2f} s; "
          f"{dict(c)}")
    return c, restarted_s, back_s, killed_at


def assert_nothing_lost(c: Counter[str]) -> None:
    assert c["sent"] > 12, c
    assert (c["failed"], c["lost"], c["duplicated"]) == (0, 0, 0), c
    assert c["completed"] == c["sent"] == c["gateway_served_200"], c


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-actors"), free_port())
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    table = ActorTable(p)
    yield p, table
    table.close()
    p.cli("down", timeout=120)


def members(platform: Platform, name: str) -> dict[str, Any]:
    """The function's replicas in PipeCast (not the nodes' tier copies, route ``source``)."""
    found = (platform.status(name).get("pipecast") or {}).get("members") or {}
    return {k: v for k, v in found.items() if v["route"] != "source"}


def wait_for(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def scale_to_two(platform: Platform, name: str) -> dict[str, Any]:
    r = platform.cli("scale", name, "--min", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    return platform.wait_replicas(name, lambda r: r["running"] == 2 and r["stopping"] == 0, 180)


def test_the_coordinator_killed_under_load_restarts_and_its_members_rejoin(platform) -> None:
    """The coordinator's process is killed: Ray starts it again on the same port with the same
    secret, the serving replica (which knows only that address) is answered ``rejoin`` to its
    next heartbeat and joins with the blocks it holds; no request notices. Afterwards a scale to
    two replicas works, and both are members of the restarted coordinator."""
    p, table = platform
    name = "tiny-coord"
    p.deploy(tiny_doc(name, min_replicas=1, max_replicas=2))
    p.wait_replicas(name, lambda r: r["running"] == 1, 180)
    wait_for(lambda: len(members(p, name)) == 1, 60, "the replica never joined PipeCast")
    (replica,) = members(p, name)

    def rejoined() -> bool:
        m = members(p, name)
        return replica in m and m[replica]["route"] == "full" and m[replica]["blocks"] == 4

    c, restarted_s, back_s, _ = kill_under_load(p, table, "faascale-pipecast", name, rejoined)
    assert_nothing_lost(c)
    assert restarted_s < RESTART_BOUND_S, restarted_s
    assert back_s - restarted_s < REJOIN_BOUND_S, (restarted_s, back_s)

    s = scale_to_two(p, name)
    wait_for(lambda: len(members(p, name)) == 2, 60,
             f"the replicas are not both members of the restarted coordinator: "
             f"{members(p, name)}")
    assert all(m["route"] == "full" for m in members(p, name).values()), members(p, name)
    r = p.http().post(f"/v1/functions/{name}/invoke", json={"prompt": "after", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert s["replicas"]["running"] == 2
    p.cli("delete", name)


def test_the_events_actor_killed_under_load_restarts_and_records_again(platform) -> None:
    """The events sink's process is killed: Ray starts it again and it takes the reports again.
    Afterwards a scale to two replicas works, and their start-ups are recorded (``status``'s
    cold starts and ``/metrics``), which no replica could report to a sink that stayed dead;
    the estimates are answered again."""
    p, table = platform
    name = "tiny-events"
    p.deploy(tiny_doc(name, min_replicas=1, max_replicas=2))
    p.wait_replicas(name, lambda r: r["running"] == 1, 180)
    starts_before = len(p.status(name)["cold_starts"])
    assert starts_before == 1

    def answers() -> bool:  # the sink answers: the status's estimates come from it
        return bool(p.status(name)["estimates"])

    c, restarted_s, _, killed_at = kill_under_load(p, table, "faascale-events", name, answers)
    assert_nothing_lost(c)
    assert restarted_s < RESTART_BOUND_S, restarted_s

    scale_to_two(p, name)
    wait_for(lambda: len(p.status(name)["cold_starts"]) > starts_before, 30,
             "the new replica's start-up was not recorded")
    new = [e for e in p.status(name)["cold_starts"] if e["at_s"] > killed_at]
    assert new, p.status(name)["cold_starts"]
    metrics = httpx.get(p.url + "/metrics").text
    m = re.search(rf'faascale_cold_start_seconds_count{{function="{name}"[^}}]*}} (\S+)', metrics)
    assert m and float(m.group(1)) == starts_before + len(new), metrics[-2000:]
    p.cli("delete", name)


def test_a_start_does_not_wait_on_a_hung_coordinator(platform) -> None:
    """The coordinator's process is stopped (SIGSTOP: alive to Ray, answering nobody). A new
    replica asks it for its contact for at most ``COORDINATOR_TIMEOUT_S`` and then serves from
    the node's tiers without PipeCast; nothing waits on it without bound. SIGCONT heals it."""
    from faascale.platform.replica import COORDINATOR_TIMEOUT_S

    p, table = platform
    name = "tiny-hung"
    p.deploy(tiny_doc(name, min_replicas=1, max_replicas=2))
    p.wait_replicas(name, lambda r: r["running"] == 1, 180)
    pid = table.row("faascale-pipecast")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        s = scale_to_two(p, name)
        took_s = time.monotonic() - t0
        assert took_s < COORDINATOR_TIMEOUT_S + 60, took_s
        new = s["cold_starts"][0]
        assert "PEER" not in new["sources"], new  # from the node's tiers
        with p.http() as h:
            answers = [h.post(f"/v1/functions/{name}/invoke",
                              json={"prompt": "hung", "max_tokens": 4, "temperature": 0})
                       for _ in range(4)]
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert len({r.json()["text"] for r in answers}) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    p.cli("delete", name)
