"""The registry (SQLite): a row that no longer parses never takes the others down."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from faascale.platform.registry import Registry, UnreadableRecord
from faascale.platform.spec import parse_function_spec


def deployed(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry.db")
    for name in ("alpha", "gamma"):
        spec = parse_function_spec({"name": name, "model": {"source": "random://tiny-llama"}},
                                   tmp_path)
        reg.put(spec, f"/models/{name}", f"id-{name}")
    with sqlite3.connect(reg.path) as db:
        db.executemany("INSERT INTO functions (name, spec, base_dir, model_dir, model_id, "
                       "created_s, updated_s) VALUES (?, ?, '/', '/m', 'id', 0, 0)",
                       [("beta", '{"name": 5}'), ("delta", "not json")])
    return reg


def test_unreadable_rows_are_left_out_named_and_deletable(tmp_path: Path) -> None:
    reg = deployed(tmp_path)
    assert [r.name for r in reg.list()] == ["alpha", "gamma"]
    assert reg.get("alpha").model_id == "id-alpha"
    for name in ("beta", "delta"):
        with pytest.raises(UnreadableRecord, match=f"function '{name}'"):
            reg.get(name)
        assert reg.exists(name)
        assert reg.delete(name)
    assert not reg.exists("beta") and reg.get("beta") is None


def test_events_whose_data_does_not_parse_are_left_out(tmp_path: Path) -> None:
    reg = deployed(tmp_path)
    reg.add_event("alpha", "cold_start", {"load_s": 1.0})
    with sqlite3.connect(reg.path) as db:
        db.execute("INSERT INTO events (function, kind, data, at_s) VALUES "
                   "('alpha', 'cold_start', '{broken', 1), ('alpha', 'cold_start', '[1]', 2)")
    reg.add_event("alpha", "cold_start", {"load_s": 2.0})
    assert [e["load_s"] for e in reg.events("alpha", "cold_start")] == [2.0, 1.0]
    assert [e["load_s"] for e in reg.events_of_kind("cold_start")] == [2.0, 1.0]
    assert [d["load_s"] for _, _, _, d in reg.events_since(0, ("cold_start",))] == [1.0, 2.0]


def test_the_manifest_digest_is_kept_and_an_old_registry_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:  # the schema before digests were recorded
        db.execute("CREATE TABLE functions (name TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                   "base_dir TEXT NOT NULL, model_dir TEXT NOT NULL, model_id TEXT NOT NULL, "
                   "created_s REAL NOT NULL, updated_s REAL NOT NULL)")
        db.execute("INSERT INTO functions VALUES ('old', ?, '/', '/m/old', 'id-old', 1, 2)",
                   ('{"name": "old", "model": {"source": "random://tiny-llama"}}',))
    reg = Registry(path)
    old = reg.get("old")
    assert old is not None and old.model_id == "id-old" and old.manifest_digest == ""
    spec = parse_function_spec({"name": "new", "model": {"source": "random://tiny-llama"}},
                               tmp_path)
    put = reg.put(spec, "/m/new", "id-new", "sha256:" + "ab" * 32)
    assert put.manifest_digest == reg.get("new").manifest_digest == "sha256:" + "ab" * 32
    assert [r.manifest_digest for r in reg.list()] == ["sha256:" + "ab" * 32, ""]
    assert Registry(path).get("new").manifest_digest == put.manifest_digest  # reopened
