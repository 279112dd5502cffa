"""Real vLLM starts of one Hugging Face folder, added to a *Breaking the Ice*-format data folder:
the loop behind ``faascale coldstart profile-vllm`` and ``benchmarks/coldstart_vllm.py``.

Each start: with ``weights_source="pagecache"`` the model folder's files are first read once
(``warm_page_cache``), so the label holds even for a folder that was evicted since (a read of a
cached GB takes ~0.2 s here); with ``"disk"`` they are written back and dropped from the page cache
(``probe.evict_from_page_cache``: ``POSIX_FADV_DONTNEED``, no root), so vLLM reads the weights (and
tokenizer) from the disk while its own Python files stay cached;
then ``vllm_run.run_vllm_start`` (spawn, ``/health``, stop the process group); the parse and the
profile are saved beside the log (``vllm_data.save_run_json``) and the row is kept.

``compile_cache="cold"`` gives each start empty compile caches: a fresh ``VLLM_CACHE_ROOT`` that
holds only a copy of vLLM's model-info cache (``modelinfos/``: the architecture inspection, which a
first start of an architecture on a machine makes in a ~10 s subprocess) and a fresh
``TORCHINDUCTOR_CACHE_DIR`` in it, both removed after the start. So a compiled start compiles from
nothing, as the first start of a model on a new node does, whatever was compiled here before
(``shared``, the default, uses the machine's caches: Inductor's kernel cache makes a model compiled
before compile faster, 18 s against 8 s for a 2-layer model here, even when vLLM's AOT cache fails
to load). Runs are
numbered after those already in the folder for the same model and scenario, and the rows are
added once the loop ends (also after a failed start: the runs before it count), so a folder
grows across invocations.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from faascale.coldstart.probe import evict_from_page_cache
from faascale.coldstart.vllm_data import (add_runs, model_row, next_run_index, run_row,
                                          save_run_json)
from faascale.coldstart.vllm_log import STEPS
from faascale.coldstart.vllm_run import VllmRun, VllmServerConfig, run_vllm_start

WEIGHTS_SOURCES = ("pagecache", "disk")
COMPILE_CACHES = ("shared", "cold")
COLD_CACHE_SETTING = ("cold: an empty VLLM_CACHE_ROOT (model infos only) and "
                      "TORCHINDUCTOR_CACHE_DIR per start")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ProfileRequest:
    """What to start and where the rows go. ``scenario`` None: ``default_scenario``."""

    model_dir: str
    out: str
    python: str
    runs: int = 1
    enforce_eager: bool = False
    weights_source: str = "pagecache"
    compile_cache: str = "shared"
    scenario: str | None = None
    model_name: str | None = None
    dtype: str = "float32"
    max_model_len: int = 2048
    port: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, not {self.runs}")
        if self.weights_source not in WEIGHTS_SOURCES:
            raise ValueError(f"weights_source must be one of {', '.join(WEIGHTS_SOURCES)}, "
                             f"not {self.weights_source!r}")
        if self.compile_cache not in COMPILE_CACHES:
            raise ValueError(f"compile_cache must be one of {', '.join(COMPILE_CACHES)}, "
                             f"not {self.compile_cache!r}")


@dataclass(frozen=True)
class ProfileResult:
    """The model key, the scenario, the successful starts (in order) and why the loop stopped
    early (None: every start answered)."""

    model: str
    scenario: str
    runs: tuple[VllmRun, ...]
    failure: str | None = None


def warm_page_cache(paths: list[Path], chunk_bytes: int = 1 << 24) -> int:
    """Read the files through once so their pages are cached; returns the bytes read."""
    total = 0
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while chunk := f.read(chunk_bytes):
                total += len(chunk)
    return total


def default_scenario(hostname: str, enforce_eager: bool, weights_source: str = "pagecache") -> str:
    """``<host>_eager``/``<host>_compiled``, plus ``_disk`` when the page cache was dropped."""
    mode = "eager" if enforce_eager else "compiled"
    return f"{hostname}_{mode}" + ("_disk" if weights_source == "disk" else "")


def variant(req: ProfileRequest) -> str:
    """The ``variant`` column: the settings that shape a start (pure)."""
    return ";".join((["enforce-eager"] if req.enforce_eager else [])
                    + ([f"compile-cache_{req.compile_cache}"]
                       if req.compile_cache != "shared" and not req.enforce_eager else [])
                    + [f"dtype_{req.dtype}", f"max_model_len_{req.max_model_len}"])


def default_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """vLLM's cache root: ``$VLLM_CACHE_ROOT``, else ``~/.cache/vllm``."""
    env = os.environ if env is None else env
    return Path(env.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm")


@contextmanager
def cold_caches(cfg: VllmServerConfig, shared_root: Path | None = None
                ) -> Iterator[VllmServerConfig]:
    """``cfg`` with a fresh cache root (the shared root's ``modelinfos/`` copied in) and a
    fresh Inductor cache in it; the folder is removed on exit."""
    shared_root = default_cache_root() if shared_root is None else shared_root
    tmp = Path(tempfile.mkdtemp(prefix="faascale-vllm-cold-"))
    try:
        infos = shared_root / "modelinfos"
        if infos.is_dir():
            shutil.copytree(infos, tmp / "modelinfos")
        (tmp / "inductor").mkdir()
        yield replace(cfg, cache_root=str(tmp), inductor_cache_dir=str(tmp / "inductor"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile_vllm(req: ProfileRequest, machine: Mapping[str, Any], *,
                 echo: Callable[[str], None] = _stderr, report: Callable[[str], None] = print,
                 on_step: Callable[[str], None] | None = None) -> ProfileResult:
    """``req.runs`` real starts of ``req.model_dir`` (see the module docstring); their rows are
    added to ``req.out``. ``machine``: ``profile.machine_facts()`` (its ``hostname`` is the fit
    group). Raises ``dataset.DatasetError`` if the folder is not a Hugging Face model and
    ``vllm_run.VllmRunError`` if no start can be tried; a start that fails ends the loop and is
    returned as ``failure``. ``echo`` hears progress (default: stderr), ``report`` each start's
    steps and the rows added (default: stdout), ``on_step`` the step in progress."""
    model = model_row(req.model_dir, req.model_name)
    name = model["model"]
    scenario = req.scenario or default_scenario(str(machine["hostname"]), req.enforce_eager,
                                                req.weights_source)
    cfg = VllmServerConfig(model_dir=str(req.model_dir), python=req.python, port=req.port,
                           dtype=req.dtype, max_model_len=req.max_model_len,
                           enforce_eager=req.enforce_eager)
    files = sorted(p for p in Path(req.model_dir).iterdir() if p.is_file())
    first = next_run_index(req.out, name, scenario)
    rows, done = [], []
    failure = None
    for k in range(first, first + req.runs):
        log = Path(req.out) / "logs" / f"{name}_{scenario}_run{k}.log"
        echo(f"run {k - first + 1}/{req.runs}: vLLM on {name} ({scenario}), log {log}")
        if req.weights_source == "disk":
            evict_from_page_cache(files)
        else:
            warm_page_cache(files)
        if req.compile_cache == "cold":
            with cold_caches(cfg) as cold:
                run = run_vllm_start(cold, log, timeout_s=req.timeout_s, on_step=on_step)
        else:
            run = run_vllm_start(cfg, log, timeout_s=req.timeout_s, on_step=on_step)
        if not run.ok or run.startup is None:
            failure = f"run {k - first + 1}/{req.runs} failed: {run.error}"
            break
        save_run_json(run, model=name, weight_bytes=int(model["weight_bytes"]), machine=machine)
        rows.append(run_row(run, model=name, scenario=scenario, run_index=k,
                            eager=req.enforce_eager, machine=machine, variant=variant(req),
                            weights_source=req.weights_source,
                            compile_cache_setting=(COLD_CACHE_SETTING if req.compile_cache == "cold"
                                                   else None)))
        done.append(run)
        st = run.startup
        steps = ", ".join(f"{s} {st.steps_s[s]:.2f}" for s in STEPS if s in st.steps_s)
        report(f"  {steps}; log total {st.total_s if st.total_s is not None else '-'} s, "
             f"spawn to ready {run.measured_s:.2f} s" + (f" [{', '.join(st.flags)}]" if st.flags else ""))
    if rows:
        add_runs(req.out, model, rows)
        report(f"added {len(rows)} run(s) of {name} ({scenario}) to {req.out}")
    return ProfileResult(model=name, scenario=scenario, runs=tuple(done), failure=failure)
