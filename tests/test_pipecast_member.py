"""PipeCast members and the coordinator service over real sockets on loopback (tiny-llama).

The emulated-cluster end-to-end test (shaped links, real SmolLM2) is in
``test_pipecast_scaleout.py``; here: joining, planning, routes, the switch to full, faults.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pipecast_transport import raw_push

from faascale.engine.checkpoint import read_manifest, read_tokenizer_json
from faascale.engine.config import EngineConfig
from faascale.engine.llm import LLM
from faascale.engine.sampling import SamplingParams
from faascale.engine.tokenizer import Tokenizer
from faascale.pipecast.member import Member, MemberError
from faascale.pipecast.service import Coordinator
from faascale.pipecast.transport import TransportTimeout, encode_header, mac_key
from faascale.pipecast.zmq_transport import ZmqTransport

SECRET = b"member-test-secret-0123456789"
CFG = EngineConfig(max_batch_size=4, max_seq_len=256)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture()
def coordinator() -> Iterator[Coordinator]:
    with ZmqTransport(secret=SECRET, name="coordinator", recv_hwm=64) as t:
        coord = Coordinator(t, join_window_s=0.5, dead_after_s=2.0, hung_after_s=6.0)
        thread = threading.Thread(target=coord.run, daemon=True)
        thread.start()
        yield coord
        coord.stop()
        thread.join(5)


@pytest.fixture()
def members(tiny_packed: Path, coordinator: Coordinator) -> Iterator:
    manifest = read_manifest(tiny_packed)
    tokenizer = Tokenizer(read_tokenizer_json(tiny_packed, manifest), manifest.tokenizer)
    made: list[Member] = []

    def make(name: str, holdings: Path, **kw) -> Member:
        m = Member(name, manifest, tokenizer, holdings, CFG, secret=SECRET,
                   coordinator=coordinator.address, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def wait_for(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def reference(tiny_packed: Path, prompt: str) -> list[int]:
    return list(LLM.load(tiny_packed, CFG).generate([prompt], GREEDY)[0].token_ids)


def test_one_replica_scales_to_four_and_every_one_serves_the_model(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    model_id = read_manifest(tiny_packed).model_id
    source = members("r0", tiny_packed)
    assert source.full and source.wait_servable(1)
    coordinator.expect(model_id, 3)
    targets = [members(f"r{i}", tmp_path / f"r{i}") for i in (1, 2, 3)]
    # A request submitted before a single block arrived waits, then streams the model's tokens.
    stream = targets[0].loop.submit(targets[0].loop.engine.tokenizer.encode("hello"), GREEDY)
    for t in targets:
        assert t.wait_servable(60)
    ids = [o.token_id for o in stream if o.token_id is not None]
    assert ids == reference(tiny_packed, "hello")
    wait_for(lambda: all(t.full for t in targets))
    for t in targets:
        got = [o.token_id for o in t.loop.submit(t.loop.engine.tokenizer.encode("hello"), GREEDY)
               if o.token_id is not None]
        assert got == ids
        assert t.held == set(range(4))
    wait_for(lambda: coordinator.progress()[model_id]["finished"])
    progress = coordinator.progress()[model_id]
    done = progress["finished"][0]
    assert done["algorithm"].startswith("pipecast") and done["done"]
    assert done["blocks"] == {"r1": 4, "r2": 4, "r3": 4}
    assert {m: v["route"] for m, v in progress["members"].items()} == dict.fromkeys(
        ["r0", "r1", "r2", "r3"], "full")
    kinds = [e["kind"] for e in done["record"]]
    assert kinds[0] == "planned" and kinds.count("full") == 3 and kinds.count("block") == 12


def test_a_member_holding_part_of_the_model_is_sent_only_the_rest(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """What a rejoining member does (join with the blocks it holds), from its first join: the
    plan brings it only the blocks it lacks."""
    import shutil

    manifest = read_manifest(tiny_packed)
    members("r0", tiny_packed)
    part = tmp_path / "part"
    part.mkdir()
    for b in manifest.blocks[:2]:
        shutil.copy(tiny_packed / b.file, part / b.file)
    coordinator.expect(manifest.model_id, 1)
    m = members("r1", part)
    assert m.wait_servable(60)
    wait_for(lambda: m.full)
    wait_for(lambda: coordinator.progress()[manifest.model_id]["finished"])
    done = coordinator.progress()[manifest.model_id]["finished"][0]
    planned = done["record"][0]
    assert planned["kind"] == "planned" and planned["detail"]["held"] == {"r1": 2}
    arrived = sorted(e["detail"]["block"] for e in done["record"] if e["kind"] == "block")
    assert arrived == [2, 3]  # blocks 0 and 1 were not sent again
    got = [o.token_id for o in m.loop.submit(m.loop.engine.tokenizer.encode("hi"), GREEDY)
           if o.token_id is not None]
    assert got == reference(tiny_packed, "hi")


def test_frames_captured_before_a_member_restarted_are_refused_by_the_new_one(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frame to r1 while it loaded (the coordinator's plan and routes, r0's blocks) is
    captured off the wire; r1 restarts under its name with nothing held and loads again (a new
    plan: normal traffic works); every captured frame replayed to the new r1's sockets is
    refused (its control session and the old plan's epoch are not open there) and counted,
    and r1 keeps serving the model's tokens."""
    manifest = read_manifest(tiny_packed)
    members("r0", tiny_packed)
    captured: list[tuple[str, list[bytes]]] = []
    real_send = ZmqTransport.send

    def tap(self, peer_address, kind, meta, payload=None, **kw):
        header = real_send(self, peer_address, kind, meta, payload, **kw)
        data = b"" if payload is None else bytes(memoryview(payload).cast("B"))
        captured.append((peer_address, [encode_header(header, mac_key(SECRET)), data]))
        return header

    monkeypatch.setattr(ZmqTransport, "send", tap)
    coordinator.expect(manifest.model_id, 1)
    first = members("r1", tmp_path / "r1")
    wait_for(lambda: first.full)
    monkeypatch.undo()
    to_first = {first.ctl_tx.address: "ctl", first.blocks_tx.address: "blocks"}
    frames = [(to_first[a], f) for a, f in captured if a in to_first]
    ops = {json.loads(f[0][32:])["meta"].get("op") for kind, f in frames if kind == "ctl"}
    assert {"plan", "route"} <= ops and sum(kind == "blocks" for kind, _ in frames) >= 4
    first.close()

    coordinator.expect(manifest.model_id, 1)
    again = members("r1", tmp_path / "r1-again")
    wait_for(lambda: again.full)
    before = {"ctl": again.ctl_tx.stats, "blocks": again.blocks_tx.stats}
    count = {kind: sum(k == kind for k, _ in frames) for kind in ("ctl", "blocks")}
    with raw_push(again.ctl_tx.address) as ctl, raw_push(again.blocks_tx.address) as blocks:
        for kind, frame in frames:
            (ctl if kind == "ctl" else blocks).send_multipart(frame)
        # The blocks socket is read only while a plan runs; here the test reads it, as the
        # next plan would: none of them is delivered.
        with pytest.raises(TransportTimeout):
            again.blocks_tx.recv(2.0)

    def refused(kind: str) -> int:
        now = getattr(again, f"{kind}_tx").stats
        return now.rejected_frames - before[kind].rejected_frames

    wait_for(lambda: refused("ctl") == count["ctl"], timeout_s=10)
    assert refused("blocks") == count["blocks"]
    assert again.blocks_tx.stats.frames_received == before["blocks"].frames_received
    assert again.full and again.held == set(range(manifest.num_blocks))
    got = [o.token_id for o in again.loop.submit(again.loop.engine.tokenizer.encode("hi"), GREEDY)
           if o.token_id is not None]
    assert got == reference(tiny_packed, "hi")


def test_tier_copies_are_sources_host_before_disk(tiny_packed: Path, tmp_path: Path,
                                                 coordinator: Coordinator, members) -> None:
    """No replica serves the model, but two nodes' tiers hold it (HOST and DISK): they join as
    sources, the wave is planned from them (HOST first; both for two targets), the bytes come
    from them, and the new replicas serve the model's tokens."""
    import shutil

    from faascale.pipecast.source import TierSource

    manifest = read_manifest(tiny_packed)
    sources = [TierSource(f"n{i}-{kind.lower()}", manifest, tiny_packed, kind, secret=SECRET,
                          coordinator=coordinator.address) for i, kind in ((1, "DISK"), (2, "HOST"))]
    try:
        wait_for(lambda: len(coordinator.progress().get(manifest.model_id, {})
                             .get("members", {})) == 2)
        assert {v["route"] for v in coordinator.progress()[manifest.model_id]["members"].values()} \
            == {"source"}
        coordinator.expect(manifest.model_id, 1)
        one = members("r1", tmp_path / "r1")
        assert one.wait_servable(60)
        wait_for(lambda: coordinator.progress()[manifest.model_id]["finished"])
        first = coordinator.progress()[manifest.model_id]["finished"][0]
        assert first["record"][0]["detail"]["sources"] == ["n2-host"]  # HOST before DISK
        wait_for(lambda: one.full)
        coordinator.expect(manifest.model_id, 2)
        two = [members(f"r{i}", tmp_path / f"r{i}") for i in (2, 3)]
        wait_for(lambda: len(coordinator.progress()[manifest.model_id]["finished"]) == 2)
        second = coordinator.progress()[manifest.model_id]["finished"][1]
        # r1 serves now: the replica first, then the HOST copy (one source per target)
        assert second["record"][0]["detail"]["sources"] == ["r1", "n2-host"]
        for m in (one, *two):
            wait_for(lambda m=m: m.full)
            got = [o.token_id for o in m.loop.submit(m.loop.engine.tokenizer.encode("hi"), GREEDY)
                   if o.token_id is not None]
            assert got == reference(tiny_packed, "hi")
        partial = tmp_path / "partial"
        partial.mkdir()
        shutil.copy(tiny_packed / manifest.blocks[0].file, partial / manifest.blocks[0].file)
        with pytest.raises(ValueError, match="lacks blocks"):
            TierSource("n3-host", manifest, partial, "HOST", secret=SECRET,
                       coordinator=coordinator.address)
    finally:
        for src in sources:
            src.close()


def test_from_zero_members_that_can_read_the_store_share_its_load(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """Nobody holds the model; two new replicas whose agents can load from the object store (the
    node's block store fetches for them; here a directory of verified files) are planned
    together: each loads half from the store, the other half from the other one."""
    manifest = read_manifest(tiny_packed)
    loaded: dict[str, list[int]] = {"s1": [], "s2": []}

    def loader(name: str):
        def load(i: int) -> Path:
            loaded[name].append(i)
            return tiny_packed / manifest.blocks[i].file
        return load

    coordinator.expect(manifest.model_id, 2)
    both = [members(n, tmp_path / n, store_loader=loader(n)) for n in ("s1", "s2")]
    for m in both:
        assert m.wait_servable(60)
        wait_for(lambda m=m: m.full)
    assert sorted(loaded["s1"] + loaded["s2"]) == list(range(manifest.num_blocks))
    assert len(loaded["s1"]) == len(loaded["s2"]) == manifest.num_blocks // 2
    wait_for(lambda: coordinator.progress()[manifest.model_id]["finished"])
    done = coordinator.progress()[manifest.model_id]["finished"][0]
    assert done["algorithm"] == "repair" and done["record"][0]["detail"]["sources"] == ["store"]
    for m in both:
        got = [o.token_id for o in m.loop.submit(m.loop.engine.tokenizer.encode("hi"), GREEDY)
               if o.token_id is not None]
        assert got == reference(tiny_packed, "hi")


def test_from_zero_the_wave_starts_when_every_expected_member_joined(
        tiny_packed: Path, tmp_path: Path) -> None:
    """With no holder to wait for, two expected members that can read the store are planned as
    soon as both joined, not after the join window (60 s here; the platform's is 1 s): a scale
    from zero waited it out before."""
    manifest = read_manifest(tiny_packed)
    tokenizer = Tokenizer(read_tokenizer_json(tiny_packed, manifest), manifest.tokenizer)
    with ZmqTransport(secret=SECRET, name="coordinator", recv_hwm=64) as t:
        coord = Coordinator(t, join_window_s=60.0, dead_after_s=2.0, hung_after_s=6.0)
        thread = threading.Thread(target=coord.run, daemon=True)
        thread.start()
        made: list[Member] = []
        try:
            coord.expect(manifest.model_id, 2)
            t0 = time.monotonic()
            for n in ("z1", "z2"):
                made.append(Member(n, manifest, tokenizer, tmp_path / n, CFG, secret=SECRET,
                                   coordinator=coord.address,
                                   store_loader=lambda i: tiny_packed / manifest.blocks[i].file))
            for m in made:
                assert m.wait_servable(30)
            assert time.monotonic() - t0 < 20, "the wave waited for the join window"
        finally:
            for m in made:
                m.close()
            coord.stop()
            thread.join(5)


def test_with_no_holder_the_members_are_told_to_load_from_the_store(
        tiny_packed: Path, tmp_path: Path, members) -> None:
    m = members("lonely", tmp_path / "lonely")
    with pytest.raises(MemberError, match="no replica holds"):
        m.wait_servable(10)


def test_a_member_that_dies_is_forgotten_and_the_rest_finish(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """r2 dies right after joining (before it sends or receives anything): the coordinator
    notices the missing heartbeat, re-plans from the live holders, and r1 and r3 get the whole
    model."""
    model_id = read_manifest(tiny_packed).model_id
    members("r0", tiny_packed)
    coordinator.expect(model_id, 3)
    r1 = members("r1", tmp_path / "r1")
    r2 = members("r2", tmp_path / "r2")
    r2.close(leave=False)  # crashed: no goodbye, no heartbeat, its sockets closed
    r3 = members("r3", tmp_path / "r3")
    wait_for(lambda: r1.full and r3.full, timeout_s=60)
    progress = coordinator.progress()[model_id]
    assert "r2" not in progress["members"]
    record = (progress["finished"] or [progress["active"]])[-1]["record"]
    assert any(e["kind"] == "stalled" and e["detail"]["node"] == "r2" for e in record)


def test_a_silent_member_whose_socket_answers_is_waited_for_then_dropped(
        tiny_packed: Path, coordinator: Coordinator, members) -> None:
    """Two members stop heartbeating at the same moment. One crashed (its sockets closed): it
    is dead after ``dead_after_s``. The other is only silent, as a process starved of CPU is (its
    sockets stay open and libzmq answers the transport's heartbeats): it is still a member then,
    and is dropped only after ``hung_after_s``."""
    model_id = read_manifest(tiny_packed).model_id

    def present() -> set[str]:
        return set(coordinator.progress()[model_id]["members"])

    quiet, gone = members("quiet", tiny_packed), members("gone", tiny_packed)
    frozen = members("frozen", tiny_packed)
    wait_for(lambda: model_id in coordinator.progress()
             and present() == {"quiet", "gone", "frozen"})
    time.sleep(1.0)  # the coordinator's connections to them are up
    for m in (quiet, frozen):
        m._tell = (lambda tell: lambda op, **meta: None if op == "heartbeat"
                   else tell(op, **meta))(m._tell)
    # frozen: so starved that libzmq's I/O thread misses its heartbeats too (seen on 0.35-core
    # nodes); its port still answers: its kernel holds the socket (``listening``)
    reachable = coordinator.transport.reachable
    coordinator.transport.reachable = lambda a: a != frozen.ctl_tx.address and reachable(a)
    gone.close(leave=False)
    silent_from = time.monotonic()
    wait_for(lambda: "gone" not in present(), timeout_s=8)
    assert {"quiet", "frozen"} <= present()
    time.sleep(max(0.0, silent_from + 4.0 - time.monotonic()))
    assert {"quiet", "frozen"} <= present(), "a silent member with a live socket was dropped"
    wait_for(lambda: not {"quiet", "frozen"} & present(), timeout_s=10)
    assert time.monotonic() - silent_from >= 4.9  # hung_after_s 6 s less one heartbeat period


def test_a_plan_a_member_did_not_take_is_sent_again(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """The first plan to t1 finds its control socket taking nothing (a starved process drops
    libzmq's connection for seconds): the coordinator sends it again a moment later, and both
    targets get the model from that plan, without a stall's re-plan or a failed part."""
    model_id = read_manifest(tiny_packed).model_id
    members("s0", tiny_packed)
    coordinator.expect(model_id, 2)
    coordinator.join_window_s = 30.0  # one wave for both, however slowly they come up
    send, refused = coordinator.transport.send, []

    def flaky(address, kind, meta, payload=None, **kw):  # (the coordinator's thread)
        t1 = coordinator.models[model_id].nodes.get("t1")
        if meta.get("op") == "plan" and not refused and t1 is not None and address == t1.ctl:
            refused.append(meta["plan_id"])
            raise TransportTimeout(f"{address} did not take a control frame (test)")
        return send(address, kind, meta, payload, **kw)

    coordinator.transport.send = flaky
    targets = [members(f"t{i}", tmp_path / f"t{i}") for i in (1, 2)]
    t0 = time.monotonic()
    wait_for(lambda: all(t.full for t in targets), timeout_s=30)
    assert refused and time.monotonic() - t0 < 20
    done = coordinator.progress()[model_id]["finished"][-1]
    kinds = [e["kind"] for e in done["record"]]
    assert "stall_replan" not in kinds and "agent_failed" not in kinds, kinds
    assert coordinator.models[model_id].plans_sent == 1  # the same plan, delivered late


def test_a_member_that_joins_while_a_scale_out_runs_joins_it(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """t1 joins, its wave starts (its plan is held back a while, so the scale-out is still
    running); t2 joins meanwhile: it is added to the running scale-out (one re-plan), not left
    for a second wave after the first ends, and both get the model."""
    model_id = read_manifest(tiny_packed).model_id
    members("s0", tiny_packed)
    coordinator.expect(model_id, 1)  # as a burst's intents arrive one by one
    send, held_back = coordinator.transport.send, []

    def slow(address, kind, meta, payload=None, **kw):  # (the coordinator's thread)
        t1 = coordinator.models[model_id].nodes.get("t1")
        if meta.get("op") == "plan" and t1 is not None and address == t1.ctl and len(held_back) < 2:
            held_back.append(meta["plan_id"])  # t1's control socket takes nothing for ~2 s
            raise TransportTimeout(f"{address} did not take a control frame (test)")
        return send(address, kind, meta, payload, **kw)

    coordinator.transport.send = slow
    first = members("t1", tmp_path / "t1")
    wait_for(lambda: coordinator.progress()[model_id]["active"] is not None)
    coordinator.expect(model_id, 1)
    second = members("t2", tmp_path / "t2")
    wait_for(lambda: first.full and second.full, timeout_s=30)
    progress = coordinator.progress()[model_id]
    assert len(progress["finished"]) == 1 and progress["active"] is None  # one scale-out
    kinds = [e["kind"] for e in progress["finished"][0]["record"]]
    assert kinds.count("planned") == 1 and "joined" in kinds, kinds
    assert progress["finished"][0]["blocks"] == {"t1": 4, "t2": 4}


def test_a_source_that_dies_mid_scale_out_is_replaced_by_the_other_holder(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """Two replicas hold the model (K = 2 sources). One dies just before the wave is planned,
    too recently for the coordinator to know: the plan counts on it, its targets wait for
    blocks that never come, the coordinator notices (no heartbeat), re-plans what is missing
    from the live holder and the targets, and every target still gets every block."""
    model_id = read_manifest(tiny_packed).model_id
    members("s0", tiny_packed)
    s1 = members("s1", tiny_packed)
    coordinator.expect(model_id, 3)
    targets = [members(f"t{i}", tmp_path / f"t{i}") for i in (1, 2)]
    s1.close(leave=False)  # crashed
    targets.append(members("t3", tmp_path / "t3"))
    wait_for(lambda: coordinator.progress()[model_id]["active"] is not None
             or coordinator.progress()[model_id]["finished"])
    planned = (coordinator.progress()[model_id]["active"]
               or coordinator.progress()[model_id]["finished"][-1])["record"][0]
    assert sorted(planned["detail"]["sources"]) == ["s0", "s1"]
    wait_for(lambda: all(t.full for t in targets), timeout_s=60)
    done = coordinator.progress()[model_id]["finished"][-1]
    assert done["dead"] == ["s1"] and done["blocks"] == {"t1": 4, "t2": 4, "t3": 4}
    kinds = [e["kind"] for e in done["record"]]
    assert "repaired" in kinds and kinds.index("stalled") < kinds.index("repaired")
    for t in targets:  # the blocks are the model's: the engine gives its tokens
        got = [o.token_id for o in t.loop.submit(t.loop.engine.tokenizer.encode("hi"), GREEDY)
               if o.token_id is not None]
        assert got == reference(tiny_packed, "hi")


def test_a_restarted_coordinator_gets_its_members_back(tiny_packed: Path, tmp_path: Path,
                                                         members, coordinator: Coordinator) -> None:
    """The coordinator forgets everything (a new process): members' next heartbeat gets them
    asked to rejoin, with the blocks they hold; a member that leaves is forgotten at once."""
    model_id = read_manifest(tiny_packed).model_id
    members("a", tiny_packed)
    b = members("b", tiny_packed)
    wait_for(lambda: len(coordinator.progress().get(model_id, {}).get("members", {})) == 2)
    with coordinator._lock:  # what a restart loses
        coordinator.models.clear()
    wait_for(lambda: sorted(coordinator.progress().get(model_id, {}).get("members", {}))
             == ["a", "b"], timeout_s=10)
    a = coordinator.progress()[model_id]["members"]["a"]
    assert (a["blocks"], a["route"], len(a["listen"])) == (4, "full", 3)
    b.close()
    wait_for(lambda: list(coordinator.progress()[model_id]["members"]) == ["a"], timeout_s=1.5)


def test_a_coordinator_restarted_on_another_port_is_found_through_locate(
        tiny_packed: Path, coordinator: Coordinator, members, monkeypatch) -> None:
    """The coordinator dies and comes back on another port (its old one was taken): a member's
    heartbeats fail, it asks ``locate`` where the coordinator is now and joins it there with the
    blocks it holds. Without ``locate`` it stays lost (the old address answers nobody)."""
    import faascale.pipecast.participant as participant

    monkeypatch.setattr(participant, "LOCATE_AFTER_S", 1.0)
    model_id = read_manifest(tiny_packed).model_id
    a, b = members("a", tiny_packed), members("b", tiny_packed)
    wait_for(lambda: len(coordinator.progress().get(model_id, {}).get("members", {})) == 2)
    coordinator.stop()  # the old process is gone: its port answers nobody
    coordinator.transport.close()
    with ZmqTransport(secret=SECRET, name="coordinator", recv_hwm=64) as t:
        assert t.address != a.coordinator
        moved = Coordinator(t, join_window_s=0.5, dead_after_s=2.0, hung_after_s=6.0)
        thread = threading.Thread(target=moved.run, daemon=True)
        thread.start()
        asked: list[str] = []
        a.locate = lambda: asked.append("a") or t.address
        try:
            wait_for(lambda: list(moved.progress().get(model_id, {}).get("members", {})) == ["a"],
                     timeout_s=20)
            m = moved.progress()[model_id]["members"]["a"]
            assert (m["blocks"], m["route"]) == (4, "full"), m
            assert a.coordinator == t.address and asked
            time.sleep(2 * participant.LOCATE_AFTER_S + 6)  # b has no locate: still lost
            assert list(moved.progress()[model_id]["members"]) == ["a"]
            assert b.coordinator != t.address
        finally:
            for m in (a, b):  # b's leave would wait out its send timeout on a dead address
                m.close(leave=False)
            moved.stop()
            thread.join(5)


def test_a_block_lost_to_a_full_disk_is_replanned_and_the_member_gets_it(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """r1's part file for block 2 cannot be made during its first plan (ENOSPC: a full
    /dev/shm, both when made ahead and when its first piece comes): its agent gives the block up
    (no part file left) and the receive thread goes on; the member reports its part failed, and
    the coordinator re-plans block 2 at once (not at the 60 s stall timeout), so r1 ends with the
    whole model and serves it."""
    import errno

    from faascale.pipecast.landing import PART_SUFFIX, Landing

    manifest = read_manifest(tiny_packed)
    real_prepare, failed, first_landing = Landing.prepare, [], []

    def prepare(self, block: int):
        if block == 2 and (not first_landing or first_landing[0] is self):
            first_landing[:] = [self]  # the first plan's landing, not the re-plan's
            failed.append(self.part_path(block))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_prepare(self, block)

    monkeypatch.setattr(Landing, "prepare", prepare)
    members("r0", tiny_packed)
    coordinator.expect(manifest.model_id, 1)
    start = time.monotonic()
    r1 = members("r1", tmp_path / "r1")
    wait_for(lambda: r1.full, timeout_s=30)
    assert time.monotonic() - start < 20 and failed and not failed[0].exists()
    assert r1.held == set(range(manifest.num_blocks))
    assert not list((tmp_path / "r1").glob(f"*{PART_SUFFIX}"))
    wait_for(lambda: coordinator.progress()[manifest.model_id]["finished"])
    record = coordinator.progress()[manifest.model_id]["finished"][0]["record"]
    kinds = [e["kind"] for e in record]
    assert "agent_failed" in kinds and kinds.count("agent_replan") == 1, kinds
    got = [o.token_id for o in r1.loop.submit(r1.loop.engine.tokenizer.encode("hi"), GREEDY)
           if o.token_id is not None]
    assert got == reference(tiny_packed, "hi")


def test_a_tick_that_raises_is_counted_and_the_coordinator_goes_on(
        tiny_packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one model's timers (here: the liveness check raises for its member) is logged
    and counted for that model; the coordinator thread lives, the other model's timers run (its
    crashed member is forgotten), and once the fault is gone the first model's run too."""
    from faascale.pipecast.service import Coordinator as Service

    real_dead = Service._dead

    def dead(self, node, now):
        if node.name == "x-bad":
            raise RuntimeError("injected: a tick bug")
        return real_dead(self, node, now)

    monkeypatch.setattr(Service, "_dead", dead)
    with ZmqTransport(secret=SECRET, name="gone") as gone:
        dead_ctl = gone.address  # bound, then closed: nothing answers there
    with ZmqTransport(secret=SECRET, name="coordinator") as t:
        coord = Service(t, join_window_s=0.1, dead_after_s=0.3, hung_after_s=0.6)
        thread = threading.Thread(target=coord.run, daemon=True)
        thread.start()
        try:
            for model, node in (("model-bad", "x-bad"), ("model-good", "x-good")):
                with coord._lock:  # two full members whose processes are gone
                    coord._join({"model_id": model, "node": node, "num_blocks": 1,
                                 "block_bytes": [8], "held": [0], "ctl": dead_ctl,
                                 "blocks": dead_ctl, "session": "s"}, time.monotonic())
            wait_for(lambda: "x-good" not in coord.progress()["model-good"]["members"], 10)
            errors = coord.progress()["model-bad"]["tick_errors"]
            assert errors >= 1 and thread.is_alive()
            assert list(coord.progress()["model-bad"]["members"]) == ["x-bad"]
            monkeypatch.undo()
            wait_for(lambda: not coord.progress()["model-bad"]["members"], 10)
            assert thread.is_alive() and coord.progress()["model-bad"]["tick_errors"] >= errors
        finally:
            coord.stop()
            thread.join(5)


def test_beside_a_serving_replica_new_replicas_that_can_read_the_store_load_part_from_it(
        tiny_packed: Path, tmp_path: Path, coordinator: Coordinator, members) -> None:
    """r0 serves the model; three new replicas whose agents can load from the object store join:
    the store fills in beside r0 (busy serving the load that caused the scale-up). r0 sends
    one target's part only, two targets load theirs from the store, each gets the rest over
    the network, and every one ends with the model and answers as r0 does."""
    manifest = read_manifest(tiny_packed)
    loaded: dict[str, list[int]] = {}

    def loader(name: str):
        loaded[name] = []

        def load(i: int) -> Path:
            loaded[name].append(i)
            return tiny_packed / manifest.blocks[i].file
        return load

    source = members("r0", tiny_packed)
    assert source.full
    coordinator.expect(manifest.model_id, 3)
    new = [members(n, tmp_path / n, store_loader=loader(n)) for n in ("r1", "r2", "r3")]
    for m in new:
        assert m.wait_servable(60)
        wait_for(lambda m=m: m.full)
    wait_for(lambda: coordinator.progress()[manifest.model_id]["finished"])
    done = coordinator.progress()[manifest.model_id]["finished"][0]
    planned = done["record"][0]["detail"]
    assert done["algorithm"] == "pipecast-k1+store" and planned["store_fills"] is True
    assert sum(1 for got in loaded.values() if got) >= 2  # the store fed two of them
    assert all(len(got) < manifest.num_blocks for got in loaded.values())  # and peers the rest
    assert done["blocks"] == dict.fromkeys(("r1", "r2", "r3"), manifest.num_blocks)
    # r0 seeded one target's part (the blocks no target held yet): 2 of the 4 blocks at most
    largest_two = sum(sorted(b.size_bytes for b in manifest.blocks)[-2:])
    assert 0 < source.blocks_tx.stats.bytes_sent <= largest_two < manifest.total_bytes
    want = reference(tiny_packed, "hi")
    for m in new:
        got = [o.token_id for o in m.loop.submit(m.loop.engine.tokenizer.encode("hi"), GREEDY)
               if o.token_id is not None]
        assert got == want
