"""Cold-start estimates for our engine (pure): measured starts first, then the fitted model, then
the prior; which sources are available; the packed model's features."""

from __future__ import annotations

from pathlib import Path

import pytest

from faascale.coldstart.estimate import (OUR_ENGINE, PRIOR_BANDWIDTH_B_S, PRIOR_SETUP_S, PRIOR_WARM_OVERHEAD_S,
                                         engine_features, engine_observation, estimates_for, manifest_features,
                                         needs_estimates, source_for_replica)
from faascale.coldstart.model import ModelFeatures, fit, loo_by_model, accuracy
from faascale.coldstart.start_source import ColdStartEstimate, choose_source
from faascale.engine.checkpoint import read_manifest

GB = 1e9
STEPS_FIXED = {"process": 1.0, "imports": 0.8, "spec_tokenizer": 0.1, "materialize": 0.2,
               "kv_cache": 0.05, "warmup": 0.3}
BW = {"HOST": 4.0, "DISK": 1.0, "REMOTE": 0.25}  # GB/s on this "machine"


def model(name: str, gb: float, layers: int = 24) -> ModelFeatures:
    return ModelFeatures(name=name, params_b=gb / 2, layers=layers, hidden_size=1024,
                         vocab_size=32000, tokenizer_mb=2.0, weight_bytes_override=gb * GB)


def start(m: ModelFeatures, source: str, machine: str = "box") -> object:
    steps = dict(STEPS_FIXED, materialize=0.1 + 0.1 * m.weight_bytes / GB,
                 weight_fetch=0.05 + m.weight_bytes / GB / BW[source])
    return engine_observation(m, machine, source, steps)


def test_measured_starts_win_then_the_model_then_the_prior() -> None:
    small, mid, big = model("small", 0.3), model("mid", 1.0, 30), model("big", 2.0, 32)
    obs = [start(m, s) for m in (small, mid, big) for s in ("HOST", "DISK")]
    obs.append(start(small, "REMOTE"))
    obs.append(start(big, "REMOTE"))
    by = {e.source: e for e in estimates_for(mid, "box", obs, {"HOST": True, "PEER": False})}
    # mid was measured from HOST and DISK: the median of its own starts.
    assert by["HOST"].basis == "measured x1"
    assert by["HOST"].ready_s == pytest.approx(start(mid, "HOST").total_s)
    # Never measured from REMOTE, but other models were: the fitted model predicts it.
    assert by["REMOTE"].basis == "model"
    assert by["REMOTE"].ready_s == pytest.approx(start(mid, "REMOTE").total_s, rel=0.05)
    # Nobody was ever started from a peer: the prior (bytes over a 1 Gbit/s link + overhead).
    assert by["PEER"].basis == "prior"
    assert by["PEER"].ready_s > 1.0 * GB / PRIOR_BANDWIDTH_B_S["PEER"]
    # Availability: what the caller says, REMOTE always; the choice is the fastest available.
    assert (by["HOST"].available, by["DISK"].available, by["PEER"].available,
            by["REMOTE"].available) == (True, False, False, True)
    assert choose_source(list(by.values())).source == "HOST"


def test_without_any_start_everything_is_prior_and_ordered_by_bandwidth() -> None:
    ests = estimates_for(model("m", 1.0), "box", [], {"HOST": True, "DISK": True, "PEER": True})
    assert [e.basis for e in ests] == ["prior"] * 4
    ready = {e.source: e.ready_s for e in ests}
    assert ready["HOST"] < ready["PEER"] < ready["DISK"] < ready["REMOTE"]


def test_our_engine_model_generalizes_to_a_model_it_did_not_see() -> None:
    models = [model(f"m{i}", gb, layers) for i, (gb, layers) in
              enumerate([(0.1, 8), (0.3, 16), (0.6, 24), (1.0, 30), (2.0, 32)])]
    obs = [start(m, s) for m in models for s in ("HOST", "DISK", "REMOTE")]
    acc = accuracy(loo_by_model(OUR_ENGINE, obs))
    assert acc.n == len(obs) and acc.mape_pct < 2.0, acc
    fitted = fit(OUR_ENGINE, obs, "box")
    assert 1 / fitted.steps["weight_fetch"].coefficients["gb@REMOTE"] == pytest.approx(0.25, rel=0.02)


def test_features_from_a_profile_dict_and_from_a_packed_manifest(tiny_packed: Path) -> None:
    f = engine_features("id", {"params": 135e6, "weight_bytes": 540e6, "layers": 30,
                               "hidden_size": 576, "vocab_size": 49152, "tokenizer_bytes": 2.1e6})
    assert (f.params_b, f.weight_bytes, f.layers, f.tokenizer_mb) == (0.135, 540e6, 30, 2.1)
    with pytest.raises(ValueError, match="neither"):
        engine_features("id", {"layers": 2})
    manifest = read_manifest(tiny_packed)
    m = manifest_features(manifest, 1000)
    assert m.weight_bytes == manifest.total_bytes
    assert m.layers == manifest.config.num_layers and m.name == manifest.model_id


def test_a_replica_judges_host_and_disk_by_its_own_node() -> None:
    ests = [ColdStartEstimate("HOST", 0.5), ColdStartEstimate("DISK", 2.0),
            ColdStartEstimate("PEER", 1.5), ColdStartEstimate("REMOTE", 6.0)]
    # The policy saw HOST somewhere; this node holds nothing: the peers win here.
    assert source_for_replica(ests, {"HOST": False, "DISK": False}) == "PEER"
    assert source_for_replica(ests, {"HOST": True, "DISK": True}) == "HOST"
    no_peer = [e if e.source != "PEER" else ColdStartEstimate("PEER", 1.5, available=False)
               for e in ests]
    assert source_for_replica(no_peer, {"HOST": False, "DISK": True}) == "DISK"
    # "Prefer peers" takes PEER whenever a peer holds the model...
    assert source_for_replica(ests, {"HOST": True}, prefer_peers=True) == "PEER"
    # ...but pinned estimates are taken as given (HOST pinned available stays so).
    pinned = [ColdStartEstimate("REMOTE", 0.1, basis="pinned"),
              ColdStartEstimate("PEER", 9.0, basis="pinned")]
    assert source_for_replica(pinned, {}, prefer_peers=True) == "REMOTE"
    # Without estimates: "" (the replica's old rule), unless this node's HOST holds the model,
    # which wins without them; so a replica there asks only for pins.
    assert source_for_replica([], {"HOST": False, "DISK": True}) == ""
    assert source_for_replica([], {"HOST": True}) == "HOST"
    assert source_for_replica([], {"HOST": True}, prefer_peers=True) == ""  # a peer? unknown
    assert not needs_estimates({"HOST": True, "DISK": False})
    assert needs_estimates({"HOST": True}, prefer_peers=True)
    assert needs_estimates({"HOST": False, "DISK": True}) and needs_estimates({})
    # A pin still decides where HOST holds it.
    assert source_for_replica(pinned, {"HOST": True}) == "REMOTE"
    # A whole copy in this node's HOST tier beats a peer even where an estimate says otherwise
    # (a peer's bytes come into host memory and are then mapped as HOST's are)...
    peer_low = [ColdStartEstimate("HOST", 1.2, basis="model"),
                ColdStartEstimate("PEER", 1.1, basis="model"), ColdStartEstimate("REMOTE", 3.0)]
    assert source_for_replica(peer_low, {"HOST": True, "DISK": False}) == "HOST"
    # ...and DISK or REMOTE, which read the same bytes more slowly, whatever noise says...
    disk_low = [ColdStartEstimate("HOST", 1.2), ColdStartEstimate("DISK", 1.1),
                ColdStartEstimate("REMOTE", 1.0)]
    assert source_for_replica(disk_low, {"HOST": True, "DISK": True}) == "HOST"
    # ...but not a DISK copy, which a fast link may beat, nor a HOST copy on another node
    assert source_for_replica(peer_low, {"HOST": False, "DISK": True}) == "PEER"
    disk_slow = [ColdStartEstimate("DISK", 4.0), ColdStartEstimate("PEER", 1.5),
                 ColdStartEstimate("REMOTE", 6.0)]
    assert source_for_replica(disk_slow, {"HOST": False, "DISK": True}) == "PEER"


def test_warm_and_cold_starts_are_estimated_apart() -> None:
    """A start on a warm runtime has no process, imports or kernel warm-up: the estimate for the
    next start follows whether the pool has a runtime (measured warm starts, else the fit's
    warm offset, else the warm prior), and cold estimates never use warm starts."""
    def at(m: ModelFeatures, source: str, warm: bool) -> object:
        steps = dict(STEPS_FIXED, materialize=0.1, weight_fetch=m.weight_bytes / GB / BW[source])
        if warm:
            steps.update(process=0.0, imports=0.0)
        return engine_observation(m, "box", source, steps, warm=warm)

    small, mid = model("small", 0.3), model("mid", 1.0, 30)
    obs = [at(mid, "HOST", False), at(mid, "HOST", True)]
    warm = {e.source: e for e in estimates_for(mid, "box", obs, {"HOST": True}, warm=True)}
    cold = {e.source: e for e in estimates_for(mid, "box", obs, {"HOST": True}, warm=False)}
    assert warm["HOST"].ready_s == pytest.approx(at(mid, "HOST", True).total_s)
    assert cold["HOST"].ready_s == pytest.approx(at(mid, "HOST", False).total_s)
    assert cold["HOST"].ready_s - warm["HOST"].ready_s == pytest.approx(
        STEPS_FIXED["process"] + STEPS_FIXED["imports"])
    # Only cold starts measured: a warm estimate does not reuse them; with a fit it predicts
    # them with the warm offset (here never seen, so the shrunk pooled value), else the prior.
    only_cold = [at(m, s, False) for m in (small, mid) for s in ("HOST", "DISK")]
    w = {e.source: e for e in estimates_for(mid, "box", only_cold, {"HOST": True}, warm=True)}
    assert w["HOST"].basis == "model"
    prior = {e.source: e for e in estimates_for(mid, "box", [], {"HOST": True}, warm=True)}
    assert prior["HOST"].ready_s == pytest.approx(
        PRIOR_WARM_OVERHEAD_S + mid.weight_bytes / PRIOR_BANDWIDTH_B_S["HOST"])


def test_one_measured_host_start_of_a_small_model_does_not_hand_the_next_start_to_peers() -> None:
    """The next replica of a tiny model, after one warm start from HOST was measured: HOST's
    estimate is that start (with its real, if small, fetch setup); PEER's is the prior over the
    same non-weight steps. Without the peers' setup in the prior, PEER came out faster (its bytes
    take microseconds) and a scale-out 1 -> 3 sent its second new replica through PipeCast."""
    tiny = model("tiny", 0.0002, 2)
    steps = dict(STEPS_FIXED, process=0.0, imports=0.0, weight_fetch=0.03)
    obs = [engine_observation(tiny, "box", "HOST", steps, warm=True)]
    by = {e.source: e for e in estimates_for(tiny, "box", obs, {"HOST": True, "PEER": True},
                                             warm=True)}
    assert by["HOST"].basis == "measured x1" and by["PEER"].basis == "prior"
    assert by["PEER"].ready_s == pytest.approx(
        obs[0].total_s - 0.03 + PRIOR_SETUP_S["PEER"] + tiny.weight_bytes / PRIOR_BANDWIDTH_B_S["PEER"])
    assert source_for_replica(list(by.values()), {"HOST": True}) == "HOST"
    # Where this node lacks it, a 200 kB download beats a PipeCast join (for 1 GB the peers win:
    # the ordering test above).
    assert source_for_replica(list(by.values()), {"HOST": False}) == "REMOTE"
