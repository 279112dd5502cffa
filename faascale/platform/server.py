"""The platform process: Ray (embedded or joined), Serve, the events sink, the gateway.

``faascale up`` starts this as a daemon (``python -m faascale.platform.server``); ``faascale down``
sends it SIGTERM, and it shuts down Serve and the Ray instance it started. On start it redeploys
every function in the registry, so a restart loses nothing. It holds its state directory's lock
(``instance.py``) for its whole life and removes, at exit, only the directories it marked as its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from faascale.platform.instance import (Holder, PlatformLock, PlatformLockError, claim_dirs,
                                        remove_owned)
from faascale.platform.state import PlatformInfo, StateDir, platform_url

log = logging.getLogger("faascale.platform")


def export_vllm_python(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Where ``engine.kind: vllm`` replicas find vLLM: ``FAASCALE_VLLM_PYTHON``, else the
    ``.venv-vllm`` (``make vllm-env``) in the directory the platform started from, exported as
    an absolute path for the Ray workers; None when neither exists (such a deploy's replicas
    then fail to start, saying how to install it)."""
    from faascale.coldstart.vllm_run import PYTHON_ENV, VllmRunError, resolve_python

    try:
        environ[PYTHON_ENV] = os.path.abspath(resolve_python(None, environ))
    except VllmRunError:
        return None
    return environ[PYTHON_ENV]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_logs(function: str, tail: int) -> list[str]:
    """The last ``tail`` lines of this function's Serve replica logs on this node."""
    import ray

    try:
        logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    except AttributeError:  # not connected, or Ray moved the accessor
        logs_dir = Path("/tmp/ray/session_latest/logs/serve")
    lines: list[str] = []
    for f in sorted(logs_dir.glob(f"replica_{function}_*.log"), key=lambda p: p.stat().st_mtime):
        lines.extend(f"[{f.stem.split('_')[-1]}] {line}" for line in
                     f.read_text(errors="replace").splitlines()[-tail:])
    return lines[-tail:]


NODE_SCAN_S = 10.0  # how often the platform looks for new nodes to give a block store


_STOPPING = threading.Event()  # set when the platform shuts down: start no more block stores
RAY_EXIT_S = 10.0  # how long a shutdown waits for the Ray processes it started to exit


def _keep_node_blocks(tiers: Any) -> None:
    """Every node gets its block store before a replica needs it: now, and as nodes join."""
    from faascale.memory_tier.node import start_node_blocks

    while not _STOPPING.is_set():
        try:
            started = start_node_blocks(tiers)
            if started:
                log.info("started block stores on %d node(s)", len(started))
        except Exception:  # noqa: BLE001 - Ray busy or shutting down: try again later
            log.debug("node scan failed", exc_info=True)
        _STOPPING.wait(NODE_SCAN_S)


def _shutdown_ray(ray: Any) -> None:
    """``ray.shutdown()``, then wait (up to ``RAY_EXIT_S``) until every process this one started
    (the local Ray's raylet and workers) has exited: a block-store actor still starting creates
    its tier directory, which must not reappear after the platform removed it."""
    import psutil

    try:
        ours = psutil.Process().children(recursive=True)
    except psutil.Error:
        ours = []
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=RAY_EXIT_S)
    if alive:
        log.warning("%d Ray process(es) still running after %.0f s: %s", len(alive), RAY_EXIT_S,
                    [p.pid for p in alive])


WARM_REPORT_S = 5.0  # how often the warm pool's idle count is sent again to the events actor


def _report_warm_idle(sink: Any, warm: Any) -> None:
    """The pool reports its idle count when it changes; a restarted events actor starts from 0,
    so the count is sent again every ``WARM_REPORT_S``."""
    from faascale.platform.warm_pool import summary

    while True:
        time.sleep(WARM_REPORT_S)
        try:
            sink.set_warm_pool.remote(summary(warm.status())["idle"])
        except Exception:  # noqa: BLE001 - Ray busy or shutting down: next time
            log.debug("warm pool report failed", exc_info=True)


# Ray Serve's own latency on a new replica's path, read by Serve where it is imported (this
# process: the routers behind the gateway's handles; Ray's workers inherit it: the controller).
# Serve's defaults are a 0.1 s control loop, and a router whose replicas are all busy retries
# after up to 0.5 s without waking up for a new one. A warm start crosses the loop three times
# (the policy's decision, the actor's allocation, its initialisation). benchmarks/replica_start.py
# --quick, 4 runs each on a loaded 2-core machine: warm fixed part median 0.50 s with Serve's
# defaults, 0.46 s at 0.05 s, 0.37 s at 0.02 s (the spreads overlap: 0.39-0.56, 0.40-0.51,
# 0.21-0.86); first token not moved beyond the noise. The controller's CPU when idle: 3.9 %,
# 6.0 % and 11.3 % of a core. Set either variable to override; on a cluster set them where the
# head's Ray starts (docker-compose.yml does).
SERVE_LATENCY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.05",
                     "RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.05"}


def run(lock: PlatformLock, host: str, port: int, address: str | None) -> None:
    """Serve until SIGTERM, holding ``lock`` (its state directory's, taken by the caller before
    anything else there was read or written)."""
    state = lock.state.ensure()
    me = Holder.new(platform_url(host, port))
    lock.write(me)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in SERVE_LATENCY_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    import uvicorn
    from ray import serve

    from faascale.engine.sources import resolve_packed
    from faascale.memory_tier.node import TierConfig, all_node_stats, split_location
    from faascale.memory_tier.packed import read_packed_metadata_digest, upload_packed
    from faascale.memory_tier.store import open_store
    from faascale.platform.auth import load_or_create_tokens, metrics_token_from_env
    from faascale.platform.events import report, start_event_sink
    from faascale.platform.pipecast_actor import start_pipecast
    from faascale.platform.gateway import create_app
    from faascale.platform.gateway_context import GatewayContext
    from faascale.platform.registry import Registry
    from faascale.platform.serve_app import ServeBackend
    from faascale.platform.vllm_replica import hf_cache_dir
    from faascale.platform.warm_pool import WarmPool, ray_system_config, setting_from_env

    tokens = load_or_create_tokens(state.tokens_file)
    metrics_token = metrics_token_from_env()  # a bad one fails here, before Ray starts
    registry = Registry(state.registry_db)
    pool_setting = setting_from_env()
    export_vllm_python()  # engine.kind: vllm replicas (Ray workers inherit this environment)
    if address:  # the head's --system-config decides the preload (warm_pool.head_system_config_args)
        ray.init(address=address, namespace="faascale", log_to_driver=False)
    else:  # embedded: a local Ray instance owned by this process (Ray's token auth stays on)
        ray.init(address="local", namespace="faascale", include_dashboard=False,
                 log_to_driver=False, _system_config=ray_system_config(pool_setting))
    serve.start(proxy_location="HeadOnly",
                http_options={"host": "127.0.0.1", "port": free_port()})
    sink = start_event_sink(state.registry_db)
    warm = WarmPool(pool_setting, on_idle_change=lambda n: sink.set_warm_pool.remote(n)).start()
    pipecast = start_pipecast(loopback=address is None)  # embedded: PipeCast on 127.0.0.1
    tiers = TierConfig.for_state_dir(state.root)
    # The HOST tier lives in shared memory (RAM), beside the replicas' PipeCast and private
    # directories: marked as this instance's before any is written, removed at exit.
    me = replace(me, dirs=(tiers.host_dir, f"{tiers.host_dir}-pipecast",
                           f"{tiers.host_dir}-private", str(hf_cache_dir(tiers))))
    claim_dirs(me, state)
    lock.write(me)
    if pipecast is not None:  # every node's complete tier copies join PipeCast as sources
        from faascale.platform.tier_sources import COMPANION

        tiers = replace(tiers, companion=COMPANION)
    backend = ServeBackend(tiers)
    threading.Thread(target=_keep_node_blocks, args=(tiers,), daemon=True,
                     name="node-blocks").start()
    if warm.enabled:
        threading.Thread(target=_report_warm_idle, args=(sink, warm), daemon=True,
                         name="warm-report").start()
    for record in registry.list():
        try:
            backend.deploy(record)
            log.info("restored function %s", record.name)
        except Exception:
            log.exception("could not restore function %s", record.name)

    bucket = os.environ.get("FAASCALE_S3_BUCKET")

    def resolve_model(spec: Any) -> tuple[str, str, str]:
        """Where the function's packed model lives for replicas: an ``s3://`` source as is; else
        packed once locally, then uploaded to S3 when the platform stores models there. With the
        model id and the digest of the manifest replicas must find there (read back from where
        they will read it)."""
        source = spec.resolved_source()
        if not source.startswith("s3://"):
            packed = resolve_packed(source, dtype=spec.model.dtype, num_blocks=spec.model.blocks,
                                    seed=spec.model.seed, cache_dir=state.models)
            source = str(packed)
            if bucket:
                source = f"s3://{bucket}/models/{packed.name}"
                upload_packed(open_store(f"s3://{bucket}"), packed,
                              f"models/{packed.name}")  # resumable, manifest last
        store_uri, prefix = split_location(source)
        manifest, digest, _ = read_packed_metadata_digest(open_store(store_uri), prefix)
        return source, manifest.model_id, digest

    app = create_app(GatewayContext(registry=registry, backend=backend, tokens=tokens,
                                    resolve_model=resolve_model, report=report,
                                    logs=replica_logs, tier_stats=all_node_stats,
                                    warm_pool=warm.status,
                                    pipecast=lambda: ray.get(pipecast.progress.remote(),
                                                             timeout=2.0),
                                    estimates=lambda name: ray.get(sink.estimates.remote(name),
                                                                   timeout=5.0),
                                    pin_estimates=lambda name, pins: ray.get(
                                        sink.pin_estimates.remote(name, pins), timeout=5.0),
                                    metrics_token=metrics_token))
    state.write_platform(PlatformInfo(url=me.url, pid=me.pid,
                                      object_store=(f"s3://{bucket}" if bucket
                                                    else str(state.objects)),
                                      ray_address=ray.get_runtime_context().gcs_address,
                                      started_s=time.time(), instance=me.instance))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)
    finally:
        state.clear_platform(me.instance)
        _STOPPING.set()
        warm.stop()
        try:
            serve.shutdown()
        finally:
            _shutdown_ray(ray)
            remove_owned(me, state)  # shared memory: do not leave it behind the platform


def main() -> None:
    ap = argparse.ArgumentParser(description="faascale platform process (use `faascale up`)")
    ap.add_argument("--home", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    ap.add_argument("--lock-fd", type=int, default=None,
                    help="the state directory's lock, taken and handed over by `faascale up`")
    args = ap.parse_args()
    state = StateDir(args.home)
    try:  # first: another platform here means touching nothing
        lock = (PlatformLock.inherit(state, args.lock_fd) if args.lock_fd is not None
                else PlatformLock.acquire(state))
    except PlatformLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(lock, args.host, args.port, args.address)


if __name__ == "__main__":
    main()
