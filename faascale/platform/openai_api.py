"""Request bodies (validated at the edge) and response shapes of the HTTP API.

OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` accept the fields the official
client sends. ``n``, batched prompts, ``logprobs``/``top_logprobs`` and ``echo`` are served (each
choice its own engine request); fields faascale cannot honour (penalties, ``logit_bias``, ``tools``
and function calling, ``response_format`` other than text, ``suffix``, ``best_of``) are refused with
a 400 naming them rather than silently ignored. Unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI's top_logprobs bound; for legacy completions vLLM allows its max_logprobs (20), not
# OpenAI's 5, and so do we (lm-eval asks for 1). The engine checks its own bound again.
MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_CHARS = 256  # as the engine's bound (matched against the text at every token)
# Every choice of a request is an engine request held for its whole stream: a bound keeps one
# request from taking a replica's whole batch (vLLM bounds it by max_num_seqs).
MAX_CHOICES = 256


class UnsupportedParameter(ValueError):
    """A valid OpenAI parameter that faascale does not implement (the message names it)."""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="faascale extension (0 = off)")
    ignore_eos: bool = Field(default=False, description="extension (as vLLM): decode past EOS")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops

    def check_supported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedParameter("presence_penalty/frequency_penalty: not supported")
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias: not supported")

    def params(self, default_max_tokens: int) -> dict[str, Any]:
        """Engine sampling parameters (SamplingParams fields) for the replica."""
        return {"max_tokens": self.max_tokens or default_max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": list(self.stop or []), "ignore_eos": self.ignore_eos}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise UnsupportedParameter("suffix: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of: only best_of = n is supported")
        num = len(self.prompts()) * self.n
        if num > MAX_CHOICES:
            raise UnsupportedParameter(f"n: {len(self.prompts())} prompts x n={self.n} is {num} "
                                       f"choices; at most {MAX_CHOICES} per request")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or a batch (each its own group of n choices)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        return [p]

    def params(self, default_max_tokens: int) -> dict[str, Any]:
        out = super().params(default_max_tokens)
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
            if self.echo:
                out["prompt_logprobs"] = self.logprobs
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise UnsupportedParameter(f"messages: content part type {part.get('type')!r} "
                                           "is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedParameter(f"response_format: type {self.response_format.type!r} is "
                                       "not supported (no constrained decoding; only 'text')")
        if self.tools or self.functions:
            raise UnsupportedParameter(f"{'tools' if self.tools else 'functions'}: tool and "
                                       "function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise UnsupportedParameter(f"{name}: tool and function calling are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameter("top_logprobs: requires logprobs: true")

    def params(self, default_max_tokens: int) -> dict[str, Any]:
        out = super().params(default_max_tokens)
        if self.max_completion_tokens:
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            out["logprobs"] = self.top_logprobs or 0
        return out

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class InvokeRequest(_Sampling):
    """faascale's own simple invoke: a prompt (completion) or messages (chat)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.n != 1:
            raise UnsupportedParameter("n: invoke returns one text; use /v1/completions for n > 1")

    def payload(self, default_max_tokens: int) -> dict[str, Any]:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        out: dict[str, Any] = {"params": self.params(default_max_tokens),
                               "max_tokens_requested": self.max_tokens is not None}
        if self.messages is not None:
            out["messages"] = [{"role": m.role, "content": m.text()} for m in self.messages]
        else:
            out["prompt"] = self.prompt
        return out


class DeployScale(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)


class EstimateBody(BaseModel):
    """One pinned cold-start estimate (``coldstart.start_source.ColdStartEstimate``)."""
    model_config = ConfigDict(extra="forbid")
    source: Literal["PEER", "HOST", "DISK", "REMOTE"]
    ready_s: float = Field(ge=0, le=86400)
    available: bool = True


class PinEstimates(BaseModel):
    """``PUT /v1/functions/{name}/estimates``: pin literal estimates (force a source); ``null``
    unpins and the measured estimates apply again."""
    model_config = ConfigDict(extra="forbid")
    estimates: list[EstimateBody] | None = Field(min_length=1, max_length=4)


class SpanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    start_s: float
    end_s: float
    attrs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered(self) -> "SpanBody":
        if self.end_s < self.start_s:
            raise ValueError(f"span {self.name}: end_s before start_s")
        return self


class ProfileBody(BaseModel):
    """One ``StartupProfile`` (``coldstart.profile``), as ``to_dict`` writes it."""
    model_config = ConfigDict(extra="ignore")
    function: str = ""
    replica: str = Field(min_length=1, max_length=200)
    model_id: str = Field(min_length=1, max_length=200)
    started_at_s: float
    source: Literal["HOST", "DISK", "REMOTE", "PEER", "MIXED"]
    weight_bytes: int = Field(ge=0)
    spans: list[SpanBody] = Field(min_length=1, max_length=64)
    machine: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    ok: bool = True
    error: str | None = None


class StartupProfiles(BaseModel):
    """``POST /v1/functions/{name}/startups``: starts measured outside the platform."""
    model_config = ConfigDict(extra="forbid")
    profiles: list[ProfileBody] = Field(min_length=1, max_length=100)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_of(chunk: dict[str, Any]) -> dict[str, int]:
    """The usage block for a replica's final chunk (zeros for an empty stream)."""
    return usage(chunk.get("num_prompt_tokens", 0), chunk.get("num_output_tokens", 0))


def usage_of_choices(lasts: dict[int, dict[str, Any]], n: int) -> dict[str, int]:
    """The usage of a request's choices (their last chunks, by index): each prompt's tokens
    counted once (its first choice, index % n == 0), every choice's completion tokens summed."""
    return usage(sum(c.get("num_prompt_tokens", 0) for i, c in lasts.items() if i % n == 0),
                 sum(c.get("num_output_tokens", 0) for c in lasts.values()))


class ChoiceText:
    """One choice's text and log-probability entries as its chunks arrive (echo: the prompt's
    text and entries come first, on its first chunk)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.entries: list[list[Any]] = []
        self.last: dict[str, Any] = {}
        self.chars = 0  # text so far (legacy logprobs' text_offset)

    def add(self, chunk: dict[str, Any]) -> tuple[str, list[list[Any]]]:
        """Fold in ``chunk``; returns the text and entries it adds."""
        text = chunk.get("prompt_text", "") + chunk["text"]
        entries = [*chunk.get("prompt_logprobs", ()), *chunk.get("logprobs", ())]
        self.parts.append(text)
        self.entries.extend(entries)
        self.last = chunk
        self.chars += len(text)
        return text, entries

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finish(self) -> str | None:
        return openai_finish(self.last.get("finish_reason"))


def fold_choices(items: list[dict[str, Any]]) -> dict[int, ChoiceText]:
    """A whole answer's items (any order of choices) to each choice's text, by index."""
    out: dict[int, ChoiceText] = {}
    for c in items:
        out.setdefault(int(c.get("index", 0)), ChoiceText()).add(c)
    return out


def completion_choice(index: int, text: str, finish: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def completion_response(rid: str, model: str, choices: list[dict[str, Any]],
                        use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


def chat_choice(index: int, text: str, finish: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "finish_reason": finish, "logprobs": logprobs}


def chat_response(rid: str, model: str, choices: list[dict[str, Any]],
                  use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                         "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use}


def completion_logprobs(entries: list[list[Any]], text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions' ``logprobs`` for ``entries`` (the replica's ``[token_id, token,
    logprob, top]``; a prompt's first token has a null logprob): ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (token -> logprob, the chosen token included, as vLLM answers) and
    ``text_offset`` (each token's start in the choice's text, counting from ``text_offset``)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for _, token, logprob, top in entries:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        if logprob is None:
            out["top_logprobs"].append(None)
        else:
            alts: dict[str, float] = {}
            for _, t, v in [[None, token, logprob], *top]:
                alts[t] = max(v, alts.get(t, v))  # two ids may decode to the same text
            out["top_logprobs"].append(alts)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(entries: list[list[Any]]) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**one(token, logprob), "top_logprobs": [one(t, v) for _, t, v in top]}
                        for _, token, logprob, top in entries]}


def openai_finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(reason or "", reason)
