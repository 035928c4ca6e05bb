"""`adapterkit compare OLD NEW`: an adapter update's negative flips (train/compare.py; main.py registers it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import DEVICE_OPT, DTYPE_OPT, STORE_OPT, device_dtype, fail, load_adapter, open_store, out
from ..errors import AdapterkitError


def compare_cmd(
    old: str = typer.Argument(..., help="The adapter users have now: a stored NAME / NAME@vN or a folder."),
    new: str = typer.Argument(..., help="Its update (e.g. NAME@v2)."),
    task: Optional[str] = typer.Option(None, help="Example task to score both on."),
    split: str = typer.Option("test", help="train, validation or test."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL/CSV with text and label instead of a task."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str = typer.Option("label", "--label-field"),
    max_length: int = typer.Option(128, "--max-length"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: old vs new accuracy and flips per class."),
    store: Optional[Path] = STORE_OPT,
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Accuracy of both, the gain, the negative flip rate (rows OLD got right and NEW gets wrong), the
    positive flip rate, inconsistency and a per-class table (instruction adapters: greedy exact match,
    and per-example completion-loss rises). When NEW is a stored version, the numbers
    are stored with it (`adapterkit versions` shows them; `promote --max-nfr` reads them)."""
    from ..core.base import load_base
    from ..store import parse_ref
    from ..train.compare import compare_adapters
    from .train import _examples

    try:
        a, b = load_adapter(old, store), load_adapter(new, store)
        if a.head is None and b.head is None:           # instruction adapters: prompt/completion records
            from ..data.readers import read_records

            if file is None:
                raise AdapterkitError("instruction adapters are compared on --file with JSONL prompt/completion or "
                                      "messages records")
            examples = read_records(file)[0]
        else:
            examples = _examples(task, split, file, text_field, label_field)
        dev, dt = device_dtype(device, dtype)
        base = load_base(b.meta.base_name or a.meta.base_name or "smollm2-135m", dt, dev)
        numbers = compare_adapters(base, a, b, examples, max_length, progress=progress)
        numbers["old"], numbers["new"] = old, new
        numbers["data"] = {"task": task, "split": split if task else None, "file": str(file) if file else None}
        st = open_store(store)

        def resolved(ref: str) -> Optional[str]:
            """NAME@vN of a stored adapter argument (NAME: its promoted version); None for a folder."""
            if Path(ref).is_dir():
                return None
            name, version = parse_ref(ref)
            return f"{name}@v{version or st.show(name)['version']}"
        numbers["old_ref"], target = resolved(old), resolved(new)
        if target is not None:
            st.set_compare(target, {k: v for k, v in numbers.items() if k != "negative_flip_rows"})
        if plot is not None:
            _plot(numbers, plot)
    except AdapterkitError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({**numbers, "stored_with": target}))
        return
    out.print(f"{old} -> {new} on {numbers['n']} rows: accuracy {numbers['old_accuracy']:.4f} -> "
              f"{numbers['new_accuracy']:.4f} ({numbers['gain']:+.4f}); negative flip rate "
              f"{numbers['negative_flip_rate']:.4f} ({numbers['negative_flips']} rows), positive flip rate "
              f"{numbers['positive_flip_rate']:.4f}, inconsistency {numbers['inconsistency']:.4f}",
              highlight=False, soft_wrap=True)
    table = Table("label", "rows", "old acc", "new acc", "neg. flips", "pos. flips")
    for c in numbers["per_class"]:
        table.add_row(c["label"], str(c["rows"]), f"{c['old_accuracy']:.3f}", f"{c['new_accuracy']:.3f}",
                      str(c["negative_flips"]), str(c["positive_flips"]))
    if numbers["per_class"]:
        out.print(table)
    if "old_loss" in numbers:
        out.print(f"completion loss {numbers['old_loss']:.4f} -> {numbers['new_loss']:.4f}; rows whose loss rose by "
                  f"more than {numbers['loss_rise_nats']} nats: {numbers['loss_rise_rate']:.4f}", highlight=False)
    if target is not None:
        out.print(f"stored with {target}", highlight=False)


def _plot(numbers: dict, path: Path) -> None:
    from ..train.report import plot_unavailable

    why = plot_unavailable()
    if why is not None:
        raise AdapterkitError(f"--plot needs matplotlib ({why}); pip install matplotlib, or leave --plot out")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = numbers["per_class"] or [{"label": "all rows", **{k: numbers[k] for k in (
        "old_accuracy", "new_accuracy", "negative_flips", "positive_flips")}}]       # instruction adapters
    xs = range(len(classes))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar([x - 0.2 for x in xs], [c["old_accuracy"] for c in classes], 0.4, label="old")
    ax1.bar([x + 0.2 for x in xs], [c["new_accuracy"] for c in classes], 0.4, label="new")
    ax1.set_xticks(list(xs), [c["label"] for c in classes], rotation=30, fontsize=8)
    ax1.set_ylabel("accuracy")
    ax1.legend(fontsize=8)
    ax2.bar([x - 0.2 for x in xs], [c["negative_flips"] for c in classes], 0.4, label="negative flips", color="tab:red")
    ax2.bar([x + 0.2 for x in xs], [c["positive_flips"] for c in classes], 0.4, label="positive flips",
            color="tab:green")
    ax2.set_xticks(list(xs), [c["label"] for c in classes], rotation=30, fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{numbers['old']} -> {numbers['new']}: NFR {numbers['negative_flip_rate']:.3f}, "
                 f"gain {numbers['gain']:+.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
