"""The `adapterkit` command: one typer module per command group (main.py holds the app and the small
commands; train.py, merge.py, route.py, serve.py the groups), common.py what they share."""

from .main import app

__all__ = ["app"]
