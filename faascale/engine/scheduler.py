"""Continuous-batching policy: which waiting requests join the batch this step. Pure, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WaitingView:
    request_id: str
    num_prompt_tokens: int


@dataclass(frozen=True)
class StepPlan:
    """Prefill these waiting requests (in order), then decode every running request if ``decode``."""

    prefill: tuple[str, ...]
    decode: bool


@dataclass(frozen=True)
class BatchPolicy:
    """First come, first served, bounded by batch slots and a per-step prefill token budget.

    A step always admits at least one waiting request when a slot is free, so a prompt longer than
    the budget is not starved; prefill tokens beyond the budget wait for the next step so running
    requests keep streaming (with SmolLM2 on 2 cores a 2k-token prefill is ~1 s; decode ~30 ms).
    """

    max_batch_size: int
    max_prefill_tokens_per_step: int

    def plan(self, waiting: Sequence[WaitingView], num_running: int) -> StepPlan:
        admitted: list[str] = []
        budget = self.max_prefill_tokens_per_step
        free = self.max_batch_size - num_running
        for w in waiting:
            if free <= 0:
                break
            if admitted and w.num_prompt_tokens > budget:
                break
            admitted.append(w.request_id)
            budget -= w.num_prompt_tokens
            free -= 1
        return StepPlan(prefill=tuple(admitted), decode=num_running > 0)
