"""Deployed functions and their events, persisted in SQLite (the state directory's registry.db).

Safe to use from several threads (one connection per call) and processes (WAL journal).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.platform.spec import FunctionSpec, parse_function_spec

STARTUP_PROFILE = "startup_profile"  # the event kind of a replica start's StartupProfile

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- the FunctionSpec document (JSON)
    base_dir TEXT NOT NULL,      -- where relative paths (handler module) resolve
    model_dir TEXT NOT NULL,     -- where the packed model lives: a directory or s3://bucket/prefix
    model_id TEXT NOT NULL,
    created_s REAL NOT NULL,
    updated_s REAL NOT NULL
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


@dataclass(frozen=True)
class FunctionRecord:
    spec: FunctionSpec
    model_dir: str
    model_id: str
    created_s: float
    updated_s: float

    @property
    def name(self) -> str:
        return self.spec.name


class Registry:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def put(self, spec: FunctionSpec, model_dir: str, model_id: str) -> FunctionRecord:
        """Insert or replace a function (a redeploy keeps its creation time)."""
        now = self.clock()
        with self._db() as db:
            row = db.execute("SELECT created_s FROM functions WHERE name = ?", (spec.name,)).fetchone()
            created = row[0] if row else now
            db.execute("INSERT OR REPLACE INTO functions VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (spec.name, json.dumps(spec.to_document()), spec.base_dir, model_dir,
                        model_id, created, now))
        return FunctionRecord(spec, model_dir, model_id, created, now)

    def get(self, name: str) -> FunctionRecord | None:
        with self._db() as db:
            row = db.execute("SELECT spec, base_dir, model_dir, model_id, created_s, updated_s "
                             "FROM functions WHERE name = ?", (name,)).fetchone()
        return self._record(row) if row else None

    def list(self) -> list[FunctionRecord]:
        with self._db() as db:
            rows = db.execute("SELECT spec, base_dir, model_dir, model_id, created_s, updated_s "
                              "FROM functions ORDER BY name").fetchall()
        return [self._record(r) for r in rows]

    def delete(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM functions WHERE name = ?", (name,)).rowcount > 0

    @staticmethod
    def _record(row: tuple) -> FunctionRecord:
        spec = parse_function_spec(json.loads(row[0]), row[1])
        return FunctionRecord(spec, row[2], row[3], row[4], row[5])

    def add_event(self, function: str, kind: str, data: dict[str, Any],
                  at_s: float | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO events (function, kind, data, at_s) VALUES (?, ?, ?, ?)",
                       (function, kind, json.dumps(data), self.clock() if at_s is None else at_s))

    def events(self, function: str, kind: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a function, newest first."""
        query = "SELECT kind, data, at_s FROM events WHERE function = ?"
        args: list[Any] = [function]
        if kind:
            query += " AND kind = ?"
            args.append(kind)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._db() as db:
            rows = db.execute(query, args).fetchall()
        return [{"kind": k, "at_s": at, **json.loads(d)} for k, d, at in rows]

    def events_of_kind(self, kind: str, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` events of one kind over all functions, newest first (each with
        its ``function`` and ``at_s``)."""
        with self._db() as db:
            rows = db.execute("SELECT function, data, at_s FROM events WHERE kind = ? "
                              "ORDER BY id DESC LIMIT ?", (kind, limit)).fetchall()
        return [{"function": f, "kind": kind, "at_s": at, **json.loads(d)} for f, d, at in rows]

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
        return [(i, f, k, {"at_s": at, **json.loads(d)}) for i, f, k, d, at in rows]
