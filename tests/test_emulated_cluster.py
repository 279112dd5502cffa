"""The emulated cluster for real: namespaces, shaped links, processes, clean teardown.

Needs root and iproute2: without them the tests that build a cluster skip with
``EmulatedCluster.available()``'s reason, and fail with it under CI=true (tests/support.py). About 10 s:
each transfer is 6 MiB at 100 Mbit/s (~0.5 s).
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faascale.pipecast.emulated import (
    SCRIPT,
    ClusterConfig,
    ClusterConfigError,
    EmulatedCluster,
    EmulatedClusterError,
    rate_bits_per_s,
)
from support import netns_prerequisite, requires

pytestmark = pytest.mark.slow

needs_netns = requires(*netns_prerequisite())  # skips without root/netns; fails under CI=true

RATE, RATE_BITS_PER_S = "100mbit", 100e6
PAYLOAD_BYTES = 6 << 20  # ~0.5 s at 100 Mbit/s: long enough that htb's initial burst is noise
PORT = 5201
IO_TIMEOUT_S = 15.0

# Accepts NUM connections at once, reads each to EOF, then prints one JSON line: total bytes and the
# span from the first byte to the last over all connections (the receiver's view of the link).
RECEIVER = r"""
import json, socket, sys, threading, time
num = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[2]))); srv.listen(num); srv.settimeout(float(sys.argv[3]))
print("ready", flush=True)
spans = []
def drain(conn):
    conn.settimeout(float(sys.argv[3])); first = last = None; total = 0
    while chunk := conn.recv(1 << 20):
        last = time.monotonic(); first = first or last; total += len(chunk)
    spans.append((total, first, last))
threads = [threading.Thread(target=drain, args=(srv.accept()[0],)) for _ in range(num)]
for t in threads: t.start()
for t in threads: t.join()
full = [s for s in spans if s[0]]
print(json.dumps({"bytes": sum(s[0] for s in full),
                  "seconds": max(s[2] for s in full) - min(s[1] for s in full) if full else 0.0}),
      flush=True)
"""
SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
block, left = b"\0" * (1 << 20), int(sys.argv[3])
while left > 0:
    s.sendall(block[:left]); left -= min(left, len(block))
s.close()
"""


def _wait_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line ``proc`` prints (select, then one readline: call it once per process)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout_s):
        raise TimeoutError(f"no output from {proc.args} within {timeout_s} s")
    return proc.stdout.readline().strip()


def _transfer_bits_per_s(cluster: EmulatedCluster, receiver: int, senders: list[int]) -> float:
    """Every sender sends PAYLOAD_BYTES to ``receiver`` at once; the receiver's aggregate rate."""
    rx = cluster.run(receiver, [sys.executable, "-c", RECEIVER, str(len(senders)), str(PORT),
                                str(IO_TIMEOUT_S)], stdout=subprocess.PIPE, text=True)
    assert _wait_line(rx, IO_TIMEOUT_S) == "ready"
    txs = [cluster.run(i, [sys.executable, "-c", SENDER, cluster.host_address(receiver), str(PORT),
                           str(PAYLOAD_BYTES), str(IO_TIMEOUT_S)]) for i in senders]
    assert [tx.wait(IO_TIMEOUT_S) for tx in txs] == [0] * len(senders)
    out, _ = rx.communicate(timeout=IO_TIMEOUT_S)
    assert rx.returncode == 0
    report = json.loads(out)
    assert report["bytes"] == PAYLOAD_BYTES * len(senders)
    return report["bytes"] * 8 / report["seconds"]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: a killed orphan may stay a zombie (Z) until init reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def cluster():
    with EmulatedCluster(3, rate=RATE) as c:
        yield c


# -- pure: config and names -------------------------------------------------------------------

def test_config_validates():
    assert rate_bits_per_s("100mbit") == 100e6 and rate_bits_per_s("1gbit") == 1e9
    assert rate_bits_per_s("10mbps") == 80e6  # tc: bps is BYTES per second
    for bad in ("100", "1gb", "fast", "0bit", ""):
        with pytest.raises(ClusterConfigError):
            ClusterConfig(num_hosts=2, rate=bad)
    for n in (0, 255, True, "3"):
        with pytest.raises(ClusterConfigError):
            ClusterConfig(num_hosts=n)
    for prefix in ("", "1abc", "a-b", "a b", "x" * 33):
        with pytest.raises(ClusterConfigError):
            ClusterConfig(num_hosts=2, prefix=prefix)


def test_names_are_unique_per_instance_and_addresses_in_rfc2544():
    a, b = EmulatedCluster(3), EmulatedCluster(3)
    assert a.config.prefix != b.config.prefix
    assert a.host_address(1) == "198.18.0.1" and a.host_address(3) == "198.18.0.3"
    assert a.namespace(2) == f"{a.config.prefix}-2"
    with pytest.raises(ClusterConfigError):
        a.host_address(4)
    with pytest.raises(EmulatedClusterError):
        a.run(1, ["true"])  # not up


# -- real: namespaces, shaping, teardown ------------------------------------------------------

@needs_netns
def test_one_sender_gets_the_link_rate(cluster):
    bits_per_s = _transfer_bits_per_s(cluster, receiver=2, senders=[1])
    print(f"\n1 -> 2: {bits_per_s / 1e6:.1f} Mbit/s (link {RATE})")
    # Goodput: TCP/IP headers take ~4% of the wire rate; < 60% means shaping misbehaves,
    # > 110% means it is not applied (unshaped veth runs at several Gbit/s).
    assert 0.60 * RATE_BITS_PER_S <= bits_per_s <= 1.10 * RATE_BITS_PER_S


@needs_netns
def test_two_senders_share_the_receivers_inbound_link(cluster):
    bits_per_s = _transfer_bits_per_s(cluster, receiver=2, senders=[1, 3])
    print(f"\n1,3 -> 2: {bits_per_s / 1e6:.1f} Mbit/s aggregate (link {RATE}, ingress shaped)")
    assert 0.60 * RATE_BITS_PER_S <= bits_per_s <= 1.10 * RATE_BITS_PER_S


@needs_netns
def test_without_ingress_shaping_two_senders_exceed_one_link():
    # The control for the test above: only egress is capped, so the receiver takes both senders.
    with EmulatedCluster(3, rate=RATE, ingress=False) as c:
        bits_per_s = _transfer_bits_per_s(c, receiver=2, senders=[1, 3])
    print(f"\n1,3 -> 2: {bits_per_s / 1e6:.1f} Mbit/s aggregate (link {RATE}, egress only)")
    assert bits_per_s > 1.3 * RATE_BITS_PER_S


@needs_netns
def test_hosts_reach_each_other(cluster):
    probe = ("import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
             "timeout=5).close()")
    server = cluster.run(1, [sys.executable, "-c", RECEIVER, "1", str(PORT + 1), "10"],
                         stdout=subprocess.PIPE, text=True)
    assert _wait_line(server, IO_TIMEOUT_S) == "ready"
    client = cluster.run(3, [sys.executable, "-c", probe, cluster.host_address(1), str(PORT + 1)])
    assert client.wait(IO_TIMEOUT_S) == 0  # host 3 connected to host 1
    out, _ = server.communicate(timeout=IO_TIMEOUT_S)
    assert json.loads(out)["bytes"] == 0


@needs_netns
def test_exit_kills_processes_and_removes_namespaces():
    with pytest.raises(RuntimeError, match="boom"), EmulatedCluster(2, rate="1gbit") as c:
        names = {c.namespace(1), c.namespace(2), f"{c.config.prefix}-sw"}
        assert names <= _namespaces()
        sleeper = c.run(2, [sys.executable, "-c", "import time; time.sleep(300)"])
        parent = c.run(1, ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        child_pid = int(_wait_line(parent, IO_TIMEOUT_S))  # started by `parent`, not by `run`
        t0 = time.monotonic()
        raise RuntimeError("boom")  # down must run on error too
    assert sleeper.returncode is not None and sleeper.returncode < 0  # killed by a signal
    assert parent.returncode is not None and parent.returncode < 0
    assert not _running(child_pid)  # its process group went with it
    assert time.monotonic() - t0 < 5
    assert not names & _namespaces()
    c.close()  # idempotent


@needs_netns
def test_up_refuses_an_existing_prefix_and_leaves_it_alone(cluster):
    before = _namespaces()
    taken = EmulatedCluster(3, rate=RATE, prefix=cluster.config.prefix, unique=False)
    with pytest.raises(EmulatedClusterError, match="exists"), taken:
        pass
    assert {cluster.namespace(i) for i in (1, 2, 3)} <= _namespaces() == before


@needs_netns
def test_down_is_idempotent():
    with EmulatedCluster(1, rate=RATE) as c:
        pass
    again = subprocess.run(["bash", str(SCRIPT), "down", "1", c.config.prefix],
                           check=False, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0, again.stderr


@needs_netns
def test_set_rate_reshapes_one_hosts_link():
    # Host 2 gets a link twice as fast (a storage server's NIC): two senders at the base rate now
    # reach it at about twice one link, where the shared inbound link above held them to one.
    with EmulatedCluster(3, rate=RATE) as c:
        c.set_rate(2, "200mbit")
        bits_per_s = _transfer_bits_per_s(c, receiver=2, senders=[1, 3])
        with pytest.raises(ClusterConfigError):
            c.set_rate(2, "fast")
        with pytest.raises(ClusterConfigError):
            c.set_rate(4, "1gbit")
    print(f"\n1,3 -> 2 at 200mbit: {bits_per_s / 1e6:.1f} Mbit/s aggregate")
    assert 1.3 * RATE_BITS_PER_S <= bits_per_s <= 2.2 * RATE_BITS_PER_S
    with pytest.raises(EmulatedClusterError):
        c.set_rate(2, "1gbit")  # closed


BUSY = ("import os, sys, time; t0 = time.monotonic()\n"
        "while time.monotonic() - t0 < float(sys.argv[1]): pass\n"
        "print(time.process_time() / (time.monotonic() - t0))")


@needs_netns
def test_limit_cpu_caps_a_hosts_processes_and_their_children():
    with EmulatedCluster(2, rate="1gbit") as c:
        c.limit_cpu(1, 0.25)
        # A child of the started process (sh runs python) is held to the host's budget too.
        capped = c.run(1, ["sh", "-c", f'{sys.executable} -c "$0" 1.5', BUSY],
                       stdout=subprocess.PIPE, text=True)
        share = float(capped.communicate(timeout=IO_TIMEOUT_S)[0])
        group = c._cgroups[1]
        stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
        with pytest.raises(ClusterConfigError):
            c.limit_cpu(1, 0)
    print(f"\nCPU share capped at 0.25: {share:.2f}; throttled {stat['nr_throttled']} periods")
    assert share <= 0.35, share  # a busy loop alone would take a whole core
    assert int(stat["nr_throttled"]) > 0  # the quota, not a busy machine, held it back
    assert not group.exists()  # close removed the cgroup
