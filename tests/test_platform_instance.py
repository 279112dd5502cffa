"""One platform per state directory (issue 18): a second `faascale up` fails at once, naming the
running one, and touches nothing; `faascale down` stops the lock's holder and removes only files
its instance marked. Real processes and the real lock throughout: a stand-in holder (a process
that takes the lock as the platform does) for the fast tests, real platforms for the race."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_platform import ROOT, Platform, free_port

from faascale.platform.instance import OWNER_FILE

# A process holding a state directory as a platform does: the lock, its record, one directory
# it marked as its own. It prints its instance id, then waits for a signal.
HOLDER = """
import sys, time
from faascale.platform.instance import Holder, PlatformLock, claim_dirs
from faascale.platform.state import StateDir

state = StateDir(sys.argv[1])
lock = PlatformLock.acquire(state)
me = Holder.new("http://127.0.0.1:1234")
me = Holder(me.instance, me.pid, me.url, (sys.argv[2],))
claim_dirs(me, state)
lock.write(me)
print(me.instance, flush=True)
time.sleep(600)
"""


def cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FAASCALE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "faascale.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


Held = tuple[Path, "subprocess.Popen[str]", str, Path]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Held]:
    """(home, its holder process, the holder's instance id, the directory it owns)."""
    home, owned = tmp_path / "home", tmp_path / "shm" / "tier"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), str(owned)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        instance = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert instance, "the holder did not start"
        yield home, proc, instance, owned
    finally:
        proc.kill()
        proc.wait()


def test_up_fails_at_once_naming_the_holder_and_touches_nothing(holder: Held) -> None:
    home, proc, _, _ = holder
    before = sorted(p.name for p in home.iterdir())
    assert before == ["platform.lock"]
    t0 = time.monotonic()
    r = cli(home, "up", "--port", str(free_port()))
    line = one_error_line(r)
    assert f"faascale is already running at http://127.0.0.1:1234 (pid {proc.pid})" in line
    # The platform process itself, started by hand, refuses the same way.
    direct = subprocess.run([sys.executable, "-m", "faascale.platform.server", "--home", str(home),
                             "--port", str(free_port())], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert f"(pid {proc.pid})" in one_error_line(direct)
    assert time.monotonic() - t0 < 60  # no start-up attempted (a platform takes longer)
    assert sorted(p.name for p in home.iterdir()) == before  # no tokens, logs or registry
    assert proc.poll() is None


def test_down_stops_the_holder_and_removes_only_its_own_directories(holder: Held,
                                                                   tmp_path: Path) -> None:
    home, proc, _, owned = holder
    (owned / "block-0000.bin").write_bytes(b"x")
    # the record names a second directory that another instance has marked since: it stays
    record = json.loads((home / "platform.lock").read_text())
    theirs = tmp_path / "shm" / "theirs"
    theirs.mkdir()
    mark = json.dumps({"instance": "0123456789ab", "state": str(home.resolve())})
    (theirs / OWNER_FILE).write_text(mark)
    (home / "platform.lock").write_text(json.dumps({**record, "dirs": [str(owned), str(theirs)]}))
    r = cli(home, "down")
    assert r.returncode == 0 and r.stdout.strip() == "faascale is down", r.stdout + r.stderr
    assert proc.wait(10) == -signal.SIGTERM
    assert not owned.exists()  # what the holder left (it did not clean up): removed
    assert (theirs / OWNER_FILE).read_text() == mark  # another instance's: untouched
    again = cli(home, "down")
    assert again.returncode == 0 and again.stdout.strip() == "faascale is not running"


def test_down_with_a_copy_of_a_live_record_stops_nothing(holder: Held, tmp_path: Path) -> None:
    """A copy of a running platform's state (another FAASCALE_HOME, e.g. a backup) names a live
    pid and its directories: `down` there stops nothing and removes none of them."""
    home, proc, instance, owned = holder
    (owned / "block-0000.bin").write_bytes(b"x")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "platform.lock").write_bytes((home / "platform.lock").read_bytes())
    (copy / "platform.json").write_text(json.dumps({
        "url": "http://127.0.0.1:1234", "pid": proc.pid, "object_store": "", "ray_address": "",
        "started_s": 0.0, "instance": instance}))
    r = cli(copy, "down")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "faascale was not running (stale state cleared)"
    assert not (copy / "platform.json").exists()
    time.sleep(0.5)
    assert proc.poll() is None and (owned / "block-0000.bin").read_bytes() == b"x"


@pytest.mark.slow
def test_two_ups_at_once_one_runs_and_the_other_leaves_its_tier_alone(tmp_path: Path) -> None:
    from faascale.memory_tier.node import TierConfig

    p = Platform(tmp_path / "home", free_port())
    ports = [p.port, free_port()]
    ups = [subprocess.Popen([sys.executable, "-m", "faascale.cli", "up", "--port", str(port)],
                            cwd=ROOT, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL) for port in ports]
    try:
        results = []
        for u in ups:
            out, err = u.communicate(timeout=300)
            results.append((u.returncode, out, err))
        assert sorted(rc for rc, _, _ in results) == [0, 2], results
        winner = next(i for i, (rc, _, _) in enumerate(results) if rc == 0)
        info = json.loads((p.home / "platform.json").read_text())
        assert info["url"] == f"http://127.0.0.1:{ports[winner]}"
        loser_err = results[1 - winner][2]
        assert f"already running at {info['url']} (pid {info['pid']})" in loser_err, loser_err
        assert "Traceback" not in loser_err
        host = Path(TierConfig.for_state_dir(p.home).host_dir)
        mark = json.loads((host / OWNER_FILE).read_text())
        assert mark == {"instance": info["instance"], "state": str(p.home.resolve())}
        deadline = time.monotonic() + 90  # the node's block store starts with the platform
        while not [d for d in host.iterdir() if d.is_dir()]:
            assert time.monotonic() < deadline, "no node HOST tier directory"
            time.sleep(0.5)
        sentinel = host / "sentinel"
        sentinel.write_text("winner's")
        # one more start, by hand, and a `down` from a copy of the record: neither touches it
        direct = subprocess.run([sys.executable, "-m", "faascale.platform.server", "--home",
                                 str(p.home), "--port", str(free_port())], cwd=ROOT, env=p.env,
                                capture_output=True, text=True, timeout=120)
        assert f"(pid {info['pid']})" in one_error_line(direct)
        copy = tmp_path / "copy"
        copy.mkdir()
        for name in ("platform.lock", "platform.json"):
            (copy / name).write_bytes((p.home / name).read_bytes())
        assert "stale state cleared" in cli(copy, "down").stdout
        assert httpx.get(f"{info['url']}/healthz", timeout=10).status_code == 200
        assert sentinel.read_text() == "winner's" and (host / OWNER_FILE).exists()
        assert [d for d in host.iterdir() if d.is_dir()]
    finally:
        down = p.cli("down", timeout=120)
    assert down.returncode == 0 and down.stdout.strip() == "faascale is down", down.stderr
    assert not host.exists() and not (p.home / "platform.json").exists()
