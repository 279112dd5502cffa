"""Temporary pipelines for real: stages on their own transports (real ZeroMQ sockets on loopback),
the head's engine over a StageChain, and the switch to a full local model mid-stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import EngineConfig
from faascale.engine.engine import Engine, ShardChain
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop
from faascale.engine.model import ModelShard, merge_block_tensors
from faascale.engine.sampling import SamplingParams
from faascale.engine.tokenizer import Tokenizer
from faascale.pipecast.stage import RemoteStage, StageChain, StageError, StageServer
from faascale.pipecast.zmq_transport import ZmqTransport

SECRET = b"stage-test-secret-0123456789"
CFG = EngineConfig(max_batch_size=4, max_seq_len=256)
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_packed: Path) -> tuple:
    m = read_manifest(tiny_packed)
    weights = merge_block_tensors([load_block(tiny_packed, m, i) for i in range(m.num_blocks)])
    return m, weights, Tokenizer(read_tokenizer_json(tiny_packed, m), m.tokenizer)


def shard(model: tuple, start: int, end: int) -> ModelShard:
    m, weights, _ = model
    return ModelShard(m.config, weights, start, end, CFG.torch_dtype)


@pytest.fixture()
def servers(model: tuple) -> Iterator:
    """Start StageServers on demand (own transport, own thread); stopped and closed after."""
    started: list[tuple[StageServer, threading.Thread, ZmqTransport]] = []

    def start(first: int, last: int) -> tuple[StageServer, ZmqTransport]:
        t = ZmqTransport(secret=SECRET, name=f"stage-{first}-{last}-{len(started)}")
        server = StageServer(shard(model, first, last), t, CFG.max_batch_size)
        thread = threading.Thread(target=server.serve, kwargs={"poll_s": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread, t))
        return server, t

    yield start
    for server, thread, t in started:
        server.stop()
        thread.join(5)
        t.close()


def reference(tiny_packed: Path, prompts: list[str]) -> list[list[int]]:
    llm = LLM.load(tiny_packed, CFG)
    return [list(c.token_ids) for c in llm.generate(prompts, GREEDY)]


def run(chain, tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    loop = EngineLoop(Engine(chain, tokenizer, CFG), name="pipeline-test")
    try:
        streams = [loop.submit(tokenizer.encode(p), GREEDY) for p in prompts]
        return [[o.token_id for o in s if o.token_id is not None] for s in streams]
    finally:
        loop.stop()


PROMPTS = ["hello pipeline", "a second, longer prompt to batch", "x"]


def test_a_two_stage_pipeline_gives_the_model_s_tokens(tiny_packed: Path, model: tuple, servers) -> None:
    m, _, tok = model
    server, stage_t = servers(4, 8)  # the other replica holds the second half (blocks 2-3)
    with ZmqTransport(secret=SECRET, name="head") as head_t:
        chain = StageChain([shard(model, 0, 4), RemoteStage(head_t, stage_t.address, 4, 8, timeout_s=10)],
                           m.config, CFG.max_batch_size)
        got = run(chain, tok, PROMPTS)
    assert got == reference(tiny_packed, PROMPTS)
    assert server.requests_served >= 20  # one prefill per request, then decode steps, all remote


def test_remote_first_and_last_stages(tiny_packed: Path, model: tuple, servers) -> None:
    """Token ids go to a remote first stage, logits come back from a remote last stage."""
    m, _, tok = model
    _, first = servers(0, 3)
    _, last = servers(5, 8)
    with ZmqTransport(secret=SECRET, name="head-mid") as head_t:
        chain = StageChain([RemoteStage(head_t, first.address, 0, 3, timeout_s=10), shard(model, 3, 5),
                            RemoteStage(head_t, last.address, 5, 8, timeout_s=10)],
                           m.config, CFG.max_batch_size)
        got = run(chain, tok, PROMPTS)
    assert got == reference(tiny_packed, PROMPTS)


def test_switching_to_the_full_model_mid_stream_loses_and_repeats_nothing(
        tiny_packed: Path, model: tuple, servers) -> None:
    m, _, tok = model
    server, stage_t = servers(2, 8)

    class CountingChain(ShardChain):
        calls = 0

        def forward(self, tokens, batch):  # noqa: ANN001, ANN202
            CountingChain.calls += 1
            return super().forward(tokens, batch)

    with ZmqTransport(secret=SECRET, name="head-switch") as head_t:
        chain = StageChain([shard(model, 0, 2), RemoteStage(head_t, stage_t.address, 2, 8, timeout_s=10)],
                           m.config, CFG.max_batch_size)
        loop = EngineLoop(Engine(chain, tok, CFG), name="switch-test")
        try:
            streams = [loop.submit(tok.encode(p), GREEDY) for p in PROMPTS]
            its = [iter(s) for s in streams]
            got = [[next(it).token_id for _ in range(6)] for it in its]  # 6 tokens each via the pipeline
            # The replica finished loading: its full model takes over between two steps.
            served_at_switch = server.requests_served
            loop.switch_runner(CountingChain([shard(model, 0, 8)], CFG.max_batch_size))
            for g, it in zip(got, its):
                g.extend(o.token_id for o in it if o.token_id is not None)
        finally:
            loop.stop()
    assert got == reference(tiny_packed, PROMPTS)  # every token once, in order, same as unbroken
    # The switch happened mid-stream (the engine may run a few steps ahead of the reader): the
    # pipeline stopped being used (at most the steps that began before the switch was queued) before
    # it had run every step, and the full model ran the 3 resume prefills and the decodes left.
    all_steps = len(PROMPTS) + GREEDY.max_tokens - 1  # a prefill each, then batched decodes
    assert served_at_switch <= server.requests_served <= served_at_switch + 2 < all_steps
    assert CountingChain.calls >= len(PROMPTS) + 1


def test_a_stalled_stage_holds_the_requests_until_the_next_runner(model: tuple, servers,
                                                                   tiny_packed: Path) -> None:
    """The stage stops answering: within its timeout the head hears it (``on_unavailable``), the
    request waits instead of failing, and on the next runner (here the full model) its stream
    finishes with the model's tokens, none lost or repeated."""
    m, _, tok = model
    server, stage_t = servers(4, 8)
    server.stop()  # alive socket, nobody serving: a stall
    heard: list[Exception] = []
    lost = threading.Event()
    with ZmqTransport(secret=SECRET, name="head-stall") as head_t:
        remote = RemoteStage(head_t, stage_t.address, 4, 8, timeout_s=1.0)
        chain = StageChain([shard(model, 0, 4), remote], m.config, CFG.max_batch_size)
        loop = EngineLoop(Engine(chain, tok, CFG), name="stall-test",
                          on_unavailable=lambda e: (heard.append(e), lost.set()))
        try:
            stream = loop.submit(tok.encode(PROMPTS[0]), GREEDY)
            assert lost.wait(20), "the stall was not reported"
            assert isinstance(heard[0], StageError) and "did not answer within 1 s" in str(heard[0])
            assert loop.engine.num_waiting == 1 and loop.engine.num_running == 0
            loop.switch_runner(ShardChain([shard(model, 0, 8)], CFG.max_batch_size))
            ids = [o.token_id for o in stream if o.token_id is not None]
        finally:
            loop.stop()
    assert ids == reference(tiny_packed, PROMPTS[:1])[0]


def test_a_stage_error_is_reported_not_waited_for(model: tuple, servers) -> None:
    m, _, _ = model
    _, stage_t = servers(4, 8)
    with ZmqTransport(secret=SECRET, name="head-bad") as head_t:
        remote = RemoteStage(head_t, stage_t.address, 4, 8, timeout_s=10)
        import torch

        from faascale.engine.model import ForwardBatch

        with pytest.raises(StageError, match="slot out of range"):
            remote.forward(torch.zeros(1, 1, m.config.hidden_size), ForwardBatch((99,), (0,), 1))


def test_chains_must_cover_the_model_contiguously(model: tuple) -> None:
    m, _, _ = model
    with pytest.raises(ValueError, match="not contiguous"):
        StageChain([shard(model, 0, 3), shard(model, 4, 8)], m.config, 2)
    with pytest.raises(ValueError, match="start at layer 0"):
        StageChain([shard(model, 1, 8)], m.config, 2)


def test_every_member_of_a_pipeline_can_head_its_own_requests(tiny_packed: Path, model: tuple) -> None:
    """A holds layers [0,3), B [3,6), C [6,8). A and C each head requests through the others at
    the same time, on the same slot numbers: B serves both heads (one KV cache each) and every
    request gets the model's tokens."""
    m, _, tok = model
    names = ("A", "B", "C")
    bounds = {"A": (0, 3), "B": (3, 6), "C": (6, 8)}
    heads = {n: ZmqTransport(secret=SECRET, name=f"{n}-head") for n in ("A", "C")}
    stage_ts = {n: ZmqTransport(secret=SECRET, name=f"{n}-stage") for n in names}
    servers = {n: StageServer(shard(model, *bounds[n]), stage_ts[n], CFG.max_batch_size) for n in names}
    threads = [threading.Thread(target=s.serve, kwargs={"poll_s": 0.05}, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()

    def chain_of(head: str) -> StageChain:
        return StageChain([shard(model, *bounds[n]) if n == head else
                           RemoteStage(heads[head], stage_ts[n].address, *bounds[n], timeout_s=10)
                           for n in names], m.config, CFG.max_batch_size)

    results: dict[str, list[list[int]]] = {}
    prompts = {"A": PROMPTS, "C": PROMPTS[::-1]}
    runners = [threading.Thread(target=lambda h: results.__setitem__(h, run(chain_of(h), tok, prompts[h])),
                                args=(h,)) for h in ("A", "C")]
    try:
        for r in runners:
            r.start()
        for r in runners:
            r.join(60)
    finally:
        for s in servers.values():
            s.stop()
        for t in threads:
            t.join(5)
        for t in [*heads.values(), *stage_ts.values()]:
            t.close()
    assert results["A"] == reference(tiny_packed, PROMPTS)
    assert results["C"] == reference(tiny_packed, PROMPTS[::-1])
    assert sorted(k[0] for k in servers["B"].caches) == sorted([heads["A"].address,
                                                                 heads["C"].address])
    servers["B"].forget(heads["A"].address)
    assert [k[0] for k in servers["B"].caches] == [heads["C"].address]


def test_a_stage_request_replayed_after_the_stage_restarted_is_refused(
        tiny_packed: Path, model: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage and head transports take their member's session only. Every request the head sent
    to the stage's first incarnation is captured off the wire; the stage restarts on the same
    port with a new session: the replayed requests are refused and counted (none runs on its
    KV cache), a head still naming the old session gets a StageError, and one naming the new
    session gets the model's tokens."""
    import time

    import torch
    import zmq

    from faascale.engine.model import ForwardBatch
    from faascale.pipecast.transport import encode_header, mac_key
    from faascale.platform.server import free_port

    m, _, tok = model
    port, captured = free_port(), []
    real_send = ZmqTransport.send

    def tap(self, peer_address, kind, meta, payload=None, **kw):
        header = real_send(self, peer_address, kind, meta, payload, **kw)
        if "reply_to" in meta:  # a request to the stage
            captured.append([encode_header(header, mac_key(SECRET)),
                             bytes(memoryview(payload).cast("B"))])
        return header

    def stage(session: str) -> tuple[StageServer, ZmqTransport, threading.Thread]:
        t = ZmqTransport(secret=SECRET, name="stage", port=port, epochs_only=True)
        t.open_epoch(session)
        server = StageServer(shard(model, 4, 8), t, CFG.max_batch_size)
        thread = threading.Thread(target=server.serve, kwargs={"poll_s": 0.05}, daemon=True)
        thread.start()
        return server, t, thread

    def chain(head_t: ZmqTransport, address: str, session: str, timeout_s: float) -> StageChain:
        remote = RemoteStage(head_t, address, 4, 8, timeout_s=timeout_s, epoch=session,
                             reply_epoch="head-session")
        return StageChain([shard(model, 0, 4), remote], m.config, CFG.max_batch_size)

    want = reference(tiny_packed, PROMPTS[:1])
    with ZmqTransport(secret=SECRET, name="head", epochs_only=True) as head_t:
        head_t.open_epoch("head-session")
        monkeypatch.setattr(ZmqTransport, "send", tap)
        server, t, thread = stage("stage-1")
        assert run(chain(head_t, t.address, "stage-1", 10), tok, PROMPTS[:1]) == want
        monkeypatch.undo()
        server.stop()
        thread.join(5)
        t.close()
        assert len(captured) == server.requests_served > 0

        server, t, thread = stage("stage-2")
        try:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(t.address)
            for frame in captured:
                sock.send_multipart(frame)
            deadline = time.monotonic() + 10
            while t.stats.rejected_frames < len(captured) and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.close()
            ctx.term()
            assert t.stats.rejected_frames == len(captured) and server.requests_served == 0
            old = RemoteStage(head_t, t.address, 4, 8, timeout_s=0.5, epoch="stage-1",
                              reply_epoch="head-session")
            with pytest.raises(StageError, match="did not answer"):  # refused: never served
                old.forward(torch.zeros(1, 1, m.config.hidden_size), ForwardBatch((0,), (0,), 1))
            assert t.stats.rejected_frames == len(captured) + 1
            assert run(chain(head_t, t.address, "stage-2", 10), tok, PROMPTS[:1]) == want
        finally:
            server.stop()
            thread.join(5)
            t.close()


def test_slow_round_trips_stage_work_and_engine_steps_are_logged(
        tiny_packed: Path, model: tuple, servers, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where a pipeline's time goes, in the logs: a round trip to a remote stage longer than
    SLOW_STAGE_S (the head's side), the stage's own work on it (the stage's side), and an
    engine step longer than SLOW_STEP_S with the runner it ran on. With both thresholds at 0
    every one is "slow"; the tokens are still the model's."""
    import logging

    from faascale.engine import loop as loop_module
    from faascale.pipecast import stage as stage_module

    monkeypatch.setattr(stage_module, "SLOW_STAGE_S", 0.0)
    monkeypatch.setattr(loop_module, "SLOW_STEP_S", 0.0)
    m, _, tok = model
    _, stage_t = servers(4, 8)
    with caplog.at_level(logging.WARNING), ZmqTransport(secret=SECRET, name="head-slow") as head_t:
        chain = StageChain([shard(model, 0, 4), RemoteStage(head_t, stage_t.address, 4, 8,
                                                            timeout_s=10)],
                           m.config, CFG.max_batch_size)
        got = run(chain, tok, ["slow"])
    assert got == reference(tiny_packed, ["slow"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"stage [4, 8) at {stage_t.address} answered 1 x" in s for s in lines), lines
    assert any(s.startswith("layers [4, 8) for ") and "took" in s for s in lines), lines
    assert any(s.startswith("an engine step took") and "on StageChain" in s for s in lines), lines
