"""The S3 store against a real S3 server: Ceph RGW from Debian's packages (the ``ceph_rgw`` fixture).

moto covers the store's logic fast; these tests show that the same code works with a real server's
signatures, multipart uploads, ranged GETs and error codes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from faascale.engine.checkpoint import read_manifest
from faascale.engine.llm import LLM
from faascale.engine.manifest import MANIFEST_FILE
from faascale.engine.sampling import SamplingParams
from faascale.memory_tier.packed import download_packed, upload_packed
from faascale.memory_tier.s3_store import S3Store
from faascale.memory_tier.store import BucketNotFound, ObjectNotFound, StoreAuthError

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def _boto3(rgw, access_key: str | None = None, secret_key: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=rgw.endpoint, region_name=rgw.region,
                        aws_access_key_id=access_key or rgw.access_key,
                        aws_secret_access_key=secret_key or rgw.secret_key,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


def _new_bucket(rgw, name: str) -> str:
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"  # tests may share the session's cluster
    _boto3(rgw).create_bucket(Bucket=bucket)
    return bucket


def _store(rgw, bucket: str, **kw) -> S3Store:
    kw.setdefault("access_key", rgw.access_key)
    kw.setdefault("secret_key", rgw.secret_key)
    return S3Store(bucket, endpoint_url=rgw.endpoint, region=rgw.region, **kw)


def test_rgw_serves_s3_with_boto3(ceph_rgw) -> None:
    """The server itself, without our code: put, get, ranged get, list, delete."""
    s3 = _boto3(ceph_rgw)
    bucket = _new_bucket(ceph_rgw, "smoke")
    data = os.urandom(3 << 20)
    s3.put_object(Bucket=bucket, Key="a/b.bin", Body=data)
    assert s3.get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == data
    part = s3.get_object(Bucket=bucket, Key="a/b.bin", Range="bytes=1000-1999")
    assert part["Body"].read() == data[1000:2000]
    assert part["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b.bin"]
    s3.delete_object(Bucket=bucket, Key="a/b.bin")
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_smollm2_round_trip_through_rgw(ceph_rgw, smollm2_packed: Path, smollm2_llm: LLM,
                                        tmp_path: Path) -> None:
    """Upload the real SmolLM2 (multipart: blocks are ~100 MB), download it, and it generates the same."""
    bucket = _new_bucket(ceph_rgw, "models")
    seen: list[tuple[int, int]] = []
    with _store(ceph_rgw, bucket, prefix="faascale") as store:
        manifest = upload_packed(store, smollm2_packed, "smollm2-135m",
                                 progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (manifest.num_blocks, manifest.num_blocks)
        keys = store.list("smollm2-135m/")
        assert f"smollm2-135m/{MANIFEST_FILE}" in keys
        assert all(f"smollm2-135m/{b.file}" in keys for b in manifest.blocks)
        assert store.size(f"smollm2-135m/{manifest.blocks[0].file}") == manifest.blocks[0].size_bytes

        dest = download_packed(store, "smollm2-135m", tmp_path / "smollm2")

    assert read_manifest(dest) == read_manifest(smollm2_packed)
    copy = LLM.load(dest)  # verifies every block's checksum
    assert copy.cfg == smollm2_llm.cfg
    ours = copy.generate(PROMPT, GREEDY)[0]
    original = smollm2_llm.generate(PROMPT, GREEDY)[0]
    assert ours.num_output_tokens == 16 or ours.finish_reason == "stop"
    assert ours.token_ids == original.token_ids
    assert ours.text == original.text


def test_bad_credentials_raise_store_auth_error(ceph_rgw) -> None:
    bucket = _new_bucket(ceph_rgw, "auth")
    _boto3(ceph_rgw).put_object(Bucket=bucket, Key="k", Body=b"v")
    with _store(ceph_rgw, bucket, secret_key="not-the-secret", max_attempts=1) as store:
        with pytest.raises(StoreAuthError, match="access denied"):
            store.get("k")
        with pytest.raises(StoreAuthError):
            store.list()
    with _store(ceph_rgw, bucket, access_key="no-such-user", max_attempts=1) as store:
        with pytest.raises(StoreAuthError):
            store.put("k2", b"v")
    with _store(ceph_rgw, bucket) as store:  # the right keys still work
        assert store.get("k") == b"v"


def test_missing_bucket_raises_bucket_not_found(ceph_rgw, tmp_path: Path) -> None:
    with _store(ceph_rgw, f"missing-{uuid.uuid4().hex[:8]}") as store:
        with pytest.raises(BucketNotFound):
            store.get("k")
        with pytest.raises(BucketNotFound):
            store.size("k")
        with pytest.raises(BucketNotFound):
            store.list()
        with pytest.raises(BucketNotFound):
            download_packed(store, "smollm2-135m", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with _store(ceph_rgw, _new_bucket(ceph_rgw, "empty")) as store:  # a bucket, but no such key
        with pytest.raises(ObjectNotFound):
            store.get("k")


def test_generate_runs_a_function_whose_model_is_in_s3(ceph_rgw, tiny_packed: Path, tmp_path: Path) -> None:
    """`faascale generate` with an s3:// source: downloaded once (verified) into the model cache,
    same tokens as the local model; a missing model is one `error:` line and exit 2."""
    import subprocess
    import sys

    bucket = _new_bucket(ceph_rgw, "gen")
    with _store(ceph_rgw, bucket) as store:
        upload_packed(store, tiny_packed, "models/tiny")
    env = {**os.environ, "FAASCALE_HOME": str(tmp_path / "home"),
           "FAASCALE_S3_ENDPOINT": ceph_rgw.endpoint, "AWS_ACCESS_KEY_ID": ceph_rgw.access_key,
           "AWS_SECRET_ACCESS_KEY": ceph_rgw.secret_key, "AWS_DEFAULT_REGION": ceph_rgw.region}

    def generate(source: str) -> subprocess.CompletedProcess[bytes]:
        fn = tmp_path / f"fn-{uuid.uuid4().hex[:6]}"
        fn.mkdir()
        (fn / "function.yaml").write_text(f"name: from-s3\nmodel:\n  source: {source}\n  blocks: 4\n")
        return subprocess.run([sys.executable, "-m", "faascale.cli", "generate", str(fn), "hello",
                               "--temperature", "0", "--max-tokens", "12"], env=env,
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)

    r = generate(f"s3://{bucket}/models/tiny")
    assert r.returncode == 0, r.stderr
    expected = LLM.load(tiny_packed).generate("hello", SamplingParams(max_tokens=12, temperature=0))[0]
    assert r.stdout.decode() == expected.text + "\n"  # bytes: the noise may hold a bare \r
    cached = tmp_path / "home" / "models" / read_manifest(tiny_packed).model_id
    assert read_manifest(cached) == read_manifest(tiny_packed)  # content-addressed cache
    again = generate(f"s3://{bucket}/models/tiny")  # from the cache; same answer
    assert again.returncode == 0 and again.stdout == r.stdout

    missing = generate(f"s3://{bucket}/models/nothing-here")
    err = missing.stderr.decode()
    assert missing.returncode == 2 and err.startswith("error: model.source: s3://"), err
    assert "Traceback" not in err
