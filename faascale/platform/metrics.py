"""Prometheus metrics of the gateway (its own registry, so tests can read them in isolation)."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # the *_created series double the output and nobody graphs them

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# The ``function`` label of a request that names no deployed function: clients choose names, and
# a label value per made-up name would grow the series without bound.
UNKNOWN_FUNCTION = "_unknown"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("faascale_requests_total", "Requests by function, endpoint and "
                                "HTTP status", ["function", "endpoint", "code"], registry=r)
        self.ttft = Histogram("faascale_ttft_seconds", "Time to first token, at the gateway",
                              ["function"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("faascale_inter_token_seconds", "Time between streamed tokens",
                             ["function"], buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("faascale_request_seconds", "End-to-end request latency",
                             ["function"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.tokens = Counter("faascale_tokens_total", "Tokens by function and kind",
                              ["function", "kind"], registry=r)
        self.replicas = Gauge("faascale_replicas", "Replicas by function and state",
                              ["function", "state"], registry=r)
        self.scale_events = Counter("faascale_scale_events_total", "Scale intents by function, "
                                    "direction and reason", ["function", "direction", "reason"],
                                    registry=r)
        self.cold_start = Histogram("faascale_cold_start_seconds", "Replica start to ready",
                                    ["function"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.startup_step = Histogram("faascale_startup_step_seconds", "Replica start steps "
                                      "(StartupProfile spans) by function, step and weight source",
                                      ["function", "step", "source"], buckets=LATENCY_BUCKETS_S,
                                      registry=r)
        self.queue = Gauge("faascale_queue_length", "Requests at the gateway waiting for their "
                           "first token", ["function"], registry=r)
        self.in_flight = Gauge("faascale_in_flight_requests", "Requests in flight at the gateway",
                               ["function"], registry=r)

        self.tier_bytes = Gauge("faascale_tier_used_bytes", "Block bytes held per node and tier",
                                ["node", "tier"], registry=r)
        self.tier_capacity = Gauge("faascale_tier_capacity_bytes", "Tier capacity per node",
                                   ["node", "tier"], registry=r)
        self.tier_hits = Gauge("faascale_tier_hits", "Block fetches served per node and source "
                               "tier, since the node's store started", ["node", "tier"], registry=r)

        self.warm_idle = Gauge("faascale_warm_runtimes_idle", "Warm runtimes (pooled Ray workers "
                               "with torch and the engine imported) waiting per node", ["node"],
                               registry=r)
        self.warm_target = Gauge("faascale_warm_runtimes_target", "Warm runtimes each node keeps",
                                 ["node"], registry=r)
        self.warm_taken = Gauge("faascale_warm_runtimes_taken", "Warm runtimes that left a node's "
                                "pool (taken by a replica or another actor), since the platform "
                                "started", ["node"], registry=r)

        self.pipecast_blocks = Gauge("faascale_pipecast_blocks", "Blocks each PipeCast member "
                                     "(replica) holds, by function", ["function", "replica"],
                                     registry=r)
        self.pipecast_pipelines = Gauge("faascale_pipecast_pipelines", "Temporary pipelines "
                                        "serving now, by function", ["function"], registry=r)
        self.pipecast_bytes = Gauge("faascale_pipecast_bytes_moved", "Bytes PipeCast moved in the "
                                    "running and finished scale-outs kept", ["function"],
                                    registry=r)
        self.pipecast_serves = Gauge("faascale_pipecast_pipeline_serves", "Requests that made "
                                     "tokens through a temporary pipeline", ["function"],
                                     registry=r)

        self.metrics_age = Gauge("faascale_metrics_age_seconds", "Age of each view /metrics "
                                 "fetches from elsewhere (replicas, events, tiers, warm_pool, "
                                 "pipecast); +Inf: never fetched", ["source"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
