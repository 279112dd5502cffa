"""Engine throughput on SmolLM2-135M: ours vs transformers' generate vs vLLM-CPU vs the memory-bandwidth roofline.

Measured side by side in one process, same weights, dtype, threads and prompts; N repetitions
(N = 2 with ``--quick``, 3 otherwise), each measuring every figure once, interleaved, so both sides
see the same machine; the best of N is kept for every figure:
- batch-1 decode tokens/s (the latency a single user sees): greedy, the same number of new tokens
  on both sides (EOS ignored: ``ignore_eos`` / ``min_new_tokens``), prefill excluded (ours: timed
  after the prefill step; transformers ``generate``: the extra time of an N-token run over a
  1-token run);
- decode tokens/s with 16 concurrent requests (ours: continuous batching; transformers: one static
  batch of the same 16 prompts, all 16 tokens long, so no padding);
- prefill tokens/s on a 512-token prompt, one forward that fills the KV cache and computes the
  logits of the last position only on both sides (ours always; transformers with
  ``logits_to_keep=1``);
- vLLM-CPU (``vllm-cpu`` in its own venv, ``.venv-vllm``: ``make vllm-env``), batch-1 and
  16-concurrent decode measured the same way as transformers (an N-token ``generate`` minus a
  1-token one, greedy, ``ignore_eos=True``, the same prompt token ids), on the same model exported
  to a Hugging Face folder in the same dtype (``faascale.engine.hf_export``), its OpenMP threads
  bound to as many cores as ours uses (``VLLM_CPU_OMP_THREADS_BIND``), its default settings
  otherwise (compiled, not eager; KV cache 1 GiB). It runs in a subprocess
  (``benchmarks/vllm_decode.py``) that starts vLLM once and runs the same number of repetitions,
  after ours (not interleaved: vLLM's engine and worker processes would share the cores with our
  measurements); its start time (``vllm_cpu_start_s``, the ``vllm.LLM`` constructor: compile
  warm-up included) and whether its greedy tokens equal ours (``vllm_cpu_greedy_match``: the
  leading tokens that agree, of N) are recorded. Without ``.venv-vllm`` the row is skipped and the
  JSON says why (``"vllm_cpu": "missing .venv-vllm: run make vllm-env"``); ``--quick`` skips it too
  (a vLLM start takes 1.5-3 minutes here) unless ``--vllm`` is given; ``--no-vllm`` skips it;
- the roofline for batch-1 decode: every decode step reads every weight once, so it cannot beat
  memory read bandwidth / weight bytes (read bandwidth measured here by summing a 1 GiB buffer, 32x
  the L3 cache, in one-second windows, best of N; ``benchmarks/tiers.py`` uses the same
  measurement for its HOST limit).

JSON keys, each a ratio of throughputs (tokens/s):
- ``decode_b1_vs_transformers``, ``concurrent16_vs_transformers``, ``prefill_vs_transformers``:
  ours / transformers (above 1 = ours faster);
- ``decode_b1_vs_vllm_cpu``, ``concurrent16_vs_vllm_cpu``: ours / vLLM-CPU (above 1 = ours faster;
  the target is >= 1.0);
- ``decode_b1_vs_roofline``: ours / roofline = roofline time / our time (1 = at the limit);
- ``concurrent16_vs_b1``: our 16-concurrent aggregate / our batch-1 (the batching gain).

``--quick``: 2 repetitions, 48 and 24 new tokens, vLLM skipped unless ``--vllm``.

    python benchmarks/engine.py [--quick] [--threads N] [--dtype float32] [--vllm | --no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import FIGURES, command_line, emit, git_rev, machine, write_section  # noqa: E402
from faascale.engine.config import EngineConfig  # noqa: E402
from faascale.engine.hf_export import exported_hf_dir  # noqa: E402
from faascale.engine.llm import LLM  # noqa: E402
from faascale.engine.model import ForwardBatch  # noqa: E402
from faascale.engine.sampling import SamplingParams  # noqa: E402
from faascale.engine.sources import faascale_home, resolve_packed  # noqa: E402

READ_BW_BYTES = 1 << 30  # 32x the L3 cache
ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_DRIVER = ROOT / "benchmarks" / "vllm_decode.py"
VLLM_MISSING = "missing .venv-vllm: run make vllm-env"
VLLM_KV_CACHE_GIB = 1  # 23k tokens of SmolLM2's fp32 KV cache; vLLM's default takes 90 % of RAM
VLLM_TIMEOUT_S = 1200  # a start took 91-170 s here, the repetitions a minute or two


def read_bw_buffer() -> torch.Tensor:
    """The buffer ``read_bw_window`` sums: 1 GiB of fp32, already faulted in and summed once."""
    buf = torch.ones(READ_BW_BYTES // 4, dtype=torch.float32)
    buf.sum()
    return buf


def read_bw_window(buf: torch.Tensor, window_s: float = 1.0) -> float:
    """Read bandwidth in GB/s: ``buf.sum()`` repeatedly for ``window_s`` (torch's threads).

    Windows of about a second, like the decode measurements, so both see the same machine (one
    20 ms sum on this VM ranges from 30 to 60 GB/s; a one-second window is steady).
    """
    n, t = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t) < window_s:
        buf.sum()
        n += 1
    return n * buf.numel() * buf.element_size() / elapsed / 1e9


def prompt_ids(llm: LLM, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, llm.manifest.config.vocab_size - 100, (n,), generator=gen).tolist()


def ours_decode(llm: LLM, batch: int, new_tokens: int) -> float:
    """Aggregate decode tokens/s with ``batch`` requests in flight (prefill excluded)."""
    engine = llm.new_engine()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", prompt_ids(llm, 16, i), params)
    while engine.num_waiting:  # all prefills (and their first tokens)
        engine.step()
    produced = 0
    t = time.perf_counter()
    while engine.has_unfinished():
        produced += sum(o.token_id is not None for o in engine.step())
    return produced / (time.perf_counter() - t)


def ours_prefill(llm: LLM, n: int) -> float:
    """One forward over an ``n``-token prompt: KV cache filled, logits of the last position."""
    shard = llm.shards[0]
    assert shard.is_first and shard.is_last
    cache = shard.new_kv_cache(1)
    ids = torch.tensor([prompt_ids(llm, n, 0)])
    t = time.perf_counter()
    logits = shard.forward(ids, ForwardBatch((0,), (0,), n), cache)
    seconds = time.perf_counter() - t
    assert logits.shape == (1, llm.manifest.config.vocab_size), logits.shape
    return n / seconds


def hf_model(packed: Path, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding exactly our packed weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import hf_model_from_packed

    return hf_model_from_packed(packed).to(dtype)


def hf_decode(model, llm: LLM, batch: int, new_tokens: int) -> float:
    """transformers generate: decode tokens/s = extra tokens / extra time over a 1-token run."""
    ids = torch.tensor([prompt_ids(llm, 16, i) for i in range(batch)])
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    t1, tn = run(1), run(new_tokens)
    return batch * (new_tokens - 1) / (tn - t1)


def hf_prefill(model, llm: LLM, n: int) -> float:
    """The same forward in transformers: KV cache filled, logits of the last position only
    (``logits_to_keep=1``; without it the LM head runs over all ``n`` positions)."""
    ids = torch.tensor([prompt_ids(llm, n, 0)])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t
    assert out.logits.shape[:2] == (1, 1), out.logits.shape
    return n / seconds


def vllm_skip_reason(want: bool | None, quick: bool, venv: Path | None = None) -> str | None:
    """Why the vLLM-CPU row is not run (None: run it). ``want``: ``--vllm`` (True), ``--no-vllm``
    (False) or neither (None: run unless ``--quick``). A venv without scripts/vllm-env.sh's stamp
    (an interrupted install) counts as missing."""
    if want is False:
        return "skipped: --no-vllm"
    if want is None and quick:
        return "skipped: --quick (add --vllm to run it)"
    venv = venv or VLLM_VENV
    if not (venv / "bin" / "python").is_file() or not any(venv.glob(".installed-*")):
        return VLLM_MISSING
    return None


def vllm_threads_bind(threads: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: the first ``threads`` cores this process may run on."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    return ",".join(str(c) for c in cores)


def parse_vllm_output(stdout: str) -> dict:
    """The driver's result: the last stdout line that is a JSON object with a batch-1 figure
    (vLLM may print after it while shutting down). Raises ValueError if there is none."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                out = json.loads(line)
            except ValueError:
                continue
            if isinstance(out, dict) and "decode_b1_tok_s" in out:
                return out
    raise ValueError("the vLLM driver printed no result line")


def leading_match(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def vllm_figures(res: dict, vllm: dict, ours_b1_tokens: list[int]) -> None:
    """Add the vLLM-CPU figures and ratios (ours / vLLM-CPU) to ``res`` (mutated)."""
    res["vllm_cpu"] = f"vllm {vllm['vllm_version']}"
    res["vllm_cpu_start_s"] = vllm["start_s"]
    res["vllm_cpu_decode_b1_tok_s"] = vllm["decode_b1_tok_s"]
    res["decode_b1_vs_vllm_cpu"] = res["decode_b1_tok_s"] / vllm["decode_b1_tok_s"]
    if "decode_c16_tok_s" in vllm:
        res["vllm_cpu_decode_c16_tok_s"] = vllm["decode_c16_tok_s"]
        res["concurrent16_vs_vllm_cpu"] = res["decode_c16_tok_s"] / vllm["decode_c16_tok_s"]
    res["vllm_cpu_greedy_match"] = (f"{leading_match(ours_b1_tokens, vllm['b1_tokens'])}/"
                                    f"{len(ours_b1_tokens)}")


def run_vllm(packed: Path, llm: LLM, dtype: str, threads: int, runs: int, n_b1: int,
             n_c16: int) -> dict:
    """Run ``benchmarks/vllm_decode.py`` in ``.venv-vllm`` on the Hugging Face export of
    ``packed`` (exported once, cached under ``$FAASCALE_HOME/hf``); its parsed result. vLLM's log
    goes to ``$FAASCALE_HOME/vllm-bench/vllm.log`` (replaced by the next run). Raises
    RuntimeError with the log's tail if it fails or runs past ``VLLM_TIMEOUT_S``."""
    hf_dir = exported_hf_dir(packed, faascale_home() / "hf", dtype=dtype)
    spec = {"model": str(hf_dir), "dtype": dtype, "runs": runs, "max_model_len": 2048,
            "b1": {"prompt": prompt_ids(llm, 16, 0), "new_tokens": n_b1},
            "c16": {"prompts": [prompt_ids(llm, 16, i) for i in range(16)], "new_tokens": n_c16}}
    work = faascale_home() / "vllm-bench"  # the last run's spec and vLLM log, kept to read
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    log = work / "vllm.log"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": vllm_threads_bind(threads),
           "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB),
           "VLLM_LOGGING_STREAM": "ext://sys.stderr", "PYTHONUNBUFFERED": "1"}
    print(f"vLLM-CPU: starting on {hf_dir.name} ({dtype}, cores {env['VLLM_CPU_OMP_THREADS_BIND']}; "
          f"log {log})", flush=True)
    with open(log, "w") as err:
        # Its own session: a timeout stops vLLM's engine and worker processes with it.
        proc = subprocess.Popen([str(VLLM_VENV / "bin" / "python"), str(VLLM_DRIVER), "--spec",
                                 str(work / "spec.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=VLLM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"vLLM-CPU ran past {VLLM_TIMEOUT_S} s (log {log})") from None
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit {proc.returncode}")
        return parse_vllm_output(stdout)
    except ValueError as exc:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"vLLM-CPU failed ({exc}); the end of {log}:\n{tail}") from None


def figure(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    has_vllm = "vllm_cpu_decode_b1_tok_s" in res
    has_vllm16 = "vllm_cpu_decode_c16_tok_s" in res
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        ("batch-1 decode (tok/s)",
         ["faascale", "transformers", *(["vLLM-CPU"] if has_vllm else []), "roofline"],
         [res["decode_b1_tok_s"], res["hf_decode_b1_tok_s"],
          *([res["vllm_cpu_decode_b1_tok_s"]] if has_vllm else []), res["roofline_b1_tok_s"]]),
        ("16 concurrent, decode (tok/s)",
         ["faascale", "transformers\n(static batch)", *(["vLLM-CPU"] if has_vllm16 else [])],
         [res["decode_c16_tok_s"], res["hf_decode_c16_tok_s"],
          *([res["vllm_cpu_decode_c16_tok_s"]] if has_vllm16 else [])]),
        ("prefill, 512 tokens (tok/s)", ["faascale", "transformers"],
         [res["prefill_tok_s"], res["hf_prefill_tok_s"]]),
    ]
    colors = {"faascale": "#2b6cb0", "vLLM-CPU": "#dd6b20", "roofline": "#e2e8f0"}
    for ax, (title, labels, values) in zip(axes, panels):
        bars = ax.bar(labels, values, color=[colors.get(label, "#a0aec0") for label in labels],
                      edgecolor="#2d3748")
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values) * 1.2)
    fig.suptitle("SmolLM2-135M on CPU: faascale engine vs transformers"
                 + (" vs vLLM-CPU" if has_vllm else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def vllm_text(res: dict, args: argparse.Namespace) -> str:
    """The report's sentences on the vLLM-CPU row, from the figures (or why it is absent)."""
    if "vllm_cpu_decode_b1_tok_s" not in res:
        return f"vLLM-CPU was not measured in this run ({res['vllm_cpu']})."
    ratio = res["decode_b1_vs_vllm_cpu"]
    text = (f"vLLM-CPU ({res['vllm_cpu']}, the same weights exported to a Hugging Face folder in "
            f"{args.dtype}, {args.threads} OpenMP threads bound to {args.threads} cores, default "
            f"settings: compiled, started in {res['vllm_cpu_start_s']:.0f} s) decodes batch-1 at "
            f"{res['vllm_cpu_decode_b1_tok_s']:.1f} tok/s: faascale is **{ratio:.2f}x** it, "
            f"{'ahead of' if ratio >= 1 else 'behind'} vLLM-CPU (target >= 1.0)")
    if "concurrent16_vs_vllm_cpu" in res:
        text += (f"; with 16 concurrent requests vLLM-CPU decodes {res['vllm_cpu_decode_c16_tok_s']:.1f} "
                 f"tok/s, faascale **{res['concurrent16_vs_vllm_cpu']:.2f}x** that")
    return text + (f". Greedy tokens of the batch-1 run, vLLM-CPU vs faascale: "
                   f"{res['vllm_cpu_greedy_match']} leading tokens equal.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats, no vLLM (< 2 min)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                    help="run the vLLM-CPU row (default: unless --quick; needs make vllm-env)")
    ap.add_argument("--no-report", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = 2 if args.quick else 3
    n_b1 = 48 if args.quick else 128
    n_c16 = 24 if args.quick else 64
    n_prefill = 512

    packed = resolve_packed("bundled://smollm2-135m-instruct", dtype=args.dtype, num_blocks=6)
    llm = LLM.load(packed, EngineConfig(dtype=args.dtype, max_batch_size=16))
    hf = hf_model(packed, llm.cfg.torch_dtype)
    weight_bytes = llm.shards[0].weight_bytes()

    # Warm up both (first-touch page faults, oneDNN kernel selection).
    ours_decode(llm, 1, 4), hf_decode(hf, llm, 1, 3), ours_prefill(llm, 64), hf_prefill(hf, llm, 64)

    # Interleaved: each repetition measures every figure once (bandwidth, then ours and
    # transformers side by side), so a disturbance of the shared machine hits both sides alike;
    # the best of ``runs`` is kept for every figure.
    measures: dict[str, Callable[[], float]] = {
        "mem_bw_gbps": lambda: read_bw_window(bw_buf),
        "decode_b1_tok_s": lambda: ours_decode(llm, 1, n_b1),
        "hf_decode_b1_tok_s": lambda: hf_decode(hf, llm, 1, n_b1),
        "decode_c16_tok_s": lambda: ours_decode(llm, 16, n_c16),
        "hf_decode_c16_tok_s": lambda: hf_decode(hf, llm, 16, n_c16),
        "prefill_tok_s": lambda: ours_prefill(llm, n_prefill),
        "hf_prefill_tok_s": lambda: hf_prefill(hf, llm, n_prefill),
    }
    bw_buf = read_bw_buffer()
    samples: dict[str, list[float]] = {k: [] for k in measures}
    for _ in range(runs):
        for key, fn in measures.items():
            samples[key].append(fn())
    del bw_buf
    res: dict = {k: max(v) for k, v in samples.items()}
    bw = res["mem_bw_gbps"]
    res["weight_bytes"] = weight_bytes
    res["roofline_b1_tok_s"] = bw * 1e9 / weight_bytes
    res["decode_b1_vs_transformers"] = res["decode_b1_tok_s"] / res["hf_decode_b1_tok_s"]
    res["decode_b1_vs_roofline"] = res["decode_b1_tok_s"] / res["roofline_b1_tok_s"]
    res["concurrent16_vs_b1"] = res["decode_c16_tok_s"] / res["decode_b1_tok_s"]
    res["concurrent16_vs_transformers"] = res["decode_c16_tok_s"] / res["hf_decode_c16_tok_s"]
    res["prefill_vs_transformers"] = res["prefill_tok_s"] / res["hf_prefill_tok_s"]

    # vLLM-CPU after ours, in its own processes (see the docstring).
    vllm_failed = None
    skip = vllm_skip_reason(args.vllm, args.quick)
    if skip:
        res["vllm_cpu"] = skip
        print(f"vLLM-CPU: {skip}", flush=True)
    else:
        greedy = SamplingParams(max_tokens=n_b1, temperature=0, ignore_eos=True)
        ours_tokens = list(llm.generate([prompt_ids(llm, 16, 0)], greedy)[0].token_ids)
        try:
            vllm = run_vllm(packed, llm, args.dtype, args.threads, runs, n_b1, n_c16)
        except RuntimeError as exc:
            vllm_failed = str(exc)
            res["vllm_cpu"] = "failed: " + vllm_failed.splitlines()[0]
            print(vllm_failed, file=sys.stderr, flush=True)
        else:
            vllm_figures(res, vllm, ours_tokens)

    # (label, ours, transformers, ours / transformers, vLLM-CPU, ours / vLLM-CPU)
    rows = [
        ("batch-1 decode", "decode_b1_tok_s", "hf_decode_b1_tok_s", "decode_b1_vs_transformers",
         "vllm_cpu_decode_b1_tok_s", "decode_b1_vs_vllm_cpu"),
        ("16 concurrent, decode", "decode_c16_tok_s", "hf_decode_c16_tok_s",
         "concurrent16_vs_transformers", "vllm_cpu_decode_c16_tok_s", "concurrent16_vs_vllm_cpu"),
        (f"prefill ({n_prefill} tokens)", "prefill_tok_s", "hf_prefill_tok_s",
         "prefill_vs_transformers", None, None),
    ]

    def cell(key: str | None, fmt: str) -> str:
        return format(res[key], fmt) if key in res else "—"

    print(f"{'':24}{'faascale':>12}{'transformers':>14}{'ratio':>8}{'vLLM-CPU':>10}{'ratio':>8}   "
          f"(tokens/s, {args.dtype}, {args.threads} threads)")
    for label, a, b, r, v, vr in rows:
        print(f"{label:24}{res[a]:12.1f}{res[b]:14.1f}{res[r]:7.2f}x{cell(v, '.1f'):>10}"
              f"{cell(vr, '.2f') + ('x' if vr in res else ''):>8}")
    above = [name for name, key in (("faascale", "decode_b1_tok_s"),
                                    ("transformers", "hf_decode_b1_tok_s"))
             if res[key] > res["roofline_b1_tok_s"]]
    roofline_note = "" if not above else (
        f" {' and '.join(above)} batch-1 decode ran above this roofline: the decode read its "
        f"weights faster than this run's read-bandwidth windows did, so in this run the roofline "
        f"is not a bound.")
    print(f"memory read bandwidth {bw:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB -> batch-1 "
          f"roofline {res['roofline_b1_tok_s']:.1f} tok/s; ours is {res['decode_b1_vs_roofline']:.0%} "
          f"of it; 16 concurrent = {res['concurrent16_vs_b1']:.1f}x batch-1.{roofline_note}")
    print(vllm_text(res, args).replace("**", ""))

    if not args.quick and not args.no_report:
        fig = FIGURES / "engine.png"
        has_fig = figure(res, fig)
        table = "\n".join(f"| {label} | {res[a]:.1f} | {res[b]:.1f} | {res[r]:.2f}x | "
                          f"{cell(v, '.1f')} | {cell(vr, '.2f') + ('x' if vr in res else '')} |"
                          for label, a, b, r, v, vr in rows)
        write_section("engine", f"""## Engine: SmolLM2-135M decode and prefill (`benchmarks/engine.py`)

Command: `{command_line()}` at `{git_rev()}`, {time.strftime('%Y-%m-%d')}.
Machine: {machine()}. Weights {args.dtype}, {weight_bytes / 1e6:.0f} MB, {args.threads} threads
on every side; {runs} repetitions, interleaved for faascale and transformers (each measures every
figure once; vLLM-CPU's run after them in its own processes), best of {runs} for every figure.
Decode: greedy, {n_b1} new tokens (batch 1) and {n_c16} (16 concurrent), EOS ignored, prefill
excluded; transformers = `generate` (16 concurrent: one static batch of 16 equal-length prompts),
vLLM-CPU = `vllm.LLM.generate` on the same prompt token ids, both timed as an N-token run minus a
1-token run. Prefill: one forward over {n_prefill} tokens filling the KV cache, logits of the last
position only (transformers: `logits_to_keep=1`).

| tokens/s | faascale | transformers | ours / transformers | vLLM-CPU | ours / vLLM-CPU |
|---|---:|---:|---:|---:|---:|
{table}

Batch-1 decode roofline: {bw:.1f} GB/s measured read bandwidth / {weight_bytes / 1e6:.0f} MB of
weights = {res['roofline_b1_tok_s']:.1f} tok/s; faascale's batch-1 decode is
**{res['decode_b1_vs_roofline']:.0%}** of it and **{res['decode_b1_vs_transformers']:.2f}x**
transformers'. With 16 concurrent requests faascale's aggregate decode is
**{res['concurrent16_vs_b1']:.1f}x** its batch-1 throughput.{roofline_note}

{vllm_text(res, args)}
{"" if not has_fig else chr(10) + "![engine benchmark](figures/engine.png)" + chr(10)}""")
    emit({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
    if vllm_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
