"""An emulated multi-host cluster on one machine: network namespaces on a switch, shaped links.

This module owns that side effect; ``scripts/netns-cluster.sh`` does the work (read its header for
the topology). Host i (1-based) is namespace ``<prefix>-i`` at ``198.18.0.i`` (RFC 2544's
benchmarking range: no real host is ever addressed). Each host sends at most ``rate``; with
``ingress`` on, it also receives at most ``rate`` in total, so senders to one host share its
inbound link as on a real NIC. Rates only: this kernel has no netem, so no added delay or loss.

Use::

    ok, why = EmulatedCluster.available()          # for pytest.skip(why)
    with EmulatedCluster(3, rate="100mbit") as c:  # `up` here ...
        server = c.run(2, [sys.executable, "-m", "my.server", "--host", c.host_address(2)])
        ...
    # ... `down` here: processes started with `run` killed, namespaces gone (also on error)

Needs root and iproute2. Every instance gets its own namespace prefix by default (``fsq<pid>n<k>``),
so parallel test runs and several clusters in one process never collide.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netns-cluster.sh"
SUBNET = "198.18.0"  # RFC 2544; the script assigns nothing else
MAX_HOSTS = 254  # one /24
MAX_PREFIX_CHARS = 32  # the script's limit; namespace names are files, interfaces are fixed names
SCRIPT_TIMEOUT_S = 60.0  # `up` of 254 hosts takes ~10 s on 2 cores; 3 hosts ~0.2 s
KILL_GRACE_S = 2.0  # close(): SIGTERM, then SIGKILL after this
CPU_PERIOD_US = 100_000  # limit_cpu: the quota is cores x this per period

_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)",
                      re.IGNORECASE)
# tc's units: *bit are bits per second, *bps BYTES per second; k/m/g/t are powers of 1000.
_RATE_UNIT_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
                   "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
_MIN_RATE_BITS_PER_S = 1000  # the script's floor: tc rejects rates that round to 0
_instances = itertools.count()


class EmulatedClusterError(Exception):
    """Bringing the cluster up or down failed; the message carries the script's output."""


class ClusterConfigError(EmulatedClusterError, ValueError):
    """A ``ClusterConfig`` field is invalid (host count, rate, prefix) or a host index is out of range."""


def rate_bits_per_s(rate: str) -> float:
    """Parse a tc rate (``"100mbit"``, ``"1gbit"``, ``"10mbps"`` = bytes/s) into bits per second.

    Raises ``ClusterConfigError`` for anything else (a bare number, an unknown unit, < 1 kbit/s).
    """
    m = _RATE_RE.fullmatch(rate.strip()) if isinstance(rate, str) else None
    if m is None:
        raise ClusterConfigError(f"rate must be a number and a tc unit (100mbit, 1gbit, 10mbps), "
                                 f"got {rate!r}")
    bits = float(m.group(1)) * _RATE_UNIT_BITS[m.group(2).lower()]
    if bits < _MIN_RATE_BITS_PER_S:
        raise ClusterConfigError(f"rate must be at least 1kbit, got {rate!r}")
    return bits


@dataclass(frozen=True)
class ClusterConfig:
    """One emulated cluster: ``num_hosts`` hosts, every link shaped to ``rate``.

    ``prefix`` names the namespaces exactly (``<prefix>-1`` ... ``<prefix>-sw``). ``ingress``: also
    cap what each host receives (its switch port), not only what it sends. Validated on construction
    (``ClusterConfigError``).
    """

    num_hosts: int
    rate: str = "1gbit"
    prefix: str = "fsq"
    ingress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.num_hosts, bool) or not isinstance(self.num_hosts, int) \
                or not 1 <= self.num_hosts <= MAX_HOSTS:
            raise ClusterConfigError(f"num_hosts must be an int in 1..{MAX_HOSTS}, got {self.num_hosts!r}")
        rate_bits_per_s(self.rate)
        if not isinstance(self.prefix, str) or not _PREFIX_RE.fullmatch(self.prefix) \
                or len(self.prefix) > MAX_PREFIX_CHARS:
            raise ClusterConfigError(f"prefix must be a letter then [A-Za-z0-9_.], at most "
                                     f"{MAX_PREFIX_CHARS} chars, got {self.prefix!r}")
        if not isinstance(self.ingress, bool):
            raise ClusterConfigError(f"ingress must be a bool, got {self.ingress!r}")

    @property
    def rate_bits_per_s(self) -> float:
        return rate_bits_per_s(self.rate)


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["bash", str(SCRIPT), *args], check=False, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise EmulatedClusterError(f"netns-cluster.sh {' '.join(args)} did not finish in "
                                   f"{SCRIPT_TIMEOUT_S:.0f} s") from exc


class EmulatedCluster:
    """A context manager over one emulated cluster. Not reusable: one ``up``, one ``down``.

    ``prefix`` is a base: with ``unique`` (the default) the namespaces are
    ``<prefix><pid>n<k>-i``, unique per process and instance; ``unique=False`` uses ``prefix`` as is
    (then ``__enter__`` fails if a cluster with that prefix is up).
    """

    def __init__(self, num_hosts: int, rate: str = "1gbit", prefix: str = "fsq",
                 ingress: bool = True, *, unique: bool = True) -> None:
        if unique:
            prefix = f"{prefix}{os.getpid()}n{next(_instances)}"
        self.config = ClusterConfig(num_hosts=num_hosts, rate=rate, prefix=prefix, ingress=ingress)
        self._procs: list[subprocess.Popen[Any]] = []
        self._cgroups: dict[int, Path] = {}  # host -> its CPU cgroup (limit_cpu)
        self._lock = threading.Lock()
        self._state = "new"  # new -> up -> closed

    # -- what the machine can do ----------------------------------------------------------------

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, "")`` if this machine can run a cluster, else ``(False, why)``. No side effect
        left behind (the check creates and removes a throwaway namespace). Never raises."""
        if not SCRIPT.is_file():
            return False, f"{SCRIPT} is missing"
        if shutil.which("bash") is None:
            return False, "bash not found"
        try:
            done = _run_script("check")
        except (OSError, EmulatedClusterError) as exc:
            return False, f"netns-cluster.sh check failed: {exc}"
        if done.returncode != 0:
            why = (done.stderr.strip() or done.stdout.strip()).splitlines()
            return False, why[-1] if why else f"netns-cluster.sh check exited {done.returncode}"
        return True, ""

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        """Run ``up``. Raises ``EmulatedClusterError`` if it fails, leaving nothing behind; if the
        prefix is already in use (``unique=False``), that cluster is left untouched."""
        if self._state != "new":
            raise EmulatedClusterError(f"cluster {self.config.prefix} was already entered")
        c = self.config
        self._state = "up"
        try:
            done = _run_script("up", str(c.num_hosts), c.rate, c.prefix,
                               "both" if c.ingress else "egress")
        except BaseException:  # timed out or interrupted half-way: remove what it made
            self.close()
            raise
        if done.returncode != 0:
            # A failed `up` removed what it had made; one refused for an existing prefix made
            # nothing, and a `down` now would remove someone else's cluster.
            self._state = "closed"
            raise EmulatedClusterError(f"netns-cluster.sh up failed (exit {done.returncode}): "
                                       f"{done.stderr.strip()}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill the processes started with ``run`` (their process groups: SIGTERM, then SIGKILL
        after ``KILL_GRACE_S``), then run ``down``. Idempotent. ``down`` runs once ``up`` has been
        attempted, also if it was interrupted (never for a cluster that was not entered, whose
        prefix may be someone else's); it raises ``EmulatedClusterError`` if the namespaces could
        not be removed."""
        with self._lock:
            if self._state != "up":
                self._state = "closed"
                return
            self._state = "closed"
            procs, self._procs = self._procs, []
            groups, self._cgroups = list(self._cgroups.values()), {}
        try:
            _kill(procs, KILL_GRACE_S)
        finally:
            done = _run_script("down", str(self.config.num_hosts), self.config.prefix)
            _remove_cgroups(groups)
            if done.returncode != 0:
                raise EmulatedClusterError(f"netns-cluster.sh down failed (exit {done.returncode}): "
                                           f"{done.stderr.strip()}")

    # -- hosts ----------------------------------------------------------------------------------

    @property
    def num_hosts(self) -> int:
        return self.config.num_hosts

    def _check_host(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.config.num_hosts:
            raise ClusterConfigError(f"host index must be in 1..{self.config.num_hosts}, got {i!r}")

    def host_address(self, i: int) -> str:
        """Host i's IPv4 address (``198.18.0.i``), i in 1..num_hosts. Pure."""
        self._check_host(i)
        return f"{SUBNET}.{i}"

    def namespace(self, i: int) -> str:
        """Host i's network namespace name (``<prefix>-i``). Pure."""
        self._check_host(i)
        return f"{self.config.prefix}-{i}"

    def set_rate(self, i: int, rate: str) -> None:
        """Reshape host i's link (what it sends, and what it receives if ``ingress``) to ``rate``,
        e.g. a storage server with a faster NIC than the other hosts. Raises ``ClusterConfigError``
        for a bad i or rate, ``EmulatedClusterError`` if the cluster is not up or tc fails."""
        self._check_host(i)
        rate_bits_per_s(rate)
        if self._state != "up":
            raise EmulatedClusterError(f"cluster {self.config.prefix} is not up ({self._state})")
        links = [(self.namespace(i), "eth0")]
        if self.config.ingress:
            links.append((f"{self.config.prefix}-sw", f"p{i}"))
        for ns, dev in links:
            done = subprocess.run(["tc", "-n", ns, "class", "change", "dev", dev, "parent", "1:",
                                   "classid", "1:10", "htb", "rate", rate, "ceil", rate,
                                   "quantum", "65536"],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise EmulatedClusterError(f"tc class change on {ns}/{dev} failed: "
                                           f"{done.stderr.strip()}")

    def limit_cpu(self, i: int, cores: float) -> None:
        """Give host i a CPU budget of its own: the processes started in it from now on with
        ``run`` (and all their children) together get at most ``cores`` cores (a cgroup CPU quota,
        cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``). On one machine the hosts otherwise share
        every core, so work starting on one host would slow the others down, as it never does on
        a real cluster. Raises ``ClusterConfigError`` for a bad i or ``cores``,
        ``EmulatedClusterError`` if the cluster is not up or this machine has no CPU cgroups."""
        self._check_host(i)
        if isinstance(cores, bool) or not isinstance(cores, (int, float)) or not 0.01 <= cores <= 1024:
            raise ClusterConfigError(f"cores must be a number in 0.01..1024, got {cores!r}")
        with self._lock:
            if self._state != "up":
                raise EmulatedClusterError(f"cluster {self.config.prefix} is not up ({self._state})")
            group = _cpu_cgroup_root() / self.namespace(i)
            try:
                group.mkdir(exist_ok=True)
                quota_us = max(1000, round(cores * CPU_PERIOD_US))
                if (group / "cpu.max").exists():  # cgroup v2
                    (group / "cpu.max").write_text(f"{quota_us} {CPU_PERIOD_US}\n")
                else:
                    (group / "cpu.cfs_period_us").write_text(f"{CPU_PERIOD_US}\n")
                    (group / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
            except OSError as exc:
                raise EmulatedClusterError(f"cannot set a CPU quota in {group}: {exc}") from exc
            self._cgroups[i] = group

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host i's namespace (``ip netns exec``, which execs: the returned
        Popen's pid is the program's). It sees only the cluster's links and its own loopback; the
        file system is shared. Tracked: ``close`` kills it and its process group. Unless
        ``popen_kwargs`` say otherwise it gets its own session (``start_new_session=True``) so
        that its children die with it. Raises ``EmulatedClusterError`` if the cluster is not up,
        ``ClusterConfigError`` for a bad i, and Popen's errors."""
        self._check_host(i)
        if isinstance(argv, (str, bytes)) or not argv:
            raise ClusterConfigError(f"argv must be a non-empty list of arguments, got {argv!r}")
        popen_kwargs.setdefault("start_new_session", True)
        with self._lock:
            if self._state != "up":
                raise EmulatedClusterError(f"cluster {self.config.prefix} is not up ({self._state})")
            argv = ["ip", "netns", "exec", self.namespace(i), *argv]
            if i in self._cgroups:  # join the host's CPU budget, then become argv (same pid);
                # before `ip netns exec`, which mounts a sysfs of the namespace's own
                argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"',
                        str(self._cgroups[i] / "cgroup.procs"), *argv]
            proc = subprocess.Popen(argv, **popen_kwargs)
            self._procs.append(proc)
        return proc


def _cpu_cgroup_root() -> Path:
    """Where CPU cgroups are made: the v2 hierarchy if it has the cpu controller (enabled for
    children here), else v1's cpu hierarchy. Raises ``EmulatedClusterError`` if neither."""
    v2 = Path("/sys/fs/cgroup")
    try:
        if "cpu" in (v2 / "cgroup.controllers").read_text().split():
            if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu\n")
            return v2
    except OSError:
        pass
    v1 = v2 / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1
    raise EmulatedClusterError("no CPU cgroup here (neither cgroup v2 with the cpu controller "
                               "nor v1's cpu hierarchy is mounted and writable)")


def _remove_cgroups(groups: list[Path]) -> None:
    """rmdir each (empty once its processes are gone; they may take a moment to be reaped)."""
    for g in groups:
        deadline = time.monotonic() + 5.0
        while g.exists():
            try:
                g.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    break  # a process outlived `down`: leave the (harmless) group behind
                time.sleep(0.1)


def _kill(procs: list[subprocess.Popen[Any]], grace_s: float) -> None:
    """SIGTERM each live process (its group if it leads one), wait up to ``grace_s``, then SIGKILL
    what is left. By pid only; reaps them all."""
    def signal_all(sig: int) -> None:
        for p in procs:
            if p.poll() is not None:
                continue
            try:
                if os.getpgid(p.pid) == p.pid:  # it leads its own group: take its children too
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()
