"""Part 2 of ``coldstart_accuracy.py``: our own engine's starts, predicted vs measured.

Real cold starts in fresh processes (``faascale.coldstart.probe``) of tiny-llama, SmolLM2-135M
and a synthetic ~0.3 GB Llama from three tiers:

- HOST: the blocks in a host-memory tier directory;
- DISK: in a disk tier directory, their pages evicted from the page cache before every start;
- REMOTE: a real S3, a single-node Ceph RGW started for this run the way the test suite's
  ``ceph_rgw`` fixture starts it (``scripts/ceph-rgw.sh up DIR PORT`` with ``AK``/``SK``; ``down
  DIR`` at exit, also on an error; if this process is killed, the script's ``OWNER_PID`` watcher
  stops the cluster). Each model is uploaded to it once (``upload_packed``); every probe reads
  its manifest and tokenizer from it, and for REMOTE its blocks.

One warm-up start is discarded (the first process pays for a cold file cache of Python's own
modules). The starts are taken in rounds, each round one start of every (model, tier), so a drift
of the machine (other load, caches) touches every model alike.

**Headline: leave one model out.** Each model's starts are predicted by ``OUR_ENGINE`` fitted on
the *other* models' starts only (all tiers): the platform's situation for a model it has never
started. Error per (model, tier) = (predicted - measured) / measured, signed, where measured is
the median over that pair's starts of the steps the model predicts (``estimate.ENGINE_STEPS``).
Secondary: the in-sample error of a fit on every start, the model's own included.

The features of a start are the model's metadata and the tier prepared for it, never where the
probe found its blocks; a start whose measured source differs from its tier is counted
(``engine_source_mismatches``) and fails the verdict.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.coldstart.estimate import ENGINE_STEPS, OUR_ENGINE, engine_features, engine_observation
from faascale.coldstart.model import Observation, fit
from faascale.coldstart.probe import run_profiles
from faascale.coldstart.profile import StartupProfile
from faascale.platform.server import free_port

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("HOST", "DISK", "REMOTE")
TARGET_PCT = 15.0
MACHINE = "here"
CEPH_TOOLS = ("radosgw", "ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool",
              "radosgw-admin")
RGW_BOOT_TIMEOUT_S = 300
RGW_ACCESS_KEY, RGW_SECRET_KEY, RGW_REGION = "faascale-bench", "faascale-bench-secret", "us-east-1"


@dataclass(frozen=True)
class Rgw:
    endpoint: str
    dir: Path

    def env(self) -> dict[str, str]:
        """What a process needs to reach this S3 through ``store.open_store``."""
        return {"FAASCALE_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": RGW_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": RGW_SECRET_KEY, "AWS_DEFAULT_REGION": RGW_REGION}


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=RGW_REGION,
                        aws_access_key_id=RGW_ACCESS_KEY, aws_secret_access_key=RGW_SECRET_KEY,
                        config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                                      read_timeout=10, retries={"max_attempts": 1}))


@contextmanager
def ceph_rgw(work: Path) -> Iterator[Rgw]:
    """A Ceph RGW on a free loopback port for the duration of the block (RuntimeError if Ceph
    is not installed or does not come up; every cluster started is stopped on the way out)."""
    missing = [t for t in CEPH_TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"Ceph RGW not installed ({', '.join(missing)} missing): run "
                           "scripts/ensure-ceph.sh")
    script = ROOT / "scripts" / "ceph-rgw.sh"
    env = {**os.environ, "AK": RGW_ACCESS_KEY, "SK": RGW_SECRET_KEY, "OWNER_PID": str(os.getpid())}
    started: list[Path] = []
    try:
        for attempt in range(3):  # a free port can be taken before radosgw binds it
            d = work / f"ceph-rgw-{attempt}"
            d.mkdir(parents=True)
            started.append(d)  # before `up`: a boot that fails half-way is stopped too
            up = subprocess.run(["bash", str(script), "up", str(d), str(free_port())], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=RGW_BOOT_TIMEOUT_S)
            if up.returncode == 0:
                break
            if not ("in use" in up.stderr or "was taken" in up.stderr) or attempt == 2:
                raise RuntimeError(f"scripts/ceph-rgw.sh up failed (exit {up.returncode}); logs "
                                   f"in {d}/log\n{up.stdout}{up.stderr}")
        rgw = Rgw((d / "endpoint").read_text().strip(), d)
        deadline = time.monotonic() + 30
        while True:  # an authenticated ListBuckets answers: the user exists, the gateway serves
            try:
                _client(rgw.endpoint).list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield rgw
    finally:
        for d in started:
            subprocess.run(["bash", str(script), "down", str(d)], capture_output=True,
                           timeout=120)


def _models(work: Path) -> list[tuple[str, Path]]:
    from faascale.engine.random_model import pack_random, tiny_config
    from faascale.engine.sources import resolve_packed

    tiny, synth = work / "tiny-llama", work / "synthetic"
    pack_random(tiny, seed=0, num_blocks=4)
    pack_random(synth, seed=0, num_blocks=8, name="synthetic-llama",
                config=tiny_config(hidden_size=768, intermediate_size=2048, num_layers=8,
                                   num_heads=12, num_kv_heads=4, head_dim=64, vocab_size=16000))
    return [("tiny-llama", tiny),
            ("SmolLM2-135M", Path(resolve_packed("bundled://smollm2-135m-instruct",
                                                 dtype="float32", num_blocks=6))),
            ("synthetic-0.3GB", synth)]


def _upload(rgw: Rgw, models: list[tuple[str, Path]]) -> dict[str, str]:
    """Every model into one new bucket; label -> its ``s3://`` location."""
    from faascale.memory_tier.packed import upload_packed
    from faascale.memory_tier.s3_store import S3Store

    bucket = f"coldstart-{uuid.uuid4().hex[:8]}"
    _client(rgw.endpoint).create_bucket(Bucket=bucket)
    with S3Store(bucket, endpoint_url=rgw.endpoint, region=RGW_REGION, access_key=RGW_ACCESS_KEY,
                 secret_key=RGW_SECRET_KEY) as store:
        for label, path in models:
            upload_packed(store, path, f"models/{label}")
    return {label: f"s3://{bucket}/models/{label}" for label, _ in models}


def _observation(p: StartupProfile, tier: str) -> Observation:
    # The tier prepared for the start (known before it), not the one the probe reported.
    return engine_observation(engine_features(p.model_id, p.model), MACHINE, tier, p.steps())


def measure(runs: int) -> tuple[dict[tuple[str, str], list[StartupProfile]], str,
                                dict[str, float]]:
    """``runs`` rounds of starts of every (model, tier) from a fresh Ceph RGW; the starts, a
    description of the store, and the seconds each phase of the run took."""
    starts: dict[tuple[str, str], list[StartupProfile]] = {}
    phases: dict[str, float] = {}
    t = time.monotonic()

    def phase(name: str) -> None:
        nonlocal t
        phases[name], t = round(time.monotonic() - t, 1), time.monotonic()

    with tempfile.TemporaryDirectory(prefix="faascale-coldstart-bench-") as tmp:
        work = Path(tmp)
        models = _models(work)
        phase("pack_s")
        with ceph_rgw(work / "rgw") as rgw:
            phase("rgw_up_s")
            where = _upload(rgw, models)
            phase("upload_s")
            env = rgw.env()
            run_profiles(models[0][1], "HOST", 1, work_dir=work / "warm",
                         location=where[models[0][0]], env=env)  # discarded
            for _ in range(runs):
                for label, path in models:
                    for tier in TIERS:
                        (p,) = run_profiles(path, tier, 1, work_dir=work / "c",
                                            location=where[label], env=env)
                        starts.setdefault((label, tier), []).append(p)
            phase("starts_s")
    phase("rgw_down_s")
    return starts, f"Ceph RGW (S3 on loopback, `scripts/ceph-rgw.sh`) at {rgw.endpoint}", phases


def engine_part(quick: bool) -> tuple[dict[str, Any], str]:
    runs = 1 if quick else 4
    starts, store, phases = measure(runs)
    print("engine phases:", ", ".join(f"{k} {v}" for k, v in phases.items()))
    labels = list(dict.fromkeys(label for label, _ in starts))
    obs = {k: [_observation(p, k[1]) for p in ps] for k, ps in starts.items()}
    everything = [o for os_ in obs.values() for o in os_]
    in_sample = fit(OUR_ENGINE, everything, MACHINE, with_uncertainty=False)
    loo_fits = {label: fit(OUR_ENGINE, [o for (lb, _), os_ in obs.items() if lb != label
                                        for o in os_], MACHINE, with_uncertainty=False)
                for label in labels}
    mismatches = sum(p.source != tier for (_, tier), ps in starts.items() for p in ps)
    rows, loo_err, in_err = [], {}, {}
    for (label, tier), os_ in obs.items():
        measured = statistics.median(o.total_s for o in os_)
        wall = statistics.median(p.total_s for p in starts[(label, tier)])
        loo = loo_fits[label].predict(os_[0].model, os_[0].setting).total_s
        ins = in_sample.predict(os_[0].model, os_[0].setting).total_s
        key = f"{label}/{tier}"
        loo_err[key] = (loo - measured) / measured * 100
        in_err[key] = (ins - measured) / measured * 100
        fetch = statistics.median(o.steps_s["weight_fetch"] for o in os_)
        rows.append(f"| {label} | {tier} | {measured:.2f} s ({wall:.2f} s) | {fetch:.3f} s | "
                    f"**{loo:.2f} s ({loo_err[key]:+.1f} %)** | {ins:.2f} s ({in_err[key]:+.1f} %) |")
        print(f"engine {label:>16} {tier:>6}: measured {measured:.2f} s, leave-model-out "
              f"{loo:.2f} s ({loo_err[key]:+.1f} %), in-sample {ins:.2f} s ({in_err[key]:+.1f} %)")
    worst_key = max(loo_err, key=lambda k: abs(loo_err[k]))
    worst = abs(loo_err[worst_key])
    within = sum(abs(v) <= TARGET_PCT for v in loo_err.values())
    mape = statistics.mean(abs(v) for v in loo_err.values())
    in_worst = max(abs(v) for v in in_err.values())
    steps_mean = {s: statistics.mean(o.steps_s[s] for o in everything) for s in ENGINE_STEPS}
    start_mean = statistics.mean(o.total_s for o in everything)
    top = max(steps_mean, key=lambda s: steps_mean[s])
    fetch_by_tier = {t: statistics.mean(o.steps_s["weight_fetch"] for (_, tier), os_ in obs.items()
                                        if tier == t for o in os_) for t in TIERS}
    result = {"engine_loo_mape_pct": round(mape, 2),
              "engine_loo_max_abs_err_pct": round(worst, 2),
              "engine_loo_err_pct": {k: round(v, 2) for k, v in loo_err.items()},
              "engine_loo_within_15pct": worst <= TARGET_PCT and not mismatches,
              "engine_in_sample_max_abs_err_pct": round(in_worst, 2),
              "engine_starts": len(everything), "engine_runs_per_pair": runs,
              "engine_models": len(labels), "engine_remote": "ceph-rgw",
              "engine_source_mismatches": mismatches,
              "engine_phases_s": phases}
    where = ", ".join(f"{s} {v:.2f} s" for s, v in steps_mean.items() if v > 0.0005)
    order = " < ".join(f"{t} ({fetch_by_tier[t]:.3f} s)" for t in sorted(TIERS, key=fetch_by_tier.get))
    verdict = "pass" if worst <= TARGET_PCT and not mismatches else "fail"
    source_note = ("every start found its blocks in the tier prepared for it" if not mismatches
                   else f"**{mismatches} start(s) found their blocks elsewhere than the tier "
                        "prepared for them: the tier labels of this run are not trustworthy**")
    text = f"""### Our engine's starts (this machine)

Fresh-process cold starts (`faascale coldstart profile` does the same) of {len(labels)} models
from HOST, DISK (pages evicted) and REMOTE, a real S3: {store}. {runs} start(s) per model and
tier, taken in rounds, after one discarded warm-up start; {source_note}. Measured: the median
over a pair's starts of the steps the model predicts (in brackets the wall time to ready).
**Leave one model out** (headline): each model predicted by a fit on the other
{len(labels) - 1} models' starts only. In-sample (secondary): a fit on every start, its own
included. Errors are (predicted - measured) / measured.

| model | tier | measured | of which weight fetch | predicted, model left out | predicted in-sample |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Leave one model out: mean absolute error **{mape:.1f} %**, largest **{worst:.1f} %**
({worst_key}); {within} of {len(loo_err)} pairs within the {TARGET_PCT:.0f} % target:
**{verdict}**. In-sample the largest error is {in_worst:.1f} %.
Where the time goes, mean over all {len(everything)} starts ({start_mean:.2f} s each): {where}.
The largest step is `{top}` ({steps_mean[top] / start_mean * 100:.0f} % of a start); the weight
fetch, mean over the models, by tier: {order}.
"""
    print(text.rstrip().rsplit("\n\n", 1)[-1])
    return result, text
