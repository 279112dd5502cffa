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


# --- engine.device (issue 20) ------------------------------------------------------------------

def _spec(engine: dict | None = None, num_gpus: float | None = None):
    doc: dict = {"name": "ok", "model": {"source": "random://x"}}
    if engine is not None:
        doc["engine"] = engine
    if num_gpus is not None:
        doc["resources"] = {"num_gpus": num_gpus}
    return parse_function_spec(doc)


@pytest.mark.parametrize("num_gpus, device", [(None, "cpu"), (0, "cpu"), (1, "cuda"), (2, "cuda"),
                                              (0.5, "cuda")])  # a fraction shares one GPU
def test_the_device_defaults_to_cuda_when_the_function_reserves_gpus(num_gpus, device) -> None:
    spec = _spec(num_gpus=num_gpus)
    assert spec.engine.device is None and spec.device == device
    assert spec.engine_config().device == device
    assert spec.to_document()["engine"]["device"] is None  # stored as a default, not a choice


@pytest.mark.parametrize("device, num_gpus", [("cpu", None), ("cpu", 1), ("auto", None),
                                              ("auto", 1), ("cuda", 1), ("cuda:0", 1),
                                              ("cuda:1", 2), ("cuda:1", 1.5)])
def test_an_explicit_device_is_the_engine_s(device: str, num_gpus) -> None:
    spec = _spec({"device": device}, num_gpus)
    assert spec.device == spec.engine_config().device == device
    again = parse_function_spec(spec.to_document())  # the registry's round trip
    assert again.device == device


@pytest.mark.parametrize("device, num_gpus, message", [
    ("cuda", None, "'cuda' needs a GPU but resources.num_gpus is 0"),
    ("cuda:0", 0, "'cuda:0' needs a GPU but resources.num_gpus is 0"),
    ("cuda:1", 1, "a replica sees its GPUs as cuda:0 .. cuda:0"),
    ("cuda:2", 2, "cuda:0 .. cuda:1"),
    ("mps", None, "'mps' is not supported; use one of cpu, cuda, cuda:N, auto"),
    ("cuda:-1", 1, "is not supported"),
])
def test_a_device_the_function_cannot_have_names_engine_device(device: str, num_gpus,
                                                               message: str) -> None:
    with pytest.raises(SpecError) as err:
        _spec({"device": device}, num_gpus)
    assert [f for f, _ in err.value.fields] == ["engine.device"]
    assert "engine.device: " in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-llama"])
def test_bundled_functions_compute_on_the_cpu(name: str) -> None:
    assert load_function_spec(ROOT / "functions" / name).device == "cpu"  # no num_gpus there
