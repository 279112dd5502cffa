"""vLLM's tokenizer routes, served by the gateway from the function's packed tokenizer (no
replica needed, so asking never starts one): ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` (what lm-eval's ``tokenizer_backend=remote`` reads).

``model`` names the function; without it, the only deployed function is meant (vLLM serves one
model), and with several deployed it is a 400 naming ``model``. Tokenizers are loaded once per
model (``model_prep.prepare``: the verified ``tokenizer.json``, chat template compiled) and the
last ``MAX_TOKENIZERS`` are kept.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from faascale.platform import model_prep
from faascale.platform.gateway_context import ApiError, Gateway, invoker, parse_body
from faascale.platform.openai_api import ChatMessage
from faascale.platform.registry import FunctionRecord

router = APIRouter(dependencies=[invoker])
MAX_TOKENIZERS = 8  # SmolLM2's parsed tokenizer is a few MB
MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class TokenizerCache:
    """The parsed tokenizers of deployed models, by model id (at most ``MAX_TOKENIZERS``, least
    recently used out first); one load per model however many requests wait for it."""

    def __init__(self) -> None:
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def get(self, record: FunctionRecord) -> Any:
        key = record.model_id
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(
                run_in_threadpool(model_prep.prepare, record.model_dir))
        try:
            prepared = await asyncio.shield(pending)
        except Exception as exc:
            raise ApiError(503, f"function {record.name!r}: its tokenizer could not be read: "
                           f"{type(exc).__name__}: {exc}", "unavailable") from None
        finally:
            if pending.done():  # a waiter that left early leaves the load to the others
                self._loading.pop(key, None)
        self._loaded[key] = prepared.tokenizer
        while len(self._loaded) > MAX_TOKENIZERS:
            self._loaded.popitem(last=False)
        return prepared.tokenizer


def _cache(gw: Gateway) -> TokenizerCache:
    if gw.tokenizers is None:
        gw.tokenizers = TokenizerCache()
    return gw.tokenizers


async def _function(gw: Gateway, model: str | None) -> FunctionRecord:
    if model is not None:
        return gw.record(model)
    records = await run_in_threadpool(gw.ctx.registry.list)
    if len(records) != 1:
        raise ApiError(400, f"model: required: {len(records)} functions are deployed; name one")
    return gw.record(records[0].name)


@router.post("/tokenize")
async def tokenize(request: Request, gw: Gateway) -> dict[str, Any]:
    body = await parse_body(request, TokenizeBody)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "prompt: give exactly one of 'prompt' or 'messages'")
    record = await _function(gw, body.model)
    tok = await _cache(gw).get(record)
    try:
        if body.messages is not None:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()}
                                            for m in body.messages],
                                           add_generation_prompt=body.add_generation_prompt)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    except ValueError as exc:  # a chat template that rejects the messages, a content part
        raise ApiError(400, f"messages: {exc}") from None
    out: dict[str, Any] = {"count": len(ids), "max_model_len": record.spec.engine.max_seq_len,
                           "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [tok.decode([i], skip_special_tokens=False) for i in ids]
    return out


@router.post("/detokenize")
async def detokenize(request: Request, gw: Gateway) -> dict[str, Any]:
    body = await parse_body(request, DetokenizeBody)
    record = await _function(gw, body.model)
    tok = await _cache(gw).get(record)
    if body.tokens and not 0 <= min(body.tokens) <= max(body.tokens) < tok.vocab_size:
        raise ApiError(400, f"tokens: ids must be in [0, {tok.vocab_size})")
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}


@router.get("/tokenizer_info")
async def tokenizer_info(gw: Gateway, model: str | None = None) -> dict[str, Any]:
    record = await _function(gw, model)
    tok = await _cache(gw).get(record)
    info = tok.info
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model": record.name,
            "bos_token": info.bos_token, "eos_token": info.eos_token, "pad_token": None,
            "add_bos_token": info.add_bos_token, "chat_template": info.chat_template,
            "model_max_length": record.spec.engine.max_seq_len, "vocab_size": tok.vocab_size}
