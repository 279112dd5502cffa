"""The platform with S3 (a real Ceph RGW) as its object store: deploy uploads the packed model,
replicas fetch their blocks from S3 through their node's block store, s3:// sources deploy as is;
S3 going down while the platform runs is a clear 503, no partial model, and it recovers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from faascale.memory_tier.node import TierConfig
from support import TcpProxy
from test_platform import Platform, free_port, tiny_doc

pytestmark = pytest.mark.slow
BUCKET = "faascale-models"


@pytest.fixture(scope="module")
def s3_platform(ceph_rgw: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import boto3

    s3 = boto3.client("s3", endpoint_url=ceph_rgw.endpoint, region_name=ceph_rgw.region,
                      aws_access_key_id=ceph_rgw.access_key,
                      aws_secret_access_key=ceph_rgw.secret_key)
    s3.create_bucket(Bucket=BUCKET)
    # The platform reaches RGW through a proxy the tests can cut: S3 "goes down" for the
    # platform only, not for the other tests sharing the session's RGW.
    url = urlparse(ceph_rgw.endpoint)
    proxy = TcpProxy((url.hostname, url.port))
    proxy.up()
    p = Platform(tmp_path_factory.mktemp("faascale-s3-home"), free_port())
    p.proxy = proxy
    p.env.update({"FAASCALE_S3_ENDPOINT": proxy.endpoint, "FAASCALE_S3_BUCKET": BUCKET,
                  "AWS_ACCESS_KEY_ID": ceph_rgw.access_key,
                  "AWS_SECRET_ACCESS_KEY": ceph_rgw.secret_key, "AWS_DEFAULT_REGION": "us-east-1"})
    r = p.cli("up", "--port", str(p.port), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    yield p, s3
    p.cli("down", timeout=120)
    proxy.down()


def test_deploy_uploads_to_s3_and_replicas_load_from_it(s3_platform: Any) -> None:
    p, s3 = s3_platform
    r = p.cli("deploy", "functions/tiny-llama")
    assert r.returncode == 0, r.stderr
    status = p.status("tiny-llama")
    location = status["model_dir"]
    assert location.startswith(f"s3://{BUCKET}/models/tiny-llama-")
    prefix = location.removeprefix(f"s3://{BUCKET}/")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert {f"{prefix}/manifest.json", f"{prefix}/tokenizer.json",
            f"{prefix}/block-0003.bin"} <= keys
    out = p.http().post("/v1/functions/tiny-llama/invoke", json={"prompt": "hi", "max_tokens": 3})
    assert out.status_code == 200, out.text
    cold = p.status("tiny-llama")["cold_starts"][0]
    assert cold["sources"] == {"REMOTE": 4}  # every block came from S3

    # A function whose source is the packed model already in S3 deploys without packing, and on
    # this node (which now holds the model warm) starts from HOST.
    doc = tiny_doc("from-s3")
    doc["model"] = {"source": location, "blocks": 4}
    p.deploy(doc)
    assert p.status("from-s3")["model_dir"] == location
    out = p.http().post("/v1/functions/from-s3/invoke", json={"prompt": "hi", "max_tokens": 3})
    assert out.status_code == 200, out.text
    assert p.status("from-s3")["cold_starts"][0]["sources"] == {"HOST": 4}


def test_load_from_store_downloads_every_start_and_keeps_nothing_on_the_node(s3_platform: Any
                                                                            ) -> None:
    """``scaling.load_from: store`` (the store-only baselines of benchmarks/bursty.py): on a node
    whose HOST tier already holds the model, a replica still downloads every block from S3 (the
    node's tiers are never read), into a private copy that goes when the replica retires."""
    p, _ = s3_platform
    p.deploy(tiny_doc("warm-here", min_replicas=1))  # the node's HOST tier now holds the model
    doc = tiny_doc("store-only", min_replicas=1, pipecast=False, load_from="store")
    p.deploy(doc)
    deadline = time.monotonic() + 120
    while not p.status("store-only")["cold_starts"] and time.monotonic() < deadline:
        time.sleep(0.5)
    status = p.status("store-only")
    assert status["cold_starts"][0]["sources"] == {"REMOTE": 4}
    assert status["coldstart"]["last"]["source"] == "REMOTE"
    out = p.http().post("/v1/functions/store-only/invoke", json={"prompt": "hi", "max_tokens": 3})
    assert out.status_code == 200, out.text
    private = Path(f"{TierConfig.for_state_dir(p.home).host_dir}-private")

    def copies() -> list[Path]:  # the replicas' directories (beside the instance's owner mark)
        return [d for d in private.iterdir() if d.is_dir()]

    assert len([d for d in copies() if any(d.iterdir())]) == 1  # this replica's copy
    r = p.cli("delete", "store-only")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while copies() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not copies(), "the retired replica's private copy is still there"
    p.cli("delete", "warm-here")


def test_missing_s3_model_is_a_clear_422(s3_platform: Any) -> None:
    p, _ = s3_platform
    doc = tiny_doc("nowhere")
    doc["model"] = {"source": f"s3://{BUCKET}/models/does-not-exist", "blocks": 4}
    r = p.http("admin").post("/v1/functions", json={**doc, "base_dir": str(Path.cwd())})
    assert r.status_code == 422 and "does-not-exist" in r.json()["error"]["message"]


def test_s3_down_is_a_clear_503_without_a_partial_model_and_recovers(s3_platform: Any) -> None:
    p, _ = s3_platform
    doc = tiny_doc("s3-down")
    doc["model"] = {"source": "random://tiny-llama", "seed": 7, "blocks": 4}  # not on this node yet
    p.deploy(doc)  # packed and uploaded while S3 is up
    model_id = p.status("s3-down")["model_dir"].rstrip("/").rsplit("/", 1)[1]
    tiers = TierConfig.for_state_dir(p.home)
    p.proxy.down()
    try:
        t0 = time.monotonic()
        r = p.http().post("/v1/functions/s3-down/invoke", json={"prompt": "hi", "max_tokens": 3})
        waited_s = time.monotonic() - t0
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "start_failed" and "StoreUnavailable" in error["message"], error
        assert r.headers["Retry-After"] == "5"
        assert waited_s < 120, waited_s  # the replica's reason, not the 180 s cold-start timeout
        # No partial model anywhere: no block (or half-written temp file) of it in any tier.
        for tier_dir in (tiers.host_dir, tiers.disk_dir):  # every node's directory
            leftovers = list(Path(tier_dir).glob(f"*/{model_id}/*"))
            assert leftovers == [], leftovers
        assert p.status("s3-down")["start_failures"], "the failure is in the function's status"
    finally:
        p.proxy.up()
    # S3 is back: Serve retries the replica, which loads every block from S3 and serves.
    deadline = time.monotonic() + 180
    while True:
        r = p.http().post("/v1/functions/s3-down/invoke", json={"prompt": "hi", "max_tokens": 3})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(2)
    assert p.status("s3-down")["cold_starts"][0]["sources"] == {"REMOTE": 4}


def test_a_model_replaced_in_s3_after_the_deploy_is_refused(s3_platform: Any,
                                                             tmp_path: Path) -> None:
    """Whoever holds the store's keys can replace a packed model (its blocks and a manifest that
    verifies them); a replica of the deployed function refuses it (the manifest's digest is
    bound at deploy), the function answers a clear 503, and a redeploy serves again."""
    from faascale.engine.random_model import pack_random

    p, s3 = s3_platform
    doc = tiny_doc("swapped")
    doc["model"] = {"source": "random://tiny-llama", "seed": 11, "blocks": 4}
    p.deploy(doc)
    status = p.status("swapped")
    digest = status["manifest_digest"]
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    prefix = status["model_dir"].removeprefix(f"s3://{BUCKET}/")
    other = pack_random(tmp_path / "other", seed=12, num_blocks=4)
    for f in sorted((tmp_path / "other").iterdir()):  # manifest last, as an upload does
        if f.name != "manifest.json":
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json",
                  Body=(tmp_path / "other" / "manifest.json").read_bytes())
    r = p.http().post("/v1/functions/swapped/invoke", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "start_failed" and "ManifestMismatch" in error["message"], error
    assert other.model_id not in [e.get("model_id") for e in p.status("swapped")["cold_starts"]]
    p.deploy(doc)  # a redeploy uploads the function's own model again and binds it
    deadline = time.monotonic() + 180
    while True:
        r = p.http().post("/v1/functions/swapped/invoke", json={"prompt": "hi", "max_tokens": 3})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert p.status("swapped")["manifest_digest"] == digest
    p.cli("delete", "swapped")
