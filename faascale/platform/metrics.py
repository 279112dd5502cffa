"""Prometheus metrics of the gateway (its own registry, so tests can read them in isolation).

Beside faascale's own names, the gateway exports the request metrics under vLLM's names and
labels (``vllm:...{model_name}``; ``VllmMetrics``), which KEDA scalers, inference-perf and
Dynamo's planner read from vLLM servers: the same series, measured at the gateway.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # the *_created series double the output and nobody graphs them

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# The ``function`` label of a request that names no deployed function: clients choose names, and
# a label value per made-up name would grow the series without bound.
UNKNOWN_FUNCTION = "_unknown"


REQUEST_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class VllmMetrics:
    """vLLM's request metrics (v1 engine names, ``model_name`` = the function), measured at the
    gateway: running = requests that have their first token and are not done, waiting = requests
    still waiting for it (queued at the gateway or in a replica, or a replica still starting)."""

    def __init__(self, r: CollectorRegistry) -> None:
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating tokens", label,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for their first "
                             "token", label, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", label,
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens",
                             label, buckets=TOKEN_BUCKETS_S, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Per request: (end-to-end "
                              "- first token) / (output tokens - 1)", label,
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency",
                             label, buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", label,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens "
                                         "processed", label, registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per "
                                        "request", label, buckets=REQUEST_TOKEN_BUCKETS,
                                        registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generation "
                                            "tokens per request", label,
                                            buckets=REQUEST_TOKEN_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=r)

    def finished(self, name: str, item: dict[str, Any]) -> None:
        """One choice's last item (its token counts and finish reason)."""
        prompt, generated = int(item["num_prompt_tokens"]), int(item["num_output_tokens"])
        self.prompt_tokens.labels(name).inc(prompt)
        self.generation_tokens.labels(name).inc(generated)
        self.request_prompt.labels(name).observe(prompt)
        self.request_generation.labels(name).observe(generated)
        self.success.labels(name, str(item.get("finish_reason") or "stop")).inc()


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
        self.tier_no_room = Gauge("faascale_tier_no_room_blocks", "Blocks whose tier's file "
                                  "system had no room (ENOSPC), per node, since its store "
                                  "started: HOST's went to DISK, DISK's were refused (a start "
                                  "failed with a 503)", ["node", "tier"], registry=r)

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

        self.vllm = VllmMetrics(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
