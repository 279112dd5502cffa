"""Deployed functions and their events, persisted in SQLite (the state directory's registry.db).

Safe to use from several threads (one connection per call) and processes (WAL journal); a call
waits up to ``LOCK_WAIT_S`` for another process's write lock. A row that no longer parses (a spec
written by another version, a hand edit, a damaged file) never takes the others down: ``list``
and the event readers leave it out (logged once per row), ``get`` raises ``UnreadableRecord``
naming it, and ``delete`` still removes it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.platform.spec import FunctionSpec, parse_function_spec

log = logging.getLogger(__name__)
LOCK_WAIT_S = 30.0
STARTUP_PROFILE = "startup_profile"  # the event kind of a replica start's StartupProfile

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- the FunctionSpec document (JSON)
    base_dir TEXT NOT NULL,      -- where relative paths (handler module) resolve
    model_dir TEXT NOT NULL,     -- where the packed model lives: a directory or s3://bucket/prefix
    model_id TEXT NOT NULL,
    created_s REAL NOT NULL,
    updated_s REAL NOT NULL,
    manifest_digest TEXT NOT NULL DEFAULT ''  -- the deployed manifest's sha256 (binds replicas)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    function TEXT NOT NULL,
    kind TEXT NOT NULL,          -- scale_intent, cold_start, deploy, delete, ...
    data TEXT NOT NULL,          -- JSON
    at_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_function ON events (function, id);
"""


class UnreadableRecord(Exception):
    """A function's stored row does not parse; the message names the function and why."""


@dataclass(frozen=True)
class FunctionRecord:
    spec: FunctionSpec
    model_dir: str
    model_id: str
    created_s: float
    updated_s: float
    # ``memory_tier.packed.manifest_digest`` of the manifest deployed; replicas refuse any other
    # ("" for a function deployed before digests were recorded: not bound until redeployed)
    manifest_digest: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


class Registry:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._reported: set[Any] = set()  # bad rows already logged
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(functions)")}
            if "manifest_digest" not in columns:  # a registry written before digests
                try:
                    db.execute("ALTER TABLE functions ADD COLUMN manifest_digest TEXT NOT NULL "
                               "DEFAULT ''")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S)
        try:
            with db:
                yield db
        finally:
            db.close()

    def put(self, spec: FunctionSpec, model_dir: str, model_id: str,
            manifest_digest: str = "") -> FunctionRecord:
        """Insert or replace a function (a redeploy keeps its creation time)."""
        now = self.clock()
        with self._db() as db:
            row = db.execute("SELECT created_s FROM functions WHERE name = ?", (spec.name,)).fetchone()
            created = row[0] if row else now
            db.execute("INSERT OR REPLACE INTO functions (name, spec, base_dir, model_dir, "
                       "model_id, created_s, updated_s, manifest_digest) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (spec.name, json.dumps(spec.to_document()), spec.base_dir, model_dir,
                        model_id, created, now, manifest_digest))
        return FunctionRecord(spec, model_dir, model_id, created, now, manifest_digest)

    def get(self, name: str) -> FunctionRecord | None:
        with self._db() as db:
            row = db.execute("SELECT spec, base_dir, model_dir, model_id, created_s, updated_s, "
                             "manifest_digest FROM functions WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        try:
            return self._record(row)
        except Exception as exc:  # noqa: BLE001 - any parse failure of our own stored row
            raise UnreadableRecord(f"function {name!r}: its stored record does not parse "
                                   f"({type(exc).__name__}: {exc}); delete and redeploy it") from None

    def exists(self, name: str) -> bool:
        """Whether a row for ``name`` is stored, readable or not."""
        with self._db() as db:
            return db.execute("SELECT 1 FROM functions WHERE name = ?", (name,)).fetchone() is not None

    def list(self) -> list[FunctionRecord]:
        """Every function whose row parses, by name (the others are logged and left out)."""
        with self._db() as db:
            rows = db.execute("SELECT spec, base_dir, model_dir, model_id, created_s, updated_s, "
                              "manifest_digest, name FROM functions ORDER BY name").fetchall()
        out = []
        for r in rows:
            try:
                out.append(self._record(r))
            except Exception as exc:  # noqa: BLE001
                self._bad(("function", r[7]), f"function {r[7]!r}: stored record does not "
                          f"parse ({type(exc).__name__}: {exc}); left out")
        return out

    def _bad(self, key: Any, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("registry %s: %s", self.path, message)

    def _data(self, key: Any, text: str) -> dict[str, Any] | None:
        """An event's JSON data, or None (logged) if it does not parse to an object."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._bad(key, f"event {key}: data does not parse ({exc}); left out")
            return None
        if not isinstance(data, dict):
            self._bad(key, f"event {key}: data is not an object; left out")
            return None
        return data

    def delete(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM functions WHERE name = ?", (name,)).rowcount > 0

    @staticmethod
    def _record(row: tuple) -> FunctionRecord:
        spec = parse_function_spec(json.loads(row[0]), row[1])
        return FunctionRecord(spec, row[2], row[3], row[4], row[5], row[6])

    def add_event(self, function: str, kind: str, data: dict[str, Any],
                  at_s: float | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO events (function, kind, data, at_s) VALUES (?, ?, ?, ?)",
                       (function, kind, json.dumps(data), self.clock() if at_s is None else at_s))

    def events(self, function: str, kind: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a function, newest first."""
        query = "SELECT kind, data, at_s, id FROM events WHERE function = ?"
        args: list[Any] = [function]
        if kind:
            query += " AND kind = ?"
            args.append(kind)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._db() as db:
            rows = db.execute(query, args).fetchall()
        return [{"kind": k, "at_s": at, **data} for k, d, at, i in rows
                if (data := self._data(i, d)) is not None]

    def events_of_kind(self, kind: str, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` events of one kind over all functions, newest first (each with
        its ``function`` and ``at_s``)."""
        with self._db() as db:
            rows = db.execute("SELECT function, data, at_s, id FROM events WHERE kind = ? "
                              "ORDER BY id DESC LIMIT ?", (kind, limit)).fetchall()
        return [{"function": f, "kind": kind, "at_s": at, **data} for f, d, at, i in rows
                if (data := self._data(i, d)) is not None]

    def events_since(self, after_id: int, kinds: tuple[str, ...] = ()) -> list[tuple[int, str, str, dict[str, Any]]]:
        """Events with id > ``after_id`` (oldest first): ``(id, function, kind, data)``; ``data``
        carries the event's ``at_s``, as in ``events``."""
        query = "SELECT id, function, kind, data, at_s FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if kinds:
            query += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [(i, f, k, {"at_s": at, **data}) for i, f, k, d, at in rows
                if (data := self._data(i, d)) is not None]
