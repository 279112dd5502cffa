"""A replica's requests to its own vLLM OpenAI server, as the engine loop's streams.

``VllmClient.asubmit(prompt_ids, params)`` has the shape of ``EngineLoop.asubmit``: it returns a
stream whose ``batches()`` yields lists of ``StepOutput`` and which ``abort()`` stops, so the
replica's request path (``generation.Generation``: handler, chat template, ``n``, batches, echo,
merging, log-probabilities as JSON) is the same for both engines. The prompt is tokenized on our
side and sent to vLLM's ``/v1/completions`` as token ids (``return_token_ids`` and
``return_tokens_as_token_ids`` give ids back), so both engines see the same tokens.

``request_body`` (pure) maps our ``SamplingParams`` to vLLM's fields; ``outputs_of`` (pure) maps
one SSE chunk to ``StepOutput``s. vLLM answering 4xx before any token is ``VllmRejected`` (the
gateway's typed 400 naming vLLM's reason); a connection failure or a 5xx is ``VllmFailure``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from faascale.engine.engine import PromptTooLongError, StepOutput
from faascale.engine.sampling import SamplingParams, SamplingParamsError, TokenLogprob
from faascale.platform.generation import EngineRejected

INT64_MAX = (1 << 63) - 1  # vLLM's seed range
TOKEN_ID_PREFIX = "token_id:"  # return_tokens_as_token_ids
CONNECT_TIMEOUT_S = 5.0


class VllmFailure(RuntimeError):
    """vLLM could not be reached or failed the request (5xx, a broken stream)."""


class VllmRejected(EngineRejected):
    """vLLM answered the request with a 4xx before any token; ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_body(model: str, prompt_ids: Sequence[int], params: SamplingParams,
                 max_model_len: int) -> dict[str, Any]:
    """vLLM's ``/v1/completions`` body for one choice (pure). ``max_tokens`` is cut to what the
    context holds (our engine stops there too; vLLM would reject the request); a prompt that
    leaves no room, a seed vLLM cannot take or prompt log-probabilities (not streamed by vLLM)
    raise the typed errors ``generation`` turns into 400s."""
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise PromptTooLongError(
            f"prompt: {len(prompt_ids)} tokens does not fit the context of {max_model_len} "
            f"tokens (it must leave room for at least one new token)")
    if params.seed is not None and params.seed > INT64_MAX:
        raise SamplingParamsError(f"seed: engine.kind vllm takes seeds in [0, 2^63 - 1], got "
                                  f"{params.seed}")
    if params.prompt_logprobs is not None:
        raise SamplingParamsError("prompt_logprobs: not available with engine.kind: vllm "
                                  "(echo with logprobs needs the faascale engine)")
    body: dict[str, Any] = {
        "model": model, "prompt": list(prompt_ids), "stream": True,
        "max_tokens": min(params.max_tokens, room), "temperature": params.temperature,
        "top_p": params.top_p, "top_k": params.top_k if params.top_k > 0 else -1,
        "stop": list(params.stop), "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos, "return_token_ids": True,
        "return_tokens_as_token_ids": True, "skip_special_tokens": True}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
    return body


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise VllmFailure(f"vLLM returned a log-probability token {token!r}, not an id")
    return int(token[len(TOKEN_ID_PREFIX):])


def _logprobs(lp: dict[str, Any] | None, k: int | None) -> list[TokenLogprob]:
    """vLLM's completions log-probabilities (tokens as ``token_id:N``) as ours: the sampled
    token's and its ``k`` most likely alternatives, most likely first."""
    if not lp:
        return []
    out = []
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or ())
    for token, value, top in zip(lp.get("tokens") or (), lp.get("token_logprobs") or (), tops):
        if value is None:  # vLLM scores nothing there (a prompt's first token)
            continue
        alts = sorted(((_token_id(t), float(v)) for t, v in (top or {}).items()),
                      key=lambda a: -a[1])
        out.append(TokenLogprob(_token_id(token), float(value), tuple(alts[:k or 0])))
    return out


def outputs_of(chunk: dict[str, Any], request_id: str, num_prompt_tokens: int,
               num_output_tokens: int, logprobs_k: int | None) -> list[StepOutput]:
    """One SSE chunk of vLLM's completions stream as our outputs (pure): one per new token id,
    the chunk's text on the last, which also carries the end. ``num_output_tokens``: tokens made
    before this chunk. A chunk without tokens (the end alone) gives one output with no token."""
    choice = (chunk.get("choices") or [{}])[0]
    ids = [int(t) for t in choice.get("token_ids") or ()]
    lps = _logprobs(choice.get("logprobs"), logprobs_k)
    reason = choice.get("finish_reason")
    if not ids:
        if reason is None and not choice.get("text"):
            return []
        return [StepOutput(request_id, None, choice.get("text") or "", reason is not None,
                           reason, num_prompt_tokens, num_output_tokens, tuple(lps))]
    outs = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        outs.append(StepOutput(
            request_id, token, (choice.get("text") or "") if last else "",
            last and reason is not None, reason if last else None, num_prompt_tokens,
            num_output_tokens + i + 1, tuple(lps[i:i + 1]) if i < len(lps) else ()))
    return outs


class VllmStream:
    """One choice streamed from vLLM; ``batches()`` once, ``abort()`` any time (closes the HTTP
    stream: vLLM aborts the request when its client goes away)."""

    def __init__(self, client: "VllmClient", request_id: str, body: dict[str, Any],
                 num_prompt_tokens: int, logprobs_k: int | None) -> None:
        self.request_id, self._client, self._body = request_id, client, body
        self._prompt, self._k = num_prompt_tokens, logprobs_k
        self._aborted = False

    async def batches(self) -> AsyncIterator[list[StepOutput]]:
        made, started = 0, False
        try:
            async with self._client.http.stream("POST", "/v1/completions",
                                                json=self._body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    message = _error_message(text)
                    if 400 <= resp.status_code < 500:
                        raise VllmRejected(resp.status_code, message)
                    raise VllmFailure(f"vLLM answered {resp.status_code}: {message}")
                async for line in resp.aiter_lines():
                    if self._aborted:
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise VllmFailure(f"vLLM failed the request: {_error_message(data)}")
                    outs = outputs_of(chunk, self.request_id, self._prompt, made, self._k)
                    if outs:
                        made = outs[-1].num_output_tokens
                        started = True
                        yield outs
                        if outs[-1].finished:
                            return
        except httpx.HTTPError as exc:
            raise VllmFailure(f"vLLM stream {'broke' if started else 'failed'}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not self._aborted:
            raise VllmFailure("vLLM ended the stream without a finish reason")

    def abort(self) -> None:
        self._aborted = True


def _error_message(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    err = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


class VllmClient:
    """Requests to one local vLLM server (``base_url``) serving ``model``."""

    def __init__(self, base_url: str, model: str, max_model_len: int, vocab_size: int) -> None:
        self.model, self.max_model_len, self.vocab_size = model, max_model_len, vocab_size
        self.http = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(
            None, connect=CONNECT_TIMEOUT_S))  # a stream's pace is the gateway's stall timeout
        self._ids = itertools.count()

    def asubmit(self, prompt_ids: Sequence[int], params: SamplingParams,
                request_id: str | None = None) -> VllmStream:
        """The choice's stream (nothing is sent until it is iterated). Raises what
        ``request_body`` raises, and ValueError for an empty prompt or ids outside the
        vocabulary (as ``Engine.check_prompt``)."""
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size})")
        body = request_body(self.model, prompt_ids, params, self.max_model_len)
        rid = request_id or f"vllm-{next(self._ids)}"
        return VllmStream(self, rid, body, len(prompt_ids), params.logprobs)

    async def aclose(self) -> None:
        await self.http.aclose()


__all__ = ["VllmClient", "VllmFailure", "VllmRejected", "VllmStream", "outputs_of",
           "request_body"]
