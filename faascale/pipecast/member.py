"""One replica's part in PipeCast: blocks as they land, the layer ranges it serves, how it runs.

A ``Member`` lives inside a replica process (a Serve replica on the platform, a plain process on
the emulated cluster). It binds four transports — ``blocks`` (its ``NodeAgent``: the multicast),
``stage`` (its ``StageServer``: layer ranges for other replicas' pipelines), ``head`` (its own
engine's ``RemoteStage`` calls) and ``ctl`` (the coordinator's control frames) — and joins the
coordinator (``service.py``) with the blocks it already holds. From then on the coordinator
drives it with control frames:

- ``plan``: run this node's part of a multicast plan (the payload is the plan's JSON); every
  block that lands is reported (``block``) the moment it is in place;
- ``route``: how to serve now — ``full`` (every block here: one local chain), ``pipeline`` (a
  ``StageChain`` of its own range and the other stages' ``RemoteStage``s), ``loading`` (requests
  wait). A switch is ``EngineLoop.switch_runner``: requests in flight resume from their token ids
  on the new runner, their streams unbroken;
- ``rejoin``: the coordinator restarted and lost us: join again with the blocks held now;
- ``error``: the coordinator cannot bring the model here (nobody holds it): the owner loads it
  another way (``wait_servable`` raises ``MemberError``).

A stage that fails or stalls makes the engine hold its requests (``RunnerUnavailable``) and the
member reports ``stage_failed``; the coordinator re-forms pipelines or repairs the plan and sends
new routes. A heartbeat every ``HEARTBEAT_S`` lets the coordinator notice a member that died.

Control frames carry small JSON in their meta: ``{op, node, ...}``; a plan rides as the payload.

For the emulated cluster and benchmarks, ``python -m faascale.pipecast.member`` runs one member
(see ``main``), optionally with one request of its own whose tokens (with the route they were
made on) go to a JSON file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faascale.engine.checkpoint import block_tensors
from faascale.engine.config import EngineConfig
from faascale.engine.engine import Engine, NoRunner, ShardChain
from faascale.engine.loop import EngineLoop
from faascale.engine.manifest import ModelManifest
from faascale.engine.model import ForwardBatch, ModelShard, merge_block_tensors
from faascale.engine.tokenizer import Tokenizer
from faascale.memory_tier.block_store import BlockStore, RemoteBlocks
from faascale.memory_tier.device import DeviceLoader
from faascale.memory_tier.tier_files import map_block
from faascale.pipecast.agent import write_json
from faascale.pipecast.participant import Participant
from faascale.pipecast.stage import (RemoteStage, StageChain, StageError, StageServer,
                                     max_frame_bytes)
from faascale.pipecast.transport import TransportError
from faascale.pipecast.zmq_transport import ZmqTransport

log = logging.getLogger(__name__)
STAGE_MAX_HEADS = 64


class MemberError(RuntimeError):
    """The member cannot serve: the coordinator refused (no source) or the member was closed."""


@dataclass(frozen=True)
class RouteStage:
    """A stage of the route a member was given: who, which blocks, where its stage server is
    and the session its requests must carry (the stage's transport takes no other)."""

    replica: str
    first_block: int
    last_block: int
    address: str
    session: str


@dataclass(frozen=True)
class MemberRoute:
    mode: str  # "full", "pipeline", "loading"
    stages: tuple[RouteStage, ...] = ()

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> MemberRoute:
        return cls(str(meta["mode"]), tuple(RouteStage(str(r), int(a), int(b), str(addr), str(e))
                                            for r, a, b, addr, e in meta.get("stages", ())))


class _Reporting:
    """A runner that tells the member once it has made a token (PipeCast's record: "served
    through a pipeline")."""

    def __init__(self, runner: Any, on_first: Callable[[], None]) -> None:
        self.runner, self._on_first, self._told = runner, on_first, False
        self.config, self.max_batch_size = runner.config, runner.max_batch_size

    def forward(self, tokens: Any, batch: ForwardBatch, all_logits: bool = False) -> Any:
        out = self.runner.forward(tokens, batch, all_logits)
        if not self._told:
            self._told = True
            self._on_first()
        return out


class Member(Participant):
    """See the module docstring. ``holdings_dir``: where this replica's block files are (or land;
    a source's may be a packed model directory). ``local_dir``: the node's own tier holding the
    model, if any (the plan then loads from it). ``store_loader(i)``: a verified local file of
    block i fetched from the object store (the node's block store), for plans that load from it
    (a scale from zero shared with other members, a repair of blocks nobody holds). Threads: control, plans, heartbeat (the
    ``Participant``'s), stage server, the agent's, the engine loop's. ``close()`` stops them all.

    Its shards compute on ``cfg.device``: each block it serves is moved there once by ``mover``
    (the replica's ``DeviceLoader``; by default one of its own for ``cfg.device``: zero copy on
    a CPU, pinned staging on a GPU) and shared by every layer range that needs it; the device
    is synchronised before a new shard is used. DeviceUnavailableError (before binding
    anything) when ``cfg.device`` is not on this machine."""

    def __init__(self, name: str, manifest: ModelManifest, tokenizer: Tokenizer,
                 holdings_dir: str | os.PathLike, cfg: EngineConfig, *, secret: bytes,
                 coordinator: str, bind_host: str = "127.0.0.1", advertise_host: str | None = None,
                 local_dir: str | os.PathLike | None = None, stage_timeout_s: float = 30.0,
                 function: str = "", on_full: Callable[[Member], None] | None = None,
                 store_loader: Callable[[int], Path] | None = None, pieces: bool = True,
                 mover: DeviceLoader | None = None) -> None:
        self.mover = mover if mover is not None else DeviceLoader(cfg.device)
        self.device = cfg.resolve_device()
        self._device_blocks: dict[int, dict[str, Any]] = {}  # block index -> tensors there
        super().__init__(name, manifest, holdings_dir, secret=secret, coordinator=coordinator,
                         bind_host=bind_host, advertise_host=advertise_host, local_dir=local_dir,
                         function=function or manifest.name, store_loader=store_loader, pieces=pieces)
        self.cfg = cfg
        self.stage_timeout_s = stage_timeout_s
        self._on_full = on_full  # called once (control thread) when it switches to its full copy
        # Both take frames of this member's session only (``participant.py``): a pipeline
        # request or reply replayed after a restart is refused.
        # Nothing larger than a pipeline's largest frame is buffered (``max_frame_bytes``).
        limit = max_frame_bytes(manifest.config, cfg.max_seq_len, cfg.max_batch_size)
        self.stage_tx = ZmqTransport(name=f"{name}#stage", recv_hwm=8, **self._tx,
                                     epochs_only=True, max_payload_bytes=limit)
        self.head_tx = ZmqTransport(name=f"{name}#head", recv_hwm=8, **self._tx, epochs_only=True,
                                    max_payload_bytes=limit)
        for tx in (self.stage_tx, self.head_tx):
            tx.open_epoch(self.session)
        self._shards: dict[tuple[int, int], ModelShard] = {}
        self._route_key: tuple[Any, ...] | None = None
        self.route = MemberRoute("loading")
        self.servable = threading.Event()
        self.error: str | None = None
        self.served: list[dict[str, Any]] = []  # the routes this member made tokens on
        full = len(self.held) == manifest.num_blocks
        runner = self._full_chain() if full else NoRunner(manifest.config, cfg.max_batch_size)
        if full:
            self.route = MemberRoute("full")
            self.servable.set()
        self.loop = EngineLoop(Engine(runner, tokenizer, cfg), name=f"engine-{name}",
                               on_unavailable=self._runner_lost)
        # Every new replica may ride a pipeline as a head, over several layer ranges in a
        # scale-out: room for that many KV caches (each grows in chunks only as it is used).
        self.stage_server = StageServer(self._shard, self.stage_tx, cfg.max_batch_size,
                                        cfg.kv_block_tokens, max_heads=STAGE_MAX_HEADS)
        self._threads.append(threading.Thread(target=self.stage_server.serve, daemon=True,
                                              name=f"member-{name}-stage"))
        self._start()

    def _join_meta(self) -> dict[str, Any]:
        return {"stage": self.stage_tx.address}

    # ------------------------------------------------------------------ the owner's side

    def wait_servable(self, timeout_s: float) -> bool:
        """True once the member can serve (a pipeline or the whole model); raises MemberError if
        the coordinator said it cannot bring the model here."""
        ok = self.servable.wait(timeout_s)
        if self.error is not None:
            raise MemberError(self.error)
        return ok

    @property
    def full(self) -> bool:
        return self.route.mode == "full"

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {"node": self.name, "mode": self.route.mode, "blocks_present": len(self.held),
                    "blocks_needed": self.manifest.num_blocks,
                    "stages": [(s.replica, s.first_block, s.last_block) for s in self.route.stages]}

    def close(self, leave: bool = True) -> None:
        """Leave the coordinator (it stops routing through us at once) and stop. ``leave=False``
        stops without a word, as a crash would (the coordinator notices the silence)."""
        if leave and not self._stop.is_set():
            self._tell("leave")
        self._stop.set()
        self.stage_server.stop()
        self.loop.stop(timeout_s=2.0)
        stuck = self._stop_threads(leave=False)
        self._close_transports(stuck, self.stage_tx, self.head_tx)

    # ------------------------------------------------------------------ blocks and shards

    def _layers(self, first_block: int, last_block: int) -> tuple[int, int]:
        return (self.manifest.blocks[first_block].layer_start,
                self.manifest.blocks[last_block].layer_end)

    def _shard(self, layer_start: int, layer_end: int) -> ModelShard:
        """Layers ``[layer_start, layer_end)`` over this replica's block files (zero-copy maps).
        Raises ValueError when a block they need is not here (yet). Stage and control threads."""
        with self._lock:
            shard = self._shards.get((layer_start, layer_end))
            if shard is not None:
                return shard
            infos = self.manifest.blocks_for_layers(layer_start, layer_end)
            missing = [b.index for b in infos if b.index not in self.held]
            if not infos or missing:
                raise ValueError(f"{self.name} cannot serve layers [{layer_start}, {layer_end}): "
                                 f"blocks {missing} are not here")
            weights = merge_block_tensors([self._on_device(b) for b in infos])
            shard = ModelShard(self.manifest.config, weights, layer_start, layer_end,
                               self.cfg.torch_dtype, self.device)
            self.mover.synchronize(whole_device=True)  # its weights are there before it serves
            self._shards[(layer_start, layer_end)] = shard
            return shard

    def _on_device(self, block: Any) -> dict[str, Any]:
        """Block ``block``'s tensors on this member's device, moved once (under ``_lock``): a
        block shared by several layer ranges (a pipeline's, then the full chain) is one copy."""
        tensors = self._device_blocks.get(block.index)
        if tensors is None:
            tensors = self.mover.to_device(block_tensors(block, map_block(
                self.agent.path(block.index))))
            self._device_blocks[block.index] = tensors
        return tensors

    def _full_chain(self) -> ShardChain:
        return ShardChain([self._shard(0, self.manifest.config.num_layers)],
                          self.cfg.max_batch_size, self.cfg.kv_block_tokens)

    # ------------------------------------------------------------------ routes

    def _apply_route(self, route: MemberRoute) -> None:  # control thread
        key = (route.mode, route.stages)
        if key == self._route_key:
            return
        if route.mode == "full":
            runner: Any = self._full_chain()
        elif route.mode == "pipeline":
            parts: list[Any] = []
            for s in route.stages:
                start, end = self._layers(s.first_block, s.last_block)
                parts.append(self._shard(start, end) if s.replica == self.name else
                             RemoteStage(self.head_tx, s.address, start, end, self.stage_timeout_s,
                                         epoch=s.session, reply_epoch=self.session))
            stages = [(s.replica, s.first_block, s.last_block) for s in route.stages]
            runner = _Reporting(StageChain(parts, self.manifest.config, self.cfg.max_batch_size,
                                           self.cfg.kv_block_tokens),
                                lambda: self._tell("served", stages=stages))
        else:
            runner = NoRunner(self.manifest.config, self.cfg.max_batch_size)
        self.loop.switch_runner(runner)
        with self._lock:
            self._route_key, self.route = key, route
        log.info("%s: route %s %s", self.name, route.mode,
                 [(s.replica, s.first_block, s.last_block) for s in route.stages])
        if route.mode != "loading":
            self.servable.set()
        if route.mode == "full" and self._on_full is not None:
            on_full, self._on_full = self._on_full, None
            on_full(self)

    def _runner_lost(self, exc: Exception) -> None:  # engine thread
        if not isinstance(exc, StageError):  # NoRunner: loading, nothing failed
            return
        with self._lock:
            self._route_key = None  # the same route, sent again, is a retry: apply it
        self._tell("stage_failed", why=str(exc)[:500])

    # ------------------------------------------------------------------ control

    def _on_op(self, op: str, meta: dict[str, Any], payload: Any) -> None:
        if op == "route":
            self._apply_route(MemberRoute.from_meta(meta))
        elif op == "error":
            self.error = str(meta.get("why", "the coordinator refused"))
            self.servable.set()


# ---------------------------------------------------------------------------------------------
# Process entry point (emulated cluster, benchmarks)


def store_loader(location: str, manifest: Any, tier_dir: Path) -> Callable[[int], Path]:
    """A member's store loader outside the platform: blocks of the model at ``location`` fetched
    (verified) through a block store of its own under ``tier_dir``; returns their files."""
    from faascale.memory_tier.node import split_location
    from faascale.memory_tier.store import open_store

    uri, prefix = split_location(location)
    store = open_store(uri)
    blocks = BlockStore(tier_dir / "host", tier_dir / "disk", 1 << 40, 1 << 40,
                        remote=RemoteBlocks(lambda _manifest: (store, prefix)))
    return lambda index: blocks.fetch(manifest, index, pin=False).path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faascale.pipecast.member",
                                description="Run one PipeCast member (a replica's data plane).")
    p.add_argument("--name", required=True)
    p.add_argument("--model-dir", type=Path, required=True, help="packed model: manifest, tokenizer")
    p.add_argument("--holdings-dir", type=Path, required=True)
    p.add_argument("--local-dir", type=Path)
    p.add_argument("--store", help="the packed model's location in an object store (a directory "
                                   "or s3://bucket/prefix): this member may load its part of a "
                                   "scale from zero from it (through a block store of its own)")
    p.add_argument("--bind", default="127.0.0.1", help="host to bind the transports on")
    p.add_argument("--coordinator", required=True, help="the coordinator's tcp:// address")
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--prompt", help="submit this prompt once servable; tokens to --out")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, help="JSON: tokens of --prompt with their route, progress")
    p.add_argument("--until-file", type=Path, help="run until this file exists")
    p.add_argument("--timeout-s", type=float, default=300.0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a member until ``--until-file`` appears (or the timeout). With ``--prompt``: submit it
    at once (it waits for a route), stream it, write ``{"tokens": [{"t_s", "token_id", "text",
    "mode"}], "submitted_s", "progress"}`` to ``--out``. Exit 0, 1 if the request failed, 2 on
    bad input."""
    from faascale.engine.checkpoint import read_manifest, read_tokenizer_json
    from faascale.engine.sampling import SamplingParams

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(message)s")
    try:
        manifest = read_manifest(args.model_dir)
        tokenizer = Tokenizer(read_tokenizer_json(args.model_dir, manifest), manifest.tokenizer)
        loader = None if args.store is None else store_loader(
            args.store, manifest, args.holdings_dir.with_name(args.holdings_dir.name + "-tiers"))
        member = Member(args.name, manifest, tokenizer, args.holdings_dir,
                        EngineConfig(max_batch_size=4, max_seq_len=1024),
                        secret=args.secret_file.read_bytes(), coordinator=args.coordinator,
                        bind_host=args.bind, local_dir=args.local_dir, store_loader=loader)
    except (OSError, ValueError, TransportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready {member.ctl_tx.address}", flush=True)
    rc = 0
    deadline = time.monotonic() + args.timeout_s
    try:
        if args.prompt:
            t0 = time.time()
            stream = member.loop.submit(tokenizer.encode(args.prompt),
                                        SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                       ignore_eos=True))
            tokens = []
            try:
                while not member.wait_servable(0.5):  # raises MemberError: nobody to copy from
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not servable within {args.timeout_s} s")
                for out in stream:
                    if out.token_id is not None:
                        tokens.append({"t_s": time.time() - t0, "token_id": out.token_id,
                                       "text": out.text, "mode": member.route.mode})
            except Exception as e:  # the record says how far it got
                log.error("request failed: %s", e)
                rc = 1
            result = {"tokens": tokens, "submitted_epoch_s": t0, "progress": member.progress()}
            write_json(args.out, result)
        while time.monotonic() < deadline and not (args.until_file and args.until_file.exists()):
            time.sleep(0.1)
    finally:
        member.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
