"""The startup-latency model: per-step linear models on the features each step depends on.

Pure: typed inputs (``ModelFeatures``, ``StartSetting``, ``Observation``), numpy least squares, no
I/O. ``dataset.py`` reads the *Breaking the Ice* data format; ``profile.py`` turns our own
``StartupProfile``s into observations of our engine's steps.

A start is a sum of steps, and every step is a straight line in the features it really depends on,
fitted per machine (the ``group`` of an observation, e.g. a node name):

- **weights** (vLLM ``load_weights``, our ``weight_fetch``): bytes over the bandwidth of the source
  the weights come from, i.e. one slope per source (``disk``, ``pagecache``, our ``HOST``, ``DISK``,
  ``REMOTE``, ``PEER``) plus a per-source constant. Bytes, not parameter count: an MXFP4 expert
  is 4.25 bits, an MoE counts all its experts (``ModelFeatures.weight_bytes``).
- **torch.compile**: Dynamo's bytecode transform grows with the compiled graph's code size; a
  cache hit loads the compiled graphs (a line in the graph size), a miss compiles them (a steeper
  line), ``none`` (torch.compile off) has neither. Where the graph's size was not measured
  (``compiled_graph_kb`` 0, e.g. our own vLLM-CPU data), the number of decoder layers stands in for
  it: Dynamo traces every layer into the graph and Inductor generates code for each (on this
  machine's CPU starts, 15 s for 2 layers, 34-40 s for 10-12, 68-81 s for 24-32).
- **KV-cache profiling**: one forward pass over the batch-token budget through the decoder layers
  (a line in their parameters, ``ModelFeatures.body_params_b``: an MoE runs only its active
  experts; the LM head runs only for the rows sampled, not for every token), plus the sampler's
  warm-up over a batch of logits (a line in vocabulary x hidden size), each per compile mode: vLLM's
  CPU backend runs no profiling pass in eager mode, its GPU backend does.
- **CUDA-graph capture**: one capture per batch size per layer, a line in sizes × layers, per
  compile mode.
- **tokenizer**: a line in the size of ``tokenizer.json``.
- **bootstrap**, **model init**: constants per machine, with a per-setting offset (a campaign's
  Python environment or log level shifts them) shrunk towards the machine's constant by a ridge
  penalty, so a setting with few starts borrows from the others. Bootstrap also has a line in the
  tokenizer's size and one in the weight bytes: where a log does not state the tokenizer's time
  (stock vLLM; the paper's patch does) or the worker's processing of the weights after loading
  (vLLM-CPU's oneDNN repacking, logged by no line), they fall into the time no step covers, which
  ``vllm_data`` counts as bootstrap (the API server and the engine core each load the tokenizer:
  2.4 s for Qwen2's 151 k vocabulary against 1.3 s for a 32 k one per load here). On data where
  bootstrap holds neither, the fit gives those lines ~0.

``loo_by_model`` is the honest test: each model is predicted by a fit on the *other* models of its
machine only. ``compare_loo`` scores two designs (ours and the paper-style baseline) that way on
the same pooling of the observations (``pooled``: one fit per machine, or one per named setting)
and restricts both to the rows both could predict, so their ratio compares model forms only.
``FittedModel`` carries an uncertainty from that same procedure on its training
data (the 90th percentile of the relative leave-one-model-out errors), so an estimate says how
much to trust it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from faascale.coldstart.features import (MXFP4_BITS_PER_PARAM, FeatureError,  # noqa: F401
                                         ModelFeatures, StartSetting)

# How much an offset feature (a per-setting constant) is shrunk towards zero, in the units of the
# step (seconds). 1.0: a setting seen on one model moves halfway to that model's value.
RIDGE_OFFSET = 1.0
OFFSET_PREFIX = "setting="
UNCERTAINTY_QUANTILE = 0.9


@dataclass(frozen=True)
class Observation:
    """One measured start (or the mean of repeated ones): seconds per step (absent steps: 0)."""

    model: ModelFeatures
    setting: StartSetting
    steps_s: Mapping[str, float]

    @property
    def total_s(self) -> float:
        return float(sum(self.steps_s.values()))


Features = Callable[[ModelFeatures, StartSetting], "dict[str, float] | None"]


@dataclass(frozen=True)
class StepSpec:
    """A step and its design: ``features(model, setting)`` gives the regressors (named; a name
    starting with ``setting=`` is a ridge-shrunk offset), or None where the step does not run."""

    name: str
    features: Features


@dataclass(frozen=True)
class StartupModelSpec:
    """A family of steps (vLLM's or our engine's) and how they add up to the six reported steps."""

    name: str
    steps: tuple[StepSpec, ...]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)


# --- the designs -------------------------------------------------------------------------------

def _offset(setting: StartSetting) -> dict[str, float]:
    return {"1": 1.0, OFFSET_PREFIX + setting.setting: 1.0}


def _weights(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    return {f"1@{s.weights_source}": 1.0, f"gb@{s.weights_source}": m.weight_bytes / 1e9}


def _graph_size(m: ModelFeatures) -> dict[str, float]:
    """The compiled graph's size: measured (KB) where known, else its layer count."""
    if m.compiled_graph_kb > 0:
        return {"graph_kb": m.compiled_graph_kb}
    return {"layers": float(m.layers)}


def _dynamo(m: ModelFeatures, s: StartSetting) -> dict[str, float] | None:
    return None if s.compile_cache == "none" else {"1": 1.0, **_graph_size(m)}


def _graph_load(m: ModelFeatures, s: StartSetting) -> dict[str, float] | None:
    return {"1": 1.0, **_graph_size(m)} if s.compile_cache == "hit" else None


def _graph_compile(m: ModelFeatures, s: StartSetting) -> dict[str, float] | None:
    return {"1": 1.0, **_graph_size(m)} if s.compile_cache == "miss" else None


def _bootstrap(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    return {**_offset(s), "tokenizer_mb": m.tokenizer_mb, "gb": m.weight_bytes / 1e9}


def _compiled(s: StartSetting) -> str:
    return "eager" if s.compile_cache == "none" else "compiled"


def _kv_profile(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    mode = _compiled(s)
    return {f"1@{mode}": 1.0, f"body_b@{mode}": m.body_params_b,
            f"vocab_hidden_b@{mode}": m.vocab_hidden_b}


def _capture(m: ModelFeatures, s: StartSetting) -> dict[str, float] | None:
    if s.capture_sizes <= 0:
        return None
    mode = _compiled(s)
    return {f"1@{mode}": 1.0, "graphs": s.capture_sizes * m.layers / 1000,
            "graph_b": s.capture_sizes * m.active_params_b / 100}


def _tokenizer(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    return {"1": 1.0, "tokenizer_mb": m.tokenizer_mb}


def _constant(m: ModelFeatures, s: StartSetting) -> dict[str, float]:
    return {"1": 1.0}


VLLM = StartupModelSpec(
    name="vllm",
    steps=(
        StepSpec("framework_bootstrap", _bootstrap),
        StepSpec("tokenizer_init", _tokenizer),
        StepSpec("model_init", _constant),
        StepSpec("load_weights", _weights),
        StepSpec("dynamo_transform_time", _dynamo),
        StepSpec("graph_compile_cached", _graph_load),
        StepSpec("graph_compile_general_shape", _graph_compile),
        StepSpec("kv_cache_profiling", _kv_profile),
        StepSpec("graph_capturing", _capture),
    ),
    # The six steps of Breaking the Ice (and of ``vllm_log.STEPS``).
    groups={
        "bootstrap": ("framework_bootstrap",),
        "tokenizer": ("tokenizer_init",),
        "model_loading": ("model_init", "load_weights"),
        "torch_compile": ("dynamo_transform_time", "graph_compile_cached",
                          "graph_compile_general_shape"),
        "kv_cache": ("kv_cache_profiling",),
        "cuda_graphs": ("graph_capturing",),
    },
)


def _paper_line(feature: Callable[[ModelFeatures], float], when: Callable[[StartSetting], bool]
                = lambda s: True) -> Features:
    return lambda m, s: {"1": 1.0, "x": feature(m)} if when(s) else None


# The paper's released predictor (``predictor/train_predictor.py`` of upb-cn/vllm-startup-profiler,
# read, not copied): one straight line per step on one feature each, parameter count (not bytes)
# for weights and KV profiling, size × batch for capture, constants for bootstrap and model init.
# Refitted here the same way as ours; the compile-miss line (absent from the paper's predictor,
# which only saw cache hits) is added on the graph size so a miss scenario is not a free loss, and
# where the graph size was not measured its lines take the layer count, as ours do (a gap in the
# data, not a difference of model form).
def _paper_graph(when: Callable[[StartSetting], bool]) -> Features:
    return lambda m, s: {"1": 1.0, **_graph_size(m)} if when(s) else None


PAPER_BASELINE = StartupModelSpec(
    name="paper-linear",
    steps=(
        StepSpec("framework_bootstrap", _constant),
        StepSpec("tokenizer_init", _paper_line(lambda m: m.tokenizer_mb)),
        StepSpec("model_init", _constant),
        StepSpec("load_weights", _paper_line(lambda m: m.params_b)),
        StepSpec("dynamo_transform_time", _paper_graph(lambda s: s.compile_cache != "none")),
        StepSpec("graph_compile_cached", _paper_graph(lambda s: s.compile_cache == "hit")),
        StepSpec("graph_compile_general_shape", _paper_graph(lambda s: s.compile_cache == "miss")),
        StepSpec("kv_cache_profiling", _paper_line(lambda m: m.params_b)),
        StepSpec("graph_capturing", _paper_line(lambda m: m.params_b * 67,
                                                lambda s: s.capture_sizes > 0)),
    ),
    groups=VLLM.groups,
)


# --- fitting -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepFit:
    coefficients: Mapping[str, float]

    def predict(self, regressors: Mapping[str, float] | None) -> float:
        if regressors is None:
            return 0.0
        # A feature never seen in training (a new weight source) has no coefficient: its
        # contribution is unknown, not zero; ``FittedModel.predict`` refuses it first.
        return max(0.0, float(sum(self.coefficients.get(k, 0.0) * v for k, v in regressors.items())))


@dataclass(frozen=True)
class Prediction:
    """Seconds per step, their total, and a 90 % band from leave-one-model-out errors."""

    model: str
    machine: str
    setting: str
    steps_s: Mapping[str, float]
    groups_s: Mapping[str, float]
    total_s: float
    low_s: float
    high_s: float


@dataclass(frozen=True)
class FittedModel:
    """Per-step fits for one machine, from ``fit``; ``rel_error`` is the LOO-by-model spread."""

    spec: StartupModelSpec
    machine: str
    steps: Mapping[str, StepFit]
    known: frozenset[str]
    models: tuple[str, ...]
    rel_error: float = 0.0

    def predict(self, model: ModelFeatures, setting: StartSetting) -> Prediction:
        steps_s: dict[str, float] = {}
        for step in self.spec.steps:
            regressors = step.features(model, setting)
            unknown = [k for k in (regressors or {}) if k not in self.known
                       and not k.startswith(OFFSET_PREFIX)]
            if unknown:
                raise FeatureError(
                    f"{model.name} on {setting.machine}/{setting.setting}: step {step.name} needs "
                    f"{', '.join(sorted(unknown))}, which no fitted start on {self.machine} had "
                    "(e.g. a weights source never measured there)")
            steps_s[step.name] = self.steps[step.name].predict(regressors)
        total = float(sum(steps_s.values()))
        groups = {g: float(sum(steps_s.get(s, 0.0) for s in members))
                  for g, members in self.spec.groups.items()}
        return Prediction(model=model.name, machine=setting.machine, setting=setting.setting,
                          steps_s=steps_s, groups_s=groups, total_s=total,
                          low_s=total * max(0.0, 1 - self.rel_error),
                          high_s=total * (1 + self.rel_error))


def _design(step: StepSpec, observations: Sequence[Observation]
            ) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = [(step.features(o.model, o.setting), float(o.steps_s.get(step.name, 0.0)))
            for o in observations]
    rows = [(r, y) for r, y in rows if r is not None]
    names = sorted({k for r, _ in rows for k in r})
    x = np.array([[r.get(n, 0.0) for n in names] for r, _ in rows], dtype=float)
    y = np.array([y for _, y in rows], dtype=float)
    return names, x.reshape(len(rows), len(names)), y


def fit_step(step: StepSpec, observations: Sequence[Observation]) -> StepFit:
    """Least squares with a ridge penalty on the ``setting=`` offsets only."""
    names, x, y = _design(step, observations)
    if not names or not len(y):
        return StepFit({})
    penalties = [np.eye(len(names))[i] * RIDGE_OFFSET
                 for i, n in enumerate(names) if n.startswith(OFFSET_PREFIX)]
    if penalties:
        x = np.vstack([x, np.array(penalties)])
        y = np.concatenate([y, np.zeros(len(penalties))])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return StepFit(dict(zip(names, (float(c) for c in coef))))


def fit(spec: StartupModelSpec, observations: Sequence[Observation], machine: str | None = None,
        *, with_uncertainty: bool = True) -> FittedModel:
    """Fit every step of ``spec`` on the observations of one machine (all given, if None)."""
    obs = [o for o in observations if machine is None or o.setting.machine == machine]
    if not obs:
        raise FeatureError(f"no observations for machine {machine!r}")
    known: set[str] = set()
    for step in spec.steps:
        for o in obs:
            known.update(k for k in (step.features(o.model, o.setting) or {})
                         if not k.startswith(OFFSET_PREFIX))
    fitted = FittedModel(spec=spec, machine=machine or obs[0].setting.machine,
                         steps={s.name: fit_step(s, obs) for s in spec.steps},
                         known=frozenset(known),
                         models=tuple(sorted({o.model.name for o in obs})))
    if with_uncertainty and len(fitted.models) >= 3:
        errors = [abs(p.total_s - o.total_s) / o.total_s
                  for o, p in loo_by_model(spec, obs) if o.total_s > 0]
        if errors:
            fitted = replace(fitted, rel_error=float(np.quantile(errors, UNCERTAINTY_QUANTILE)))
    return fitted


def fit_machines(spec: StartupModelSpec, observations: Sequence[Observation]
                 ) -> dict[str, FittedModel]:
    """One fit per machine."""
    machines = sorted({o.setting.machine for o in observations})
    return {m: fit(spec, observations, m) for m in machines}


def loo_by_model(spec: StartupModelSpec, observations: Sequence[Observation],
                 evaluate: Callable[[Observation], bool] = lambda o: True
                 ) -> list[tuple[Observation, Prediction]]:
    """Leave one model out, per machine: each observation (that ``evaluate`` selects) is
    predicted by a fit on the same machine's observations of *other* models. Observations whose
    features the reduced fit never saw (the only model measured from some source) are skipped."""
    out = []
    by_key: dict[tuple[str, str], list[Observation]] = {}
    for o in observations:
        by_key.setdefault((o.setting.machine, o.model.name), []).append(o)
    for (machine, model), held in sorted(by_key.items()):
        chosen = [o for o in held if evaluate(o)]
        train = [o for o in observations
                 if o.setting.machine == machine and o.model.name != model]
        if not chosen or not train:
            continue
        fitted = fit(spec, train, machine, with_uncertainty=False)
        for o in chosen:
            try:
                out.append((o, fitted.predict(o.model, o.setting)))
            except FeatureError:
                continue
    return out


POOLINGS = ("machine", "setting")


def pooled(observations: Sequence[Observation], pooling: str) -> list[Observation]:
    """The observations with their fit group set by ``pooling``: ``machine`` (one fit per machine
    over all its settings: how the platform and ``coldstart predict`` fit) or ``setting`` (one fit
    per named setting, e.g. one measurement campaign, as the paper fits its predictor)."""
    if pooling == "machine":
        return list(observations)
    if pooling == "setting":
        return [replace(o, setting=replace(o.setting, machine=o.setting.setting))
                for o in observations]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


Pairs = tuple[tuple[Observation, Prediction], ...]


@dataclass(frozen=True)
class Comparison:
    """Two designs' leave-one-model-out predictions on one pooling. ``ours``/``baseline``: every
    row each could predict; ``ours_common``/``baseline_common``: the rows both predicted, in the
    same order. The observations are the caller's (not the re-pooled copies)."""

    pooling: str
    ours: Pairs
    baseline: Pairs
    ours_common: Pairs
    baseline_common: Pairs

    @property
    def mape_ratio(self) -> float:
        """Ours ÷ baseline MAPE on the common rows (< 1: ours is better)."""
        a, b = accuracy(self.ours_common), accuracy(self.baseline_common)
        return a.mape_pct / b.mape_pct if b.mape_pct > 0 else math.nan


def compare_loo(ours: StartupModelSpec, baseline: StartupModelSpec,
                observations: Sequence[Observation], pooling: str = "machine") -> Comparison:
    """``loo_by_model`` for both designs on the same ``pooled`` observations."""
    obs = list(observations)
    groups = pooled(obs, pooling)
    index = {id(o): i for i, o in enumerate(groups)}

    def scored(spec: StartupModelSpec) -> dict[int, Prediction]:
        return {index[id(o)]: p for o, p in loo_by_model(spec, groups)}

    a, b = scored(ours), scored(baseline)
    common = sorted(a.keys() & b.keys())
    return Comparison(pooling=pooling,
                      ours=tuple((obs[i], a[i]) for i in sorted(a)),
                      baseline=tuple((obs[i], b[i]) for i in sorted(b)),
                      ours_common=tuple((obs[i], a[i]) for i in common),
                      baseline_common=tuple((obs[i], b[i]) for i in common))


@dataclass(frozen=True)
class Accuracy:
    n: int
    mape_pct: float
    mae_s: float
    max_ape_pct: float


def accuracy(pairs: Iterable[tuple[Observation, Prediction]]) -> Accuracy:
    """MAPE and MAE of predicted vs measured totals."""
    pairs = [(o.total_s, p.total_s) for o, p in pairs if o.total_s > 0]
    if not pairs:
        return Accuracy(0, math.nan, math.nan, math.nan)
    ape = [abs(p - y) / y * 100 for y, p in pairs]
    return Accuracy(n=len(pairs), mape_pct=float(np.mean(ape)),
                    mae_s=float(np.mean([abs(p - y) for y, p in pairs])), max_ape_pct=max(ape))
