"""Sampling parameters (validated at the edge) and the sampler (temperature, top-k, top-p, seed).

Logits may live on a GPU; what the host needs crosses once per step (``sample_step``): the
argmax and the asked log-probabilities in one small copy when every row is greedy, else the
logits themselves, once, so that a seeded request draws from its CPU generator exactly as it
would on a CPU.
"""

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
# Stop strings are matched against the text at every token: bounded, so the cost per token is.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound (vLLM's default max_logprobs is 20 too)
# A log-probability JSON can carry: -inf (a token the model rules out) and NaN are not JSON.
MIN_LOGPROB = -9999.0


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
    logprobs: int | None = None  # each new token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)

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
        if len(self.stop) > MAX_STOPS:
            raise SamplingParamsError(f"stop: at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise SamplingParamsError(f"stop: a stop string has at most {MAX_STOP_CHARS} characters")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise SamplingParamsError(f"{name}: must be in [0, {MAX_LOGPROBS}], got {k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request generator when a seed is given (same seed -> same tokens), else None."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(params.seed)


def sample_step(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]
                ) -> tuple[list[int], list[TokenLogprob | None]]:
    """One step's token per row of ``logits`` [b, vocab] (``sample``) and, for the rows whose
    params ask (``logprobs``), its ``TokenLogprob``. Does not mutate ``logits``. On a CPU the
    same numbers as ``sample`` then ``logprobs_of``; on another device one copy to the host."""
    if logits.device.type != "cpu":
        if all(p.greedy for p in params):
            return _greedy_step(logits, params)
        logits = logits.cpu()  # one copy: the seeded CPU generators draw as on a CPU
    tokens = sample(logits, params, generators)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(params)
    if rows:
        found = logprobs_of(logits[rows], [tokens[i] for i in rows],
                            [params[i].logprobs or 0 for i in rows])
        for i, lp in zip(rows, found):
            out[i] = lp
    return tokens, out


def _greedy_step(logits: torch.Tensor, params: Sequence[SamplingParams]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
    """``sample_step`` when every row is greedy, computed where ``logits`` are, with one copy of
    the results to the host (argmax per row, then the asked rows' log-probabilities)."""
    picks = _argmax_tensor(logits)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return picks.tolist(), [None] * len(params)
    ks = [params[i].logprobs or 0 for i in rows]
    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
    chosen, top_v, top_i = _logprob_tensors(logits[rows_t], picks[rows_t], max(ks))
    host = _to_host([picks, chosen, top_v, top_i])
    tokens = [int(t) for t in host[0]]
    return tokens, _assemble([tokens[i] for i in rows], ks, host[1], host[2], host[3],
                             rows, len(params))


def _assemble(token_ids: Sequence[int], ks: Sequence[int], chosen: list[float],
              top_v: list[list[float]], top_i: list[list[float]], rows: Sequence[int],
              num_rows: int) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * num_rows
    for j, (row, tok, k) in enumerate(zip(rows, token_ids, ks)):
        top = tuple((int(i), v) for i, v in zip(top_i[j][:k], top_v[j][:k])) if k else ()
        out[row] = TokenLogprob(int(tok), chosen[j], top)
    return out


def _to_host(tensors: Sequence[torch.Tensor]) -> list[list]:
    """``[t.tolist() for t in tensors]`` (1-D or 2-D tensors): on a CPU plainly (nothing to
    copy), elsewhere in one device-to-host copy (``_packed_tolist``)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.tolist() for t in tensors]
    return _packed_tolist(tensors)


def _packed_tolist(tensors: Sequence[torch.Tensor]) -> list[list]:
    """``[t.tolist() for t in tensors]`` through one copy: each flattened to float64 (exact for
    fp32 values and for indices below 2^53; integers come back as floats), concatenated,
    copied, split."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        part = flat[at:at + n]
        at += n
        out.append([part[r * t.shape[1]:(r + 1) * t.shape[1]] for r in range(t.shape[0])]
                   if t.dim() == 2 else part)
    return out


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [b, vocab] (fp32). Does not mutate ``logits``. Never
    fails on the numbers: a row whose distribution is not finite (NaN or inf logits, a
    temperature that overflows them) gets the argmax of its finite logits."""
    out: list[int] = [0] * logits.shape[0]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:  # (all greedy, the common case: no copy of the rows)
        picks = _argmax(logits if len(greedy_rows) == len(out) else logits[greedy_rows])
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


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability under the model's raw distribution (log-softmax of the
    logits, before temperature, top-k or top-p: vLLM's default ``raw_logprobs``) and the ``k``
    most likely tokens there, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], ks: Sequence[int]
                ) -> list[TokenLogprob]:
    """Per row of ``logits`` [n, vocab], the log-probability of ``token_ids[i]`` and the top
    ``ks[i]`` alternatives. Does not mutate ``logits``. Non-finite values (a token ruled out,
    NaN logits) come back as ``MIN_LOGPROB``, so the result is always valid JSON."""
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)
    chosen, top_v, top_i = _logprob_tensors(logits, ids, max(ks, default=0))
    chosen_h, top_v_h, top_i_h = _to_host([chosen, top_v, top_i])
    return _assemble(token_ids, ks, chosen_h, top_v_h, top_i_h, range(len(token_ids)),
                     len(token_ids))


def _logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, k_max: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where ``logits`` [n, vocab] are: each row's log-probability of ``token_ids[i]`` [n] and
    its top ``k_max`` (values, indices: [n, k_max], empty when 0), non-finite as MIN_LOGPROB."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    lp = torch.nan_to_num(lp, nan=MIN_LOGPROB, neginf=MIN_LOGPROB, posinf=0.0).clamp_(min=MIN_LOGPROB)
    chosen = lp.gather(-1, token_ids[:, None])[:, 0]
    if k_max:
        top_v, top_i = torch.topk(lp, min(k_max, lp.shape[-1]), dim=-1)
    else:
        top_v = lp.new_empty((lp.shape[0], 0))
        top_i = torch.empty((lp.shape[0], 0), dtype=torch.long, device=lp.device)
    return chosen, top_v, top_i


def _argmax_tensor(rows: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the largest logit, NaN counting as -inf (+inf stays the largest;
    a row of nothing but NaN gets index 0), where ``rows`` are.

    On a CPU the plain argmax first: it picks a NaN or +inf if a row has one, so when every
    pick is finite it is the answer, without a cleaned copy of the logits (two passes over
    the vocabulary fewer per step). On a GPU that check would wait for the device: not done."""
    if rows.device.type == "cpu":
        picks = rows.argmax(dim=-1)
        if bool(torch.isfinite(rows.gather(-1, picks.unsqueeze(-1))).all()):
            return picks
    finite = torch.nan_to_num(rows.float(), nan=float("-inf"),
                              posinf=torch.finfo(torch.float32).max)
    return finite.argmax(dim=-1)


def _argmax(rows: torch.Tensor) -> list[int]:
    return _argmax_tensor(rows).tolist()
