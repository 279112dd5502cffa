"""Ray Serve LLM (``ray.serve.llm`` on vLLM) as a user deploys it: the bursty benchmark's sixth
system. Runs in ``.venv-vllm`` (vLLM, Ray with Serve; no faascale), as a Ray driver of the
benchmark's cluster; imports nothing of faascale.

    python benchmarks/serve_llm_driver.py deploy --address HOST:6379 --bucket-uri s3://B/P \\
        --model-id bursty --max-replicas 4 --target-ongoing 2 --http-host H --http-port 8000
    python benchmarks/serve_llm_driver.py watch --address HOST:6379 --out replicas.jsonl

``deploy`` builds the OpenAI app (``build_openai_app``) from one ``LLMConfig`` and runs it
detached; it returns once the app is running (one replica up), printing a JSON line. What it
sets, and why (everything else is Ray Serve LLM's default):

- ``model_source``: the model's Hugging Face folder in the benchmark's S3 (Ceph RGW), as Ray
  Serve LLM users load from S3 (``bucket_uri``); every new replica downloads it;
- ``autoscaling_config``: ``min_replicas`` 1, ``max_replicas`` the number of GPU nodes, and
  ``target_ongoing_requests`` the others' target (2). Ray Serve LLM's default target is 1e9
  (``RAY_SERVE_LLM_DEFAULT_MAX_TARGET_ONGOING_REQUESTS``): it would never scale up. The delays
  stay Ray Serve's defaults (30 s up, 600 s down), as ``serve-default``'s;
- vLLM: ``enforce_eager`` (compiling on a 0.35-core node takes minutes before the first token:
  a user on CPUs turns it off), ``max_model_len`` 512 and ``max_num_seqs`` 4 (the others'
  ``max_seq_len`` and ``max_batch_size``), float32 (the others' dtype), a 1 GiB KV cache
  (``VLLM_CPU_KVCACHE_SPACE``), one thread unbound (``OMP_NUM_THREADS=1``,
  ``VLLM_CPU_OMP_THREADS_BIND=nobind``: the others' ``num_threads: 1``; its default binds
  every replica to the same core);
- placement: one replica per GPU node (a bundle of the node's one ``bench_gpu`` resource and
  one CPU), the ingress on the head (``bench_head``).

``watch`` writes, every 0.5 s, the LLM deployment's replicas as the load test's watcher does
for faascale (``epoch_s``, ``function``, ``running``, ``starting``, ``full``: a running vLLM
replica holds the whole model), until it is terminated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

POLL_S = 0.5
APP = "bursty"


def llm_config(args: argparse.Namespace):  # -> ray.serve.llm.LLMConfig
    from ray.serve.llm import LLMConfig

    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                         "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                                         "AWS_ENDPOINT_URL_S3") if k in os.environ}}
    return LLMConfig(
        model_loading_config={"model_id": args.model_id,
                              "model_source": {"bucket_uri": args.bucket_uri}},
        accelerator_config={"kind": "cpu"},
        placement_group_config={"bundles": [{"CPU": 1, "bench_gpu": 1}]},
        deployment_config={"autoscaling_config": {
            "min_replicas": 1, "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing}},
        engine_kwargs={"enforce_eager": True, "max_model_len": args.max_model_len,
                       "max_num_seqs": args.max_num_seqs, "dtype": "float32"},
        runtime_env={"env_vars": env},
    )


def deploy(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    t0 = time.monotonic()
    ray.init(address=args.address, namespace="serve", logging_level="ERROR")
    serve.start(http_options={"host": args.http_host, "port": args.http_port},
                proxy_location="HeadOnly")
    app = build_openai_app({"llm_configs": [llm_config(args)],
                            "ingress_deployment_config": {
                                "ray_actor_options": {"num_cpus": 0,
                                                      "resources": {"bench_head": 1}}}})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    while running(serve.status()) < 1:
        if time.monotonic() - t0 > args.timeout_s:
            raise SystemExit(f"Ray Serve LLM did not serve within {args.timeout_s:.0f} s")
        time.sleep(1.0)
    print(json.dumps({"deployed_s": round(time.monotonic() - t0, 2)}), flush=True)


def _llm_deployment(status):  # -> the LLMServer deployment's status, or None
    app = status.applications.get(APP)
    if app is None:
        return None
    for name, d in app.deployments.items():
        if name.startswith("LLMServer"):
            return d
    return None


def counts(status) -> tuple[int, int]:
    """(running, starting) replicas of the LLM deployment."""
    d = _llm_deployment(status)
    if d is None:
        return 0, 0
    states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
    return states.get("RUNNING", 0), states.get("STARTING", 0) + states.get("PENDING_ALLOCATION", 0)


def running(status) -> int:
    return counts(status)[0]


def watch(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    ray.init(address=args.address, namespace="serve", logging_level="ERROR")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(args.out, "w") as f:
        while not stop:
            t = time.time()
            try:
                up, starting = counts(serve.status())
            except Exception:  # noqa: BLE001 - a busy controller is a gap, not the end
                up = None
            if up is not None:
                f.write(json.dumps({"epoch_s": t, "function": args.model_id, "running": up,
                                    "starting": starting, "full": up}) + "\n")
                f.flush()
            time.sleep(max(0.0, POLL_S - (time.time() - t)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy")
    d.add_argument("--address", required=True)
    d.add_argument("--bucket-uri", required=True)
    d.add_argument("--model-id", default="bursty")
    d.add_argument("--max-replicas", type=int, required=True)
    d.add_argument("--target-ongoing", type=float, default=2)
    d.add_argument("--max-model-len", type=int, default=512)
    d.add_argument("--max-num-seqs", type=int, default=4)
    d.add_argument("--kv-cache-gib", type=int, default=1)
    d.add_argument("--http-host", default="127.0.0.1")
    d.add_argument("--http-port", type=int, default=8000)
    d.add_argument("--timeout-s", type=float, default=900)
    w = sub.add_parser("watch")
    w.add_argument("--address", required=True)
    w.add_argument("--model-id", default="bursty")
    w.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    deploy(args) if args.cmd == "deploy" else watch(args)


if __name__ == "__main__":
    sys.exit(main())
