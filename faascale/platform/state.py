"""The platform's state directory (``$FAASCALE_HOME``, default ``~/.faascale``) and what lives there.

    platform.json   where the running platform listens (url, pid, instance, object store, Ray address)
    platform.lock   held by the running platform for its lifetime; names it (``instance.py``)
    tokens.json     the admin and invoke bearer tokens (mode 0600)
    registry.db     deployed functions and their events (SQLite)
    objects/        the embedded object store: packed models under objects/models/<model_id>/
    logs/           the platform daemon's log
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class PlatformInfo:
    """What ``faascale up`` writes for clients: how to reach the running platform."""

    url: str
    pid: int
    object_store: str
    ray_address: str
    started_s: float
    instance: str = ""  # the instance id (``instance.py``); "" in records of older versions


def platform_url(host: str, port: int) -> str:
    """The gateway's URL for clients on this machine (a wildcard bind is reached on loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


class StateDir:
    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if not root:  # imported here: the engine imports torch (seconds); the platform process,
            # given its home, takes its lock first
            from faascale.engine.sources import faascale_home

            root = faascale_home()
        self.root = Path(root)

    @property
    def platform_file(self) -> Path:
        return self.root / "platform.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "platform.lock"

    @property
    def tokens_file(self) -> Path:
        return self.root / "tokens.json"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.db"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def models(self) -> Path:
        return self.objects / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> "StateDir":
        for d in (self.root, self.models, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        return self

    def write_platform(self, info: PlatformInfo) -> None:
        tmp = self.platform_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=1))
        os.replace(tmp, self.platform_file)

    def read_platform(self) -> PlatformInfo | None:
        """The running platform's info, or None if none was started (or the file is stale junk)."""
        try:
            return PlatformInfo(**json.loads(self.platform_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def clear_platform(self, instance: str) -> bool:
        """Remove ``platform.json`` if it names ``instance``; True if it did."""
        info = self.read_platform()
        if info is None or info.instance != instance:
            return False
        self.platform_file.unlink(missing_ok=True)
        return True
