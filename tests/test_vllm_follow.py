"""Live vLLM log parsing: a follower fed in random chunks ends where the whole parse does, the step in
progress follows the start, spans are laid on the wall clock by their rules, and a file is
followed as it grows (injected sleep, no real waiting) and from a thread."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from faascale.coldstart.profile import StartupProfile
from faascale.coldstart.vllm_follow import (OTHER, FileFollower, VllmLogFollower, follow_file,
                                            startup_spans, vllm_startup_profile)
from faascale.coldstart.vllm_log import STEPS, VllmStartup, parse_vllm_log

LOGS = Path(__file__).parent / "data" / "vllm_logs"
ALL_LOGS = sorted(LOGS.glob("cpu-0.32-*.log"))
COMPILED = LOGS / "cpu-0.32-api-compiled-aot-miss.log"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("path", ALL_LOGS, ids=lambda p: p.name)
def test_random_chunks_give_the_whole_parse(path: Path, seed: int) -> None:
    text = path.read_text()
    rng = random.Random(seed)
    f = VllmLogFollower()
    i = 0
    while i < len(text):
        n = rng.choice([1, 7, rng.randint(1, 200), rng.randint(200, 5000)])
        f.feed(text[i:i + n])
        i += n
        if rng.random() < 0.05:
            f.startup  # noqa: B018 - a reader polling mid-way must not change the end result
    whole = parse_vllm_log(text)
    assert f.text == text
    assert f.final() == whole
    assert f.startup == whole  # the logs end with a newline: every line is complete


def test_spans_of_a_start_that_failed_before_logging() -> None:
    f = VllmLogFollower()
    f.feed("Traceback (most recent call last):\nImportError: no vllm\n")
    assert f.startup is None
    assert [(s.name, s.duration_s) for s in f.spans(10.0, 12.5)] == [(OTHER, 2.5)]


def test_step_in_progress_follows_the_start() -> None:
    seen: dict[str, list[str | None]] = {}
    for path in ALL_LOGS:
        f = VllmLogFollower()
        assert f.step_in_progress is None and f.startup is None
        steps: list[str | None] = [None]
        for line in path.read_text().splitlines(keepends=True):
            f.feed(line)
            if f.step_in_progress != steps[-1]:
                steps.append(f.step_in_progress)
        seen[path.name] = steps
    assert seen["cpu-0.32-api-compiled-aot-miss.log"] == [
        None, "bootstrap", "model_loading", "torch_compile", "kv_cache", OTHER, None]
    assert seen["cpu-0.32-api-eager.log"] == [None, "bootstrap", "model_loading", "kv_cache", OTHER, None]
    # an offline LLM start has no ready line: it stays after the engine's init
    assert seen["cpu-0.32-offline-llm-compiled-aot-miss.log"][-1] == OTHER


def test_partial_lines_wait_and_the_parse_is_cached() -> None:
    text = COMPILED.read_text()
    cut = text.index("Starting to load model") + 5
    f = VllmLogFollower()
    f.feed(text[:cut])
    assert f.step_in_progress == "bootstrap"  # the half line is not read yet
    first = f.startup
    assert first is not None and f.startup is first  # nothing new: the same parse
    f.feed(text[cut:text.index("\n", cut) + 1])
    assert f.step_in_progress == "model_loading"
    assert f.startup is not first and "bootstrap" in f.startup.steps_s
    assert not f.ready


def _startup(**steps: float) -> VllmStartup:
    return VllmStartup(version="0.32.0", steps_s=steps, total_s=sum(steps.values()),
                       compile_cache="miss", flags=("aot_cache_miss",))


def test_spans_laid_one_after_another_then_the_rest() -> None:
    st = _startup(bootstrap=10.0, model_loading=1.5, torch_compile=60.0, kv_cache=4.0)
    spans = startup_spans(st, 1000.0, 1090.0)
    assert [s.name for s in spans] == ["bootstrap", "model_loading", "torch_compile", "kv_cache", OTHER]
    assert spans[0].start_s == 1000.0 and spans[-1].end_s == 1090.0
    for a, b in zip(spans, spans[1:]):
        assert a.end_s == b.start_s
    assert [s.duration_s for s in spans[:-1]] == [10.0, 1.5, 60.0, 4.0]
    assert spans[-1].duration_s == pytest.approx(14.5)
    assert all(s.attrs["from"] == "vllm log" for s in spans)
    assert not any("scaled_by" in s.attrs for s in spans)
    assert spans[2].attrs["compile_cache"] == "miss" and spans[2].attrs["flags"] == ["aot_cache_miss"]


def test_spans_longer_than_the_interval_are_scaled_to_fit() -> None:
    st = _startup(bootstrap=30.0, kv_cache=10.0)
    spans = startup_spans(st, 0.0, 20.0)
    assert [s.duration_s for s in spans] == pytest.approx([15.0, 5.0, 0.0])
    assert spans[-1].name == OTHER and spans[-1].end_s == 20.0
    assert all(s.attrs["scaled_by"] == 0.5 for s in spans)
    assert spans[0].attrs["log_s"] == 30.0
    with pytest.raises(ValueError, match="before the launch"):
        startup_spans(st, 10.0, 9.0)
    # nothing parsed: the whole interval is the rest; an instant start has an empty rest
    assert [(s.name, s.duration_s) for s in startup_spans(_startup(), 5.0, 7.0)] == [(OTHER, 2.0)]
    assert startup_spans(_startup(), 5.0, 5.0)[0].duration_s == 0.0


def test_profile_of_a_real_log_covers_spawn_to_ready() -> None:
    st = parse_vllm_log(COMPILED.read_text())
    p = vllm_startup_profile(st, launched_at_s=100.0, ready_at_s=204.25, function="f",
                             replica="r1", model_id="smollm2", source="DISK", weight_bytes=538060032)
    assert p.total_s == pytest.approx(104.25)
    steps = p.steps()
    assert [n for n in steps] == ["kv_cache", "bootstrap", "model_loading", "torch_compile", OTHER]
    for name in ("bootstrap", "model_loading", "torch_compile", "kv_cache"):
        assert steps[name] == pytest.approx(st.steps_s[name])
    assert steps[OTHER] == pytest.approx(104.25 - sum(st.steps_s.values()))
    assert p.runtime["engine"] == "vllm" and p.runtime["flags"] == ["aot_cache_miss"]
    assert StartupProfile.from_dict(p.to_dict()) == p
    assert set(steps) - {OTHER} <= set(STEPS)


class _Writer:
    """An injected sleep that appends the next piece of the file at each call, records the delays,
    and sets the stop event once everything is written (plus ``idle`` empty polls)."""

    def __init__(self, path: Path, pieces: list[bytes], stop: threading.Event, idle: int = 0) -> None:
        self.path, self.pieces, self.stop, self.idle = path, list(pieces), stop, idle
        self.delays: list[float] = []

    def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)
        if self.pieces:
            with self.path.open("ab") as f:
                f.write(self.pieces.pop(0))
        elif self.idle:
            self.idle -= 1
        else:
            self.stop.set()


def test_follow_file_reads_a_growing_file_with_bounded_backoff(tmp_path: Path) -> None:
    data = COMPILED.read_bytes() + "é ✓\n".encode()
    split = len(data) - 3  # inside the 3-byte check mark: decoded whole, across two reads
    pieces = [b"", b"", data[:4000], data[4000:split], data[split:]]
    log = tmp_path / "vllm.log"  # absent at first: waited for
    stop = threading.Event()
    sleep = _Writer(log, pieces, stop, idle=6)
    f = VllmLogFollower()
    read = follow_file(log, f, stop, poll_s=0.1, max_poll_s=0.5, read_bytes=1024, sleep=sleep)
    assert read == len(data) and f.text == data.decode()
    assert f.final() == parse_vllm_log(COMPILED.read_text())
    # back-off doubles while nothing arrives, never past the bound; data resets it
    assert sleep.delays[:3] == [0.1, 0.2, 0.4]
    assert max(sleep.delays) == 0.5 and sleep.delays[-1] == 0.5
    assert 0.1 in sleep.delays[3:]
    with pytest.raises(ValueError):
        follow_file(log, f, stop, 0.0)
    # fed again after the thread stopped (a platform replica does): nothing is read twice
    assert f.feed_file(log) == 0 and f.text == data.decode()


def test_follow_file_restarts_on_a_truncated_file(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_bytes(b"old line that is long enough\n")
    stop = threading.Event()
    writes = iter([lambda: log.write_bytes(b"new\n"), stop.set])
    f = VllmLogFollower()
    follow_file(log, f, stop, sleep=lambda _s: next(writes)())
    assert f.text == "old line that is long enough\nnew\n"


def test_file_follower_thread(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    lines = COMPILED.read_text().splitlines(keepends=True)
    ff = FileFollower(log, poll_s=0.01, max_poll_s=0.02).start()
    with log.open("w") as out:
        for i in range(0, len(lines), 20):
            out.write("".join(lines[i:i + 20]))
            out.flush()
            time.sleep(0.002)
    follower = ff.stop()
    assert follower.text == COMPILED.read_text() and follower.ready
    assert follower.startup == parse_vllm_log(COMPILED.read_text())
