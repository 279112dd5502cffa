"""``faascale coldstart``: where a start's time goes (``parse-vllm``, ``profile``, ``profiles``,
``predict``, ``profile-vllm``)."""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from faascale.cli.common import friendly_errors, platform_client

app = typer.Typer(no_args_is_help=True, help="Cold starts: where a start's time goes.")


@app.command("parse-vllm")
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
    facts = [f"platform {r.platform}" if r.platform else "",
             f"compile cache {r.compile_cache}" if r.compile_cache else "", *r.flags]
    if any(facts):
        con.print(", ".join(f for f in facts if f))
    for note in r.notes:
        con.print(f"note: {note}")


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


@app.command("profile")
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
        client = platform_client()
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


@app.command("profiles")
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

    client = platform_client(admin=False)
    names = [name] if name else [f["name"] for f in client.list()]
    out = {n: client.startups(n, last) for n in names}
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    # one row per start, 16 columns: wide enough not to cut them when piped (rich's default: 80)
    con = Console() if sys.stdout.isatty() else Console(width=220)
    for n, data in out.items():
        profiles = [StartupProfile.from_dict(p) for p in data["profiles"]]
        table = Table(title=f"{n}: last {len(profiles)} start(s)")
        steps = [s for s in START_STEPS if any(s in p.steps() for p in profiles)]
        for col in ("at", "replica", "source", "device", "runtime", "total s", "fixed s", *steps):
            table.add_column(col, justify="left" if col in ("at", "replica", "source", "device",
                                                            "runtime") else "right")
        for p in profiles:
            st = p.steps()
            table.add_row(time.strftime("%H:%M:%S", time.localtime(p.started_at_s)),
                          p.replica[-16:], p.source if p.ok else f"failed: {p.error}"[:40],
                          p.device or "-", "warm" if p.warm else "cold", f"{p.total_s:.2f}", f"{p.fixed_s:.2f}",
                          *(f"{st[s]:.3f}" if s in st else "-" for s in steps))
        con.print(table)
        if profiles:
            con.print(_steps_table(f"{n}: per step", summarize(profiles)))


@app.command("predict")
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


@app.command("profile-vllm")
@friendly_errors
def profile_vllm(model_dir: str = typer.Argument(..., help="a Hugging Face model folder "
                                                 "(config.json, *.safetensors, tokenizer)"),
                 runs: int = typer.Option(3, "--runs", min=1, max=100),
                 out: str = typer.Option(..., "--out", help="data folder to add the runs to "
                                         "(models.csv, startup_runs.csv, logs/)"),
                 enforce_eager: bool = typer.Option(False, "--enforce-eager",
                                                    help="start vLLM without torch.compile"),
                 python: Optional[str] = typer.Option(None, "--python", help="vLLM's python "
                                                      "(default: $FAASCALE_VLLM_PYTHON, else "
                                                      ".venv-vllm/bin/python)"),
                 port: int = typer.Option(0, "--port", help="0: a free port per start"),
                 timeout_s: float = typer.Option(600.0, "--timeout-s", min=1.0,
                                                 help="deadline of one start"),
                 dtype: str = typer.Option("float32", "--dtype"),
                 max_model_len: int = typer.Option(2048, "--max-model-len"),
                 scenario: Optional[str] = typer.Option(None, "--scenario", help="default: "
                                                        "HOST_eager or HOST_compiled (+ _disk)"),
                 model_name: Optional[str] = typer.Option(None, "--model-name", help="the model "
                                                          "key (default: MODEL_DIR's name)"),
                 from_disk: bool = typer.Option(False, "--from-disk", help="drop the model "
                                                "folder's pages from the page cache before each "
                                                "start (labelled weights_source disk)")) -> None:
    """Real vLLM API-server starts of MODEL_DIR, each log parsed into the six startup steps and
    added to OUT in the *Breaking the Ice* data format (``coldstart predict --data OUT``)."""
    from faascale.coldstart.profile import machine_facts
    from faascale.coldstart.vllm_profile import ProfileRequest, profile_vllm
    from faascale.coldstart.vllm_run import VllmRunError, resolve_python

    try:
        interpreter = resolve_python(python)
        req = ProfileRequest(model_dir=str(model_dir), out=out, python=str(interpreter), runs=runs,
                             enforce_eager=enforce_eager,
                             weights_source="disk" if from_disk else "pagecache",
                             scenario=scenario, model_name=model_name, dtype=dtype,
                             max_model_len=max_model_len, port=port, timeout_s=timeout_s)
        result = profile_vllm(req, machine_facts(), echo=lambda s: typer.echo(s, err=True),
                              report=typer.echo,
                              on_step=lambda s: typer.echo(f"  … {s}", err=True))
        if result.failure is not None:
            raise VllmRunError(result.failure)
    except VllmRunError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
