"""One platform per state directory, and which files belong to which instance of it.

The running platform process holds ``platform.lock`` in the state directory (``flock``, exclusive)
for its whole life; the kernel drops the lock when the process ends, however it ends. A second
``faascale up`` (or ``python -m faascale.platform.server``) on the same state directory fails at
once, naming the holder, before it reads or writes any other file there. ``faascale up`` takes the
lock itself and hands the locked descriptor to the platform process it starts (one open file
description: the lock is theirs together, then the platform's alone).

The lock file's content is the holder's :class:`Holder` record: an instance id (new at each start),
its pid, URL and the directories it created outside the state directory (the HOST tier in
/dev/shm and the replicas' directories beside it). Each such directory carries the instance id
and state directory in ``.faascale-instance``; removing one checks that mark, so a ``faascale down``
or a failed start removes only the files of the instance it stops, never a live one's.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from faascale.platform.state import StateDir

OWNER_FILE = ".faascale-instance"
# How long a reader waits for a just-taken lock's record: the platform process writes it right
# after starting Python (about 0.1 s; seconds on a loaded machine).
HOLDER_WAIT_S = 10.0


class PlatformLockError(Exception):
    """Another process holds (or is taking) this state directory's platform lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a state directory's lock, and the directories it owns."""

    instance: str
    pid: int
    url: str
    dirs: tuple[str, ...] = ()

    @classmethod
    def new(cls, url: str) -> "Holder":
        """This process as a new instance."""
        return cls(uuid.uuid4().hex[:12], os.getpid(), url)


def _parse(data: bytes) -> Holder | None:
    try:
        doc = json.loads(data)
        return Holder(doc["instance"], int(doc["pid"]), doc["url"], tuple(doc["dirs"]))
    except (ValueError, KeyError, TypeError):
        return None  # empty (a start not yet recorded) or being rewritten


def read_holder(state: StateDir, wait_s: float = 0.0) -> Holder | None:
    """The record in the lock file, waiting up to ``wait_s`` for one to appear; None if there is
    none (never locked, or a start that has not written it yet). Takes no lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = _parse(state.lock_file.read_bytes())
        except FileNotFoundError:
            holder = None
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


class PlatformLock:
    """This process's hold on a state directory's lock. Closing the descriptor (``release``, or
    the process ending) lets it go unless a child shares the open file description."""

    def __init__(self, state: StateDir, fd: int) -> None:
        self.state, self.fd = state, fd

    @classmethod
    def try_acquire(cls, state: StateDir) -> "PlatformLock | None":
        """The lock if no other process holds it (creating the state directory and lock file
        as needed), else None. Never blocks; writes nothing."""
        state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(state, fd)

    @classmethod
    def acquire(cls, state: StateDir) -> "PlatformLock":
        """The lock for a new instance, its record cleared (the start writes its own); else
        PlatformLockError naming the running instance (its pid and URL)."""
        lock = cls.try_acquire(state)
        if lock is None:
            holder = read_holder(state, HOLDER_WAIT_S)
            where = (f"at {holder.url} (pid {holder.pid})" if holder is not None
                     else "(starting; no pid recorded yet)")
            raise PlatformLockError(f"faascale is already running {where} with state "
                                    f"{state.root}; stop it with `faascale down` or set another "
                                    "FAASCALE_HOME")
        os.ftruncate(lock.fd, 0)
        return lock

    @classmethod
    def inherit(cls, state: StateDir, fd: int) -> "PlatformLock":
        """The lock ``faascale up`` took and handed to this process as descriptor ``fd``."""
        assert os.path.samestat(os.fstat(fd), os.stat(state.lock_file)), "not the lock file"
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: the same description
        os.set_inheritable(fd, False)  # processes this one starts (Ray's) must not hold it
        return cls(state, fd)

    def holder(self) -> Holder | None:
        return _parse(os.pread(self.fd, 1 << 16, 0))

    def write(self, holder: Holder) -> None:
        """Record ``holder`` as the lock's holder (readers retry while it is half written)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(asdict(holder)).encode(), 0)

    def release(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "PlatformLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _mark(instance: str, state: StateDir) -> str:
    return json.dumps({"instance": instance, "state": str(state.root.resolve())})


def claim_dirs(holder: Holder, state: StateDir) -> None:
    """Create each of ``holder.dirs`` (if missing) and mark it as the holder's. Called with the
    lock held: whatever is already there was left by an earlier instance of this state directory,
    and this one adopts it (a HOST tier's blocks stay warm)."""
    for d in holder.dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / OWNER_FILE).write_text(_mark(holder.instance, state))


def remove_owned(holder: Holder, state: StateDir) -> list[str]:
    """Remove each of ``holder.dirs`` whose mark names this instance of this state directory; a
    directory another instance (or another state directory) has marked since, or an unmarked
    one, stays. Returns the directories removed."""
    removed = []
    for d in holder.dirs:
        try:
            mine = (Path(d) / OWNER_FILE).read_text() == _mark(holder.instance, state)
        except OSError:
            mine = False
        if mine:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def clear_stale(state: StateDir, holder: Holder | None) -> bool:
    """With the lock held, so no platform runs here: remove ``platform.json`` (no longer true)
    and the directories ``holder``, the last instance, still owns. True if anything was there."""
    removed = remove_owned(holder, state) if holder is not None else []
    stale_record = state.platform_file.exists()
    state.platform_file.unlink(missing_ok=True)
    return bool(removed) or stale_record
