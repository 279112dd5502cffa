"""Packed models in an object store: upload, download, the metadata, and ``s3://`` sources.

``upload_packed`` and ``download_packed`` move a packed model (``manifest.json`` + tokenizer +
blocks, see ``faascale.engine.checkpoint``) between a directory and a store; the manifest is
written last in both directions, so its presence means "complete model". ``fetch_packed`` is the
remote fetcher ``engine.sources.resolve_packed`` takes for ``s3://`` model sources.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from faascale.engine.blockio import preallocate
from faascale.engine.checkpoint import is_packed, read_manifest
from faascale.engine.manifest import (MANIFEST_FILE, CheckpointError, CorruptBlockError,
                                      ModelManifest, block_problem, verify_tokenizer)
from faascale.engine.sources import SourceError
from faascale.memory_tier.store import (ObjectNotFound, ObjectSizeMismatch, ObjectStore, StoreError,
                                        open_store)

_UPLOAD_MARKER = MANIFEST_FILE + ".uploading"  # names the model an unfinished upload belongs to


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


class ManifestMismatch(CheckpointError):
    """The manifest in the store is not the one the function was deployed with: the model was
    replaced (or tampered with) after the deploy. Its blocks are verified against the manifest,
    so the manifest is what binds a replica to the deployed model."""


def manifest_digest(raw: bytes) -> str:
    """The digest a deploy records for a manifest's exact bytes (``sha256:<hex>``)."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def read_packed_metadata(store: ObjectStore, key_prefix: str, expect_digest: str = ""
                         ) -> tuple[ModelManifest, str]:
    """The manifest and the verified ``tokenizer.json`` text of the packed model under
    ``key_prefix`` (two small GETs; the blocks are fetched by the node's block store).

    ``expect_digest``: the deployed manifest's ``manifest_digest``; when given, any other
    manifest raises ManifestMismatch before it is parsed. Raises ObjectNotFound if there is no
    model there and CheckpointError for a corrupt manifest or tokenizer."""
    manifest, _, tokenizer_json = read_packed_metadata_digest(store, key_prefix, expect_digest)
    return manifest, tokenizer_json


def _bound(raw: bytes, expect_digest: str, where: str) -> str:
    """The digest of manifest bytes ``raw`` read from ``where``; ManifestMismatch if a digest is
    expected and this is another."""
    digest = manifest_digest(raw)
    if expect_digest and digest != expect_digest:
        raise ManifestMismatch(f"{where} is not the manifest this function was deployed with "
                               f"({digest[:19]}… != deployed {expect_digest[:19]}…): the model "
                               f"was replaced after the deploy; redeploy the function to serve "
                               f"the new one")
    return digest


def check_manifest(packed_dir: Path, expect_digest: str) -> None:
    """ManifestMismatch unless ``packed_dir``'s manifest is the deployed one (no-op without a
    digest): for a replica that loads a packed directory directly, without a store."""
    if expect_digest:
        path = Path(packed_dir) / MANIFEST_FILE
        _bound(path.read_bytes(), expect_digest, str(path))


def read_packed_metadata_digest(store: ObjectStore, key_prefix: str, expect_digest: str = ""
                                ) -> tuple[ModelManifest, str, str]:
    """``read_packed_metadata`` plus the manifest's digest: (manifest, digest, tokenizer text)."""
    key = _key(key_prefix, MANIFEST_FILE)
    raw = store.get(key)
    digest = _bound(raw, expect_digest, f"{store.uri}/{key}")
    try:
        manifest = ModelManifest.from_json(raw.decode())
    except UnicodeDecodeError:
        raise CheckpointError(f"{store.uri}/{key}: manifest is not UTF-8") from None
    tok_key = _key(key_prefix, manifest.tokenizer.file)
    return manifest, digest, verify_tokenizer(manifest, store.get(tok_key), f"{store.uri}/{tok_key}")


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
                    max_parallel_blocks: int = 4, expect_digest: str = "") -> Path:
    """Download the packed model under ``key_prefix`` into ``dest_dir``, verified; returns ``dest_dir``.

    Files land in a temp directory beside ``dest_dir`` (same filesystem), every block's checksum and
    the tokenizer's checksum are checked, and only then is the directory renamed into place: on
    any error (CorruptBlockError for a corrupt or truncated block, CheckpointError for a bad
    tokenizer or manifest, StoreError from the store) nothing is left at ``dest_dir``. If
    ``dest_dir`` already holds the same model (same model id) it is returned as is — also when a
    concurrent download got there first; a different model there raises CheckpointError. Files
    are not fsynced: a crash may leave pages unwritten, which ``LLM.load``'s checksums catch.
    ``progress(done_blocks, num_blocks)`` is called from this thread as blocks complete.
    ObjectNotFound if there is no ``manifest.json`` under the prefix (no complete model);
    ManifestMismatch if ``expect_digest`` is given and the manifest is another.
    """
    dest = Path(dest_dir)
    key = _key(key_prefix, MANIFEST_FILE)
    raw = store.get(key)
    _bound(raw, expect_digest, f"{store.uri}/{key}")
    manifest_text = raw.decode()
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




def fetch_packed(uri: str, cache_root: Path, progress: Callable[[int, int], None] | None = None
                 ) -> Path:
    """The packed model at ``uri`` (``s3://bucket/prefix``), downloaded once into
    ``cache_root/<model id>`` (verified, atomic: see ``download_packed``); the fetcher
    ``engine.sources.resolve_packed`` takes for remote sources. Content-addressed: a model replaced
    under the same URI is a new download, never a stale cache. Raises SourceError for a malformed
    URI and for any store error (the message names the URI)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not uri.startswith("s3://") or not bucket or not prefix:
        raise SourceError(f"model.source: {uri} must be s3://bucket/prefix of a packed model")
    try:
        with open_store(f"s3://{bucket}") as store:
            manifest = ModelManifest.from_json(store.get(_key(prefix, MANIFEST_FILE)).decode())
            return download_packed(store, prefix, Path(cache_root) / manifest.model_id, progress)
    except StoreError as exc:
        raise SourceError(f"model.source: {uri}: {exc}") from None
