"""Which tier copies a node offers as PipeCast sources (``platform/tier_sources.py``): the pure
decision, and the keeper applying it (the store's answer and the sources are literals here; the
real ones are exercised in test_platform_pipecast.py)."""

from __future__ import annotations

from faascale.platform.tier_sources import Offer, TierSources, plan_sources


def held(model_id: str, tier: str = "HOST", pinned: bool = False) -> dict:
    return {"model_id": model_id, "manifest_json": "{}", "tier": tier,
            "directory": f"/t/{tier}/{model_id}", "pinned": pinned}


def test_unmapped_complete_copies_are_offered_mapped_ones_are_not() -> None:
    plan = plan_sources([held("a"), held("b", pinned=True), held("c", "DISK")], {})
    assert [o.model_id for o in plan.start] == ["a", "c"] and plan.stop == ()
    assert plan.start[1] == Offer("c", "DISK", "/t/DISK/c")


def test_a_copy_that_moved_tier_is_offered_again_and_a_gone_one_leaves() -> None:
    running = {"a": Offer("a", "HOST", "/t/HOST/a"), "b": Offer("b", "HOST", "/t/HOST/b"),
               "c": Offer("c", "HOST", "/t/HOST/c")}
    plan = plan_sources([held("a"), held("b", "DISK"), held("c", pinned=True)], running)
    assert plan.stop == ("b", "c")  # b's HOST copy was evicted; a replica maps c again
    assert plan.start == (Offer("b", "DISK", "/t/DISK/b"),)


class Source:
    def __init__(self, offer: Offer) -> None:
        self.offer, self.closed = offer, False

    def close(self) -> None:
        self.closed = True


def test_the_keeper_starts_and_closes_sources_and_survives_a_failed_start() -> None:
    answer = [held("a"), held("b")]
    made: list[Source] = []
    tries: list[str] = []

    def make(offer: Offer, manifest_json: str) -> Source:
        tries.append(offer.model_id)
        if tries.count("b") == 1 and offer.model_id == "b":
            raise RuntimeError("no coordinator yet")
        made.append(Source(offer))
        return made[-1]

    keeper = TierSources(lambda: list(answer), make, poll_s=0.01)
    keeper.step()  # a starts; b's first start fails
    assert sorted(keeper.running) == ["a"]
    keeper.step()  # b again: started now
    assert sorted(keeper.running) == ["a", "b"]
    answer[:] = [held("b")]
    keeper.step()
    assert sorted(keeper.running) == ["b"] and made[0].closed
    keeper.stop()
    assert keeper.running == {} and all(s.closed for s in made)


def test_pipecast_listens_where_the_contact_says() -> None:
    """An embedded platform's contact binds PipeCast to loopback; a joined one to this node's Ray
    IP (the interface the cluster's nodes reach each other on). The secret is never printed."""
    import ray

    from faascale.platform.pipecast_actor import Contact

    embedded = Contact("tcp://127.0.0.1:5000", b"s" * 32, loopback=True)
    joined = Contact("tcp://10.0.0.7:5000", b"s" * 32, loopback=False)
    assert embedded.bind_host() == "127.0.0.1"
    assert joined.bind_host() == ray.util.get_node_ip_address()
    assert "sss" not in repr(embedded)
