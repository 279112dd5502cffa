"""The bursty benchmark's Ray Serve LLM baseline runs as its users deploy it: Ray (from
``.venv-vllm``) on this machine, ``benchmarks/serve_llm_driver.py`` deploying SmolLM2 from a real
S3 (the suite's Ceph RGW) through ``ray.serve.llm`` on vLLM-CPU, the OpenAI client streaming from
Ray Serve's proxy, and the driver's watcher recording the replica as the benchmark reads it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from openai import OpenAI
from support import requires
from test_platform import ROOT

from faascale.platform.server import free_port

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = ROOT / "benchmarks" / "serve_llm_driver.py"
pytestmark = [pytest.mark.slow,
              requires(VLLM_PY.exists(), f"vLLM's venv is missing ({VLLM_PY}): run make vllm-env")]
BUCKET = "serve-llm-test"


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port} after {timeout_s:.0f} s"
        time.sleep(0.5)


def test_ray_serve_llm_serves_smollm2_from_s3_and_its_replica_is_recorded(
        smollm2_packed: Path, ceph_rgw, tmp_path: Path) -> None:
    import boto3

    from faascale.engine.hf_export import export_hf

    s3 = boto3.client("s3", endpoint_url=ceph_rgw.endpoint, region_name=ceph_rgw.region,
                      aws_access_key_id=ceph_rgw.access_key,
                      aws_secret_access_key=ceph_rgw.secret_key)
    s3.create_bucket(Bucket=BUCKET)
    folder = export_hf(smollm2_packed, tmp_path / "hf")
    for f in folder.iterdir():
        s3.upload_file(str(f), BUCKET, f"smollm2/{f.name}")

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "AWS_ACCESS_KEY_ID": ceph_rgw.access_key, "AWS_SECRET_ACCESS_KEY": ceph_rgw.secret_key,
           "AWS_DEFAULT_REGION": ceph_rgw.region, "AWS_ENDPOINT_URL": ceph_rgw.endpoint,
           "AWS_ENDPOINT_URL_S3": ceph_rgw.endpoint, "HF_HUB_OFFLINE": "1"}
    gcs, http = free_port(), free_port()
    temp = Path(f"/tmp/fsl{os.getpid()}")  # Ray's socket paths must stay short
    # --block: the head's processes live as long as this one, and go with it
    head = subprocess.Popen(
        [str(VLLM_PY.with_name("ray")), "start", "--head", "--block", "--port", str(gcs),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--num-gpus", "0",
         "--resources", '{"bench_head": 100, "bench_gpu": 1}', "--include-dashboard=false",
         "--disable-usage-stats", "--temp-dir", str(temp)],
        env=env, stdout=(tmp_path / "ray.log").open("w"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    watcher = None
    try:
        _wait_port(gcs, 120)
        address = f"127.0.0.1:{gcs}"
        t0 = time.monotonic()
        deploy = subprocess.run(
            [str(VLLM_PY), str(DRIVER), "deploy", "--address", address, "--bucket-uri",
             f"s3://{BUCKET}/smollm2", "--max-replicas", "1", "--http-port", str(http),
             "--timeout-s", "420"],
            env=env, capture_output=True, text=True, timeout=480, stdin=subprocess.DEVNULL)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        deployed_s = json.loads(deploy.stdout.strip().splitlines()[-1])["deployed_s"]
        assert 0 < deployed_s <= time.monotonic() - t0
        out = tmp_path / "replicas.jsonl"
        watcher = subprocess.Popen([str(VLLM_PY), str(DRIVER), "watch", "--address", address,
                                    "--out", str(out)], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        client = OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=120)
        chunks = list(client.chat.completions.create(
            model="bursty", messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = [c.usage for c in chunks if c.usage]
        assert text.strip() and finish == ["length"], chunks
        assert usage and usage[-1].completion_tokens == 8, usage

        deadline = time.monotonic() + 60
        while not (out.exists() and len(out.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and watcher.poll() is None, watcher.stdout.read()
            time.sleep(0.5)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert all(r["function"] == "bursty" for r in rows)
        assert (rows[-1]["running"], rows[-1]["starting"], rows[-1]["full"]) == (1, 0, 1), rows
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0, watcher.stdout.read()
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        subprocess.run(["rm", "-rf", str(temp)], check=False)
