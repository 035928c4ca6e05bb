"""`adapterkit merge RECIPE --name NAME`: registered in cli.py with app.command("merge")(merge_cmd)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import STORE_OPT, fail, open_store, out
from ..errors import AdapterkitError


def merge_cmd(
    recipe: Path = typer.Argument(..., help="YAML merge recipe (see the example below)."),
    name: str = typer.Option(..., "--name", help="Name of the merged adapter in the store "
                             "(reversible: the basis adapters are NAME.basis0, NAME.basis1, ...)."),
    store: Optional[Path] = STORE_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter of the same name."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the per-site table (rank, error)."),
    head_from: Optional[str] = typer.Option(None, "--head-from", help="Give the merged adapter this adapter's "
                                            "classification head (and task, labels): a folder or a stored name."),
) -> None:
    """Merge adapters of one base into a new stored adapter, from a YAML recipe.

    \b
    Merges use each site's full ΔW = scale·B·A, never A and B apart; inputs
    may differ in rank, alpha and target modules (a missing site is zero).
    concat: exact, ranks add. linear, task_arithmetic: exact unless rank.
    ties, magnitude_prune, dare_linear, dare_ties: dense ΔW re-factored by
    SVD to rank (default: the sum of the input ranks). reversible: k basis
    adapters + per-task coefficients. The lineage (inputs, method,
    parameters) is stored; one line sums the merge up (--verbose: the
    per-site re-factorisation error too).

    \b
    Example recipe (merge.yaml):
      method: ties
      inputs:                     # store names or adapter folders
        - adapter: sentiment
          weight: 1.0
        - adapter: ./adapters/topic
          weight: 0.5
          name: topic             # optional: its name in the merge
      parameters:                 # the method's own parameters
        density: 0.3              # ties also: elect_on, mean, majority, lam
      rank: 32                    # output rank
      seed: 0                     # DARE masks, randomized SVD

    \b
      adapterkit merge merge.yaml --name multi --store ./store
      adapterkit merge merge.yaml --name multi --head-from sentiment   # a classifier again
    Reversible: method: reversible, parameters: {k: 2} stores multi.basis0..
    """
    from ..merge.recipe import load_recipe, run_recipe
    from ..merge.reversible import ReversibleMerge

    try:
        st = open_store(store)
        spec = load_recipe(recipe)
        donor = _head_donor(head_from, store, spec.method) if head_from is not None else None
        k = spec.parameters.get("k")
        # at most one basis adapter per input (merge_reversible refuses a larger k, naming it)
        names = ([f"{name}.basis{j}" for j in range(min(k, len(spec.inputs)) if isinstance(k, int) else 0)]
                 if spec.method == "reversible" else [name])
        for n in names:
            st.check_free(n, overwrite)                 # before the (long) merge
        result = run_recipe(spec, name, store=st, base_dir=recipe.parent)
        if isinstance(result, ReversibleMerge):
            for b in result.basis:
                st.put(b, overwrite=overwrite)
            _print_reversible(result, st, as_json)
            return
        adapter, report = result
        if donor is not None:
            _give_head(adapter, donor)
        stored = st.put_version(adapter, overwrite=overwrite)
    except AdapterkitError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({**report.to_dict(), "name": name, "version": stored.version, "promoted": stored.promoted,
                          "path": str(stored.path)}))
        return
    if verbose:
        table = Table("site", "rank", "rel. error", title=f"{name}: {report.method} merge")
        for site, e in report.site_errors.items():
            table.add_row(site, str(report.site_ranks.get(site, "-")), f"{e:.2e}")    # "-": a family without ranks
        out.print(table)
    from .versions import stored_line

    out.print(f"stored [bold]{escape(stored_line(st, name))}[/]: {report.method} merge of "
              f"{escape(', '.join(i['name'] for i in report.inputs))}; {len(report.site_errors)} sites, max rel. error "
              f"{report.max_error:.3e} (total {report.total_error:.3e}); in the store at {escape(str(st.root))} "
              f"({report.seconds:.1f} s)", highlight=False, soft_wrap=True)


def _print_reversible(rev, st, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**rev.to_json(), "store": str(st.root)}))
        return
    title = "reversible merge: per-site fit" if rev.per_site else "reversible merge: coefficients"
    table = Table("task", "rel. error", "row error", *[b.name for b in rev.basis], title=title)
    for i, t in enumerate(rev.tasks):
        name = t["name"]
        table.add_row(name, f"{rev.errors[name]:.2e}", f"{rev.row_errors.get(name, rev.errors[name]):.2e}",
                      *[f"{c:.4f}" for c in rev.coefficients[i].tolist()])
    out.print(table)
    how = ("recover(ReversibleMerge.from_store(store, name), task) rebuilds a task exactly as fitted ('rel. error', "
           "each site with its own coefficients); the weighted row {basis: coefficient} shown is the best single "
           "row for all sites ('row error')" if rev.per_site else
           "a task is the weighted row {basis: coefficient} of these adapters, or "
           "recover(ReversibleMerge.from_store(store, name), task)")
    out.print(f"stored {', '.join(b.name for b in rev.basis)} in {st.root}; {how}", highlight=False)


def _head_donor(ref: str, store: Optional[Path], method: str):
    """The adapter whose head --head-from names, checked before the merge."""
    from .common import load_adapter
    from ..errors import ConfigError
    from ..core.heads import ClassificationHead

    if method == "reversible":
        raise ConfigError("--head-from gives ONE head to one merged adapter; a reversible merge stores basis "
                          "adapters that serve every task: attach each task's head when evaluating instead")
    donor = load_adapter(ref, store)
    if not isinstance(donor.head, ClassificationHead):
        raise ConfigError(f"--head-from {ref!r}: adapter {donor.name!r} has no classification head to give")
    return donor


def _give_head(adapter, donor) -> None:
    """The merged adapter classifies as `donor` did: its head, task and labels, recorded in the lineage."""
    from ..core.adapter import check_same_base
    from ..merge.common import content_fingerprint

    check_same_base([adapter, donor], "give a head across adapters", "take the head of an adapter of the same base")
    adapter.head = donor.head
    adapter.meta.task, adapter.meta.labels = donor.meta.task, list(donor.head.labels)
    adapter.meta.lineage[-1].setdefault("params", {})["head_from"] = {
        "name": donor.name, "fingerprint": content_fingerprint(donor)}
