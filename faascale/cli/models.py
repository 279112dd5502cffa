"""Models without the platform: ``pack`` (a model into blocks), ``export-hf`` (a packed model back
to a Hugging Face folder, for transformers and vLLM) and ``generate`` (run a function's model in
this process)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

import typer

from faascale.cli.common import friendly_errors


def _progress(label: str) -> Callable[[int, int], None]:
    from rich.console import Console

    console = Console(stderr=True)

    def report(done: int, total: int) -> None:
        console.print(f"[dim]{label}: block {done}/{total}[/dim]")

    return report


@friendly_errors
def pack(src: str = typer.Argument(..., help="bundled://NAME, random://NAME, a .gguf file or a "
                                             "Hugging Face safetensors directory"),
         out: str = typer.Argument(..., help="output directory (must not exist or be empty)"),
         blocks: int = typer.Option(4, "--blocks", "-b", help="number of layer blocks"),
         dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
         seed: int = typer.Option(0, help="weights seed for random:// sources")) -> None:
    """Pack a model into blocks: manifest.json + tokenizer.json + one file per block."""
    from faascale.engine.checkpoint import read_manifest
    from faascale.engine.sources import pack_source

    out_path = pack_source(src, out, dtype=dtype, num_blocks=blocks, seed=seed,
                           progress=_progress("packing"))
    m = read_manifest(out_path)
    typer.echo(f"packed {m.name} ({m.config.num_layers} layers, {m.config.num_params() / 1e6:.1f}M "
               f"params, {m.dtype}) into {m.num_blocks} blocks, {m.total_bytes / 2**20:.1f} MiB: "
               f"{out_path} (model id {m.model_id})")


@friendly_errors
def export_hf(src: str = typer.Argument(..., help="a packed model directory, or a source as for "
                                                 "pack (bundled://NAME, random://NAME, .gguf), "
                                                 "packed first into the cache"),
              out: str = typer.Argument(..., help="output directory (must not exist or be empty)"),
              dtype: Optional[str] = typer.Option(None, help="weights dtype: float32, bfloat16 "
                                                            "or float16 (default: the packed one)"),
              ) -> None:
    """Export a packed model as a Hugging Face folder (config.json, model.safetensors, tokenizer)
    that transformers and vLLM load."""
    from faascale.engine.checkpoint import is_packed, read_manifest
    from faascale.engine.hf_export import export_hf as export
    from faascale.engine.sources import resolve_packed

    packed = src if is_packed(src) else resolve_packed(src, dtype=dtype or "float32",
                                                         progress=_progress("packing"))
    out_path = export(packed, out, dtype=dtype)
    m = read_manifest(packed)
    size = sum(p.stat().st_size for p in out_path.iterdir())
    typer.echo(f"exported {m.name} ({m.model_id}, {dtype or m.dtype}) to {out_path}: "
               f"{size / 2**20:.1f} MiB")


@friendly_errors
def generate(function_dir: str = typer.Argument(..., help="a function directory (function.yaml)"),
             prompt: str = typer.Argument(..., help="the prompt"),
             max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
             temperature: float = typer.Option(0.7, "--temperature", "-t"),
             top_p: float = typer.Option(1.0, "--top-p"),
             top_k: int = typer.Option(0, "--top-k"),
             seed: Optional[int] = typer.Option(None, "--seed"),
             stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
             chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user message in "
                                                             "the model's chat template"),
             stream: bool = typer.Option(False, "--stream", help="print tokens as they are produced"),
             ) -> None:
    """Run a function's model locally (no platform) and print the completion."""
    import time

    from faascale.engine.llm import LLM
    from faascale.engine.sampling import SamplingParams
    from faascale.engine.sources import resolve_packed
    from faascale.memory_tier.packed import fetch_packed
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(function_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=tuple(stop or ()))
    packed = resolve_packed(spec.resolved_source(), dtype=spec.model.dtype,
                            num_blocks=spec.model.blocks, seed=spec.model.seed,
                            progress=_progress(f"packing {spec.name}"), fetch_remote=fetch_packed)
    llm = LLM.load(packed, spec.engine_config())
    request = [{"role": "user", "content": prompt}] if chat else prompt
    start = time.perf_counter()
    if stream:
        n = 0
        for out in llm.stream(request, params):
            n = out.num_output_tokens
            sys.stdout.write(out.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        completion = llm.generate([request], params)[0]
        n = completion.num_output_tokens
        typer.echo(completion.text)
    elapsed = time.perf_counter() - start
    typer.echo(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tok/s]", err=True)
