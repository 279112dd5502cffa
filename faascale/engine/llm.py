"""``LLM``: a packed model loaded whole (or as a chain of layer ranges) with its tokenizer.

The convenient front door for the CLI, benchmarks and replicas:
``LLM.load(dir).generate("The capital of France is", SamplingParams(temperature=0))``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json
from faascale.engine.config import EngineConfig
from faascale.engine.engine import Engine, ShardChain, StepOutput
from faascale.engine.manifest import ModelManifest
from faascale.engine.model import ModelShard, merge_block_tensors
from faascale.engine.sampling import SamplingParams
from faascale.engine.tokenizer import Tokenizer


class BlockMover(Protocol):
    """Moves one block's tensors to the engine's device (``memory_tier.device.DeviceLoader``:
    pinned staging on a copy stream). The engine cannot import the memory tier: its caller passes
    one."""

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


class LLM:
    """A loaded model. ``engine`` is created on demand; one thread drives it (see EngineLoop)."""

    def __init__(self, manifest: ModelManifest, tokenizer: Tokenizer, shards: list[ModelShard],
                 cfg: EngineConfig) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.shards = shards
        self.cfg = cfg
        self._engine: Engine | None = None

    @classmethod
    def load(cls, packed_dir: str | os.PathLike, cfg: EngineConfig | None = None,
             layer_splits: Sequence[int] | None = None, verify: bool = True,
             mover: BlockMover | None = None) -> "LLM":
        """Map every block of ``packed_dir`` (zero-copy, checksums verified) and build the shards.

        ``layer_splits`` (e.g. ``[8, 15, 23]``) cuts the model into a chain of layer ranges run one
        after another; by default it is one shard. Raises CheckpointError/CorruptBlockError, and
        DeviceUnavailableError before reading anything when ``cfg.device`` is not here.
        """
        cfg = cfg or EngineConfig()
        cfg.resolve_device()
        manifest = read_manifest(packed_dir)
        return cls.from_blocks(manifest, read_tokenizer_json(packed_dir, manifest),
                               [load_block(packed_dir, manifest, i, verify)
                                for i in range(manifest.num_blocks)], cfg, layer_splits, mover)

    @classmethod
    def from_blocks(cls, manifest: ModelManifest, tokenizer_json: str | Tokenizer,
                    blocks: Sequence[Mapping[str, torch.Tensor]], cfg: EngineConfig | None = None,
                    layer_splits: Sequence[int] | None = None,
                    mover: BlockMover | None = None) -> "LLM":
        """Build from block tensors already mapped (e.g. from a node's HOST tier). The tokenizer
        comes as ``tokenizer.json`` text or already parsed (parsing SmolLM2's takes ~0.12 s, so
        a caller may parse it while the blocks are still being fetched).

        The weights go to ``cfg.device``: on a CPU they are the block tensors themselves (zero
        copy, as before); ``mover``, when given, moves each block first (a ``DeviceLoader`` for
        the device: on a GPU, pinned staging on a copy stream); tensors still elsewhere are
        copied by their shard with ``Tensor.to``. Raises
        DeviceUnavailableError when ``cfg.device`` is not on this machine."""
        cfg = cfg or EngineConfig()
        device = cfg.resolve_device()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        tokenizer = (tokenizer_json if isinstance(tokenizer_json, Tokenizer)
                     else Tokenizer(tokenizer_json, manifest.tokenizer))
        if mover is not None:
            blocks = [mover.to_device(block) for block in blocks]
        weights = merge_block_tensors(blocks)
        bounds = [0, *(layer_splits or ()), manifest.config.num_layers]
        shards = [ModelShard(manifest.config, weights, a, b, cfg.torch_dtype, device)
                  for a, b in zip(bounds, bounds[1:])]
        return cls(manifest, tokenizer, shards, cfg)

    def new_engine(self, clock: Callable[[], float] = time.monotonic) -> Engine:
        """A fresh engine (own KV caches) over the shared weights."""
        chain = ShardChain(self.shards, self.cfg.max_batch_size, self.cfg.kv_block_tokens)
        return Engine(chain, self.tokenizer, self.cfg, clock)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.new_engine()
        return self._engine

    def prompt_ids(self, prompt: str | Sequence[int] | Sequence[dict[str, Any]]) -> list[int]:
        """Text -> ids; a list of chat messages -> the chat template, then ids; ids pass through."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        items = list(prompt)
        if items and isinstance(items[0], dict):
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(items),
                                         add_special_tokens=False)
        return [int(t) for t in items]

    def stream(self, prompt: str | Sequence[int] | Sequence[dict[str, Any]],
               params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Run one request on this thread, yielding outputs as tokens are produced."""
        rid = uuid.uuid4().hex
        engine = self.engine
        engine.add_request(rid, self.prompt_ids(prompt), params or SamplingParams())
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid:
                    yield out
                    if out.finished:
                        return

    def generate(self, prompts: Sequence[str | Sequence[int] | Sequence[dict[str, Any]]] | str,
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts together with continuous batching; one Completion per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        engine = self.engine
        rids = [uuid.uuid4().hex for _ in prompts]
        for rid, prompt, p in zip(rids, prompts, plist):
            engine.add_request(rid, self.prompt_ids(prompt), p)
        texts: dict[str, list[str]] = {rid: [] for rid in rids}
        tokens: dict[str, list[int]] = {rid: [] for rid in rids}
        done: dict[str, StepOutput] = {}
        while len(done) < len(rids):
            for out in engine.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.text)
                if out.token_id is not None:
                    tokens[out.request_id].append(out.token_id)
                if out.finished:
                    done[out.request_id] = out
        return [Completion("".join(texts[r]), tuple(tokens[r]), done[r].finish_reason,
                           done[r].num_prompt_tokens, done[r].num_output_tokens) for r in rids]
