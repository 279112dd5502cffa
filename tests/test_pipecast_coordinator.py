"""The coordinator's decisions from literal cluster views and a fake clock (no I/O, no sleeps)."""

from __future__ import annotations

import dataclasses

import pytest

from faascale.pipecast.coordinator import (STORE, Holder, HolderKind, Route, RouteMode, ScaleOut,
                                           ScaleOutRequest, choose_sources, plan_scale_out,
                                           store_fills_in)
from faascale.pipecast.timing import simulate

MB = 1 << 20


def request(targets: tuple[str, ...], holders: tuple[Holder, ...] = (), local: frozenset[str] = frozenset(),
            num_blocks: int = 6) -> ScaleOutRequest:
    return ScaleOutRequest("m-1", num_blocks, (100 * MB,) * num_blocks, targets, holders, local)


def test_sources_fastest_first_never_a_target_at_most_one_per_network_target() -> None:
    holders = (Holder("d1", HolderKind.DISK), Holder("h1", HolderKind.HOST),
               Holder("r1", HolderKind.REPLICA), Holder("r1", HolderKind.DISK),
               Holder("t1", HolderKind.HOST))  # t1's tier holds it: a local target, not a source
    req = request(("t1", "t2", "t3", "t4"), holders, local=frozenset({"t1"}))
    assert choose_sources(req, max_sources=2) == ("r1", "h1")
    assert choose_sources(req, max_sources=8) == ("r1", "h1", "d1")  # 3 network targets
    assert choose_sources(request(("t1", "t2"))) == (STORE,)
    assert choose_sources(request(("t1",), (Holder("t1", HolderKind.HOST),), frozenset({"t1"}))) == ()


def test_the_plan_multicasts_from_the_sources_and_loads_local_targets_locally() -> None:
    req = request(("t1", "t2", "t3", "t4", "t5"), (Holder("r1", HolderKind.REPLICA),
                                                   Holder("r2", HolderKind.REPLICA)),
                  local=frozenset({"t5"}))
    plan = plan_scale_out(req)
    plan.validate()
    assert plan.sources == ("r1", "r2") and plan.algorithm == "pipecast-k2"
    assert {x.node for x in plan.local_loads} == {"t5"}
    assert not any(t.dst == "t5" for t in plan.transfers)
    # Two sources with rotated orders: the network targets together hold every block after
    # ceil(6 / 2) = 3 steps.
    assert plan.first_complete_union_step() == 2


def test_a_model_in_pieces_is_planned_as_rotated_chains() -> None:
    """Agents that cut through (the manifest lists pieces) relay in chains: r1 -> t1 -> t2 from
    block 0 and r2 -> t3 from block 3; the union is complete as early as with pipelines."""
    holders = (Holder("r1", HolderKind.REPLICA), Holder("r2", HolderKind.REPLICA))
    req = request(("t1", "t2", "t3"), holders)
    plan = plan_scale_out(dataclasses.replace(req, cut_through=True))
    plan.validate()
    assert plan.algorithm == "pipecast-k2-chain"
    upstream = {t.dst: t.src for t in plan.transfers}
    assert upstream == {"t1": "r1", "t2": "t1", "t3": "r2"}
    first = {t.dst: t.block for t in plan.transfers if t.step == min(
        x.step for x in plan.transfers if x.dst == t.dst)}
    assert first == {"t1": 0, "t2": 0, "t3": 3}
    assert plan.first_complete_union_step() == plan_scale_out(req).first_complete_union_step()


def feed(scale: ScaleOut, until_s: float | None = None) -> float:
    """Deliver the plan's block arrivals in time order (from its simulated timeline)."""
    timeline = simulate(scale.plan, scale.request.block_bytes, link_gbps=1.0, local_gbps=8.0)
    last = 0.0
    for (node, block), at_s in sorted(timeline.arrival_s.items(), key=lambda kv: (kv[1], kv[0])):
        if until_s is not None and at_s > until_s:
            break
        scale.block_arrived(node, block, at_s)
        last = at_s
    return last


def test_pipelines_serve_before_any_replica_is_full_then_dissolve() -> None:
    req = request(("t1", "t2", "t3", "t4"), (Holder("r1", HolderKind.REPLICA),
                                             Holder("r2", HolderKind.REPLICA)))
    scale = ScaleOut(req, now_s=0.0)
    timeline = simulate(scale.plan, req.block_bytes, link_gbps=1.0)
    first_full_s = min(timeline.node_done_s.values())
    assert timeline.first_union_s is not None and timeline.first_union_s < first_full_s
    feed(scale, until_s=timeline.first_union_s)
    routes = scale.routes()
    in_pipeline = [r for r in routes.values() if r.mode is RouteMode.PIPELINE]
    assert in_pipeline and not any(r.mode is RouteMode.FULL for r in routes.values())
    layout = in_pipeline[0].pipeline
    assert layout is not None and layout.covers(6)
    assert all(set(range(s.first_block, s.last_block + 1)) <= scale.holdings[s.replica]
               for s in layout.stages)
    scale.served_through_pipeline(in_pipeline[0].replica, timeline.first_union_s)
    feed(scale)
    assert scale.done and all(r.mode is RouteMode.FULL for r in scale.routes().values())
    assert scale.pipelines.pipelines == ()
    kinds = [e.kind for e in scale.record]
    # The record shows a request served through a pipeline before any new replica was full.
    assert kinds.index("served") < kinds.index("full")
    served = next(e for e in scale.record if e.kind == "served")
    assert served.detail["stages"] == [[s.replica, s.first_block, s.last_block]
                                       for s in layout.stages]
    assert served.detail["full_replicas"] == []
    assert scale.progress()["bytes_moved"] == 4 * 6 * 100 * MB


def test_a_dead_source_is_noticed_and_repaired_from_targets_and_the_store() -> None:
    req = request(("t1", "t2", "t3"), (Holder("r1", HolderKind.REPLICA),))
    scale = ScaleOut(req, now_s=0.0)
    timeline = simulate(scale.plan, req.block_bytes, link_gbps=1.0)
    cut_s = timeline.step_end_s[2]  # r1 dies after step 2
    feed(scale, until_s=cut_s)
    assert scale.stalled(now_s=cut_s + 1.0, timeout_s=5.0) == []
    stalled = scale.stalled(now_s=cut_s + 10.0, timeout_s=5.0)
    assert stalled == ["t1", "t2", "t3"]
    before = {n: set(b) for n, b in scale.holdings.items()}
    plan = scale.node_failed("r1", now_s=cut_s + 10.0)
    plan.validate()
    assert "r1" not in plan.sources and not any(t.src == "r1" for t in plan.transfers)
    # Blocks some target already has move between targets; only the rest come from the store.
    held_somewhere = set().union(*before.values())
    assert all(t.block not in held_somewhere for t in plan.transfers if t.src == STORE)
    assert any(t.src != STORE for t in plan.transfers)
    # Delivering the repair plan finishes the scale-out.
    for t in sorted(plan.transfers, key=lambda t: t.step):
        scale.block_arrived(t.dst, t.block, cut_s + 10.0 + t.step)
    assert scale.done


def test_a_stalled_live_target_is_replanned_with_what_it_lacks_and_stays_a_target() -> None:
    """A target whose receive stalled while everyone lives (no block for a while): ``replan``
    sends it only what it lacks, from the holders (the source and the other targets), and
    marks nobody dead; delivering that plan finishes the scale-out."""
    req = request(("t1", "t2"), (Holder("r1", HolderKind.REPLICA),), num_blocks=4)
    scale = ScaleOut(req, now_s=0.0)
    for b in range(4):
        scale.block_arrived("t1", b, 1.0 + b)
    for b in (1, 2, 3):  # block 0 never comes to t2
        scale.block_arrived("t2", b, 1.5 + b)
    assert scale.stalled(now_s=70.0, timeout_s=60.0) == ["t2"]
    plan = scale.replan(now_s=70.0)
    plan.validate()
    assert [(t.dst, t.block) for t in plan.transfers] == [("t2", 0)]
    assert plan.transfers[0].src in ("r1", "t1") and not scale.dead
    assert scale.stalled(now_s=71.0, timeout_s=60.0) == []  # its clock restarts
    scale.block_arrived("t2", 0, 72.0)
    assert scale.done


def test_a_dead_target_leaves_its_pipeline_and_is_not_waited_for() -> None:
    req = request(("t1", "t2"), (Holder("r1", HolderKind.REPLICA),), num_blocks=4)
    scale = ScaleOut(req, now_s=0.0)
    scale.block_arrived("t1", 0, 1.0)
    scale.block_arrived("t1", 1, 2.0)
    scale.block_arrived("t2", 2, 2.0)
    scale.block_arrived("t2", 3, 3.0)
    assert scale.route("t1").mode is RouteMode.PIPELINE  # {0,1} + {2,3}
    scale.node_failed("t2", now_s=4.0)
    assert scale.route("t1").mode is RouteMode.LOADING
    assert scale.route("t2").mode is RouteMode.LOADING and not scale.done
    for b in (2, 3):
        scale.block_arrived("t1", b, 5.0)
    assert scale.done  # the dead target is not waited for


def test_once_a_new_replica_is_full_the_others_borrow_it_instead_of_waiting() -> None:
    """t1 became full (its pipeline with t2 dissolved); t2 holds blocks 0 and 3: it serves
    through its own prefix [0] and t1 for the rest; t3, holding nothing, through t1 alone."""
    req = request(("t1", "t2", "t3"), (Holder("r1", HolderKind.REPLICA),), num_blocks=4)
    scale = ScaleOut(req, now_s=0.0)
    for b in (0, 1, 2):
        scale.block_arrived("t1", b, 1.0)
    scale.block_arrived("t2", 3, 1.0)
    assert scale.route("t2").mode is RouteMode.PIPELINE  # {0,1,2} + {3}
    scale.block_arrived("t2", 0, 2.0)
    scale.block_arrived("t1", 3, 2.0)  # t1 full: the pipeline dissolves
    assert scale.route("t1").mode is RouteMode.FULL
    t2, t3 = scale.route("t2"), scale.route("t3")
    assert t2.mode is RouteMode.PIPELINE and t2.pipeline is not None
    assert [(s.replica, s.first_block, s.last_block) for s in t2.pipeline.stages] == [
        ("t2", 0, 0), ("t1", 1, 3)]
    assert t3.pipeline is not None and [(s.replica, s.first_block, s.last_block)
                                        for s in t3.pipeline.stages] == [("t1", 0, 3)]
    assert scale.pipelines.pipeline_of("t3") is None  # borrowed, not a member
    scale.node_failed("t1", now_s=3.0)  # the helper died: back to waiting
    assert scale.route("t2").mode is RouteMode.LOADING


def test_a_replica_outside_every_pipeline_rides_one_instead_of_waiting() -> None:
    req = request(("t1", "t2", "t3"), (Holder("r1", HolderKind.REPLICA),), num_blocks=4)
    scale = ScaleOut(req, now_s=0.0)
    assert scale.route("t3").mode is RouteMode.LOADING  # nothing to ride yet
    for node, b in (("t1", 0), ("t1", 1), ("t2", 2), ("t2", 3), ("t3", 0)):
        scale.block_arrived(node, b, 1.0)
    own = scale.route("t1").pipeline
    assert own is not None and scale.pipelines.pipeline_of("t3") is None
    assert scale.route("t3") == Route("t3", RouteMode.PIPELINE, own)


def test_bad_requests_are_typed_errors() -> None:
    with pytest.raises(ValueError, match="one size per block"):
        ScaleOutRequest("m", 3, (1, 2), ("t",))
    with pytest.raises(ValueError, match="distinct and not empty"):
        ScaleOutRequest("m", 1, (1,), ())
    with pytest.raises(ValueError, match="are not targets"):
        ScaleOutRequest("m", 1, (1,), ("t",), local=frozenset({"x"}))


def test_targets_that_hold_blocks_already_are_planned_with_them() -> None:
    """A member that rejoined a restarted coordinator (or kept what a cut-short plan brought) is
    sent only what it lacks; what the targets hold together may serve at once."""
    req = ScaleOutRequest("m-1", 6, (100 * MB,) * 6, ("t1", "t2", "t3"),
                          (Holder("r1", HolderKind.REPLICA),),
                          held={"t1": frozenset({0, 1, 2}), "t2": frozenset({3, 4, 5})})
    plan = plan_scale_out(req)
    plan.validate()  # every target ends with every block, none twice
    to = {t: sorted(x.block for x in plan.transfers if x.dst == t) for t in req.targets}
    assert to == {"t1": [3, 4, 5], "t2": [0, 1, 2], "t3": [0, 1, 2, 3, 4, 5]}
    so = ScaleOut(req, now_s=0.0)
    assert so.holdings["t1"] == {0, 1, 2} and so.holdings["t3"] == set()
    assert so.route("t1").mode is RouteMode.PIPELINE  # t1 + t2 cover the model before any move
    assert so.record[0].detail["held"] == {"t1": 3, "t2": 3}
    # the blocks they hold are not "arrivals" of this scale-out
    assert so.block_arrived("t1", 0, 1.0) is None


def test_held_blocks_of_strangers_or_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="not targets"):
        ScaleOutRequest("m", 2, (1, 1), ("t",), held={"x": frozenset({0})})
    with pytest.raises(ValueError, match="outside"):
        ScaleOutRequest("m", 2, (1, 1), ("t",), held={"t": frozenset({2})})


def test_partial_targets_beside_local_loaders() -> None:
    req = ScaleOutRequest("m-1", 4, (MB,) * 4, ("t1", "t2"), (Holder("r1", HolderKind.REPLICA),),
                          local=frozenset({"t2"}), held={"t1": frozenset({1})})
    plan = plan_scale_out(req)
    plan.validate()
    assert sorted(x.block for x in plan.transfers if x.dst == "t1") == [0, 2, 3]
    assert sorted(x.block for x in plan.local_loads if x.node == "t2") == [0, 1, 2, 3]


def test_from_zero_the_targets_load_different_parts_from_the_store_and_serve_together() -> None:
    req = ScaleOutRequest("m-1", 8, (MB,) * 8, ("t1", "t2", "t3", "t4"))
    plan = plan_scale_out(req)
    plan.validate()
    store_bytes = {t: sum(x.dst == t for x in plan.transfers if x.src == STORE) for t in req.targets}
    assert store_bytes == dict.fromkeys(req.targets, 2)  # <= 1/2 of each one's 8 blocks: 1/4
    so = ScaleOut(req, now_s=0.0)
    for x in plan.transfers:  # the first two steps: each target holds its own quarter
        if x.step <= 1:
            so.block_arrived(x.dst, x.block, 1.0 + x.step)
    assert all(len(so.holdings[t]) == 2 for t in req.targets)
    assert {so.route(t).mode for t in req.targets} == {RouteMode.PIPELINE}  # serve before any is full


def test_a_replica_that_joins_a_running_scale_out_is_planned_with_the_rest() -> None:
    """t2 joins while t1 is half loaded: the re-plan gives t2 every block and t1 only what it
    lacks, from the holder and from t1's blocks; the scale-out is done when both are full."""
    scale = ScaleOut(request(("t1",), (Holder("r1", HolderKind.REPLICA),)), now_s=0.0)
    for b in (0, 1, 2):
        scale.block_arrived("t1", b, now_s=1.0)
    plan = scale.add_targets(["t2"], {}, now_s=2.0)
    plan.validate()
    got = {t: {x.block for x in plan.transfers if x.dst == t} for t in ("t1", "t2")}
    assert got == {"t1": {3, 4, 5}, "t2": set(range(6))}
    assert {x.src for x in plan.transfers} <= {"r1", "t1", "t2"}
    assert scale.request.targets == ("t1", "t2") and not scale.done
    assert [e.kind for e in scale.record].count("joined") == 1
    assert scale.route("t2").mode in (RouteMode.LOADING, RouteMode.PIPELINE)
    for x in sorted(plan.transfers, key=lambda x: x.step):
        scale.block_arrived(x.dst, x.block, now_s=3.0 + x.step)
    assert scale.done
    with pytest.raises(ValueError, match="no new target"):
        scale.add_targets(["t1"], {}, now_s=9.0)


def test_a_target_declared_dead_that_joins_again_is_planned_with_what_it_holds() -> None:
    scale = ScaleOut(request(("t1", "t2"), (Holder("r1", HolderKind.REPLICA),)), now_s=0.0)
    scale.block_arrived("t2", 0, now_s=1.0)
    scale.node_failed("t2", now_s=2.0)  # silent too long: forgotten, then it joins again
    assert scale.route("t2").mode is RouteMode.LOADING
    plan = scale.add_targets(["t2"], {"t2": frozenset({0, 1})}, now_s=3.0)
    assert "t2" not in scale.dead and scale.holdings["t2"] == {0, 1}
    assert {x.block for x in plan.transfers if x.dst == "t2"} == {2, 3, 4, 5}
    assert scale.request.targets == ("t1", "t2")


def test_the_store_fills_in_beside_serving_replicas_only() -> None:
    """Only a serving replica to copy from (busy: the scale-up is its load) and targets that can
    load from the store: the store fills in (``pipecast-k1+store``); the targets cover the model
    together after b/N steps, so they serve through a pipeline b - b/N steps sooner than from
    the replica alone, which sends b/N blocks instead of the whole model. A HOST copy
    (a node serving nothing), one network target, or targets that cannot read the store: the
    replica or the copy sends alone, as before."""
    replica = (Holder("r1", HolderKind.REPLICA),)
    targets = ("t1", "t2", "t3")
    helped = dataclasses.replace(request(targets, replica), store_helps=True)
    plan = plan_scale_out(helped)
    plan.validate()
    assert plan.algorithm == "pipecast-k1+store" and store_fills_in(helped, ("r1",))
    alone = plan_scale_out(request(targets, replica))
    assert alone.algorithm == "pipecast-k1"
    assert plan.first_complete_union_step() == 1 < alone.first_complete_union_step()
    # the replica only seeds the blocks no target holds yet: one target's part, b/N
    assert sum(x.src == "r1" for x in plan.transfers) == 6 // 3
    so = ScaleOut(helped, now_s=0.0)
    assert so.record[0].detail["store_fills"] is True
    for x in plan.transfers:
        if x.step <= 1:
            so.block_arrived(x.dst, x.block, 1.0 + x.step)
    assert {so.route(t).mode for t in targets} == {RouteMode.PIPELINE}
    # a target that joins before anything arrived is planned with the store filling in too
    late = ScaleOut(helped, now_s=0.0).add_targets(["t4"], {}, now_s=0.5)
    late.validate()
    assert any(x.src == STORE and x.dst == "t4" for x in late.transfers)
    assert late.first_complete_union_step() == 1
    for holders, tgts in (((Holder("h1", HolderKind.HOST),), targets),
                          (replica + (Holder("h1", HolderKind.HOST),), targets + ("t4",)),
                          (replica, ("t1",))):
        req = dataclasses.replace(request(tgts, holders), store_helps=True)
        assert not store_fills_in(req, choose_sources(req))
        assert not any(x.src == STORE for x in plan_scale_out(req).transfers)


def test_a_finished_scale_outs_timeline_names_the_first_pipeline_and_the_arrivals() -> None:
    """The coordinator's log line for a finished scale-out (``membership.timeline``): seconds
    from the plan to the first pipeline, and per target to its first block, half its blocks
    and all of them, read from the record; a target that got nothing shows dashes."""
    from faascale.pipecast.membership import timeline

    replica = (Holder("r1", HolderKind.REPLICA),)
    so = ScaleOut(dataclasses.replace(request(("t1", "t2", "t3"), replica, num_blocks=4),
                                      store_helps=True), now_s=100.0)
    for at, node, block in ((101.0, "t1", 0), (102.5, "t1", 1), (103.0, "t2", 2), (103.5, "t2", 3),
                            (104.0, "t1", 2), (106.0, "t1", 3)):
        so.block_arrived(node, block, at)
    line = timeline(so, 107.25)
    assert line.startswith("pipecast-k1+store from r1, store in 7.2 s (last plan: 5 of 12 moves "
                           "from the store); first pipeline 3.5 s;"), line
    assert line.endswith("t1 1.0/2.5/6.0, t2 3.0/3.5/-, t3 -/-/-"), line


def test_a_wave_is_planned_once_the_intents_stop_coming() -> None:
    """A burst's intents come one policy tick apart (1 -> 2 -> 3) and warm replicas join at
    once: the joiners are planned together once no intent came for SETTLE_S (each planned
    alone would re-plan the running scale-out), never later than MAX_GATHER_S after the first
    joined; with no intent in flight, as soon as every expected one joined."""
    from faascale.pipecast.membership import MAX_GATHER_S, SETTLE_S, ModelState, gathered

    m = ModelState("m-1", "fn", 6, (MB,) * 6)
    assert not gathered(m, 0.0, join_window_s=1.0)  # nobody waiting
    m.expected, m.expected_at_s = 1, 0.0
    m.pending, m.first_pending_s = ["t1"], 0.1
    assert not gathered(m, 0.2, 1.0)  # t1 was expected, but intents are still coming
    m.expected, m.expected_at_s = 2, 0.5  # the next tick's intent
    m.pending.append("t2")
    assert not gathered(m, 0.6, 1.0)
    assert not gathered(m, 0.5 + SETTLE_S - 0.01, 1.0)
    assert gathered(m, 0.5 + SETTLE_S, 1.0)
    # nothing to copy from yet: only once the join window passed
    assert not gathered(m, 0.5 + SETTLE_S, 5.0, have_source=False)
    assert gathered(m, 5.1, 5.0, have_source=False)
    # intents that never stop: planned MAX_GATHER_S after the first joined
    m.expected_at_s = 0.1 + MAX_GATHER_S - 0.1
    assert not gathered(m, 0.1 + MAX_GATHER_S - 0.05, 1.0)
    assert gathered(m, 0.1 + MAX_GATHER_S, 1.0)
    # no intent in flight (a cold replica joins long after its intent): at once
    cold = ModelState("m-1", "fn", 6, (MB,) * 6, expected=1, expected_at_s=0.0)
    cold.pending, cold.first_pending_s = ["t1"], 12.0
    assert gathered(cold, 12.0, 1.0)
