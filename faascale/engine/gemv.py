"""Batch-1 decode's matrix-vector products on CPUs: ``out = w @ x`` streamed at memory bandwidth.

A decode step of one sequence reads every weight once for one multiply-add each, so it is bound by
how fast the weights stream from memory. The libraries fall short of that on small CPUs: MKL's
GEMV runs one thread, oneDNN's pays ~23 us a call, and ``torch.bmm`` over row groups (what
``model._split_linear`` does for a few rows) reaches 19-24 GB/s. This kernel gives each thread one
contiguous run of rows and computes one plain dot product per row, which LLVM vectorises; measured
on this project's 2-core EPYC VM (2 threads, float32, weights streamed from DRAM, where summing a
buffer reads 31-36 GB/s): SmolLM2's QKV 70 us against 95 (bmm), gate/up 223 against 318, the LM
head 3.4 ms against 4.7 (33 GB/s); its decode step 28.0 ms against 33.0 (medians of 8 alternated
rounds).

The kernel is compiled by numba on its first call in a machine and cached on disk
(``cache=True``: next to this file, or numba's per-user cache where that is not writable); a later
process loads it in ~0.3 s (``warm()``, which the engine runs when it builds a CPU shard and the
warm runtime pool before any replica exists). Reassociation and contraction are allowed (the sums
vectorise) but not the finite-math assumptions, so NaN and inf propagate as IEEE says. Every row's
sum runs in the same order whatever the thread count, so a shard's output does not depend on how
its rows were split.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

FASTMATH = {"reassoc", "contract"}


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def rows_into(w: np.ndarray, x: np.ndarray, out: np.ndarray, parts: int) -> None:  # pragma: no cover - compiled
    """``out = w @ x`` on ``parts`` threads, each one run of rows (also called from other
    compiled functions: ``cpu_decode.py``)."""
    n, k = w.shape
    per = (n + parts - 1) // parts
    for part in numba.prange(parts):
        for j in range(part * per, min(n, (part + 1) * per)):
            acc = np.float32(0.0)
            for i in range(k):
                acc += w[j, i] * x[i]
            out[j] = acc


_lock = threading.Lock()
_threads = threading.local()
_warm = False


def max_parts() -> int:
    """The most threads this kernel may use here (numba's pool: the machine's cores)."""
    return numba.config.NUMBA_NUM_THREADS


def warm() -> None:
    """Compile or load the kernel now (first call in a process: ~0.3 s from the disk cache, ~1 s
    the first time on a machine), so that no request's first token pays it."""
    global _warm
    if _warm:
        return
    with _lock:
        if not _warm:
            x, out = np.ones(8, dtype=np.float32), np.empty(4, dtype=np.float32)
            w = np.ones((4, 8), dtype=np.float32)
            rows_into(w, x, out, 1)
            w.setflags(write=False)  # weights in a read-only mapping (numba types them apart)
            rows_into(w, x, out, 1)
            _warm = True


def use_threads(parts: int) -> None:
    """Numba's thread count for this calling thread (its setting is per thread), set only when it
    changes; every compiled CPU kernel of the engine goes through here (``cpu_decode.py`` too)."""
    if getattr(_threads, "parts", 0) != parts:
        numba.set_num_threads(parts)
        _threads.parts = parts


def gemv(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """``x @ w.T`` for one row ``x`` (``[..., k]`` with one row in all) and a contiguous float32
    ``w`` ``[n, k]`` on the CPU, on ``parts`` threads (at most ``max_parts()``); the caller checks
    these (``model._gemv_threads``), as this runs ~120 times a decode step: ~8 us of Python and
    dispatch around the kernel here, against ~17 with the checks and torch-side views. Returns
    ``[..., n]``, a new tensor."""
    n, k = w.shape
    out = np.empty(n, dtype=np.float32)
    use_threads(parts)
    rows_into(w.numpy(), x.numpy().reshape(k), out, parts)
    return torch.from_numpy(out).view(*x.shape[:-1], n)
