"""`adapterkit versions | promote | rollback`: the versions of a stored adapter (store.py; main.py registers
them) and what the bare name resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import STORE_OPT, fail, open_store, out, print_listing
from ..errors import AdapterkitError


def versions_cmd(name: str = typer.Argument(..., help="A stored adapter's name."),
                 store: Optional[Path] = STORE_OPT,
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the versions of a stored adapter; * marks the promoted one, which NAME resolves to."""
    import json

    try:
        rows = open_store(store).versions(name)
    except AdapterkitError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows))
        return
    table = []
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        table.append([("* " if r["promoted"] else "  ") + r["ref"], r.get("summary") or r["method"], metrics,
                      r["created"]])
    print_listing(("version", "adapter", "metrics", "created"), [[escape(c) for c in row] for row in table])


def promote_cmd(ref: str = typer.Argument(..., help="NAME@vN: the version NAME should resolve to."),
                store: Optional[Path] = STORE_OPT) -> None:
    """Make NAME resolve to NAME@vN, in one commit: servers and routers see it at their next request
    (requests in flight finish on the version they started with)."""
    from ..store import parse_ref

    try:
        name, version = parse_ref(ref)
        before = open_store(store).promote(ref)
    except AdapterkitError as exc:
        fail(exc)
    what = "already was" if before == version else f"was v{before}"
    out.print(f"{name} -> {name}@v{version} ({what}; `adapterkit rollback {name}` goes back)", highlight=False)


def rollback_cmd(name: str = typer.Argument(..., help="A stored adapter's name."),
                 store: Optional[Path] = STORE_OPT) -> None:
    """Promote again the version NAME resolved to before its last promotion."""
    try:
        version = open_store(store).rollback(name)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"{name} -> {name}@v{version}", highlight=False)


def stored_line(st, name: str) -> str:
    """What the last put of `name` made, for train / merge / quantize: 'x@v2 (not promoted: ...)'."""
    latest = st.versions(name)[-1]
    if latest["promoted"]:
        return latest["ref"]
    return (f"{latest['ref']} (not promoted: {name!r} still resolves to its promoted version; "
            f"`adapterkit promote {latest['ref']}` switches it, `adapterkit versions {name}` lists them)")
