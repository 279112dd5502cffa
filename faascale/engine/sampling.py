"""Sampling parameters (validated at the edge) and the sampler (temperature, top-k, top-p, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# temperature like 1e-45 overflows to inf, and softmax of inf is NaN.
SAMPLING_EPS = 1e-5
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (unsigned 64-bit)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingParamsError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError(f"temperature: must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k: must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SamplingParamsError(f"seed: must be in [0, 2^64 - 1], got {self.seed}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop: stop strings must be non-empty")
        if len(self.stop) > 16:
            raise SamplingParamsError(f"stop: at most 16 stop strings, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request generator when a seed is given (same seed -> same tokens), else None."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(params.seed)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [b, vocab] (fp32). Does not mutate ``logits``. Never
    fails on the numbers: a row whose distribution is not finite (NaN or inf logits, a
    temperature that overflows them) gets the argmax of its finite logits."""
    out: list[int] = [0] * logits.shape[0]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        picks = _argmax(logits[greedy_rows])
        for i, tok in zip(greedy_rows, picks):
            out[i] = tok
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float() / p.temperature
        if not bool(torch.isfinite(row).all()):
            out[i] = _argmax(logits[i:i + 1])[0]
            continue
        if p.top_k and p.top_k < row.shape[0]:
            values, indices = torch.topk(row, p.top_k)
        else:
            values, indices = torch.sort(row, descending=True)
        probs = torch.softmax(values, dim=-1)
        if p.top_p < 1.0:
            cum = torch.cumsum(probs, dim=-1)
            keep = (cum - probs) < p.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
            probs = probs * keep
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            out[i] = int(indices[0])  # the most likely token
            continue
        choice = torch.multinomial(probs, 1, generator=generators[i])
        out[i] = int(indices[choice])
    return out


def _argmax(rows: torch.Tensor) -> list[int]:
    """Per row, the index of the largest logit, NaN counting as -inf (+inf stays the largest;
    a row of nothing but NaN gets index 0)."""
    finite = torch.nan_to_num(rows.float(), nan=float("-inf"),
                              posinf=torch.finfo(torch.float32).max)
    return finite.argmax(dim=-1).tolist()
