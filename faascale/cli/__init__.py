"""The ``faascale`` command line (typer): the commands, assembled from one module per group.
Heavy imports happen inside commands, so ``--help`` is instant.

Every expected failure (bad spec, bad source, corrupt block, bad sampling parameter, a platform
already running) prints one ``error: ...`` line on stderr and exits with status 2; never a
traceback (``common.friendly_errors``).
"""

from __future__ import annotations

import typer

from faascale.cli import coldstart, functions, loadtest, models, platform_cmds

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="faascale: a serverless LLM platform with fast scaling.")
app.command()(models.pack)
app.command("export-hf")(models.export_hf)
app.command()(models.generate)
app.command()(platform_cmds.up)
app.command()(platform_cmds.down)
app.command()(functions.deploy)
app.command("ls")(functions.ls_)
app.command()(functions.status)
app.command()(functions.invoke)
app.command()(functions.scale)
app.command()(functions.delete)
app.command()(functions.logs)
app.command()(platform_cmds.token)
app.add_typer(coldstart.app, name="coldstart")
app.command()(loadtest.loadtest)
