"""function.yaml validation: errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from faascale.platform.spec import SpecError, load_function_spec, parse_function_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-llama"])
def test_bundled_functions_are_valid(name: str) -> None:
    spec = load_function_spec(ROOT / "functions" / name)
    assert spec.name == name
    assert spec.engine_config().max_seq_len == spec.engine.max_seq_len


@pytest.mark.parametrize("doc, field", [
    ({"name": "Bad_Name", "model": {"source": "random://x"}}, "name"),
    ({"name": "ok", "model": {"source": "random://x", "blocks": 0}}, "model.blocks"),
    ({"name": "ok", "model": {"source": "random://x", "dtype": "int3"}}, "model.dtype"),
    ({"name": "ok", "model": {"source": " "}}, "model.source"),
    ({"name": "ok"}, "model"),
    ({"name": "ok", "model": {"source": "random://x"}, "engine": {"max_batch_size": 0}},
     "engine.max_batch_size"),
    ({"name": "ok", "model": {"source": "random://x", "blcoks": 4}}, "model.blcoks"),  # typo
])
def test_invalid_specs_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_function_spec(doc)
    assert field in [f for f, _ in err.value.fields]
    assert field in str(err.value)


def test_relative_sources_resolve_against_the_spec_dir(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "function.yaml").write_text("name: f\nmodel:\n  source: ./weights\n")
    assert load_function_spec(tmp_path / "f").resolved_source() == str(tmp_path / "f" / "weights")
    (tmp_path / "f" / "function.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_function_spec(tmp_path / "f")
