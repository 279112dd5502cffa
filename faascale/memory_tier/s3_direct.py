"""Ranged GETs read straight into the caller's buffer: the S3 store's hot path.

Through boto3 a response body is urllib3's, whose ``readinto`` is ``read`` and a copy: every byte
lands in a fresh ``bytes`` first and is copied again into the destination, with Python's
allocator and garbage collector busy in between. Here one part is one GET of a URL that botocore
presigns (SigV4 with the client's own credentials, region and addressing; nothing else is
signed by hand), sent over a keep-alive ``http.client`` connection of the calling thread, whose
body the kernel copies with ``recv_into`` straight into the destination's slice. On the emulated
cluster at 1 Gbit/s (Ceph RGW, the synthetic 0.98 GB model, 4 blocks of 8 MiB parts in flight)
a node's CPU per GB received fell from 1.5-1.7 s through boto3 to 1.0-1.1 s (``benchmarks/
scaleout.py``'s one-node store load shows the whole loader's).

Only the success path lives here. A response other than 206 (Partial Content), and a connection
that cannot be made, raise ``DirectUnavailable``: the caller repeats that request through boto3,
whose retries and error shapes give the typed store errors (404, 403, 416, 5xx, a server that
ignores Range). A body that breaks off raises ``BrokenResponse`` (an ``OSError``) for the caller's
own re-fetch. Plain-HTTP sockets are blocking with a kernel receive timeout (``SO_RCVTIMEO``), so
no ``poll`` precedes each ``recv``; HTTPS keeps Python's socket timeout. Not used through a proxy
(boto3 then reads as before).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

PRESIGN_EXPIRES_S = 900  # a part's URL is used at once; this only bounds clock skew


class DirectUnavailable(Exception):
    """This request cannot go the direct way (no connection, or not a 206): use boto3 for it."""


class BrokenResponse(ConnectionError):
    """The response broke off or was malformed after it began (re-fetch the part)."""


def usable_for(endpoint_url: str) -> bool:
    """Whether direct reads may be used for ``endpoint_url``: HTTP or HTTPS and no proxy for it
    (boto3 honours proxies; this path does not)."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    return parts.scheme not in proxies or bool(urllib.request.proxy_bypass(parts.hostname))


class DirectRangedGets:
    """Presigned ranged GETs over one keep-alive connection per calling thread.

    ``client`` is a botocore S3 client (it signs the URLs); ``connect_timeout_s`` bounds a
    connection's setup, ``read_timeout_s`` every wait for bytes. Thread-safe; ``close`` closes
    every connection (later calls open new ones).
    """

    def __init__(self, client: object, bucket: str, connect_timeout_s: float,
                 read_timeout_s: float, ca_bundle: str | None = None) -> None:
        self._client = client
        self._bucket = bucket
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        endpoint = urlsplit(client.meta.endpoint_url)  # type: ignore[attr-defined]
        self._https = endpoint.scheme == "https"
        self._host = endpoint.hostname or ""
        self._port = endpoint.port or (443 if self._https else 80)
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if self._https else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[http.client.HTTPConnection] = set()
        self.requests = 0  # GETs answered with 206 (read here, not by boto3)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()

    def get_range_into(self, key: str, offset: int, dest: memoryview,
                       check: Callable[[int, int], None]) -> str:
        """GET bytes ``[offset, offset + len(dest))`` of ``key`` (the bucket's full key) into
        ``dest``; returns the ETag. ``check(total, content_length)`` sees the object's total
        size (from Content-Range) and the body's length before a byte is written, and raises to
        refuse them (nothing is written then)."""
        length = dest.nbytes
        url = self._client.generate_presigned_url(  # type: ignore[attr-defined]
            "get_object", Params={"Bucket": self._bucket, "Key": key},
            ExpiresIn=PRESIGN_EXPIRES_S)
        target = urlsplit(url)
        path = f"{target.path}?{target.query}" if target.query else target.path
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        conn, resp = self._send(path, headers)
        try:
            if resp.status != 206:
                resp.read(64 * 1024)  # an error document is small; the connection is dropped
                raise DirectUnavailable(f"status {resp.status}")
            total = _content_range_total(resp.getheader("Content-Range") or "")
            check(total, int(resp.getheader("Content-Length") or -1))
            done = 0
            while done < length:
                try:
                    n = resp.readinto(dest[done:])
                except (OSError, http.client.HTTPException) as exc:
                    raise BrokenResponse(f"body broke off after {done} of {length} bytes: "
                                         f"{exc!r}") from exc
                if not n:
                    raise BrokenResponse(f"body ended after {done} of {length} bytes")
                done += n
            etag = resp.getheader("ETag") or ""
        except BaseException:
            self._drop(conn)
            raise
        if resp.will_close:
            self._drop(conn)
        with self._lock:
            self.requests += 1
        return etag

    # -- connections ----------------------------------------------------------------------------

    def _send(self, path: str, headers: dict[str, str]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the GET on this thread's connection; a kept-alive one that the server closed
        meanwhile is replaced once. DirectUnavailable if no connection can be made."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        for reused in ((True, False) if conn is not None else (False,)):
            if not reused:
                conn = self._connect()
            try:
                conn.request("GET", path, headers=headers)  # type: ignore[union-attr]
                return conn, conn.getresponse()  # type: ignore[union-attr,return-value]
            except (OSError, http.client.HTTPException) as exc:
                self._drop(conn)  # type: ignore[arg-type]
                if not reused:
                    raise BrokenResponse(f"request failed on a new connection: {exc!r}") from exc
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, context=self._ssl,
                                               timeout=self._connect_timeout_s)
        else:
            conn = http.client.HTTPConnection(self._host, self._port,
                                              timeout=self._connect_timeout_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise DirectUnavailable(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        sock = conn.sock
        if self._https:
            sock.settimeout(self._read_timeout_s)
        else:  # blocking, with the kernel's timeout: no poll() before every recv
            sock.settimeout(None)
            timeval = struct.pack("ll", int(self._read_timeout_s),
                                  int(self._read_timeout_s % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._conns.discard(conn)


def _content_range_total(value: str) -> int:
    """The object's total size from ``bytes a-b/total``; BrokenResponse if it is missing."""
    try:
        if not value.startswith("bytes "):
            raise ValueError(value)
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise BrokenResponse(f"206 without a usable Content-Range ({value!r})") from None
