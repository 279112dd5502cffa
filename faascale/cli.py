"""The ``faascale`` command line (typer). Heavy imports happen inside commands, so ``--help`` is instant.

Every expected failure (bad spec, bad source, corrupt block, bad sampling parameter) prints one
``error: ...`` line on stderr and exits with status 2; never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="faascale: a serverless LLM platform with fast scaling.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from faascale.engine.checkpoint import CheckpointError
    from faascale.engine.config import ConfigError
    from faascale.engine.engine import PromptTooLongError
    from faascale.engine.model import ShardWeightsError
    from faascale.engine.sampling import SamplingParamsError
    from faascale.engine.sources import SourceError
    from faascale.engine.tokenizer import ChatTemplateError
    from faascale.platform.client import PlatformError
    from faascale.coldstart.dataset import DatasetError
    from faascale.coldstart.probe import ProbeError
    from faascale.coldstart.model import FeatureError
    from faascale.coldstart.vllm_log import VllmLogError
    from faascale.platform.spec import SpecError
    from faascale.platform.warm_pool import PoolSettingError

    return (CheckpointError, ConfigError, PromptTooLongError, SamplingParamsError, SourceError,
            SpecError, ChatTemplateError, ShardWeightsError, FileNotFoundError, PlatformError,
            VllmLogError, DatasetError, FeatureError, ProbeError, PoolSettingError)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _progress(label: str) -> Callable[[int, int], None]:
    from rich.console import Console

    console = Console(stderr=True)

    def report(done: int, total: int) -> None:
        console.print(f"[dim]{label}: block {done}/{total}[/dim]")

    return report


@app.command()
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


@app.command()
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
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(function_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=tuple(stop or ()))
    packed = resolve_packed(spec.resolved_source(), dtype=spec.model.dtype,
                            num_blocks=spec.model.blocks, seed=spec.model.seed,
                            progress=_progress(f"packing {spec.name}"))
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


# ---------------------------------------------------------------------------------------------
# The platform


def _state() -> Any:
    from faascale.platform.state import StateDir

    return StateDir()


def _client(admin: bool = True) -> Any:
    from faascale.platform.client import PlatformClient

    return PlatformClient.from_state(_state(), admin=admin)


def _running(state: Any) -> Any:
    """The recorded platform if its process is alive and answers /healthz, else None."""
    from faascale.platform.client import PlatformClient, PlatformError

    info = state.read_platform()
    if info is None:
        return None
    try:
        os.kill(info.pid, 0)
    except OSError:
        return None
    try:
        PlatformClient(info.url, "", timeout_s=3).health()
    except PlatformError:
        return None
    return info


@app.command()
@friendly_errors
def up(address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster "
                                              "(host:port) instead of starting a local one"),
       host: str = typer.Option("127.0.0.1", "--host", help="gateway bind address"),
       port: int = typer.Option(8080, "--port", help="gateway port"),
       foreground: bool = typer.Option(False, "--foreground", help="run in this process (for "
                                       "containers) instead of as a daemon"),
       timeout_s: float = typer.Option(180.0, "--timeout", help="seconds to wait for readiness"),
       warm_pool: Optional[str] = typer.Option(None, "--warm-pool", help="warm runtimes kept per "
                                               "node: auto (one per free GPU; one on a node without GPUs), a "
                                               "number, or off [default: $FAASCALE_WARM_POOL, "
                                               "else auto]")
       ) -> None:
    """Start the platform: Ray (local or joined), Ray Serve, the gateway; print URL and tokens."""
    import subprocess
    import time

    from faascale.platform.auth import load_or_create_tokens
    from faascale.platform.client import PlatformClient, PlatformError
    from faascale.platform.warm_pool import POOL_ENV, parse_pool_setting

    if warm_pool is not None:
        parse_pool_setting(warm_pool)  # a bad value: an error: line, exit 2
        os.environ[POOL_ENV] = warm_pool  # the platform process reads it (and its Ray workers)

    state = _state().ensure()
    tokens = load_or_create_tokens(state.tokens_file)
    info = _running(state)
    if info is None:
        if foreground:
            from faascale.platform.server import run

            run(str(state.root), host, port, address)
            return
        cmd = [sys.executable, "-m", "faascale.platform.server", "--home", str(state.root),
               "--host", host, "--port", str(port)] + (["--address", address] if address else [])
        log_path = state.logs / "platform.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                typer.echo("\n".join(tail), err=True)
                typer.echo(f"error: the platform exited during start-up (log: {log_path})", err=True)
                raise typer.Exit(1)
            try:
                PlatformClient(url, "", timeout_s=2).health()
                info = state.read_platform()
                if info is not None and info.pid == proc.pid:
                    break
            except PlatformError:
                pass
            if time.monotonic() > deadline:
                proc.terminate()
                typer.echo(f"error: the platform did not become ready in {timeout_s:.0f} s "
                           f"(log: {log_path})", err=True)
                raise typer.Exit(1)
            time.sleep(0.3)
        typer.echo(f"faascale is up at {info.url} (pid {info.pid}, Ray {info.ray_address})")
    else:
        typer.echo(f"faascale is already running at {info.url} (pid {info.pid})")
    typer.echo(f"  admin token:  {tokens.admin}")
    typer.echo(f"  invoke token: {tokens.invoke}")
    typer.echo(f"  state:        {state.root}")


@app.command()
@friendly_errors
def down(timeout_s: float = typer.Option(60.0, "--timeout")) -> None:
    """Stop the platform started by `faascale up` (by its pid; its Ray instance stops with it)."""
    import signal
    import time

    state = _state()
    info = state.read_platform()
    if info is None:
        typer.echo("faascale is not running")
        return
    try:
        os.kill(info.pid, signal.SIGTERM)
    except ProcessLookupError:
        state.clear_platform(info.pid)
        typer.echo("faascale was not running (stale state cleared)")
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(info.pid, signal.SIGKILL)
        typer.echo(f"warning: pid {info.pid} did not stop in {timeout_s:.0f} s; killed", err=True)
    state.clear_platform(info.pid)
    typer.echo("faascale is down")


@app.command()
@friendly_errors
def deploy(path: str = typer.Argument(..., help="a function directory (function.yaml)")) -> None:
    """Validate a function, pack its model into the object store (once), and deploy it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from faascale.engine.sources import resolve_packed
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(path)
    client = _client()
    # Pack locally first (a progress bar for what can take a while); the platform reuses this
    # packing and uploads it to its object store. s3:// sources are already packed.
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} blocks"), TimeElapsedColumn(), transient=True) as progress:
        if not spec.model.source.startswith("s3://"):
            task = progress.add_task(f"packing {spec.name}", total=spec.model.blocks)
            resolve_packed(spec.resolved_source(), dtype=spec.model.dtype,
                           num_blocks=spec.model.blocks, seed=spec.model.seed,
                           cache_dir=_state().models,
                           progress=lambda done, total: progress.update(task, completed=done,
                                                                        total=total))
    status = client.deploy(spec.to_document(), spec.base_dir)
    typer.echo(f"deployed {status['name']} (model {status['model_id']}, replicas "
               f"{status['replicas']['min']}..{status['replicas']['max']})")
    typer.echo(f"  invoke: faascale invoke {status['name']} \"Hello\"")


@app.command("ls")
@friendly_errors
def ls_() -> None:
    """List deployed functions and their replicas."""
    from rich.console import Console
    from rich.table import Table

    table = Table("function", "status", "running", "starting", "min..max", "model")
    for f in _client().list():
        r = f["replicas"]
        table.add_row(f["name"], f["status"], str(r["running"]), str(r["starting"]),
                      f"{r['min']}..{r['max']}", f["model_id"])
    Console().print(table)


@app.command()
@friendly_errors
def status(name: str) -> None:
    """A function's replicas, recent scale events and cold starts."""
    import time

    from rich.console import Console

    s = _client().status(name)
    r = s["replicas"]
    con = Console()
    con.print(f"[bold]{s['name']}[/bold]  {s['status']}  model {s['model_id']}")
    con.print(f"replicas: {r['running']} running, {r['starting']} starting, {r['stopping']} "
              f"stopping (min {r['min']}, max {r['max']})")
    con.print(f"gateway: {s['gateway']['in_flight']} in flight, "
              f"{s['gateway']['waiting_first_token']} waiting for a first token")
    for e in s["scale_events"][:5]:
        con.print(f"  scale {e.get('from_replicas')} -> {e.get('to_replicas')} ({e.get('reason')}) "
                  f"{time.strftime('%H:%M:%S', time.localtime(e['at_s']))}")
    for e in s["cold_starts"][:5]:
        con.print(f"  cold start {e.get('total_s', 0):.2f} s (load {e.get('load_s', 0):.2f} s) "
                  f"replica {e.get('replica')}")
    ests = s.get("estimates") or []
    if ests:
        from faascale.platform.autoscale import ColdStartEstimate, choose_source

        best = choose_source([ColdStartEstimate.from_dict(e) for e in ests])
        parts = [f"{e['source']} {e['ready_s']:.2f} s ({e.get('basis') or '?'})"
                 + ("" if e.get("available", True) else " unavailable")
                 + (" <- fastest" if best is not None and e["source"] == best.source else "")
                 for e in ests]
        last = s["cold_starts"][0] if s["cold_starts"] else None
        measured = (f"; last measured {last.get('total_s', 0):.2f} s from "
                    f"{'+'.join(last.get('sources') or {}) or '?'}" if last else "")
        con.print("next cold start (estimated): " + ", ".join(parts) + measured)
    last_start = (s.get("coldstart") or {}).get("last")
    if last_start:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in last_start["steps_s"].items())
        runtime = {True: "warm runtime", False: "cold runtime"}.get(last_start.get("warm"), "")
        con.print(f"last start profile: {last_start['total_s']:.2f} s from "
                  f"{last_start['source']}{', ' + runtime if runtime else ''}, fixed part "
                  f"{last_start.get('fixed_s', 0):.2f} s ({steps})")
    for node, stats in (s.get("nodes") or {}).items():
        tiers = ", ".join(f"{t} {v['used_bytes'] / 2**20:.1f} MiB of "
                          f"{v['capacity_bytes'] / 2**30:.0f} GiB ({v['blocks']} blocks)"
                          for t, v in stats["tiers"].items())
        hits = ", ".join(f"{t} {n}" for t, n in stats["hits"].items()) or "none"
        con.print(f"node {node}: {tiers}; fetches by source: {hits}")
    for pool in s.get("warm_pool") or []:
        con.print(f"warm runtimes on {pool['node'][:12]}: {pool['idle']} idle of {pool['target']} "
                  f"({pool['pending']} starting, {pool['taken_total']} taken so far)"
                  + (f"; error: {pool['error']}" if pool.get("error") else ""))
    pc = s.get("pipecast")
    if pc:
        members = ", ".join(f"{n} {v['blocks']}/{pc['blocks_needed']} {v['route']}"
                            for n, v in pc["members"].items())
        con.print(f"pipecast: {members}; {pc['pipeline_serves']} served through pipelines")
        for label, so in (("scaling out", pc.get("active")), ("last scale-out", pc.get("last"))):
            if so:
                took = f" in {so['took_s']:.2f} s" if "took_s" in so else ""
                con.print(f"  {label}: {so['algorithm']}{took}, "
                          f"{so['bytes_moved'] / 2**20:.1f} MiB moved, "
                          f"{len(so['pipelines'])} pipelines")
    if s.get("message"):
        con.print(f"message: {s['message']}")


@app.command()
@friendly_errors
def invoke(name: str, prompt: str,
           max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
           temperature: float = typer.Option(0.7, "--temperature", "-t"),
           chat: bool = typer.Option(True, "--chat/--no-chat", help="send as a chat message"),
           stream: bool = typer.Option(False, "--stream")) -> None:
    """Invoke a deployed function through the gateway."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    client = _client(admin=False)
    if stream:
        for chunk in client.invoke_stream(name, body):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        out = client.invoke(name, body)
        typer.echo(out["text"])
        u = out["usage"]
        typer.echo(f"[{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                   f"{out['finish_reason']}]", err=True)


@app.command()
@friendly_errors
def scale(name: str, min_replicas: Optional[int] = typer.Option(None, "--min"),
          max_replicas: Optional[int] = typer.Option(None, "--max")) -> None:
    """Change a function's replica bounds."""
    if min_replicas is None and max_replicas is None:
        typer.echo("error: give --min and/or --max", err=True)
        raise typer.Exit(2)
    s = _client().scale(name, min_replicas, max_replicas)
    typer.echo(f"{name}: replicas {s['replicas']['min']}..{s['replicas']['max']}")


@app.command()
@friendly_errors
def delete(name: str) -> None:
    """Delete a function (its replicas stop; its packed model stays in the object store)."""
    _client().delete(name)
    typer.echo(f"deleted {name}")


@app.command()
@friendly_errors
def logs(name: str, tail: int = typer.Option(100, "--tail")) -> None:
    """The last lines of a function's replica logs."""
    for line in _client().logs(name, tail):
        typer.echo(line)


@app.command()
@friendly_errors
def token(admin: bool = typer.Option(False, "--admin", help="the admin token instead")) -> None:
    """Print the invoke (or admin) bearer token of this machine's platform."""
    from faascale.platform.auth import load_or_create_tokens

    state = _state()
    if not state.tokens_file.exists():
        typer.echo("error: no tokens yet; start the platform with `faascale up`", err=True)
        raise typer.Exit(2)
    tokens = load_or_create_tokens(state.tokens_file)
    typer.echo(tokens.admin if admin else tokens.invoke)


coldstart_app = typer.Typer(no_args_is_help=True, help="Cold starts: where a start's time goes.")
app.add_typer(coldstart_app, name="coldstart")


@coldstart_app.command("parse-vllm")
@friendly_errors
def parse_vllm(log: str = typer.Argument(..., help="a vLLM startup log (0.8 to 0.33)"),
               as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Split a vLLM startup log into the six startup steps (and the finer stated times)."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from faascale.coldstart.vllm_log import STEPS, parse_vllm_log_file

    r = parse_vllm_log_file(log)
    for w in r.warnings:
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        typer.echo(json.dumps(asdict(r), indent=1))
        return
    longest = max(r.steps_s.values(), default=0.0) or 1.0
    table = Table(title=f"vLLM {r.version or '(version not logged)'} startup: {log}")
    for col in ("step", "seconds", ""):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for step in STEPS:
        if step in r.steps_s:
            v = r.steps_s[step]
            table.add_row(step, f"{v:.2f}", "█" * max(1, round(30 * v / longest)))
        else:
            table.add_row(step, "-", "")
    table.add_row("total", f"{r.total_s:.2f}" if r.total_s is not None else "-", "")
    con = Console()
    con.print(table)
    if r.details_s:
        con.print("details: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.details_s.items()))


def _steps_table(title: str, summary: list[Any]) -> Any:
    """Per-step mean and p90 with a bar of the mean (``profile.summarize`` rows)."""
    from rich.table import Table

    table = Table(title=title)
    for col, just in (("step", "left"), ("n", "right"), ("mean s", "right"), ("p90 s", "right"),
                      ("", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    rows = [r for r in summary if r.step != "total"]
    longest = max((r.mean_s for r in rows), default=0.0) or 1.0
    for r in summary:
        bar = "" if r.step == "total" else "█" * max(1 if r.mean_s > 0 else 0,
                                                      round(30 * r.mean_s / longest))
        table.add_row(r.step, str(r.n), f"{r.mean_s:.3f}", f"{r.p90_s:.3f}", bar)
    return table


@coldstart_app.command("profile")
@friendly_errors
def profile(function: Optional[str] = typer.Argument(None, help="a deployed function (its model "
                                                     "is started; the profiles are stored)"),
            runs: int = typer.Option(3, "--runs", min=1, max=100),
            tier: str = typer.Option("DISK", "--tier", help="HOST, DISK or REMOTE"),
            model_dir: Optional[str] = typer.Option(None, "--model-dir", help="a packed model "
                                                    "directory instead of a deployed function"),
            as_json: bool = typer.Option(False, "--json", help="print the profiles as JSON")) -> None:
    """N real cold starts in fresh processes from a chosen tier: where the time goes."""
    import json

    from rich.console import Console

    from faascale.coldstart.probe import ProbeError, run_profiles
    from faascale.coldstart.profile import summarize

    if (function is None) == (model_dir is None):
        raise ProbeError("give a deployed FUNCTION or --model-dir DIR (one of them)")
    client, max_seq_len = None, None
    if function is not None:
        client = _client()
        s = client.status(function)
        model_dir = s["model_dir"]
        max_seq_len = (s.get("spec") or {}).get("engine", {}).get("max_seq_len")
        if "://" in str(model_dir):
            raise ProbeError(f"{function}'s model lives at {model_dir}; profile a local copy "
                             "with --model-dir (the probe reads packed directories)")
    profiles = run_profiles(str(model_dir), tier, runs, max_seq_len=max_seq_len)
    if client is not None and function is not None:
        client.add_startups(function, [{**p.to_dict(), "function": function} for p in profiles])
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in profiles], indent=1))
        return
    con = Console()
    con.print(_steps_table(f"{runs} cold start(s) from {tier.upper()}: {model_dir}",
                           summarize(profiles)))
    if function is not None:
        con.print(f"stored {len(profiles)} profile(s) for {function}")


@coldstart_app.command("profiles")
@friendly_errors
def profiles_(name: Optional[str] = typer.Argument(None, help="a function (default: all)"),
              last: int = typer.Option(10, "--last", min=1, max=500),
              as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Recent replica starts per function: when, which replica, from where, per step."""
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from faascale.coldstart.profile import START_STEPS, StartupProfile, summarize

    client = _client(admin=False)
    names = [name] if name else [f["name"] for f in client.list()]
    out = {n: client.startups(n, last) for n in names}
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    # one row per start, 15 columns: wide enough not to cut them when piped (rich's default: 80)
    con = Console() if sys.stdout.isatty() else Console(width=220)
    for n, data in out.items():
        profiles = [StartupProfile.from_dict(p) for p in data["profiles"]]
        table = Table(title=f"{n}: last {len(profiles)} start(s)")
        steps = [s for s in START_STEPS if any(s in p.steps() for p in profiles)]
        for col in ("at", "replica", "source", "runtime", "total s", "fixed s", *steps):
            table.add_column(col, justify="left" if col in ("at", "replica", "source", "runtime")
                             else "right")
        for p in profiles:
            st = p.steps()
            table.add_row(time.strftime("%H:%M:%S", time.localtime(p.started_at_s)),
                          p.replica[-16:], p.source if p.ok else f"failed: {p.error}"[:40],
                          "warm" if p.warm else "cold", f"{p.total_s:.2f}", f"{p.fixed_s:.2f}",
                          *(f"{st[s]:.3f}" if s in st else "-" for s in steps))
        con.print(table)
        if profiles:
            con.print(_steps_table(f"{n}: per step", summarize(profiles)))


@coldstart_app.command("predict")
@friendly_errors
def predict(data: str = typer.Option(..., "--data", help="a folder in the format of "
                                     "../shared/coldstart-data (models.csv, startup_runs.csv)"),
            features: str = typer.Option(..., "--features", help="CSV: the columns of models.csv "
                                         "plus `machine` (a scenario of startup_runs.csv)"),
            out: str = typer.Option(..., "--out", help="CSV to write: model, machine, "
                                    "predicted_total_s and one column per step")) -> None:
    """Predict vLLM start times: fit the startup-latency model per machine on DATA, write OUT."""
    from faascale.coldstart.predict import predict_file

    predictions = predict_file(data, features, out)
    typer.echo(f"wrote {len(predictions)} prediction(s) to {out}")


def _loadtest_dir() -> Path:
    """The source checkout's ``loadtest/`` (Locust files are not part of the installed package)."""
    import faascale

    root = Path(faascale.__file__).resolve().parents[1]
    if not (root / "loadtest" / "locustfile.py").is_file():
        raise FileNotFoundError(f"{root / 'loadtest'}: no locustfile; run from a source checkout")
    return root


@app.command()
@friendly_errors
def loadtest(name: str = typer.Argument(..., help="the deployed function to load (functions "
                                       "shape: several, comma-separated)"),
             shape: str = typer.Option("burst", "--shape", help="burst, steps, trace or functions"),
             out: str = typer.Option("loadtest-results", "--out", help="report directory"),
             idle_s: float = typer.Option(5.0, "--idle-s"),
             spike_s: float = typer.Option(10.0, "--spike-s"),
             spike_rate: float = typer.Option(4.0, "--spike-rate", help="requests/s in the spike"),
             after_s: float = typer.Option(5.0, "--after-s"),
             base_rate: float = typer.Option(0.0, "--base-rate"),
             rates: str = typer.Option("1,2,4", "--rates", help="steps: requests/s per step"),
             step_s: float = typer.Option(10.0, "--step-s"),
             trace: str = typer.Option("code", "--trace", help="code, conv or a CSV path"),
             window_start_s: float = typer.Option(840.0, "--window-start-s"),
             window_s: float = typer.Option(120.0, "--window-s"),
             speedup: float = typer.Option(1.0, "--speedup"),
             rate_scale: float = typer.Option(1.0, "--rate-scale"),
             prompt_tokens: int = typer.Option(64, "--prompt-tokens"),
             output_tokens: int = typer.Option(32, "--output-tokens"),
             max_prompt_tokens: Optional[int] = typer.Option(
                 None, "--max-prompt-tokens", help="trace: longest prompt (default: an eighth "
                 "of the function's max_seq_len; prompts are words, about a token each)"),
             max_output_tokens: int = typer.Option(64, "--max-output-tokens"),
             functions_trace: Optional[str] = typer.Option(
                 None, "--functions-trace", help="functions: the Azure Functions 2019 per-minute "
                 "sample (default: ../shared/traces/azure_functions_2019_sample1000_per_minute.csv)"),
             start_minute: int = typer.Option(1100, "--start-minute"),
             minutes: int = typer.Option(10, "--minutes"),
             seed: int = typer.Option(0, "--seed"),
             tail_s: float = typer.Option(
                 0.0, "--tail-s", min=0.0, help="keep recording the replicas this long after "
                 "the last answer (to see the scale-down)")) -> None:
    """Headless Locust against a running platform: Locust's CSV/HTML reports, the SLO summary
    (TTFT and time-between-tokens attainment, p50/p90/p99), the function's replicas over the
    test and a report with a figure."""
    import subprocess
    import threading

    from faascale.platform.auth import load_or_create_tokens

    if shape not in ("burst", "steps", "trace", "functions"):
        raise typer.BadParameter("must be burst, steps, trace or functions", param_hint="--shape")
    names = [n.strip() for n in name.split(",") if n.strip()]
    if len(names) > 1 and shape != "functions":
        raise typer.BadParameter("several functions need --shape functions", param_hint="NAME")
    root = _loadtest_dir()
    state = _state()
    client = _client(admin=False)
    status_ = client.status(names[0])  # a stopped platform or an unknown function: an error
    for other in names[1:]:
        client.status(other)
    info = _running(state)
    if shape == "functions" and functions_trace is None:
        functions_trace = str(root.parent / "shared" / "traces"
                              / "azure_functions_2019_sample1000_per_minute.csv")
    slo = (status_.get("spec") or {}).get("slo") or {}
    max_seq_len = int(((status_.get("spec") or {}).get("engine") or {}).get("max_seq_len", 2048))
    if max_prompt_tokens is None:
        max_prompt_tokens = max(1, max_seq_len // 8)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {"function": names[0], "functions": ",".join(names),
            "functions-trace": functions_trace or "", "start-minute": start_minute,
            "minutes": minutes, "shape": shape, "idle-s": idle_s, "spike-s": spike_s,
            "spike-rate": spike_rate, "after-s": after_s, "base-rate": base_rate, "rates": rates,
            "step-s": step_s, "trace": trace, "window-start-s": window_start_s,
            "window-s": window_s, "speedup": speedup, "rate-scale": rate_scale,
            "prompt-tokens": prompt_tokens, "output-tokens": output_tokens,
            "max-prompt-tokens": max_prompt_tokens, "max-output-tokens": max_output_tokens,
            "slo-ttft-ms": slo.get("ttft_ms", 2000.0), "slo-tbt-ms": slo.get("tbt_ms", 200.0),
            "seed": seed, "summary-out": str(out_dir / "slo")}
    cmd = [sys.executable, "-m", "locust", "-f", str(root / "loadtest" / "locustfile.py"),
           "--headless", "-u", "1", "-r", "1", "--host", info.url, "--only-summary",
           "--csv", str(out_dir / "locust"), "--html", str(out_dir / "locust.html"),
           *(x for k, v in args.items() for x in (f"--{k}", str(v)))]
    env = {**os.environ, "FAASCALE_TOKEN": load_or_create_tokens(state.tokens_file).invoke}
    typer.echo(f"locust: {shape} against {name} at {info.url}; reports in {out_dir}/")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_replicas, daemon=True, name="replicas",
                               args=(_client(admin=False), names, out_dir / "slo.replicas.jsonl",
                                     stop))
    watcher.start()
    try:
        rc = subprocess.run(cmd, env=env).returncode
    except FileNotFoundError:
        raise FileNotFoundError("locust is not installed (pip install 'faascale[loadtest]')") from None
    finally:
        if tail_s:
            stop.wait(tail_s)  # the watcher keeps recording meanwhile
        stop.set()
        watcher.join(timeout=10)
    if not (out_dir / "slo.json").exists():
        typer.echo("error: the load test produced no summary (see Locust's output above)", err=True)
        raise typer.Exit(2)
    sys.path.insert(0, str(root))
    from loadtest.report import write_report

    report = write_report(out_dir / "slo", f"{name}: {shape}")
    typer.echo(report.read_text())
    typer.echo(f"report: {report}; Locust: {out_dir / 'locust.html'}, {out_dir}/locust_stats.csv")
    raise typer.Exit(rc)


REPLICA_POLL_S = 0.5


def full_replicas(running: int, pipecast: dict[str, Any] | None) -> int:
    """Serving replicas that hold every block: those serving through a temporary pipeline
    (PipeCast members still short of blocks, routed through a pipeline) are not counted."""
    if not pipecast:
        return running
    need = pipecast.get("blocks_needed", 0)
    partial = sum(1 for m in (pipecast.get("members") or {}).values()
                  if m.get("blocks", 0) < need and m.get("route") == "pipeline")
    return max(0, running - partial)


def _watch_replicas(client: Any, names: list[str], path: Path, stop: Any) -> None:
    """Until ``stop`` is set: every REPLICA_POLL_S, each function's serving and starting
    replicas, one JSON line each (``epoch_s``, ``function``, ``running``, ``starting``, ``full``:
    serving with the whole model, ``full_replicas``). A failed
    poll is a gap in the record, never the end of the test."""
    import json
    import time

    with path.open("w") as f:
        while not stop.is_set():
            t = time.time()
            for n in names:
                try:
                    status = client.status(n)
                except Exception:  # noqa: BLE001 - the platform may be busy: keep going
                    continue
                r = status["replicas"]
                f.write(json.dumps({"epoch_s": t, "function": n, "running": r["running"],
                                    "starting": r["starting"],
                                    "full": full_replicas(r["running"], status.get("pipecast"))})
                        + "\n")
            f.flush()
            stop.wait(max(0.0, REPLICA_POLL_S - (time.time() - t)))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
