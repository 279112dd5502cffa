"""Scale from zero (issue 16): 4 new nodes, no holder, the model in an object store.

``benchmarks/scaleout.py`` runs this (its from-zero rows, keys and report paragraph, which
``benchmarks/scaleout_from_zero_report.py`` computes, with the link model); it is not run by
itself (``--quick`` there includes it for SmolLM2, without the every-node system;
``--no-from-zero`` skips it).

The cluster: ``EmulatedCluster`` with N = 4 node hosts (every link shaped to ``--rate`` in and
out, as in the other scale-out rows), one host for the object store and one for the PipeCast
coordinator (the head). How the store is modelled: a real S3 server, Ceph RGW
(``scripts/ceph-rgw.sh``: one mon, one in-memory OSD, radosgw, as ``bursty.py`` runs it), on an
emulated host of its own whose link is shaped to N x the node rate. An object store such as S3
serves many clients in parallel, each client limited by its own NIC; so the store's link is
never the bottleneck here, each node's own link is. What is not modelled: RGW, its OSD and every
node share this machine's cores (an S3 fleet would not), so with every node reading at once a
store read can be slower than the node's link; the every-node row, each node's store goodput,
the store's own CPU seconds and the CPU busy show how much.

Four systems, ``--reps`` times each, interleaved (all four, then all four again), the best of
the repetitions kept as for every system of ``scaleout.py`` (the shortest all hold; every
repetition's first servable and all hold are listed too):

- ``store-load``, one node's store load (the baseline): one process on node host 1 loads every
  block of the model from the store through a block store of its own, built exactly as a
  PipeCast member's store loader (``faascale.pipecast.member.store_loader``: S3 ranged GETs
  into a HOST-tier file, verified), ``FETCH_PARALLEL_BLOCKS`` blocks at a time as the
  platform's node loads a whole model. Its time: when the last block is in place.
- ``store-load-all``: the same on every node host at once (what every new replica does
  without PipeCast): how well the store and this machine serve N readers.
- ``from-zero``: N PipeCast members (``python -m faascale.pipecast.member --store ...``) that
  hold nothing, and a coordinator (``python -m faascale.pipecast.service``) told N replicas are
  coming. With no holder it plans from the store (``coordinator.plan_scale_out``): each member
  loads a different part from the store and the rest from the others, and temporary pipelines
  form once the members' parts cover the model. Times come from the coordinator's own record
  (``--epoch-clock``): the clock starts when it planned (the plan goes out that moment; every
  member had joined and was idle), a block counts when its member reported it in place. First
  servable = when the members' blocks together first cover the model (as in the other rows: a
  temporary pipeline can serve); the coordinator's first formed pipeline is listed beside it
  (later when a member's covering blocks are not one contiguous range: a stage is one). All
  hold = when every member holds every block. Each member's agent runs its store part first
  (``admission.py``'s store first: a receive from a peer is admitted once the member's store
  loads of earlier steps are done), so its link carries its part of the model alone;
- ``from-zero-unordered`` (the ablation, full run only): the same with store first off
  (``FAASCALE_PIPECAST_STORE_FIRST=0`` in the members' environment): a member admits a peer's
  block beside its own store loads, both on its one link.

The link model: the same plan if only the links mattered (``faascale.pipecast.timing``, each
node's store loads one after another over its own link), and bytes / rate for one node's load:
what the plan's block sizes allow at best.

The members start before the coordinator: each one's first join times out, and the
coordinator, once up, asks every member it hears a heartbeat from to join again (``rejoin``),
so all N join within about a second and one wave plans them all. The coordinator plans a wave
with no holder as soon as every expected member joined (it no longer waits out the join
window), but started first it would also plan one when the window passes after the first
joiner, and the members' start (imports, on this machine's shared cores) can be spread over
more than the window: started before it, all are up when they join. Nothing before the plan is
timed.

Bytes from the store: the blocks each node's own block store fetched (its tier directories
after the run); from zero each must be at most half the model (issue 16). CPU: /proc/stat (all
cores, kernel included: the shaped links, RGW and every node share them) and the processes'
own CPU seconds (/proc/PID/stat), sampled every ``SAMPLE_S`` and read over each run's window.
CPU busy = the machine's busy fraction over the run (at least 85 %: CPU-bound, not
link-bound); nodes' CPU s/GB = the loading processes' CPU seconds per GB their nodes received
(from the store and from peers alike); store CPU s = RGW's, its OSD's and its mon's. Every
system lands blocks in /dev/shm (HOST tier files; a member hard-links them into its directory)
and pays its own page faults inside the timed window.

The JSON keys and how they read: ``benchmarks/scaleout_from_zero_report.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bursty import in_host  # noqa: E402
from benchmarks.common import ROOT, cpu_jiffies
from faascale.engine.checkpoint import read_manifest
from faascale.pipecast.agent import STORE_FIRST_ENV
from faascale.pipecast.emulated import EmulatedCluster, rate_bits_per_s

GB = 1e9
NODES = 4  # issue 16: "from zero with 4 nodes"
TARGET_FIRST_VS_STORE_LOAD = 0.35  # issue 16: first servable <= 0.35 x one node's store load
MAX_STORE_SHARE = 0.5  # issue 16: <= 1/2 of each replica's bytes from the store
BUCKET = "faascale-scaleout"
S3_PORT = 7480
S3_KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
           "AWS_DEFAULT_REGION": "us-east-1"}
PORT_BASE = 23000
JOIN_WINDOW_S = 4.0  # the coordinator's: every member rejoins within about a heartbeat (1 s)
START_MARGIN_S = 0.3  # the baseline: from "ready" to the shared start
SAMPLE_S = 0.05  # the CPU sampler's period
STORE_LOAD, STORE_LOAD_ALL, FROM_ZERO = "store-load", "store-load-all", "from-zero"
FROM_ZERO_UNORDERED = "from-zero-unordered"  # the ablation: store first off
SYSTEMS = (STORE_LOAD, STORE_LOAD_ALL, FROM_ZERO, FROM_ZERO_UNORDERED)
LABELS = {STORE_LOAD: "one node's store load (alone, the whole model)",
          STORE_LOAD_ALL: f"every node loads the whole model from the store ({NODES} at once, "
                          "no PipeCast)",
          FROM_ZERO: f"from zero: {NODES} PipeCast members, parts from the store, the rest from "
                     "each other",
          FROM_ZERO_UNORDERED: "from zero, store first off (ablation: peers' blocks beside a "
                               "member's store loads)"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ModelLike(Protocol):
    """What this module needs of ``scaleout.Model``."""

    key: str
    label: str
    packed: Path
    block_bytes: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class ZeroRun:
    """One run. ``arrival_s[node][block]``: seconds since the start (the baseline's shared start;
    from zero, the coordinator's plan). ``store_bytes[node]``: bytes its block store fetched from
    the object store (``store_blocks[node]``: which blocks). ``cpu_busy``: the machine's CPU
    busy fraction over the run; ``cpu_s``: the loading processes' CPU seconds over it.
    ``pipeline_s``: the coordinator's first temporary pipeline (from zero only)."""

    model: str
    num_nodes: int
    rate: str
    store_rate: str
    system: str
    num_blocks: int
    arrival_s: Mapping[str, Mapping[int, float]]
    store_blocks: Mapping[str, tuple[int, ...]]
    store_bytes: Mapping[str, int]
    cpu_busy: float
    cpu_s: float
    pipeline_s: float | None = None
    store_cpu_s: float = 0.0  # the store's (RGW and its OSD) CPU seconds over the run
    errors: tuple[str, ...] = field(default=())
    reps_all_hold_s: tuple[float, ...] = field(default=())
    reps_first_servable_s: tuple[float, ...] = field(default=())

    @property
    def all_hold_s(self) -> float:
        """inf if a node lacks a block (the run failed: see ``errors``)."""
        if not self.arrival_s or any(len(a) < self.num_blocks for a in self.arrival_s.values()):
            return float("inf")
        return max(max(a.values()) for a in self.arrival_s.values())

    @property
    def first_servable_s(self) -> float:
        firsts = [min((a[b] for a in self.arrival_s.values() if b in a), default=float("inf"))
                  for b in range(self.num_blocks)]
        return max(firsts)

    def cpu_s_per_gb(self, model_bytes: int) -> float:
        """The loading processes' CPU seconds per GB their nodes received."""
        return self.cpu_s / max(1e-9, len(self.arrival_s) * model_bytes / GB)

    def store_gbps(self, node: str) -> float | None:
        """The node's goodput from the store: its store bytes / when the last of its blocks
        from the store was in place (loads start at the run's start, one after another from
        zero, FETCH_PARALLEL_BLOCKS at a time alone)."""
        times = [self.arrival_s[node][b] for b in self.store_blocks.get(node, ())
                 if b in self.arrival_s[node]]
        if not times or not self.store_bytes.get(node):
            return None
        return self.store_bytes[node] * 8 / 1e9 / max(times)


def best(runs: Sequence[ZeroRun]) -> ZeroRun:
    """The repetition with the shortest all-hold time, carrying every repetition's all hold and
    first servable (the rule every system of ``scaleout.py`` follows)."""
    kept = min(runs, key=lambda r: r.all_hold_s)
    return replace(kept, reps_all_hold_s=tuple(r.all_hold_s for r in runs),
                   reps_first_servable_s=tuple(r.first_servable_s for r in runs))


# ---------------------------------------------------------------------------------------------
# CPU, sampled


def _process_cpu_s(pid: int) -> float | None:
    try:
        after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(after[11]) + int(after[12])) / CLK_TCK  # utime + stime, every thread


class CpuSampler:
    """/proc/stat and the watched processes' /proc/PID/stat every ``SAMPLE_S`` (a thread), so a
    window known only afterwards (the coordinator's record) can be read back (``window``)."""

    def __init__(self) -> None:
        self._pids: list[int] = []
        self._last: dict[int, float] = {}  # a process that exited keeps its last reading
        self._samples: list[tuple[float, float, float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        with self._lock:
            self._pids.append(pid)

    def _sample(self) -> None:  # the sampler's thread and ``window``'s caller
        with self._lock:
            for p in self._pids:
                s = _process_cpu_s(p)
                if s is not None:
                    self._last[p] = s
            busy, total = cpu_jiffies()
            self._samples.append((time.time(), busy, total, dict(self._last)))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def window(self, t0: float, t1: float, pids: Sequence[int]) -> tuple[float, float]:
        """(machine CPU busy fraction, the CPU seconds of ``pids``) from the last sample at or
        before ``t0`` to the first at or after ``t1`` (epoch seconds). Every pid must have been
        watched (and sampled) before ``t0``."""
        self._sample()
        with self._lock:
            samples = list(self._samples)
        a = max((s for s in samples if s[0] <= t0), key=lambda s: s[0], default=samples[0])
        b = min((s for s in samples if s[0] >= t1), key=lambda s: s[0], default=samples[-1])
        busy = (b[1] - a[1]) / max(1.0, b[2] - a[2])
        return busy, sum(b[3].get(p, 0.0) - a[3].get(p, b[3].get(p, 0.0)) for p in pids)


# ---------------------------------------------------------------------------------------------
# The store: Ceph RGW on its own host


# Run in the store's host (its own address is local there: the upload does not cross a shaped
# link). argv: bucket, packed model dir, key prefix.
UPLOAD = r"""
import os, sys
import boto3
from faascale.memory_tier.packed import upload_packed
from faascale.memory_tier.store import open_store
bucket, packed, key = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=os.environ["FAASCALE_S3_ENDPOINT"])
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
upload_packed(open_store("s3://" + bucket), packed, key)
print("uploaded", key, flush=True)
"""

# One node's store load: the member's store loader (its own block store over the object store),
# every block, FETCH_PARALLEL_BLOCKS at a time (the platform's whole-model load). argv: model
# dir, location, tier dir, go file. Prints "ready", then one JSON line.
LOADER = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from faascale.engine.checkpoint import read_manifest
from faascale.memory_tier.node import FETCH_PARALLEL_BLOCKS
from faascale.pipecast.member import store_loader
model_dir, location, tier_dir, go = sys.argv[1:5]
manifest = read_manifest(model_dir)
load = store_loader(location, manifest, Path(tier_dir))
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
start_at = float(Path(go).read_text())
time.sleep(max(0.0, start_at - time.time()))
arrival, errors = {}, []
def one(i):
    try:
        load(i)
        arrival[i] = time.time() - start_at
    except Exception as e:
        errors.append(f"block {i}: {type(e).__name__}: {e}")
with ThreadPoolExecutor(FETCH_PARALLEL_BLOCKS) as pool:
    list(pool.map(one, range(manifest.num_blocks)))
print(json.dumps({"arrival_s": arrival, "errors": errors, "start_at": start_at}), flush=True)
"""


def store_rate_for(rate: str, nodes: int) -> str:
    """The store host's link: the nodes' links together (not the bottleneck)."""
    return f"{rate_bits_per_s(rate) * nodes / 1e6:.0f}mbit"


class FromZeroBench:
    """One cluster (N nodes, the store, the head) with the store up; runs the systems."""

    def __init__(self, cluster: EmulatedCluster, nodes: int, rate: str, work: Path,
                 shm_root: Path, sampler: CpuSampler) -> None:
        self.cluster, self.nodes, self.rate = cluster, nodes, rate
        self.store_host, self.head = nodes + 1, nodes + 2
        self.store_rate = store_rate_for(rate, nodes)
        self.work, self.shm_root, self.sampler = work, shm_root, sampler
        self.secret = work / "zero-secret"
        self.secret.write_bytes(secrets.token_bytes(32))
        os.chmod(self.secret, 0o600)
        self.port = PORT_BASE
        self.count = 0
        self.rgw = work / "rgw"
        self.store_pids: list[int] = []  # ceph-mon, ceph-osd, radosgw
        endpoint = f"http://{cluster.host_address(self.store_host)}:{S3_PORT}"
        self.env = {**os.environ, **S3_KEYS, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FAASCALE_S3_ENDPOINT": endpoint}

    def _in_host(self, i: int, argv: Sequence[str], timeout_s: float,
                 env: Mapping[str, str] | None = None) -> str:
        return in_host(self.cluster, i, argv, dict(env or self.env), timeout_s)

    def start_store(self, models: Sequence[ModelLike]) -> None:
        """Ceph RGW on the store host, its link at N x the node rate, every model uploaded."""
        self.cluster.set_rate(self.store_host, self.store_rate)
        mem = max(2 << 30, 2 * sum(m.nbytes for m in models))
        env = {**self.env, "RGW_HOST": self.cluster.host_address(self.store_host),
               "AK": S3_KEYS["AWS_ACCESS_KEY_ID"], "SK": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
               "MEMSTORE_BYTES": str(mem), "OWNER_PID": str(os.getpid())}
        self._in_host(self.store_host, ["bash", str(ROOT / "scripts" / "ceph-rgw.sh"), "up",
                                        str(self.rgw), str(S3_PORT)], 240, env)
        self.store_pids = [int(x) for x in (self.rgw / "pids").read_text().split()]
        for pid in self.store_pids:
            self.sampler.watch(pid)
        for m in models:
            self._in_host(self.store_host, [sys.executable, "-c", UPLOAD, BUCKET, str(m.packed),
                                            m.key], 300)

    def stop_store(self) -> None:
        if (self.rgw / "pids").exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "ceph-rgw.sh"), "down", str(self.rgw)],
                           capture_output=True, text=True, timeout=120, check=False)

    def location(self, model: ModelLike) -> str:
        return f"s3://{BUCKET}/{model.key}"

    def _next(self, what: str) -> tuple[int, Path, Path]:
        self.port += 1
        self.count += 1
        run_dir = self.work / f"zero{self.count}-{what}"
        run_dir.mkdir()
        shm_run = self.shm_root / f"zero{self.count}"
        shm_run.mkdir()
        return self.port, run_dir, shm_run

    def _limit_s(self, model: ModelLike) -> float:
        return model.nbytes * 8 / rate_bits_per_s(self.rate)

    # -- one node alone -------------------------------------------------------------------------

    def store_load(self, model: ModelLike, every_node: bool = False) -> ZeroRun:
        """Node host 1 alone (``every_node``: every node host at once, each on its own) loads
        the whole model from the store; one loader process per host, one shared start."""
        system = STORE_LOAD_ALL if every_node else STORE_LOAD
        _, run_dir, shm_run = self._next(system)
        go = run_dir / "go"
        hosts = list(range(1, self.nodes + 1)) if every_node else [1]
        procs: dict[str, subprocess.Popen[str]] = {}
        lines: dict[str, str] = {}
        try:
            for i in hosts:
                h = f"h{i}"
                procs[h] = self.cluster.run(i, [
                    sys.executable, "-c", LOADER, str(model.packed), self.location(model),
                    str(shm_run / f"{h}-tiers"), str(go)],
                    env=self.env, stdout=subprocess.PIPE, stderr=open(run_dir / f"{h}.log", "w"),
                    text=True, cwd=ROOT)  # the child keeps its copy of the log; the GC ours
                self.sampler.watch(procs[h].pid)
            for h, p in procs.items():
                if not p.stdout.readline().startswith("ready"):
                    p.wait(30)
                    raise RuntimeError(f"the store loader on {h} failed: {_tail(run_dir, h)}")
            start_at = time.time() + START_MARGIN_S
            (run_dir / "go.tmp").write_text(f"{start_at:.6f}")
            os.replace(run_dir / "go.tmp", go)
            for h, p in procs.items():
                lines[h] = p.stdout.readline()
            for p in procs.values():
                p.wait(timeout=60 + 10 * self._limit_s(model))
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        empty = [h for h, line in lines.items() if not line.strip()]
        if empty:
            raise RuntimeError(f"store loaders {empty} wrote no result: "
                               + "\n".join(_tail(run_dir, h) for h in empty))
        out = {h: json.loads(line) for h, line in lines.items()}
        arrival = {h: {int(b): s for b, s in o["arrival_s"].items()} for h, o in out.items()}
        errors = tuple(e for o in out.values() for e in o["errors"])
        got = {h: _store_blocks(model, shm_run / f"{h}-tiers") for h in procs}
        run = ZeroRun(model.key, len(hosts), self.rate, self.store_rate, system,
                      len(model.block_bytes), arrival, got,
                      {h: _nbytes(model, b) for h, b in got.items()}, 0.0, 0.0, errors=errors)
        end = start_at + (run.all_hold_s if run.all_hold_s < float("inf") else
                          max((s for a in arrival.values() for s in a.values()), default=0.0))
        busy, cpu_s = self.sampler.window(start_at, end, [p.pid for p in procs.values()])
        store_cpu_s = self.sampler.window(start_at, end, self.store_pids)[1]
        shutil.rmtree(shm_run, ignore_errors=True)
        if errors:
            print(f"  {model.key} {system}: ERRORS: {errors}", flush=True)
        return replace(run, cpu_busy=busy, cpu_s=cpu_s, store_cpu_s=store_cpu_s)

    # -- N members from zero --------------------------------------------------------------------

    def from_zero(self, model: ModelLike, store_first: bool = True) -> ZeroRun:
        """N members from zero; ``store_first=False``: the ablation (``FROM_ZERO_UNORDERED``)."""
        system = FROM_ZERO if store_first else FROM_ZERO_UNORDERED
        port, run_dir, shm_run = self._next(system)
        env = {**self.env, STORE_FIRST_ENV: "1" if store_first else "0"}
        manifest = read_manifest(model.packed)
        names = [f"r{i}" for i in range(1, self.nodes + 1)]
        # Members stop first (each says goodbye to a live coordinator), then the coordinator.
        until, until_coordinator = run_dir / "stop", run_dir / "stop-coordinator"
        record = run_dir / "record.json"
        timeout_s = 120 + 10 * self._limit_s(model)
        head = self.cluster.host_address(self.head)
        coordinator = f"tcp://{head}:{port}"
        procs: dict[str, subprocess.Popen[str]] = {}
        logs = []

        def log(name: str) -> Any:
            f = open(run_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below
            logs.append(f)
            return f

        try:
            for i, name in enumerate(names, start=1):
                procs[name] = self.cluster.run(i, [
                    sys.executable, "-m", "faascale.pipecast.member",
                    "--model-dir", str(model.packed), "--coordinator", coordinator,
                    "--secret-file", str(self.secret), "--until-file", str(until),
                    "--name", name, "--bind", self.cluster.host_address(i),
                    "--holdings-dir", str(shm_run / name), "--store", self.location(model),
                    "--timeout-s", f"{timeout_s + 120:.0f}"],
                    env=env, stdout=subprocess.PIPE, stderr=log(name), text=True, cwd=ROOT)
                self.sampler.watch(procs[name].pid)
            for name, p in procs.items():  # constructed (engine, transports, store client)
                if not p.stdout.readline().startswith("ready"):
                    raise RuntimeError(f"member {name} did not start: {_tail(run_dir, name)}")
            procs["coordinator"] = self.cluster.run(self.head, [
                sys.executable, "-m", "faascale.pipecast.service", "--bind", head,
                "--port", str(port), "--secret-file", str(self.secret),
                "--expect", f"{manifest.model_id}:{self.nodes}",
                "--join-window-s", str(JOIN_WINDOW_S), "--epoch-clock",
                "--record", str(record), "--until-file", str(until_coordinator),
                "--timeout-s", f"{timeout_s + 120:.0f}"],
                env=self.env, stdout=log("coordinator"), stderr=subprocess.STDOUT, text=True,
                cwd=ROOT)
            done = _wait_finished(record, manifest.model_id, procs, timeout_s, run_dir)
        finally:
            until.touch()
            _stop([procs[n] for n in names if n in procs])
            until_coordinator.touch()
            _stop([procs["coordinator"]] if "coordinator" in procs else [])
            for f in logs:
                f.close()
        events = done["record"]
        planned = events[0]
        errors: list[str] = []
        if planned["kind"] != "planned" or list(planned["detail"]["sources"]) != ["store"]:
            errors.append(f"not planned from the store: {planned}")
        if sorted(planned["detail"]["targets"]) != names:
            errors.append(f"one wave did not take every member: {planned['detail']['targets']}")
        if done["dead"]:
            errors.append(f"declared dead: {done['dead']}")
        t0 = float(planned["at_s"])
        arrival: dict[str, dict[int, float]] = {n: {} for n in names}
        for e in events:
            if e["kind"] == "block" and e["detail"]["node"] in arrival:
                arrival[e["detail"]["node"]].setdefault(int(e["detail"]["block"]), e["at_s"] - t0)
        pipeline_s = next((e["at_s"] - t0 for e in events
                           if e["kind"] == "pipelines" and e["detail"]["formed"]), None)
        got = {n: _store_blocks(model, shm_run / f"{n}-tiers") for n in names}
        run = ZeroRun(model.key, self.nodes, self.rate, self.store_rate, system,
                      len(model.block_bytes), arrival, got,
                      {n: _nbytes(model, b) for n, b in got.items()}, 0.0, 0.0, pipeline_s)
        end = t0 + run.all_hold_s if run.all_hold_s < float("inf") else float(done["done_s"])
        busy, cpu_s = self.sampler.window(t0, end, [procs[n].pid for n in names])
        store_cpu_s = self.sampler.window(t0, end, self.store_pids)[1]
        shutil.rmtree(shm_run, ignore_errors=True)
        if errors:
            print(f"  {model.key} {system}: ERRORS: {errors}", flush=True)
        return replace(run, cpu_busy=busy, cpu_s=cpu_s, store_cpu_s=store_cpu_s,
                       errors=tuple(errors))


def _stop(procs: Sequence[subprocess.Popen[str]], grace_s: float = 20.0) -> None:
    """Wait for processes told to stop (their until-file); kill what is still running after."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(run_dir: Path, name: str, chars: int = 2000) -> str:
    try:
        return (run_dir / f"{name}.log").read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _wait_finished(record: Path, model_id: str, procs: Mapping[str, subprocess.Popen[str]],
                   timeout_s: float, run_dir: Path) -> dict[str, Any]:
    """The coordinator's record of the first finished scale-out of ``model_id``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            progress = json.loads(record.read_text()).get(model_id, {})
        except (OSError, ValueError):  # not written yet (or being replaced)
            progress = {}
        if progress.get("finished"):
            return progress["finished"][0]
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited: {dead}" if dead else f"not finished in {timeout_s:.0f} s"
            raise RuntimeError(f"from zero: {why}; progress {progress.get('active')}\n"
                               + "\n".join(f"--- {n}\n{_tail(run_dir, n, 1500)}" for n in procs))
        time.sleep(0.1)


def _store_blocks(model: ModelLike, tier_dir: Path) -> tuple[int, ...]:
    """The model's blocks this node's block store holds (it fetched them from the object store:
    nothing else writes there); a block kept in HOST and DISK counts once."""
    index = {b.file: b.index for b in read_manifest(model.packed).blocks}
    return tuple(sorted({index[f.name] for f in tier_dir.rglob("block-*.bin")
                         if f.name in index}))


def _nbytes(model: ModelLike, blocks: Sequence[int]) -> int:
    return sum(model.block_bytes[b] for b in blocks)


def run_from_zero(work: Path, shm_root: Path, models: Sequence[ModelLike], rate: str,
                  reps: int, nodes: int = NODES,
                  systems: Sequence[str] = SYSTEMS) -> list[ZeroRun]:
    """``systems`` ``reps`` times per model on one cluster (the store up once), interleaved;
    the best of the ``reps`` for each."""
    out: list[ZeroRun] = []
    with EmulatedCluster(nodes + 2, rate=rate, prefix="fsz") as cluster, CpuSampler() as sampler:
        bench = FromZeroBench(cluster, nodes, rate, work, shm_root, sampler)
        try:
            t = time.perf_counter()
            bench.start_store(models)
            print(f"  from zero: Ceph RGW up on host {bench.store_host} (link "
                  f"{bench.store_rate}), {len(models)} model(s) uploaded "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            runs: dict[tuple[str, str], list[ZeroRun]] = {}
            for rep in range(reps):
                for model in models:
                    for system in systems:
                        t = time.perf_counter()
                        r = bench.from_zero(model, store_first=system == FROM_ZERO) \
                            if system in (FROM_ZERO, FROM_ZERO_UNORDERED) else \
                            bench.store_load(model, every_node=system == STORE_LOAD_ALL)
                        runs.setdefault((model.key, system), []).append(r)
                        print(f"  {model.key} n={nodes} {rate} {system} run {rep + 1}/{reps}: "
                              f"all hold {r.all_hold_s:.2f} s, first servable "
                              f"{r.first_servable_s:.2f} s, from the store "
                              f"{', '.join(f'{b / 1e6:.0f}' for b in r.store_bytes.values())} MB, "
                              f"CPU busy {r.cpu_busy:.0%} ({time.perf_counter() - t:.0f} s)",
                              flush=True)
            out += [best(rs) for rs in runs.values()]
        finally:
            bench.stop_store()
    return out
