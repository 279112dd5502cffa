"""Node agents for real: several agents in one process, each with its own ZmqTransport on
127.0.0.1, executing multicast plans for a small packed random model. Real sockets, real files,
real threads; the stalled, dead and corrupt peers are real too (a transport nobody serves, a port
nobody listens on, a block file with a flipped byte, a forged frame)."""

from __future__ import annotations

import hashlib
import json
import pickle
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import zmq
from support import require

from faascale.engine.checkpoint import read_manifest
from faascale.engine.manifest import ModelManifest
from faascale.engine.random_model import pack_random, tiny_config
from faascale.pipecast.agent import (
    AgentConfigError,
    AgentReport,
    BlockCatalog,
    BlockFile,
    MulticastError,
    NodeAgent,
    SendRecord,
    plan_from_json,
    plan_to_json,
    role_of,
)
from faascale.pipecast.schedule import (
    MulticastPlan,
    Transfer,
    binomial_pipeline,
    chain,
    k_way,
    naive,
)
from faascale.pipecast.transport import (
    Header,
    TransportTimeout,
    encode_header,
    mac_key,
    payload_digest,
)
from faascale.pipecast.zmq_transport import ZmqTransport

SECRET = b"faascale-test-cluster-secret-32b!"
NUM_BLOCKS = 6
TIMEOUT_S = 20.0  # generous for a healthy run (each takes well under a second)
STALL_TIMEOUT_S = 1.5  # the fault tests wait this long for what never comes
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelManifest]:
    """6 blocks of 100-250 KB (above the transport's 64 KiB zero-copy threshold)."""
    out = tmp_path_factory.mktemp("agent-model") / "tiny"
    pack_random(out, seed=7, num_blocks=NUM_BLOCKS, config=tiny_config(num_layers=12))
    return out, read_manifest(out)


Outcome = AgentReport | MulticastError


def execute_all(agents: Mapping[str, NodeAgent], plan: MulticastPlan,
                peers: Mapping[str, str], timeout_s: float) -> dict[str, Outcome]:
    """Every agent's ``execute`` at once, in threads; its report or its MulticastError."""
    with ThreadPoolExecutor(len(agents)) as pool:
        futures = {n: pool.submit(a.execute, plan, peers, timeout_s) for n, a in agents.items()}
        outcomes: dict[str, Outcome] = {}
        for n, f in futures.items():
            try:
                outcomes[n] = f.result()
            except MulticastError as e:
                outcomes[n] = e
    return outcomes


def run_plan(plan: MulticastPlan, model: tuple[Path, ModelManifest], work: Path, *,
             holdings: Mapping[str, Path] | None = None, idle: Sequence[str] = (),
             addresses: Mapping[str, str] | None = None, local_dir: Path | None = None,
             catalog: BlockCatalog | None = None, prepare: bool = False,
             admission: bool = True, timeout_s: float = TIMEOUT_S) -> dict[str, Outcome]:
    """One agent per plan node except ``idle`` ones (their transport exists; nobody serves it),
    all at once in threads. Sources hold the packed model dir unless ``holdings`` says
    otherwise; targets start from an empty dir under ``work``."""
    model_dir, manifest = model
    manifest = catalog or manifest
    nodes = [*plan.sources, *plan.targets]
    with ExitStack() as stack:
        transports = {n: stack.enter_context(ZmqTransport(secret=SECRET, name=n)) for n in nodes}
        peers = {n: t.address for n, t in transports.items()} | dict(addresses or {})
        dirs = {n: model_dir if n in plan.sources else work / n for n in nodes}
        dirs |= dict(holdings or {})
        agents = {n: NodeAgent(n, transports[n], manifest, dirs[n], local_dir=local_dir,
                               admission=admission)
                  for n in nodes if n not in idle}
        for agent in agents.values() if prepare else ():
            agent.prepare(plan)
        return execute_all(agents, plan, peers, timeout_s)


def assert_identical_blocks(node_dir: Path, model: tuple[Path, ModelManifest],
                            blocks: Sequence[int] | None = None) -> None:
    model_dir, manifest = model
    for i in range(manifest.num_blocks) if blocks is None else blocks:
        name = manifest.blocks[i].file
        assert (node_dir / name).read_bytes() == (model_dir / name).read_bytes(), (node_dir, i)
    assert not list(node_dir.glob("*.part")), "a part file outlived execute"


def assert_forwarded_only_held_blocks(plan: MulticastPlan, reports: Mapping[str, AgentReport]
                                      ) -> None:
    """On the shared monotonic clock: a node forwards a block only after its own sender started
    sending it there (cut-through: piece by piece, each once it landed and was verified, which
    may be before the block is renamed into place and counted as arrived); a receiver has it
    only after its sender started sending it; sends follow plan order, and so do receives
    (admission: one at a time, in step order)."""
    arrival = {(n, b): r.started_at + s for n, r in reports.items() for b, s in r.arrival_s.items()}
    sent_from = {(x.dst, x.block): r.started_at + x.start_s
                 for r in reports.values() for x in r.sends}
    for node, report in reports.items():
        by_step = [t.block for t in sorted(role_of(plan, node).receives.values(),
                                           key=lambda t: t.step)]
        assert sorted(report.arrival_s, key=report.arrival_s.get) == by_step, node
        steps = [s.step for s in report.sends]
        assert steps == sorted(steps), (node, "sends out of plan order")
        assert len(report.sends) == len(role_of(plan, node).sends)
        for send in report.sends:
            start = report.started_at + send.start_s
            if node not in plan.sources:
                assert sent_from[(node, send.block)] <= start, (node, send)
            assert start <= arrival[(send.dst, send.block)], (node, send)


PLANS = {
    "binomial-8": lambda: binomial_pipeline("s0", [f"t{i}" for i in range(1, 8)], NUM_BLOCKS),
    "binomial-6": lambda: binomial_pipeline("s0", [f"t{i}" for i in range(1, 6)], NUM_BLOCKS),
    "k2-8": lambda: k_way(["s0", "s1"], [f"t{i}" for i in range(1, 7)], NUM_BLOCKS),
    "chain-4": lambda: chain("s0", ["t1", "t2", "t3"], NUM_BLOCKS),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_every_target_ends_with_the_sources_bytes(plan_name: str, model, tmp_path) -> None:
    plan = PLANS[plan_name]()
    outcomes = run_plan(plan, model, tmp_path)

    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    reports: dict[str, AgentReport] = outcomes  # type: ignore[assignment]
    total = model[1].total_bytes
    for t in plan.targets:
        assert_identical_blocks(tmp_path / t, model)
        assert sorted(reports[t].arrival_s) == list(range(NUM_BLOCKS))
        assert reports[t].bytes_received == total
        assert (reports[t].corrupt_frames, reports[t].errors) == (0, ())
    assert sum(r.bytes_sent for r in reports.values()) == total * len(plan.targets)
    assert sum(r.blocks_sent for r in reports.values()) == len(plan.transfers)
    assert_forwarded_only_held_blocks(plan, reports)


def test_prepared_part_files_are_filled_and_none_outlives_execute(model, tmp_path) -> None:
    plan = chain("s0", ["t1", "t2"], NUM_BLOCKS)
    with ZmqTransport(secret=SECRET, name="t1") as transport:
        probe = NodeAgent("t1", transport, model[1], tmp_path / "probe")
        probe.prepare(plan)
        sizes = {p.name: p.stat().st_size for p in (tmp_path / "probe").iterdir()}
        assert sizes == {b.file + ".part": b.size_bytes for b in model[1].blocks}

    outcomes = run_plan(plan, model, tmp_path, prepare=True)

    for t in plan.targets:
        assert isinstance(outcomes[t], AgentReport), outcomes[t]
        assert_identical_blocks(tmp_path / t, model)


def test_without_admission_blocks_still_arrive_whole_and_forwarded_only_once_here(
        model, tmp_path) -> None:
    plan = PLANS["binomial-6"]()
    outcomes = run_plan(plan, model, tmp_path, admission=False)

    for t in plan.targets:
        assert isinstance(outcomes[t], AgentReport), outcomes[t]
        assert_identical_blocks(tmp_path / t, model)
    sent_from = {(x.dst, x.block): r.started_at + x.start_s
                 for r in outcomes.values() for x in r.sends}
    for node, report in outcomes.items():
        for send in report.sends:
            assert node in plan.sources \
                or sent_from[(node, send.block)] <= report.started_at + send.start_s


def test_local_loads_come_from_the_nodes_own_tier(model, tmp_path) -> None:
    plan = k_way(["s0"], ["t1", "t2", "t3"], NUM_BLOCKS, local={"t3"})
    outcomes = run_plan(plan, model, tmp_path, local_dir=model[0])

    for t in plan.targets:
        assert isinstance(outcomes[t], AgentReport), outcomes[t]
        assert_identical_blocks(tmp_path / t, model)
    assert outcomes["t3"].bytes_received == 0
    assert sorted(outcomes["t3"].arrival_s) == list(range(NUM_BLOCKS))


def test_a_stalled_peer_is_named_with_the_missing_blocks_within_the_timeout(model,
                                                                            tmp_path) -> None:
    plan = chain("s0", ["relay", "t2"], NUM_BLOCKS)  # relay takes frames but never forwards
    began = time.monotonic()
    outcomes = run_plan(plan, model, tmp_path, idle=["relay"], timeout_s=STALL_TIMEOUT_S)
    took_s = time.monotonic() - began

    err = outcomes["t2"]
    assert isinstance(err, MulticastError)
    assert err.missing_blocks == tuple(range(NUM_BLOCKS))
    assert err.stalled_peers == ("relay",)
    assert "relay" in str(err) and err.report.arrival_s == {}
    assert not list((tmp_path / "t2").glob("block-*"))
    assert took_s < STALL_TIMEOUT_S + 2.0
    source = outcomes["s0"]  # relay's queues fill up, or they take everything: either is fine
    assert isinstance(source, AgentReport) or source.stalled_peers == ("relay",)


def test_a_dead_receiver_fails_the_send_naming_it(model, tmp_path) -> None:
    with ZmqTransport(secret=SECRET, name="gone") as gone:
        dead = gone.address  # bound, then closed: nothing listens there
    plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
    outcomes = run_plan(plan, model, tmp_path, idle=["t1"], addresses={"t1": dead},
                        timeout_s=STALL_TIMEOUT_S)

    err = outcomes["s0"]
    assert isinstance(err, MulticastError)
    assert err.stalled_peers == ("t1",) and err.missing_blocks == ()
    assert err.report.blocks_sent == 0
    assert any("t1 did not admit it" in e for e in err.report.errors)


def sha256_catalog(model: tuple[Path, ModelManifest]) -> BlockCatalog:
    """The model as packing format 1 described it: sha256 checksums (the agent hashes)."""
    model_dir, manifest = model
    return BlockCatalog(manifest.model_id, tuple(
        BlockFile(b.file, b.size_bytes,
                  "sha256:" + hashlib.sha256((model_dir / b.file).read_bytes()).hexdigest())
        for b in manifest.blocks))


@pytest.mark.parametrize("checksums", ["blake3", "sha256"])
def test_a_sender_with_a_corrupt_block_file_is_detected_and_nothing_is_written(
        checksums: str, model, tmp_path) -> None:
    catalog = sha256_catalog(model) if checksums == "sha256" else None
    bad_dir = tmp_path / "bad-source"
    shutil.copytree(model[0], bad_dir)
    bad = bad_dir / model[1].blocks[2].file
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(data)
    plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
    outcomes = run_plan(plan, model, tmp_path, holdings={"s0": bad_dir}, catalog=catalog)

    assert isinstance(outcomes["s0"], AgentReport)  # it sent what it had
    err = outcomes["t1"]
    assert isinstance(err, MulticastError)
    assert (err.missing_blocks, err.corrupt_peers, err.stalled_peers) == ((2,), ("s0",), ())
    assert err.report.corrupt_frames == 1
    assert err.report.elapsed_s < TIMEOUT_S / 2  # given up when it was dropped, not at the deadline
    assert not (tmp_path / "t1" / model[1].blocks[2].file).exists()
    assert_identical_blocks(tmp_path / "t1", model, [0, 1, 3, 4, 5])


def test_a_format_1_manifest_is_verified_by_hashing_the_landed_blocks(model, tmp_path) -> None:
    plan = chain("s0", ["t1", "t2"], NUM_BLOCKS)
    outcomes = run_plan(plan, model, tmp_path, catalog=sha256_catalog(model))

    for t in plan.targets:
        assert isinstance(outcomes[t], AgentReport), outcomes[t]
        assert_identical_blocks(tmp_path / t, model)


@contextmanager
def small_tmpfs(path: Path, pages: int) -> Iterator[Path]:
    """A real tmpfs of ``pages`` 4 KiB pages at ``path`` (a full /dev/shm in miniature)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    require(mounted.returncode == 0, f"cannot mount a tmpfs (needs root): {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_block_with_no_room_is_lost_alone_and_the_receive_goes_on(model, tmp_path) -> None:
    """The target's holdings are on a tmpfs with room for blocks 1, 2, 3 and 4 but not 5 after
    them (nor 0 after those): its part file fails with ENOSPC. That block is given up at once
    (its part file removed), the receive thread goes on (block 4, after it, lands), and the
    execute ends well before its deadline naming exactly the blocks that did not fit."""
    model_dir, manifest = model
    order = [1, 2, 3, 5, 4, 0]
    pages = [-(-b.size_bytes // 4096) for b in manifest.blocks]
    room = pages[1] + pages[2] + pages[3] + (pages[4] + pages[5]) // 2  # 4 fits after 5, not 5
    assert pages[4] <= room - sum(pages[1:4]) < pages[5] and pages[0] > room - sum(pages[1:5])
    plan = MulticastPlan("naive", ("s0",), ("t1",), NUM_BLOCKS,
                         tuple(Transfer(step, "s0", "t1", b) for step, b in enumerate(order)))
    with small_tmpfs(tmp_path / "shm", room) as shm, \
            ZmqTransport(secret=SECRET, name="s0") as s0, ZmqTransport(secret=SECRET, name="t1") as t1:
        agents = {"s0": NodeAgent("s0", s0, manifest, model_dir),
                  "t1": NodeAgent("t1", t1, manifest, shm / "t1")}
        start = time.monotonic()
        outcome = execute_all(agents, plan, {"s0": s0.address, "t1": t1.address}, TIMEOUT_S)
        took_s = time.monotonic() - start
        err = outcome["t1"]
        assert isinstance(err, MulticastError), err
        assert err.missing_blocks == (0, 5) and took_s < TIMEOUT_S / 2
        assert "No space left on device" in str(err) and "part file" in str(err)
        assert_identical_blocks(shm / "t1", model, [1, 2, 3, 4])  # and no part file left
        assert sorted(p.name for p in (shm / "t1").iterdir()) == sorted(
            manifest.blocks[b].file for b in (1, 2, 3, 4))
        assert isinstance(outcome["s0"], AgentReport)  # the sender was not held up


def test_corrupt_frames_are_dropped_and_counted(model, tmp_path) -> None:
    """A forged sender. Block 4: the manifest's digest in the (MAC'd) header, a flipped byte in
    the payload (corrupted in flight): the transport's check fails. Block 1: a flipped byte and
    the digest of those bytes (a sender with a bad copy): the frame is consistent, but its digest
    is not the manifest's, so the agent refuses it before taking the payload."""
    model_dir, manifest = model
    with ZmqTransport(secret=SECRET, name="t1") as transport, ThreadPoolExecutor(1) as pool:
        agent = NodeAgent("t1", transport, manifest, tmp_path / "t1")
        plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
        running = pool.submit(agent.execute, plan, {}, TIMEOUT_S)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(transport.address)
        for i, info in enumerate(manifest.blocks):
            payload = bytearray((model_dir / info.file).read_bytes())
            digest = bytes.fromhex(info.checksum.removeprefix("blake3:"))
            if i in (1, 4):
                payload[-1] ^= 0x01
            if i == 1:
                digest = payload_digest(payload)
            header = Header("block", "s0", time.time_ns() + i, {"model_id": manifest.model_id,
                                                                 "index": i},
                            len(payload), digest)
            sock.send_multipart([encode_header(header, mac_key(SECRET)), payload])
        with pytest.raises(MulticastError) as caught:
            running.result()
        sock.close()
        ctx.term()
        assert transport.stats.corrupt_frames == 1

    err = caught.value
    assert err.missing_blocks == (1, 4) and err.corrupt_peers == ("s0",)
    assert err.report.corrupt_frames == 2
    for i in (1, 4):
        assert not (tmp_path / "t1" / manifest.blocks[i].file).exists()
    assert_identical_blocks(tmp_path / "t1", model, [0, 2, 3, 5])


def test_bad_input_is_refused_before_any_io(model, tmp_path) -> None:
    with ZmqTransport(secret=SECRET, name="t1") as transport:
        agent = NodeAgent("t1", transport, model[1], tmp_path / "t1")
        with pytest.raises(AgentConfigError, match="not in the"):
            agent.execute(binomial_pipeline("s0", ["t2"], NUM_BLOCKS), {}, 1.0)
        with pytest.raises(AgentConfigError, match="no transport address"):
            agent.execute(chain("s0", ["t1", "t2"], NUM_BLOCKS), {}, 1.0)
        source = NodeAgent("s0", transport, model[1], tmp_path / "empty")
        with pytest.raises(AgentConfigError, match="neither holds"):
            source.execute(naive("s0", ["t1"], NUM_BLOCKS), {"t1": transport.address}, 1.0)
        with pytest.raises(AgentConfigError, match="moves 3 blocks"):
            agent.execute(binomial_pipeline("s0", ["t1"], 3), {}, 1.0)
    assert not (tmp_path / "t1").exists() or not list((tmp_path / "t1").iterdir())


def test_plans_reports_and_catalogs_round_trip(model) -> None:
    for make in (*PLANS.values(), lambda: k_way(["a", "b"], ["c", "d", "e"], 5, local={"e"})):
        plan = make()
        assert plan_from_json(plan_to_json(plan)) == plan
    with pytest.raises(AgentConfigError):
        plan_from_json(json.dumps({"algorithm": "x", "sources": ["a"], "targets": ["b"],
                                   "num_blocks": 1, "transfers": [], "local_loads": []}))
    report = AgentReport("t1", 12.5, 3.0, {0: 1.0, 5: 2.5},
                         (SendRecord(3, 0, "t2", 1.1, 1.4),), 10, 20, 1, (4,), ("why",))
    assert AgentReport.from_json(report.to_json()) == report
    err = pickle.loads(pickle.dumps(MulticastError("m", missing_blocks=[4], stalled_peers=["a"],
                                                   corrupt_peers=[], report=report)))
    assert (err.missing_blocks, err.stalled_peers, err.report) == ((4,), ("a",), report)
    assert BlockCatalog.read(model[0]) == BlockCatalog.of(model[1])


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports free now (held open together, so no two are the same)."""
    import socket

    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def test_the_process_entry_point_runs_a_plan_with_its_peers(model, tmp_path) -> None:
    """Three agent processes on loopback, started together at a shared wall-clock time."""
    plan = binomial_pipeline("s0", ["t1", "t2"], NUM_BLOCKS)
    (tmp_path / "plan.json").write_text(plan_to_json(plan))
    (tmp_path / "secret").write_bytes(SECRET)
    ports = dict(zip(["s0", "t1", "t2"], _free_ports(3)))  # not fixed ones: those can be taken
    peers = {n: f"tcp://127.0.0.1:{p}" for n, p in ports.items()}
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    plan_id = secrets.token_hex(8)  # the run's epoch, one for all three
    start_at = time.time() + 3.0  # s0 and t1 are told the time; t2 waits for a file with it
    start = {"s0": ["--start-at", str(start_at)], "t1": ["--start-at", str(start_at)],
             "t2": ["--start-file", str(tmp_path / "go")]}
    procs = {n: subprocess.Popen(
        [sys.executable, "-m", "faascale.pipecast.agent", "--plan", str(tmp_path / "plan.json"),
         "--plan-id", plan_id, "--name", n, "--bind", f"127.0.0.1:{ports[n]}", "--peers", str(tmp_path / "peers.json"),
         "--blocks-dir", str(model[0] if n == "s0" else tmp_path / n), "--model-dir",
         str(model[0]), "--secret-file", str(tmp_path / "secret"), *start[n],
         "--timeout-s", "20", "--report", str(tmp_path / f"{n}.json")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in ports}
    ready = {n: p.stdout.readline() for n, p in procs.items()}
    (tmp_path / "go").write_text(str(start_at))
    outputs = {n: p.communicate(timeout=60) for n, p in procs.items()}

    for n, p in procs.items():
        assert p.returncode == 0, (n, outputs[n])
        assert ready[n] == f"ready {peers[n]}\n"
        out = json.loads((tmp_path / f"{n}.json").read_text())
        assert out["error"] is None and out["start_epoch_s"] >= start_at - 0.01
        assert out["cpu_s"] >= 0
    for t in ("t1", "t2"):
        assert_identical_blocks(tmp_path / t, model)


def test_blocks_from_the_store_are_loaded_and_forwarded(model, tmp_path: Path) -> None:
    """A scale from zero (``repair`` with the store only): each target loads its own part through
    its store loader (the node's block store, here a directory of verified files), and gets the
    rest from the other target over the network; the store is no transport peer."""
    from faascale.pipecast.repair import repair

    model_dir, manifest = model
    plan = repair({}, ["a", "b"], NUM_BLOCKS, store="store")
    plan.validate()
    loaded: dict[str, list[int]] = {"a": [], "b": []}

    def loader(node: str):
        def load(i: int) -> Path:
            loaded[node].append(i)
            return model_dir / manifest.blocks[i].file
        return load

    with ExitStack() as stack:
        tx = {n: stack.enter_context(ZmqTransport(secret=SECRET, name=n)) for n in ("a", "b")}
        peers = {n: t.address for n, t in tx.items()}
        agents = {n: NodeAgent(n, tx[n], manifest, tmp_path / n, store_loader=loader(n))
                  for n in ("a", "b")}
        with ThreadPoolExecutor(2) as pool:
            reports = {n: f.result() for n, f in
                       {n: pool.submit(a.execute, plan, peers, TIMEOUT_S)
                        for n, a in agents.items()}.items()}
    for n in ("a", "b"):
        assert_identical_blocks(tmp_path / n, model)
        want = sorted(t.block for t in plan.transfers if t.dst == n and t.src == "store")
        assert sorted(loaded[n]) == want and len(want) == NUM_BLOCKS // 2
        peer_bytes = sum(manifest.blocks[t.block].size_bytes for t in plan.transfers
                         if t.dst == n and t.src != "store")
        assert reports[n].bytes_received == peer_bytes > 0  # the rest came from the other one
    with ZmqTransport(secret=SECRET, name="c") as t:
        with pytest.raises(AgentConfigError, match="no store loader"):
            NodeAgent("a", t, manifest, tmp_path / "c").execute(plan, peers, 1.0)


def run_from_store(model, work: Path, load, *, store_first: bool = True,
                   timeout_s: float = TIMEOUT_S) -> tuple[MulticastPlan, dict[str, Outcome]]:
    """A scale from zero of two nodes (``repair`` with the store only: a loads blocks 0-2 and
    b blocks 3-5 at steps 0-2, then each gets the other's at steps 3-5); ``load(node, i)`` is
    their store loader."""
    from faascale.pipecast.repair import repair

    plan = repair({}, ["a", "b"], NUM_BLOCKS, store="store")
    with ExitStack() as stack:
        tx = {n: stack.enter_context(ZmqTransport(secret=SECRET, name=n)) for n in ("a", "b")}
        peers = {n: t.address for n, t in tx.items()}
        agents = {n: NodeAgent(n, tx[n], model[1], work / n, store_first=store_first,
                               store_loader=lambda i, n=n: load(n, i)) for n in ("a", "b")}
        return plan, execute_all(agents, plan, peers, timeout_s)


def store_part_done_and_first_peer_send(plan: MulticastPlan, reports: Mapping[str, Outcome],
                                        node: str) -> tuple[float, float]:
    """On the shared monotonic clock: when the last of ``node``'s blocks from the store was in
    place, and when the first send to it from a peer started."""
    report = reports[node]
    report = report.report if isinstance(report, MulticastError) else report
    mine = [t.block for t in plan.transfers if t.dst == node and t.src == "store"]
    done = max(report.started_at + report.arrival_s[b] for b in mine)
    sends = [r.started_at + x.start_s for n, r in reports.items() if n != node
             for x in (r.report if isinstance(r, MulticastError) else r).sends if x.dst == node]
    return done, min(sends)


@pytest.mark.parametrize("store_first", [True, False], ids=["store-first", "ablation"])
def test_a_nodes_store_part_comes_before_its_blocks_from_peers(model, tmp_path: Path,
                                                               store_first: bool) -> None:
    """Store first: a peer's send to a node starts once the node's own store part is in place
    (its link carries that part alone; the members' parts cover the model sooner). Without it
    (the benchmark's ablation) b's first block, loaded at 0.3 s, goes to a while a still loads
    its own part, until 0.9 s."""
    model_dir, manifest = model

    def load(node: str, i: int) -> Path:
        time.sleep(0.3)
        return model_dir / manifest.blocks[i].file

    plan, outcomes = run_from_store(model, tmp_path, load, store_first=store_first)
    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    for n in ("a", "b"):
        assert_identical_blocks(tmp_path / n, model)
        done, first_send = store_part_done_and_first_peer_send(plan, outcomes, n)
        assert (first_send >= done) == store_first, (n, first_send - done)


def test_a_failed_store_load_does_not_hold_the_receives_back(model, tmp_path: Path,
                                                             monkeypatch) -> None:
    """A store load that fails counts as done: the node's receives go ahead at once (with the
    bound at a minute, waiting for it would miss the deadline); only its block is missing."""
    import faascale.pipecast.admission as admission

    monkeypatch.setattr(admission, "STORE_FIRST_SETUP_S", 60.0)
    model_dir, manifest = model

    def load(node: str, i: int) -> Path:
        if (node, i) == ("a", 1):
            raise OSError("the store said 503")
        return model_dir / manifest.blocks[i].file

    _, outcomes = run_from_store(model, tmp_path, load, timeout_s=10.0)
    error = outcomes["a"]
    assert isinstance(error, MulticastError) and error.missing_blocks == (1,)
    assert "the store said 503" in str(error)
    assert_identical_blocks(tmp_path / "a", model, [0, 2, 3, 4, 5])


def test_a_store_load_that_hangs_holds_the_receives_back_only_its_bound(model, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """a's store load of block 1 hangs until a holds every block from b: with store first
    unbounded it would never end (a deadlock); bounded (0.3 s here) the receives go ahead."""
    import faascale.pipecast.admission as admission

    monkeypatch.setattr(admission, "STORE_FIRST_SETUP_S", 0.3)
    monkeypatch.setattr(admission, "STORE_FIRST_MIN_BYTES_PER_S", 1e15)
    model_dir, manifest = model
    from_b = [tmp_path / "a" / manifest.blocks[i].file for i in (3, 4, 5)]

    def load(node: str, i: int) -> Path:
        if (node, i) == ("a", 1):
            deadline = time.monotonic() + TIMEOUT_S
            while not all(f.exists() for f in from_b):
                if time.monotonic() > deadline:
                    raise TimeoutError("a never got b's blocks while its store load hung")
                time.sleep(0.01)
        return model_dir / manifest.blocks[i].file

    _, outcomes = run_from_store(model, tmp_path, load)
    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    arrival = outcomes["a"].arrival_s
    assert max(arrival[b] for b in (3, 4, 5)) < arrival[1]
    assert_identical_blocks(tmp_path / "a", model)


# -- pieces ------------------------------------------------------------------------------------

PIECE_BYTES = 32 << 10  # the tiny model's 100-250 KB blocks move as 4-8 pieces


@pytest.fixture(scope="module")
def pieced(model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelManifest]:
    """The same model with its pieces listed every 32 KiB (``with_pieces``)."""
    from faascale.engine.checkpoint import with_pieces

    out = tmp_path_factory.mktemp("pieced") / "tiny"
    shutil.copytree(model[0], out)
    return out, with_pieces(out, PIECE_BYTES)


class PacedTransport:
    """A real ZmqTransport whose block frames leave ``pace_s`` apart (a slow link, so that a
    block takes visibly longer than a piece); ``corrupt`` = (block, piece): the first frame of
    that piece goes out with one payload byte flipped under the right digest (damaged in
    flight: the receiver's transport catches it)."""

    def __init__(self, inner: ZmqTransport, pace_s: float,
                 corrupt: tuple[int, int] | None = None, drop: tuple[int, int] | None = None
                 ) -> None:
        self._inner, self._pace_s, self._corrupt, self._drop = inner, pace_s, corrupt, drop

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def send(self, address, kind, meta, payload=None, *, timeout_s, digest=None, epoch=""):
        if kind == "block":
            time.sleep(self._pace_s)
            if self._drop == (meta["index"], meta.get("piece", 0)):
                self._drop = None  # lost on the way, as libzmq loses the frames a dropped
                return None  # connection held: the sender never learns of it
            if self._corrupt == (meta["index"], meta.get("piece", 0)):
                self._corrupt = None
                damaged = bytearray(payload)
                damaged[len(damaged) // 2] ^= 0x40
                return self._inner.send(address, kind, meta, damaged, timeout_s=timeout_s,
                                        digest=digest or payload_digest(payload), epoch=epoch)
        return self._inner.send(address, kind, meta, payload, timeout_s=timeout_s,
                                digest=digest, epoch=epoch)


def run_paced_chain(pieced, tmp_path: Path, corrupt: tuple[int, int] | None = None,
                    drop: tuple[int, int] | None = None) -> dict[str, Outcome]:
    """s0 -> t1 -> t2 with s0's frames 10 ms apart (``corrupt``/``drop``: that one frame of
    s0's, block and piece, goes damaged / never arrives)."""
    model_dir, manifest = pieced
    plan = chain("s0", ["t1", "t2"], NUM_BLOCKS)
    with ExitStack() as stack:
        transports = {n: stack.enter_context(ZmqTransport(secret=SECRET, name=n))
                      for n in ("s0", "t1", "t2")}
        peers = {n: t.address for n, t in transports.items()}
        wire = {"s0": PacedTransport(transports["s0"], 0.01, corrupt, drop)}
        agents = {n: NodeAgent(n, wire.get(n, transports[n]), manifest,
                               model_dir if n == "s0" else tmp_path / n)
                  for n in transports}
        return execute_all(agents, plan, peers, TIMEOUT_S)


def test_a_cancelled_plan_sends_nothing_more(pieced, tmp_path) -> None:
    """A newer plan cancels the one running (the coordinator re-plans when members join a
    running scale-out). The source had every step admitted at once (one sender for all of
    t1's receives), so without a check it would send the whole model into an epoch t1 has
    closed. Cancelled after its third piece, it sends at most the piece going out, ends at
    once, and neither side blames the other."""
    model_dir, manifest = pieced
    plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
    pieces = sum(len(b.pieces) or 1 for b in manifest.blocks)
    sent: list[float] = []

    class Counting(PacedTransport):
        def send(self, address, kind, meta, payload=None, **kw):
            header = super().send(address, kind, meta, payload, **kw)
            if kind == "block":
                sent.append(time.monotonic())
            return header

    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        transports = {n: stack.enter_context(ZmqTransport(secret=SECRET, name=n))
                      for n in ("s0", "t1")}
        peers = {n: t.address for n, t in transports.items()}
        agents = {"s0": NodeAgent("s0", Counting(transports["s0"], 0.02), manifest, model_dir),
                  "t1": NodeAgent("t1", transports["t1"], manifest, tmp_path / "t1")}
        running = {n: pool.submit(a.execute, plan, peers, TIMEOUT_S) for n, a in agents.items()}
        deadline = time.monotonic() + TIMEOUT_S
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        for agent in agents.values():  # the new plan reaches both
            agent.cancel()
        cancelled_at, sent_then = time.monotonic(), len(sent)
        outcomes = {}
        for n, f in running.items():
            with pytest.raises(MulticastError) as caught:
                f.result(timeout=TIMEOUT_S)
            outcomes[n] = caught.value
        took_s = time.monotonic() - cancelled_at
    assert len(sent) <= sent_then + 1 < pieces, (len(sent), sent_then, pieces)
    assert took_s < 1.0, took_s  # POLL_S-bounded, not a block's or the model's time
    for n, err in outcomes.items():
        assert str(err).startswith(f"{n}: cancelled (a newer plan replaced it)"), err
        assert not err.stalled_peers, (n, err)
    assert "the plan was cancelled" in str(outcomes["s0"])


def test_only_the_newest_plan_runs_even_one_queued_behind_the_running_one(model, tmp_path
                                                                          ) -> None:
    """The coordinator's newest plan is p3 (``cancel(keep="p3")``, while nothing runs); p2 was
    queued behind the run it replaced and begins only now: it is cancelled at once, blaming
    nobody, and p3 then runs whole."""
    model_dir, manifest = model
    plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
    with ZmqTransport(secret=SECRET, name="s0") as s0, ZmqTransport(secret=SECRET, name="t1") as t1, \
            ThreadPoolExecutor(2) as pool:
        peers = {"s0": s0.address, "t1": t1.address}
        agents = {"s0": NodeAgent("s0", s0, manifest, model_dir),
                  "t1": NodeAgent("t1", t1, manifest, tmp_path / "t1")}
        for agent in agents.values():
            agent.cancel(keep="p3")
        start = time.monotonic()
        old = [pool.submit(a.execute, plan, peers, TIMEOUT_S, "p2") for a in agents.values()]
        for f in old:
            with pytest.raises(MulticastError, match="cancelled") as caught:
                f.result()
            assert not caught.value.stalled_peers
        assert time.monotonic() - start < 1.0
        assert not list((tmp_path / "t1").glob("*")), "the replaced plan moved bytes"
        new = [pool.submit(a.execute, plan, peers, TIMEOUT_S, "p3") for a in agents.values()]
        assert all(isinstance(f.result(), AgentReport) for f in new)
    assert_identical_blocks(tmp_path / "t1", model)


def test_a_lost_credit_is_sent_again(model, tmp_path) -> None:
    """t1's first credit never reaches s0 (as when s0 has not yet opened the plan's epoch, or
    is too starved to take it in time): s0 waits for it, and would until the plan's deadline;
    t1 sends it again after CREDIT_RESEND_S and the plan completes."""
    from faascale.pipecast.admission import CREDIT_RESEND_S

    model_dir, manifest = model
    plan = binomial_pipeline("s0", ["t1"], NUM_BLOCKS)
    credits: list[int] = []

    class LosesFirstCredit:
        def __init__(self, inner: ZmqTransport) -> None:
            self._inner = inner

        def __getattr__(self, name: str):
            return getattr(self._inner, name)

        def send(self, address, kind, meta, payload=None, **kw):
            if "credit_step" in meta:
                credits.append(meta["credit_step"])
                if len(credits) == 1:
                    return None  # lost on the way
            return self._inner.send(address, kind, meta, payload, **kw)

    with ZmqTransport(secret=SECRET, name="s0") as s0, ZmqTransport(secret=SECRET, name="t1") as t1:
        agents = {"s0": NodeAgent("s0", s0, manifest, model_dir),
                  "t1": NodeAgent("t1", LosesFirstCredit(t1), manifest, tmp_path / "t1")}
        start = time.monotonic()
        outcomes = execute_all(agents, plan, {"s0": s0.address, "t1": t1.address}, TIMEOUT_S)
        took_s = time.monotonic() - start
    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    assert_identical_blocks(tmp_path / "t1", model)
    assert credits.count(0) == 2, credits  # step 0's credit, lost, then sent again
    assert CREDIT_RESEND_S <= took_s < CREDIT_RESEND_S + TIMEOUT_S / 4, took_s


def test_a_piece_is_forwarded_before_its_block_is_complete(pieced, tmp_path) -> None:
    outcomes = run_paced_chain(pieced, tmp_path)

    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    for t in ("t1", "t2"):
        assert_identical_blocks(tmp_path / t, pieced)
    t1 = outcomes["t1"]
    assert [s.block for s in t1.sends] == list(range(NUM_BLOCKS))
    for send in t1.sends:  # every block has 4+ pieces, 10 ms apart from s0
        assert pieced[1].blocks[send.block].pieces[3:]
        assert send.start_s < t1.arrival_s[send.block] - 0.02, send  # forwarding while landing
    # t2 has each block at most a piece or two after t1 (cut-through), not a block later
    lag = [outcomes["t2"].started_at + outcomes["t2"].arrival_s[b] - t1.started_at
           - t1.arrival_s[b] for b in range(NUM_BLOCKS)]
    assert max(lag) < 0.03, lag
    assert_forwarded_only_held_blocks(chain("s0", ["t1", "t2"], NUM_BLOCKS), outcomes)


def test_the_largest_frame_is_a_piece_and_a_larger_one_is_not_buffered(model, pieced,
                                                                      tmp_path) -> None:
    """A model's block frames are at most a piece (a block without pieces: the block); the
    agents' transports refuse anything larger unread, and the run still completes."""
    assert BlockCatalog.of(pieced[1]).max_frame_bytes == PIECE_BYTES
    assert BlockCatalog.of(model[1]).max_frame_bytes == max(b.size_bytes
                                                            for b in model[1].blocks)
    limit = BlockCatalog.of(pieced[1]).max_frame_bytes
    with ZmqTransport(secret=SECRET, name="t1", max_payload_bytes=limit) as rx, \
            ZmqTransport(secret=SECRET, name="s0") as big, \
            ZmqTransport(secret=SECRET, name="s1") as ok:
        big.send(rx.address, "block", {"index": 0}, bytes(limit + 1), timeout_s=5)
        with pytest.raises(TransportTimeout):  # dropped with its sender's connection, unread
            rx.recv(1.0)
        ok.send(rx.address, "block", {"index": 0}, bytes(limit), timeout_s=5)
        assert rx.recv(5).header.payload_bytes == limit  # and the receiver serves the others


def test_a_corrupt_piece_is_detected_and_fetched_again(pieced, tmp_path) -> None:
    outcomes = run_paced_chain(pieced, tmp_path, corrupt=(1, 2))

    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    for t in ("t1", "t2"):
        assert_identical_blocks(tmp_path / t, pieced)
    t1, s0 = outcomes["t1"], outcomes["s0"]
    assert (t1.corrupt_frames, t1.refetched_pieces, s0.pieces_resent) == (1, 1, 1)
    assert outcomes["t2"].corrupt_frames == 0  # the damaged piece never went further
    assert any("asked for again from s0" in e for e in t1.errors), t1.errors


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_piece_lost_on_the_way_is_fetched_again_at_once(pieced, tmp_path, where) -> None:
    """A frame lost in transit (a connection libzmq dropped and made again: the sender believes
    it sent it) shows as a gap when the sender's next frame lands, a later piece of the block
    or the next block's first: the receiver asks for the piece again then, not at the plan's
    deadline."""
    pieces = pieced[1].blocks[1].pieces
    lost = (1, 2) if where == "middle" else (1, len(pieces) - 1)
    t0 = time.monotonic()
    outcomes = run_paced_chain(pieced, tmp_path, drop=lost)
    took_s = time.monotonic() - t0

    assert all(isinstance(o, AgentReport) for o in outcomes.values()), outcomes
    for t in ("t1", "t2"):
        assert_identical_blocks(tmp_path / t, pieced)
    t1, s0 = outcomes["t1"], outcomes["s0"]
    assert (t1.corrupt_frames, t1.refetched_pieces, s0.pieces_resent) == (0, 1, 1)
    assert any(f"lost on the way (a later frame of its sender came first): piece {lost[1]} of "
               f"block 1 asked for again from s0" in e for e in t1.errors), t1.errors
    assert took_s < TIMEOUT_S / 4, took_s  # at the gap, not at the deadline


def test_part_files_made_ahead_wait_for_room_until_an_earlier_one_is_receiving(
        model: tuple[Path, ModelManifest], tmp_path: Path) -> None:
    """At most ``ahead_bytes`` of part files wait made and unopened (a whole model's made at
    once, at the plan, took the CPU the first loads needed): the next one is made once a frame
    of an earlier one is opened, or an earlier one is put in place or given up."""
    from faascale.pipecast.landing import Landing

    catalog = BlockCatalog.of(model[1])
    sizes = [catalog.blocks[b].size_bytes for b in (1, 2, 3)]
    assert 2 * min(sizes) > max(sizes)  # room for one part, never two

    def wait_made(block: int) -> None:
        deadline = time.monotonic() + 5
        while block not in landing.parts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert block in landing.parts, block

    landing = Landing(tmp_path, catalog)
    try:
        landing.prepare_ahead([1, 2, 3], ahead_bytes=max(sizes))
        wait_made(1)
        time.sleep(0.3)
        assert set(landing.parts) == {1}  # block 2 waits for room
        info = catalog.blocks[1]
        _, length = info.span(0)
        digest = bytes.fromhex(info.piece_checksum(0).partition(":")[2])
        view = landing.open(Header("block", "s0", 1, {"model_id": catalog.model_id, "index": 1,
                                                       "piece": 0}, length, digest))
        assert view.nbytes == length  # block 1 is receiving: room for block 2
        wait_made(2)
        time.sleep(0.3)
        assert 3 not in landing.parts
        landing.drop(2)  # given up: room for block 3
        wait_made(3)
    finally:
        landing.close()
    assert not list(tmp_path.glob("*.part"))


def test_part_files_are_made_ahead_in_order_once_and_none_outlive_close(
        model: tuple[Path, ModelManifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Landing.prepare_ahead`` makes the coming blocks' part files on its own thread, in the
    given order, while the receive thread lands others: a block the receive thread asks for
    while the thread makes it is made once (the receive thread waits for it); a block put in
    place or given up is never made again; ``close`` stops the thread and leaves no part file."""
    import os
    import threading

    from faascale.pipecast import landing as landing_mod
    from faascale.pipecast.landing import PART_SUFFIX, Landing

    catalog = BlockCatalog.of(model[1])
    by_file = {catalog.blocks[i].file + PART_SUFFIX: i for i in range(catalog.num_blocks)}
    made: list[int] = []  # blocks whose part file was created (space reserved), in order
    inside, gate = threading.Event(), threading.Event()
    real_preallocate = landing_mod.preallocate

    def preallocate(fd: int, size: int) -> None:
        block = by_file[Path(os.readlink(f"/proc/self/fd/{fd}")).name]
        made.append(block)
        if block == 3:  # held while making block 3: the receive thread asks for it meanwhile
            inside.set()
            gate.wait(5)
        real_preallocate(fd, size)

    monkeypatch.setattr(landing_mod, "preallocate", preallocate)
    landing = Landing(tmp_path, catalog)
    try:
        landing.prepare_ahead([1, 3, 4, 5])
        assert inside.wait(5)  # block 1 is made, the thread is inside block 3
        assert made == [1, 3] and 1 in landing.parts
        # block 1 lands and is put in place, block 4 is given up before its turn
        part = landing.prepare(1)
        part[:] = (model[0] / catalog.blocks[1].file).read_bytes()
        landing.commit(1, "r0")
        landing.drop(4)
        got: list[object] = []
        asker = threading.Thread(target=lambda: got.append(landing.prepare(3)))
        asker.start()
        time.sleep(0.2)
        assert not got  # waiting for the thread that makes it
        gate.set()
        asker.join(5)
        assert got and got[0] is landing.parts[3]
        deadline = time.monotonic() + 5
        while 5 not in landing.parts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert made == [1, 3, 5], made  # each once, 4 never
        assert (tmp_path / catalog.blocks[1].file).read_bytes() == \
            (model[0] / catalog.blocks[1].file).read_bytes()
    finally:
        gate.set()
        landing.close()
    assert not list(tmp_path.glob(f"*{PART_SUFFIX}"))
    with pytest.raises(OSError):
        landing.prepare(0)  # closed: nothing more is made
