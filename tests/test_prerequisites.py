"""No silent skips in CI: the prerequisite guard (tests/support.py) skips outside CI and fails under
CI=true, shown on a machine that really lacks every prerequisite.

The machine is made in a pytest run of its own, on copies of real test modules: its PATH holds
bash and basename but no `ip` (so netns-cluster.sh's check finds no network namespaces) and no
Ceph tools (so the ``ceph_rgw`` fixture finds no RGW), and the copied checkout has no ../shared
beside it (so there are no vLLM logs). Nothing is pretended: each prerequisite is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support import in_ci, require

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
COPIED = ("conftest.py", "support.py", "test_emulated_cluster.py", "test_vllm_log.py")
RGW_PROBE = '''
def test_needs_the_real_rgw(ceph_rgw) -> None:
    raise AssertionError("unreachable: no Ceph tools on this run's PATH")
'''
REASONS = ("network namespaces are unavailable: netns-cluster.sh: 'ip' not found",
           "Ceph RGW is not installed (no radosgw",
           "the shared data is absent: no vLLM logs")
INNER_TIMEOUT_S = 300


@pytest.mark.parametrize("value, expected", [("true", True), ("TRUE", True), ("1", True),
                                             (" True\n", True), ("false", False), ("0", False),
                                             ("", False), ("yes", False), (None, False)])
def test_ci_means_true_or_1_in_any_case(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                        expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_require_skips_outside_ci_and_fails_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    require(True, "never shown")
    with pytest.raises(pytest.skip.Exception, match=r"^Ceph RGW is gone$"):
        require(False, "Ceph RGW is gone")
    monkeypatch.setenv("CI", "true")
    require(True, "never shown")
    with pytest.raises(pytest.fail.Exception, match=r"^CI=true but Ceph RGW is gone \("):
        require(False, "Ceph RGW is gone")


@pytest.fixture(scope="module")
def bare_machine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(checkout, env): copies of the guard and of real test modules, with no ../shared beside
    them, and an environment whose PATH has no iproute2 and no Ceph."""
    base = tmp_path_factory.mktemp("bare-machine")
    checkout = base / "checkout"
    (checkout / "tests").mkdir(parents=True)
    for name in COPIED:
        shutil.copy(TESTS / name, checkout / "tests" / name)
    (checkout / "tests" / "test_rgw_probe.py").write_text(RGW_PROBE)
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")  # rootdir, markers, timeout
    assert not (base / "shared").exists()
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "basename"):  # what netns-cluster.sh runs before it looks for `ip`
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    env["PATH"] = str(bin_dir)
    return checkout, env


def _run(checkout: Path, env: dict[str, str], ci: bool) -> tuple[subprocess.CompletedProcess[str],
                                                                  dict[str, str]]:
    """pytest on the bare machine; the outcome of each test id from its JUnit XML."""
    tag = "ci" if ci else "dev"
    xml = checkout.parent / f"{tag}.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"--basetemp={checkout.parent / f'tmp-{tag}'}", f"--junitxml={xml}", "tests"],
        cwd=checkout, env={**env, "CI": "true"} if ci else env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=INNER_TIMEOUT_S)
    outcomes = {}
    for case in ET.parse(xml).iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("skipped", "error", "failure")]
        module = case.get("classname", "").split(".")[-1]  # "tests.test_x" -> "test_x"
        outcomes[f"{module}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return done, outcomes


def test_a_ci_run_without_the_prerequisites_fails_with_each_reason(
        bare_machine: tuple[Path, dict[str, str]]) -> None:
    checkout, env = bare_machine
    dev, dev_outcomes = _run(checkout, env, ci=False)
    out = dev.stdout + dev.stderr
    assert dev.returncode == 0, out  # outside CI: skips, and the run is green
    skipped = {t for t, o in dev_outcomes.items() if o == "skipped"}
    assert {t.split("::")[0] for t in skipped} == {"test_emulated_cluster", "test_vllm_log",
                                                   "test_rgw_probe"}, out
    assert set(dev_outcomes.values()) == {"passed", "skipped"}, out
    for reason in REASONS:
        assert reason in out and f"CI=true but {reason}" not in out, (reason, out)

    ci, ci_outcomes = _run(checkout, env, ci=True)
    out = ci.stdout + ci.stderr
    assert ci.returncode == 1, out  # under CI: the same tests fail, each with its reason
    assert ci_outcomes.keys() == dev_outcomes.keys(), out
    failed = {t for t, o in ci_outcomes.items() if o in ("error", "failure")}
    assert failed == skipped and "skipped" not in ci_outcomes.values(), out
    for reason in REASONS:
        assert f"CI=true but {reason}" in out, (reason, out)


def test_every_other_skip_in_tests_says_it_is_hardware_or_an_engine() -> None:
    """A prerequisite goes through the guard; a plain skip is only for hardware (a CUDA GPU) or an
    engine (Docker) that CI does not promise, and its reason says so."""
    unclassified = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("support.py", Path(__file__).name):
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"\bpytest\.(skip\(|mark\.skipif\(|importorskip\()", line):
                call = " ".join(lines[i:i + 3])
                if not re.search(r"hardware (absent|present)|engine absent", call):
                    unclassified.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not unclassified, ("use support.requires/require for a prerequisite, or say "
                              f"'hardware absent' / 'engine absent' in the reason: {unclassified}")
