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


def test_a_character_cut_short_by_the_end_is_released_as_a_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🚀")[:-2]  # the rocket's first two bytes of four
    d = IncrementalDetokenizer(tok)
    text = "".join(d.add(t) for t in ids)
    assert text == "ok "
    assert d.flush() == tok.decode(ids)[len("ok "):] and "\ufffd" in d.text


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


def test_stop_strings_hold_back_exactly_what_could_still_stop(tok: Tokenizer) -> None:
    """Random texts and stops over a small alphabet: after every token, the text released is
    the text up to the first stop, less the longest tail that is a prefix of a stop (the
    definition, checked by brute force), and the whole stream ends where a stop begins."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 30)))
        stops = tuple({"".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5)))
                       for _ in range(rng.randint(1, 3))})
        d = IncrementalDetokenizer(tok, stops)
        released = ""
        for i, t in enumerate(tok.encode(text)):
            released += d.add(t)
            seen = text[:i + 1]
            cuts = [seen.find(s) for s in stops if s in seen]
            if cuts:
                assert d.stopped and released == seen[:min(cuts)]
                break
            held = max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])),
                       default=0)
            assert released == seen[:len(seen) - held]


def test_stop_strings_are_bounded(tok: Tokenizer) -> None:
    from faascale.engine.sampling import MAX_STOP_CHARS, SamplingParams, SamplingParamsError

    SamplingParams(stop=("x" * MAX_STOP_CHARS,))
    with pytest.raises(SamplingParamsError, match="stop"):
        SamplingParams(stop=("x" * (MAX_STOP_CHARS + 1),))
    with pytest.raises(SamplingParamsError, match="stop"):
        SamplingParams(stop=tuple(str(i) for i in range(17)))
