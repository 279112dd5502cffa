"""One decoder layer of batch-1 decode on CPUs as one compiled call (numba), not ~80 torch ops.

Batch-1 decode of a small model on a CPU is overhead-bound: a layer of SmolLM2 is ~80 torch
dispatches of a few microseconds each around four matrix-vector products, and each dispatch runs
with cold caches after the products stream megabytes through them. Here the whole layer (RMSNorm,
the QKV product, RoPE, the KV-cache write, grouped-query attention over the cached positions, the
O product and residual, RMSNorm, gate/up, SiLU-and-multiply, down and residual) is one numba
function: its products run on ``parts`` threads over runs of rows (``gemv.py``'s kernel), its
attention on one thread per query head, the rest inline. Measured on this project's 2-core EPYC VM
(2 threads): SmolLM2's decode step 19.5 ms against 27.0 with the torch layer (whose projections
already ran through ``gemv.py``; medians of 8 alternated rounds of 40 steps), one layer with its
weights in cache 261 us against 696; ``benchmarks/engine.py --quick``: 45 tok/s batch-1.

The same numbers as ``model.ModelShard._layer`` to float32 rounding (different summation orders:
the parity tests hold it to transformers' logits); the same cache layout, written in place
(``[kv_head, position, head_dim]`` of the sequence's slot). Compiled on first use on a machine and
cached on disk like ``gemv.py`` (``warm()``).
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch

from faascale.engine.gemv import FASTMATH, rows_into, use_threads

_lock = threading.Lock()
_warm = False


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # pragma: no cover - compiled
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(acc / np.float32(x.shape[0]) + np.float32(eps))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = (x[i] * r) * w[i]
    return out


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _rotate(x: np.ndarray, heads: int, d: int, cos: np.ndarray,
            sin: np.ndarray) -> None:  # pragma: no cover - compiled
    """RoPE in place on ``heads`` heads of ``x``: ``x * cos + swap_halves(x) * sin`` (``sin``
    carries rotate_half's sign, as ``model.Rotary``'s table does)."""
    half = d // 2
    for hh in range(heads):
        base = hh * d
        for i in range(half):
            a = x[base + i]
            b = x[base + half + i]
            x[base + i] = a * cos[i] + b * sin[i]
            x[base + half + i] = b * cos[half + i] + a * sin[half + i]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _attend(qkv: np.ndarray, kc: np.ndarray, vc: np.ndarray, start: int, pos: int, heads: int,
            kv_heads: int, d: int) -> np.ndarray:  # pragma: no cover - compiled
    """Softmax attention of each query head over cache positions ``start..pos`` of its K/V head
    (grouped-query: ``heads // kv_heads`` query heads per K/V head), one thread per head."""
    rep = heads // kv_heads
    length = pos + 1 - start
    scale = np.float32(1.0 / math.sqrt(d))
    out = np.empty(heads * d, dtype=np.float32)
    for hh in numba.prange(heads):
        g = hh // rep
        q = qkv[hh * d:(hh + 1) * d]
        scores = np.empty(length, dtype=np.float32)
        top = -np.inf
        for t in range(length):
            s = np.float32(0.0)
            for i in range(d):
                s += q[i] * kc[g, start + t, i]
            s *= scale
            scores[t] = s
            top = max(top, s)
        total = np.float32(0.0)
        for t in range(length):
            e = np.exp(scores[t] - top)
            scores[t] = e
            total += e
        acc = np.zeros(d, dtype=np.float32)
        for t in range(length):
            p = scores[t]
            for i in range(d):
                acc[i] += p * vc[g, start + t, i]
        for i in range(d):
            out[hh * d + i] = acc[i] / total
    return out


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _layer(h: np.ndarray, input_norm: np.ndarray, post_norm: np.ndarray, eps: float,
           qkv_w: np.ndarray, qkv_b: np.ndarray, o_w: np.ndarray, o_b: np.ndarray,
           gate_up_w: np.ndarray, gate_up_b: np.ndarray, down_w: np.ndarray, down_b: np.ndarray,
           cos: np.ndarray, sin: np.ndarray, kc: np.ndarray, vc: np.ndarray, start: int,
           pos: int, heads: int, kv_heads: int, parts: int) -> np.ndarray:  # pragma: no cover
    d = kc.shape[2]
    q_size, kv_size = heads * d, kv_heads * d
    x = _rms_norm(h, input_norm, eps)
    qkv = np.empty(qkv_w.shape[0], dtype=np.float32)
    rows_into(qkv_w, x, qkv, parts)
    if qkv_b.shape[0]:
        qkv += qkv_b
    _rotate(qkv, heads + kv_heads, d, cos, sin)  # Q's heads, then K's: contiguous in qkv
    for g in range(kv_heads):
        for i in range(d):
            kc[g, pos, i] = qkv[q_size + g * d + i]
            vc[g, pos, i] = qkv[q_size + kv_size + g * d + i]
    attn = _attend(qkv, kc, vc, start, pos, heads, kv_heads, d)
    o = np.empty(o_w.shape[0], dtype=np.float32)
    rows_into(o_w, attn, o, parts)
    h2 = h + o
    if o_b.shape[0]:
        h2 += o_b
    x = _rms_norm(h2, post_norm, eps)
    gate_up = np.empty(gate_up_w.shape[0], dtype=np.float32)
    rows_into(gate_up_w, x, gate_up, parts)
    if gate_up_b.shape[0]:
        gate_up += gate_up_b
    inter = gate_up.shape[0] // 2
    act = np.empty(inter, dtype=np.float32)
    for i in range(inter):
        g = gate_up[i]
        act[i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[inter + i]
    down = np.empty(down_w.shape[0], dtype=np.float32)
    rows_into(down_w, act, down, parts)
    out = h2 + down
    if down_b.shape[0]:
        out += down_b
    return out


_NONE = np.empty(0, dtype=np.float32)


def _np(t: torch.Tensor | None) -> np.ndarray:
    return _NONE if t is None else t.numpy()


def decode_layer(layer, h: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 k_slot: torch.Tensor, v_slot: torch.Tensor, start: int, pos: int, heads: int,
                 kv_heads: int, parts: int) -> torch.Tensor:
    """One layer (``model._Layer``, float32 CPU tensors) over the hidden state ``h`` of one token
    (``[1, 1, hidden]``) at position ``pos``, attending over cache positions ``start..pos``;
    writes the token's K/V into ``k_slot``/``v_slot`` (``[kv_heads, capacity, head_dim]``, the
    sequence's slot of the layer's cache). ``cos``/``sin``: the position's rotary rows
    (``[head_dim]``). Returns the new hidden state (``[1, 1, hidden]``, a new tensor)."""
    use_threads(parts)
    out = _layer(h.numpy().reshape(-1), layer.input_norm.numpy(), layer.post_norm.numpy(), eps,
                 layer.qkv_w.numpy(), _np(layer.qkv_b), layer.o_w.numpy(), _np(layer.o_b),
                 layer.gate_up_w.numpy(), _np(layer.gate_up_b), layer.down_w.numpy(),
                 _np(layer.down_b), cos.numpy().reshape(-1), sin.numpy().reshape(-1),
                 k_slot.numpy(), v_slot.numpy(), start, pos, heads, kv_heads, parts)
    return torch.from_numpy(out).view(h.shape)


def warm() -> None:
    """Compile or load ``_layer`` now (from numba's disk cache: well under a second; the first
    time on a machine: seconds), on a tiny layer with the argument types a shard passes
    (writable weights, as blocks are mapped copy-on-write; no biases)."""
    global _warm
    if _warm:
        return
    with _lock:
        if not _warm:
            d, heads, kv, hidden, inter = 4, 2, 1, 8, 8
            f = np.float32
            _layer(np.ones(hidden, f), np.ones(hidden, f), np.ones(hidden, f), 1e-5,
                   np.ones(((heads + 2 * kv) * d, hidden), f), _NONE, np.ones((hidden, heads * d), f),
                   _NONE, np.ones((2 * inter, hidden), f), _NONE, np.ones((hidden, inter), f),
                   _NONE, np.ones(d, f), np.zeros(d, f), np.zeros((kv, 4, d), f),
                   np.zeros((kv, 4, d), f), 0, 1, heads, kv, 1)
            _warm = True
