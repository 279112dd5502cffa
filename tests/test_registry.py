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
        db.executemany("INSERT INTO functions VALUES (?, ?, '/', '/m', 'id', 0, 0)",
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
