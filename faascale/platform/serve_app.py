"""Ray Serve side effects: one Serve application per function, its handle, its replica counts.

Everything Ray-Serve-specific the gateway needs goes through :class:`ServeBackend`, so the gateway
can be tested against a fake, and this module is tested for real against a local Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from ray import serve

from faascale.memory_tier.node import TierConfig
from faascale.platform import model_prep
from faascale.platform.autoscale import ScalingConfig
from faascale.platform.registry import FunctionRecord
from faascale.platform.replica import FunctionReplica
from faascale.platform.serve_policy import (ServerlessLLMPolicy, autoscaling_config,
                                            serve_default_autoscaling_config)
from faascale.platform.spec import FunctionSpec
from faascale.platform.vllm_replica import VllmReplica

log = logging.getLogger(__name__)
DEPLOYMENT = "replica"


def scaling_config(spec: FunctionSpec) -> ScalingConfig:
    s = spec.scaling
    return ScalingConfig(min_replicas=s.min_replicas, max_replicas=s.max_replicas,
                         target_ongoing_per_replica=float(spec.target_concurrency),
                         keep_alive_s=s.keep_alive_s, downscale_delay_s=s.downscale_delay_s,
                         slo_ttft_s=spec.slo.ttft_ms / 1000)


def _autoscaling(spec: FunctionSpec) -> Any:
    """The Serve autoscaling config of the function's ``scaling.policy``."""
    cfg = scaling_config(spec)
    if spec.scaling.policy == "serve":
        return serve_default_autoscaling_config(cfg)
    if spec.scaling.policy == "serverlessllm":
        return autoscaling_config(cfg, spec.name, policy_class=ServerlessLLMPolicy)
    return autoscaling_config(cfg, spec.name)


# What ``faascale scale`` changes: only the policy reads them (Serve's autoscaling config, a
# lightweight update), never a replica.
POLICY_ONLY_FIELDS = ("min_replicas", "max_replicas")


def replica_version(spec: FunctionSpec, model_dir: str, tiers: dict[str, Any] | None,
                    manifest_digest: str = "") -> str:
    """The deployment's code version: a hash of everything a replica is built from except
    ``POLICY_ONLY_FIELDS``. Without one ``serve.run`` makes a random version per deploy and rolls
    every replica over to it, so a scale 1 -> 3 stopped the serving replica and started three; with it
    a scale is a new target count, and anything a replica reads still replaces the replicas."""
    doc = spec.to_document()
    doc["scaling"] = {k: v for k, v in doc["scaling"].items() if k not in POLICY_ONLY_FIELDS}
    parts = [doc, spec.base_dir, model_dir, tiers] + ([manifest_digest] if manifest_digest else [])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# A retiring replica (scale-down, redeploy, delete) finishes its requests for up to this long
# before Serve kills it: 5 s cut 48-token answers on a 0.35-core node (they were 500s).
DRAIN_TIMEOUT_S = 60.0

# Serve builds its config models (a deployment's, and every one inside ``serve.status()``) by
# registering a module with cloudpickle's process-wide pickle-by-value set, pickling, and
# unregistering it. Two threads doing that at once make the second unregister raise ValueError
# ("... is not registered for pickle by value"): a `scale` failed with HTTP 500 while the
# gateway's poller read the counts. Every config construction in this process takes this lock.
_SERVE_CONFIG_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReplicaCounts:
    running: int
    starting: int
    stopping: int
    status: str  # the Serve application status: RUNNING, DEPLOYING, DEPLOY_FAILED, ...
    message: str = ""


class ServeBackend:
    """Deploys, updates and deletes functions as Serve applications named after the function.

    With ``tiers``, replicas load through their node's block store (HOST/DISK/REMOTE)."""

    def __init__(self, tiers: TierConfig | None = None) -> None:
        self.tiers = tiers

    def deploy(self, record: FunctionRecord) -> None:
        """Create or update the function's application; returns once Serve accepted it (with
        ``min_replicas: 0`` no replica starts). Blocking: call it from a worker thread."""
        app = self.application(record)
        model_prep.publish(record.name, record.model_dir)  # idle runtimes prepare it ahead
        serve.run(app, name=record.name, route_prefix=None)

    def application(self, record: FunctionRecord) -> Any:
        """The function's Serve application, built under the config lock."""
        spec = record.spec
        tiers = self.tiers.to_dict() if self.tiers else None
        with _SERVE_CONFIG_LOCK:
            replica_cls = VllmReplica if spec.engine.kind == "vllm" else FunctionReplica
            deployment = serve.deployment(replica_cls).options(
                name=DEPLOYMENT,
                autoscaling_config=_autoscaling(spec),
                max_ongoing_requests=2 * spec.target_concurrency,
                # The handler module is imported from the function's directory on the replica's
                # node (embedded: this machine; a cluster: a shared volume or the image). Serve's
                # config path accepts only remote URIs for working_dir, so it is not shipped.
                ray_actor_options={"num_cpus": spec.resources.num_cpus,
                                   "num_gpus": spec.resources.num_gpus},
                graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
                health_check_period_s=5,
            )
            # Serve 2.60 dropped ``options(version=...)`` but ``serve.run`` still reads the
            # deployment's ``_version`` (else a random one): the platform test of a 1 -> 3 scale
            # (``test_platform_warm.py``) fails if a Ray upgrade stops honouring it.
            deployment._version = replica_version(spec, record.model_dir, tiers,
                                                  record.manifest_digest)
            return deployment.bind(spec.to_document(), spec.base_dir, record.model_dir, tiers,
                                   record.manifest_digest)

    def delete(self, name: str) -> None:
        model_prep.unpublish(name)
        serve.delete(name, _blocking=False)

    def handle(self, name: str) -> Any:
        return serve.get_deployment_handle(DEPLOYMENT, app_name=name)

    def counts(self) -> dict[str, ReplicaCounts]:
        """Replica counts of every application, from one controller call."""
        out = {}
        with _SERVE_CONFIG_LOCK:
            status = serve.status()
        for name, app in status.applications.items():
            dep = app.deployments.get(DEPLOYMENT)
            states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
            out[name] = ReplicaCounts(running=states.get("RUNNING", 0),
                                      starting=states.get("STARTING", 0) + states.get("UPDATING", 0)
                                      + states.get("RECOVERING", 0),
                                      stopping=states.get("STOPPING", 0),
                                      status=str(getattr(app.status, "value", app.status)),
                                      message=app.message or (dep.message if dep else ""))
        return out
