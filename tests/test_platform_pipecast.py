"""PipeCast inside the platform: a scale-up copies the model from the replica already serving.

One machine is one Ray node, where a new replica would normally map the model from the node's
HOST tier; ``FAASCALE_PIPECAST_PREFER_PEERS=1`` makes it take the multi-node path instead (join
the coordinator, receive every block over the transport from the serving replica, serve through
the member's engine). Real platform, real Serve replicas, real sockets on loopback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_platform import Platform, free_port, tiny_doc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Platform(tmp_path_factory.mktemp("faascale-pipecast"), free_port())
    p.env["FAASCALE_PIPECAST_PREFER_PEERS"] = "1"
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    yield p
    p.cli("down", timeout=120)


def test_a_second_replica_gets_the_model_from_the_first(platform: Platform) -> None:
    name = "tiny-pc"
    platform.deploy(tiny_doc(name, min_replicas=1, max_replicas=2))
    platform.wait_replicas(name, lambda r: r["running"] == 1, 120)
    body = {"prompt": "hello pipecast", "max_tokens": 12, "temperature": 0}
    with platform.http() as h:
        before = h.post(f"/v1/functions/{name}/invoke", json=body)
        assert before.status_code == 200, before.text
        first = platform.status(name)
        assert first["cold_starts"][0]["sources"] == {"REMOTE": 4}  # nobody to copy from
        assert [v["route"] for v in first["pipecast"]["members"].values()] == ["full"]

        # `scale` sets new bounds: the serving replica stays, and the new one copies the model
        # from it.
        r = platform.cli("scale", name, "--min", "2")
        assert r.returncode == 0, r.stderr
        s = platform.wait_replicas(name, lambda r: r["running"] == 2 and r["stopping"] == 0, 120)
        colds = s["cold_starts"]
        assert [c["sources"] for c in colds] == [{"PEER": 4}, {"REMOTE": 4}], colds
        deadline = time.monotonic() + 30
        while len((pc := platform.status(name)["pipecast"])["members"]) != 2:
            assert time.monotonic() < deadline, pc["members"]
            time.sleep(0.5)
        last = pc["last"]
        assert last is not None and last["algorithm"] == "pipecast-k1" and last["done"]
        assert list(last["blocks"].values()) == [4] and last["dead"] == []
        assert last["bytes_moved"] == sum(
            f.stat().st_size for f in _packed(platform, s["model_id"]).glob("block-*.bin"))
        # Both replicas answer the same (greedy), whichever Serve picks.
        answers = {h.post(f"/v1/functions/{name}/invoke", json=body).json()["text"]
                   for _ in range(6)}
    assert answers == {before.json()["text"]}
    cli = platform.cli("status", name)
    assert re.search(r"pipecast: .* 4/4 full, .* 4/4 full", cli.stdout), cli.stdout
    assert re.search(r"last scale-out: (pipecast-k1|repair) in [\d.]+ s, [\d.]+ MiB moved", cli.stdout)
    metrics = httpx.get(platform.url + "/metrics").text
    moved = re.search(rf'faascale_pipecast_bytes_moved{{function="{name}"}} (\S+)', metrics)
    assert moved and float(moved.group(1)) == last["bytes_moved"]  # one new replica, one model
    assert len(re.findall(rf'faascale_pipecast_blocks{{function="{name}",replica="[^"]+"}} 4',
                          metrics)) == 2


def _coordinator_address(platform: Platform) -> str:
    """The coordinator actor's address, asked of it by a Ray driver of the platform's cluster."""
    ray_address = json.loads((platform.home / "platform.json").read_text())["ray_address"]
    code = ("import sys, ray\n"
            "ray.init(address=sys.argv[1], namespace='faascale', logging_level='ERROR')\n"
            "from faascale.platform.pipecast_actor import pipecast_actor\n"
            "print('address', ray.get(pipecast_actor().contact.remote(), timeout=30).address)\n")
    r = subprocess.run([sys.executable, "-c", code, ray_address], env=platform.env,
                       capture_output=True, text=True, timeout=120)
    found = re.findall(r"^address (tcp://\S+)$", r.stdout, re.M)
    assert r.returncode == 0 and found, r.stdout + r.stderr
    return found[-1]


def _listening() -> dict[int, set[str]]:
    """Every listening TCP socket on this machine: port -> the local addresses it listens on."""
    out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
    ports: dict[int, set[str]] = {}
    for line in out.splitlines():
        host, _, port = line.split()[3].rpartition(":")
        ports.setdefault(int(port), set()).add(host)
    return ports


def test_an_embedded_platform_listens_for_pipecast_on_loopback_only(platform: Platform) -> None:
    """``faascale up`` without ``--address`` runs its own Ray on this machine: the coordinator and
    every member's control, block and stage sockets listen on 127.0.0.1 and nowhere else (not
    on the node IP Ray reports, not on 0.0.0.0)."""
    name = "tiny-bind"
    platform.deploy(tiny_doc(name, min_replicas=1))
    platform.wait_replicas(name, lambda r: r["running"] == 1, 120)
    _wait(lambda: (platform.status(name).get("pipecast") or {}).get("members"), 30,
          "the replica never joined PipeCast")
    members = platform.status(name)["pipecast"]["members"]
    addresses = [a for m in members.values() for a in m["listen"]]
    assert len(addresses) == 3 * len(members), members  # control, blocks, stage
    addresses.append(_coordinator_address(platform))
    listening = _listening()
    for address in addresses:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        assert host == "127.0.0.1", address
        assert listening.get(int(port)) == {"127.0.0.1"}, (address, listening.get(int(port)))


def _packed(platform: Platform, model_id: str) -> Path:
    found = [p for p in (platform.home / "objects" / "models").iterdir()
             if (p / "manifest.json").exists() and model_id in (p / "manifest.json").read_text()]
    assert found, model_id
    return found[0]


def test_replicas_load_from_the_source_the_estimates_pick(platform: Platform) -> None:
    """Cold-start estimates decide how a new replica loads. Pinned (literal) estimates stand in
    for measured ones: with the store estimated fastest, new replicas skip the multicast even
    though this platform prefers peers; with peers fastest, they copy from the serving replica."""
    name = "tiny-est"
    platform.deploy(tiny_doc(name, min_replicas=1, max_replicas=2))
    platform.wait_replicas(name, lambda r: r["running"] == 1, 120)
    url = f"/v1/functions/{name}/estimates"
    with platform.http("admin") as admin:
        # Bad input is a 4xx with a message; an unknown function is a 404.
        bad = admin.put(url, json={"estimates": [{"source": "GPU", "ready_s": 1}]})
        assert bad.status_code in (400, 422) and "source" in bad.text
        assert admin.put("/v1/functions/nope/estimates",
                         json={"estimates": None}).status_code == 404
        # Before any pin: one estimate per source, from measurement, model or prior.
        measured = platform.status(name)["estimates"]
        assert [e["source"] for e in measured] == ["PEER", "HOST", "DISK", "REMOTE"]
        assert all(e["basis"] != "pinned" for e in measured)

        pin = admin.put(url, json={"estimates": [{"source": "REMOTE", "ready_s": 0.5},
                                                 {"source": "PEER", "ready_s": 30.0}]})
        assert pin.status_code == 200, pin.text
        assert [(e["source"], e["basis"]) for e in pin.json()["estimates"]] == [
            ("REMOTE", "pinned"), ("PEER", "pinned")]
        assert platform.cli("scale", name, "--min", "2").returncode == 0
        s = platform.wait_replicas(name, lambda r: r["running"] == 2 and r["stopping"] == 0, 120)
        new = s["cold_starts"][:1]
        assert [c["chosen_source"] for c in new] == ["REMOTE"], new
        assert all("PEER" not in c["sources"] for c in new), new  # through the node's tiers
        cli = platform.cli("status", name)
        assert re.search(r"next cold start \(estimated\): REMOTE 0\.50 s \(pinned\) <- fastest",
                         cli.stdout), cli.stdout

        # Peers estimated fastest: the next replica copies from the serving ones.
        assert admin.put(url, json={"estimates": [{"source": "PEER", "ready_s": 0.5},
                                                  {"source": "REMOTE", "ready_s": 30.0}]}
                         ).status_code == 200
        assert platform.cli("scale", name, "--min", "3", "--max", "3").returncode == 0
        s = platform.wait_replicas(name, lambda r: r["running"] == 3 and r["stopping"] == 0, 120)
        new = s["cold_starts"][:1]
        assert [c["chosen_source"] for c in new] == ["PEER"], new
        assert [c["sources"] for c in new] == [{"PEER": 4}], new
        # Unpinned: the estimates rest on the starts measured here (profiled by every replica).
        back = admin.put(url, json={"estimates": None})
        assert back.status_code == 200, back.text
        by_source = {e["source"]: e for e in back.json()["estimates"]}
        assert all(e["basis"].startswith("measured") for e in by_source.values()
                   if e["source"] in ("PEER", "HOST", "REMOTE")), by_source
    cs = platform.status(name)["coldstart"]
    assert cs["starts"] == 3 and cs["failed"] == 0  # 1 + 1 + 1 replicas: a scale replaces none
    assert cs["last"]["source"] == "PEER"
    assert {"spec_tokenizer", "weight_fetch"} <= set(cs["last"]["steps_s"])
    assert cs["last"]["total_s"] >= sum(cs["last"]["steps_s"][k] for k in
                                        ("spec_tokenizer", "weight_fetch")) > 0
    # /metrics is a view fetched at most every few seconds (and its last one while the registry
    # is busy): read it until it includes the last start
    want = re.compile(rf'faascale_startup_step_seconds_count{{function="{name}",source="HOST",'
                      rf'step="weight_fetch"}} 1')
    deadline = time.monotonic() + 30
    while not want.search(metrics := httpx.get(platform.url + "/metrics").text):
        assert time.monotonic() < deadline, "\n".join(
            line for line in metrics.splitlines()
            if line.startswith("faascale_startup_step_seconds_count") and name in line)
        time.sleep(1)
    table = platform.cli("coldstart", "profiles", name, "--last", "4")
    assert table.returncode == 0 and "weight_fetch" in table.stdout
    assert table.stdout.count("PEER") >= 1 and table.stdout.count("HOST") >= 1


def test_scaling_pipecast_false_loads_through_the_tiers(platform: Platform) -> None:
    """``scaling.pipecast: false`` keeps a function's replicas out of the multicast, even on a
    platform that prefers peers and while other replicas of the same model could serve as
    sources."""
    name = "tiny-nopc"
    doc = tiny_doc(name, min_replicas=1, max_replicas=2)
    doc["scaling"]["pipecast"] = False
    platform.deploy(doc)
    platform.wait_replicas(name, lambda r: r["running"] == 1, 120)
    assert platform.cli("scale", name, "--min", "2").returncode == 0
    s = platform.wait_replicas(name, lambda r: r["running"] == 2 and r["stopping"] == 0, 120)
    colds = s["cold_starts"][:3]
    assert all("PEER" not in c["sources"] and c["chosen_source"] == "" for c in colds), colds
    assert {k for c in colds for k in c["sources"]} <= {"HOST", "DISK", "REMOTE"}


def _tier_sources(platform: Platform, name: str) -> list[str]:
    pc = platform.status(name).get("pipecast") or {}
    return sorted(m for m, v in (pc.get("members") or {}).items() if v["route"] == "source")


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def test_a_retired_replicas_host_copy_feeds_the_next_start(platform: Platform) -> None:
    """Every holder is a source: once the function scaled to zero, no replica serves it, but the
    node's HOST tier holds it; that copy joins PipeCast (``tier_sources.py``) and the next start
    (from zero) copies it from there, as a peer. A replica mapping it again takes it back."""
    name = "tiny-src"
    doc = tiny_doc(name, keep_alive_s=3, downscale_delay_s=1)
    doc["model"]["seed"] = 11  # weights no other test deploys
    platform.deploy(doc)
    body = {"prompt": "hello source", "max_tokens": 6, "temperature": 0}
    with platform.http() as h:
        first = h.post(f"/v1/functions/{name}/invoke", json=body)
        assert first.status_code == 200, first.text
        assert platform.status(name)["cold_starts"][0]["sources"] == {"REMOTE": 4}
        assert _tier_sources(platform, name) == []  # the serving replica maps it: not offered
        platform.wait_replicas(name, lambda r: r["running"] == 0 and r["starting"] == 0, 60)
        _wait(lambda: len(_tier_sources(platform, name)) == 1, 30,
              "the HOST copy never joined PipeCast as a source")
        assert re.fullmatch(r"tier-\w{8}-host-.+", _tier_sources(platform, name)[0])
        again = h.post(f"/v1/functions/{name}/invoke", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["text"] == first.json()["text"]  # the same model, greedy
    newest = platform.status(name)["cold_starts"][0]
    assert newest["sources"] == {"PEER": 4}, newest  # from the tier copy: nobody else held it
    _wait(lambda: _tier_sources(platform, name) == [], 30,
          "the source stayed while a replica maps the copy again")
