"""What every CLI module shares: the consoles, the error exit, the --store option and the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()
err = Console(stderr=True)


def print_record(record: dict, as_json: bool) -> None:
    """One object: a JSON line, or a two-column field/value table."""
    if as_json:
        print(json.dumps(record))
        return
    table = Table("field", "value", show_header=False)
    for key, value in record.items():
        table.add_row(escape(key), escape(json.dumps(value) if isinstance(value, (list, dict)) else str(value)))
    out.print(table)


def fail(exc: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)   # "['a1']" stays
    raise typer.Exit(code)


def open_store(path: Optional[Path]):
    from .store import AdapterStore

    return AdapterStore(path)


STORE_OPT = typer.Option(None, "--store", help="Store folder (default $ADAPTERKIT_HOME/store).")
