"""Object stores against real components: a temp directory, moto's S3 server (HTTP on 127.0.0.1,
in-process: the fast path) and the session's Ceph RGW (a real S3 server, the ``ceph_rgw`` fixture).

The same behavioural tests (the store contract) run against all three, a bucket per test on each
S3 server; S3-only tests cover multipart uploads (both servers), endpoint failure and error
mapping. Packed models go up and come back bit-identical, generate the same tokens, and a corrupt
or truncated block in the store leaves nothing behind. The RGW cases are marked ``slow`` (its boot,
once per session, is ~15-30 s); without Ceph they skip, and fail under CI=true (tests/support.py).
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from faascale.engine.checkpoint import read_manifest
from faascale.engine.llm import LLM
from faascale.engine.manifest import CheckpointError, CorruptBlockError
from faascale.engine.random_model import pack_random
from faascale.engine.sampling import SamplingParams
from faascale.memory_tier.local_store import LocalDirStore
from faascale.memory_tier.packed import download_packed, upload_packed
from faascale.memory_tier.s3_store import S3Store
from faascale.memory_tier.store import (BucketNotFound, InvalidKey, ObjectNotFound,
                                        ObjectSizeMismatch, ObjectStore, StoreAuthError, StoreError,
                                        StoreUnavailable, open_store)
from faascale.platform.server import free_port

MiB = 1 << 20
CREDS = {"region": "us-east-1", "access_key": "testing", "secret_key": "testing"}
GREEDY = SamplingParams(max_tokens=8, temperature=0)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def moto_endpoint() -> Any:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_server(server: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """(endpoint, credentials) of ``moto`` (module-scoped, in-process) or ``rgw`` (the session's)."""
    if server == "moto":
        return request.getfixturevalue("moto_endpoint"), CREDS
    return _rgw(request.getfixturevalue("ceph_rgw"))


def _rgw(rgw: Any) -> tuple[str, dict[str, str]]:
    return rgw.endpoint, {"region": rgw.region, "access_key": rgw.access_key,
                          "secret_key": rgw.secret_key}


def _client(endpoint: str, creds: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name=creds["region"],
                        aws_access_key_id=creds["access_key"],
                        aws_secret_access_key=creds["secret_key"])


def _new_bucket(endpoint: str, creds: dict[str, str] = CREDS) -> str:
    bucket = f"faascale-test-{uuid.uuid4().hex[:12]}"  # a test's own, on a server tests share
    _client(endpoint, creds).create_bucket(Bucket=bucket)
    return bucket


def _drop_bucket(endpoint: str, creds: dict[str, str], bucket: str) -> None:
    """Empty and delete a test's bucket: RGW keeps objects in RAM (memstore) for the session."""
    s3 = _client(endpoint, creds)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    for up in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    s3.delete_bucket(Bucket=bucket)


RGW = pytest.param("rgw", marks=pytest.mark.slow)


@pytest.fixture(params=["local", "moto", RGW])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["moto", RGW])
def s3_server(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    return _s3_server(request.param, request)


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A fresh, empty store (on S3: a new bucket, removed after the test). S3 parts are 1 MiB, so a
    few-MiB object is fetched in several ranged GETs (boto3 uploads parts of at least 5 MiB)."""
    if kind == "local":
        yield LocalDirStore(tmp_path / "store")
        return
    endpoint, creds = _s3_server(kind, request)
    bucket = _new_bucket(endpoint, creds)
    with S3Store(bucket, prefix="tenant/a", endpoint_url=endpoint, part_size_bytes=1 * MiB,
                 max_concurrency=4, **creds) as s3:
        yield s3
    _drop_bucket(endpoint, creds, bucket)


@pytest.fixture
def missing_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A store whose bucket (directory) does not exist."""
    if kind == "local":
        return LocalDirStore(tmp_path / "no-such-dir", create=False)
    endpoint, creds = _s3_server(kind, request)
    return S3Store(f"faascale-no-such-bucket-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint, **creds)


@pytest.fixture(scope="module")
def original_tokens(tiny_packed: Path) -> tuple[int, ...]:
    return LLM.load(tiny_packed).generate(PROMPT, GREEDY)[0].token_ids


class CountingStore:
    """Wraps a store and records every key written."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.puts: list[str] = []

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.puts.append(key)
        self.inner.put(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self.puts.append(key)
        self.inner.put_file(key, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------
# The protocol, against every store


def test_basic_operations(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    store.put("a/one.bin", b"hello world")
    store.put("a/two.bin", memoryview(bytearray(b"0123456789")))
    store.put("b/three", b"")
    store.put("ab", b"x")
    assert store.get("a/one.bin") == b"hello world"
    assert store.get("a/two.bin") == b"0123456789"
    assert store.get("b/three") == b""
    assert store.size("a/one.bin") == 11 and store.size("b/three") == 0
    assert store.get_range("a/two.bin", 3, 4) == b"3456"
    assert store.get_range("a/two.bin", 8, 100) == b"89"  # short only where the object ends
    assert store.get_range("a/two.bin", 10, 5) == b"" and store.get_range("a/two.bin", 2, 0) == b""
    assert store.exists("a/one.bin") and not store.exists("a/nope") and not store.exists("a")
    assert store.list() == ["a/one.bin", "a/two.bin", "ab", "b/three"]
    assert store.list("a/") == ["a/one.bin", "a/two.bin"]
    assert store.list("a") == ["a/one.bin", "a/two.bin", "ab"]  # a string prefix, not a directory
    assert store.list("zzz") == []
    store.put("a/one.bin", b"replaced")
    assert store.get("a/one.bin") == b"replaced"
    store.delete("a/one.bin")
    store.delete("a/one.bin")  # deleting a missing key is not an error
    assert not store.exists("a/one.bin") and store.list("a/") == ["a/two.bin"]


def test_get_into_multipart_writes_in_place(store: ObjectStore) -> None:
    data = os.urandom(5 * MiB + 123)  # 6 parts of 1 MiB on S3, the last one short
    store.put("big.bin", data)
    buf = bytearray(len(data))
    assert store.get_into("big.bin", memoryview(buf)) == len(data)
    assert buf == data  # the caller's own buffer holds the object
    empty = bytearray()
    store.put("empty", b"")
    assert store.get_into("empty", memoryview(empty)) == 0


def test_get_into_size_mismatch_leaves_buffer_untouched(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB)
    store.put("obj", data)
    for size in (len(data) - 1, len(data) + 1, len(data) + 2 * MiB, 0):
        buf = bytearray(b"\xab" * size)
        with pytest.raises(ValueError, match="is 3145728 bytes but the buffer is") as err:
            store.get_into("obj", memoryview(buf))
        assert isinstance(err.value, ObjectSizeMismatch) and err.value.actual_bytes == len(data)
        assert buf == b"\xab" * size
    with pytest.raises(ValueError, match="writable"):
        store.get_into("obj", memoryview(bytes(len(data))))


def test_put_file(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB + 7)
    (tmp_path / "f.bin").write_bytes(data)
    store.put_file("files/f.bin", tmp_path / "f.bin")
    assert store.get("files/f.bin") == data and store.size("files/f.bin") == len(data)
    big_view = memoryview(bytearray(data))
    store.put("files/view.bin", big_view)  # large memoryview: multipart on S3, no bytes() copy
    assert store.get("files/view.bin") == data


def test_missing_key(store: ObjectStore) -> None:
    for call in (lambda: store.get("no/such"), lambda: store.size("no/such"),
                 lambda: store.get_range("no/such", 0, 10), lambda: store.get_range("no/such", 0, 0),
                 lambda: store.get_into("no/such", memoryview(bytearray(10)))):
        with pytest.raises(ObjectNotFound) as err:
            call()
        assert store.uri in str(err.value) and "'no/such'" in str(err.value)
        assert err.value.key == "no/such" and err.value.uri == store.uri
    assert store.exists("no/such") is False


def test_missing_bucket(missing_store: ObjectStore) -> None:
    for call in (lambda: missing_store.get("k"), lambda: missing_store.size("k"),
                 lambda: missing_store.exists("k"), lambda: missing_store.list(),
                 lambda: missing_store.put("k", b"x"), lambda: missing_store.delete("k"),
                 lambda: missing_store.get_into("k", memoryview(bytearray(4)))):
        with pytest.raises(BucketNotFound) as err:
            call()
        assert missing_store.uri in str(err.value)


def test_invalid_keys(store: ObjectStore) -> None:
    for bad in ("", "/abs", "../up", "a/../../b", "a//b", "dir/", "a\\b"):
        with pytest.raises(InvalidKey, match="invalid key"):
            store.put(bad, b"x")
        with pytest.raises(InvalidKey):
            store.get(bad)


def test_errors_pickle() -> None:
    err = pickle.loads(pickle.dumps(ObjectNotFound("s3://b/p: no object 'k'", "s3://b/p", "k")))
    assert isinstance(err, ObjectNotFound) and str(err) == "s3://b/p: no object 'k'" and err.key == "k"
    mis = pickle.loads(pickle.dumps(ObjectSizeMismatch("m", "u", "k", 3, 4)))
    assert (mis.actual_bytes, mis.buffer_bytes) == (3, 4)


# ---------------------------------------------------------------------------------------------
# Packed models


def test_packed_model_round_trip(store: ObjectStore, tiny_packed: Path, tmp_path: Path,
                                 original_tokens: tuple[int, ...]) -> None:
    seen: list[tuple[int, int]] = []
    manifest = upload_packed(store, tiny_packed, "models/tiny", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert store.list("models/tiny/") == sorted(
        f"models/tiny/{n}" for n in ["manifest.json", "tokenizer.json"] + [b.file for b in manifest.blocks])
    dest = tmp_path / "cache" / "tiny"
    got: list[tuple[int, int]] = []
    assert download_packed(store, "models/tiny", dest, progress=lambda d, t: got.append((d, t))) == dest
    assert got[-1] == (4, 4) and len(got) == 4
    for name in os.listdir(tiny_packed):
        assert (dest / name).read_bytes() == (tiny_packed / name).read_bytes(), name
    assert os.listdir(dest.parent) == ["tiny"]  # no temp directory left beside it
    assert LLM.load(dest).generate(PROMPT, GREEDY)[0].token_ids == original_tokens
    # Already there (same model id): returned as is, nothing fetched.
    assert download_packed(CountingStore(store), "models/tiny", dest) == dest


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_block_leaves_no_model(store: ObjectStore, tiny_packed: Path, tmp_path: Path,
                                       damage: str) -> None:
    manifest = upload_packed(store, tiny_packed, "m")
    size = manifest.blocks[2].size_bytes
    store.put("m/block-0002.bin", os.urandom(size) if damage == "garbage" else
              (tiny_packed / "block-0002.bin").read_bytes()[: size - 100])
    dest = tmp_path / "dl" / "tiny"
    with pytest.raises(CorruptBlockError) as err:
        download_packed(store, "m", dest)
    assert err.value.block_id == manifest.block_id(2)
    assert "block 2" in str(err.value) and "m/block-0002.bin" in str(err.value)
    assert ("checksum" if damage == "garbage" else "truncated") in str(err.value)
    assert not dest.exists() and os.listdir(dest.parent) == []


def test_bad_tokenizer_or_missing_model(store: ObjectStore, tiny_packed: Path, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="manifest.json"):
        download_packed(store, "nothing/here", tmp_path / "x")
    upload_packed(store, tiny_packed, "m")
    store.put("m/tokenizer.json", b"{}")
    with pytest.raises(CheckpointError, match="tokenizer checksum"):
        download_packed(store, "m", tmp_path / "dl" / "x")
    assert os.listdir(tmp_path / "dl") == []


def test_upload_is_resumable(store: ObjectStore, tiny_packed: Path) -> None:
    class Interrupted(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        upload_packed(store, tiny_packed, "m", progress=stop_after_two)
    assert not store.exists("m/manifest.json")  # an unfinished upload is not a model
    counting = CountingStore(store)
    upload_packed(counting, tiny_packed, "m")
    assert counting.puts == ["m/block-0002.bin", "m/block-0003.bin", "m/manifest.json"]
    again = CountingStore(store)
    upload_packed(again, tiny_packed, "m")
    assert again.puts == []
    assert store.list("m/") == sorted(f"m/{n}" for n in os.listdir(tiny_packed))


def test_other_model_under_same_prefix_is_not_trusted(store: ObjectStore, tiny_packed: Path,
                                                      tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    other = pack_random(other_dir, seed=1, num_blocks=4)  # same sizes, different bytes
    upload_packed(store, tiny_packed, "m")
    counting = CountingStore(store)
    upload_packed(counting, other_dir, "m")
    assert [k for k in counting.puts if "block-" in k] == [f"m/block-{i:04d}.bin" for i in range(4)]
    dest = download_packed(store, "m", tmp_path / "dl")
    assert read_manifest(dest).model_id == other.model_id
    upload_packed(store, tiny_packed, "m")  # and back again
    with pytest.raises(CheckpointError, match="is not the packed model"):
        download_packed(store, "m", tmp_path / "dl")  # dest holds the other model


def test_the_metadata_read_is_bound_to_the_deployed_manifest(store: ObjectStore,
                                                              tiny_packed: Path,
                                                              tmp_path: Path) -> None:
    """A deploy records the manifest's digest; a model swapped in the store afterwards (its own
    blocks and a manifest that verifies them) is refused before its manifest is parsed."""
    from faascale.memory_tier.packed import (ManifestMismatch, manifest_digest,
                                             read_packed_metadata, read_packed_metadata_digest)

    upload_packed(store, tiny_packed, "m")
    manifest, digest, _ = read_packed_metadata_digest(store, "m")
    assert digest == manifest_digest((tiny_packed / "manifest.json").read_bytes())
    assert read_packed_metadata(store, "m", digest)[0].model_id == manifest.model_id
    pack_random(tmp_path / "other", seed=1, num_blocks=4)
    upload_packed(store, tmp_path / "other", "m")  # replaced after the deploy
    with pytest.raises(ManifestMismatch, match="not the manifest this function was deployed"):
        read_packed_metadata(store, "m", digest)
    assert read_packed_metadata(store, "m")[0].model_id != manifest.model_id  # unbound: reads


# ---------------------------------------------------------------------------------------------
# Store-specific


def test_local_store_writes_atomically(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    store.put("d/k", b"v" * 1000)
    (tmp_path / "s" / "d" / ".k.0123.faascale-partial").write_bytes(b"half")  # a writer mid-put
    assert store.list() == ["d/k"] and store.uri == (tmp_path / "s").as_uri()
    store.delete("d/k")
    assert not (tmp_path / "s" / "d" / "k").exists()


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_store(str(tmp_path / "a")), LocalDirStore)
    local = open_store((tmp_path / "b c").as_uri())
    assert isinstance(local, LocalDirStore) and local.root == tmp_path / "b c"
    monkeypatch.setenv("FAASCALE_S3_ENDPOINT", "http://127.0.0.1:9")
    s3 = open_store("s3://bucket/some/prefix", **CREDS)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.endpoint_url == "http://127.0.0.1:9" and s3.uri == "s3://bucket/some/prefix"
    explicit = open_store("s3://bucket", endpoint_url="http://127.0.0.1:10", **CREDS)
    assert explicit.endpoint_url == "http://127.0.0.1:10" and explicit.uri == "s3://bucket"
    for bad in ("gs://x/y", "s3://", "file://remote-host/x", ""):
        with pytest.raises(InvalidKey):
            open_store(bad)


def test_s3_multipart_upload(s3_server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    endpoint, creds = s3_server
    bucket = _new_bucket(endpoint, creds)
    with S3Store(bucket, endpoint_url=endpoint, part_size_bytes=5 * MiB, **creds) as store:
        data = os.urandom(11 * MiB)
        (tmp_path / "f").write_bytes(data)
        store.put_file("f", tmp_path / "f")
        etag = store._client.head_object(Bucket=store.bucket, Key="f")["ETag"]
        assert etag.endswith('-3"')  # three parts: 5 + 5 + 1 MiB (S3's multipart ETag, any server)
        assert store.get("f") == data
    _drop_bucket(endpoint, creds, bucket)


def test_s3_endpoint_down_is_unavailable_quickly() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", endpoint_url=endpoint, max_attempts=2, connect_timeout_s=0.5,
                    read_timeout_s=1, **CREDS)
    for call in (lambda: store.get("k"), lambda: store.get_into("k", memoryview(bytearray(10))),
                 lambda: store.put("k", b"x")):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert time.monotonic() - t0 < 5
        assert endpoint in str(err.value) and "'k'" in str(err.value)


def test_s3_error_mapping() -> None:
    """botocore's error shapes (auth failures cannot be provoked on moto) to typed errors."""
    store = S3Store("b", endpoint_url="http://127.0.0.1:9", **CREDS)

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    cases = {("InvalidAccessKeyId", 403): StoreAuthError, ("SignatureDoesNotMatch", 403): StoreAuthError,
             ("AccessDenied", 403): StoreAuthError, ("403", 403): StoreAuthError,
             ("NoSuchKey", 404): ObjectNotFound, ("404", 404): ObjectNotFound,
             ("NoSuchBucket", 404): BucketNotFound, ("SlowDown", 503): StoreUnavailable,
             ("InvalidArgument", 400): StoreError}
    for (code, status), expected in cases.items():
        err = store._error(client_error(code, status), "k", "GET")
        assert type(err) is expected, (code, err)
        assert "s3://b" in str(err)


def test_s3_get_into_reads_each_part_directly(s3_server: tuple[str, dict[str, str]]) -> None:
    """get_into's parts are answered by the direct reader (s3_direct: presigned GETs read into
    the buffer), one 206 per part, on both servers; boto3 is not asked for any of them."""
    endpoint, creds = s3_server
    bucket = _new_bucket(endpoint, creds)
    try:
        with S3Store(bucket, endpoint_url=endpoint, part_size_bytes=1 * MiB, max_concurrency=3,
                     **creds) as store:
            data = os.urandom(7 * MiB + 5)
            store.put("big", data)
            calls: list[str] = []
            store._client.meta.events.register(
                "before-call.s3.GetObject", lambda **kw: calls.append(kw["params"]["url_path"]))
            for _ in range(2):  # the second time over the kept-alive connections
                buf = bytearray(len(data))
                assert store.get_into("big", memoryview(buf)) == len(data) and buf == data
            assert store._direct is not None and store._direct.requests == 2 * 8
            assert calls == []
            assert len(store._direct._conns) <= 3  # one per part thread, kept alive
    finally:
        _drop_bucket(endpoint, creds, bucket)


def test_s3_direct_reads_are_off_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from faascale.memory_tier.s3_direct import usable_for

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert usable_for("http://10.0.0.5:7480") and usable_for("https://s3.example.com")
    assert not usable_for("ftp://x") and not usable_for("http://")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not usable_for("http://10.0.0.5:7480") and usable_for("https://s3.example.com")
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert usable_for("http://10.0.0.5:7480")
    monkeypatch.setenv("HTTP_PROXY", "")
    store = S3Store("b", endpoint_url="http://10.0.0.5:7480", direct_reads=False, **CREDS)
    assert store._direct is None


class CuttingProxy:
    """A TCP relay on 127.0.0.1 in front of ``upstream``: ``cut_after`` bytes into the next
    response it relays it closes that connection (a body breaking off); ``close_idle()`` closes
    every relayed connection from the server's side (a keep-alive the server dropped)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        import socket
        import threading

        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_after: int | None = None
        self.cuts = 0
        self.accepted = 0
        self.conns: list[Any] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.accepted += 1
                self.conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: Any, dst: Any, downstream: bool) -> None:
        import socket

        sent = 0
        try:
            while data := src.recv(65536):
                with self.lock:
                    cut = self.cut_after if downstream else None
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[:max(0, cut - sent)])
                    with self.lock:
                        self.cut_after, self.cuts = None, self.cuts + 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close_idle(self) -> None:
        import socket

        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.close_idle()


def test_s3_a_body_cut_mid_part_is_fetched_again(moto_endpoint: str) -> None:
    """Real sockets: a relay cuts one response 300 KB into its body; that part is fetched again
    and the object arrives whole, every part read directly."""
    from urllib.parse import urlsplit

    up = urlsplit(moto_endpoint)
    proxy = CuttingProxy((up.hostname, up.port))
    bucket = _new_bucket(moto_endpoint)
    try:
        data = os.urandom(4 * MiB)
        with S3Store(bucket, endpoint_url=f"http://127.0.0.1:{proxy.port}", max_concurrency=2,
                     part_size_bytes=1 * MiB, **CREDS) as store:
            store.put("obj", data)
            proxy.cut_after = 300_000
            buf = bytearray(len(data))
            assert store.get_into("obj", memoryview(buf)) == len(data) and buf == data
            assert proxy.cuts == 1 and store._direct.requests == 4
    finally:
        proxy.close()
        _drop_bucket(moto_endpoint, CREDS, bucket)


@pytest.mark.slow
def test_s3_a_keepalive_the_server_dropped_reconnects_without_a_retry(ceph_rgw: Any) -> None:
    """RGW keeps connections alive (moto's server does not): parts reuse one connection; when
    the server side closes it while idle, the next read opens a new one, with a single attempt
    allowed (so no retry was spent)."""
    endpoint, creds = _rgw(ceph_rgw)
    bucket = _new_bucket(endpoint, creds)
    from urllib.parse import urlsplit

    up = urlsplit(endpoint)
    proxy = CuttingProxy((up.hostname, up.port))
    try:
        data = os.urandom(4 * MiB)
        with S3Store(bucket, endpoint_url=f"http://127.0.0.1:{proxy.port}", max_concurrency=1,
                     part_size_bytes=1 * MiB, max_attempts=1, **creds) as store:
            store.put("obj", data)
            for _ in range(2):
                buf = bytearray(len(data))
                assert store.get_into("obj", memoryview(buf)) == len(data) and buf == data
            accepted = proxy.accepted
            proxy.close_idle()
            time.sleep(0.2)
            buf = bytearray(len(data))
            assert store.get_into("obj", memoryview(buf)) == len(data) and buf == data
            assert store._direct.requests == 12
            assert proxy.accepted == accepted + 1  # one new connection for the 4 parts
    finally:
        proxy.close()
        _drop_bucket(endpoint, creds, bucket)


def test_a_store_manifest_naming_files_outside_the_model_is_refused_and_writes_nothing(
        store: ObjectStore, tiny_packed: Path, tmp_path: Path) -> None:
    """Whoever can write the bucket can write manifest.json: a block named ``../../x`` must not
    make a download write beside (or above) its destination."""
    upload_packed(store, tiny_packed, "m")
    doc = json.loads(store.get("m/manifest.json"))
    doc["blocks"][1]["file"] = "../../escaped.bin"
    store.put("m/manifest.json", json.dumps(doc).encode())
    dest = tmp_path / "a" / "b" / "dl" / "tiny"
    with pytest.raises(CheckpointError, match=r"blocks\[1\]\.file '\.\./\.\./escaped\.bin'"):
        download_packed(store, "m", dest)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if "store" not in p.parts) == []
