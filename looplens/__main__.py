"""``python -m looplens`` = the ``looplens`` command."""

from looplens.cli import app

app()
