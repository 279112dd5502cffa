"""Multicast schedules are pure: plans are checked against the step model by an independent
checker here (not only by ``validate``), and literal cases are worked out by hand in comments."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from faascale.pipecast.repair import repair
from faascale.pipecast.schedule import (
    LocalLoad,
    MulticastPlan,
    PlanError,
    Transfer,
    binary_tree,
    binomial_pipeline,
    chain,
    k_way,
    naive,
    naive_parallel,
    rotated,
)
from faascale.pipecast.timing import simulate


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def check_step_model(plan: MulticastPlan) -> dict[tuple[str, int], int]:
    """Independent of ``validate``: one send and one receive per node per step, senders hold the
    block before the step, every target gets every block exactly once. Returns the arrivals."""
    received = Counter((t.dst, t.block) for t in plan.transfers)
    received.update((x.node, x.block) for x in plan.local_loads)
    wanted = {(n, b) for n in plan.targets for b in range(plan.num_blocks)}
    assert set(received) == wanted
    assert set(received.values()) <= {1}
    arrival = {(t.dst, t.block): t.step for t in plan.transfers}
    arrival.update({(x.node, x.block): x.step for x in plan.local_loads})
    for t in plan.transfers:
        assert t.src in plan.sources or arrival[(t.src, t.block)] < t.step, t
    sends = Counter((t.step, t.src) for t in plan.transfers if t.src not in plan.unlimited_senders)
    receives = Counter((t.step, t.dst) for t in plan.transfers)
    loads = Counter((x.step, x.node) for x in plan.local_loads)
    assert max([*sends.values(), *receives.values(), *loads.values()], default=1) == 1
    return arrival


# -- binomial pipeline ------------------------------------------------------------------------

def at_step(plan, step: int) -> tuple[Transfer, ...]:
    """The plan's transfers of one step."""
    return tuple(t for t in plan.transfers if t.step == step)


@pytest.mark.parametrize("num_nodes", range(2, 41))
def test_binomial_reaches_the_optimal_step_count_for_every_n(num_nodes: int) -> None:
    for num_blocks in range(1, 25):
        plan = binomial_pipeline("src", names("t", num_nodes - 1), num_blocks)
        plan.validate()
        check_step_model(plan)
        # Lower bound: the last block leaves the source at step b-1, then at most doubles.
        assert plan.num_steps == num_blocks + math.ceil(math.log2(num_nodes)) - 1
        assert plan.algorithm == "binomial"


def test_binomial_four_nodes_three_blocks_by_hand() -> None:
    # 2-cube: s=0, a=1, b=2, c=3; step t pairs vertices across bit t mod 2.
    plan = binomial_pipeline("s", ["a", "b", "c"], 3)
    assert set(plan.transfers) == {
        Transfer(0, "s", "a", 0),
        Transfer(1, "s", "b", 1), Transfer(1, "a", "c", 0),
        Transfer(2, "s", "a", 2), Transfer(2, "c", "b", 0), Transfer(2, "b", "c", 1),
        Transfer(3, "s", "b", 2), Transfer(3, "c", "a", 1), Transfer(3, "a", "c", 2),
    }
    assert plan.num_steps == 4  # 3 + log2(4) - 1
    assert [plan.arrival_step("a", b) for b in range(3)] == [0, 3, 2]
    assert [plan.arrival_step("b", b) for b in range(3)] == [2, 1, 3]
    assert [plan.arrival_step("c", b) for b in range(3)] == [1, 2, 3]
    assert plan.arrival_step("s", 2) == -1
    assert at_step(plan, 1) == (Transfer(1, "a", "c", 0), Transfer(1, "s", "b", 1))


def test_binomial_three_nodes_twins_swap_in_one_extra_step() -> None:
    # n=3: a 1-cube whose vertex 1 is the twins a (receives from s) and b (fed by a, one step
    # behind); after the cube's b=2 steps, a hands b its last block: 2 + ceil(log2 3) - 1 = 3.
    plan = binomial_pipeline("s", ["a", "b"], 2)
    assert set(plan.transfers) == {Transfer(0, "s", "a", 0), Transfer(1, "s", "a", 1),
                                   Transfer(1, "a", "b", 0), Transfer(2, "a", "b", 1)}
    plan.validate()


def test_binomial_injects_blocks_in_block_order() -> None:
    order = (3, 1, 4, 0, 2)
    plan = binomial_pipeline("s", names("t", 6), 5, order)
    check_step_model(plan)
    from_source = [t.block for t in plan.transfers if t.src == "s"][:5]
    assert from_source == list(order)
    for step in range(5):
        held = set().union(*(plan.holdings_after(step)[t] for t in plan.targets))
        assert held == set(order[:step + 1])
    assert plan.first_complete_union_step() == 4


def test_binomial_edge_cases_and_bad_input() -> None:
    empty = binomial_pipeline("s", [], 4)
    assert (empty.num_steps, empty.transfers, empty.targets) == (0, (), ())
    assert empty.first_complete_union_step() is None
    empty.validate()
    with pytest.raises(PlanError, match="num_blocks"):
        binomial_pipeline("s", ["a"], 0)
    with pytest.raises(PlanError, match="distinct"):
        binomial_pipeline("s", ["a", "a"], 2)
    with pytest.raises(PlanError, match="distinct"):
        binomial_pipeline("s", ["a", "s"], 2)
    with pytest.raises(PlanError, match="permutation"):
        binomial_pipeline("s", ["a"], 3, [0, 1, 1])


# -- k-way PipeCast ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_sources", [1, 2, 3, 4])
def test_k_way_union_is_complete_after_ceil_b_over_k_steps(num_sources: int) -> None:
    for num_targets in range(1, 14):
        for num_blocks in range(1, 13):
            plan = k_way(names("s", num_sources), names("t", num_targets), num_blocks)
            plan.validate()
            check_step_model(plan)
            groups = min(num_sources, num_targets)
            # Each group's first target gets one new block per step from its own source, and
            # rotation starts are at most ceil(b/G) apart; G sources cannot do it faster.
            assert plan.first_complete_union_step() == math.ceil(num_blocks / groups) - 1
            sizes = [num_targets // groups + (k < num_targets % groups) for k in range(groups)]
            assert plan.num_steps == max(num_blocks + math.ceil(math.log2(size + 1)) - 1
                                         for size in sizes)
            assert plan.algorithm == f"pipecast-k{num_sources}"


@pytest.mark.parametrize("num_sources", [1, 2, 3])
def test_k_way_chains_every_target_receives_once_in_its_groups_rotated_order(
        num_sources: int) -> None:
    """``relay="chain"``: each group is a relay; every target gets every block exactly once,
    from the node before it in its chain, in its group's rotated order, and the union is still
    complete after ceil(b/G) steps."""
    for num_targets in range(1, 10):
        for num_blocks in range(1, 9):
            plan = k_way(names("s", num_sources), names("t", num_targets), num_blocks,
                         relay="chain")
            plan.validate()
            check_step_model(plan)
            groups = min(num_sources, num_targets)
            assert plan.algorithm == f"pipecast-k{num_sources}-chain"
            assert plan.first_complete_union_step() == math.ceil(num_blocks / groups) - 1
            incoming: dict[str, list[Transfer]] = {}
            for t in plan.transfers:
                incoming.setdefault(t.dst, []).append(t)
            for target, ts in incoming.items():
                assert sorted(t.block for t in ts) == list(range(num_blocks)), target
                assert len({t.src for t in ts}) == 1, target  # one upstream: a chain
                order = [t.block for t in sorted(ts, key=lambda t: t.step)]
                assert order == list(rotated(num_blocks, order[0])), target
    with pytest.raises(PlanError, match="relay"):
        k_way(["s0"], ["t0"], 2, relay="tree")


def test_k_way_groups_and_rotation_starts() -> None:
    # 3 sources, 5 targets: groups [t0 t1] [t2 t3] [t4]; b=10 starts at 0, 10//3=3, 20//3=6.
    plan = k_way(["s0", "s1", "s2"], names("t", 5), 10)
    first = {t.src: t.block for t in at_step(plan, 0)}
    assert first == {"s0": 0, "s1": 3, "s2": 6}
    group = {"s0": 0, "t0": 0, "t1": 0, "s1": 1, "t2": 1, "t3": 1, "s2": 2, "t4": 2}
    assert all(group[t.src] == group[t.dst] for t in plan.transfers)
    assert [t.block for t in plan.transfers if t.src == "s2"] == list(rotated(10, 6))
    assert plan.first_complete_union_step() == 3  # ceil(10/3) - 1


def test_k_way_local_targets_load_locally_and_receive_nothing() -> None:
    plan = k_way(["s0", "s1"], ["a", "b", "c", "d", "e"], 6, local={"b", "e"})
    plan.validate()
    check_step_model(plan)
    assert not [t for t in plan.transfers if t.dst in {"b", "e"} or t.src in {"b", "e"}]
    # The j-th of 2 local targets starts at j*6//2: b reads 0..5, e reads 3,4,5,0,1,2.
    assert [(x.step, x.block) for x in plan.local_loads if x.node == "b"] == [
        (s, s) for s in range(6)]
    assert [x.block for x in plan.local_loads if x.node == "e"] == [3, 4, 5, 0, 1, 2]
    # Network targets a, c, d: groups [a c] from s0 (start 0) and [d] from s1 (start 3).
    assert {t.dst for t in plan.transfers if t.src == "s1"} == {"d"}
    assert at_step(plan, 0) == (Transfer(0, "s0", "a", 0), Transfer(0, "s1", "d", 3))


def test_k_way_only_local_targets_and_bad_input() -> None:
    plan = k_way(["s0"], ["a"], 3, local={"a"})
    assert plan.transfers == () and plan.num_steps == 3
    plan.validate()
    with pytest.raises(PlanError, match="not targets"):
        k_way(["s0"], ["a"], 3, local={"zz"})
    with pytest.raises(PlanError, match="at least one source"):
        k_way([], ["a"], 3)
    with pytest.raises(PlanError, match="distinct"):
        k_way(["s0", "a"], ["a"], 3)


# -- baselines --------------------------------------------------------------------------------

def test_chain_relays_block_i_to_target_j_at_step_i_plus_j() -> None:
    for num_nodes in (2, 3, 6):
        for num_blocks in (1, 4):
            plan = chain("s", names("t", num_nodes - 1), num_blocks)
            arrival = check_step_model(plan)
            assert arrival == {(f"t{j}", i): i + j
                               for j in range(num_nodes - 1) for i in range(num_blocks)}
            assert plan.num_steps == num_blocks + num_nodes - 2


def test_binary_tree_step_counts() -> None:
    # Left edge 1 step, right edge 2; the deepest path cost c gives c - 1 + 2(b-1) + 1 steps.
    # b=5: n=2 c=1 -> 9; n=3 c=2 -> 10; n=4 -> 10; n=7 (0-2-6) c=4 -> 12; n=8 -> 12;
    # n=15 (0-2-6-14) c=6 -> 14.
    expected = {2: 9, 3: 10, 4: 10, 7: 12, 8: 12, 15: 14}
    for num_nodes, steps in expected.items():
        plan = binary_tree("s", names("t", num_nodes - 1), 5)
        plan.validate()
        check_step_model(plan)
        assert plan.num_steps == steps, num_nodes
    plan = binary_tree("s", ["a", "b"], 2)
    assert set(plan.transfers) == {Transfer(0, "s", "a", 0), Transfer(1, "s", "b", 0),
                                   Transfer(2, "s", "a", 1), Transfer(3, "s", "b", 1)}


def test_naive_baselines() -> None:
    plan = naive("s", names("t", 4), 3)
    check_step_model(plan)
    assert plan.num_steps == 3 * 4
    parallel = naive_parallel(names("t", 4), 3, store="bucket")
    parallel.validate()
    check_step_model(parallel)
    assert (parallel.num_steps, parallel.sources) == (3, ("bucket",))
    limited = MulticastPlan("x", parallel.sources, parallel.targets, 3, parallel.transfers)
    with pytest.raises(PlanError, match="step 0: node 'bucket' sends more than one block"):
        limited.validate()


# -- validate ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("transfers", "message"), [
    ([Transfer(0, "s", "a", 0), Transfer(0, "a", "b", 0), Transfer(1, "s", "b", 0)],
     "step 0: node 'a' sends block 0 it does not hold yet"),
    ([Transfer(0, "s", "a", 0), Transfer(0, "s", "b", 0)],
     "step 0: node 's' sends more than one block"),
    ([Transfer(0, "s", "a", 0), Transfer(0, "r", "a", 1), Transfer(1, "s", "b", 0)],
     "step 0: node 'a' receives more than one block"),
    ([Transfer(0, "s", "a", 0), Transfer(1, "s", "a", 0), Transfer(2, "s", "b", 0)],
     "step 1: target 'a' receives block 0 twice"),
    ([Transfer(0, "s", "a", 0), Transfer(1, "s", "b", 0)],
     "target 'a' ends without blocks \\[1\\]"),
    ([Transfer(0, "s", "s", 0)], "step 0: 's' -> 's'"),
    ([Transfer(0, "s", "a", 2)], "step 0: block 2 is not in 0..1"),
])
def test_validate_names_the_broken_rule(transfers: list[Transfer], message: str) -> None:
    # Two sources s, r; targets a, b; two blocks. Each plan breaks one rule before any other.
    plan = MulticastPlan("bad", ("s", "r"), ("a", "b"), 2, tuple(transfers))
    with pytest.raises(PlanError, match=message):
        plan.validate()


def test_validate_local_load_rules() -> None:
    good = MulticastPlan("l", ("s",), ("a",), 2,
                         (Transfer(0, "s", "a", 1),), (LocalLoad(0, "a", 0),))
    good.validate()  # one network receive and one local load in the same step are allowed
    two = MulticastPlan("l", ("s",), ("a",), 2, (), (LocalLoad(0, "a", 0), LocalLoad(0, "a", 1)))
    with pytest.raises(PlanError, match="step 0: node 'a' loads more than one block locally"):
        two.validate()
    by_source = MulticastPlan("l", ("s",), ("a",), 1, (Transfer(0, "s", "a", 0),),
                              (LocalLoad(0, "s", 0),))
    with pytest.raises(PlanError, match="step 0: local load by 's', not a target"):
        by_source.validate()
    twice = MulticastPlan("l", ("s",), ("a",), 1, (Transfer(1, "s", "a", 0),),
                          (LocalLoad(0, "a", 0),))
    with pytest.raises(PlanError, match="step 1: target 'a' receives block 0 twice"):
        twice.validate()


def test_plan_views_on_a_literal_plan() -> None:
    # Given out of order: the plan sorts by step.
    plan = MulticastPlan("lit", ("s",), ("a", "b"), 2, (
        Transfer(2, "a", "b", 1), Transfer(0, "s", "a", 0), Transfer(1, "a", "b", 0),
        Transfer(1, "s", "a", 1)))
    plan.validate()
    assert [t.step for t in plan.transfers] == [0, 1, 1, 2]
    assert plan.num_steps == 3
    assert plan.holdings_after(-1) == {"s": {0, 1}, "a": frozenset(), "b": frozenset()}
    assert plan.holdings_after(0) == {"s": {0, 1}, "a": {0}, "b": frozenset()}
    assert plan.holdings_after(1) == {"s": {0, 1}, "a": {0, 1}, "b": {0}}
    assert plan.first_complete_union_step() == 1
    assert plan.arrival_step("b", 1) == 2
    with pytest.raises(PlanError, match="not in the plan"):
        plan.arrival_step("zz", 0)
    partial = MulticastPlan("p", ("s",), ("a",), 2, (Transfer(0, "s", "a", 0),))
    assert partial.arrival_step("a", 1) is None
    assert partial.first_complete_union_step() is None


# -- simulate ---------------------------------------------------------------------------------

def test_simulate_chain_by_hand() -> None:
    # 0.001 Gbps = 125,000 bytes/s: block 0 (125 kB) takes 1 s, block 1 (250 kB) 2 s. No barrier
    # between steps (the runtime has none): s->a b0 [0, 1]; s->a b1 [1, 3]; a->b b0 starts as
    # soon as a holds it [1, 2]; a->b b1 once a holds it [3, 5].
    timeline = simulate(chain("s", ["a", "b"], 2), [125_000, 250_000], link_gbps=0.001)
    assert timeline.step_end_s == pytest.approx((1.0, 3.0, 5.0))
    assert timeline.arrival_s == pytest.approx(
        {("a", 0): 1.0, ("a", 1): 3.0, ("b", 0): 2.0, ("b", 1): 5.0})
    assert timeline.node_done_s == pytest.approx({"a": 3.0, "b": 5.0})
    assert timeline.all_done_s == pytest.approx(5.0)
    assert timeline.first_union_s == pytest.approx(3.0)


def test_simulate_pieces_cut_through_a_chain() -> None:
    # One 250 kB block in 2 pieces of 125 kB (1 s each at 125 kB/s): a forwards piece 0 while
    # piece 1 arrives, so b holds the block at 3 s, not 4 s as with whole blocks.
    plan = chain("s", ["a", "b"], 1)
    whole = simulate(plan, [250_000], link_gbps=0.001)
    cut = simulate(plan, [250_000], link_gbps=0.001, piece_bytes=125_000)
    assert whole.arrival_s == pytest.approx({("a", 0): 2.0, ("b", 0): 4.0})
    assert cut.arrival_s == pytest.approx({("a", 0): 2.0, ("b", 0): 3.0})


def test_simulate_a_shared_link_serialises_its_sends() -> None:
    # naive: s sends both blocks to a, then to b, all on s's one outbound link
    timeline = simulate(naive("s", ["a", "b"], 2), [125_000, 125_000], link_gbps=0.001)
    assert timeline.all_done_s == pytest.approx(4.0)
    assert sorted(timeline.arrival_s.values()) == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_simulate_local_loads_use_their_own_rate() -> None:
    # Link 0.001 Gbps (125 kB/s), local 0.0005 Gbps (62.5 kB/s); blocks 125 kB and 62.5 kB.
    # s->a b0 [0, 1], c loads b1 [0, 1]; s->a b1 [1, 1.5], c loads b0 [1, 3] (its reader is busy
    # until 1).
    plan = MulticastPlan("lit", ("s",), ("a", "c"), 2,
                         (Transfer(0, "s", "a", 0), Transfer(1, "s", "a", 1)),
                         (LocalLoad(0, "c", 1), LocalLoad(1, "c", 0)))
    timeline = simulate(plan, [125_000, 62_500], link_gbps=0.001, local_gbps=0.0005)
    assert timeline.step_end_s == pytest.approx((1.0, 3.0))
    assert timeline.arrival_s[("c", 1)] == pytest.approx(1.0)
    assert timeline.node_done_s == pytest.approx({"a": 1.5, "c": 3.0})
    assert timeline.first_union_s == pytest.approx(1.0)  # a holds b0, c holds b1
    with pytest.raises(PlanError, match="local_gbps"):
        simulate(plan, [125_000, 62_500], link_gbps=0.001)


def test_simulate_rejects_bad_input() -> None:
    plan = chain("s", ["a"], 2)
    with pytest.raises(PlanError, match="block_bytes"):
        simulate(plan, [1], link_gbps=1.0)
    with pytest.raises(PlanError, match="link_gbps"):
        simulate(plan, [1, 1], link_gbps=0.0)
    with pytest.raises(PlanError, match="ends without"):
        simulate(MulticastPlan("p", ("s",), ("a",), 2, (Transfer(0, "s", "a", 0),)), [1, 1], 1.0)
    empty = simulate(binomial_pipeline("s", [], 2), [1, 1], 1.0)
    assert (empty.all_done_s, empty.first_union_s, empty.step_end_s) == (0.0, None, ())


# --- repair: finishing a multicast after a failure --------------------------------------------


def test_repair_finishes_from_live_holders_and_validates() -> None:
    """h1 (a source) died mid-plan: t1 holds {0, 1}, t2 holds {2}, t3 nothing; a replica r0
    holds everything. The repair plan gets every block to every target from what is left."""
    holdings = {"r0": range(4), "t1": {0, 1}, "t2": {2}, "t3": set()}
    plan = repair(holdings, ["t1", "t2", "t3"], 4)
    plan.validate()
    assert plan.algorithm == "repair" and plan.sources == ("r0",)
    final = plan.holdings_after(plan.num_steps - 1)
    assert all(final[t] == frozenset(range(4)) for t in ("t1", "t2", "t3"))
    # Nothing a target already had is sent again, and only the 2 + 3 + 4 missing blocks move.
    assert len(plan.transfers) == 2 + 3 + 4
    assert not any(t.block in holdings[t.dst] for t in plan.transfers)
    # Targets forward to each other: not everything comes from r0.
    assert {t.src for t in plan.transfers} > {"r0"}


def test_repair_uses_the_store_only_for_blocks_no_live_node_has() -> None:
    plan = repair({"t1": {0, 1}, "t2": {1}}, ["t1", "t2"], 3, store="s3")
    plan.validate()
    from_store = [t for t in plan.transfers if t.src == "s3"]
    assert from_store and all(t.block == 2 for t in from_store)
    assert plan.unlimited_senders == frozenset({"s3"})
    with pytest.raises(PlanError, match=r"blocks \[2\] are held by no live node"):
        repair({"t1": {0, 1}, "t2": {1}}, ["t1", "t2"], 3)


def test_validate_honours_initial_holdings() -> None:
    ok = MulticastPlan("x", ("a",), ("t",), 2, (Transfer(0, "a", "t", 1),),
                       initial={"a": {1}, "t": {0}})
    ok.validate()
    assert ok.arrival_step("t", 0) == -1 and ok.arrival_step("t", 1) == 0
    with pytest.raises(PlanError, match="does not hold"):
        MulticastPlan("x", ("a",), ("t",), 2, (Transfer(0, "a", "t", 0),),
                      initial={"a": {1}, "t": {1}}).validate()
    with pytest.raises(PlanError, match="twice"):
        MulticastPlan("x", ("a",), ("t",), 2, (Transfer(0, "a", "t", 0), Transfer(1, "a", "t", 1)),
                      initial={"t": {0}}).validate()


def test_repair_from_zero_loads_distinct_parts_from_the_store_then_shares_them() -> None:
    """Four targets, nobody holds the model: each loads a different quarter from the store (in
    parallel), and the rest from the others; the union covers the model after b/N steps."""
    plan = repair({}, ["t1", "t2", "t3", "t4"], 8, store="s3")
    plan.validate()
    from_store = [t for t in plan.transfers if t.src == "s3"]
    assert sorted(t.block for t in from_store) == list(range(8))  # every block leaves it once
    per_target = {d: sum(t.dst == d for t in from_store) for d in ("t1", "t2", "t3", "t4")}
    assert per_target == dict.fromkeys(per_target, 2)  # a quarter each
    assert plan.first_complete_union_step() == 1  # 8 blocks / 4 targets: after steps 0 and 1


def test_repair_with_the_store_filling_in_beside_a_busy_holder() -> None:
    """One busy holder (a serving replica), three targets: with ``store_fills`` the holder feeds
    one target's part and the store the others' (a different part each), so the targets
    together hold the model after b/N steps instead of b; then they fill in from each other,
    from the store when every target holding a block is busy, never from the holder again.
    Without it (the store only for blocks nobody holds) the store sends nothing and the holder
    sends most of the model."""
    filled = repair({"r": range(6)}, ["t1", "t2", "t3"], 6, store="s3", store_fills=True)
    filled.validate()
    alone = repair({"r": range(6)}, ["t1", "t2", "t3"], 6, store="s3")
    alone.validate()
    assert not any(t.src == "s3" for t in alone.transfers)
    assert alone.first_complete_union_step() == 5
    assert filled.first_complete_union_step() == 1
    first = [t for t in filled.transfers if t.step <= 1]  # the union: a part per target
    assert {(t.src, t.dst) for t in first} == {("r", "t1"), ("s3", "t2"), ("s3", "t3")}
    assert sorted(t.block for t in first) == list(range(6))
    # the holder only seeds blocks no target holds; later a target takes a block from a free
    # target, else from the store
    assert [t.block for t in filled.transfers if t.src == "r"] == [0, 1]
    for t in filled.transfers:
        if t.step > 1 and t.src == "s3":
            holders = {x.dst for x in filled.transfers if x.block == t.block and x.step < t.step}
            senders = {x.src for x in filled.transfers if x.step == t.step}
            assert holders and holders <= senders  # every target holding it was busy
    assert filled.num_steps <= alone.num_steps
