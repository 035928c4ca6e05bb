"""Store-level entry points the CLI maps onto: fit a router over stored adapters, evaluate it.

Examples for an adapter come from its task in the catalog (the task's train split for descriptors /
gate training, its validation split for calibration) or from a JSONL file of {"text", "adapter"}
lines (optional "label": the task label, used to train a gate with the adapters' heads). Adapters of an
image base route images: their tasks' images (or {"image", "adapter"} lines), embedded by the base's
pooled features, into a retrieval router without the lexical channel.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..core.heads import ClassificationHead
from .common import (check_adapters, check_base, check_count, check_router_name, check_top_k, check_writable,
                     read_router, routers_dir, set_default_router)
from .encoder import Encoder
from .evaluate import Item, RouteReport, evaluate_router
from .gate import GateRouter, causal_lm_loss, token_labels, train_gate
from .gate import check_options as check_gate
from .linear import fit_linear
from .retrieval import check_lexical, fit_retrieval
from .retrieval import check_options as check_retrieval

KINDS = ("retrieval", "linear", "gate")
SPLITS = ("train", "validation", "test")
UNLABELLED = ""


def load_adapters(store: Any, names: Sequence[str]) -> list:
    return [store.get(n) for n in names]


def open_base(store: Any, adapters: Sequence[Any], base: str | None):
    """The base the adapters were made for: `base` (name or folder) or the catalog's base name."""
    from ..core.base import load_base

    if base is None:
        base = next((a.meta.base_name for a in adapters if a.meta.base_name), None)
        if base is None:
            raise ConfigError("the adapters do not record their base; pass --base NAME_OR_FOLDER")
    b = load_base(base)
    from .common import AdapterRecord

    check_base([AdapterRecord.of(a) for a in adapters], b.fingerprint, b.name)
    return b


def example_task(adapter: Any) -> bool:
    """Whether the adapter records one of the example tasks (`adapterkit data list`), whose data the
    router can read; an adapter trained from a file records the file's path instead."""
    from ..data import list_tasks

    return bool(adapter.meta.task) and adapter.meta.task in list_tasks()


def task_examples(adapters: Sequence[Any], n_fit: int, n_held: int):
    """{adapter: fit texts}, {adapter: held-out texts}, {adapter: labels of the fit texts}, source."""
    from ..data import load_task

    fit, held, labels = {}, {}, {}
    no_task = [a.name for a in adapters if not example_task(a)]
    if no_task:
        which = ", ".join(f"{a.name!r} (" + (f"trained on {a.meta.task!r}, not an example task" if a.meta.task
                                            else "it records no task") + ")" for a in adapters if a.name in no_task)
        raise ConfigError(f"the router has no examples of {which}: pass --examples FILE (JSONL lines "
                          '{"text": ..., "adapter": ...}; `adapterkit data export TASK --adapter NAME` writes them)')
    tasks = {a.name: load_task(a.meta.task) for a in adapters}
    _one_modality({n: t.card.get("modality", "text") for n, t in tasks.items()})
    for a in adapters:
        task = tasks[a.name]
        fit[a.name] = [_content(e) for e in task.train[:n_fit]]
        labels[a.name] = [e.label for e in task.train[:n_fit]]
        held[a.name] = [_content(e) for e in task.validation[:n_held]]
    source = "tasks: " + ", ".join(f"{a.name}={a.meta.task} (train[:{n_fit}], validation[:{n_held}])" for a in adapters)
    return fit, held, labels, source


def _content(example: Any) -> Any:
    """What a router reads of an example: its text, or its image."""
    return example.image if hasattr(example, "image") else example.text


def examples_modality(adapters: Sequence[Any], examples_file: Path | None) -> str:
    """"image" or "text": what the router's examples are (its adapters' example tasks, the file's rows)."""
    from ..data import load_task
    from ..data.readers import read_records

    kinds = {a.name: load_task(a.meta.task).card.get("modality", "text") for a in adapters if example_task(a)}
    if examples_file is not None:
        records, _ = read_records(examples_file)
        kinds[str(examples_file)] = "image" if any("text" not in r and "image" in r for r in records) else "text"
    return _one_modality(kinds)


def _one_modality(by_adapter: dict[str, str]) -> str:
    """The modality every adapter's examples share ("text" or "image"); mixing them is a ConfigError."""
    kinds = set(by_adapter.values())
    if len(kinds) > 1:
        which = ", ".join(f"{n}={k}" for n, k in by_adapter.items())
        raise ConfigError(f"a router reads one kind of input, but these examples mix texts and images ({which}): "
                          "route text adapters and image adapters with separate routers")
    return kinds.pop() if kinds else "text"


def _row_input(r: dict, path: Path) -> dict:
    """A JSONL record's input as "text": an image row's path (relative to the file) or data URL."""
    if "text" in r or not isinstance(r.get("image"), str):
        return r
    image = r["image"]
    return {**r, "text": image if image.startswith("data:") or Path(image).is_absolute()
            else str(Path(path).parent / image)}


def file_examples(path: Path, names: Sequence[str]):
    """A JSONL file of {"text", "adapter"[, "label"]} -> {adapter: texts}, {adapter: labels}."""
    from ..data.readers import read_records

    records, _ = read_records(path)
    texts: dict[str, list[str]] = {n: [] for n in names}
    labels: dict[str, list[str]] = {n: [] for n in names}
    kinds = {"image" if "text" not in r and "image" in r else "text" for r in records}
    if len(kinds) > 1:
        raise ConfigError(f"{path}: the file mixes text rows and image rows; a router reads one kind of input: "
                          "put each in its own file and route them with separate routers")
    for i, r in enumerate(records, start=1):
        r = _row_input(r, path)                  # an image row (data export of an image task): its image
        if not isinstance(r.get("text"), str) or not isinstance(r.get("adapter"), str):
            raise ConfigError(f"{path}: record {i} needs string fields 'text' (or 'image') and 'adapter', got keys "
                              f"{sorted(r)}")
        if r["adapter"] not in texts:
            raise ConfigError(f"{path}: record {i} names adapter {r['adapter']!r}, which is not one of the router's "
                              f"adapters {list(names)}")
        texts[r["adapter"]].append(r["text"])
        labels[r["adapter"]].append(str(r.get("label", UNLABELLED)))
    return texts, labels


def _router_encoder(modality: str, kind: str, encoder: str | None, lexical_weight: float | None) -> str:
    """The encoder a router reads with: for image examples the adapters' (image) base, else `encoder` (default
    MiniLM-L6); image routers are retrieval routers."""
    if modality != "image":
        return encoder or "minilm-l6"
    if kind != "retrieval":
        raise ConfigError(f"the examples are images: an image router is a retrieval router (--kind retrieval; the "
                          f"{kind} router reads text)")
    if encoder not in (None, "base"):
        raise ConfigError(f"the examples are images: an image router embeds them with the adapters' image base itself, "
                          f"not {encoder!r} (leave --encoder out)")
    if lexical_weight is not None:
        raise ConfigError("--lexical-weight weighs character n-grams of texts; an image router has none: leave it out")
    return "base"


def fit_router(store: Any, adapter_names: Sequence[str], name: str, *, kind: str = "retrieval",
               base: str | None = None, encoder: str | None = None, examples_file: Path | None = None,
               n_examples: int = 1024, n_held: int = 64, top_k: int = 1, coverage: float = 0.99,
               neighbors: int = 10, lexical: bool = True, lexical_weight: float | None = None,
               fallback: str | None = None, steps: int = 100, lr: float = 1e-2, batch_size: int = 8,
               gate_weight: float = 1.0, max_length: int = 128, seed: int = 0, overwrite: bool = False,
               make_default: bool = False, on_step: Callable[[int, dict], None] | None = None):
    """Fit and store a router over stored adapters; returns it. encoder (retrieval, linear): a sentence encoder's
    name or folder, or "base"; None: MiniLM-L6 for text adapters, the base itself for adapters of an image base."""
    if kind not in KINDS:
        raise ConfigError(f"unknown router kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "gate" and (lexical_weight is not None or not lexical):
        raise ConfigError("--lexical/--lexical-weight are options of --kind retrieval; a gate reads hidden states")
    if kind == "linear" and lexical_weight is not None:
        raise ConfigError("--lexical-weight is an option of --kind retrieval; a linear router learns a weight for "
                          "every character n-gram: leave it out (or pass --no-lexical to drop the channel)")
    if kind == "linear" and neighbors < 1:
        raise ConfigError("a linear router needs --neighbors >= 1: its out-of-distribution test is the mean cosine "
                          "to the k nearest fit examples")
    check_lexical(lexical, lexical_weight)
    check_router_name(store, name, overwrite)                  # before any long work
    check_writable(routers_dir(store), f"router {name!r} into {routers_dir(store)}",
                   "pass --store FOLDER that you can write to")
    adapters = load_adapters(store, adapter_names)
    names = [r.name for r in check_adapters(adapters)]
    encoder = _router_encoder(examples_modality(adapters, examples_file), kind, encoder, lexical_weight)
    check_top_k(top_k, names)
    check_count("n_examples (--n-examples, examples per adapter)", n_examples)
    check_count("n_held (--n-held, calibration examples per adapter)", n_held)
    check_count("max_length (--max-length)", max_length)
    if kind != "gate":
        check_retrieval(names, top_k=top_k, coverage=coverage, neighbors=neighbors, lexical=lexical,
                        lexical_weight=lexical_weight)
    else:
        check_gate(steps=steps, lr=lr, gate_weight=gate_weight, batch_size=batch_size)
    if examples_file is not None:             # the file ADDS to the example tasks' data (held-out: a seeded 20 %)
        texts, labels = file_examples(examples_file, adapter_names)
        held, source = None, f"file: {examples_file}"
        known = [a for a in adapters if example_task(a)]
        if known:
            t_texts, _, t_labels, t_source = task_examples(known, n_examples, n_held)
            for a in known:
                texts[a.name], labels[a.name] = t_texts[a.name] + texts[a.name], t_labels[a.name] + labels[a.name]
            source = f"{t_source}; + {source}"
    else:
        texts, held, labels, source = task_examples(adapters, n_examples, n_held)
    if kind != "gate":
        fb = store.get(fallback) if fallback else None
        if encoder == "base":
            b = open_base(store, adapters, base)
            images = examples_modality(adapters, examples_file) == "image"
            if (b.kind == "image") != images:
                raise ConfigError(f"the examples are {'images' if images else 'texts'} but the adapters' base {b.name} "
                                  f"reads {'images' if b.kind == 'image' else 'text'}: give examples of what it reads")
            enc = Encoder.from_base(b, max_length=max_length)
        else:
            enc = Encoder.load(encoder, max_length=max_length)
        common = dict(held_out=held, top_k=top_k, coverage=coverage, neighbors=neighbors, lexical=lexical,
                      fallback=fb, source=source)
        router = (fit_linear(name, adapters, texts, enc, **common) if kind == "linear" else
                  fit_retrieval(name, adapters, texts, enc, lexical_weight=lexical_weight, **common))
    else:
        if fallback:
            raise ConfigError("a gate routes every token to its adapters; --fallback is for --kind retrieval or linear")
        b = open_base(store, adapters, base)
        router = _fit_gate(name, b, adapters, texts, labels, top_k=top_k, steps=steps, lr=lr,
                           batch_size=batch_size, gate_weight=gate_weight, max_length=max_length, seed=seed,
                           source=source, on_step=on_step)
    try:
        router.save(store, overwrite=overwrite)
    except OSError as exc:
        raise ConfigError(f"cannot write router {name!r} into {routers_dir(store)} ({exc}); nothing was stored: "
                          "pass --store FOLDER that you can write to and fit again") from exc
    if make_default:
        set_default_router(store, name)
    return router


def _fit_gate(name, base, adapters, texts, labels, *, top_k, steps, lr, batch_size, gate_weight, max_length,
              seed, source, on_step):
    from ..core.runtime import AdapterRuntime
    from ..train.classification import encode_texts

    rt = AdapterRuntime.from_base(base)
    for a in adapters:
        rt.add(a)
    gate = GateRouter.create(name, rt, adapters, top_k=top_k, seed=seed)
    names = [a.name for a in adapters]
    heads = [a.head for a in adapters]
    use_heads = all(isinstance(h, ClassificationHead) for h in heads) and all(
        lab != UNLABELLED and lab in heads[i].labels for i, n in enumerate(names) for lab in labels[n])
    rows = [(t, i, labels[n][j]) for i, n in enumerate(names) for j, t in enumerate(texts[n]) if t.strip()]
    random.Random(seed).shuffle(rows)
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        enc = encode_texts(base.tokenizer, [t for t, _, _ in chunk], max_length)
        batch = {**enc, "gate_labels": token_labels(enc["attention_mask"], [i for _, i, _ in chunk]),
                 "tasks": torch.tensor([i for _, i, _ in chunk])}
        if use_heads:
            batch["labels"] = torch.tensor([heads[i].labels.index(lab) for _, i, lab in chunk])
        batches.append(batch)
    if use_heads:
        task_loss, objective = head_loss(heads), "classification heads"
    elif base.kind == "causal-lm":
        task_loss, objective = causal_lm_loss, "causal-lm"
    else:
        task_loss, objective = None, "gate cross-entropy only"
    gate.training = {"examples": source, "task_loss": objective, "batch_size": batch_size, "seed": seed,
                     "max_length": max_length, "rows": len(rows)}
    train_gate(gate, rt, batches, steps=steps, lr=lr, gate_weight=gate_weight, task_loss=task_loss, on_step=on_step)
    return gate


def head_loss(heads):
    from ..train.classification import hidden_states

    def loss(model, batch):
        hidden = hidden_states(model, batch)
        terms = [torch.nn.functional.cross_entropy(
            heads[int(t)].logits(hidden[i:i + 1], batch["attention_mask"][i:i + 1]), batch["labels"][i:i + 1])
            for i, t in enumerate(batch["tasks"])]
        return torch.stack(terms).mean()
    return loss


def eval_items(router_meta: dict, tasks: Sequence[str] | None, file: Path | None, split: str, n: int) -> list[Item]:
    """Labelled prompts: each task's split (oracle: the router's adapter of that task), or a JSONL
    file of {"text", "adapter"[, "label"]}."""
    if file is not None:
        from ..data.readers import read_records

        records, _ = read_records(file)
        items = []
        for i, r in enumerate(records, start=1):
            r = _row_input(r, file)
            if not isinstance(r.get("text"), str) or not isinstance(r.get("adapter"), str):
                raise ConfigError(f"{file}: record {i} needs string fields 'text' (or 'image') and 'adapter'")
            items.append(Item(r["text"], r["adapter"], r.get("label"), r.get("task")))
        return items
    if not tasks:
        raise ConfigError("give --tasks t1,t2 (example tasks) or --file FILE (JSONL text, adapter[, label])")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}: pass --split test")
    from ..data import load_task

    by_task = {r["task"]: r["name"] for r in router_meta["adapters"] if r.get("task")}
    items = []
    for t in tasks:
        if t not in by_task:
            raise ConfigError(f"no adapter of router {router_meta['name']!r} was trained on task {t!r}; its adapters' "
                              f"tasks: {', '.join(f'{a}={tk}' for tk, a in by_task.items()) or 'none'}")
        task = load_task(t)
        items += [Item(_content(e), by_task[t], e.label, t) for e in task.split(split)[:n]]
    random.Random(0).shuffle(items)            # one mixed stream of the tasks
    return items


def eval_router(store: Any, name: str, *, tasks: Sequence[str] | None = None, file: Path | None = None,
                split: str = "test", n: int = 200, base: str | None = None, batch_size: int = 32,
                max_length: int = 128, strict: bool = True) -> RouteReport:
    from ..core.runtime import AdapterRuntime
    from . import ENCODER_TYPES, load_router

    check_count("n (--n, prompts per task)", n)
    check_count("batch_size", batch_size)
    check_count("max_length", max_length)
    meta, _ = read_router(store, name)
    items = eval_items(meta, tasks, file, split, n)
    names = [r["name"] for r in meta["adapters"]]
    extra = [meta["fallback"]["name"]] if meta.get("fallback") else []
    oracles = sorted({it.oracle for it in items} - set(names) - set(extra))
    adapters = load_adapters(store, names + extra + oracles)
    b = open_base(store, adapters, base)
    rt = AdapterRuntime.from_base(b)
    for a in adapters:
        rt.add(a)
    encoder = None
    if meta["type"] in ENCODER_TYPES:
        spec = meta["encoder"]
        encoder = (Encoder.from_base(b, max_length=int(spec["max_length"]), runtime=rt)
                   if spec["fingerprint"] == b.fingerprint else Encoder.load(spec["name"], max_length=int(spec["max_length"])))
    router = load_router(store, meta["name"], encoder=encoder, strict=strict)
    return evaluate_router(router, rt, items, batch_size=batch_size, max_length=max_length)
