"""Admission's decisions, pure: which receive is credited when (``faascale.pipecast.admission``).
The clock is a number the test moves; nothing sleeps (``next_grant(0)`` only reads the queue)."""

from __future__ import annotations

import pytest

from faascale.pipecast.admission import (
    STORE_FIRST_MIN_BYTES_PER_S,
    STORE_FIRST_SETUP_S,
    Admission,
    held_back,
    store_load_bound_s,
)
from faascale.pipecast.schedule import Transfer

MB = 1_000_000


def test_a_store_load_may_hold_receives_back_its_setup_plus_its_bytes_at_the_floor_rate() -> None:
    assert store_load_bound_s(0) == STORE_FIRST_SETUP_S
    assert store_load_bound_s(60 * MB) == pytest.approx(
        STORE_FIRST_SETUP_S + 60 * MB / STORE_FIRST_MIN_BYTES_PER_S)
    assert store_load_bound_s(184 * MB) > store_load_bound_s(60 * MB)


def test_a_receive_waits_for_store_loads_of_earlier_steps_only() -> None:
    pending = [(1, 60 * MB), (2, 60 * MB)]  # steps 1 and 2 from the store, 1 running
    assert held_back(3, pending, running_s=0.5)
    assert held_back(2, pending, running_s=0.5)  # the load of step 1 is earlier
    assert not held_back(1, pending, running_s=0.5)  # nothing of an earlier step
    assert not held_back(0, pending, running_s=0.5)
    assert not held_back(5, [], running_s=0.0)  # no store loads (or all done)


def test_a_store_load_past_its_bound_holds_nothing() -> None:
    pending = [(0, 60 * MB), (1, 184 * MB)]
    bound = store_load_bound_s(60 * MB)  # the running one's, not the next one's
    assert held_back(4, pending, running_s=bound - 0.01)
    assert not held_back(4, pending, running_s=bound)
    assert not held_back(4, pending, running_s=1e9)  # a store that hangs


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def grants(admission: Admission) -> list[int]:
    """Blocks credited so far (drains the queue)."""
    out = []
    while (g := admission.next_grant(0)) is not None:
        out.append(g[0].block)
    return out


# r2's part of the 1 GB model's from-zero plan: blocks 4-7 from the store at steps 0-3, then
# blocks 8, 9 from r3 and block 0 from r1.
STORE = [Transfer(s, "store", "r2", b) for s, b in enumerate((4, 5, 6, 7))]
RECEIVES = [Transfer(4, "r3", "r2", 8), Transfer(5, "r3", "r2", 9), Transfer(6, "r1", "r2", 0)]
PEERS = {"r1": "tcp://r1", "r3": "tcp://r3"}


def test_receives_are_admitted_once_the_store_part_is_done() -> None:
    clock = Clock()
    admission = Admission(RECEIVES, PEERS, [(t, 60 * MB) for t in STORE], clock)
    admission.start()
    assert grants(admission) == []  # store loads of steps 0-3 pending
    for block in (4, 5, 6):
        clock.now_s += 1.0
        admission.stored(block)
        assert grants(admission) == []
    admission.stored(7)
    # r3 sends steps 4 and 5 (one connection: both at once); r1's waits for block 9
    assert grants(admission) == [8, 9]
    admission.delivered(9)
    assert grants(admission) == [0]


def test_a_failed_store_load_counts_as_done() -> None:
    admission = Admission(RECEIVES, PEERS, [(STORE[0], 60 * MB)], Clock())
    admission.start()
    assert grants(admission) == []
    admission.stored(4)  # the agent reports a load done whether it landed or failed
    assert grants(admission) == [8, 9]


def test_a_stalled_store_load_holds_receives_back_at_most_its_bound() -> None:
    clock = Clock()
    admission = Admission(RECEIVES, PEERS, [(t, 60 * MB) for t in STORE], clock)
    admission.start()
    clock.now_s += store_load_bound_s(60 * MB) - 0.01
    assert grants(admission) == []
    clock.now_s += 0.02  # the first load never ends: its bound has passed
    assert grants(admission) == [8, 9]


def test_each_store_load_gets_its_own_bound_from_when_the_previous_one_ended() -> None:
    clock = Clock()
    admission = Admission(RECEIVES, PEERS, [(t, 60 * MB) for t in STORE], clock)
    admission.start()
    clock.now_s += store_load_bound_s(60 * MB) - 1.0
    admission.stored(4)  # in time; block 5's load starts now
    clock.now_s += 1.5  # past the first load's bound from the start, not block 5's
    assert grants(admission) == []


def test_without_store_loads_admission_is_as_before() -> None:
    admission = Admission(RECEIVES, PEERS)
    admission.start()
    assert grants(admission) == [8, 9]
    admission.delivered(8)
    assert grants(admission) == []  # block 0's sender waits for block 9
    admission.delivered(9)
    assert grants(admission) == [0]


def test_a_receive_of_an_earlier_step_than_a_store_load_is_not_held() -> None:
    """Plans put a node's store loads first, but the rule is by step: a receive planned before
    a store load goes ahead of it."""
    store = [(Transfer(2, "store", "r2", 4), 60 * MB)]
    receives = [Transfer(1, "r3", "r2", 8), Transfer(3, "r1", "r2", 0)]
    admission = Admission(receives, PEERS, store, Clock())
    admission.start()
    assert grants(admission) == [8]
    admission.delivered(8)
    assert grants(admission) == []  # step 3 waits for the store load of step 2
    admission.stored(4)
    assert grants(admission) == [0]


def test_a_credit_not_answered_by_its_block_is_sent_again() -> None:
    """A credit can be lost (a sender that has not opened the plan yet drops it): until a frame
    of its block arrives it is due again every CREDIT_RESEND_S, the earliest per sender only
    (a sender sends in step order), and never once its block began to arrive."""
    from faascale.pipecast.admission import CREDIT_RESEND_S

    clock = Clock()
    order = [Transfer(0, "a", "me", 5), Transfer(1, "a", "me", 6), Transfer(2, "b", "me", 7)]
    admission = Admission(order, {"a": "tcp://a:1", "b": "tcp://b:1"}, clock=clock)
    admission.start()
    first = admission.next_grant(0)
    assert first == (order[0], "tcp://a:1")
    admission.credit_sent(first[0])
    assert admission.next_grant(0)[0] == order[1]  # same sender: admitted with it
    admission.credit_sent(order[1])
    assert admission.next_grant(0) is None  # b waits for a's blocks; nothing due yet
    clock.now_s += CREDIT_RESEND_S - 0.01
    assert admission.next_grant(0) is None
    clock.now_s += 0.01
    assert admission.next_grant(0) == (order[0], "tcp://a:1")  # a's earliest, not step 1 too
    assert admission.next_grant(0) is None  # and its clock restarted
    admission.answered(5)  # block 5 began to arrive: step 1's credit is a's earliest now
    clock.now_s += CREDIT_RESEND_S
    assert admission.next_grant(0)[0] == order[1]
    admission.delivered(5)
    admission.delivered(6)  # both in: b is admitted, a is never asked again
    assert admission.next_grant(0)[0] == order[2]
    clock.now_s += 10 * CREDIT_RESEND_S
    assert admission.next_grant(0) is None  # b's credit was never marked sent (no address)
