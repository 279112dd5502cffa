"""Request bodies (validated at the edge) and response shapes of the HTTP API.

OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` accept the fields the official
client sends; ones faascale cannot honour (``n > 1``, logprobs, penalties) are refused with a 400
naming them rather than silently ignored. Unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

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
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise UnsupportedParameter("n: only n=1 is supported")
        if self.logprobs not in (None, False, 0):
            raise UnsupportedParameter("logprobs: not supported")
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedParameter("presence_penalty/frequency_penalty: not supported")

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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise UnsupportedParameter("prompt: batches of prompts are not supported; send one")
            return p[0]
        return p


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


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class InvokeRequest(_Sampling):
    """faascale's own simple invoke: a prompt (completion) or messages (chat)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None

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
    """One pinned cold-start estimate (``autoscale.ColdStartEstimate``)."""
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


def completion_response(rid: str, model: str, text: str, finish: str | None,
                        use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": use}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_response(rid: str, model: str, text: str, finish: str | None,
                  use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use}


def openai_finish(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(reason or "", reason)
