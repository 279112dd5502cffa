"""The GPU paths measured on one CUDA GPU, quickly (issue 20; ``scripts/gpu-check.sh`` runs it
after the GPU tests): SmolLM2-135M in bfloat16 on ``cuda:0``, same weights on every side.

- Batch-1 decode tokens/s, our engine vs transformers' ``generate`` on the same GPU and dtype
  (greedy, EOS ignored, the same number of new tokens; prefill excluded: ours timed after the
  prefill step, transformers' as the extra time of an N-token run over a 1-token run, as
  ``benchmarks/engine.py`` does on CPU). ``decode_b1_vs_transformers_gpu``: ours ÷ transformers
  (above 1 = ours faster).
- HOST -> GPU load rate: every block of the model, mapped from host memory (the page cache, as
  the HOST tier maps it), through ``DeviceLoader.to_device`` (pinned staging ring, copy stream)
  until the device is synchronised, vs the bus's plain pinned-memory copy bandwidth (one pinned
  buffer of the model's size copied to the GPU, timed with CUDA events). ``load_vs_pinned_copy``:
  loader GB/s ÷ pinned-copy GB/s (1 = the loader moves blocks at the pinned rate; lower is slower;
  the loader also pays the pageable -> pinned copy on the CPU). ``pageable_copy_gbps``, a plain
  ``Tensor.to("cuda")`` of the same mapped blocks, is shown beside them, and ``loader_setup_s``,
  the loader's one-time staging ring (pinned buffers, copy stream; outside the timed loads).
- A 2-stage pipeline on one GPU in two processes: the first half of the layers in this process,
  the second half in a child process (a ``StageServer`` over ZeroMQ on loopback, its shard on the
  same GPU); hidden states cross as host bytes (``stage.wire_bytes``: one device-to-host copy per
  hop). Batch-1 decode tokens/s, and ``pipeline_same_tokens``: its greedy tokens equal the
  one-process engine's. ``pipeline_vs_single``: pipeline tokens/s ÷ one-process tokens/s (below 1
  = the pipeline is slower: two host round trips per token).

``--quick``: 32 new tokens a run and 2 repetitions (else 128 and 3), the best kept for every
figure; about a minute on an H100 once the model is packed. Without a CUDA GPU it says so, emits
``{"gpu": false}`` and exits 0. ``--no-report``: do not write the ``gpu_check`` section of
docs/benchmarks.md (a run on a GPU writes it otherwise).

    python benchmarks/gpu_check.py [--quick] [--no-report]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, git_rev, machine, write_section  # noqa: E402
from faascale.engine.checkpoint import load_block, read_manifest, read_tokenizer_json  # noqa: E402
from faascale.engine.config import EngineConfig  # noqa: E402
from faascale.engine.engine import Engine  # noqa: E402
from faascale.engine.llm import LLM  # noqa: E402
from faascale.engine.model import ModelShard, merge_block_tensors  # noqa: E402
from faascale.engine.sampling import SamplingParams  # noqa: E402
from faascale.engine.sources import resolve_packed  # noqa: E402
from faascale.engine.tokenizer import Tokenizer  # noqa: E402
from faascale.memory_tier.device import DeviceLoader  # noqa: E402
from faascale.pipecast.stage import RemoteStage, StageChain, StageServer  # noqa: E402
from faascale.pipecast.zmq_transport import ZmqTransport  # noqa: E402

DTYPE = "bfloat16"
MODEL = "bundled://smollm2-135m-instruct"
PROMPT_TOKENS = 16
STAGE_TIMEOUT_S = 60.0
_REQUESTS = itertools.count()


def prompt(vocab_size: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab_size - 100, (PROMPT_TOKENS,), generator=gen).tolist()


def engine_decode(engine: Engine, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """One greedy request: decode tokens/s after its prefill step, and its tokens. Every step
    copies its tokens to the host (``sample_step``), so the wall clock sees the GPU's work."""
    engine.add_request(f"gpu-check-{next(_REQUESTS)}", ids, SamplingParams(max_tokens=new_tokens, temperature=0,
                                                        ignore_eos=True))
    tokens = [o.token_id for o in engine.step() if o.token_id is not None]  # the prefill
    t = time.perf_counter()
    while engine.has_unfinished():
        tokens += [o.token_id for o in engine.step() if o.token_id is not None]
    torch.cuda.synchronize()
    return (len(tokens) - 1) / (time.perf_counter() - t), tokens


def hf_model(packed: Path) -> Any:
    """transformers' CausalLM with exactly our packed weights, on the GPU in bf16."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import hf_model_from_packed

    return hf_model_from_packed(packed).to(device="cuda", dtype=torch.bfloat16)


def hf_decode(model: Any, ids: list[int], new_tokens: int) -> float:
    """transformers ``generate`` on the GPU: decode tokens/s = extra tokens / extra time of an
    N-token run over a 1-token run."""
    x = torch.tensor([ids], device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        assert out.shape[1] == x.shape[1] + n, out.shape
        return time.perf_counter() - t

    t1, tn = run(1), run(new_tokens)
    return (new_tokens - 1) / (tn - t1)


def new_loader() -> tuple[DeviceLoader, float]:
    """A ``DeviceLoader`` for the GPU with its staging ring made (pinned buffers, copy stream:
    made at its first copy), and the seconds that took (once per replica, not per block)."""
    loader = DeviceLoader("cuda")
    t = time.perf_counter()
    loader.to_device({"warm": torch.zeros(1)})
    loader.synchronize(whole_device=True)
    return loader, time.perf_counter() - t


def loader_gbps(packed: Path, loader: DeviceLoader) -> tuple[float, int]:
    """Every block, mapped from host memory, through ``loader`` until the device is
    synchronised: GB/s, and the bytes it copied (every tensor byte of the model)."""
    manifest = read_manifest(packed)
    blocks = [load_block(packed, manifest, i, verify=False) for i in range(manifest.num_blocks)]
    before = loader.num_bytes_copied
    torch.cuda.synchronize()
    t = time.perf_counter()
    on_gpu = [loader.to_device(b) for b in blocks]
    loader.synchronize(whole_device=True)
    seconds = time.perf_counter() - t
    copied = loader.num_bytes_copied - before
    assert copied == sum(x.numel() * x.element_size() for b in blocks for x in b.values()), copied
    del on_gpu
    return copied / seconds / 1e9, copied


def pinned_copy_gbps(num_bytes: int) -> float:
    """One pinned host buffer of ``num_bytes`` copied to the GPU, timed with CUDA events."""
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return num_bytes / (start.elapsed_time(end) / 1e3) / 1e9


def pageable_copy_gbps(packed: Path) -> float:
    """The same mapped blocks copied with a plain ``Tensor.to("cuda")`` (pageable memory)."""
    manifest = read_manifest(packed)
    blocks = [load_block(packed, manifest, i, verify=False) for i in range(manifest.num_blocks)]
    num_bytes = sum(x.numel() * x.element_size() for b in blocks for x in b.values())
    torch.cuda.synchronize()
    t = time.perf_counter()
    on_gpu = [{n: x.to("cuda") for n, x in b.items()} for b in blocks]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del on_gpu
    return num_bytes / seconds / 1e9


def stage_shard(packed: Path, layer_start: int, layer_end: int) -> ModelShard:
    """Layers ``[layer_start, layer_end)`` on the GPU from only the blocks they need, moved by a
    ``DeviceLoader`` (as a PipeCast member builds its shards)."""
    manifest = read_manifest(packed)
    loader = DeviceLoader("cuda")
    blocks = [loader.to_device(load_block(packed, manifest, b.index, verify=False))
              for b in manifest.blocks_for_layers(layer_start, layer_end)]
    shard = ModelShard(manifest.config, merge_block_tensors(blocks), layer_start, layer_end,
                       torch.bfloat16, "cuda")
    loader.synchronize(whole_device=True)
    return shard


def stage_process(packed: str, layer_start: int, secret: bytes, conn: Any) -> None:
    """The child process: a ``StageServer`` for layers ``[layer_start, L)`` on the GPU; sends its
    address, serves until the parent sends anything, then sends how many requests it served."""
    manifest = read_manifest(packed)
    shard = stage_shard(Path(packed), layer_start, manifest.config.num_layers)
    with ZmqTransport(secret=secret, name="gpu-check-stage") as transport:
        server = StageServer(shard, transport, max_batch_size=1)
        thread = threading.Thread(target=server.serve, kwargs={"poll_s": 0.05}, daemon=True)
        thread.start()
        conn.send(transport.address)
        conn.recv()
        server.stop()
        thread.join(10)
        conn.send(server.requests_served)


def pipeline_engine(packed: Path, cfg: EngineConfig, address: str, split: int,
                    head: ZmqTransport) -> Engine:
    """Our engine over a ``StageChain``: layers ``[0, split)`` here on the GPU, the rest in the
    stage process at ``address``."""
    manifest = read_manifest(packed)
    tokenizer = Tokenizer(read_tokenizer_json(packed, manifest), manifest.tokenizer)
    chain = StageChain([stage_shard(packed, 0, split),
                        RemoteStage(head, address, split, manifest.config.num_layers,
                                    timeout_s=STAGE_TIMEOUT_S)],
                       manifest.config, cfg.max_batch_size, cfg.kv_block_tokens)
    return Engine(chain, tokenizer, cfg)


def measure(packed: Path, new_tokens: int, runs: int) -> dict[str, Any]:
    manifest = read_manifest(packed)
    cfg = EngineConfig(dtype=DTYPE, device="cuda", max_batch_size=1, max_seq_len=512)
    ids = prompt(manifest.config.vocab_size)
    llm = LLM.load(packed, cfg, mover=DeviceLoader("cuda"))
    hf = hf_model(packed)
    split = manifest.blocks[manifest.num_blocks // 2].layer_start
    secret = secrets.token_bytes(32)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=stage_process, args=(str(packed), split, secret, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(300):
            raise RuntimeError("the stage process did not start within 300 s")
        address = parent.recv()
        with ZmqTransport(secret=secret, name="gpu-check-head") as head:
            pipe = pipeline_engine(packed, cfg, address, split, head)
            # warm-up: kernels chosen, caches allocated, on every side
            engine_decode(llm.new_engine(), ids, 4)
            hf_decode(hf, ids, 3)
            engine_decode(pipe, ids, 4)
            samples: dict[str, list[float]] = {k: [] for k in (
                "decode_b1_tok_s", "hf_decode_b1_tok_s", "pipeline_decode_b1_tok_s", "load_gbps",
                "pinned_copy_gbps", "pageable_copy_gbps")}
            same = True
            loader, setup_s = new_loader()
            for _ in range(runs):  # interleaved: a disturbance hits every side alike
                tok_s, single = engine_decode(llm.new_engine(), ids, new_tokens)
                samples["decode_b1_tok_s"].append(tok_s)
                samples["hf_decode_b1_tok_s"].append(hf_decode(hf, ids, new_tokens))
                tok_s, piped = engine_decode(pipe, ids, new_tokens)
                samples["pipeline_decode_b1_tok_s"].append(tok_s)
                same = same and piped == single
                gbps, num_bytes = loader_gbps(packed, loader)
                samples["load_gbps"].append(gbps)
                samples["pinned_copy_gbps"].append(pinned_copy_gbps(num_bytes))
                samples["pageable_copy_gbps"].append(pageable_copy_gbps(packed))
        parent.send("stop")
        served = parent.recv() if parent.poll(30) else -1
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
    res: dict[str, Any] = {k: max(v) for k, v in samples.items()}
    res.update(
        decode_b1_vs_transformers_gpu=res["decode_b1_tok_s"] / res["hf_decode_b1_tok_s"],
        load_vs_pinned_copy=res["load_gbps"] / res["pinned_copy_gbps"],
        pipeline_vs_single=res["pipeline_decode_b1_tok_s"] / res["decode_b1_tok_s"],
        pipeline_same_tokens=same, pipeline_processes=2, pipeline_split_layer=split,
        stage_requests_served=served, weight_bytes=manifest.total_bytes,
        loader_setup_s=setup_s)
    return res


def report(res: dict[str, Any], new_tokens: int, runs: int) -> str:
    return f"""## The GPU paths (scripts/gpu-check.sh)

{res['device']}; {machine()}. SmolLM2-135M-Instruct in bfloat16 on `cuda:0`, batch 1, greedy,
{new_tokens} new tokens, EOS ignored, best of {runs} interleaved runs.

| | faascale | reference | ratio |
|---|---|---|---|
| batch-1 decode (tok/s) vs transformers `generate` | {res['decode_b1_tok_s']:.1f} | {res['hf_decode_b1_tok_s']:.1f} | {res['decode_b1_vs_transformers_gpu']:.2f} |
| HOST -> GPU load (GB/s) vs pinned copy | {res['load_gbps']:.2f} | {res['pinned_copy_gbps']:.2f} | {res['load_vs_pinned_copy']:.2f} |
| 2-stage pipeline, 2 processes (tok/s) vs one process | {res['pipeline_decode_b1_tok_s']:.1f} | {res['decode_b1_tok_s']:.1f} | {res['pipeline_vs_single']:.2f} |

The loader's staging ring (pinned buffers, copy stream), made once per replica, took
{res['loader_setup_s'] * 1e3:.0f} ms; a plain `Tensor.to("cuda")` of the same mapped blocks:
{res['pageable_copy_gbps']:.2f} GB/s. The
pipeline's tokens {'equal' if res['pipeline_same_tokens'] else 'DIFFER from'} the one-process
engine's (split at layer {res['pipeline_split_layer']}, {res['stage_requests_served']} stage
requests served). Code `{git_rev()}`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repetitions")
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    t0 = time.time()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False): nothing measured")
        emit({"gpu": False})
        return
    new_tokens, runs = (32, 2) if args.quick else (128, 3)
    packed = resolve_packed(MODEL, dtype=DTYPE, num_blocks=6)
    res = measure(packed, new_tokens, runs)
    res.update(gpu=True, device=torch.cuda.get_device_name(0), dtype=DTYPE,
               seconds=round(time.time() - t0, 1))
    print(report(res, new_tokens, runs))
    if not args.no_report:
        write_section("gpu_check", report(res, new_tokens, runs))
    emit(res)


if __name__ == "__main__":
    main()
