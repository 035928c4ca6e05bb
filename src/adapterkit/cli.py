"""The `adapterkit` command: a thin typer map onto library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import AdapterkitError

app = typer.Typer(help="Task-specific adapters over one frozen base model.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
base_app = typer.Typer(help="Built-in and local base models.", no_args_is_help=True)
adapter_app = typer.Typer(help="Create, inspect and export adapters.", no_args_is_help=True)
app.add_typer(base_app, name="base")
data_app = typer.Typer(help="Example tasks read offline from pip-packaged corpora.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)


def _print_record(record: dict, as_json: bool) -> None:
    """One object: a JSON line, or a two-column field/value table."""
    if as_json:
        print(json.dumps(record))
        return
    table = Table("field", "value", show_header=False)
    for key, value in record.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    out.print(table)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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
        _fail(exc)
    out.print(f"{name}: {path}")


@adapter_app.command("inspect")
def adapter_inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Method, rank, targets, parameter count and base of an adapter folder (ours or PEFT's)."""
    from .inspect import describe

    try:
        info = describe(path)
    except AdapterkitError as exc:
        _fail(exc)
    _print_record(info, as_json)


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
        _fail(exc)
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
        _fail(exc)
    out.print(f"wrote {out_dir}")


@app.command()
def generate(
    prompt: str,
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    adapter: Optional[List[Path]] = typer.Option(None, "--adapter", help="Adapter folder; repeat for a mixed batch."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Greedy generation; with several --adapter, one row per adapter in one mixed batch."""
    from .adapter import Adapter
    from .base import load_base
    from .generate import generate as run
    from .runtime import AdapterRuntime

    try:
        b = load_base(base)
        if b.tokenizer is None or b.kind != "causal-lm":
            raise AdapterkitError(f"base {base!r} is not a causal LM with a tokenizer; generate needs one")
        rt = AdapterRuntime.from_base(b)
        rows = []
        for path in adapter or []:
            a = Adapter.load(path)
            rt.add(a)
            rows.append(a.name)
        rows = rows or [None]
        results = run(rt, b.tokenizer, [prompt] * len(rows), rows, max_new_tokens=max_tokens, chat=chat)
    except AdapterkitError as exc:
        _fail(exc)
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
        _fail(exc)
    _print_record(task.card, as_json)
    if as_json:
        return
    for ex in task.train[:3]:
        out.print(f"[bold]{ex.label}[/]: {ex.text[:160]}", highlight=False)


def _store(path: Optional[Path]):
    from .store import AdapterStore

    return AdapterStore(path)


STORE_OPT = typer.Option(None, "--store", help="Store folder (default $ADAPTERKIT_HOME/store).")


@app.command("ls")
def ls(store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the adapters in the store."""
    rows = _store(store).list()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "method", "rank", "task", "labels", "metrics", "base", "created")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["metrics"].items())
        table.add_row(r["name"], r["method"], ",".join(map(str, r["ranks"])), r["task"] or "",
                      str(len(r["labels"])) if r["labels"] else "", metrics, r["base_name"] or "", r["created"])
    out.print(table)


@app.command("show")
def show(name: str, store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one stored adapter: catalog row, lineage, path."""
    try:
        row = _store(store).show(name)
    except AdapterkitError as exc:
        _fail(exc)
    _print_record(row, as_json)


def _examples(task: Optional[str], split: str, file: Optional[Path], text_field: str, label_field: str):
    from .data import load_task, read_examples

    if file is not None:
        return list(read_examples(file, text_field, label_field).examples)
    if task is None:
        raise AdapterkitError("give --task NAME (see `adapterkit data list`) or a data file")
    return load_task(task).split(split)


@app.command("train")
def train_cmd(
    name: str = typer.Option(..., "--name", help="Name of the adapter in the store."),
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    task: Optional[str] = typer.Option(None, help="Example task (adapterkit data list)."),
    train_file: Optional[Path] = typer.Option(None, "--train-file", help="JSONL/CSV with text and label "
                                              "(mlm: .txt, one document per line, or JSONL)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval-file", help="JSONL/CSV scored after training."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str = typer.Option("label", "--label-field"),
    method: str = typer.Option("lora", help="Adapter method (the registry's names)."),
    objective: str = typer.Option("classification", help="classification (text, label), causal-lm "
                                  "(JSONL prompt/completion or messages) or mlm (plain text, encoder bases)."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated target modules (default per base)."),
    steps: int = typer.Option(300),
    batch_size: int = typer.Option(8, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(2e-4),
    warmup: int = typer.Option(0, help="Warm-up steps."),
    max_length: int = typer.Option(128, "--max-length", help="Longer texts are truncated."),
    seed: int = typer.Option(0),
    eval_every: int = typer.Option(0, "--eval-every", help="Score the eval split every N steps; keep the best."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast on CPU."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter of the same name."),
    store: Optional[Path] = STORE_OPT,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a classification adapter (+ head) on a task or a file and store it with its metrics."""
    from .base import load_base
    from .methods import get_method
    from .train.run import train_classifier
    from .train.trainer import TrainConfig, init_distributed_from_env

    try:
        rank, _ = init_distributed_from_env()       # torchrun --nproc_per_node=N -m adapterkit.cli train ...
        if get_method(method).name != "lora":  # pragma: no cover - only LoRA is registered yet
            raise AdapterkitError(f"training method {method!r} is not wired into `train` yet")
        st = _store(store)
        st.check_free(name, overwrite)                # before loading the base or the data
        if objective not in ("classification", "causal-lm", "mlm"):
            raise AdapterkitError(f"unknown objective {objective!r}; use classification, causal-lm or mlm")
        config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                             warmup_steps=warmup, seed=seed, bf16=bf16, eval_every=eval_every)
        target_list = tuple(t.strip() for t in targets.split(",")) if targets else None
        common = dict(task=task or (str(train_file) if train_file else None), store=st, config=config, r=r,
                      alpha=alpha, targets=target_list, max_length=max_length, overwrite=overwrite,
                      progress=progress)
        if objective == "causal-lm":
            from .data.readers import read_records
            from .train.instruct import train_instructions

            if train_file is None:
                raise AdapterkitError("causal-lm training reads --train-file (JSONL prompt/completion or messages)")
            train_recs = read_records(train_file)[0]
            eval_recs = read_records(eval_file)[0] if eval_file else []
            _, metrics = train_instructions(load_base(base), name, train_recs, eval_recs, **common)
        elif objective == "mlm":
            from .train.mlm import read_texts, train_mlm

            if train_file is None:
                raise AdapterkitError("mlm training reads --train-file (.txt, one document per line, or JSONL "
                                      "with --text-field)")
            train_texts = read_texts(train_file, text_field)
            eval_texts = read_texts(eval_file, text_field) if eval_file else []
            _, metrics = train_mlm(load_base(base), name, train_texts, eval_texts, **common)
        else:
            train_ex = _examples(task, "train", train_file, text_field, label_field)
            eval_ex = _examples(task, "validation", eval_file, text_field, label_field) \
                if (task or eval_file) else []
            _, metrics = train_classifier(load_base(base), name, train_ex, eval_ex, **common)
    except AdapterkitError as exc:
        _fail(exc)
    if rank != 0:
        return
    out.print(f"stored [bold]{name}[/] in {st.root}; validation: " +
              (", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
               or "none"), highlight=False)


@app.command("eval")
def eval_cmd(
    name: str,
    task: Optional[str] = typer.Option(None, help="Example task to score on."),
    split: str = typer.Option("test", help="train, validation or test."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL/CSV with text and label instead of a task "
                                        "(masked-LM adapters: .txt or JSONL text)."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str = typer.Option("label", "--label-field"),
    base: Optional[str] = typer.Option(None, help="Base (default: the one the adapter was trained on)."),
    max_length: int = typer.Option(128, "--max-length"),
    store: Optional[Path] = STORE_OPT,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy and macro-F1 of a classification adapter on a task split or a file; loss, perplexity
    and exact match of an instruction adapter on a JSONL file; masked-token loss, perplexity and
    accuracy of a masked-LM adapter on a text file."""
    from .base import load_base
    from .heads import MLMHead
    from .runtime import AdapterRuntime
    from .train.run import evaluate

    try:
        adapter = _store(store).get(name)
        b = load_base(base or adapter.meta.base_name or "smollm2-135m")
        rt = AdapterRuntime.from_base(b)
        rt.add(adapter)
        if isinstance(adapter.head, MLMHead):          # a language / domain adapter: masked-token loss
            from .train.mlm import evaluate_mlm, read_texts

            if file is None:
                raise AdapterkitError(f"{name!r} is a masked-LM adapter: give --file with plain text (.txt, one "
                                      "document per line, or JSONL with --text-field)")
            metrics = evaluate_mlm(rt, adapter, read_texts(file, text_field), max_length)
        elif adapter.head is None:                     # an instruction adapter: loss, perplexity, exact match
            from .data.readers import read_records
            from .train.instruct import evaluate_instructions

            if file is None:
                raise AdapterkitError(f"{name!r} has no classification head: give --file with JSONL "
                                      "prompt/completion or messages records")
            metrics = evaluate_instructions(rt, name, read_records(file)[0], max_length)
        else:
            metrics = evaluate(rt, adapter, _examples(task, split, file, text_field, label_field), max_length)
    except AdapterkitError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"adapter": name, "task": task, "split": split if task else None, **metrics}))
        return
    out.print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


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
        run_demo(base, out, settings=DemoSettings(steps=steps, n_test=n_test), store=_store(store),
                 retrain=retrain, progress=progress)
    except AdapterkitError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
