"""Execute-while-load: one temporary pipeline's stages, each a layer range on its own replica.

The replica that owns a request (the head) keeps its ``Engine`` (batching, sampling, streaming)
and runs it over a ``StageChain``: its own layer ranges run in process, the others are
``RemoteStage``s whose ``StageServer`` (on the replica holding those blocks) runs them on its own
KV cache and replies. Hidden states (or, for a remote first stage, token ids) go stage to stage
over the transport; the last stage returns logits, and the head samples. KV-cache slots are the
head's: a stage keeps one KV cache per head it serves (every member of a pipeline may be the head
of its own requests), so slot numbers never clash.

When a replica finishes loading, the head switches its engine to a local ``ShardChain``
(``EngineLoop.switch_runner``): requests in flight resume from their token ids, their streams
uninterrupted. A stage that does not answer within ``timeout_s`` raises ``StageError`` (the
coordinator re-forms the pipeline; the engine loop fails those requests rather than hang them).

Frames (kind ``"hidden"``): request meta ``{op, reply_to, reply_epoch, slots, starts,
num_tokens, dtype, shape, all_logits}``, reply meta ``{op, dtype, shape}`` or ``{op, error}``;
the payload is the tensor's bytes. A request carries the stage's epoch (its member's session),
the reply the one the head named (``reply_epoch``, its own session): a transport that takes only
its session's frames refuses a request or reply replayed after its owner restarted.

Devices: frames carry host bytes. A stage on a GPU sends its outputs (and a head its local
stages' hidden states) through ``wire_bytes``, one synchronous device-to-host copy; what arrives
lands in a host tensor and goes on as is: a local ``ModelShard`` moves its input to its own
device on entry, and the engine samples logits wherever they are (one copy to the host).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from faascale.engine.engine import RunnerUnavailable
from faascale.engine.kv_cache import KVCache
from faascale.engine.model import ForwardBatch, ModelShard
from faascale.pipecast.transport import Header, Transport, TransportTimeout

log = logging.getLogger(__name__)
_OPS = itertools.count(1)
SLOW_STAGE_S = 1.0  # a round trip longer than this is logged (a starved stage node)
_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.bfloat16, torch.float16, torch.int64)}


class StageError(RunnerUnavailable):
    """A remote stage failed, stalled past its timeout, or answered with an error. The head's
    engine keeps the requests (they wait for the next runner) rather than failing them."""


def max_frame_bytes(config: Any, max_seq_len: int, max_batch_size: int) -> int:
    """The largest payload a pipeline of this model sends between stages, so that a stage's or
    a head's transport refuses anything larger before buffering it: a prefill's token ids [1, T]
    or hidden states [1, T, hidden], a decode's [b, 1, hidden], logits [b, vocab] or a prompt's
    [1, T, vocab] (log-probabilities); T up to ``max_seq_len``, b up to ``max_batch_size``, 4
    bytes an element at most (fp32 logits; 8-byte token ids are one per position)."""
    rows = max(int(max_seq_len), int(max_batch_size))
    return rows * max(int(config.hidden_size), int(config.vocab_size), 2) * 4


def _tensor_meta(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def _empty_like_meta(meta: dict[str, Any]) -> torch.Tensor:
    dtype = _DTYPES.get(str(meta.get("dtype")))
    if dtype is None:
        raise StageError(f"unsupported tensor dtype {meta.get('dtype')!r}")
    return torch.empty([int(n) for n in meta["shape"]], dtype=dtype)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A host tensor's own bytes, writable (a frame is received into them)."""
    assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.shape)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def wire_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s bytes as a frame payload (row-major, its dtype): a contiguous host tensor's own
    bytes (no copy); a strided one's, compacted; a GPU tensor's, copied to the host once (a
    synchronous copy: it waits for the kernels that produce ``t``, and the bytes are final when
    this returns, as a zero-copy send needs). The view keeps its tensor alive."""
    if t.device.type != "cpu":
        t = t.to("cpu")  # blocking: ordered after the current stream's work on ``t``
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


class _Local:
    """An in-process layer range with its KV cache (a stage of a chain)."""

    def __init__(self, shard: ModelShard, max_batch_size: int, kv_chunk_tokens: int) -> None:
        self.shard = shard
        self.cache: KVCache = shard.new_kv_cache(max_batch_size, kv_chunk_tokens)
        self.layer_start, self.layer_end = shard.layer_start, shard.layer_end

    def forward(self, x: torch.Tensor, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        return self.shard.forward(x, batch, self.cache, all_logits)


class RemoteStage:
    """A layer range served by a ``StageServer`` at ``address``; ``forward`` is one round trip.

    Not thread-safe (the head's engine thread calls it). ``transport`` must be the head's own:
    replies come back to its address and are matched by op number. ``epoch``: the stage's (its
    requests carry it); ``reply_epoch``: the head transport's, which replies must carry.
    """

    def __init__(self, transport: Transport, address: str, layer_start: int, layer_end: int,
                 timeout_s: float = 30.0, epoch: str = "", reply_epoch: str = "") -> None:
        self.transport, self.address = transport, address
        self.layer_start, self.layer_end = layer_start, layer_end
        self.timeout_s = timeout_s
        self.epoch, self.reply_epoch = epoch, reply_epoch

    def forward(self, x: torch.Tensor, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        op, began = next(_OPS), time.monotonic()  # op: a late reply to an old chain never taken
        meta = {"op": op, "reply_to": self.transport.address, "reply_epoch": self.reply_epoch,
                "slots": list(batch.slots),
                "layers": [self.layer_start, self.layer_end],
                "starts": list(batch.start_positions), "num_tokens": batch.num_tokens,
                "all_logits": all_logits, **_tensor_meta(x)}
        try:
            self.transport.send(self.address, "hidden", meta, wire_bytes(x), timeout_s=self.timeout_s,
                                epoch=self.epoch)
        except TransportTimeout:
            raise StageError(f"stage [{self.layer_start}, {self.layer_end}) at {self.address} "
                             f"did not take the request within {self.timeout_s:.0f} s") from None
        out: dict[str, torch.Tensor] = {}

        def into(h: Header) -> memoryview | None:
            if h.kind != "hidden" or h.meta.get("op") != op or "shape" not in h.meta:
                return None
            out["t"] = _empty_like_meta(dict(h.meta))
            return _bytes_of(out["t"])

        while True:
            try:
                msg = self.transport.recv(self.timeout_s, into=into)
            except TransportTimeout:
                raise StageError(f"stage [{self.layer_start}, {self.layer_end}) at {self.address} "
                                 f"did not answer within {self.timeout_s:.0f} s") from None
            if msg.header.kind != "hidden" or msg.header.meta.get("op") != op:
                log.warning("dropping a stale frame (op %s) from %s", msg.header.meta.get("op"),
                            msg.header.sender)
                continue
            if "error" in msg.header.meta:
                raise StageError(f"stage [{self.layer_start}, {self.layer_end}) at {self.address} "
                                 f"failed: {msg.header.meta['error']}")
            if (took := time.monotonic() - began) > SLOW_STAGE_S:
                log.warning("stage [%d, %d) at %s answered %d x %d tokens in %.1f s",
                            self.layer_start, self.layer_end, self.address, len(batch.slots),
                            batch.num_tokens, took)
            return out["t"]


class StageChain:
    """A pipeline as the engine sees it (``ShardChain``'s interface): stages in layer order, each
    local (``ModelShard``) or remote (``RemoteStage``); the first takes token ids, the last
    returns logits."""

    def __init__(self, stages: Sequence[ModelShard | RemoteStage], config: Any,
                 max_batch_size: int, kv_chunk_tokens: int = 256) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = [_Local(s, max_batch_size, kv_chunk_tokens) if isinstance(s, ModelShard) else s
                       for s in stages]
        if self.stages[0].layer_start != 0 or self.stages[-1].layer_end != config.num_layers:
            raise ValueError("a pipeline must start at layer 0 and end at the last layer")
        for a, b in zip(self.stages, self.stages[1:]):
            if a.layer_end != b.layer_start:
                raise ValueError(f"stages [{a.layer_start},{a.layer_end}) and "
                                 f"[{b.layer_start},{b.layer_end}) are not contiguous")
        self._config = config
        self.max_batch_size = max_batch_size

    @property
    def config(self) -> Any:
        return self._config

    def forward(self, tokens: torch.Tensor, batch: ForwardBatch,
                all_logits: bool = False) -> torch.Tensor:
        """Token ids [b, T] -> fp32 logits [b, vocab] of each sequence's last new token ([b, T,
        vocab] with ``all_logits``: a prompt's log-probabilities)."""
        x = tokens
        for stage in self.stages:
            x = stage.forward(x, batch, all_logits)
        return x


class StageServer:
    """Serves layer ranges to the heads of pipelines: runs the one asked for and replies.

    ``shard`` is one ``ModelShard`` (the only range served) or a function ``(layer_start,
    layer_end) -> ModelShard`` (a replica still loading serves whatever range of the blocks it
    holds its pipelines ask for; it raises for a range it cannot serve). A request names its
    range; one asking for a range other than a fixed shard's is answered with an error, never
    run on the wrong layers. One KV cache per head (by its reply address) and range, at most
    ``max_heads`` of them; one more is answered with an error. ``serve`` runs until ``stop()``
    (call it from another thread); one request at a time, in arrival order. A request that fails
    (bad shape, a bug) is answered with an error, not dropped. ``forget(head)`` frees a head's
    caches when its pipeline dissolves.
    """

    def __init__(self, shard: ModelShard | Callable[[int, int], ModelShard], transport: Transport,
                 max_batch_size: int, kv_chunk_tokens: int = 256, max_heads: int = 8) -> None:
        self.shard, self.transport = shard, transport
        self.caches: dict[tuple[str, int, int], KVCache] = {}
        self.max_batch_size, self.kv_chunk_tokens, self.max_heads = (max_batch_size, kv_chunk_tokens,
                                                                     max_heads)
        self.requests_served = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def forget(self, head: str) -> None:
        """Drop the KV caches kept for ``head`` (its pipeline dissolved). Call between requests."""
        for key in [k for k in self.caches if k[0] == head]:
            del self.caches[key]

    def _shard_of(self, layers: Any) -> ModelShard:
        if isinstance(self.shard, ModelShard):
            want = (self.shard.layer_start, self.shard.layer_end)
            if layers is not None and tuple(int(x) for x in layers) != want:
                raise ValueError(f"this stage serves layers [{want[0]}, {want[1]}), "
                                 f"not {list(layers)}")
            return self.shard
        if layers is None:
            raise ValueError("the request names no layer range")
        start, end = (int(x) for x in layers)
        return self.shard(start, end)

    def _cache_of(self, head: str, shard: ModelShard) -> KVCache:
        key = (head, shard.layer_start, shard.layer_end)
        cache = self.caches.get(key)
        if cache is None:
            if len(self.caches) >= self.max_heads:
                raise ValueError(f"this stage already serves {self.max_heads} heads")
            cache = self.caches[key] = shard.new_kv_cache(self.max_batch_size, self.kv_chunk_tokens)
        return cache

    def serve(self, poll_s: float = 0.2) -> None:
        while not self._stop.is_set():
            self.serve_one(poll_s)

    def serve_one(self, timeout_s: float) -> bool:
        """Answer one request if one arrives within ``timeout_s``; False if none did."""
        inputs: dict[str, torch.Tensor] = {}

        def into(h: Header) -> memoryview | None:
            if h.kind != "hidden" or "shape" not in h.meta:
                return None
            inputs["x"] = _empty_like_meta(dict(h.meta))
            return _bytes_of(inputs["x"])

        try:
            msg = self.transport.recv(timeout_s, into=into)
        except TransportTimeout:
            return False
        meta = dict(msg.header.meta)
        reply_to, op = str(meta.get("reply_to", "")), meta.get("op")
        reply_epoch = str(meta.get("reply_epoch", ""))
        try:
            batch = ForwardBatch(tuple(int(s) for s in meta["slots"]),
                                 tuple(int(p) for p in meta["starts"]), int(meta["num_tokens"]))
            if max(batch.slots) >= self.max_batch_size or min(batch.slots) < 0:
                raise ValueError(f"slot out of range [0, {self.max_batch_size})")
            began = time.monotonic()
            shard = self._shard_of(meta.get("layers"))  # may build it (the member's, under a lock)
            out = shard.forward(inputs["x"], batch, self._cache_of(reply_to, shard),
                                all_logits=bool(meta.get("all_logits")))
            if (took := time.monotonic() - began) > SLOW_STAGE_S:
                log.warning("layers [%d, %d) for %s: %d x %d tokens took %.1f s here",
                            shard.layer_start, shard.layer_end, reply_to, len(batch.slots),
                            batch.num_tokens, took)
            self.transport.send(reply_to, "hidden", {"op": op, **_tensor_meta(out)}, wire_bytes(out),
                                timeout_s=30.0, epoch=reply_epoch)
        except Exception as exc:  # the head must hear about it, not wait for its timeout
            log.exception("stage request %s failed", op)
            try:
                self.transport.send(reply_to, "hidden", {"op": op, "error": f"{type(exc).__name__}: {exc}"},
                                    None, timeout_s=5.0, epoch=reply_epoch)
            except Exception:
                log.warning("could not report the failure to %s", reply_to)
        self.requests_served += 1
        return True
