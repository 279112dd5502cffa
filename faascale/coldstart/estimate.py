"""Cold-start estimates for our own engine: how long a new replica takes from each source.

Pure. The same per-step model as for vLLM (``model.py``), with our engine's steps (the spans of a
``StartupProfile``), fitted on the starts this platform measured. For one function and one source
the estimate rests, in this order of trust, on

1. **measured** starts of this function from that source (the median of the last few; the band is
   their spread), when there are any;
2. **the model** fitted on every measured start of this machine (other functions, other sources),
   when it has seen that source;
3. **a prior**: the weight bytes over a nominal bandwidth of the source, plus the source's setup
   before its first byte, plus the median of the non-weight steps measured here (or a fixed 2 s),
   flagged ``basis="prior"``.

``estimates_for`` returns one ``start_source.ColdStartEstimate`` per source, which the autoscaling
policy compares (``start_source.choose_source``).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence

from faascale.coldstart.model import (OFFSET_PREFIX, FeatureError, ModelFeatures, Observation, StartSetting,
                                      StartupModelSpec, StepSpec, fit)
from faascale.coldstart.start_source import SOURCES, ColdStartEstimate, choose_source

# The steps of one of our replica starts (``profile.STEPS``, without ``first_token``, which comes
# after the replica is ready and is not part of the time to add capacity).
ENGINE_STEPS = ("process", "imports", "kernel_warmup", "spec_tokenizer", "weight_fetch", "materialize",
                "kv_cache", "warmup", "cuda_graphs")
# Nominal bandwidths for the prior (bytes/s): /dev/shm mapping with checksums, a SATA-class disk
# read, an object-store GET stream, a 10 Gbit/s link between GPU nodes (PipeCast from peers).
PRIOR_BANDWIDTH_B_S = {"HOST": 4e9, "DISK": 0.5e9, "REMOTE": 0.2e9, "PEER": 1.25e9}
# What a source costs before its first byte, in the prior: a request to the store; for PEER a
# PipeCast join, a plan and the connections (one copy of SmolLM2 between two replicas took
# 1.1-2.2 s here, most of it not bytes). Without it a source never measured looks faster than
# one measured, whose figure carries its real setup: the bytes of a small model are nothing.
PRIOR_SETUP_S = {"HOST": 0.0, "DISK": 0.0, "REMOTE": 0.1, "PEER": 1.0}
PINNED = "pinned"
PRIOR_OVERHEAD_S = 2.0
PRIOR_WARM_OVERHEAD_S = 0.5  # on a warm runtime: no process, imports or kernel warm-up
# The start setting of a start on a cold runtime and on a warm one (warm_runtime.py): the fit
# gives each its own offsets, so the estimate for the next start follows the pool's state.
COLD, WARM = "faascale", "faascale-warm"
MEASURED_WINDOW = 5


def _warm_or_cold(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    """A constant with an offset per setting: a warm runtime has no process or imports step."""
    return {"1": 1.0, f"{OFFSET_PREFIX}{s.setting}": 1.0}


OUR_ENGINE = StartupModelSpec(
    name="faascale",
    steps=(
        StepSpec("process", _warm_or_cold),
        StepSpec("imports", _warm_or_cold),
        StepSpec("kernel_warmup", _warm_or_cold),
        StepSpec("spec_tokenizer", lambda m, s: {"1": 1.0, "tokenizer_mb": m.tokenizer_mb}),
        StepSpec("weight_fetch", lambda m, s: {f"1@{s.weights_source}": 1.0,
                                               f"gb@{s.weights_source}": m.weight_bytes / 1e9}),
        StepSpec("materialize", lambda m, s: {"1": 1.0, "gb": m.weight_bytes / 1e9}),
        StepSpec("kv_cache", lambda m, s: {"1": 1.0, "layers": float(m.layers)}),
        StepSpec("warmup", lambda m, s: {"1": 1.0, "active_b": m.active_params_b}),
        StepSpec("cuda_graphs", lambda m, s: ({"1": 1.0, "graphs": s.capture_sizes * m.layers
                                               / 1000} if s.capture_sizes > 0 else None)),
    ),
    groups={"start": ENGINE_STEPS},
)


def engine_features(name: str, model: Mapping[str, object]) -> ModelFeatures:
    """A ``StartupProfile.model`` dict (or a manifest's numbers) as ``ModelFeatures``."""
    def num(key: str, default: float = 0.0) -> float:
        value = model.get(key)
        return float(value) if isinstance(value, (int, float)) else default

    weight_bytes = num("weight_bytes")
    params = num("params") or weight_bytes / 2
    if params <= 0:
        raise FeatureError(f"{name}: the profile has neither params nor weight_bytes")
    return ModelFeatures(
        name=name, params_b=params / 1e9, layers=int(num("layers", 1)) or 1,
        hidden_size=int(num("hidden_size", 1)) or 1, vocab_size=int(num("vocab_size", 1)) or 1,
        tokenizer_mb=num("tokenizer_bytes") / 1e6,
        num_attention_heads=int(num("num_attention_heads")),
        num_key_value_heads=int(num("num_key_value_heads")),
        ffn_dim=int(num("intermediate_size")),
        weight_bytes_override=weight_bytes or None)


def manifest_features(manifest: object, tokenizer_bytes: int = 0) -> ModelFeatures:
    """Features of a packed model (``manifest.ModelManifest``) before any start was measured."""
    cfg = manifest.config  # type: ignore[attr-defined]
    weight_bytes = float(manifest.total_bytes)  # type: ignore[attr-defined]
    per_param = {"float32": 4, "fp32": 4, "float16": 2, "bfloat16": 2, "fp16": 2, "bf16": 2}.get(
        str(manifest.dtype).replace("torch.", ""), 2)  # type: ignore[attr-defined]
    return ModelFeatures(
        name=manifest.model_id, params_b=weight_bytes / per_param / 1e9,  # type: ignore[attr-defined]
        layers=cfg.num_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        tokenizer_mb=tokenizer_bytes / 1e6, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, ffn_dim=cfg.intermediate_size,
        weight_bytes_override=weight_bytes)


def engine_observation(model: ModelFeatures, machine: str, source: str,
                       steps_s: Mapping[str, float], capture_sizes: int = 0,
                       warm: bool = False) -> Observation:
    """One measured start of ours, as an observation of ``OUR_ENGINE`` (``warm``: on a warm
    runtime, setting ``WARM``)."""
    setting = StartSetting(machine=machine, setting=WARM if warm else COLD, weights_source=source,
                           compile_cache="none", capture_sizes=capture_sizes)
    return Observation(model, setting, {s: float(steps_s.get(s, 0.0)) for s in ENGINE_STEPS})


def estimates_for(model: ModelFeatures, machine: str, observations: Sequence[Observation],
                  available: Mapping[str, bool], warm: bool = False) -> list[ColdStartEstimate]:
    """One estimate per source in ``SOURCES`` (``available`` says which exist now; missing
    keys count as unavailable, except REMOTE, which always is). ``warm``: the next start will find
    a warm runtime (the pool has one), so it is estimated from warm starts (cold ones when no warm
    start was measured yet, the fit's setting offset otherwise)."""
    setting = WARM if warm else COLD
    here = [o for o in observations if o.setting.machine == machine]
    same = [o for o in here if o.setting.setting == setting]
    fitted = None
    if len({o.model.name for o in here}) >= 2 or len(here) >= 3:
        try:
            fitted = fit(OUR_ENGINE, here, machine)
        except FeatureError:
            fitted = None
    non_weight = [o.total_s - o.steps_s.get("weight_fetch", 0.0) for o in same]
    overhead_s = (statistics.median(non_weight) if non_weight
                  else PRIOR_WARM_OVERHEAD_S if warm else PRIOR_OVERHEAD_S)
    out = []
    for source in SOURCES:
        is_there = source == "REMOTE" or bool(available.get(source, False))
        mine = [o for o in here if o.model.name == model.name and o.setting.weights_source == source]
        own = [o.total_s for o in mine if o.setting.setting == setting]
        if own:
            recent = own[-MEASURED_WINDOW:]
            out.append(ColdStartEstimate(source, statistics.median(recent), is_there,
                                         high_s=max(recent), basis=f"measured x{len(own)}"))
            continue
        if fitted is not None:
            try:
                p = fitted.predict(model, StartSetting(machine, setting, source, "none", 0))
            except FeatureError:
                pass
            else:
                out.append(ColdStartEstimate(source, p.total_s, is_there, high_s=p.high_s,
                                             basis="model"))
                continue
        ready = (overhead_s + PRIOR_SETUP_S[source]
                 + model.weight_bytes / PRIOR_BANDWIDTH_B_S[source])
        out.append(ColdStartEstimate(source, ready, is_there, high_s=2 * ready, basis="prior"))
    return out


def needs_estimates(held_here: Mapping[str, bool], prefer_peers: bool = False) -> bool:
    """Whether ``source_for_replica`` needs the function's computed estimates (pinned ones it
    always takes): not when this node's HOST tier holds the whole model and peers are not
    preferred, since HOST then wins whatever they say. A replica starting there skips the
    estimate (tens of ms on the events actor, on the start's path)."""
    return prefer_peers or not held_here.get("HOST", False)


def source_for_replica(estimates: Sequence[ColdStartEstimate], held_here: Mapping[str, bool],
                       prefer_peers: bool = False) -> str:
    """The source a starting replica loads from: the fastest available one, where HOST and DISK
    mean *its own* node's tiers (``held_here``: whether they hold the whole model). The policy
    compared the same estimates cluster-wide; the replica knows where it landed. Pinned estimates
    are taken as given; ``prefer_peers`` (``FAASCALE_PIPECAST_PREFER_PEERS``) picks PEER whenever
    a peer holds the model, unless pinned. "" without estimates, unless this node's HOST tier
    holds the model and peers are not preferred (the caller's old rule applies).

    A whole copy in this node's HOST tier beats every other source whatever the unpinned estimates
    say, so it is chosen even without them: it is mapped, zero copy; a peer's bytes land in this
    node's host memory and are then mapped as a HOST copy is, so PEER is the HOST path plus a
    transfer (and its only gain, serving through a pipeline before the model is all there, is
    moot when it is all there); DISK and REMOTE read the same bytes more slowly. Estimates fitted
    on few starts of small models can put another source a little under HOST by noise; this is
    not a question for them."""
    pinned = any(e.basis == PINNED for e in estimates)
    ests = [e if pinned or e.source not in ("HOST", "DISK")
            else dataclasses.replace(e, available=bool(held_here.get(e.source, False)))
            for e in estimates]
    if prefer_peers and not pinned and any(e.source == "PEER" and e.available for e in ests):
        return "PEER"
    if not pinned and held_here.get("HOST") and (ests or not prefer_peers):
        return "HOST"  # (preferring peers without estimates: whether one holds it is unknown)
    best = choose_source(ests)
    return best.source if best is not None else ""
