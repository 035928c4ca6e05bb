"""The `adapterkit` command: a thin typer map onto library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import STORE_OPT, err, fail, open_store, out, print_record
from .cli_merge import merge_cmd
from .cli_route import route_app
from .cli_serve import serve_cmd
from .cli_train import eval_cmd, train_cmd
from .errors import AdapterkitError

app = typer.Typer(help="Task-specific adapters over one frozen base model.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
base_app = typer.Typer(help="Built-in and local base models.", no_args_is_help=True)
adapter_app = typer.Typer(help="Create, inspect and export adapters.", no_args_is_help=True)
app.add_typer(base_app, name="base")
data_app = typer.Typer(help="Example tasks read offline from pip-packaged corpora.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
app.add_typer(data_app, name="data")
app.command("train")(train_cmd)
app.command("eval")(eval_cmd)
app.command("merge")(merge_cmd)
app.command("serve")(serve_cmd)
app.add_typer(route_app, name="route")
@base_app.command("list")
def base_list() -> None:
    """List the built-in bases and whether their packages are installed."""
    from .base import list_bases

    table = Table("name", "kind", "installed", "ready", "description", "install")
    for row in list_bases():
        table.add_row(row["name"], row["kind"], "yes" if row["installed"] else "no",
                      "yes" if row["ready"] else "no", row["description"], row["install"])
    out.print(table)


@base_app.command("pull")
def base_pull(name: str) -> None:
    """Make a built-in base ready (converts SmolLM2's GGUF once into the cache)."""
    from .base import pull_base

    try:
        path = pull_base(name)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"{name}: {path}")


@adapter_app.command("inspect")
def adapter_inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Method, rank, targets, parameter count and base of an adapter folder (ours or PEFT's)."""
    from .inspect import describe

    try:
        info = describe(path)
    except AdapterkitError as exc:
        fail(exc)
    print_record(info, as_json)


@adapter_app.command("create")
def adapter_create(
    name: str,
    out_dir: Path = typer.Option(..., "--out", help="Folder to write."),
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", help="Comma-separated module names, or a regex."),
    init: str = typer.Option("default", help="'default' (B = 0, for training) or 'nonzero'."),
    init_std: float = typer.Option(0.02, help="Std of B for init=nonzero."),
    seed: int = typer.Option(0),
) -> None:
    """Create a freshly initialised LoRA adapter for a base and save it (PEFT-loadable)."""
    from .adapter import create_adapter
    from .base import load_base
    from .methods.lora import LoraConfig

    try:
        b = load_base(base)
        target = tuple(t.strip() for t in targets.split(",")) if "," in targets or targets.isidentifier() else targets
        cfg = LoraConfig(r=r, alpha=alpha, target_modules=target, init=init, init_std=init_std)
        adapter = create_adapter(name, b.model, cfg, seed=seed, fingerprint=b.fingerprint, base_name=b.name)
        adapter.save(out_dir)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"wrote {name} ({adapter.num_parameters():,} parameters) to {out_dir}")


@adapter_app.command("export-merged")
def adapter_export_merged(
    adapters: List[Path] = typer.Argument(..., help="Adapter folders to merge in."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged transformers model."),
    base: str = typer.Option("smollm2-135m"),
) -> None:
    """Write a plain transformers model folder: the base with the adapters merged in."""
    from .adapter import Adapter
    from .base import load_base
    from .runtime import AdapterRuntime

    try:
        b = load_base(base)
        rt = AdapterRuntime.from_base(b)
        names = []
        for path in adapters:
            loaded = Adapter.load(path)
            rt.add(loaded)
            names.append(loaded.name)
        rt.export_merged(out_dir, names, tokenizer=b.tokenizer)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"wrote {out_dir}")


def parse_composition(spec: str) -> list[tuple[Path, float]]:
    """'FOLDER=WEIGHT,FOLDER=WEIGHT' -> [(folder, weight)]; a clear error for anything else."""
    parts = []
    for item in spec.split(","):
        path, sep, weight = item.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not path or value is None:
            raise AdapterkitError(f"--compose {spec!r}: each item must be FOLDER=WEIGHT (e.g. ./lang=1.0,./task=0.5), "
                                  f"got {item.strip()!r}")
        parts.append((Path(path), value))
    if len({p for p, _ in parts}) != len(parts):
        raise AdapterkitError(f"--compose {spec!r} names an adapter twice; give each adapter once with its weight")
    return parts


@app.command()
def generate(
    prompt: str,
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    adapter: Optional[List[Path]] = typer.Option(None, "--adapter", help="Adapter folder; repeat for a mixed batch."),
    compose: Optional[List[str]] = typer.Option(None, "--compose", help="One row with several adapters active at "
                                                "once, weighted: 'FOLDER=WEIGHT,FOLDER=WEIGHT' (e.g. a language "
                                                "adapter + a task adapter); repeatable."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Greedy generation; one row per --adapter and per --compose, all in one mixed batch."""
    from .adapter import Adapter
    from .base import load_base
    from .generate import generate as run
    from .runtime import AdapterRuntime

    try:
        b = load_base(base)
        if b.tokenizer is None or b.kind != "causal-lm":
            raise AdapterkitError(f"base {base!r} is not a causal LM with a tokenizer; generate needs one")
        rt = AdapterRuntime.from_base(b)
        loaded: dict[Path, str] = {}

        def attach(path: Path) -> str:            # each folder attached once, however often it is named
            if path not in loaded:
                a = Adapter.load(path)
                rt.add(a)
                loaded[path] = a.name
            return loaded[path]
        rows: list = [attach(path) for path in adapter or []]
        rows += [{attach(path): w for path, w in parse_composition(spec)} for spec in compose or []]
        rows = rows or [None]
        results = run(rt, b.tokenizer, [prompt] * len(rows), rows, max_new_tokens=max_tokens, chat=chat)
    except AdapterkitError as exc:
        fail(exc)
    for res in results:
        if as_json:
            print(json.dumps({"adapter": res.adapter, "text": res.text, "token_ids": res.token_ids}))
        else:
            out.print(f"[bold]{res.adapter or '(base)'}[/]: {res.text}", highlight=False)


@data_app.command("list")
def data_list() -> None:
    """The named example tasks and their split sizes."""
    from .data import list_tasks, load_task

    table = Table("task", "labels", "train", "validation", "test", "source", "licence")
    for name in list_tasks():
        try:
            card = load_task(name).card
        except AdapterkitError as exc:
            table.add_row(name, "", "", "", "", f"[red]{exc}[/]", "")
            continue
        sizes = card["sizes"]
        table.add_row(name, str(len(card["labels"])), str(sizes["train"]), str(sizes["validation"]),
                      str(sizes["test"]), card["source"]["package"], card["licence"].split(" (")[0])
    out.print(table)


@data_app.command("show")
def data_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A task's data card and a few examples."""
    from .data import load_task

    try:
        task = load_task(name)
    except AdapterkitError as exc:
        fail(exc)
    print_record(task.card, as_json)
    if as_json:
        return
    for ex in task.train[:3]:
        out.print(f"[bold]{ex.label}[/]: {ex.text[:160]}", highlight=False)


@app.command("ls")
def ls(store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the adapters in the store."""
    rows = open_store(store).list()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "method", "rank", "task", "labels", "metrics", "base", "created", "status")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        cells = [r["name"], r["method"], ",".join(map(str, r["ranks"])), r["task"] or "",
                 str(len(r["labels"])) if r["labels"] else "", metrics, r["base_name"] or "", r["created"]]
        table.add_row(*map(escape, cells), escape(r["status"]) if r["status"] == "ok" else
                      f"[bold red]damaged:[/] {escape(r['status'])}")
    out.print(table)
    damaged = [r["name"] for r in rows if r["status"] != "ok"]
    if damaged:
        err.print(f"[bold red]{len(damaged)} damaged adapter(s):[/] {escape(', '.join(damaged))} (their files differ "
                  "from the catalog; `adapterkit show NAME` says how); re-train or re-merge them with --overwrite",
                  highlight=False)


@app.command("show")
def show(name: str, store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one stored adapter: catalog row, lineage, path."""
    try:
        row = open_store(store).show(name)
    except AdapterkitError as exc:
        fail(exc)
    print_record(row, as_json)
    if row["status"] != "ok":                  # the record is shown, and the exit code says it is damaged
        err.print(f"[bold red]damaged:[/] {escape(row['status'])}; re-train or re-merge it with --overwrite",
                  highlight=False)
        raise typer.Exit(1)


@app.command()
def demo(
    base: str = typer.Option("smollm2-135m"),
    steps: int = typer.Option(80, help="Training steps per example task (batch 8)."),
    n_test: int = typer.Option(300, "--n-test", help="Test rows scored per task."),
    retrain: bool = typer.Option(False, "--retrain", help="Train again even if the store has the adapters."),
    store: Optional[Path] = STORE_OPT,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The main job on the embedded defaults: train (or reuse) adapters for three example tasks, score
    them in mixed batches, print base vs adapter accuracy."""
    from .demo import DemoSettings, run_demo

    try:
        run_demo(base, out, settings=DemoSettings(steps=steps, n_test=n_test), store=open_store(store),
                 retrain=retrain, progress=progress)
    except AdapterkitError as exc:
        fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
