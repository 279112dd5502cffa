"""Any S3 API (AWS, Ceph RGW, SeaweedFS, MinIO, moto) as an object store, through boto3.

Path-style addressing. A whole object is read with parallel ranged GETs written straight into the
caller's buffer (``s3_direct``: presigned GETs whose bodies the kernel copies into the buffer; a
request it cannot answer goes through boto3); large files are written with multipart uploads.
botocore retries requests; a body that breaks mid-stream is re-fetched here. boto3's and
botocore's errors become the typed ``store`` errors. The contract is ``store.ObjectStore``.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from faascale.memory_tier.store import (BucketNotFound, InvalidKey, ObjectNotFound,
                                        ObjectSizeMismatch, StoreAuthError, StoreError,
                                        StoreUnavailable, byte_view, check_key, check_range)

MiB = 1 << 20
_READ_CHUNK_BYTES = 1 * MiB  # socket -> buffer copy granularity inside one ranged GET
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
               "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"}
_UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503",
                      "500", "502", "504"}


class S3Store:
    """A bucket (and optional key prefix) on any S3 API, through one thread-safe boto3 client.

    ``get_into`` splits an object into ``part_size_bytes`` ranges fetched by up to
    ``max_concurrency`` threads (one pool per store, shared by concurrent calls, so the total number
    of requests in flight stays bounded). boto3's standard retry mode retries failed requests up to
    ``max_attempts`` times; a body that breaks mid-stream is re-fetched by us, as often. Credentials
    come from ``access_key``/``secret_key`` if given, else the standard AWS chain (env, profile,
    instance role). Close with ``close()`` (or use as a context manager) to stop the part threads.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, max_concurrency: int = 8,
                 part_size_bytes: int = 8 * MiB, max_attempts: int = 4,
                 connect_timeout_s: float = 2, read_timeout_s: float = 30,
                 direct_reads: bool = True) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        # with boto3, not at import: http.client and ssl cost ~60 ms that boto3 pays anyway
        from faascale.memory_tier.s3_direct import DirectRangedGets, usable_for

        if not bucket or "/" in bucket:
            raise InvalidKey(f"s3://{bucket}: invalid bucket name {bucket!r}", f"s3://{bucket}")
        if max_concurrency < 1 or max_attempts < 1 or part_size_bytes < 64 * 1024:
            raise ValueError(f"S3Store: need max_concurrency >= 1, max_attempts >= 1 and "
                             f"part_size_bytes >= 65536; got {max_concurrency}, {max_attempts}, "
                             f"{part_size_bytes}")
        if (access_key is None) != (secret_key is None):
            raise ValueError("S3Store: give both access_key and secret_key, or neither (AWS chain)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.max_concurrency = max_concurrency
        self.part_size_bytes = part_size_bytes
        self.max_attempts = max_attempts
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            # parts + a multipart upload's threads + a few plain calls, without pool warnings
            max_pool_connections=2 * max_concurrency + 2,
            s3={"addressing_style": "path"},  # Ceph RGW, SeaweedFS, MinIO, moto
            signature_version="s3v4",  # presigned GETs too (botocore would presign SigV2)
            # boto3 >= 1.36 adds CRC32 checksums by default; several S3-compatible stores reject them
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint_url: str = self._client.meta.endpoint_url
        self._transfer = TransferConfig(multipart_threshold=part_size_bytes,
                                        multipart_chunksize=part_size_bytes,
                                        max_concurrency=max_concurrency, use_threads=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # get_into's parts read straight into the buffer (s3_direct); boto3 for everything else
        self._direct = DirectRangedGets(
            self._client, bucket, connect_timeout_s, read_timeout_s,
            ca_bundle=os.environ.get("AWS_CA_BUNDLE")) \
            if direct_reads and usable_for(self.endpoint_url) else None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def close(self) -> None:
        """Stop the part threads (idempotent); the store still works, restarting them on demand."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> "S3Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parts_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-part")
            return self._pool

    def _full_key(self, key: str) -> str:
        check_key(key, self.uri)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- error mapping ------------------------------------------------------------------------

    def _error(self, exc: BaseException, key: str | None, op: str) -> StoreError:
        """The typed error for a boto3/botocore failure of ``op`` on ``key``."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError,
                                         ConnectionError, CredentialRetrievalError,
                                         IncompleteReadError, NoCredentialsError,
                                         PartialCredentialsError, ReadTimeoutError,
                                         ResponseStreamingError)

        cause = exc
        if not isinstance(exc, (BotoCoreError, ClientError)):  # boto3's S3UploadFailedError
            cause = exc.__cause__ or exc.__context__ or exc
        what = f"{op} {key!r}" if key else op
        where = f"{self.uri} (endpoint {self.endpoint_url})"
        if isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = err.get("Message") or code
            if code == "NoSuchBucket":
                return BucketNotFound(f"{self.uri}: bucket {self.bucket!r} does not exist "
                                      f"(endpoint {self.endpoint_url})", self.uri, key)
            if code in _NOT_FOUND_CODES or status == 404:
                return ObjectNotFound(f"{self.uri}: no object {key!r}", self.uri, key)
            if code in _AUTH_CODES or status in (401, 403):
                return StoreAuthError(f"{where}: access denied for {what} ({code}: {detail}); "
                                      f"check the access key and secret", self.uri, key)
            if code in _UNAVAILABLE_CODES or (status or 0) >= 500:
                return StoreUnavailable(f"{where}: {what} failed after {self.max_attempts} "
                                        f"attempts ({code}: {detail})", self.uri, key)
            return StoreError(f"{where}: {what} failed ({code}: {detail})", self.uri, key)
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return StoreAuthError(f"{where}: no usable credentials for {what} ({cause}); pass "
                                  f"access_key/secret_key or set AWS_ACCESS_KEY_ID/"
                                  f"AWS_SECRET_ACCESS_KEY", self.uri, key)
        if isinstance(cause, (ConnectionError, ConnectionClosedError, ReadTimeoutError,
                              ResponseStreamingError, IncompleteReadError)):
            return StoreUnavailable(f"{where}: endpoint unreachable or timing out for {what} after "
                                    f"{self.max_attempts} attempts: {cause}", self.uri, key)
        return StoreError(f"{where}: {what} failed: {cause}", self.uri, key)

    @contextmanager
    def _errors(self, key: str | None, op: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._error(exc, key, op) from exc

    def _missing(self, key: str) -> StoreError:
        """A HEAD 404 does not say whether the key or the bucket is missing: ask the bucket."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
                return BucketNotFound(f"{self.uri}: bucket {self.bucket!r} does not exist "
                                      f"(endpoint {self.endpoint_url})", self.uri, key)
        except Exception:  # noqa: BLE001 - the 404 on the key is the error worth reporting
            pass
        return ObjectNotFound(f"{self.uri}: no object {key!r}", self.uri, key)

    def _retrying(self, key: str, op: str, attempt_fn: Callable[[], Any]) -> Any:
        """Run one request + body read, mapping errors; re-run it if the body breaks mid-stream.

        botocore retries the request itself (``max_attempts``); it cannot retry a body we are
        still reading, so a ``_BrokenBody`` is retried here, as often.
        """
        for attempt in range(self.max_attempts):
            try:
                with self._errors(key, op):
                    return attempt_fn()
            except _BrokenBody as exc:
                if attempt + 1 < self.max_attempts:
                    time.sleep(min(0.05 * 2 ** attempt, 1.0))
                    continue
                raise StoreUnavailable(f"{self.uri} (endpoint {self.endpoint_url}): reading {key!r} "
                                       f"broke off {self.max_attempts} times: {exc}",
                                       self.uri, key) from exc.__cause__
        raise AssertionError("unreachable")

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._full_key(key)

        def attempt() -> bytes:
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            with body, _reading_body():
                return body.read()  # botocore checks the length (IncompleteReadError)

        return self._retrying(key, "GET", attempt)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        check_range(start, length)
        if length == 0:
            self.size(key)  # still report a missing key
            return b""
        full = self._full_key(key)

        def attempt() -> bytes:
            try:
                resp = self._ranged_get(full, start, length)
            except _RangeNotSatisfiable:
                return b""  # start is at or past the end (S3 answers 416 only for an existing key)
            body = resp["Body"]
            with body, _reading_body():
                data = body.read()
            if "ContentRange" not in resp and start > 0:  # a server that ignored Range: slice it
                data = data[start:start + length]
            return data[:length]

        return self._retrying(key, "GET range", attempt)

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def _head(self, key: str) -> dict[str, Any]:
        full = self._full_key(key)
        try:
            with self._errors(key, "HEAD"):
                return self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            raise self._missing(key) from None

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except ObjectNotFound:
            return False

    def get_into(self, key: str, buffer: memoryview) -> int:
        """Parallel ranged GETs, each written in place into its slice of ``buffer``.

        No HEAD first: every part's ``Content-Range`` carries the object's total size, checked
        before a single byte is written, and all parts must carry the same ETag (an object replaced
        mid-read raises StoreError instead of returning a mix).
        """
        full = self._full_key(key)
        with byte_view(buffer) as view:
            total = view.nbytes
            if total == 0:
                actual = self.size(key)
                if actual != 0:
                    raise self._size_mismatch(key, actual, 0)
                return 0
            ranges = [(off, min(self.part_size_bytes, total - off))
                      for off in range(0, total, self.part_size_bytes)]
            try:
                if len(ranges) == 1:  # no thread hop for a small object
                    etags = [self._get_part_into(key, full, view, 0, total, total)]
                else:
                    etags = self._run_parts(key, full, view, ranges, total)
            except _RangeNotSatisfiable:  # a part starts past the end: the object is smaller
                raise self._size_mismatch(key, self.size(key), total) from None
            if len(set(etags)) > 1:
                raise StoreError(f"{self.uri}: object {key!r} changed while it was being read "
                                 f"(ETags {sorted(set(etags))}); read it again", self.uri, key)
            return total

    def _run_parts(self, key: str, full: str, view: memoryview, ranges: list[tuple[int, int]],
                   total: int) -> list[str]:
        pool = self._parts_pool()
        futures: list[Future[str]] = [pool.submit(self._get_part_into, key, full, view, off, n, total)
                                      for off, n in ranges]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending or any(f.exception() is not None for f in futures):
            for f in pending:
                f.cancel()
            wait(futures)  # no part may still write into the caller's buffer after we return
            failed = next(f for f in futures if not f.cancelled() and f.exception() is not None)
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _get_part_into(self, key: str, full: str, view: memoryview, offset: int, length: int,
                       total: int) -> str:
        """GET ``[offset, offset + length)`` into ``view[offset:...]``; returns the part's ETag.

        Raises ObjectSizeMismatch before writing if the object is not ``total`` bytes, and
        _RangeNotSatisfiable (416) if the object ends before ``offset``.
        """
        def check(actual_total: int, content_length: int) -> None:
            if actual_total != total:
                raise self._size_mismatch(key, actual_total, total)
            if content_length != length:
                raise StoreError(f"{self.uri}: ranged GET of {key!r} bytes {offset}+{length} "
                                 f"returned {content_length} bytes", self.uri, key)

        def attempt() -> str:
            if self._direct is not None:
                from faascale.memory_tier.s3_direct import DirectUnavailable

                try:
                    with _reading_body(), view[offset:offset + length] as part:
                        return self._direct.get_range_into(full, offset, part, check)
                except DirectUnavailable:
                    pass  # boto3 answers this request: its errors are the typed ones
            resp = self._ranged_get(full, offset, length)
            body = resp["Body"]
            with body:
                actual_total = _total_size(resp)
                if actual_total != total:
                    raise self._size_mismatch(key, actual_total, total)
                if int(resp["ContentLength"]) != length:
                    raise StoreError(f"{self.uri}: ranged GET of {key!r} bytes {offset}+{length} "
                                     f"returned {resp['ContentLength']} bytes (Range ignored?)",
                                     self.uri, key)
                done = 0
                with _reading_body(), view[offset:offset + length] as part:
                    while done < length:
                        with part[done:done + _READ_CHUNK_BYTES] as chunk:
                            n = body.readinto(chunk)
                        if not n:
                            raise _BrokenBody(f"body ended after {done} of {length} bytes")
                        done += n
            return str(resp.get("ETag", ""))

        return self._retrying(key, "GET part", attempt)

    def _ranged_get(self, full: str, start: int, length: int) -> dict[str, Any]:
        """One GET of bytes ``[start, start + length)``; _RangeNotSatisfiable if the object ends
        before ``start`` (416). Other client errors propagate to ``_retrying``."""
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=full,
                                           Range=f"bytes={start}-{start + length - 1}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                raise _RangeNotSatisfiable() from None
            raise

    def _size_mismatch(self, key: str, actual: int, buffer_bytes: int) -> ObjectSizeMismatch:
        return ObjectSizeMismatch(f"{self.uri}: object {key!r} is {actual} bytes but the buffer is "
                                  f"{buffer_bytes}", self.uri, key, actual, buffer_bytes)

    # -- writes -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        full = self._full_key(key)
        with memoryview(data) as raw, raw.cast("B") as view:
            size = view.nbytes
            body: Any = data if isinstance(data, bytes) else _ViewReader(view)
            with self._errors(key, "PUT"):
                if size <= self.part_size_bytes:
                    self._client.put_object(Bucket=self.bucket, Key=full, Body=body)
                else:
                    fileobj = io.BytesIO(data) if isinstance(data, bytes) else body  # BytesIO(bytes): no copy
                    self._client.upload_fileobj(fileobj, self.bucket, full, Config=self._transfer)
            if isinstance(body, _ViewReader):
                body.close()

    def put_file(self, key: str, path: Path) -> None:
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"put_file: {src} is not a file")
        full = self._full_key(key)
        with self._errors(key, "PUT"):
            self._client.upload_file(str(src), self.bucket, full, Config=self._transfer)

    def list(self, prefix: str = "") -> list[str]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        with self._errors(prefix or None, "LIST"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix)
            for page in pages:
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
        return sorted(out)

    def delete(self, key: str) -> None:
        full = self._full_key(key)
        with self._errors(key, "DELETE"):
            self._client.delete_object(Bucket=self.bucket, Key=full)


class _BrokenBody(Exception):
    """A response body broke off mid-stream (reset, timeout, short); the request is re-run."""


class _RangeNotSatisfiable(Exception):
    """A ranged GET started past the object's end (HTTP 416)."""


@contextmanager
def _reading_body() -> Iterator[None]:
    """Turn errors while reading a response body into _BrokenBody (retried by ``_retrying``)."""
    import urllib3.exceptions
    from botocore.exceptions import (ConnectionClosedError, IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)

    try:
        yield
    except (ResponseStreamingError, ReadTimeoutError, IncompleteReadError, ConnectionClosedError,
            urllib3.exceptions.HTTPError, OSError) as exc:
        raise _BrokenBody(repr(exc)) from exc


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _total_size(resp: dict[str, Any]) -> int:
    """The whole object's size from a (ranged) GET response."""
    m = _CONTENT_RANGE.match(str(resp.get("ContentRange") or ""))
    if m and m.group(3) != "*":
        return int(m.group(3))
    return int(resp["ContentLength"])  # no Content-Range: the server sent the whole object


class _ViewReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, so uploads of a view copy nothing up front."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._view.nbytes - self._pos)
        if n <= 0:
            return 0
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.nbytes}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

