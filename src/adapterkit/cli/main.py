"""The `adapterkit` command: a thin typer map onto library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from .common import (ADAPTER_HELP, DEVICE_OPT, DTYPE_OPT, STORE_OPT, adapter_source, device_dtype, err, fail,
                         load_adapter, metrics_cell, open_store, out, print_listing, print_record)
from .codec import export_peft_cmd, quantize_cmd
from .merge import merge_cmd
from .route import route_app
from .serve import serve_cmd
from .compare import compare_cmd
from .versions import gate_cmd, promote_cmd, rm_cmd, rollback_cmd, versions_cmd
from .train import eval_cmd, train_cmd
from ..errors import AdapterkitError
from ..serve.requests import MAX_TEMPERATURE, MIN_TEMPERATURE

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
adapter_app.command("quantize")(quantize_cmd)
app.command("versions")(versions_cmd)
app.command("promote")(promote_cmd)
app.command("rollback")(rollback_cmd)
app.command("rm")(rm_cmd)
app.command("compare")(compare_cmd)
app.command("gate")(gate_cmd)
adapter_app.command("export-peft")(export_peft_cmd)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"adapterkit {version('adapterkit')}")
        except PackageNotFoundError:            # run from a source tree that was never installed
            from .. import __version__

            print(f"adapterkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print the version and exit.")) -> None:
    """Task-specific adapters over one frozen base model."""


@base_app.command("list")
def base_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the built-in bases and whether their packages are installed."""
    from ..core.base import list_bases

    rows = list_bases()
    if as_json:
        print(json.dumps(rows))
        return
    print_listing(("name", "kind", "installed", "ready", "description", "install"),
                  [[escape(r["name"]), r["kind"], "yes" if r["installed"] else "no", "yes" if r["ready"] else "no",
                    escape(r["description"]), escape(r["install"])] for r in rows], keep=("install",))


@base_app.command("pull")
def base_pull(name: str) -> None:
    """Make a built-in base ready (converts SmolLM2's GGUF or MobileNetV2's checkpoint once into the cache)."""
    from ..core.base import pull_base

    try:
        path = pull_base(name)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"{name}: {path}")


@adapter_app.command("inspect")
def adapter_inspect(adapter: str = typer.Argument(..., help=f"ADAPTER: {ADAPTER_HELP}."),
                    store: Optional[Path] = STORE_OPT,
                    as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Family (its one-line summary), targets, parameter count and base of an adapter (a folder, ours or PEFT's,
    or a stored name)."""
    from .inspect import describe

    try:
        info = describe(adapter_source(adapter, store)[0])
    except AdapterkitError as exc:
        fail(exc)
    print_record(info, as_json)


@adapter_app.command("create")
def adapter_create(
    name: str,
    out_dir: Path = typer.Option(..., "--out", help="Folder to write."),
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    method: str = typer.Option("lora", help="Adapter family: lora, ia3, bottleneck or sparse."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated module names, or a regex (default: LoRA "
                                          "q_proj,k_proj,v_proj,o_proj; the other families' for the base)."),
    placement: Optional[str] = typer.Option(None, help="Bottleneck: pfeiffer (default), houlsby or parallel."),
    reduction_factor: Optional[int] = typer.Option(None, help="Bottleneck: d -> d/rf (default 16)."),
    nonlinearity: Optional[str] = typer.Option(None, help="Bottleneck: relu (default), gelu or silu."),
    scaling: Optional[float] = typer.Option(None, help="Bottleneck, parallel placement: the output scale "
                                            "(default as train's: 4 on a causal LM, else 1)."),
    init: str = typer.Option("default", help="'default' (the identity: LoRA B = 0, IA3 ones, bottleneck up = 0, "
                             "sparse no entries; for training) or 'nonzero' (changes the output; sparse: random "
                             "entries)."),
    init_std: float = typer.Option(0.02, help="Std of the nonzero init."),
    seed: int = typer.Option(0),
) -> None:
    """Create a freshly initialised adapter of any family for a base and save it (LoRA and IA3 in
    PEFT's format, the others in adapterkit's)."""
    from dataclasses import replace

    from ..core.adapter import create_adapter
    from ..core.base import load_base
    from ..train.fit import adapter_config

    try:
        if init not in ("default", "nonzero"):
            raise AdapterkitError(f"--init must be 'default' or 'nonzero', got {init!r}")
        given = dict(placement=placement, reduction_factor=reduction_factor, nonlinearity=nonlinearity,
                     scaling=scaling)
        if method != "bottleneck" and any(v is not None for v in given.values()):
            flags = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v is not None)
            raise AdapterkitError(f"{flags} set a bottleneck adapter; this one is {method}: add --method bottleneck "
                                  "or leave them out")
        b = load_base(base)
        if targets is None and method == "lora":
            targets = "q_proj,k_proj,v_proj,o_proj"
        target = None if targets is None else (
            tuple(t.strip() for t in targets.split(",")) if "," in targets or targets.isidentifier() else targets)
        if isinstance(target, str):                       # a regex: the family's config takes it as is
            cfg = replace(adapter_config(method, b, r=r, alpha=alpha, **(given if method == "bottleneck" else {})),
                          target_modules=target)
        else:
            cfg = adapter_config(method, b, r=r, alpha=alpha, targets=target,
                                 **(given if method == "bottleneck" else {}))
        if init == "nonzero":
            cfg = replace(cfg, init="random" if method == "sparse" else "nonzero", init_std=init_std)
        adapter = create_adapter(name, b.model, cfg, seed=seed, fingerprint=b.fingerprint, base_name=b.name)
        adapter.save(out_dir)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"wrote {name} ({adapter.summary()}; {adapter.num_parameters():,} parameters) to {out_dir}",
              highlight=False)


@adapter_app.command("export-merged")
def adapter_export_merged(
    adapters: List[str] = typer.Argument(..., help=f"Adapters to merge in, each {ADAPTER_HELP}."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the merged transformers model."),
    base: str = typer.Option("smollm2-135m"),
    device: Optional[str] = DEVICE_OPT,
    dtype: str = typer.Option("float32", "--dtype", help="The written weights: float32 (the default, whatever "
                              "the machine), bfloat16 or float16 (half the size). The merge runs in float32 and "
                              "each weight is rounded once."),
    store: Optional[Path] = STORE_OPT,
) -> None:
    """Write a plain transformers model folder: the base with the adapters merged in."""
    from ..core.base import dtype_name, load_base
    from ..core.runtime import AdapterRuntime

    try:
        seen: dict = {}
        loaded = [load_adapter(ref, store, seen) for ref in adapters]     # every adapter before the base
        dev, written = device_dtype(device, dtype)
        b = load_base(base, dtype="float32", device=dev)      # merged in fp32, cast once when written
        rt = AdapterRuntime.from_base(b)
        for a in seen.values():
            rt.add(a)
        rt.export_merged(out_dir, [a.name for a in loaded], tokenizer=b.tokenizer, dtype=written)
    except AdapterkitError as exc:
        fail(exc)
    out.print(f"wrote {out_dir} ({dtype_name(written)})", highlight=False)


def parse_composition(spec: str) -> list[tuple[str, float]]:
    """'ADAPTER=WEIGHT,ADAPTER=WEIGHT' -> [(adapter, weight)]; a clear error for anything else."""
    parts = []
    for item in spec.split(","):
        ref, sep, weight = item.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not ref or value is None:
            raise AdapterkitError(f"--compose {spec!r}: each item must be ADAPTER=WEIGHT, ADAPTER a folder or a "
                                  f"stored name (e.g. ./lang=1.0,task=0.5), got {item.strip()!r}")
        parts.append((ref, value))
    if len({r for r, _ in parts}) != len(parts):
        raise AdapterkitError(f"--compose {spec!r} names an adapter twice; give each adapter once with its weight")
    return parts


@app.command()
def generate(
    prompt: str,
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help=f"ADAPTER: {ADAPTER_HELP}; repeat for a "
                                                "mixed batch."),
    compose: Optional[List[str]] = typer.Option(None, "--compose", help="One row with several adapters active at "
                                                "once, weighted: 'ADAPTER=WEIGHT,ADAPTER=WEIGHT' (e.g. a language "
                                                "adapter + a task adapter); repeatable."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (the default); else sample, "
                                      f"in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the most likely tokens whose probability "
                                "reaches P (1: off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the K most likely tokens (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same tokens (default: random)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    store: Optional[Path] = STORE_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row."),
) -> None:
    """Generate (greedy unless --temperature); one row per --adapter and per --compose, all in one mixed
    batch. Sampling is the server's: each row has its own generator, so a seed gives the same tokens."""
    from ..core.base import load_base
    from ..core.generate import generate as run
    from ..core.runtime import AdapterRuntime
    from ..serve.requests import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        dev, dt = device_dtype(device, dtype)
        seen: dict = {}                           # every adapter is read before the base is loaded
        rows: list = [load_adapter(ref, store, seen).name for ref in adapter or []]
        for spec in compose or []:
            row = {}
            for ref, w in parse_composition(spec):
                name = load_adapter(ref, store, seen).name
                if name in row:
                    raise AdapterkitError(f"--compose {spec!r} names adapter {name!r} twice; give each adapter "
                                          "once with its weight")
                row[name] = w
            rows.append(row)
        rows = rows or [None]
        b = load_base(base, dtype=dt, device=dev)
        if b.tokenizer is None or b.kind != "causal-lm":
            raise AdapterkitError(f"base {base!r} is not a causal LM with a tokenizer; generate needs one")
        rt = AdapterRuntime.from_base(b)
        for a in seen.values():
            rt.add(a)
        results = run(rt, b.tokenizer, [prompt] * len(rows), rows, max_new_tokens=max_tokens, chat=chat,
                      sampling=params)
    except AdapterkitError as exc:
        fail(exc)
    for res in results:
        if as_json:
            print(json.dumps({"adapter": res.adapter, "text": res.text, "token_ids": res.token_ids,
                              **({"error": res.error} if res.error else {})}))
        elif res.error:
            err.print(f"[bold red]error:[/] {escape(str(res.adapter or '(base)'))}: {escape(res.error)}",
                      highlight=False, soft_wrap=True)
        else:
            out.print(f"[bold]{res.adapter or '(base)'}[/]: {res.text}", highlight=False)
    if any(res.error for res in results):        # the other rows were printed; the exit code says one failed
        raise typer.Exit(1)


@data_app.command("list")
def data_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The named example tasks and their split sizes."""
    from ..data import list_tasks, load_task

    rows = []
    for name in list_tasks():
        try:
            card = load_task(name).card
        except AdapterkitError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        rows.append({"name": name, "labels": card["labels"], "sizes": card["sizes"],
                     "source": card["source"]["package"], "licence": card["licence"]})
    if as_json:
        print(json.dumps(rows))
        return
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["name"], "", "", "", "", f"[red]{escape(r['error'])}[/]", ""])
            continue
        sizes = r["sizes"]
        cells.append([r["name"], str(len(r["labels"])), str(sizes["train"]), str(sizes["validation"]),
                      str(sizes["test"]), escape(r["source"]), escape(r["licence"].split(" (")[0])])
    print_listing(("task", "labels", "train", "validation", "test", "source", "licence"), cells)


@data_app.command("show")
def data_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A task's data card and a few examples."""
    from ..data import load_task

    try:
        task = load_task(name)
    except AdapterkitError as exc:
        fail(exc)
    print_record(task.card, as_json)
    if as_json:
        return
    for ex in task.train[:3]:
        if hasattr(ex, "question"):                       # a visual question: image, question -> answer
            out.print(f"[bold]{escape(ex.answer)}[/]: image {escape(ex.id)}: {escape(ex.question)}", highlight=False)
            continue
        shown = ex.text[:160] if hasattr(ex, "text") else f"image {ex.id}"
        out.print(f"[bold]{ex.label}[/]: {shown}", highlight=False)


def _export_target(example: Any) -> dict[str, str]:
    """{"label"}, or a visual question's {"question", "answer", "type"}."""
    if hasattr(example, "question"):
        return {"question": example.question, "answer": example.answer, "type": example.qtype}
    return {"label": example.label}


def _export_content(example: Any) -> dict[str, str]:
    """{"text": ...}, or an image example's {"image": its file path, or its pixels as a PNG data URL}."""
    if hasattr(example, "text"):
        return {"text": example.text}
    if isinstance(example.image, str):
        return {"image": example.image}
    import base64
    import io

    buf = io.BytesIO()
    example.image.save(buf, format="PNG")
    return {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}


@data_app.command("export")
def data_export(
    name: str,
    adapter: Optional[str] = typer.Option(None, "--adapter", help="The `adapter` field of every line "
                                          "(default: the task's name)."),
    split: str = typer.Option("train", help="train, validation or test."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="At most this many rows (default: all)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write here (default: standard output)."),
) -> None:
    """A task's rows as JSONL {"text", "adapter", "label"}: router examples (`route fit --examples`)
    or training / evaluation files."""
    from .._atomic import atomic_write_text
    from ..core.adapter import validate_name
    from ..data import load_task

    try:
        if adapter is not None:
            validate_name(adapter)
        task = load_task(name)
        if split not in ("train", "validation", "test"):
            raise AdapterkitError(f"unknown split {split!r}; the splits are train, validation, test")
        rows = getattr(task, split)[:n]
        text = "".join(json.dumps({**_export_content(e), "adapter": adapter or name, **_export_target(e)},
                                  ensure_ascii=False) + "\n" for e in rows)
        if out_file is None:
            sys.stdout.write(text)
        else:
            atomic_write_text(out_file, text)
            err.print(f"wrote {len(rows)} rows of {name} ({split}) to {out_file}", highlight=False)
    except (AdapterkitError, OSError) as exc:
        fail(exc)


@app.command("ls")
def ls(store: Optional[Path] = STORE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the adapters in the store."""
    rows = open_store(store).list()
    if as_json:
        print(json.dumps(rows))
        return
    table = []
    for r in rows:
        metrics = metrics_cell(r["metrics"])
        # the family's own line; a row stored before summaries: its LoRA ranks
        summary = r.get("summary") or f"{r['method']} r={','.join(map(str, r['ranks']))}"
        cells = [r["name"], summary, r["task"] or "", str(len(r["labels"])) if r["labels"] else "", metrics,
                 _size(r.get("bytes")), r["base_name"] or "", r["created"]]
        table.append([*map(escape, cells), escape(r["status"]) if r["status"] == "ok" else
                      f"[bold red]damaged:[/] {escape(r['status'])}"])
    print_listing(("name", "adapter", "task", "labels", "metrics", "size", "base", "created", "status"), table,
                  keep=("status",))
    damaged = [r["name"] for r in rows if r["status"] != "ok"]
    if damaged:
        err.print(f"[bold red]{len(damaged)} damaged adapter(s):[/] {escape(', '.join(damaged))} (their files differ "
                  "from the catalog; `adapterkit show NAME` says how); re-train or re-merge them with --overwrite",
                  highlight=False)


def _size(nbytes: Optional[int]) -> str:
    """1.2 MB, 310 kB: an adapter's bytes on disk ('' when the catalog predates file sizes)."""
    if nbytes is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


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
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    store: Optional[Path] = STORE_OPT,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The main job on the embedded defaults: train (or reuse) adapters for three example tasks, score
    them in mixed batches, print base vs adapter accuracy."""
    from ..demo import DemoSettings, run_demo

    try:
        dev, dt = device_dtype(device, dtype)
        run_demo(base, out, settings=DemoSettings(steps=steps, n_test=n_test), store=open_store(store),
                 retrain=retrain, progress=progress, device=dev, dtype=dt)
    except AdapterkitError as exc:
        fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
