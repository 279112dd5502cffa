#!/usr/bin/env bash
# scripts/gpu-check.sh [--report]: every GPU test and a quick GPU benchmark on this machine's CUDA
# GPU, in under 8 minutes on one GPU; the last line of stdout is one JSON object.
#
#   1. the GPU tests: `pytest -m gpu` over the test files that guard on torch.cuda.is_available()
#      (tests/conftest.py marks `gpu` every test skipped with "hardware absent: needs ... GPU");
#      at most GPU_TESTS_TIMEOUT_S (300 s). Tests needing two GPUs (NCCL) skip on one.
#   2. benchmarks/gpu_check.py --quick: batch-1 decode vs transformers (same GPU, bf16), HOST->GPU
#      load through DeviceLoader vs pinned-copy bandwidth, a 2-stage pipeline in two processes;
#      at most GPU_BENCH_TIMEOUT_S (150 s). With --report it writes its docs/benchmarks.md section.
#
# The JSON line: {"gpu", "ok", "tests_passed", "tests_failed", "tests_skipped", "tests_rc",
# "bench_rc", "seconds"} and the benchmark's own figures (its JSON line). Exit 0 when every GPU test
# passed (none failed, at least one ran) and the benchmark succeeded with the pipeline's tokens
# equal to the one-process engine's; else 1. Without a CUDA GPU (torch.cuda.is_available() is
# False) it says so, prints {"gpu": false, "ok": true, ...} and exits 0: nothing is verified.
# PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
REPORT=--no-report
[ "${1:-}" = "--report" ] && REPORT=
TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT_S:-300}
BENCH_TIMEOUT=${GPU_BENCH_TIMEOUT_S:-150}
start=$(date +%s)

if ! probe=$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null)
then
    echo "gpu-check: cannot import torch with $PY:" \
         "$("$PY" -c 'import torch' 2>&1 | tail -n 1)" >&2
    echo '{"gpu": null, "ok": false, "reason": "torch does not import"}'
    exit 1
fi
read -r torch_version has_cuda <<<"${probe##*$'\n'}"  # the last line: what was printed
if [ "$has_cuda" != "True" ]; then
    echo "gpu-check: no CUDA GPU on this machine (torch $torch_version: torch.cuda.is_available() is False);" \
         "the GPU tests and the GPU benchmark did not run, so nothing GPU-specific is verified here"
    printf '{"gpu": false, "ok": true, "torch": "%s", "reason": "torch.cuda.is_available() is False"}\n' \
        "$torch_version"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t files < <(grep -l "cuda.is_available" tests/test_*.py)
echo "gpu-check: torch $torch_version on $(nvidia-smi -L 2>/dev/null | head -n 1 || echo 'a CUDA GPU')"
echo "gpu-check: GPU tests in ${files[*]}"
timeout -k 30 "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
    --junitxml="$work/gpu-tests.xml" "${files[@]}"
tests_rc=$?

timeout -k 30 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_check.py --quick $REPORT | tee "$work/bench.out"
bench_rc=${PIPESTATUS[0]}

"$PY" - "$work/gpu-tests.xml" "$work/bench.out" "$tests_rc" "$bench_rc" "$start" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET

xml_path, bench_path, tests_rc, bench_rc, start = sys.argv[1:]
counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
try:
    root = ET.parse(xml_path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
except (OSError, ET.ParseError):
    counts["errors"] += 1  # pytest died before writing its report (a timeout, a crash)
bench = {}
try:
    lines = [line for line in open(bench_path).read().splitlines() if line.strip()]
    bench = json.loads(lines[-1]) if lines else {}
except (OSError, ValueError):
    pass
failed = counts["failures"] + counts["errors"]
passed = counts["tests"] - failed - counts["skipped"]
bench_ok = int(bench_rc) == 0 and bench.get("gpu") is True and bench.get("pipeline_same_tokens") is True
result = {**{k: v for k, v in bench.items() if k != "ok"}, "gpu": True,
          "ok": int(tests_rc) == 0 and failed == 0 and passed > 0 and bench_ok,
          "tests_passed": passed, "tests_failed": failed, "tests_skipped": counts["skipped"],
          "tests_rc": int(tests_rc), "bench_rc": int(bench_rc), "bench_ok": bench_ok,
          "seconds": round(time.time() - float(start), 1)}
print(json.dumps(result, sort_keys=True))
sys.exit(0 if result["ok"] else 1)
EOF
