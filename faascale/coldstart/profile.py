"""Startup profiles: where one replica start's time went, span by span.

Pure (the clock is injected; ``machine_facts`` is the one function that reads the system). A
``StartupRecorder`` times the spans of a start; ``finish`` freezes them into a ``StartupProfile``,
which travels as JSON (``to_dict``/``from_dict``) to the platform's registry, ``status``,
``/metrics`` and ``faascale coldstart profiles``; ``summarize`` gives per-step mean and p90.

The steps of one of our starts, in order (``STEPS``):

- ``process``: from the process's creation to the replica's constructor (interpreter and Ray
  worker start, the actor's creation); 0 on a warm runtime (``runtime["warm"]``: a pooled Ray
  worker that had started, imported and warmed up its kernels before the replica was ordered);
- ``imports``: importing the engine and platform modules (measured when this process imported them;
  0 when they were already imported, as on a warm runtime);
- ``kernel_warmup``: a cold runtime's model-independent warm-up (``warm_runtime.py``), when the
  worker ran it on this start's path;
- ``spec_tokenizer``: the function spec, the manifest and the tokenizer;
- ``weight_fetch``: making every block local (attrs: ``tier`` per block counts, ``bytes``);
- ``materialize``: block files to tensors on the engine's device and its shards, the device
  synchronised (attrs: ``device``, ``mover``, ``blocks_moved``, ``bytes_moved``, ``bytes_copied``
  (0 on a CPU: zero copy), ``device_sync_s``; ``start_steps.materialize``);
- ``kv_cache``: the engine and its KV cache;
- ``warmup``: one prefill and one decode step, so the first request does not pay for them;
- ``cuda_graphs``: CUDA-graph capture (GPU only; absent on CPU);
- ``first_token``: after the start, from ready to the first token of the first request.
"""

from __future__ import annotations

import os
import platform as _platform
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from faascale.stats import percentile

STEPS = ("process", "imports", "kernel_warmup", "spec_tokenizer", "weight_fetch", "materialize", "kv_cache",
         "warmup", "cuda_graphs", "first_token")
START_STEPS = STEPS[:-1]  # what adding a replica costs; the first token comes after ready
SOURCES = ("HOST", "DISK", "REMOTE", "PEER", "MIXED")
FIXED_STEPS = ("process", "imports", "kernel_warmup", "spec_tokenizer", "warmup")  # not bytes


@dataclass(frozen=True)
class Span:
    name: str
    start_s: float
    end_s: float
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start_s": self.start_s, "end_s": self.end_s,
                "attrs": dict(self.attrs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Span:
        return cls(str(data["name"]), float(data["start_s"]), float(data["end_s"]),
                   dict(data.get("attrs") or {}))


@dataclass(frozen=True)
class StartupProfile:
    """One replica start. ``source`` is where its weights came from (HOST, DISK, REMOTE, PEER,
    or MIXED when blocks came from several tiers); ``started_at_s`` is epoch seconds; ``device``
    is where the replica computes (``cpu``, ``cuda:0``; "" in profiles from before it was
    recorded)."""

    function: str
    replica: str
    model_id: str
    started_at_s: float
    source: str
    weight_bytes: int
    spans: tuple[Span, ...]
    machine: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    runtime: Mapping[str, Any] = field(default_factory=dict)  # warm or cold, idle_s (warm_runtime)
    device: str = ""

    @property
    def warm(self) -> bool:
        return bool(self.runtime.get("warm"))

    @property
    def fixed_s(self) -> float:
        """The part of the start that is not moving or mapping the weights (``FIXED_STEPS``)."""
        return sum(self.step_s(n) for n in FIXED_STEPS)

    @property
    def total_s(self) -> float:
        """Order to ready: the start's steps (``first_token`` excluded)."""
        spans = [s for s in self.spans if s.name != "first_token"]
        if not spans:
            return 0.0
        return max(s.end_s for s in spans) - min(s.start_s for s in spans)

    def step_s(self, name: str) -> float:
        return float(sum(s.duration_s for s in self.spans if s.name == name))

    def steps(self) -> dict[str, float]:
        """Seconds per step that occurred, in ``STEPS`` order (unknown span names after)."""
        names = [n for n in STEPS if any(s.name == n for s in self.spans)]
        names += sorted({s.name for s in self.spans} - set(STEPS))
        return {n: self.step_s(n) for n in names}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["spans"] = [s.to_dict() for s in self.spans]
        out["machine"], out["model"] = dict(self.machine), dict(self.model)
        out["runtime"] = dict(self.runtime)
        out["total_s"] = self.total_s
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StartupProfile:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["spans"] = tuple(Span.from_dict(s) for s in data.get("spans") or ())
        values.setdefault("machine", {})
        values.setdefault("model", {})
        values.setdefault("runtime", {})
        return cls(**values)


class StartupRecorder:
    """Times the spans of one start: ``with rec.span("weight_fetch", tier=...)`` or ``add``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.spans: list[Span] = []

    @contextmanager
    def span(self, name: str, **attrs: Any) -> Iterator[dict[str, Any]]:
        """Time the block; the yielded dict's items become attrs (set them inside the block)."""
        extra: dict[str, Any] = dict(attrs)
        start = self.clock()
        try:
            yield extra
        finally:
            self.spans.append(Span(name, start, self.clock(), extra))

    def add(self, name: str, start_s: float, end_s: float, **attrs: Any) -> None:
        if end_s < start_s:
            raise ValueError(f"span {name}: ends ({end_s}) before it starts ({start_s})")
        self.spans.append(Span(name, start_s, end_s, attrs))

    def finish(self, *, function: str, replica: str, model_id: str, source: str,
               weight_bytes: int, machine: Mapping[str, Any] | None = None,
               model: Mapping[str, Any] | None = None, ok: bool = True,
               error: str | None = None,
               runtime: Mapping[str, Any] | None = None, device: str = "") -> StartupProfile:
        spans = tuple(sorted(self.spans, key=lambda s: s.start_s))
        started = spans[0].start_s if spans else self.clock()
        return StartupProfile(function=function, replica=replica, model_id=model_id,
                              started_at_s=started, source=source, weight_bytes=weight_bytes,
                              spans=spans, machine=dict(machine or {}), model=dict(model or {}),
                              ok=ok, error=error, runtime=dict(runtime or {}), device=device)


def source_of(blocks_by_tier: Mapping[str, int]) -> str:
    """The profile's ``source`` from blocks per tier: the one tier, or MIXED."""
    used = [t for t, n in blocks_by_tier.items() if n]
    return used[0] if len(used) == 1 else ("MIXED" if used else "REMOTE")


@dataclass(frozen=True)
class StepSummary:
    step: str
    n: int
    mean_s: float
    p90_s: float


def summarize(profiles: Iterable[StartupProfile]) -> list[StepSummary]:
    """Per step (and ``total``), over the successful profiles: count, mean and p90 seconds."""
    ok = [p for p in profiles if p.ok]
    out = []
    names = [n for n in STEPS if any(n in p.steps() for p in ok)]
    names += sorted({n for p in ok for n in p.steps()} - set(STEPS))
    for name in [*names, "total"]:
        values = [p.total_s if name == "total" else p.steps()[name] for p in ok
                  if name == "total" or name in p.steps()]
        if values:
            out.append(StepSummary(name, len(values), sum(values) / len(values), percentile(values, 90)))
    return out


def process_started_at_s() -> float | None:
    """When this process was created (epoch seconds), from /proc; None where unavailable."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def machine_facts() -> dict[str, Any]:
    """Where a start ran: the fit group of the startup model is ``hostname``."""
    cpu = _platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - facts, not requirements
        torch_version = None
    return {"hostname": socket.gethostname(), "cpu_model": cpu, "cpus": os.cpu_count(),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "gpu": gpu,
            "torch": torch_version}


def model_facts(manifest: Any, tokenizer_bytes: int) -> dict[str, Any]:
    """A packed model's features for the startup model (``estimate.engine_features``)."""
    cfg = manifest.config
    per_param = 4 if "32" in str(manifest.dtype) else 2
    return {"params": manifest.total_bytes // per_param, "weight_bytes": manifest.total_bytes,
            "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
            "tokenizer_bytes": tokenizer_bytes, "num_blocks": manifest.num_blocks,
            "dtype": str(manifest.dtype)}
