"""Imports run downward only: engine <- memory_tier <- pipecast <- platform, and coldstart (used by
platform) imports engine and memory_tier only, never platform, pipecast or Ray. Read with ``ast``
from every module's source, imports inside functions included; the pure policies and the value
types they share import no torch (they start in fast processes)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "faascale"

# Layer -> the top-level imports it must never make (a prefix match on the dotted name).
FORBIDDEN = {
    "engine": ("faascale.memory_tier", "faascale.pipecast", "faascale.platform", "faascale.coldstart"),
    "memory_tier": ("faascale.pipecast", "faascale.platform", "faascale.coldstart"),
    "pipecast": ("faascale.platform", "faascale.coldstart"),
    "coldstart": ("faascale.platform", "faascale.pipecast", "ray"),
}
# Modules a fast-starting process (a policy, an agent) imports: no torch, even indirectly.
TORCH_FREE = ("faascale.memory_tier.policy", "faascale.engine.blockio", "faascale.engine.manifest",
              "faascale.engine.tokenizer", "faascale.coldstart.start_source",
              "faascale.platform.autoscale")


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, the module ``module``: ``import a.b``,
    ``from a import b`` (as ``a.b``; relative ones resolved against ``module``'s package) and
    ``importlib.import_module("a.b")`` with a literal name, at any depth of the tree."""
    package = module.rsplit(".", 1)[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def upward_imports(path: Path) -> list[str]:
    """``file:line imports NAME (LAYER must not import PREFIX)`` for each upward import in ``path``."""
    rel = path.relative_to(ROOT)
    layer = rel.parts[1] if len(rel.parts) > 2 else ""
    module = ".".join(rel.with_suffix("").parts)
    found = []
    for line, name in imported_modules(path.read_text(), module):
        for prefix in FORBIDDEN.get(layer, ()):
            if name == prefix or name.startswith(prefix + "."):
                found.append(f"{rel}:{line} imports {name} ({layer} must not import {prefix})")
    return found


def test_the_reader_finds_imports_at_any_depth() -> None:
    source = ("import os\n"
              "def f():\n"
              "    from faascale.platform import spec\n"
              "    import ray.serve\n"
              "class C:\n"
              "    def g(self):\n"
              "        from ..memory_tier.node import TierConfig\n"
              "        return importlib.import_module('faascale.pipecast.member')\n")
    assert imported_modules(source, "faascale.engine.x") == [
        (1, "os"), (3, "faascale.platform.spec"), (4, "ray.serve"),
        (7, "faascale.memory_tier.node.TierConfig"), (8, "faascale.pipecast.member")]


def test_imports_run_downward_only() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    found = [msg for path in modules for msg in upward_imports(path)]
    assert not found, "upward imports:\n" + "\n".join(found)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_pure_modules_import_no_torch(module: str) -> None:
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            f"assert not bad, 'imports torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, f"{module}: {r.stderr.strip().splitlines()[-1:]}"
