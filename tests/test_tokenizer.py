"""Chat templates and streaming detokenization (multi-byte characters, stop strings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faascale.engine.checkpoint import read_manifest, read_tokenizer_json
from faascale.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer


@pytest.fixture()
def tok(tiny_packed: Path) -> Tokenizer:
    m = read_manifest(tiny_packed)
    return Tokenizer(read_tokenizer_json(tiny_packed, m), m.tokenizer)


def _stream(tok: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok, stop)
    deltas = [d.add(t) for t in tok.encode(text)]
    if not d.stopped:
        deltas.append(d.flush())
    return deltas, "".join(deltas)


def test_multibyte_characters_are_never_split(tok: Tokenizer) -> None:
    text = "héllo 世界 🚀 done"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte
    deltas, joined = _stream(tok, text)
    assert joined == text
    assert all("\ufffd" not in d for d in deltas)
    assert "🚀" in deltas  # emitted whole once its 4th byte arrived


def test_stop_strings(tok: Tokenizer) -> None:
    deltas, joined = _stream(tok, "answer: 42\nUser: next", stop=("\nUser:",))
    assert joined == "answer: 42"
    assert not any("\n" in d for d in deltas)  # the held-back prefix of the stop never leaked
    _, joined = _stream(tok, "abc\nUs", stop=("\nUser:",))  # a partial stop at the end is text
    assert joined == "abc\nUs"
    _, joined = _stream(tok, "xxSTOPyySTOP", stop=("yy", "STOP"))
    assert joined == "xx"  # the earliest stop wins


def test_chat_template(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok._tok.token_to_id("<|im_start|>")) == 3  # special tokens stay atomic
    assert 258 in tok.eos_token_ids  # <|im_end|> ends generation


def test_template_errors_are_typed(tiny_packed: Path) -> None:
    m = read_manifest(tiny_packed)
    import dataclasses

    raw = read_tokenizer_json(tiny_packed, m)
    no_template = Tokenizer(raw, dataclasses.replace(m.tokenizer, chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    strict = Tokenizer(raw, dataclasses.replace(m.tokenizer, chat_template=(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")))
    with pytest.raises(ChatTemplateError, match="roles must be user/assistant"):
        strict.apply_chat_template([{"role": "tool", "content": "x"}])
    broken = Tokenizer(raw, dataclasses.replace(m.tokenizer, chat_template="{% for %}"))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
