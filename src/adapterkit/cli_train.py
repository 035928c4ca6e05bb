"""`adapterkit train` and `adapterkit eval`: thin maps onto train/ (registered in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_common import STORE_OPT, fail, open_store, out
from .errors import AdapterkitError


def _examples(task: Optional[str], split: str, file: Optional[Path], text_field: str, label_field: str):
    from .data import load_task, read_examples

    if file is not None:
        return list(read_examples(file, text_field, label_field).examples)
    if task is None:
        raise AdapterkitError("give --task NAME (see `adapterkit data list`) or a data file")
    return load_task(task).split(split)


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
    schedule: str = typer.Option("cosine", help="Learning-rate decay after warm-up: cosine, linear or constant."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_length: int = typer.Option(128, "--max-length", help="Longer texts are truncated."),
    seed: int = typer.Option(0),
    eval_every: int = typer.Option(0, "--eval-every", help="Score the eval split every N steps; keep the best."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast on CPU."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every",
                                         help="Save the trainer state every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of --name from its last "
                                "checkpoint (same data and settings; the loss curve continues exactly)."),
    log: Optional[Path] = typer.Option(None, "--log", help="JSONL log, one record per step "
                                       "(default <store>/runs/NAME/train_log.jsonl)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter (or a leftover "
                                   "checkpoint) of the same name."),
    store: Optional[Path] = STORE_OPT,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a classification adapter (+ head) on a task or a file and store it with its metrics."""
    from .base import load_base
    from .methods import get_method
    from .train.fit import CHECKPOINT, check_run, checkpoint_step, run_dir, run_lock
    from .train.run import train_classifier
    from .train.trainer import TrainConfig, finish_distributed, init_distributed_from_env

    st = open_store(store)
    try:
        rank, _ = init_distributed_from_env()       # torchrun --nproc_per_node=N -m adapterkit.cli train ...
        if get_method(method).name != "lora":  # pragma: no cover - only LoRA is registered yet
            raise AdapterkitError(f"training method {method!r} is not wired into `train` yet")
        if objective not in ("classification", "causal-lm", "mlm"):
            raise AdapterkitError(f"unknown objective {objective!r}; use classification, causal-lm or mlm")
        config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule,
                             weight_decay=weight_decay, warmup_steps=warmup, seed=seed, bf16=bf16,
                             eval_every=eval_every, checkpoint_every=checkpoint_every)
        # One run per name: a second trainer of it fails here, before it deletes (--overwrite), resumes
        # or writes anything, and before loading the base or the data. Freed when the process ends.
        with run_lock(st, name):
            check_run(st, name, overwrite=overwrite, resume=resume)      # before loading the base or the data
            target_list = tuple(t.strip() for t in targets.split(",")) if targets else None
            common = dict(task=task or (str(train_file) if train_file else None), store=st, config=config, r=r,
                          alpha=alpha, targets=target_list, max_length=max_length, overwrite=overwrite,
                          progress=progress, resume=resume, log_path=str(log) if log else None)
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
        fail(exc)
    except KeyboardInterrupt:
        ckpt = run_dir(st, name) / CHECKPOINT
        step = checkpoint_step(ckpt)
        fail(AdapterkitError(f"interrupted; nothing was stored as {name!r}. " + (
            f"The last checkpoint (step {step}) is in {ckpt}: run the same command with --resume to continue."
            if step is not None else "No checkpoint was written yet (see --checkpoint-every).")), code=130)
    finish_distributed()
    if rank != 0:
        return
    out.print(f"stored [bold]{name}[/] in {st.root}; validation: " +
              (", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
               or "none"), highlight=False)


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
        adapter = open_store(store).get(name)
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
        fail(exc)
    if as_json:
        print(json.dumps({"adapter": name, "task": task, "split": split if task else None, **metrics}))
        return
    out.print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
