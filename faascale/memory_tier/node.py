"""The node's block store as a Ray actor: every replica on a node fetches its blocks through it.

One named actor per node (``faascale-blocks-<node id>``), pinned to that node, holding the node's
:class:`BlockStore`. A replica asks for its model, gets back the HOST (or DISK) file of every
block and maps them itself (zero-copy, shared by all replicas of the node); when it retires it
releases them, and they stay warm in HOST for the function's keep-alive.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from faascale.actor_logs import timestamp_logs
from faascale.engine.manifest import ModelManifest
from faascale.memory_tier.block_store import BlockStore, RemoteBlocks

log = logging.getLogger(__name__)
NAMESPACE = "faascale"
SHM_DIR_ENV = "FAASCALE_SHM_DIR"  # where the HOST tier lives (default /dev/shm)
SWEEP_INTERVAL_S = 30.0
FETCH_PARALLEL_BLOCKS = 4


def split_location(location: str) -> tuple[str, str]:
    """A packed model's location -> (object store URI, key prefix).

    ``s3://bucket/models/m`` -> ``("s3://bucket", "models/m")``; a local directory
    ``/x/objects/models/m`` -> ``("/x/objects/models", "m")``.
    """
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        return f"s3://{bucket}", prefix.strip("/")
    path = Path(location.removeprefix("file://"))
    return str(path.parent), path.name


@dataclass(frozen=True)
class TierConfig:
    """Where a node keeps blocks, and how much. Paths are per node (every node has its own)."""

    host_dir: str
    disk_dir: str
    host_capacity_bytes: int = 4 << 30
    disk_capacity_bytes: int = 32 << 30
    # "module:function" the node's actor calls with itself once it is up (the platform's PipeCast
    # tier sources: ``platform/tier_sources.py``); imported by name, so this layer depends on
    # nothing above it. "" for none.
    companion: str = ""

    @classmethod
    def for_state_dir(cls, state_root: Path, environ: Mapping[str, str] = os.environ
                      ) -> "TierConfig":
        """HOST under /dev/shm (one directory per platform; ``FAASCALE_SHM_DIR`` names another
        shared-memory directory), DISK under the state dir."""
        tag = hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:10]
        shm = Path(environ.get(SHM_DIR_ENV) or "/dev/shm")
        shm = shm if shm.is_dir() else state_root / "shm"
        return cls(str(shm / f"faascale-{tag}"), str(state_root / "cache" / "blocks"))

    def for_node(self, node: str) -> "TierConfig":
        """This config's directories for one node: ``<dir>/<node>``. Several Ray nodes can share
        one file system (an emulated cluster, ``ray.cluster_utils.Cluster``): each node's store
        must own its files, or one node's eviction would delete another's blocks."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node).strip(".") or "node"
        return replace(self, host_dir=str(Path(self.host_dir) / safe),
                       disk_dir=str(Path(self.disk_dir) / safe))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NodeBlocks:
    """The actor body. Methods take and return plain data (JSON manifests, paths)."""

    def __init__(self, config: dict[str, Any]) -> None:
        timestamp_logs()
        self.config = TierConfig(**config)
        self._location: dict[str, str] = {}  # model id -> where its packed blocks live
        self._stores: dict[str, Any] = {}  # store URI -> open object store (connections reused)
        remote = RemoteBlocks(self._locate)
        self.store = BlockStore(Path(self.config.host_dir), Path(self.config.disk_dir),
                                self.config.host_capacity_bytes, self.config.disk_capacity_bytes,
                                remote)
        self._manifests: dict[str, str] = {}  # model id -> manifest JSON of every model seen
        threading.Thread(target=self._sweep_forever, name="tier-sweep", daemon=True).start()
        if self.config.companion:
            try:
                module, _, fn = self.config.companion.partition(":")
                getattr(importlib.import_module(module), fn)(self)
            except Exception:  # noqa: BLE001 - the block store serves without its companion
                log.exception("tier companion %s did not start", self.config.companion)

    def _sweep_forever(self) -> None:
        while True:  # free HOST blocks whose keep-alive ran out; the actor's life bounds this
            time.sleep(SWEEP_INTERVAL_S)
            try:
                self.store.sweep()
            except Exception:
                log.exception("tier sweep failed")

    def _locate(self, manifest: ModelManifest) -> tuple[Any, str]:
        from faascale.memory_tier.store import open_store

        store_uri, prefix = split_location(self._location[manifest.model_id])
        if store_uri not in self._stores:
            self._stores[store_uri] = open_store(store_uri)
        return self._stores[store_uri], prefix

    def fetch_model(self, manifest_json: str, location: str, keep_alive_s: float
                    ) -> list[tuple[str, str]]:
        """Make every block of the model at ``location`` local; ``[(path, source tier name)]`` in
        block order. Pins them. Raises the store's errors and CorruptBlockError."""
        manifest = ModelManifest.from_json(manifest_json)
        self._location[manifest.model_id] = location
        self._manifests[manifest.model_id] = manifest_json
        results = self.store.fetch_model(manifest, keep_alive_s, FETCH_PARALLEL_BLOCKS)
        return [(str(r.path), r.source.name) for r in results]

    def fetch_block(self, manifest_json: str, location: str, index: int,
                    keep_alive_s: float) -> str:
        """Make block ``index`` of the model at ``location`` local (HOST, from DISK or the
        store, verified) without pinning it: a PipeCast member loading its part of a scale from
        zero links it into its own directory, and pins it with the rest when it is full
        (``adopt_model``). Returns the file. Raises the store's errors and CorruptBlockError."""
        manifest = ModelManifest.from_json(manifest_json)
        self._location[manifest.model_id] = location
        self._manifests[manifest.model_id] = manifest_json
        return str(self.store.fetch(manifest, index, keep_alive_s, pin=False).path)

    def local_blocks(self, manifest_json: str) -> int:
        """How many of the model's blocks this node's HOST or DISK tier holds."""
        manifest = ModelManifest.from_json(manifest_json)
        return sum(self.store.lookup(manifest.block_id(i)) is not None
                   for i in range(manifest.num_blocks))

    def model_tiers(self, manifest_json: str) -> dict[str, int]:
        """How many of the model's blocks this node holds in HOST, and in HOST or DISK (the
        blocks a start from DISK would not need to fetch)."""
        manifest = ModelManifest.from_json(manifest_json)
        tiers = [self.store.lookup(manifest.block_id(i)) for i in range(manifest.num_blocks)]
        return {"HOST": sum(t is not None and t.name == "HOST" for t in tiers),
                "DISK": sum(t is not None for t in tiers), "blocks": manifest.num_blocks}

    def adopt_model(self, manifest_json: str, paths: list[str], keep_alive_s: float) -> int:
        """A replica got the model by PipeCast into ``paths`` (block order, on this node's HOST
        file system): keep them in HOST too (pinned like a fetch). Returns blocks adopted."""
        manifest = ModelManifest.from_json(manifest_json)
        self._manifests[manifest.model_id] = manifest_json
        return sum(self.store.adopt(manifest, i, Path(p), keep_alive_s)
                   for i, p in enumerate(paths))

    def release_model(self, manifest_json: str, keep_alive_s: float) -> None:
        """A replica retired: unpin its blocks, keep them warm for ``keep_alive_s``."""
        self.store.demote(ModelManifest.from_json(manifest_json), keep_alive_s)

    def stage_model(self, manifest_json: str, location: str, keep_host: bool = False
                    ) -> dict[str, int]:
        """Put every block of the model at ``location`` in this node's DISK tier ahead of any
        replica (what ``sllm-store save`` does on a ServerlessLLM node); HOST copies are dropped
        unless ``keep_host`` or a replica has them pinned. Returns ``model_tiers`` after.
        Blocking; raises the store's errors and CorruptBlockError."""
        from faascale.memory_tier.policy import Tier

        manifest = ModelManifest.from_json(manifest_json)
        self._location[manifest.model_id] = location
        self._manifests[manifest.model_id] = manifest_json
        self.store.fetch_model(manifest, 0.0, FETCH_PARALLEL_BLOCKS)
        self.store.wait_idle()  # the DISK copies are made behind the fetch
        self.store.demote(manifest, 0.0)
        if not keep_host:  # a block PipeCast brought is only in HOST: it stays there
            for i in range(manifest.num_blocks):
                if self.store.holds(manifest.block_id(i), Tier.DISK):
                    self.store.evict(manifest.block_id(i), Tier.HOST)
        return self.model_tiers(manifest_json)

    def held_models(self) -> list[dict[str, Any]]:
        """Every model seen here with a complete copy in one tier: ``{model_id, manifest_json,
        tier, directory, pinned}`` (``BlockStore.model_copy``)."""
        out = []
        for model_id, manifest_json in list(self._manifests.items()):
            copy = self.store.model_copy(ModelManifest.from_json(manifest_json))
            if copy is not None:
                out.append({"model_id": model_id, "manifest_json": manifest_json,
                            "tier": copy.tier, "directory": str(copy.directory),
                            "pinned": copy.pinned})
        return out

    def sweep(self) -> int:
        return len(self.store.sweep())

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        return {"tiers": {k: asdict(v) for k, v in s.tiers.items()}, "hits": s.hits,
                "corrupt_dropped": s.corrupt_dropped, "evictions": s.evictions,
                "host_full": s.host_full, "disk_full": s.disk_full}


def actor_name(node_id: str) -> str:
    """The name of a node's NodeBlocks actor."""
    return f"faascale-blocks-{node_id[:16]}"


def node_blocks_actor(config: TierConfig, node_id: str | None = None,
                      node_ip: str | None = None) -> Any:
    """A node's NodeBlocks actor (this node's by default), created on first use, keeping its
    tiers in ``config``'s directories for the node's IP address (``TierConfig.for_node``: stable
    across restarts, so the DISK tier is found again; distinct per node, also when nodes share a
    file system). Does not wait for the actor to start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node_id is None:
        node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    mine = config.for_node(node_ip or node_id)
    return ray.remote(NodeBlocks).options(
        name=actor_name(node_id), namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached", num_cpus=0, max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(mine.to_dict())


def start_node_blocks(config: TierConfig) -> list[str]:
    """A NodeBlocks actor on every live node that has none yet (the platform calls this at start
    and as nodes join), so a replica starting on a node never waits for its block store's process
    to start (seconds on a busy node: a Python process, then imports). Returns the node ids it
    started actors on."""
    import ray

    existing = {(e["name"] if isinstance(e, dict) else e)
                for e in ray.util.list_named_actors(all_namespaces=True)}
    started = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        if actor_name(node_id) in existing:
            continue
        node_blocks_actor(config, node_id, node.get("NodeManagerAddress"))
        started.append(node_id)
    return started


def stage_everywhere(config: TierConfig, manifest_json: str, location: str,
                     timeout_s: float = 600.0) -> dict[str, dict[str, int]]:
    """``NodeBlocks.stage_model`` on every live node at once (each node's actor is created if
    missing); ``{node id: model_tiers}``. Raises what a node raised."""
    import ray

    refs = {}
    for node in ray.nodes():
        if node.get("Alive"):
            actor = node_blocks_actor(config, node["NodeID"], node.get("NodeManagerAddress"))
            refs[node["NodeID"]] = actor.stage_model.remote(manifest_json, location)
    return {node: ray.get(ref, timeout=timeout_s) for node, ref in refs.items()}


def all_node_stats(timeout_s: float = 2.0) -> dict[str, dict[str, Any]]:
    """Stats of every node's block store, by actor name (nodes that do not answer are skipped)."""
    import ray

    handles = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        namespace = entry.get("namespace") if isinstance(entry, dict) else NAMESPACE
        if name.startswith("faascale-blocks-") and namespace == NAMESPACE:
            handles[name.removeprefix("faascale-blocks-")] = ray.get_actor(name, namespace=NAMESPACE)
    refs = {node: h.stats.remote() for node, h in handles.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    return {node: ray.get(ref) for node, ref in refs.items() if ref in ready_set}
