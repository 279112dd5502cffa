"""What a replica does with one gateway request: expand it into engine requests (a batch of
prompts × ``n`` choices, each its own engine request, so they batch with everything else),
prepare each (handler, chat template, context check), and stream their outputs merged into one
stream of chunks, each tagged with its choice ``index`` and carrying its log-probabilities as
JSON.

A request (the gateway's payload) is ``{"params": {SamplingParams fields}, "prompt" | "prompt_ids"
| "messages": ..., "max_tokens_requested": bool}`` plus, optionally, ``"batch": [prompt or token
ids, ...]`` (one choice group per prompt, replacing ``prompt``), ``"n"`` (choices per prompt;
with a seed, choice j samples with ``seed + j``) and ``"echo"`` (the first chunk of each choice
carries ``prompt_text``). Choice ``index`` = prompt position × n + j, as OpenAI numbers them.

A chunk: ``{"index", "text", "token_id", "token_ids", "finished", "finish_reason",
"num_prompt_tokens", "num_output_tokens"}`` — usually one token; the tokens made since the
choice's last chunk when the stream falls behind the engine (its text, ids and log-probabilities
concatenated; ``token_id`` the last) — and with log-probabilities ``"logprobs": [[token_id, token, logprob,
[[id, token, logprob], ...]], ...]`` (this chunk's tokens; a request ended by EOS scores the EOS
too) and, on a choice's first chunk, ``"prompt_logprobs"``: the same for every prompt token, the
first with a null logprob (nothing precedes it).

The engine is our ``EngineLoop`` or, for ``engine.kind: vllm``, a ``VllmClient`` with the same
``asubmit``: every request is prepared here either way, so both engines see the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from faascale.engine.engine import PromptTooLongError, StepOutput
from faascale.engine.llm import LLM
from faascale.engine.loop import EngineLoop, RequestStream
from faascale.engine.sampling import SamplingParams, SamplingParamsError, TokenLogprob
from faascale.engine.tokenizer import ChatTemplateError, Tokenizer
from faascale.platform.openai_api import MAX_CHOICES

if TYPE_CHECKING:  # not imported on our engine's start path (it pulls in httpx)
    from faascale.platform.vllm_client import VllmClient

_DONE = object()


class EngineRejected(ValueError):
    """An engine refused a choice before making any token (vLLM's 4xx: ``vllm_client``); the
    request gets a 400 with this message instead of tokens."""

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class HandlerError(Exception):
    """The function's handler raised or returned something that is not a request."""


def error_item(status: int, kind: str, message: str) -> dict[str, Any]:
    """The single item a replica sends instead of tokens for a request it rejects."""
    return {"error": {"status": status, "type": kind, "message": message}}


def expand(request: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """One ``(index, request)`` per engine request: each prompt of ``batch`` (or the request's
    own prompt) × ``n``. Pure; raises ValueError naming the field for a bad shape."""
    n = request.get("n", 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    batch = request.get("batch")
    if batch is not None and (not isinstance(batch, list) or not batch):
        raise ValueError("prompt: a batch must be a non-empty list")
    prompts: Sequence[Any] = batch if batch is not None else [None]
    if len(prompts) * n > MAX_CHOICES:
        raise ValueError(f"n: {len(prompts)} prompts × n={n} is {len(prompts) * n} choices; "
                         f"at most {MAX_CHOICES} per request")
    base = {k: v for k, v in request.items() if k not in ("batch", "n")}
    out = []
    for i, prompt in enumerate(prompts):
        one = dict(base)
        if prompt is not None:
            for key in ("prompt", "prompt_ids", "messages"):
                one.pop(key, None)
            one["prompt_ids" if isinstance(prompt, list) else "prompt"] = prompt
        for j in range(n):
            params = dict(one.get("params") or {})
            if n > 1 and params.get("seed") is not None:
                params["seed"] = int(params["seed"]) + j
            out.append((i * n + j, {**one, "params": params}))
    return out


def logprob_json(tokenizer: Tokenizer, lp: TokenLogprob) -> list[Any]:
    """``[token_id, token, logprob, [[id, token, logprob], ...]]`` (a token as its own text;
    a byte-level token that is part of a character decodes to U+FFFD, as in vLLM)."""
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)
    return [lp.token_id, text(lp.token_id), lp.logprob,
            [[t, text(t), v] for t, v in lp.top]]


class Generation:
    """A replica's request path over its engine loop. ``generate`` is the replica's contract
    with the gateway (module docstring); nothing here touches Ray."""

    def __init__(self, llm: LLM, loop: EngineLoop | VllmClient, max_seq_len: int,
                 handler: Handler | None = None, handler_ref: str | None = None) -> None:
        self.llm, self.loop, self.max_seq_len = llm, loop, max_seq_len
        self.handler, self.handler_ref = handler, handler_ref

    def prepare(self, request: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and sampling parameters. Raises HandlerError, PromptTooLongError
        (a max_tokens the context cannot hold), SamplingParamsError, ChatTemplateError,
        ValueError or TypeError for a bad request."""
        if self.handler is not None:
            try:
                request = self.handler(dict(request))
            except Exception as exc:
                raise HandlerError(f"handler {self.handler_ref} failed: {exc}") from None
            if not isinstance(request, dict):
                raise HandlerError(f"handler {self.handler_ref} must return a dict")
        raw = request.get("params", {})
        params = SamplingParams(**{**raw, "stop": tuple(raw.get("stop") or ())})
        if request.get("messages") is not None:
            ids = self.llm.prompt_ids(request["messages"])
        elif request.get("prompt_ids") is not None:
            ids = self.llm.prompt_ids([int(t) for t in request["prompt_ids"]])
        else:
            ids = self.llm.prompt_ids(str(request.get("prompt", "")))
        limit = self.max_seq_len
        if request.get("max_tokens_requested") and len(ids) + params.max_tokens > limit:
            # as vLLM: a max_tokens the context cannot hold is the client's error, not a cut
            raise PromptTooLongError(
                f"max_tokens: this model's maximum context length is {limit} tokens; the request "
                f"asks for {len(ids) + params.max_tokens} ({len(ids)} in the prompt, "
                f"{params.max_tokens} in the completion): lower max_tokens or shorten the prompt")
        return ids, params

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Chunks of every choice of ``request``, merged in the order they are made; or one
        error item, before any token, if any choice is rejected (none then runs)."""
        streams: list[tuple[int, RequestStream, dict[str, Any]]] = []
        try:
            for index, one in expand(request):
                ids, params = self.prepare(one)
                echo = None
                if one.get("echo"):
                    echo = (str(one["prompt"]) if one.get("prompt") is not None
                            else self.llm.tokenizer.decode(ids, skip_special_tokens=False))
                streams.append((index, self.loop.asubmit(ids, params),
                                {"prompt_text": echo, "first_id": ids[0]}))
        except Exception as exc:
            for _, stream, _ in streams:
                stream.abort()
            yield _rejection(exc)
            return
        started = False
        try:
            if len(streams) == 1:
                index, stream, extra = streams[0]
                async for outs in stream.batches():
                    started = True
                    yield self._chunk(index, outs, extra)
                return
            async for chunk in self._merged(streams):
                started = True
                yield chunk
        except EngineRejected as exc:  # refused before any token: a typed error
            if started:
                raise
            yield error_item(400, "invalid_request", f"vLLM: {exc}")

    async def _merged(self, streams: list[tuple[int, RequestStream, dict[str, Any]]]
                      ) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[tuple[int, Any, dict[str, Any]]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream, extra: dict[str, Any]) -> None:
            try:
                async for outs in stream.batches():
                    queue.put_nowait((index, outs, extra))
            except Exception as exc:  # the engine failed this request: end the whole stream
                queue.put_nowait((index, exc, extra))
            finally:
                queue.put_nowait((index, _DONE, extra))

        tasks = [asyncio.ensure_future(pump(*s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                index, item, extra = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield self._chunk(index, item, extra)
        finally:  # a client gone or a failure: every other choice stops now (aborted, slot freed)
            for task in tasks:
                task.cancel()

    def _chunk(self, index: int, outs: list[StepOutput], extra: dict[str, Any]
               ) -> dict[str, Any]:
        """One chunk for a choice's outputs made since its last chunk (usually one token; more
        when the stream fell behind the engine: ``RequestStream.batches``)."""
        out = outs[-1]
        ids = [o.token_id for o in outs if o.token_id is not None]
        chunk: dict[str, Any] = {
            "index": index, "text": "".join(o.text for o in outs), "token_id": out.token_id,
            "token_ids": ids, "finished": out.finished, "finish_reason": out.finish_reason,
            "num_prompt_tokens": out.num_prompt_tokens,
            "num_output_tokens": out.num_output_tokens}
        tok = self.llm.tokenizer
        lps = [lp for o in outs for lp in o.logprobs]
        if lps:
            chunk["logprobs"] = [logprob_json(tok, lp) for lp in lps]
        out = outs[0]  # the prompt's log-probabilities ride on a choice's first output
        if out.prompt_logprobs is not None:
            first = extra["first_id"]  # nothing scores the first token: its logprob is null
            chunk["prompt_logprobs"] = [
                [first, tok.decode([first], skip_special_tokens=False), None, []] if lp is None
                else logprob_json(tok, lp) for lp in out.prompt_logprobs]
        if extra.get("prompt_text") is not None:
            chunk["prompt_text"] = extra.pop("prompt_text")  # the choice's first chunk only
        return chunk


def _rejection(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, PromptTooLongError):
        return error_item(400, "context_length_exceeded", str(exc))
    if isinstance(exc, (SamplingParamsError, ChatTemplateError, ValueError, TypeError)):
        return error_item(400, "invalid_request", str(exc))
    if isinstance(exc, HandlerError):
        return error_item(422, "handler_error", str(exc))
    raise exc
