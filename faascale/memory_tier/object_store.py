"""Object stores: the REMOTE tier, where packed models live between nodes.

One thin module owns this side effect. Two stores behind one ``ObjectStore`` protocol:

- ``LocalDirStore``: a directory, the embedded default (``file:///path`` or a plain path). Writes are
  atomic (temp file + ``os.replace``), so a reader never sees half an object.
- ``S3Store``: any S3 API (AWS, Ceph RGW, SeaweedFS, MinIO, moto) through boto3, path-style
  addressing. A whole object is read with parallel ranged GETs written straight into the caller's
  buffer (no extra copy of the object); large files are written with multipart uploads.

Keys are relative, ``/``-separated paths (``models/tiny-llama-abc/block-0000.bin``). Every failure
is a typed ``StoreError`` whose message names the store URI and the key. ``upload_packed`` and
``download_packed`` move a packed model (``manifest.json`` + tokenizer + blocks, see
``faascale.engine.checkpoint``) between a directory and a store; the manifest is written last in
both directions, so its presence means "complete model".
"""

from __future__ import annotations

import io
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from faascale.engine.blockio import preallocate
from faascale.engine.checkpoint import (MANIFEST_FILE, CheckpointError, CorruptBlockError,
                                        ModelManifest, block_problem, is_packed, read_manifest,
                                        verify_tokenizer)

MiB = 1 << 20
S3_ENDPOINT_ENV = "FAASCALE_S3_ENDPOINT"
_TMP_SUFFIX = ".faascale-partial"  # LocalDirStore temp files; list() never shows them
_UPLOAD_MARKER = MANIFEST_FILE + ".uploading"  # names the model an unfinished upload belongs to
_READ_CHUNK_BYTES = 1 * MiB  # socket -> buffer copy granularity inside one ranged GET


# ---------------------------------------------------------------------------------------------
# Errors


class StoreError(Exception):
    """An object-store operation failed. ``uri`` is the store, ``key`` the object (or None)."""

    def __init__(self, message: str, uri: str = "", key: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling (Ray ships exceptions)
        return (self.__class__, (str(self), self.uri, self.key))


class ObjectNotFound(StoreError):
    """The key does not exist in the store."""


class BucketNotFound(StoreError):
    """The bucket (S3) or the store directory (local) does not exist."""


class StoreAuthError(StoreError):
    """Bad or missing credentials, or access denied."""


class StoreUnavailable(StoreError):
    """The endpoint is down, unreachable or timing out (after retries)."""


class InvalidKey(StoreError, ValueError):
    """A key or URI is malformed (empty, absolute, ``..``, unsupported scheme)."""


class ObjectSizeMismatch(StoreError, ValueError):
    """``get_into``: the buffer is not exactly the object's size (the buffer is left untouched)."""

    def __init__(self, message: str, uri: str = "", key: str | None = None,
                 actual_bytes: int = -1, buffer_bytes: int = -1) -> None:
        super().__init__(message, uri, key)
        self.actual_bytes = actual_bytes
        self.buffer_bytes = buffer_bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (str(self), self.uri, self.key, self.actual_bytes, self.buffer_bytes))


# ---------------------------------------------------------------------------------------------
# The protocol


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key -> bytes store. All methods are thread-safe.

    Every method raises ``BucketNotFound`` when the store itself is missing, ``StoreAuthError`` on
    bad credentials, ``StoreUnavailable`` when the endpoint cannot be reached after retries and
    ``InvalidKey`` for a malformed key.
    """

    uri: str

    def get(self, key: str) -> bytes:
        """The whole object. Raises ObjectNotFound."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)``, fewer only where the object ends. Raises ObjectNotFound."""
        ...

    def get_into(self, key: str, buffer: memoryview) -> int:
        """Read the whole object into ``buffer`` (writable, exactly the object's size); returns bytes written.

        Raises ObjectNotFound, and ObjectSizeMismatch (a ValueError) without touching the buffer
        if the sizes differ. On any other error the buffer's contents are unspecified.
        """
        ...

    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ObjectNotFound."""
        ...

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Create or replace the object atomically (readers see the old or the new, never a mix)."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Like ``put`` with a file's contents, streamed (multipart on S3)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a string prefix, not a directory)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists (the store itself must exist)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...


def check_key(key: str, uri: str = "") -> str:
    """Return ``key`` if it is a relative ``/``-separated path without empty, ``.`` or ``..`` parts."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key \
            or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"{uri}: invalid key {key!r} (want a relative path like 'models/x/block-0000.bin')",
                         uri, key if isinstance(key, str) else None)
    return key


def _check_range(start: int, length: int) -> None:
    if start < 0 or length < 0:
        raise ValueError(f"range start and length must be >= 0, got start={start} length={length}")


@contextmanager
def _byte_view(buffer: Any) -> Iterator[memoryview]:
    """A flat writable byte view of ``buffer``, released on exit (so an mmap can close after)."""
    with memoryview(buffer) as raw:
        if raw.readonly:
            raise ValueError("get_into needs a writable buffer (bytearray, mmap, numpy array...)")
        if not raw.c_contiguous:
            raise ValueError("get_into needs a C-contiguous buffer")
        with raw.cast("B") as view:
            yield view


# ---------------------------------------------------------------------------------------------
# Local directory


class LocalDirStore:
    """A directory as an object store: key ``a/b`` is the file ``root/a/b``.

    ``create`` makes the directory if missing; otherwise a missing directory is BucketNotFound.
    Temp files (``.*.faascale-partial``) live beside their target and are never listed.
    """

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalDirStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key, self.uri)

    @contextmanager
    def _errors(self, key: str | None) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if not self.root.is_dir():
                raise BucketNotFound(f"{self.uri}: store directory does not exist", self.uri, key) from None
            raise ObjectNotFound(f"{self.uri}: no object {key!r}", self.uri, key) from None
        except PermissionError as exc:
            raise StoreAuthError(f"{self.uri}: access denied to {key!r}: {exc}", self.uri, key) from None
        except OSError as exc:
            raise StoreError(f"{self.uri}: {key!r}: {exc}", self.uri, key) from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key), open(path, "rb") as f:
            return f.read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        _check_range(start, length)
        path = self._path(key)
        with self._errors(key), open(path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def get_into(self, key: str, buffer: memoryview) -> int:
        path = self._path(key)
        with self._errors(key), open(path, "rb", buffering=0) as f, _byte_view(buffer) as view:
            size = os.fstat(f.fileno()).st_size
            if size != view.nbytes:
                raise ObjectSizeMismatch(f"{self.uri}: object {key!r} is {size} bytes but the buffer "
                                         f"is {view.nbytes}", self.uri, key, size, view.nbytes)
            done = 0
            while done < size:  # readinto on a raw file: straight from the page cache, no copy
                with view[done:] as rest:
                    n = f.readinto(rest)
                if not n:
                    raise StoreError(f"{self.uri}: {key!r} shrank while reading ({done} of {size} bytes)",
                                     self.uri, key)
                done += n
            return done

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors(key):
            st = path.stat()
            if not path.is_file():
                raise IsADirectoryError(key)
            return st.st_size

    def _write_atomic(self, key: str, write: Callable[[Path], None]) -> None:
        path = self._path(key)
        with self._errors(key):
            if not self.root.is_dir():
                raise FileNotFoundError(self.root)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
            try:
                write(tmp)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def put(self, key: str, data: bytes | memoryview) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        self._write_atomic(key, write)

    def put_file(self, key: str, path: Path) -> None:
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"put_file: {src} is not a file")

        def write(tmp: Path) -> None:
            shutil.copyfile(src, tmp)  # copy_file_range/sendfile on Linux
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        self._write_atomic(key, write)

    def list(self, prefix: str = "") -> list[str]:
        base = prefix.rpartition("/")[0]  # only walk the directory the prefix can be in
        if base:
            check_key(base, self.uri)
        if not self.root.is_dir():
            raise BucketNotFound(f"{self.uri}: store directory does not exist", self.uri, prefix or None)
        out = []
        for dirpath, _dirs, files in os.walk(self.root / base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        if path.is_file():
            return True
        if not self.root.is_dir():
            raise BucketNotFound(f"{self.uri}: store directory does not exist", self.uri, key)
        return False

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            try:
                path.unlink()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                if not self.root.is_dir():
                    raise
                return
        parent = path.parent  # drop directories the delete emptied (S3 has none to leave behind)
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


# ---------------------------------------------------------------------------------------------
# S3


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
                 connect_timeout_s: float = 2, read_timeout_s: float = 30) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

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

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def close(self) -> None:
        """Stop the part threads (idempotent); the store still works, restarting them on demand."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

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
        _check_range(start, length)
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
        with _byte_view(buffer) as view:
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
        def attempt() -> str:
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


# ---------------------------------------------------------------------------------------------
# Opening a store by URI


def open_store(uri: str, **options: Any) -> ObjectStore:
    """``s3://bucket[/prefix]`` -> S3Store; ``file:///path`` or a plain path -> LocalDirStore.

    ``options`` go to the store's constructor. For S3 the endpoint is ``endpoint_url`` if given,
    else ``$FAASCALE_S3_ENDPOINT``, else boto3's default (AWS). Raises InvalidKey for a malformed
    URI or an unsupported scheme.
    """
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidKey(f"{uri}: no bucket in the URI (want s3://bucket/prefix)", uri)
        endpoint = options.pop("endpoint_url", None) or os.environ.get(S3_ENDPOINT_ENV) or None
        return S3Store(bucket, prefix, endpoint_url=endpoint, **options)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidKey(f"{uri}: file URIs must be local (file:///path)", uri)
        return LocalDirStore(unquote(parsed.path), **options)
    if "://" in uri:
        raise InvalidKey(f"{uri}: unsupported store scheme (use s3://bucket/prefix, file:///path "
                         f"or a directory path)", uri)
    if not uri:
        raise InvalidKey("empty store URI (use s3://bucket/prefix, file:///path or a directory path)")
    return LocalDirStore(uri, **options)


# ---------------------------------------------------------------------------------------------
# Packed models in a store


def _key(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _remote_manifest(store: ObjectStore, key: str) -> str | None:
    try:
        return store.get(key).decode()
    except ObjectNotFound:
        return None


def _model_id_of(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return ModelManifest.from_json(text).model_id
    except CheckpointError:
        return None


def _remote_size(store: ObjectStore, key: str) -> int | None:
    try:
        return store.size(key)
    except ObjectNotFound:
        return None


def read_packed_metadata(store: ObjectStore, key_prefix: str) -> tuple[ModelManifest, str]:
    """The manifest and the verified ``tokenizer.json`` text of the packed model under
    ``key_prefix`` (two small GETs; the blocks are fetched by the node's block store). Raises
    ObjectNotFound if there is no model there and CheckpointError for a corrupt tokenizer."""
    manifest = ModelManifest.from_json(store.get(_key(key_prefix, MANIFEST_FILE)).decode())
    key = _key(key_prefix, manifest.tokenizer.file)
    return manifest, verify_tokenizer(manifest, store.get(key), f"{store.uri}/{key}")


def upload_packed(store: ObjectStore, packed_dir: Path, key_prefix: str,
                  progress: Callable[[int, int], None] | None = None) -> ModelManifest:
    """Upload a packed model under ``key_prefix``: tokenizer, blocks, then ``manifest.json`` last.

    Resumable: a block already in the store with the right size is skipped — but only when the
    store's manifest (or the ``manifest.json.uploading`` marker an unfinished upload leaves)
    names this same model id, so leftovers of a different model are never trusted. A different
    model's manifest under the prefix is deleted first, so readers never see a mix. An identical
    manifest is not rewritten. ``progress(done_blocks, num_blocks)`` is called after each block.
    Raises CheckpointError/CorruptBlockError for a bad local model and StoreError from the store.
    """
    packed_dir = Path(packed_dir)
    manifest = read_manifest(packed_dir)
    manifest_text = (packed_dir / MANIFEST_FILE).read_text()
    tok_path = packed_dir / manifest.tokenizer.file
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: tokenizer file is missing")
    verify_tokenizer(manifest, tok_path.read_bytes(), str(tok_path))
    for b in manifest.blocks:
        path = packed_dir / b.file
        if not path.is_file():
            raise CheckpointError(f"block {b.index} of model {manifest.model_id!r}: file {path} is missing")
        if path.stat().st_size != b.size_bytes:
            raise CorruptBlockError(manifest.block_id(b.index), f"{path} is {path.stat().st_size} bytes, "
                                    f"expected {b.size_bytes} (truncated?)")

    manifest_key, marker_key = _key(key_prefix, MANIFEST_FILE), _key(key_prefix, _UPLOAD_MARKER)
    remote = _remote_manifest(store, manifest_key)
    published = _model_id_of(remote) == manifest.model_id  # same id = same bytes (content hash)
    trusted = published
    if not published:
        if remote is not None:  # another model lives here: unpublish it before touching blocks
            store.delete(manifest_key)
        trusted = _model_id_of(_remote_manifest(store, marker_key)) == manifest.model_id
        if not trusted:
            store.put(marker_key, manifest_text.encode())

    files = [(manifest.tokenizer.file, tok_path.stat().st_size)] + [(b.file, b.size_bytes) for b in manifest.blocks]
    for i, (name, size_bytes) in enumerate(files):
        key = _key(key_prefix, name)
        if not (trusted and _remote_size(store, key) == size_bytes):
            store.put_file(key, packed_dir / name)
        if progress and i > 0:
            progress(i, manifest.num_blocks)
    if remote != manifest_text:
        store.put(manifest_key, manifest_text.encode())
    if not published:
        store.delete(marker_key)
    return manifest


def _download_block(store: ObjectStore, manifest: ModelManifest, index: int, key: str,
                    path: Path) -> None:
    """Block ``index`` from ``key`` into the new file ``path``, verified; CorruptBlockError if bad.

    The file is preallocated and mapped, and the store writes into the mapping: the bytes go from
    the socket (or the source file) into the page cache once.
    """
    info = manifest.blocks[index]
    block_id = manifest.block_id(index)
    where = f"{key} in {store.uri}"
    problem = None
    try:
        with open(path, "w+b") as f:
            if info.size_bytes == 0:
                problem = block_problem(manifest, index, store.get(key))
            else:
                preallocate(f.fileno(), info.size_bytes)
                with mmap.mmap(f.fileno(), info.size_bytes) as mm:
                    with memoryview(mm) as view:
                        store.get_into(key, view)
                    problem = block_problem(manifest, index, mm)
    except ObjectSizeMismatch as exc:
        problem = f"is {exc.actual_bytes} bytes, expected {info.size_bytes} (truncated?)"
    if problem is not None:
        raise CorruptBlockError(block_id, f"{where}: {problem}")


def download_packed(store: ObjectStore, key_prefix: str, dest_dir: Path,
                    progress: Callable[[int, int], None] | None = None,
                    max_parallel_blocks: int = 4) -> Path:
    """Download the packed model under ``key_prefix`` into ``dest_dir``, verified; returns ``dest_dir``.

    Files land in a temp directory beside ``dest_dir`` (same filesystem), every block's checksum and
    the tokenizer's checksum are checked, and only then is the directory renamed into place: on
    any error (CorruptBlockError for a corrupt or truncated block, CheckpointError for a bad
    tokenizer or manifest, StoreError from the store) nothing is left at ``dest_dir``. If
    ``dest_dir`` already holds the same model (same model id) it is returned as is — also when a
    concurrent download got there first; a different model there raises CheckpointError. Files
    are not fsynced: a crash may leave pages unwritten, which ``LLM.load``'s checksums catch.
    ``progress(done_blocks, num_blocks)`` is called from this thread as blocks complete.
    ObjectNotFound if there is no ``manifest.json`` under the prefix (no complete model).
    """
    dest = Path(dest_dir)
    manifest_text = store.get(_key(key_prefix, MANIFEST_FILE)).decode()
    manifest = ModelManifest.from_json(manifest_text)
    if _holds_model(dest, manifest):
        if progress:
            progress(manifest.num_blocks, manifest.num_blocks)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest}: exists and is not the packed model {manifest.model_id!r}; "
                              f"remove it or download elsewhere")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        tok = store.get(_key(key_prefix, manifest.tokenizer.file))
        verify_tokenizer(manifest, tok, f"{_key(key_prefix, manifest.tokenizer.file)} in {store.uri}")
        (tmp / manifest.tokenizer.file).write_bytes(tok)
        _download_blocks(store, manifest, key_prefix, tmp, progress, max_parallel_blocks)
        (tmp / MANIFEST_FILE).write_text(manifest_text)  # last: its presence = complete model
        try:
            os.rename(tmp, dest)  # replaces dest only if it is an empty directory
        except OSError:
            if not _holds_model(dest, manifest):
                raise CheckpointError(f"{dest}: appeared during the download and is not the packed "
                                      f"model {manifest.model_id!r}") from None
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent download won: same bytes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _holds_model(dest: Path, manifest: ModelManifest) -> bool:
    if not is_packed(dest):
        return False
    try:
        return read_manifest(dest).model_id == manifest.model_id
    except CheckpointError:
        return False


def _download_blocks(store: ObjectStore, manifest: ModelManifest, key_prefix: str, tmp: Path,
                     progress: Callable[[int, int], None] | None, max_parallel_blocks: int) -> None:
    # A few blocks at once keep the store's part pool full across block boundaries (and overlap
    # one block's checksum with the next one's transfer); the S3 part pool bounds total requests.
    workers = max(1, min(max_parallel_blocks, manifest.num_blocks))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="download-block")
    try:
        futures = [pool.submit(_download_block, store, manifest, b.index, _key(key_prefix, b.file),
                               tmp / b.file) for b in manifest.blocks]
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()
            if progress:
                progress(done, manifest.num_blocks)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running blocks finish before tmp is removed
        raise
    pool.shutdown(wait=True)


__all__ = [
    "BucketNotFound", "InvalidKey", "LocalDirStore", "ObjectNotFound", "ObjectSizeMismatch",
    "ObjectStore", "S3Store", "StoreAuthError", "StoreError", "StoreUnavailable", "check_key",
    "download_packed", "open_store", "upload_packed",
]
