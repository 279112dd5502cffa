"""A Llama-family decoder that runs any contiguous range of its layers.

``ModelShard(layer_start, layer_end)`` holds the weights of those layers (plus the embeddings if
``layer_start == 0`` and the final norm and LM head if ``layer_end == num_layers``). Its forward
maps token ids -> hidden states (first shard), hidden -> hidden (middle), hidden -> logits (last);
the whole model is the one shard ``[0, num_layers)``. This is what lets PipeCast chain partially
loaded replicas: each stage is a shard with its own KV cache.

A shard computes on one device (``cpu`` or ``cuda:N``): its weights, KV cache, rotary tables,
positions and masks live there; inputs from another device (token ids, a remote stage's hidden
states) are moved there on entry, and outputs stay there (the sampler moves what the host needs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faascale.engine import cpu_decode, gemv
from faascale.engine.config import ModelConfig, resolve_device
from faascale.engine.kv_cache import CacheIndex, KVCache


class ShardWeightsError(ValueError):
    """The tensors given to a shard do not cover its layer range."""


@dataclass(frozen=True)
class ForwardBatch:
    """What one forward pass computes: ``num_tokens`` new tokens for each sequence in ``slots``.

    Sequence i's new tokens take positions ``start_positions[i] .. + num_tokens - 1`` and its KV
    lives in cache slot ``slots[i]``. Prefill runs one sequence with many tokens; decode runs many
    sequences with one token each.
    """

    slots: tuple[int, ...]
    start_positions: tuple[int, ...]
    num_tokens: int

    def __post_init__(self) -> None:
        assert len(self.slots) == len(self.start_positions) and self.slots, self
        assert self.num_tokens >= 1 and (self.num_tokens == 1 or len(self.slots) == 1), self


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3 or linear scaling applied (fp32, [head_dim/2])."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class Rotary:
    """Cos/sin tables on ``device``, grown on demand, indexed by absolute position.

    ``sin`` carries the sign of ``rotate_half`` (its first half negated), so a rotation is
    ``x * cos + swap_halves(x) * sin``: one op fewer per rotation, the same bits (negation is
    exact). The tables are computed on the CPU and copied, so every device rotates by the same
    numbers."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> None:
        self.inv_freq = rope_inv_freq(cfg)
        self.dtype, self.device = dtype, device
        self.cos = torch.empty(0, device=device)
        self.sin = torch.empty(0, device=device)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        sin[:, :sin.shape[1] // 2].neg_()
        self.cos = emb.cos().to(self.dtype).to(self.device)
        self.sin = sin.to(self.dtype).to(self.device)

    def tables(self, starts: tuple[int, ...], num_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``starts[i] .. + num_tokens - 1``: [b, 1, T, head_dim], or
        [1, 1, T, head_dim] when every sequence starts at the same position (a slice, no gather;
        broadcast over the batch and the heads)."""
        need = max(starts) + num_tokens
        if need > self.cos.shape[0]:
            self._grow(need)
        if len(set(starts)) == 1:
            p0, p1 = starts[0], starts[0] + num_tokens
            return self.cos[None, None, p0:p1], self.sin[None, None, p0:p1]
        positions = (torch.tensor(starts, dtype=torch.long, device=self.device)[:, None]
                     + torch.arange(num_tokens, device=self.device)[None, :])
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _probe_onednn_linear(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear op is usable here for ``dtype`` (CPU builds with MKLDNN; not on
    GPUs; bf16 only where the CPU has it: an AVX2-only CPU fails to create the primitive).

    For batch-1 decode it streams dense (unpacked, zero-copy) fp32 weights at ~2x the bandwidth
    of ``F.linear``'s MKL GEMV path on this class of CPU (23.5 vs 11.2 GB/s, 2 threads, measured
    on an EPYC with benchmarks/engine.py), and is faster at batch 16 and prefill too.
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = (torch.randn(3, 8).to(dtype), torch.randn(5, 8).to(dtype),
                   torch.randn(5).to(dtype))
        return torch.allclose(op(x, w, b, "none", [], "").float(), F.linear(x, w, b).float(),
                              atol=1e-5 if dtype == torch.float32 else 0.1)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_DTYPES = tuple(d for d in (torch.float32, torch.bfloat16) if _probe_onednn_linear(d))


# Batch-1 decode's layers as compiled calls on CPUs (cpu_decode.py); False: the torch layer
# (tests compare the two).
COMPILED_DECODE = True
SPLIT_MAX_ROWS = 64  # decode batches; longer inputs (prefill) use the libraries' GEMM as is


def _split_parts(x: torch.Tensor, w: torch.Tensor) -> int:
    """How many row groups of ``w`` a CPU projection of ``x`` runs as one batched GEMM (1: none).

    For a few rows (decode) the libraries leave a core idle or pay a fixed cost per call: MKL's
    GEMV runs on one thread (13.5 GB/s at 2 threads, 14.4 at 1, on SmolLM2's LM head) and
    oneDNN's dense-weight linear costs ~23 us a call before it reads a byte. ``torch.bmm`` over
    the weight's rows viewed as ``threads`` groups (zero-copy) runs one group per thread with
    neither cost. Measured on this project's 2-core EPYC VM (float32, weights streamed from DRAM,
    batch 1): QKV 99 us against 120-158 (oneDNN), O 64 against 100-107 (``F.linear``), down 118
    against 174-206, gate/up level (~300); SmolLM2's decode step 32.5 ms against 38.2 (medians of
    6 alternated rounds). Float32 only (bf16 gained nothing here); the LM head keeps oneDNN, which
    is faster than this for more than one row. One row goes to ``gemv.py`` instead (faster
    still)."""
    threads = torch.get_num_threads()
    if (threads < 2 or x.device.type != "cpu" or x.dtype != torch.float32
            or x.numel() > SPLIT_MAX_ROWS * x.shape[-1] or not w.is_contiguous()):
        return 1
    return math.gcd(w.shape[0], threads)


def _gemv_threads(x: torch.Tensor, w: torch.Tensor) -> int:
    """Threads for one row of ``x`` through ``gemv.py``'s kernel (0: not that path): on CPUs, in
    float32, with more than one thread and a contiguous weight of any row count (the LM head
    included: 33 GB/s against oneDNN's 24 on SmolLM2's)."""
    threads = torch.get_num_threads()
    if (threads < 2 or x.device.type != "cpu" or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.numel() != w.shape[1] or not w.is_contiguous()):
        return 0
    return min(threads, gemv.max_parts())


def _split_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  parts: int) -> torch.Tensor:
    """``x @ w.T + b`` as one ``torch.bmm`` over ``parts`` row groups of ``w`` (see _split_parts)."""
    n, k = w.shape
    rows = x.numel() // k
    out = torch.bmm(x.reshape(1, rows, k).expand(parts, rows, k),
                    w.view(parts, n // parts, k).transpose(1, 2))  # [parts, rows, n / parts]
    out = (out.view(*x.shape[:-1], n) if rows == 1
           else out.transpose(0, 1).reshape(*x.shape[:-1], n))
    return out if b is None else out.add_(b)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            head: bool = False) -> torch.Tensor:
    """``x @ w.T + b``. On CPUs in float32 with more than one thread, one row (batch-1 decode)
    runs through ``gemv.py``'s kernel (``_gemv_threads``) and a decode batch's layer projections
    as one batched GEMM over row groups (``_split_parts``; the LM head, ``head``, keeps oneDNN);
    otherwise oneDNN only for widening projections (more outputs than inputs: QKV, gate/up, the
    LM head): for the square and narrowing ones (O, down) and single-threaded, ``F.linear`` is
    faster. Measured (before the kernel and the split) on this project's 2-core EPYC VM with
    decode steps of SmolLM2 alternating between the variants (medians of 150 steps each): 2
    threads 23.4 tok/s against 22.9 with oneDNN everywhere and 19.4 with ``F.linear``
    everywhere; 1 thread 18.7 against 17.7 (oneDNN) and 19.1 (``F.linear``)."""
    threads = _gemv_threads(x, w)
    if threads:
        out = gemv.gemv(x, w, threads)
        return out if b is None else out.add_(b)
    parts = 1 if head else _split_parts(x, w)
    if parts > 1:
        return _split_linear(x, w, b, parts)
    if (x.dtype in _ONEDNN_DTYPES and x.device.type == "cpu" and w.shape[0] > w.shape[1]
            and torch.get_num_threads() > 1):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
        return out.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE: ``x * cos + rotate_half(x) * sin`` with rotate_half's sign folded into the table."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def whole_kv_heads(device_type: str, dtype: torch.dtype, has_mask: bool,
                   flash_capable: bool = True) -> bool:
    """Whether grouped-query attention must repeat its K/V heads before SDPA.

    On CUDA the flash kernel is the only one that takes ``enable_gqa``, and it needs fp16/bf16,
    no mask and a GPU of compute capability 8.0 or later (``flash_capable``); elsewhere (a mask:
    batched decode at mixed positions, a sliding window; fp32; an older GPU) the memory-efficient
    kernel must run, which takes masks and fp32 but not ``enable_gqa``: given grouped heads SDPA
    would silently fall back to its math kernel. On CPU SDPA's own kernel takes ``enable_gqa``."""
    return device_type == "cuda" and (has_mask or not flash_capable
                                      or dtype not in (torch.float16, torch.bfloat16))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool, whole_heads: bool | None = None) -> torch.Tensor:
    """SDPA over q [b, H, T, d] and k, v [b, KV, L, d] (KV divides H); ``whole_heads``: repeat
    K/V heads instead of ``enable_gqa`` (default: ``whole_kv_heads`` for these tensors)."""
    gqa = q.shape[1] != k.shape[1]
    if whole_heads is None:
        whole_heads = whole_kv_heads(q.device.type, q.dtype, mask is not None)
    if gqa and whole_heads:
        # query head i reads K/V head i // rep: a broadcast view, then one copy
        b, kv, length, d = k.shape
        rep = q.shape[1] // kv
        k = k[:, :, None].expand(b, kv, rep, length, d).reshape(b, kv * rep, length, d)
        v = v[:, :, None].expand(b, kv, rep, length, d).reshape(b, kv * rep, length, d)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=gqa)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float,
              doubled: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` scaled by ``w``. ``doubled`` (``cat(w, w)``, given on CPUs in float32):
    computed as the LayerNorm of ``[x, -x]``, whose mean is 0 and whose variance is mean(x²), so
    LayerNorm's one fused kernel gives RMSNorm's numbers (to rounding: 1e-6 on values of 6)
    where ``F.rms_norm`` runs six kernels on CPUs. In SmolLM2's decode step (61 norms) this took
    the work outside the projections from 6.3 to 4.9 ms and the whole step from 30.4 to 29.9 ms
    (medians of 7-8 alternated rounds, this project's 2-core EPYC VM)."""
    n = x.shape[-1]
    if doubled is not None:
        return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * n,), doubled, None, eps)[..., :n]
    if x.dtype == torch.float32:
        return F.rms_norm(x, (n,), w, eps)
    # Like the reference: normalize in fp32, scale in the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


class ModelShard:
    """Layers ``[layer_start, layer_end)`` of one model, with embeddings/head at the ends.

    Weights are used as given (zero-copy views over block buffers) when they are on ``device``
    in the compute dtype; otherwise they are copied or cast once here (a caller with a faster
    path to the device, ``memory_tier.device.DeviceLoader``, moves them first). Raises
    ShardWeightsError if a tensor is missing, ConfigError / DeviceUnavailableError for a device
    the engine does not run on or this machine does not have.
    """

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], layer_start: int,
                 layer_end: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if not 0 <= layer_start < layer_end <= cfg.num_layers:
            raise ShardWeightsError(f"layer range [{layer_start}, {layer_end}) is not inside "
                                    f"[0, {cfg.num_layers})")
        self.cfg = cfg
        self.layer_start, self.layer_end = layer_start, layer_end
        self.dtype = dtype
        self.device = resolve_device(device)
        self._flash_capable = (self.device.type == "cuda"
                               and torch.cuda.get_device_capability(self.device) >= (8, 0))
        self.is_first = layer_start == 0
        self.is_last = layer_end == cfg.num_layers

        def get(name: str, optional: bool = False) -> torch.Tensor | None:
            t = tensors.get(name)
            if t is None:
                if optional:
                    return None
                raise ShardWeightsError(f"shard [{layer_start}, {layer_end}) needs tensor {name!r}")
            if t.dtype == dtype and t.device == self.device:
                return t
            return t.to(device=self.device, dtype=dtype)

        self.embed = get("embed.weight") if self.is_first else None
        self.layers = [
            _Layer(get(f"layers.{i}.input_norm.weight"), get(f"layers.{i}.qkv.weight"),
                   get(f"layers.{i}.qkv.bias", True), get(f"layers.{i}.o.weight"),
                   get(f"layers.{i}.o.bias", True), get(f"layers.{i}.post_norm.weight"),
                   get(f"layers.{i}.gate_up.weight"), get(f"layers.{i}.gate_up.bias", True),
                   get(f"layers.{i}.down.weight"), get(f"layers.{i}.down.bias", True))
            for i in range(layer_start, layer_end)
        ]
        self.norm = get("norm.weight") if self.is_last else None
        self.lm_head = None
        if self.is_last:
            head = get("lm_head.weight", optional=True)
            if head is None and cfg.tie_word_embeddings and self.embed is not None:
                head = self.embed
            if head is None:
                raise ShardWeightsError("the last shard needs 'lm_head.weight'")
            self.lm_head = head
        self.rotary = Rotary(cfg, dtype, self.device)
        # Each norm's weight twice over, for _rms_norm's one-kernel form (CPU, float32 only).
        self._doubled: dict[int, torch.Tensor] | None = None
        if self.device.type == "cpu" and dtype == torch.float32:
            norms = [t for layer in self.layers for t in (layer.input_norm, layer.post_norm)]
            self._doubled = {id(t): torch.cat((t, t)) for t in norms + [self.norm]
                             if t is not None}
            if torch.get_num_threads() > 1:  # batch-1 decode's kernels, loaded before any
                gemv.warm()  # request waits for them
                cpu_decode.warm()

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def weight_bytes(self) -> int:
        """Bytes read per decode step (embedding rows are negligible; the head is read whole)."""
        total = 0
        for layer in self.layers:
            for t in vars(layer).values():
                if t is not None:
                    total += t.numel() * t.element_size()
        for t in (self.norm, self.lm_head):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def new_kv_cache(self, max_batch_size: int, chunk_tokens: int = 256) -> KVCache:
        return KVCache(self.num_layers, max_batch_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                       self.dtype, chunk_tokens, self.device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """Run this shard's layers over ``batch``, writing K/V into ``cache``.

        ``x``: token ids [b, T] (first shard) or hidden states [b, T, hidden] (others), on any
        device (moved to this shard's). Returns hidden states [b, T, hidden], or fp32 logits
        [b, vocab] for each sequence's last token from the last shard ([b, T, vocab] with
        ``all_logits``), on this shard's device.
        """
        t = batch.num_tokens
        if self.is_first:
            h = F.embedding(x if x.device == self.device else x.to(self.device), self.embed)
        else:
            h = x.to(device=self.device, dtype=self.dtype)
        cos, sin = self.rotary.tables(batch.start_positions, t)
        end_max = max(batch.start_positions) + t
        cache.ensure_capacity(end_max)
        index = cache.index(batch.slots, batch.start_positions)
        parts = self._compiled_decode_parts(batch)
        if parts:  # batch-1 decode on a CPU: each layer one compiled call (cpu_decode.py)
            slot, pos = batch.slots[0], batch.start_positions[0]
            window = self.cfg.sliding_window
            start = 0 if window is None else max(0, pos - window + 1)
            for li, layer in enumerate(self.layers):
                h = cpu_decode.decode_layer(layer, h, self.cfg.rms_norm_eps, cos, sin,
                                            cache.k[li][slot], cache.v[li][slot], start, pos,
                                            self.cfg.num_heads, self.cfg.num_kv_heads, parts)
        else:
            mask, causal = self._attention_mask(batch, end_max)
            whole_heads = whole_kv_heads(self.device.type, self.dtype, mask is not None,
                                         self._flash_capable)
            for li, layer in enumerate(self.layers):
                h = self._layer(layer, h, li, batch, cache, index, cos, sin, mask, causal,
                                whole_heads, end_max)
        if not self.is_last:
            return h
        h = _rms_norm(h if all_logits else h[:, -1:, :], self.norm, self.cfg.rms_norm_eps,
                      self._doubled_of(self.norm))
        logits = _linear(h, self.lm_head, head=True).float()
        return logits if all_logits else logits[:, -1, :]

    def _compiled_decode_parts(self, batch: ForwardBatch) -> int:
        """Threads for ``cpu_decode.py``'s compiled layer (0: the torch layer): one sequence, one
        token, on a CPU in float32 with more than one thread (where ``gemv.py`` runs)."""
        if (self._doubled is None or len(batch.slots) != 1 or batch.num_tokens != 1
                or not COMPILED_DECODE):
            return 0
        threads = torch.get_num_threads()
        return min(threads, gemv.max_parts()) if threads > 1 else 0

    def _doubled_of(self, norm_weight: torch.Tensor) -> torch.Tensor | None:
        return None if self._doubled is None else self._doubled[id(norm_weight)]

    def _attention_mask(self, batch: ForwardBatch, end_max: int
                        ) -> tuple[torch.Tensor | None, bool]:
        """Boolean mask [b, 1, T, L] (True = attend), or (None, is_causal) when none is needed."""
        t = batch.num_tokens
        window = self.cfg.sliding_window
        uniform = len(set(batch.start_positions)) == 1
        fresh = batch.start_positions[0] == 0 and uniform
        if (window is None or window >= end_max) and (fresh or (uniform and t == 1)):
            return None, fresh and t > 1
        dev = self.device
        starts = torch.tensor(batch.start_positions, dtype=torch.long, device=dev)
        q_pos = starts[:, None] + torch.arange(t, device=dev)[None, :]  # [b, T]
        k_pos = torch.arange(end_max, device=dev)  # [L]
        mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [b, T, L]
        if window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
        return mask[:, None, :, :], False

    def _layer(self, w: _Layer, h: torch.Tensor, li: int, batch: ForwardBatch, cache: KVCache,
               index: CacheIndex, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               causal: bool, whole_heads: bool, end_max: int) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = h.shape
        x = _rms_norm(h, w.input_norm, cfg.rms_norm_eps, self._doubled_of(w.input_norm))
        qkv = _linear(x, w.qkv_w, w.qkv_b)
        # Q and K heads rotated together: one rotation's ops instead of two, the same bits.
        qk = qkv[..., :cfg.q_size + cfg.kv_size].view(b, t, cfg.num_heads + cfg.num_kv_heads,
                                                      cfg.head_dim).transpose(1, 2)
        qk = _rotate(qk, cos, sin)
        q, k = qk[:, :cfg.num_heads], qk[:, cfg.num_heads:]
        v = qkv[..., cfg.q_size + cfg.kv_size:].view(b, t, cfg.num_kv_heads,
                                                     cfg.head_dim).transpose(1, 2)
        cache.write(li, batch.slots, batch.start_positions, k, v, index)
        if causal:  # fresh prefill: attend over the new keys directly, no cache read
            keys, values = k, v
        else:
            keys, values = cache.read(li, batch.slots, end_max, index)
        attn = _attention(q, keys, values, mask, causal, whole_heads)
        attn = attn.transpose(1, 2).reshape(b, t, cfg.q_size)
        h = h + _linear(attn, w.o_w, w.o_b)
        x = _rms_norm(h, w.post_norm, cfg.rms_norm_eps, self._doubled_of(w.post_norm))
        gate, up = _linear(x, w.gate_up_w, w.gate_up_b).chunk(2, dim=-1)
        return h + _linear(F.silu(gate) * up, w.down_w, w.down_b)


def merge_block_tensors(blocks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One name -> tensor dict from several blocks' tensors (later blocks never shadow names)."""
    out: dict[str, torch.Tensor] = {}
    for block in blocks:
        for name, tensor in block.items():
            out.setdefault(name, tensor)
    return out
