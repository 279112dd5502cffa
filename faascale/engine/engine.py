"""The engine: continuous batching over a runner (one shard, or a chain of layer-range shards).

``Engine.step`` reads in three lines: observe (the waiting and running requests), decide (the
batching policy's plan), act (prefill the admitted, decode the running, emit tokens).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from faascale.engine.config import EngineConfig
from faascale.engine.kv_cache import KVCache, SlotAllocator
from faascale.engine.model import ForwardBatch, ModelShard
from faascale.engine.sampling import (SamplingParams, TokenLogprob, logprobs_of, new_generator,
                                      sample_step)
from faascale.engine.scheduler import BatchPolicy, WaitingView
from faascale.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class PromptTooLongError(ValueError):
    """The prompt does not fit the context (``max_seq_len``); the caller should shorten it."""


class DuplicateRequestError(ValueError):
    """A request id is already in the engine."""


class RunnerUnavailable(RuntimeError):
    """The runner cannot run now: a pipeline stage failed or stalled, or the replica has no runner
    yet (still loading). Raised by a runner's ``forward``; the engine puts its running requests
    back in the queue (their output so far kept) and waits for ``switch_runner``."""


class NoRunner:
    """A runner for a replica that cannot serve yet (PipeCast: loading, no pipeline): requests
    queue until ``switch_runner`` gives the engine one that can."""

    def __init__(self, config, max_batch_size: int, why: str = "the replica is loading") -> None:  # noqa: ANN001 - a ModelConfig
        self.config, self.max_batch_size, self.why = config, max_batch_size, why

    def forward(self, tokens: torch.Tensor, batch: ForwardBatch,
                all_logits: bool = False) -> torch.Tensor:
        raise RunnerUnavailable(self.why)


class ShardChain:
    """Runs layer-range shards one after another, each with its own KV cache.

    One shard covering every layer is the whole model; several contiguous shards are a pipeline in
    one process (PipeCast puts them on different nodes, with the same hidden states in between).
    """

    def __init__(self, shards: Sequence[ModelShard], max_batch_size: int, kv_chunk_tokens: int = 256):
        if not shards or not shards[0].is_first or not shards[-1].is_last:
            raise ValueError("a chain must start at layer 0 and end at the last layer")
        for a, b in zip(shards, shards[1:]):
            if a.layer_end != b.layer_start:
                raise ValueError(f"shards [{a.layer_start},{a.layer_end}) and "
                                 f"[{b.layer_start},{b.layer_end}) are not contiguous")
        self.shards = list(shards)
        self.caches: list[KVCache] = [s.new_kv_cache(max_batch_size, kv_chunk_tokens) for s in shards]
        self.max_batch_size = max_batch_size

    @property
    def config(self):  # noqa: ANN201 - the model's ModelConfig
        return self.shards[0].cfg

    def forward(self, tokens: torch.Tensor, batch: ForwardBatch,
                all_logits: bool = False) -> torch.Tensor:
        """Token ids [b, T] -> fp32 logits [b, vocab] of each sequence's last new token ([b, T,
        vocab] with ``all_logits``: a prompt's log-probabilities)."""
        x = tokens
        for shard, cache in zip(self.shards, self.caches):
            x = shard.forward(x, batch, cache, all_logits)
        return x


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    arrival_s: float
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # positions already in the KV cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    first_token_s: float | None = None
    prompt_logprobs_sent: bool = False  # a resumed request (switch_runner) does not send them twice

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass(frozen=True)
class StepOutput:
    """One request's progress in one step: a new token (and its safe text), maybe the end."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (eos/stop string/stop token), "length", "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    # With ``SamplingParams.logprobs``: this step's token (the EOS token too when it ends the
    # request, though ``token_id`` is then None), else empty.
    logprobs: tuple[TokenLogprob, ...] = ()
    # With ``SamplingParams.prompt_logprobs``, on the request's first output only: one entry per
    # prompt token, None for the first (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


class Engine:
    """Continuous batching for one model. Not thread-safe: one thread calls add/abort/step."""

    def __init__(self, runner: ShardChain, tokenizer: Tokenizer, cfg: EngineConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.clock = clock
        self.policy = BatchPolicy(cfg.max_batch_size, cfg.max_prefill_tokens_per_step)
        self.slots = SlotAllocator(cfg.max_batch_size)
        self.waiting: OrderedDict[str, Request] = OrderedDict()
        self.running: dict[str, Request] = {}
        self._aborted: list[StepOutput] = []
        self.unavailable: RunnerUnavailable | None = None  # set by step: wait for switch_runner

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue a request. Raises PromptTooLongError / DuplicateRequestError / ValueError (empty)."""
        self.check_prompt(prompt_ids)
        if request_id in self.waiting or request_id in self.running:
            raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        self.waiting[request_id] = Request(
            request_id, list(prompt_ids), params,
            IncrementalDetokenizer(self.tokenizer, params.stop), self.clock(), new_generator(params))

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise PromptTooLongError or ValueError if ``prompt_ids`` cannot run. Reads config only,
        so any thread may call it."""
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(prompt_ids) >= self.cfg.max_seq_len:
            raise PromptTooLongError(
                f"prompt: {len(prompt_ids)} tokens does not fit the context of "
                f"{self.cfg.max_seq_len} tokens (it must leave room for at least one new token)")
        vocab = self.runner.config.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running); its slot is freed. False if it is not here."""
        req = self.waiting.pop(request_id, None) or self.running.pop(request_id, None)
        if req is None:
            return False
        if req.slot is not None:
            self.slots.release(req.slot)
        self._aborted.append(StepOutput(request_id, None, "", True, "abort", len(req.prompt_ids),
                                        len(req.output_ids)))
        return True

    def switch_runner(self, runner: "ShardChain") -> list[str]:
        """Run on ``runner`` from the next step (PipeCast: a temporary pipeline dissolves, or a
        replica finished loading). Running requests go back to the front of the queue with
        their output so far: one prefill of prompt + output rebuilds their KV cache on the new
        runner, and their streams continue where they were (no token lost or repeated; greedy
        and seeded sampling give the same tokens). Returns the ids of the requests moved.
        Raises ValueError if ``runner`` is another model (vocabulary or layer count)."""
        old, new = self.runner.config, runner.config
        if (old.vocab_size, old.num_layers, old.hidden_size) != (new.vocab_size, new.num_layers,
                                                                 new.hidden_size):
            raise ValueError("switch_runner: the new runner is a different model")
        moved = self._requeue_running()
        self.runner, self.unavailable = runner, None
        return moved

    def _requeue_running(self) -> list[str]:
        """Running requests back to the front of the queue, output kept, slots freed."""
        moved = sorted(self.running.values(), key=lambda r: r.arrival_s)
        for req in moved:
            self.slots.release(req.slot)
            req.slot, req.num_cached, req.status = None, 0, Status.WAITING
        resumed = OrderedDict((r.request_id, r) for r in moved)
        resumed.update(self.waiting)
        self.waiting, self.running = resumed, {}
        return [r.request_id for r in moved]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[StepOutput]:
        """One engine iteration: prefill admitted requests, decode the running ones.

        If the runner raises ``RunnerUnavailable``, the tokens made before it in this step are
        still returned, the running requests go back to the queue, and ``unavailable`` says why:
        a caller should not step again before ``switch_runner``."""
        outputs, self._aborted = self._aborted, []
        plan = self.policy.plan([WaitingView(r.request_id, len(r.prompt_ids) + len(r.output_ids))
                                 for r in self.waiting.values()], len(self.running))
        decoding = sorted(self.running.values(), key=lambda r: r.slot) if plan.decode else []
        try:
            for rid in plan.prefill:
                outputs.append(self._prefill(self.waiting.pop(rid)))
            if decoding:
                outputs.extend(self._decode(decoding))
        except RunnerUnavailable as exc:
            self._requeue_running()
            self.unavailable = exc
        return outputs

    def _prefill(self, req: Request) -> StepOutput:
        req.slot = self.slots.allocate()
        req.status = Status.RUNNING
        self.running[req.request_id] = req
        # Resumed requests (PipeCast switch-over) carry output ids: one prefill rebuilds their cache.
        ids = req.prompt_ids + req.output_ids
        batch = ForwardBatch((req.slot,), (0,), len(ids))
        k_prompt = None if req.prompt_logprobs_sent else req.params.prompt_logprobs
        x = torch.tensor([ids])
        logits = (self.runner.forward(x, batch) if k_prompt is None
                  else self.runner.forward(x, batch, all_logits=True))
        prompt_lps = None
        if k_prompt is not None:
            # position i's logits predict token i + 1: the prompt's own log-probabilities
            n = len(req.prompt_ids)
            prompt_lps = (None, *logprobs_of(logits[0, :n - 1], req.prompt_ids[1:],
                                             [k_prompt] * (n - 1)))
            logits = logits[:, -1, :]
            req.prompt_logprobs_sent = True
        req.num_cached = len(ids)
        tokens, lps = sample_step(logits, [req.params], [req.generator])
        out = self._accept(req, tokens[0], lps[0])
        return out if prompt_lps is None else replace(out, prompt_logprobs=prompt_lps)

    def _decode(self, reqs: list[Request]) -> list[StepOutput]:
        """One decode step for ``reqs``: token ids go to the runner as a host tensor (a shard
        moves them to its device), logits come back on the device, and the step's tokens and
        log-probabilities cross to the host once for the whole batch (``sample_step``)."""
        batch = ForwardBatch(tuple(r.slot for r in reqs), tuple(r.num_cached for r in reqs), 1)
        logits = self.runner.forward(torch.tensor([[r.last_token] for r in reqs]), batch)
        for r in reqs:
            r.num_cached += 1
        tokens, lps = sample_step(logits, [r.params for r in reqs], [r.generator for r in reqs])
        return [self._accept(r, t, lp) for r, t, lp in zip(reqs, tokens, lps)]

    def _accept(self, req: Request, token: int, lp: TokenLogprob | None = None) -> StepOutput:
        out = self._accept_token(req, token)
        return out if lp is None else replace(out, logprobs=(lp,))

    def _accept_token(self, req: Request, token: int) -> StepOutput:
        if req.first_token_s is None:
            req.first_token_s = self.clock()
        p = req.params
        is_eos = not p.ignore_eos and token in self.tokenizer.eos_token_ids
        if is_eos or token in p.stop_token_ids:
            return self._finish(req, None, req.detok.flush(), "stop")
        req.output_ids.append(token)
        text = req.detok.add(token)
        if req.detok.stopped:
            return self._finish(req, token, text, "stop")
        total = len(req.prompt_ids) + len(req.output_ids)
        if len(req.output_ids) >= p.max_tokens or total >= self.cfg.max_seq_len:
            return self._finish(req, token, text + req.detok.flush(), "length")
        return StepOutput(req.request_id, token, text, False, None, len(req.prompt_ids),
                          len(req.output_ids))

    def _finish(self, req: Request, token: int | None, text: str, reason: str) -> StepOutput:
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.running.pop(req.request_id, None)
        if req.slot is not None:
            self.slots.release(req.slot)
            req.slot = None
        return StepOutput(req.request_id, token, text, True, reason, len(req.prompt_ids),
                          len(req.output_ids))
