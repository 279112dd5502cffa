"""The gateway's OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (the function's name is the model), JSON or SSE chunks.

Request bodies and response shapes are ``openai_api``'s; a request's token stream, its in-flight
slot and metrics are the ``RequestContext``'s (``token_stream``, ``collect``, ``stream_error``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from faascale.platform import openai_api as oa
from faascale.platform.gateway_context import Gateway, invoker, parse_body
from faascale.platform.streams import sse

router = APIRouter(dependencies=[invoker])


async def whole_answer(gw: Any, stream: Any, n: int, choice: Callable[..., dict[str, Any]],
                       logprobs: Callable[[list[list[Any]]], dict[str, Any]] | None
                       ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A non-streamed answer: every choice (``choice(index, text, finish, logprobs)``, in index
    order, with ``logprobs(entries)`` when asked) and the request's usage."""
    choices = oa.fold_choices(await gw.collect_items(stream))
    out = [choice(i, ch.text, ch.finish, logprobs(ch.entries) if logprobs else None)
           for i, ch in sorted(choices.items())]
    return out, oa.usage_of_choices({i: ch.last for i, ch in choices.items()}, n)


@router.get("/v1/models")
async def models(gw: Gateway) -> dict[str, Any]:
    """vLLM's model cards: ``max_model_len`` (the function's context), ``root`` (the model's
    source as deployed: a Hugging Face id or path names its tokenizer), ``tokenizer`` (faascale:
    where the tokenizer is served, vLLM's ``/tokenize`` family with ``model`` = the id)."""
    records = await run_in_threadpool(gw.ctx.registry.list)
    return {"object": "list", "data": [
        {"id": r.name, "object": "model", "created": int(r.created_s), "owned_by": "faascale",
         "root": r.spec.model.source, "parent": None, "max_model_len": r.spec.engine.max_seq_len,
         "tokenizer": {"tokenize": "/tokenize", "detokenize": "/detokenize",
                       "info": f"/tokenizer_info?model={r.name}"},
         "permission": []} for r in records]}


@router.post("/v1/completions")
async def completions(request: Request, gw: Gateway) -> Any:
    body = await parse_body(request, oa.CompletionRequest)
    name = body.model

    async def run() -> Any:
        prompts = gw.accepted(name, body, body.prompts)
        payload: dict[str, Any] = {
            "params": body.params(16),  # OpenAI's default max_tokens for completions
            "max_tokens_requested": body.max_tokens is not None, "n": body.n, "echo": body.echo}
        if len(prompts) == 1:
            payload["prompt_ids" if isinstance(prompts[0], list) else "prompt"] = prompts[0]
        else:
            payload["batch"] = prompts
        stream = await gw.token_stream(name, payload)
        rid, want_lp, num = oa.new_id("cmpl"), body.logprobs is not None, len(prompts) * body.n
        if body.stream:
            async def events() -> AsyncIterator[dict[str, Any]]:
                choices: dict[int, oa.ChoiceText] = {}
                done = 0
                async for c in stream:
                    index = int(c.get("index", 0))
                    choice = choices.setdefault(index, oa.ChoiceText())
                    offset = choice.chars
                    text, entries = choice.add(c)
                    lps = oa.completion_logprobs(entries, offset) if want_lp else None
                    finish = choice.finish if c["finished"] else None
                    yield oa.completion_chunk(rid, name, oa.completion_choice(index, text, finish,
                                                                              lps))
                    done += bool(c["finished"])
                    if done == num and body.include_usage:
                        lasts = {i: ch.last for i, ch in choices.items()}
                        yield oa.usage_chunk(rid, name, "text_completion",
                                             oa.usage_of_choices(lasts, body.n))
            return sse(events(), stream, gw.stream_error)
        out, use = await whole_answer(gw, stream, body.n, oa.completion_choice,
                                      oa.completion_logprobs if want_lp else None)
        return oa.completion_response(rid, name, out, use)

    return await gw.counted("completions", name, run)


@router.post("/v1/chat/completions")
async def chat(request: Request, gw: Gateway) -> Any:
    body = await parse_body(request, oa.ChatRequest)
    name = body.model

    async def run() -> Any:
        messages = gw.accepted(name, body, body.chat_messages)
        stream = await gw.token_stream(name, {
            "messages": messages, "params": body.params(gw.max_tokens_default(name)), "n": body.n,
            "max_tokens_requested": bool(body.max_tokens or body.max_completion_tokens)})
        rid, want_lp = oa.new_id("chatcmpl"), body.logprobs
        if body.stream:
            async def events() -> AsyncIterator[dict[str, Any]]:
                for index in range(body.n):
                    yield oa.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None,
                                        index)
                lasts: dict[int, dict[str, Any]] = {}
                async for c in stream:
                    index = int(c.get("index", 0))
                    lps = oa.chat_logprobs(c.get("logprobs", [])) if want_lp else None
                    if c["text"] or lps and lps["content"]:
                        yield oa.chat_chunk(rid, name, {"content": c["text"]}, None, index, lps)
                    if c["finished"]:
                        lasts[index] = c
                        yield oa.chat_chunk(rid, name, {}, oa.openai_finish(c["finish_reason"]),
                                            index)
                        if len(lasts) == body.n and body.include_usage:
                            yield oa.usage_chunk(rid, name, "chat.completion.chunk",
                                                 oa.usage_of_choices(lasts, body.n))
            return sse(events(), stream, gw.stream_error)
        out, use = await whole_answer(gw, stream, body.n, oa.chat_choice,
                                      oa.chat_logprobs if want_lp else None)
        return oa.chat_response(rid, name, out, use)

    return await gw.counted("chat", name, run)
