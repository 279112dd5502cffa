"""The vLLM-CPU row of ``benchmarks/engine.py``: run inside ``.venv-vllm`` (``make vllm-env``), not
by itself a benchmark (``scripts/bench.py`` lists it as a helper; it has no ``--quick``).

Starts vLLM once (``vllm.LLM``, its default settings: compiled, not eager) on a Hugging Face folder
(``faascale.engine.hf_export``), then runs the repetitions of ``engine.py``'s decode measurements
the same way its transformers row does: greedy, EOS ignored (``ignore_eos=True``), prompts given
as token ids, prefill excluded as the extra time of an N-token run over a 1-token run; batch 1 and,
if asked, 16 concurrent requests in one ``generate`` call. Prints one JSON line: the vLLM version,
import and start seconds, the best of the repetitions for each figure, every sample, and the
greedy tokens of the batch-1 run (``engine.py`` compares them with ours).

Stdlib and vLLM only (``.venv-vllm`` has no faascale). The thread count is set by the caller with
``VLLM_CPU_OMP_THREADS_BIND`` (the cores vLLM's worker binds its OpenMP threads to; its ``auto``
keeps one core for the scheduler process) and the KV cache size with ``VLLM_CPU_KVCACHE_SPACE``
(GiB; without it vLLM reserves 90 % of the machine's memory for the worker).

    .venv-vllm/bin/python benchmarks/vllm_decode.py --spec SPEC.json
SPEC.json: {"model": DIR, "dtype": "float32", "runs": 3, "max_model_len": 2048,
            "b1": {"prompt": [ids], "new_tokens": 128},
            "c16": {"prompts": [[ids], ...], "new_tokens": 64}}   (c16 optional)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def decode_tok_s(llm: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[int]]:
    """Aggregate decode tokens/s over ``prompts`` = extra tokens / extra time of a ``new_tokens``
    run over a 1-token run (prefill excluded), and the first prompt's tokens."""
    from vllm import SamplingParams

    def run(n: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        batch = [{"prompt_token_ids": ids} for ids in prompts]
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        assert [len(x) for x in tokens] == [n] * len(prompts), [len(x) for x in tokens]
        return seconds, tokens

    t1, _ = run(1)
    tn, tokens = run(new_tokens)
    return len(prompts) * (new_tokens - 1) / (tn - t1), tokens[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="the JSON spec (see the module docstring)")
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)

    t = time.perf_counter()
    import vllm

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    llm = vllm.LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                   max_num_seqs=16, seed=0)
    start_s = time.perf_counter() - t

    b1, c16 = spec["b1"], spec.get("c16")
    decode_tok_s(llm, [b1["prompt"]], 4)  # warm-up, as engine.py warms up its two sides
    samples: dict[str, list[float]] = {"decode_b1_tok_s": []}
    if c16:
        samples["decode_c16_tok_s"] = []
    tokens: list[int] = []
    for _ in range(spec["runs"]):
        rate, tokens = decode_tok_s(llm, [b1["prompt"]], b1["new_tokens"])
        samples["decode_b1_tok_s"].append(rate)
        if c16:
            samples["decode_c16_tok_s"].append(decode_tok_s(llm, c16["prompts"],
                                                            c16["new_tokens"])[0])
    result = {"vllm_version": vllm.__version__, "import_s": import_s, "start_s": start_s,
              **{k: max(v) for k, v in samples.items()}, "samples": samples,
              "b1_tokens": tokens}
    print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
