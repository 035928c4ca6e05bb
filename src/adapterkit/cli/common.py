"""What every CLI module shares: the consoles, the error exit, the --store option, the store, listing
tables and ADAPTER arguments (a folder or a stored name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from ..core.base import DEVICE_HELP, DTYPE_HELP

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


def device_dtype(device: Optional[str], dtype: Optional[str]):
    """(torch.device, torch.dtype) of --device and --dtype; ConfigError for an unknown or absent one."""
    from ..core.base import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def fail(exc: Exception, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)   # "['a1']" stays
    raise typer.Exit(code)


def open_store(path: Optional[Path]):
    from ..store import AdapterStore

    return AdapterStore(path)


STORE_OPT = typer.Option(None, "--store", help="Store folder (default $ADAPTERKIT_HOME/store).")
DEVICE_OPT = typer.Option(None, "--device", envvar="ADAPTERKIT_DEVICE", help=f"Where the base runs: {DEVICE_HELP}.")
DTYPE_OPT = typer.Option(None, "--dtype", envvar="ADAPTERKIT_DTYPE", help=f"The base's weights: {DTYPE_HELP}.")
ADAPTER_HELP = "an adapter folder (ours or PEFT's) or the name of a stored adapter (see --store)"

_MIN_CELL = 8           # a long listing column gets at least this many characters, or is left out
_SHORT = 10             # a column whose cells and header all fit in this many is never wrapped


def metrics_cell(metrics: dict) -> str:
    """"accuracy=0.9312, n=486": a catalog row's metrics in one table cell."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def print_listing(headers: Sequence[str], rows: Sequence[Sequence[str]], keep: Sequence[str] = ()) -> None:
    """A table whose first column is the key users type (a name): it is never cut; short columns stay
    whole and long ones fold rather than end in "…". When the terminal is too narrow for every column,
    the columns that would get under _MIN_CELL characters are left out (except `keep`) and named on
    stderr, instead of squeezing every column to a few letters. Cells are rich markup (escape names)."""
    width = out.width
    natural = [max([len(h), *(Text.from_markup(r[i]).cell_len for r in rows)]) for i, h in enumerate(headers)]
    need = [(n if n <= _SHORT else _MIN_CELL) + 3 for n in natural]       # + padding and border
    budget = width - 1 - (natural[0] + 3) - sum(need[i] for i, h in enumerate(headers) if i and h in keep)
    shown, hidden = [], []
    for i, h in enumerate(headers[1:], 1):
        if h in keep or need[i] <= budget:
            shown.append(i)
            budget -= 0 if h in keep else need[i]
        else:
            hidden.append(h)
    room = width - 1 - sum(need[i] for i in shown) - 3                     # for the key column's text
    key = (Column(headers[0], no_wrap=True) if natural[0] <= room else     # a name wider than that folds
           Column(headers[0], overflow="fold", width=max(room, _MIN_CELL)))
    table = Table(key, *(Column(headers[i], no_wrap=True) if natural[i] <= _SHORT else
                         Column(headers[i], overflow="fold") for i in shown))
    for r in rows:
        table.add_row(r[0], *(r[i] for i in shown))
    out.print(table)
    if hidden:
        out.file.flush()
        err.print(f"({', '.join(hidden)} left out at {width} columns: widen the terminal, or use --json)",
                  highlight=False, soft_wrap=True)


def adapter_source(ref: str, store: Optional[Path]) -> tuple[Path, Optional[str]]:
    """Where an ADAPTER argument lives: (folder, None) for an existing folder, else (its folder in the
    store, name) for a stored adapter; a clear error naming both possibilities otherwise. Loads no
    model, so a command checks every argument before the (slow) base; creates no store."""
    from ..core.base import adapterkit_home
    from ..errors import AdapterkitError, AdapterNameError, AdapterNotFoundError

    path = Path(ref).expanduser()
    if path.is_dir():
        return path, None
    root = Path(store) if store is not None else adapterkit_home() / "store"
    from ..store import parse_ref

    try:
        parse_ref(ref)                                  # NAME or NAME@vN
    except AdapterNameError:
        reason = "not a valid adapter name"
    else:
        if not root.is_dir():
            reason = f"there is no store at {root}"
        else:
            try:
                return open_store(root).path(ref), ref
            except AdapterkitError as exc:
                reason = str(exc)
    why = "is not a folder" if path.exists() else "does not exist"
    raise AdapterNotFoundError(f"adapter {ref!r} is neither an adapter folder ({path} {why}) nor a stored adapter "
                               f"({reason}); "
                               "give an existing adapter folder or the name of a stored adapter (`adapterkit ls` "
                               "lists them; --store picks the store)")


def load_adapter(ref: str, store: Optional[Path], seen: Optional[dict] = None):
    """The Adapter an ADAPTER argument names (a stored one is checked against the catalog). `seen`
    ({folder: Adapter}) reads each folder once, and refuses two folders that hold one adapter name."""
    from ..core.adapter import Adapter
    from ..errors import AdapterNameError

    path, name = adapter_source(ref, store)
    key = path.resolve()
    if seen is not None and key in seen:
        return seen[key]
    adapter = Adapter.load(path) if name is None else open_store(store).get(name)
    if seen is not None:
        other = next((p for p, a in seen.items() if a.name == adapter.name), None)
        if other is not None:
            where = "" if str(path) == ref else f" ({path})"
            raise AdapterNameError(f"adapter {ref!r}{where} and the one in {other} are both named "
                                   f"{adapter.name!r}; one run attaches each name once: pass only one of them, "
                                   "or save one under another name")
        seen[key] = adapter
    return adapter
