"""``faascale loadtest``: headless Locust against a running platform, the function's replicas
recorded over the test, and the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from faascale.cli.common import friendly_errors, platform_client, state_dir


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


def _loadtest_dir() -> Path:
    """The source checkout's ``loadtest/`` (Locust files are not part of the installed package)."""
    import faascale

    root = Path(faascale.__file__).resolve().parents[1]
    if not (root / "loadtest" / "locustfile.py").is_file():
        raise FileNotFoundError(f"{root / 'loadtest'}: no locustfile; run from a source checkout")
    return root


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
    state = state_dir()
    client = platform_client(admin=False)
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
                               args=(platform_client(admin=False), names, out_dir / "slo.replicas.jsonl",
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
