"""The repository keeps its promises: documented modules, the designed layout, a true README.

docker-compose.yml and the Dockerfile are checked in test_compose.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _structure_sections() -> dict[str, str]:
    """docs/structure.md's sections by directory: ``## faascale/engine — ...`` -> its lines
    (``## faascale (top level)`` is ``faascale``)."""
    sections: dict[str, str] = {}
    current = None
    for line in (ROOT / "docs" / "structure.md").read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].split(" ")[0]
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_every_module_has_a_line_in_its_directorys_section_of_structure_md() -> None:
    """Each module of faascale, benchmarks, loadtest and scripts is named in the section of its
    own directory (a ``gateway.py`` line under platform does not count for benchmarks), and
    every entry names a file that exists there."""
    sections = _structure_sections()
    modules = [p for d in ("faascale", "benchmarks", "loadtest", "scripts")
               for p in (ROOT / d).rglob("*.py") if p.name != "__init__.py"]
    modules += list((ROOT / "scripts").glob("*.sh"))
    assert len(modules) > 40
    missing = [str(p.relative_to(ROOT)) for p in modules
               if f"`{p.name}`" not in sections.get(str(p.parent.relative_to(ROOT)), "")]
    assert not missing, f"add these to their section of docs/structure.md: {missing}"
    stale = [f"{d}/{name}" for d, text in sections.items() if d != "tests"
             for name in re.findall(r"^- `([\w.-]+\.(?:py|sh))`", text, re.M)
             if not (ROOT / d / name).is_file()]
    assert not stale, f"docs/structure.md names modules that do not exist: {stale}"


def test_design_layout_exists() -> None:
    for pkg in ("engine", "memory_tier", "pipecast", "coldstart", "platform"):
        assert (ROOT / "faascale" / pkg / "__init__.py").is_file(), pkg
    assert not (ROOT / "platform").exists(), "a top-level platform/ would shadow the stdlib"
    for f in ("functions/smollm2-135m/function.yaml", "functions/tiny-llama/function.yaml",
              "docker-compose.yml", "Makefile", ".ci/run"):
        assert (ROOT / f).is_file(), f


def test_readme_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert readme.index("make run") < readme.index("## Usage")
    for target in re.findall(r"^make ([\w-]+)", readme, re.M):
        assert re.search(rf"^{target}:", makefile, re.M), target
    from faascale.cli import app
    from typer.main import get_command

    commands = set(get_command(app).commands)
    code = "\n".join(body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", readme, re.S | re.M)
                     if lang in ("", "bash"))
    used = re.findall(r"faascale (\w+) ", code)
    assert "generate" in used and "pack" in used
    for cmd in used:
        assert cmd in commands, f"README uses 'faascale {cmd}' which the CLI lacks"
    for path in re.findall(r"functions/[\w.-]+", readme):
        assert (ROOT / path).exists(), path
    assert "make test" in (ROOT / ".ci" / "run").read_text()


MAX_MODULE_LINES = 500  # a module a newcomer reads in one sitting (issue 17)


def test_no_module_of_the_package_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "faascale").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (lines): {long}"
