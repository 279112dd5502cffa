"""A directory as an object store (``file:///path`` or a plain path): the embedded default.

Writes are atomic (temp file + ``os.replace``), so a reader never sees half an object; reads go
straight from the page cache into the caller's buffer. The contract is ``store.ObjectStore``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from faascale.memory_tier.store import (BucketNotFound, ObjectNotFound, ObjectSizeMismatch,
                                        StoreAuthError, StoreError, byte_view, check_key,
                                        check_range)

_TMP_SUFFIX = ".faascale-partial"  # temp files beside their target; list() never shows them


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
        check_range(start, length)
        path = self._path(key)
        with self._errors(key), open(path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def get_into(self, key: str, buffer: memoryview) -> int:
        path = self._path(key)
        with self._errors(key), open(path, "rb", buffering=0) as f, byte_view(buffer) as view:
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

