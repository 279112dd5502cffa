"""End to end on the emulated cluster: a scale-up from 2 to 5 replicas of real SmolLM2.

Five hosts in network namespaces, 500 Mbit/s links (shaped both ways). Host 1 runs the
coordinator and a replica already serving, host 2 another; hosts 3-5 run new replicas
(``member`` processes) that hold nothing. The coordinator plans PipeCast K=2 (the manifest lists
pieces, so the agents cut through and the plan relays in two chains with rotated block orders:
r0 -> r1 -> r2 from block 0, r0b -> r3 from block 3), the blocks cross the shaped links, and a
request submitted to a new replica before it holds anything is served through a temporary
pipeline of partially loaded replicas (r1's first half and r3's second, after about half a
unicast), then finishes on the replica alone once it holds the whole model: one unbroken
stream, the model's exact tokens.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path


from faascale.engine.checkpoint import read_manifest
from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.sampling import SamplingParams
from faascale.pipecast.emulated import EmulatedCluster
from support import netns_prerequisite, requires

pytestmark = requires(*netns_prerequisite())  # skips without root/netns; fails under CI=true

PROMPT = "Write a short story about a lighthouse keeper."
MAX_TOKENS = 160
PORT = 7400


def wait_file(path: Path, procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        dead = [p.args for p in procs if p.poll() not in (None, 0)]
        assert not dead, f"processes failed: {dead}"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout_s} s"
        time.sleep(0.2)


def finish_scale_out(answer: Path, record: Path, until: Path, procs: list[subprocess.Popen],
                     logs: list, model_id: str) -> dict:
    """Wait for the prompted member's answer, then for the scale-out to finish (after the
    answer, or before); stop every process and close the logs. The coordinator's record of the
    model as the scale-out finished, before the members left (they say goodbye as they stop,
    and the coordinator forgets them)."""
    try:
        wait_file(answer, procs, timeout_s=240)
        deadline = time.monotonic() + 120
        while True:
            progress = json.loads(record.read_text())[model_id] if record.exists() else {}
            if progress.get("finished"):
                return progress
            assert time.monotonic() < deadline, (f"scale-out did not finish: {progress}\n"
                                                 f"{log_tails(logs)}")
            time.sleep(0.3)
    finally:
        until.touch()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
        for f in logs:
            f.close()


def log_tails(logs: list, lines: int = 25) -> str:
    """The last lines of every process's log (for assertion messages: CI shows no files)."""
    out = []
    for f in logs:
        text = Path(f.name).read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {Path(f.name).name}\n" + "\n".join(text))
    return "\n".join(out)


def wait_line(path: Path, start: str, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Until a line of ``path`` (a process's log) starts with ``start``."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and any(x.startswith(start) for x in path.read_text().splitlines())):
        dead = [p.args for p in procs if p.poll() not in (None, 0)]
        assert not dead, f"processes failed: {dead}"
        assert time.monotonic() < deadline, f"no {start!r} line in {path.name} in {timeout_s} s"
        time.sleep(0.2)


def test_scale_up_2_to_5_serves_through_a_pipeline_then_switches_without_a_break(
        smollm2_packed: Path, tmp_path: Path) -> None:
    manifest = read_manifest(smollm2_packed)
    secret, until = tmp_path / "secret", tmp_path / "stop"
    secret.write_bytes(secrets.token_bytes(32))
    record, answer = tmp_path / "record.json", tmp_path / "answer.json"
    py = [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = []

    def log(name: str):  # noqa: ANN202
        f = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
        logs.append(f)
        return f

    with EmulatedCluster(5, rate="500mbit") as c:
        coordinator = f"tcp://{c.host_address(1)}:{PORT}"
        procs = [c.run(1, [*py, "faascale.pipecast.service", "--bind", c.host_address(1),
                           "--port", str(PORT), "--secret-file", str(secret),
                           "--expect", f"{manifest.model_id}:3", "--join-window-s", "60",
                           "--record", str(record), "--until-file", str(until)],
                       stdout=log("coordinator"), stderr=subprocess.STDOUT, env=env)]
        member = [*py, "faascale.pipecast.member", "--model-dir", str(smollm2_packed),
                  "--coordinator", coordinator, "--secret-file", str(secret),
                  "--until-file", str(until)]
        for i, name in ((1, "r0"), (2, "r0b")):  # serving: they hold the model
            procs.append(c.run(i, [*member, "--name", name, "--holdings-dir", str(smollm2_packed),
                                   "--bind", c.host_address(i)],
                               stdout=log(name), stderr=subprocess.STDOUT, env=env))
        for name in ("r0", "r0b"):  # both joined (as sources) before any new replica asks
            wait_line(tmp_path / f"{name}.log", "ready ", procs, timeout_s=120)
        time.sleep(1.0)
        for i, name in ((3, "r1"), (4, "r2"), (5, "r3")):
            extra = ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--out",
                     str(answer)] if name == "r1" else []
            procs.append(c.run(i, [*member, "--name", name, "--bind", c.host_address(i),
                                   "--holdings-dir", str(tmp_path / name), *extra],
                               stdout=log(name), stderr=subprocess.STDOUT, env=env))
        progress = finish_scale_out(answer, record, until, procs, logs, manifest.model_id)
    done = progress["finished"][0]
    events = done["record"]
    kinds = [e["kind"] for e in events]

    # Multicast from the two replicas that served the model, in two rotated chains: every new
    # replica got every block.
    assert events[0]["detail"]["sources"] == ["r0", "r0b"]
    assert done["algorithm"] == "pipecast-k2-chain"
    assert done["dead"] == [], f"declared dead: {done['dead']}\n{log_tails(logs)}"
    assert done["blocks"] == {"r1": 6, "r2": 6, "r3": 6}, f"{done['blocks']}\n{log_tails(logs)}"
    assert done["bytes_moved"] == 3 * manifest.total_bytes
    assert {n: m["route"] for n, m in progress["members"].items()} == dict.fromkeys(
        ["r0", "r0b", "r1", "r2", "r3"], "full")

    # A temporary pipeline formed, and r1 served through it before any new replica was full.
    formed = next(e for e in events if e["kind"] == "pipelines" and e["detail"]["formed"])
    assert len(formed["detail"]["formed"][0]) >= 2  # stages on two or more replicas
    served = next(e for e in events if e["kind"] == "served")
    assert served["detail"]["replica"] == "r1" and served["detail"]["full_replicas"] == []
    assert len(served["detail"]["stages"]) >= 2
    assert kinds.index("served") < kinds.index("full")

    # One stream, unbroken across the switch from the pipeline to the whole model, and exactly
    # the model's tokens (greedy): nothing lost, nothing repeated.
    out = json.loads(answer.read_text())
    modes = [t["mode"] for t in out["tokens"]]
    assert modes[0] == "pipeline" and modes[-1] == "full", modes
    llm = LLM.load(smollm2_packed, EngineConfig(max_batch_size=1, max_seq_len=1024))
    want = llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 ignore_eos=True))[0].token_ids
    assert [t["token_id"] for t in out["tokens"]] == list(want)


def test_from_zero_4_replicas_load_parts_from_the_store_and_serve_through_a_pipeline(
        smollm2_packed: Path, tmp_path: Path) -> None:
    """No replica holds the model: the four new ones each load a different part from the
    object store (a directory here, each member through a block store of its own), serve a
    request through a temporary pipeline as soon as their parts cover the model (before any
    holds all of it), and get the rest from each other over the shaped links: at most half of
    any replica's bytes come from the store."""
    from faascale.memory_tier.local_store import LocalDirStore
    from faascale.memory_tier.packed import upload_packed

    manifest = read_manifest(smollm2_packed)
    upload_packed(LocalDirStore(tmp_path / "objects"), smollm2_packed, "smollm2")
    location = str(tmp_path / "objects" / "smollm2")
    secret, until = tmp_path / "secret", tmp_path / "stop"
    secret.write_bytes(secrets.token_bytes(32))
    record, answer = tmp_path / "record.json", tmp_path / "answer.json"
    py = [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = []

    def log(name: str):  # noqa: ANN202
        f = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
        logs.append(f)
        return f

    names = ["r1", "r2", "r3", "r4"]
    with EmulatedCluster(4, rate="500mbit") as c:
        coordinator = f"tcp://{c.host_address(1)}:{PORT + 1}"
        procs = [c.run(1, [*py, "faascale.pipecast.service", "--bind", c.host_address(1),
                           "--port", str(PORT + 1), "--secret-file", str(secret),
                           "--expect", f"{manifest.model_id}:4", "--join-window-s", "60",
                           "--record", str(record), "--until-file", str(until)],
                       stdout=log("coordinator"), stderr=subprocess.STDOUT, env=env)]
        for i, name in enumerate(names, start=1):
            extra = ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--out",
                     str(answer)] if name == "r1" else []
            procs.append(c.run(i, [*py, "faascale.pipecast.member", "--model-dir",
                                   str(smollm2_packed), "--coordinator", coordinator,
                                   "--secret-file", str(secret), "--until-file", str(until),
                                   "--name", name, "--bind", c.host_address(i),
                                   "--holdings-dir", str(tmp_path / name), "--store", location,
                                   *extra],
                               stdout=log(name), stderr=subprocess.STDOUT, env=env))
        progress = finish_scale_out(answer, record, until, procs, logs, manifest.model_id)
    done = progress["finished"][0]
    events = done["record"]
    kinds = [e["kind"] for e in events]
    assert events[0]["detail"]["sources"] == ["store"], events[0]
    assert done["dead"] == [], f"declared dead: {done['dead']}\n{log_tails(logs)}"
    assert done["blocks"] == dict.fromkeys(names, 6), f"{done['blocks']}\n{log_tails(logs)}"

    # What came from the store: the blocks each member's own block store fetched (in its HOST
    # or DISK directory, whichever it kept them in at exit).
    total = manifest.total_bytes
    size_of = {b.file: b.size_bytes for b in manifest.blocks}
    from_store = {n: sum(size_of[name] for name in {f.name for f in (tmp_path / f"{n}-tiers")
                                                    .rglob("block-*.bin")})
                  for n in names}
    assert all(0 < b <= total / 2 for b in from_store.values()), (from_store, total)
    assert sum(from_store.values()) == total  # each block loaded once, by one of them

    served = next(e for e in events if e["kind"] == "served")
    assert served["detail"]["full_replicas"] == [] and len(served["detail"]["stages"]) >= 2
    assert kinds.index("served") < kinds.index("full")
    out = json.loads(answer.read_text())
    modes = [t["mode"] for t in out["tokens"]]
    assert modes[0] == "pipeline" and modes[-1] == "full", modes
    llm = LLM.load(smollm2_packed, EngineConfig(max_batch_size=1, max_seq_len=1024))
    want = llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 ignore_eos=True))[0].token_ids
    assert [t["token_id"] for t in out["tokens"]] == list(want)
