"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def faascale(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FAASCALE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "faascale.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_generate_tiny_llama_streams_and_is_deterministic(tmp_path: Path) -> None:
    a = faascale("generate", "functions/tiny-llama", "hello", "-n", "12", "-t", "0", "--stream",
                 home=tmp_path)
    b = faascale("generate", "functions/tiny-llama", "hello", "-n", "12", "-t", "0", home=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "12 tokens in" in a.stderr
    assert a.stdout == b.stdout  # streaming and non-streaming print the same text
    assert "packing tiny-llama" in a.stderr and "packing" not in b.stderr  # packed once, cached


def test_pack_command(tmp_path: Path) -> None:
    out = tmp_path / "packed"
    r = faascale("pack", "random://tiny-llama", str(out), "--blocks", "2", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "into 2 blocks" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["block-0000.bin", "block-0001.bin",
                                                    "manifest.json", "tokenizer.json"]
    again = faascale("pack", "random://tiny-llama", str(out), home=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "functions/missing", "x"], "no such function spec"),
    (["generate", "functions/tiny-llama", "x", "--temperature", "-1"], "temperature: must be in"),
    (["generate", "functions/tiny-llama", "x" * 600], "does not fit the context of 512 tokens"),
    (["pack", "random://tiny-llama", "OUT", "--blocks", "99"], "blocks: must be between 1"),
    (["pack", "s3://bucket/model", "OUT"], "scheme s3:// is not supported"),
    (["pack", "/does/not/exist", "OUT"], "does not exist"),
])
def test_bad_input_is_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    r = faascale(*args, home=tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in r.stderr


def test_a_gpu_device_without_gpus_is_one_error_line(tmp_path: Path) -> None:
    """``engine.device: cuda`` with no ``resources.num_gpus``: the spec error names the field."""
    fn = tmp_path / "gpu-fn"
    fn.mkdir()
    (fn / "function.yaml").write_text("name: gpu-fn\nmodel: {source: random://tiny-llama}\n"
                                      "engine: {device: cuda}\n")
    r = faascale("generate", str(fn), "x", home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid function spec: engine.device: 'cuda' needs a GPU")


@pytest.mark.slow
def test_generate_smollm2_answers_paris(tmp_path: Path) -> None:
    r = faascale("generate", "functions/smollm2-135m", "The capital of France is",
                 "--temperature", "0", "--max-tokens", "8", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
