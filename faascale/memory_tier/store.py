"""Object stores: the REMOTE tier, where packed models live between nodes — the contract.

One ``ObjectStore`` protocol, two implementations (``local_store.LocalDirStore``, a directory, the
embedded default; ``s3_store.S3Store``, any S3 API through boto3), and ``open_store`` to pick one by
URI. Keys are relative, ``/``-separated paths (``models/tiny-llama-abc/block-0000.bin``). Every
failure is a typed ``StoreError`` whose message names the store URI and the key. Moving a packed
model in and out of a store is ``packed.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

S3_ENDPOINT_ENV = "FAASCALE_S3_ENDPOINT"


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


def check_range(start: int, length: int) -> None:
    """ValueError for a negative ``start`` or ``length`` of a ranged read."""
    if start < 0 or length < 0:
        raise ValueError(f"range start and length must be >= 0, got start={start} length={length}")


@contextmanager
def byte_view(buffer: Any) -> Iterator[memoryview]:
    """A flat writable byte view of ``buffer``, released on exit (so an mmap can close after)."""
    with memoryview(buffer) as raw:
        if raw.readonly:
            raise ValueError("get_into needs a writable buffer (bytearray, mmap, numpy array...)")
        if not raw.c_contiguous:
            raise ValueError("get_into needs a C-contiguous buffer")
        with raw.cast("B") as view:
            yield view


# ---------------------------------------------------------------------------------------------
# Opening a store by URI


def open_store(uri: str, **options: Any) -> ObjectStore:
    """``s3://bucket[/prefix]`` -> S3Store; ``file:///path`` or a plain path -> LocalDirStore.

    ``options`` go to the store's constructor. For S3 the endpoint is ``endpoint_url`` if given,
    else ``$FAASCALE_S3_ENDPOINT``, else boto3's default (AWS). Raises InvalidKey for a malformed
    URI or an unsupported scheme.
    """
    # The concrete stores import this module (its errors and helpers), so they are imported on
    # use. Neither imports boto3 until an S3Store is made.
    from faascale.memory_tier.local_store import LocalDirStore
    from faascale.memory_tier.s3_store import S3Store

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

