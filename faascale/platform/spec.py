"""``function.yaml`` -> a frozen, validated ``FunctionSpec`` (pydantic at the edge).

Errors name the field and the reason, e.g. ``model.blocks: Input should be greater than 0``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from faascale.engine.config import DEVICE_NAMES, ConfigError, EngineConfig, check_device_name

SPEC_FILE = "function.yaml"
DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class SpecError(ValueError):
    """``function.yaml`` is missing, not YAML, or invalid; the message lists each bad field."""

    def __init__(self, message: str, fields: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    source: str = Field(description="bundled://NAME, random://NAME, a .gguf file, a Hugging Face "
                                    "safetensors dir or a packed dir (relative to function.yaml)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    blocks: int = Field(default=4, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, description="weights seed, for random:// sources only")

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class VllmSpec(_Strict):
    """``engine.vllm``: the vLLM settings that matter for its starts (``engine.kind: vllm``)."""

    enforce_eager: bool = Field(
        default=False, description="skip torch.compile (and CUDA graphs): a much shorter start, "
        "slower decode")
    kv_cache_gib: int = Field(
        default=1, ge=1, le=1 << 14, description="KV-cache memory on a CPU node, whole GiB "
        "(VLLM_CPU_KVCACHE_SPACE; vLLM's own default takes most of the RAM)")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="the share of the GPU vLLM may use (GPU nodes)")
    compile_cache_dir: str | None = Field(
        default=None, description="vLLM's cache root (VLLM_CACHE_ROOT: its torch.compile "
        "artifacts); default: vLLM's own (~/.cache/vllm)")
    start_timeout_s: float = Field(default=900.0, gt=0,
                                   description="longest vLLM start before the replica fails")


class EngineSpec(_Strict):
    kind: Literal["faascale", "vllm"] = Field(
        default="faascale", description="faascale: our engine (PipeCast's temporary pipelines "
        "serve while it loads); vllm: a vLLM OpenAI server per replica (its own venv: make "
        "vllm-env), fed from the node's tiers")
    vllm: VllmSpec | None = Field(default=None, description="vLLM settings (engine.kind: vllm)")
    max_seq_len: int = Field(default=2048, ge=2, le=1 << 20)
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    max_prefill_tokens_per_step: int = Field(default=2048, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    device: str | None = Field(
        default=None, description=f"where a replica computes: {', '.join(DEVICE_NAMES)}; "
        "default: cuda when resources.num_gpus > 0, else cpu (FunctionSpec.device). auto: cuda "
        "when the replica sees a GPU (on Ray, only one that reserves GPUs does)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return check_device_name(v)
        except ConfigError as exc:  # "device: 'mps' is not supported; ..." without the prefix
            raise ValueError(str(exc).removeprefix("device: ")) from None

    @model_validator(mode="after")
    def _vllm_settings(self) -> "EngineSpec":
        if self.kind == "vllm" and self.vllm is None:
            return self.model_copy(update={"vllm": VllmSpec()})
        return self

    def engine_config(self, dtype: str, device: str = "cpu") -> EngineConfig:
        return EngineConfig(dtype=dtype, device=device, max_batch_size=self.max_batch_size,
                            max_seq_len=self.max_seq_len,
                            max_prefill_tokens_per_step=self.max_prefill_tokens_per_step,
                            num_threads=self.num_threads)


class ScalingSpec(_Strict):
    min_replicas: int = Field(default=0, ge=0, le=1024)
    max_replicas: int = Field(default=4, ge=1, le=1024)
    target_concurrency: int | None = Field(
        default=None, ge=1, description="requests one replica should carry; default: max_batch_size")
    keep_alive_s: float = Field(default=60.0, ge=0, description="idle time before scaling to zero")
    downscale_delay_s: float = Field(default=5.0, ge=0)
    pipecast: bool = Field(default=True, description="load new replicas through PipeCast")
    load_from: Literal["tiers", "store"] = Field(
        default="tiers", description="tiers: through the node's block store (HOST, DISK, then "
        "the object store; warm for the next start); store: every replica downloads the model "
        "from the object store into its own memory and no node keeps it (as Ray Serve LLM "
        "loads from S3); needs pipecast: false")
    policy: Literal["faascale", "serve", "serverlessllm"] = Field(
        default="faascale", description="faascale: cold-start-aware, keep-alive, scale-ahead "
        "policy; serve: Ray Serve's default queue-length policy with its default delays; "
        "serverlessllm: ServerlessLLM's ceil(in flight / target), one replica per second, "
        "down after keep_alive_s without a new request")
    cold_start_timeout_s: float = Field(default=180.0, gt=0,
                                        description="how long a request waits for a replica")
    stall_timeout_s: float = Field(
        default=60.0, gt=0, description="longest wait for a started stream's next token; then "
        "it ends with an error (504; an SSE error event when streaming) and frees its slot")
    max_queued_requests: int = Field(default=256, ge=0,
                                     description="requests waiting beyond capacity before 429")

    @model_validator(mode="after")
    def _min_le_max(self) -> "ScalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed "
                             f"max_replicas ({self.max_replicas})")
        if self.load_from == "store" and self.pipecast:
            raise ValueError("load_from: store loads bypass the node tiers PipeCast moves blocks "
                             "between; set pipecast: false with it")
        return self


class SLOSpec(_Strict):
    ttft_ms: float = Field(default=2000.0, gt=0, description="time-to-first-token target")
    tbt_ms: float = Field(default=200.0, gt=0, description="time-between-tokens target")


class ResourcesSpec(_Strict):
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class FunctionSpec(_Strict):
    name: str = Field(pattern=DNS_LABEL, description="DNS label: lowercase letters, digits, '-'")
    description: str = ""
    model: ModelSpec
    engine: EngineSpec = EngineSpec()
    scaling: ScalingSpec = ScalingSpec()
    slo: SLOSpec = SLOSpec()
    resources: ResourcesSpec = ResourcesSpec()
    handler: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                description="module:function called on each request before the "
                                            "engine (module resolved in the function directory)")
    base_dir: str = Field(default=".", exclude=True,
                          description="directory of function.yaml; relative sources resolve here")

    @property
    def device(self) -> str:
        """``engine.device``, or by default ``cuda`` when the function reserves GPUs
        (``resources.num_gpus > 0``: Ray shows a replica only the GPUs it reserved, a fraction
        sharing one) and ``cpu`` otherwise. Resolved on the replica's machine
        (``engine.config.resolve_device``)."""
        if self.engine.device is not None:
            return self.engine.device
        return "cuda" if self.resources.num_gpus > 0 else "cpu"

    def engine_config(self) -> EngineConfig:
        return self.engine.engine_config(self.model.dtype, self.device)

    def device_problem(self) -> str | None:
        """Why ``engine.device`` cannot run where the function's replicas are placed, or None:
        a CUDA device needs ``resources.num_gpus > 0`` (Ray hides every GPU from a replica that
        reserves none), and ``cuda:N`` one of the GPUs reserved (a replica sees them as
        ``cuda:0`` .. ``cuda:K-1``, K = ceil(num_gpus)). Reads no hardware."""
        device, gpus = self.device, self.resources.num_gpus
        if not device.startswith("cuda"):
            return None
        if gpus <= 0:
            return (f"{device!r} needs a GPU but resources.num_gpus is 0 (Ray shows a replica "
                    f"only the GPUs it reserves); set resources.num_gpus (e.g. 1), or device: "
                    f"cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= math.ceil(gpus):
            return (f"{device!r} but resources.num_gpus is {gpus:g}: a replica sees its GPUs as "
                    f"cuda:0 .. cuda:{math.ceil(gpus) - 1}")
        return None

    @property
    def target_concurrency(self) -> int:
        return self.scaling.target_concurrency or self.engine.max_batch_size

    def to_document(self) -> dict:
        """The spec as a JSON-able mapping (what function.yaml would say), without base_dir."""
        return self.model_dump(mode="json", exclude={"base_dir"})

    def resolved_source(self) -> str:
        """The model source with a relative path made absolute against the spec's directory."""
        src = self.model.source
        if "://" in src or os.path.isabs(src):
            return src
        return str((Path(self.base_dir) / src).resolve())


def parse_function_spec(data: object, base_dir: str | os.PathLike = ".") -> FunctionSpec:
    """Validate a parsed YAML/JSON document; raises SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError("function spec: must be a mapping with at least 'name' and 'model'")
    try:
        spec = FunctionSpec.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        fields = [(".".join(str(p) for p in e["loc"]) or "(root)", e["msg"]) for e in exc.errors()]
        _raise(fields)
    # across sections, after each section is valid (pydantic would name the root, not the field)
    problem = spec.device_problem()
    if problem is not None:
        _raise([("engine.device", problem)])
    if spec.engine.vllm is not None and spec.engine.kind != "vllm":
        _raise([("engine.vllm", f"settings for engine.kind: vllm, but the kind is "
                 f"{spec.engine.kind}")])
    if spec.engine.kind == "vllm" and spec.scaling.load_from == "store":
        _raise([("scaling.load_from", "engine.kind: vllm loads through the node's tiers (its "
                 "Hugging Face export is kept there); use load_from: tiers")])
    return spec


def _raise(fields: list[tuple[str, str]]) -> NoReturn:
    detail = "; ".join(f"{f}: {m}" for f, m in fields)
    raise SpecError(f"invalid function spec: {detail}", fields) from None


def load_function_spec(path: str | os.PathLike) -> FunctionSpec:
    """Read ``function.yaml`` (``path`` may be the file or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / SPEC_FILE
    if not p.is_file():
        raise SpecError(f"{p}: no such function spec (expected a directory with {SPEC_FILE})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}") from None
    return parse_function_spec(data, p.parent.resolve())
