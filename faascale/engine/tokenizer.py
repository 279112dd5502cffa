"""Tokenization (the ``tokenizers`` library, never ``transformers``), chat templates, streaming detokenization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from faascale.engine.manifest import TokenizerInfo


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's chat template (bad roles, no template)."""


class Tokenizer:
    """Encode/decode with a packed model's ``tokenizer.json`` and render its chat template."""

    def __init__(self, tokenizer_json: str, info: TokenizerInfo) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.info = info
        self.eos_token_ids = set(info.eos_token_ids)
        if info.eos_token:
            eos = self._tok.token_to_id(info.eos_token)
            if eos is not None:
                self.eos_token_ids.add(eos)
        self.bos_token_id = self._tok.token_to_id(info.bos_token) if info.bos_token else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; special tokens written in the text (``<|im_start|>``) are parsed."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.info.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def compile_chat_template(self) -> None:
        """Compile the chat template now (else on the first chat request); a no-op without one
        or once compiled. Raises ChatTemplateError for a template that does not compile."""
        if self._template is None and self.info.chat_template:
            self._template = _compile_template(self.info.chat_template)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{role, content}]) with the model's Jinja chat template."""
        if not self.info.chat_template:
            raise ChatTemplateError("this model has no chat template; use a plain completion")
        self.compile_chat_template()
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "", eos_token=self.info.eos_token or "",
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template bug or messages it rejects: both are the caller's input
            raise ChatTemplateError(f"chat template failed: {exc}") from None


def _compile_template(source: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    # Same environment settings as Hugging Face's chat templating, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: __import__("json").dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Decodes a small window (from ``prefix_offset``) twice per token and emits the difference, the
    standard trick that keeps byte-level BPE and SentencePiece spacing right at O(window) cost.
    Stop strings end the text at their first occurrence; text that could still become a stop
    string is held back until it cannot.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far (may include held-back text)
    emitted: int = 0  # characters of ``text`` already returned
    prefix_offset: int = 0
    read_offset: int = 0
    stopped: bool = False
    # per stop string: its last-char -> the prefix lengths k (longest first) ending in that char,
    # so the hold-back check tries only the k that can match (O(matches), not O(len(stop)^2))
    _ends: list[tuple[str, dict[str, list[int]]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for s in self.stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                ends.setdefault(s[k - 1], []).append(k)
            self._ends.append((s, ends))

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end of generation: release held-back text (a partial stop string is just text,
        and the bytes of a character cut short decode to U+FFFD, as vLLM returns them)."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                           self.skip_special_tokens)
            full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _release(self) -> str:
        if self.stopped:
            return ""
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        cut = None
        for s in self.stop:
            pos = self.text.find(s, search_from)
            if pos != -1 and (cut is None or pos < cut):
                cut = pos
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            delta = self.text[self.emitted:]
            self.emitted = len(self.text)
            return delta
        safe = n = len(self.text)
        last = self.text[-1:]
        for s, ends in self._ends:  # hold back a tail that is a prefix of a stop string
            for k in ends.get(last, ()):
                if k <= n and self.text.startswith(s[:k], n - k):
                    safe = min(safe, n - k)
                    break
        safe = max(safe, self.emitted)
        delta = self.text[self.emitted:safe]
        self.emitted = safe
        return delta
