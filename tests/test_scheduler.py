"""The batching policy is pure: literal snapshots in, a plan out."""

from faascale.engine.scheduler import BatchPolicy, StepPlan, WaitingView


def w(*sizes: int) -> list[WaitingView]:
    return [WaitingView(f"r{i}", n) for i, n in enumerate(sizes)]


def test_admits_fcfs_within_slots_and_budget() -> None:
    policy = BatchPolicy(max_batch_size=4, max_prefill_tokens_per_step=100)
    assert policy.plan(w(30, 30, 30, 30), num_running=0) == StepPlan(("r0", "r1", "r2"), False)
    assert policy.plan(w(30, 30), num_running=3) == StepPlan(("r0",), True)
    assert policy.plan(w(30), num_running=4) == StepPlan((), True)
    assert policy.plan([], num_running=0) == StepPlan((), False)


def test_a_long_prompt_is_admitted_alone_not_starved() -> None:
    policy = BatchPolicy(max_batch_size=8, max_prefill_tokens_per_step=100)
    assert policy.plan(w(500, 10), num_running=2) == StepPlan(("r0",), True)
    # ...and a short prompt behind a long one does not overtake it (first come, first served).
    assert policy.plan(w(10, 500, 10), num_running=0) == StepPlan(("r0",), False)
