"""``python -m faascale.cli``: the ``faascale`` command."""

from faascale.cli import app

app()
