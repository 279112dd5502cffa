"""Deployed functions: ``deploy``, ``ls``, ``status``, ``invoke``, ``scale``, ``delete``, ``logs``."""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from faascale.cli.common import friendly_errors, platform_client, state_dir


@friendly_errors
def deploy(path: str = typer.Argument(..., help="a function directory (function.yaml)")) -> None:
    """Validate a function, pack its model into the object store (once), and deploy it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from faascale.engine.sources import resolve_packed
    from faascale.platform.spec import load_function_spec

    spec = load_function_spec(path)
    client = platform_client()
    # Pack locally first (a progress bar for what can take a while); the platform reuses this
    # packing and uploads it to its object store. s3:// sources are already packed.
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} blocks"), TimeElapsedColumn(), transient=True) as progress:
        if not spec.model.source.startswith("s3://"):
            task = progress.add_task(f"packing {spec.name}", total=spec.model.blocks)
            resolve_packed(spec.resolved_source(), dtype=spec.model.dtype,
                           num_blocks=spec.model.blocks, seed=spec.model.seed,
                           cache_dir=state_dir().models,
                           progress=lambda done, total: progress.update(task, completed=done,
                                                                        total=total))
    status = client.deploy(spec.to_document(), spec.base_dir)
    typer.echo(f"deployed {status['name']} (model {status['model_id']}, replicas "
               f"{status['replicas']['min']}..{status['replicas']['max']})")
    typer.echo(f"  invoke: faascale invoke {status['name']} \"Hello\"")


@friendly_errors
def ls_() -> None:
    """List deployed functions and their replicas."""
    from rich.console import Console
    from rich.table import Table

    table = Table("function", "status", "running", "starting", "min..max", "model")
    for f in platform_client().list():
        r = f["replicas"]
        table.add_row(f["name"], f["status"], str(r["running"]), str(r["starting"]),
                      f"{r['min']}..{r['max']}", f["model_id"])
    Console().print(table)


@friendly_errors
def status(name: str) -> None:
    """A function's replicas, recent scale events and cold starts."""
    import time

    from rich.console import Console

    s = platform_client().status(name)
    r = s["replicas"]
    con = Console()
    con.print(f"[bold]{s['name']}[/bold]  {s['status']}  model {s['model_id']}")
    unbound = "not bound (deployed before digests were recorded; redeploy to bind)"
    con.print(f"manifest: {s.get('manifest_digest') or unbound}")
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
        from faascale.coldstart.start_source import ColdStartEstimate, choose_source

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


@friendly_errors
def invoke(name: str, prompt: str,
           max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
           temperature: float = typer.Option(0.7, "--temperature", "-t"),
           chat: bool = typer.Option(True, "--chat/--no-chat", help="send as a chat message"),
           stream: bool = typer.Option(False, "--stream")) -> None:
    """Invoke a deployed function through the gateway."""
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    client = platform_client(admin=False)
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


@friendly_errors
def scale(name: str, min_replicas: Optional[int] = typer.Option(None, "--min"),
          max_replicas: Optional[int] = typer.Option(None, "--max")) -> None:
    """Change a function's replica bounds."""
    if min_replicas is None and max_replicas is None:
        typer.echo("error: give --min and/or --max", err=True)
        raise typer.Exit(2)
    s = platform_client().scale(name, min_replicas, max_replicas)
    typer.echo(f"{name}: replicas {s['replicas']['min']}..{s['replicas']['max']}")


@friendly_errors
def delete(name: str) -> None:
    """Delete a function (its replicas stop; its packed model stays in the object store)."""
    platform_client().delete(name)
    typer.echo(f"deleted {name}")


@friendly_errors
def logs(name: str, tail: int = typer.Option(100, "--tail")) -> None:
    """The last lines of a function's replica logs."""
    for line in platform_client().logs(name, tail):
        typer.echo(line)
