"""What a warm runtime prepares ahead (``model_prep.py``): the preparation itself on a real packed
model, and the ``Preparer``'s bookkeeping (fakes only stand in for the store and the clock)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support import FakeClock

from faascale.platform import model_prep
from faascale.platform.model_prep import PreparedModel, Preparer


def test_prepare_reads_the_metadata_and_parses_the_tokenizer(tiny_packed: Path) -> None:
    from faascale.engine.manifest import ModelManifest
    from faascale.engine.tokenizer import Tokenizer

    got = model_prep.prepare(str(tiny_packed))
    on_disk = ModelManifest.from_json((tiny_packed / "manifest.json").read_text())
    assert got.manifest.model_id == on_disk.model_id and got.prefix == tiny_packed.name
    fresh = Tokenizer(got.tokenizer_json, got.manifest.tokenizer)
    assert got.tokenizer.encode("hello world") == fresh.encode("hello world")
    assert got.tokenizer._template is not None  # the chat template is compiled already
    assert "hi" in got.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert got.store.get(f"{got.prefix}/manifest.json")  # the store is open and reusable


def test_prepare_binds_to_the_deployed_manifest(tiny_packed: Path) -> None:
    from faascale.memory_tier.packed import ManifestMismatch, manifest_digest

    digest = manifest_digest((tiny_packed / "manifest.json").read_bytes())
    assert model_prep.prepare(str(tiny_packed)).manifest_digest == digest
    assert model_prep.prepare(str(tiny_packed), digest).manifest.model_id
    with pytest.raises(ManifestMismatch, match="redeploy"):
        model_prep.prepare(str(tiny_packed), "sha256:" + "0" * 64)


def test_take_refuses_a_preparation_of_another_manifest() -> None:
    prepared = _fake("s3://b/m")
    prepared.manifest_digest = "sha256:old"
    p = Preparer(locations=lambda: ["s3://b/m"], prepare=lambda loc: prepared,
                 idle=lambda: True)
    p.step()
    assert p.take("s3://b/m", wait_s=0, expect_digest="sha256:new") is None
    p = Preparer(locations=lambda: ["s3://b/m"], prepare=lambda loc: prepared,
                 idle=lambda: True)
    p.step()
    assert p.take("s3://b/m", wait_s=0, expect_digest="sha256:old") is prepared


def test_prepare_of_a_missing_model_raises(tmp_path: Path) -> None:
    from faascale.memory_tier.store import ObjectNotFound

    with pytest.raises(ObjectNotFound):
        model_prep.prepare(str(tmp_path / "nothing-here"))


def _fake(location: str) -> PreparedModel:
    return PreparedModel(location, None, location, None, "{}", object(), time.time(), 0.0)


def test_preparer_prepares_each_published_model_once_and_forgets_unpublished() -> None:
    published = ["s3://b/m1", "s3://b/m2", "s3://b/m3"]
    calls: list[str] = []
    seen: list[list[str]] = []

    def prep(loc: str) -> PreparedModel:
        calls.append(loc)
        return _fake(loc)

    p = Preparer(locations=lambda: list(published), prepare=prep, idle=lambda: True,
                 max_models=2, on_prepared=seen.append)
    assert p.step() == 2 and calls == ["s3://b/m1", "s3://b/m2"]  # at most max_models
    assert p.step() == 0 and len(calls) == 2  # nothing twice
    assert seen[-1] == ["s3://b/m1", "s3://b/m2"]
    published.remove("s3://b/m1")
    assert p.step() == 1 and calls[-1] == "s3://b/m3"
    assert sorted(p.prepared()) == ["s3://b/m2", "s3://b/m3"]


def test_preparer_retries_a_failed_model_only_after_a_while() -> None:
    clock = FakeClock(0.0)
    attempts: list[float] = []

    def prep(loc: str) -> PreparedModel:
        attempts.append(clock.now_s)
        if len(attempts) == 1:
            raise OSError("store unreachable")
        return _fake(loc)

    p = Preparer(locations=lambda: ["s3://b/m"], prepare=prep, idle=lambda: True, clock=clock)
    assert p.step() == 0 and p.prepared() == []
    clock.now_s = model_prep.RETRY_S - 1
    assert p.step() == 0 and len(attempts) == 1
    clock.now_s = model_prep.RETRY_S + 1
    assert p.step() == 1 and p.prepared() == ["s3://b/m"]


def test_preparer_stops_preparing_once_the_process_hosts_an_actor() -> None:
    idle = [True]
    calls: list[str] = []

    def prep(loc: str) -> PreparedModel:
        calls.append(loc)
        idle[0] = False  # an actor creation task arrived meanwhile
        return _fake(loc)

    p = Preparer(locations=lambda: ["a", "b", "c"], prepare=prep, idle=lambda: idle[0])
    assert p.step() == 1 and calls == ["a"]


def test_take_hands_over_waits_for_one_in_progress_and_stops_the_thread() -> None:
    started, release = threading.Event(), threading.Event()

    def prep(loc: str) -> PreparedModel:
        started.set()
        release.wait(5)
        return _fake(loc)

    p = Preparer(locations=lambda: ["s3://b/m"], prepare=prep, idle=lambda: True, poll_s=0.05,
                 start_delay_s=0.0).start()
    assert started.wait(5)
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    got = p.take("s3://b/m", wait_s=5)
    assert got is not None and got.location == "s3://b/m"
    assert time.monotonic() - t0 >= 0.2  # it waited for the preparation instead of skipping it
    assert p.take("s3://b/m", wait_s=0) is None  # handed over once
    p._thread.join(2)
    assert not p._thread.is_alive()  # a replica's process prepares nothing more


def test_take_without_a_preparation_is_none_at_once() -> None:
    p = Preparer(locations=lambda: [], prepare=_fake, idle=lambda: True)
    t0 = time.monotonic()
    assert p.take("s3://b/other", wait_s=5) is None and time.monotonic() - t0 < 1


def test_preparer_warms_up_once_before_preparing_and_survives_a_failed_warm_up() -> None:
    """``warm_up`` (the runtime's model-independent Ray work: the named actors' classes) runs
    once, while idle, before the first preparation; one that raises leaves the models prepared,
    and a process that became an actor before it ran never runs it."""
    order: list[str] = []

    def warm_up() -> None:
        order.append("warm_up")

    def prep(loc: str) -> PreparedModel:
        order.append(loc)
        return _fake(loc)

    p = Preparer(locations=lambda: ["a"], prepare=prep, idle=lambda: True, poll_s=0.02,
                 start_delay_s=0.0, warm_up=warm_up).start()
    deadline = time.monotonic() + 5
    while p.prepared() != ["a"] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a few more polls: warm_up is not repeated
    p.stop()
    assert order == ["warm_up", "a"]

    def failing() -> None:
        raise RuntimeError("GCS unreachable")

    q = Preparer(locations=lambda: ["b"], prepare=_fake, idle=lambda: True, poll_s=0.02,
                 start_delay_s=0.0, warm_up=failing).start()
    deadline = time.monotonic() + 5
    while q.prepared() != ["b"] and time.monotonic() < deadline:
        time.sleep(0.01)
    q.stop()
    assert q.prepared() == ["b"]

    ran: list[bool] = []
    r = Preparer(locations=lambda: ["c"], prepare=_fake, idle=lambda: False, poll_s=0.02,
                 start_delay_s=0.0, warm_up=lambda: ran.append(True)).start()
    r._thread.join(2)
    assert ran == [] and r.prepared() == []
