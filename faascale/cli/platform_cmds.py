"""The platform's life: ``up``, ``down`` and ``token``."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import typer

from faascale.cli.common import friendly_errors, state_dir


@friendly_errors
def up(address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster "
                                              "(host:port) instead of starting a local one"),
       host: str = typer.Option("127.0.0.1", "--host", help="gateway bind address"),
       port: int = typer.Option(8080, "--port", help="gateway port"),
       foreground: bool = typer.Option(False, "--foreground", help="run in this process (for "
                                       "containers) instead of as a daemon"),
       timeout_s: float = typer.Option(180.0, "--timeout", help="seconds to wait for readiness"),
       warm_pool: Optional[str] = typer.Option(None, "--warm-pool", help="warm runtimes kept per "
                                               "node: auto (one per free GPU; one on a node without GPUs), a "
                                               "number, or off [default: $FAASCALE_WARM_POOL, "
                                               "else auto]")
       ) -> None:
    """Start the platform: Ray (local or joined), Ray Serve, the gateway; print URL and tokens."""
    from faascale.platform.auth import load_or_create_tokens
    from faascale.platform.instance import PlatformLock
    from faascale.platform.warm_pool import POOL_ENV, parse_pool_setting

    if warm_pool is not None:
        parse_pool_setting(warm_pool)  # a bad value: an error: line, exit 2
        os.environ[POOL_ENV] = warm_pool  # the platform process reads it (and its Ray workers)

    state = state_dir()
    # Before any other file here: one platform per state directory (another one: exit 2). The
    # platform process shares this lock and keeps it when this process lets go of its copy.
    with PlatformLock.acquire(state) as lock:
        state.ensure()
        tokens = load_or_create_tokens(state.tokens_file)
        if foreground:
            from faascale.platform.server import run

            run(lock, host, port, address)
            return
        info = _start(state, lock, host, port, address, timeout_s)
    typer.echo(f"faascale is up at {info.url} (pid {info.pid}, Ray {info.ray_address})")
    typer.echo(f"  admin token:  {tokens.admin}")
    typer.echo(f"  invoke token: {tokens.invoke}")
    typer.echo(f"  state:        {state.root}")


def _start(state: Any, lock: Any, host: str, port: int, address: Optional[str],
           timeout_s: float) -> Any:
    """The platform as a daemon holding ``lock`` (handed over); its ``PlatformInfo`` once it
    answers. A failed start exits 1 after removing what that instance left, and only that."""
    import subprocess
    import time

    from faascale.platform.client import PlatformClient, PlatformError
    from faascale.platform.state import platform_url

    cmd = [sys.executable, "-m", "faascale.platform.server", "--home", str(state.root),
           "--host", host, "--port", str(port), "--lock-fd", str(lock.fd)]
    cmd += ["--address", address] if address else []
    log_path = state.logs / "platform.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                pass_fds=(lock.fd,))
    url = platform_url(host, port)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            typer.echo("\n".join(tail), err=True)
            _failed_start(state, lock, proc)
            typer.echo(f"error: the platform exited during start-up (log: {log_path})", err=True)
            raise typer.Exit(1)
        try:
            PlatformClient(url, "", timeout_s=2).health()
            info = state.read_platform()
            if info is not None and info.pid == proc.pid:
                return info
        except PlatformError:
            pass
        if time.monotonic() > deadline:
            _failed_start(state, lock, proc)
            typer.echo(f"error: the platform did not become ready in {timeout_s:.0f} s "
                       f"(log: {log_path})", err=True)
            raise typer.Exit(1)
        time.sleep(0.3)


STOP_WAIT_S = 30.0  # a platform stopping in its start-up has Ray to shut down


def _failed_start(state: Any, lock: Any, proc: Any) -> None:
    """Stop the platform ``proc`` if it still runs, then remove what its instance left (this
    process still holds the lock: no other instance can have started meanwhile)."""
    import subprocess

    from faascale.platform.instance import clear_stale

    proc.terminate()
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    clear_stale(state, lock.holder())


@friendly_errors
def down(timeout_s: float = typer.Option(60.0, "--timeout")) -> None:
    """Stop the platform started by `faascale up` (by its pid; its Ray instance stops with it)."""
    import signal

    from faascale.platform.instance import (HOLDER_WAIT_S, PlatformLock, PlatformLockError,
                                            clear_stale, read_holder)

    state = state_dir()
    if not state.root.is_dir():
        typer.echo("faascale is not running")
        return
    lock = PlatformLock.try_acquire(state)
    if lock is not None:  # nothing runs here: clear what the last instance left, if anything
        with lock:
            cleared = clear_stale(state, lock.holder())
        typer.echo("faascale was not running (stale state cleared)" if cleared
                   else "faascale is not running")
        return
    holder = read_holder(state, HOLDER_WAIT_S)  # the lock's holder: the instance to stop
    if holder is None:
        raise PlatformLockError(f"a platform is starting with state {state.root} and has not "
                                "recorded its pid yet; try again")
    _signal(holder.pid, signal.SIGTERM)
    lock = _lock_when_free(state, timeout_s)  # its descriptors close as it ends, zombie or not
    if lock is None:
        if _signal(holder.pid, signal.SIGKILL):
            typer.echo(f"warning: pid {holder.pid} did not stop in {timeout_s:.0f} s; killed",
                       err=True)
        lock = _lock_when_free(state, STOP_WAIT_S)
    if lock is None:
        raise PlatformLockError(f"pid {holder.pid} ended, but another process still holds "
                                f"{state.lock_file} (`fuser -v` names it)")
    with lock:
        clear_stale(state, holder)  # what it left if it was killed; nothing if it stopped
    typer.echo("faascale is down")


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _lock_when_free(state: Any, wait_s: float) -> Any:
    import time

    from faascale.platform.instance import PlatformLock

    deadline = time.monotonic() + wait_s
    while (lock := PlatformLock.try_acquire(state)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return lock


@friendly_errors
def token(admin: bool = typer.Option(False, "--admin", help="the admin token instead")) -> None:
    """Print the invoke (or admin) bearer token of this machine's platform."""
    from faascale.platform.auth import load_or_create_tokens

    state = state_dir()
    if not state.tokens_file.exists():
        typer.echo("error: no tokens yet; start the platform with `faascale up`", err=True)
        raise typer.Exit(2)
    tokens = load_or_create_tokens(state.tokens_file)
    typer.echo(tokens.admin if admin else tokens.invoke)
