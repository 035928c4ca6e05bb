"""`adapterkit route fit|eval|ls|default`: registered in cli.py with app.add_typer(route_app, name="route")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import STORE_OPT, fail, open_store, out, print_listing
from ..errors import AdapterkitError

route_app = typer.Typer(help="Routers: choose adapters from the prompt itself (the server's model=\"auto\").",
                        no_args_is_help=True)


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


@route_app.command("fit")
def route_fit(
    adapters: str = typer.Option(..., "--adapters", help="Comma-separated stored adapter names."),
    name: str = typer.Option(..., "--name", help="Name of the router in the store."),
    kind: str = typer.Option("retrieval", help="retrieval (training-free, per prompt), linear (logistic regression "
                             "on the encoder's embedding + character n-grams, per prompt, fitted in seconds) or gate "
                             "(learned, per token)."),
    base: Optional[str] = typer.Option(None, help="The adapters' base (default: the base the store records)."),
    encoder: Optional[str] = typer.Option(None, help="retrieval: a sentence encoder (built-in name or folder; "
                                          "default MiniLM-L6: more accurate and 7x faster than the base on the 4-task "
                                          "benchmark) or 'base' (mean-pooled states of the adapters' base). Adapters "
                                          "of an image base: always the base (its pooled image features)."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="JSONL lines {\"text\", \"adapter\"[, \"label\"]}, "
                                            "added to the examples of adapters trained on an example task; the only "
                                            "examples of adapters trained from files (`adapterkit data export` "
                                            "writes such lines)."),
    n_examples: int = typer.Option(1024, "--n-examples", min=2, help="Examples per adapter from its task's train "
                                   "split (fewer if the split is smaller)."),
    neighbors: int = typer.Option(10, "--neighbors", min=0, help="retrieval: score = mean cosine to the adapter's k "
                                  "nearest examples (0: one centroid descriptor per adapter)."),
    lexical: bool = typer.Option(True, "--lexical/--no-lexical", help="retrieval: also score character n-gram "
                                 "TF-IDF similarity (the prompt's form: @handles, URLs, 'Which ...?'), mixed with a "
                                 "weight chosen on the held-out examples."),
    lexical_weight: Optional[float] = typer.Option(None, "--lexical-weight", help="retrieval: fix the lexical "
                                                   "weight w in (dense + w*lexical)/(1+w) instead of choosing it."),
    n_held: int = typer.Option(64, "--n-held", min=1, help="Calibration examples per adapter (validation split)."),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Adapters active on a row (retrieval) / token (gate)."),
    coverage: float = typer.Option(0.99, help="retrieval: share of in-task prompts that must pass the OOD threshold."),
    fallback: Optional[str] = typer.Option(None, help="retrieval: adapter serving out-of-distribution prompts "
                                           "(default: the base model)."),
    steps: int = typer.Option(100, help="gate: training steps."),
    lr: float = typer.Option(1e-2, help="gate: learning rate."),
    batch_size: int = typer.Option(8, "--batch-size"),
    gate_weight: float = typer.Option(1.0, "--gate-weight", help="gate: weight of the gate cross-entropy."),
    max_length: int = typer.Option(128, "--max-length"),
    default: bool = typer.Option(False, "--default", help="Make it the store's default router (model=\"auto\")."),
    store: Optional[Path] = STORE_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a router of the same name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit a router over stored adapters of one base and store it with its lineage.

    \b
      adapterkit route fit --adapters sent,topic,chat --name r1            # retrieval
      adapterkit route fit --adapters sent,topic --name g1 --kind gate --steps 200
    """
    from ..route.api import fit_router
    from ..route.common import default_router

    try:
        st = open_store(store)
        router = fit_router(st, _names(adapters), name, kind=kind, base=base, encoder=encoder, examples_file=examples,
                            n_examples=n_examples, n_held=n_held, top_k=top_k, neighbors=neighbors, coverage=coverage, fallback=fallback,
                            lexical=lexical, lexical_weight=lexical_weight,
                            steps=steps, lr=lr, batch_size=batch_size, gate_weight=gate_weight,
                            max_length=max_length, overwrite=overwrite, make_default=default)
        is_default = default_router(st) == name
    except AdapterkitError as exc:
        fail(exc)
    meta = router.to_meta()
    if as_json:
        print(json.dumps({**meta, "default": is_default, "store": str(st.root)}))
        return
    if router.kind in ("retrieval", "linear"):
        cal = meta["calibration"]
        extra = (f"lexical weight {router.lexical_weight:g}" if router.kind == "retrieval" else
                 f"L2 {router.l2:g}" + ("" if router.lexical is not None else ", no lexical channel"))
        out.print(f"stored {router.kind} router [bold]{name}[/] over {', '.join(router.names)} in {st.root}: held-out "
                  f"routing accuracy {cal['accuracy']:.3f}, coverage {cal['coverage']:.3f} (target "
                  f"{cal['coverage_target']}), temperature {router.temperature:.4g}, OOD threshold "
                  f"{router.threshold:.3f}, ECE {cal['ece']:.3f}, {extra}" + (" (default)" if is_default else ""),
                  highlight=False)
    else:
        final = meta["training"].get("final", {})
        out.print(f"stored gate router [bold]{name}[/] over {', '.join(router.names)} ({len(router.layers)} layers, "
                  f"top-{router.top_k}) in {st.root}: gate loss {final.get('gate_loss', float('nan')):.4f}, gate "
                  f"accuracy {final.get('gate_accuracy', float('nan')):.3f}" + (" (default)" if is_default else ""),
                  highlight=False)


@route_app.command("eval")
def route_eval(
    name: str = typer.Argument(..., help="Router name ('auto': the default router)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated example tasks (a mixed stream)."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL lines {\"text\", \"adapter\"[, \"label\"]}."),
    split: str = typer.Option("test"),
    n: int = typer.Option(200, help="Prompts per task."),
    base: Optional[str] = typer.Option(None),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Confusion-matrix PNG (default: beside the router, "
                                        "if matplotlib is installed)."),
    store: Optional[Path] = STORE_OPT,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Routing accuracy, confusion matrix (table + PNG) and end-to-end accuracy vs the oracle adapter."""
    from ..route.api import eval_router
    from ..route.common import read_router, router_path
    from ..route.evaluate import check_plot_path, plot_available, plot_confusion

    try:
        st = open_store(store)
        meta, _ = read_router(st, name)
        png = plot if plot is not None or not plot_available() else router_path(st, meta["name"]) / "confusion.png"
        if png is not None:
            check_plot_path(png)                         # before the long work, not after it
        report = eval_router(st, name, tasks=_names(tasks) if tasks else None, file=file, split=split, n=n, base=base)
    except AdapterkitError as exc:
        fail(exc)
    plot_error = None
    if png is not None:
        try:
            png = plot_confusion(report, png)
        except AdapterkitError as exc:                   # print the results first, then the error
            png, plot_error = None, exc
    if as_json:
        print(json.dumps({**report.to_dict(), "plot": str(png) if png else None}))
    else:
        _print_report(report, png, plot_error)
    if plot_error is not None:
        fail(plot_error)


def _print_report(report, png: Optional[Path], plot_error: Optional[Exception]) -> None:
    table = Table("oracle \\ routed", *report.columns, "accuracy", title=f"router {report.router} ({report.kind}): "
                  f"{report.n} prompts")
    for label, row in zip(report.labels, report.confusion):
        table.add_row(label, *map(str, row), f"{report.per_adapter_accuracy[label]:.3f}")
    out.print(table)
    line = (f"routing accuracy {report.routing_accuracy:.3f}, fallback {report.fallback_rate:.3f}, "
            f"routing {report.route_ms_per_prompt:.1f} ms/prompt")
    e2e = report.end_to_end
    if e2e:
        line += (f"; end-to-end accuracy auto {e2e['auto']:.3f} vs oracle {e2e['oracle']:.3f} "
                 f"({'n/a' if e2e['ratio'] is None else format(e2e['ratio'], '.3f')} of the oracle)")
    if png is not None:
        line += f"; plot: {png}"
    elif plot_error is not None:
        line += "; plot not written (see the error below)"
    else:
        line += "; no plot (pip install matplotlib to save the confusion matrix as a PNG)"
    out.print(line, highlight=False)


@route_app.command("ls")
def route_ls(store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """The routers in the store."""
    from ..route.common import default_router, list_routers, read_router

    st = open_store(store)
    rows = []
    for name in list_routers(st):
        try:
            meta, _ = read_router(st, name)
        except AdapterkitError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        rows.append({"name": name, "kind": meta["kind"], "adapters": [r["name"] for r in meta["adapters"]],
                     "default": name == default_router(st), "created": meta.get("created", "")})
    if as_json:
        print(json.dumps(rows))
        return
    print_listing(("name", "kind", "adapters", "default", "created"),
                  [[r["name"], r.get("kind", f"[red]{escape(r.get('error', ''))}[/]"),
                    ", ".join(r.get("adapters", [])), "yes" if r.get("default") else "", r.get("created", "")]
                   for r in rows], keep=("kind",))


@route_app.command("default")
def route_default(name: str, store: Optional[Path] = STORE_OPT) -> None:
    """Make NAME the router that model="auto" uses."""
    from ..route.common import set_default_router

    try:
        st = open_store(store)
        set_default_router(st, name)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"default router: {name}")
