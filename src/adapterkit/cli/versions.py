"""`adapterkit versions | promote | rollback | rm`: the versions of a stored adapter (store.py; main.py
registers them), what the bare name resolves to, and removing a name or one version."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import STORE_OPT, fail, metrics_cell, open_store, out, print_listing
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
        metrics = metrics_cell(r["metrics"])
        table.append([("* " if r["promoted"] else "  ") + r["ref"], r.get("summary") or r["method"], metrics,
                      r["created"]])
    print_listing(("version", "adapter", "metrics", "created"), [[escape(c) for c in row] for row in table])


def rm_cmd(ref: str = typer.Argument(..., help="NAME (every version) or NAME@vN (one version that is not the "
                                     "promoted one)."),
           missing_ok: bool = typer.Option(False, "--missing-ok", help="A name the store does not hold is not an "
                                           "error (scripts that start a name's history afresh)."),
           store: Optional[Path] = STORE_OPT) -> None:
    """Remove a stored adapter with all its versions, or one version. Its catalog rows go in one commit,
    then its folders; a server answers the next request for it with a 404."""
    from ..errors import AdapterNotFoundError
    from ..store import parse_ref

    try:
        st = open_store(store)
        name, version = parse_ref(ref)
        try:
            gone = [v["ref"] for v in st.versions(name) if version is None or v["version"] == version] or [ref]
        except AdapterNotFoundError:               # a name stored before versions existed: remove() knows it
            gone = [ref]
        try:
            st.remove(ref)
        except AdapterNotFoundError:
            if not missing_ok:
                raise
            out.print(f"{ref}: not in the store, nothing to remove", highlight=False)
            return
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"removed {', '.join(gone)}", highlight=False)


def promote_cmd(ref: str = typer.Argument(..., help="NAME@vN: the version NAME should resolve to."),
                max_nfr: Optional[float] = typer.Option(None, "--max-nfr", help="Refuse if the update's negative "
                                                        "flip rate (from `adapterkit compare NAME NAME@vN`) is "
                                                        "above this (default: the store's gate, `adapterkit gate`)."),
                min_gain: Optional[float] = typer.Option(None, "--min-gain", help="Refuse if its accuracy gain is "
                                                         "below this."),
                force: bool = typer.Option(False, "--force", help="Promote without the gate."),
                store: Optional[Path] = STORE_OPT) -> None:
    """Make NAME resolve to NAME@vN, in one commit: servers and routers see it at their next request
    (requests in flight finish on the version they started with). With a gate (--max-nfr / --min-gain,
    or the store's), the version's comparison with the promoted one must pass it."""
    from ..store import parse_ref

    try:
        name, version = parse_ref(ref)
        st = open_store(store)
        gate = ({"max_nfr": max_nfr, "min_gain": min_gain} if max_nfr is not None or min_gain is not None
                else st.setting("promotion_gate"))
        if gate and not force and version is not None:
            _check_gate(st, name, version, gate)
        before = st.promote(ref)
    except AdapterkitError as exc:
        fail(exc)
    what = "already was" if before == version else f"was v{before}"
    out.print(f"{name} -> {name}@v{version} ({what}; `adapterkit rollback {name}` goes back)", highlight=False)


def _check_gate(st, name: str, version: int, gate: dict) -> None:
    from ..train.compare import gate_problems

    ref = f"{name}@v{version}"
    row = next((v for v in st.versions(name) if v["version"] == version), None)
    if row is None:
        st.path(ref)                                   # the store's error for an unknown version
    current = f"{name}@v{st.show(name)['version']}"
    numbers = row["compare"]
    if numbers is None:
        raise AdapterkitError(f"{ref} has no comparison to gate its promotion on: run `adapterkit compare {name} {ref} "
                              "--task T` (or --file F) first, or promote with --force")
    if numbers.get("old_ref") != current:
        raise AdapterkitError(f"{ref} was compared with {numbers.get('old_ref')}, but {name!r} now resolves to "
                              f"{current}: run `adapterkit compare {name} {ref} ...` again, or promote with --force")
    problems = gate_problems(numbers, gate.get("max_nfr"), gate.get("min_gain"))
    if problems:
        raise AdapterkitError(f"the gate refuses {ref}: " + "; ".join(problems) + f" (compared with {current} on "
                              f"{numbers['n']} rows); fix the update (retrain it on more or better data), or "
                              "promote with --force")


def gate_cmd(max_nfr: Optional[float] = typer.Option(None, "--max-nfr", help="Largest negative flip rate a "
                                                     "promotion may bring."),
             min_gain: Optional[float] = typer.Option(None, "--min-gain", help="Smallest accuracy gain."),
             clear: bool = typer.Option(False, "--clear", help="No default gate."),
             store: Optional[Path] = STORE_OPT) -> None:
    """Show or set the store's default promotion gate (`promote` applies it unless given its own flags)."""
    st = open_store(store)
    if clear:
        st.set_setting("promotion_gate", None)
    elif max_nfr is not None or min_gain is not None:
        st.set_setting("promotion_gate", {"max_nfr": max_nfr, "min_gain": min_gain})
    gate = st.setting("promotion_gate")
    out.print("no default promotion gate" if not gate else
              f"promotion gate: negative flip rate <= {gate['max_nfr']}, gain >= {gate['min_gain']}", highlight=False)


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
