#!/usr/bin/env python
"""Merging task adapters on SmolLM2: per-task accuracy retention of each merge, against PEFT.

Four classification adapters (LoRA on q,k,v,o + a head each) are trained on the example tasks with
the demo's settings, or reused from the store (`demo-<task>`, the names `make run` writes). Every
merge produces ONE LoRA body shared by all tasks; each task keeps its own head. Per task we score
the test rows (first --n-test) with:
  alone                    the task's own adapter
  ours: linear (mean), task_arithmetic (λ), ties, dare_ties (several densities / λ), and the
        reversible merge (k basis adapters; each task recovered as its linear combination), fitted
        per site for each --k, and with one global set of coefficients for the first k
  peft: add_weighted_adapter with combination_type linear, ties and ties_svd on the same adapters
        (linear/ties combine A and B separately; ties_svd works on ΔW like ours)
Normalised retention = merged accuracy / alone accuracy, averaged over the tasks.

Timing: merge 8 random rank-16 adapters over every SmolLM2 site (q,k,v,o,gate,up,down x 30 layers)
with each method (median of --reps).

    .venv/bin/python benchmarks/merge.py                 # ~15 min when the adapters are stored
    .venv/bin/python benchmarks/merge.py --quick         # 40 test rows per task, 1 timing rep
    .venv/bin/python benchmarks/merge.py --only reversible --k 2 3   # re-measure the reversible rows
                                          # only; the other rows of the results file are kept

Results: benchmarks/results/merge.json and merge.png (bar plot of retention).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rt-sentiment", "election-tweets", "tweet-sentiment", "chat-topics")
OURS = [  # (label, method, params)
    ("linear (mean)", "linear", {"normalize": True}),
    ("task arithmetic λ=0.5", "task_arithmetic", {"lam": 0.5}),
    ("task arithmetic λ=1", "task_arithmetic", {"lam": 1.0}),
    ("ties d=0.2 λ=1", "ties", {"density": 0.2, "lam": 1.0}),
    ("ties d=0.5 λ=1", "ties", {"density": 0.5, "lam": 1.0}),
    ("dare_ties p=0.5 λ=1", "dare_ties", {"p": 0.5, "lam": 1.0}),
]
PEFT = [("peft linear (mean)", "linear", {}), ("peft ties d=0.2", "ties", {"density": 0.2}),
        ("peft ties_svd d=0.2", "ties_svd", {"density": 0.2})]
TIMED = [("concat", {}), ("linear", {"normalize": True}), ("ties", {"density": 0.2}), ("dare_ties", {"p": 0.5})]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def task_adapters(base, store, tasks, settings, progress):
    """The stored demo adapter per task (trained now when missing or made with other settings)."""
    from adapterkit.data import load_task
    from adapterkit.demo import task_adapter

    out = {}
    for task in tasks:
        out[task], how = task_adapter(base, store, load_task(task), settings, progress=progress)
        log(f"demo-{task}: {how}")
    return out


def accuracy(rt, body_name, head, examples, max_length) -> float:
    from adapterkit.train.classification import collate_fn, predict
    from adapterkit.train.run import classification_metrics

    pred = predict(rt, body_name, head, examples, collate_fn(rt.tokenizer, head, max_length))
    return classification_metrics(pred, [e.label for e in examples], head.labels)["accuracy"]


def peft_accuracies(base_name, adapters, tests, max_length, store) -> dict[str, dict[str, float]]:
    """PEFT's add_weighted_adapter on the same stored (PEFT-format) adapter folders."""
    import peft

    from adapterkit.core.base import load_base
    from adapterkit.train.classification import encode_texts, hidden_states
    from adapterkit.train.run import classification_metrics

    base = load_base(base_name)                      # a fresh copy: PEFT edits the model in place
    names = list(adapters)
    pm = peft.PeftModel.from_pretrained(base.model, str(store.path(adapters[names[0]].name)), adapter_name=names[0])
    for task in names[1:]:
        pm.load_adapter(str(store.path(adapters[task].name)), adapter_name=task)
    pm.eval()
    out = {}
    for label, ctype, params in PEFT:
        weights = [1.0 / len(names)] * len(names) if ctype == "linear" else [1.0] * len(names)
        t0 = time.perf_counter()
        pm.add_weighted_adapter(names, weights, adapter_name=ctype, combination_type=ctype, **params)
        pm.set_adapter(ctype)
        seconds = time.perf_counter() - t0
        row = {}
        for task, examples in tests.items():
            head, pred = adapters[task].head, []
            with torch.no_grad():
                for start in range(0, len(examples), 32):
                    batch = encode_texts(base.tokenizer, [e.text for e in examples[start:start + 32]], max_length)
                    logits = head.logits(hidden_states(base.model, batch), batch["attention_mask"])
                    pred += [head.labels[i] for i in logits.argmax(-1).tolist()]
            row[task] = classification_metrics(pred, [e.label for e in examples], head.labels)["accuracy"]
        out[label] = {"accuracy": row, "merge_seconds": seconds}
        pm.delete_adapter(ctype)
        log(f"{label}: {row}")
    return out


def timing(reps: int) -> dict[str, dict]:
    from adapterkit.merge import merge_with_report
    sys.path.insert(0, str(Path(__file__).parent))
    from merge_timing import smollm2_adapters

    adapters = smollm2_adapters(n=8, r=16)
    out = {}
    for method, params in TIMED:
        secs, report = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            _, report = merge_with_report(adapters, method, **params)
            secs.append(time.perf_counter() - t0)
        out[method] = {"median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                       "sites": len(report.site_errors), "total_error": report.total_error}
        log(f"timing {method}: {out[method]}")
    return out


def reversible_rows(rt, adapters, tests, ks, max_length) -> dict[str, dict]:
    """Per-site reversible merges (plain and normalized) for each k and the global one for ks[0]:
    accuracy of every task recovered from the basis, with its reconstruction errors (overall,
    per-site median/max, and of the site-shared runtime row)."""
    from adapterkit.merge import merge_reversible, recover

    inputs = [adapters[t] for t in TASKS]
    out = {}
    configs = [(k, True, norm) for k in ks for norm in (False, True)] + [(ks[0], False, False)]
    for k, per_site, normalize in configs:
        label = f"reversible k={k} ({'per site' if per_site else 'global'}{', normalized' if normalize else ''})"
        t0 = time.perf_counter()
        rev = merge_reversible(inputs, k=k, per_site=per_site, normalize=normalize, name="bench-rev")
        seconds = time.perf_counter() - t0
        acc = {}
        for t in TASKS:
            rec = recover(rev, adapters[t].name, name="bench-recovered")
            rt.add(rec)
            acc[t] = accuracy(rt, "bench-recovered", adapters[t].head, tests[t], max_length)
            rt.remove("bench-recovered")
        summary = rev.error_summary()
        out[label] = {"system": "adapterkit", "method": "reversible",
                      "params": {"k": k, "per_site": per_site, "normalize": normalize}, "accuracy": acc, "merge_seconds": seconds, "reconstruction_error": rev.errors,
                      "site_error_median": {t: v["site_median"] for t, v in summary.items()},
                      "site_error_max": {t: v["site_max"] for t, v in summary.items()},
                      "row_error": rev.row_errors, "eigenvalues": rev.eigenvalues}
        log(f"{label}: {acc} errors {rev.errors} ({seconds:.1f} s)")
    return out


def finish(results: dict, alone: dict, rev_key: str) -> None:
    """Retention per row and the summary (targets) of a results dict."""
    for row in results["methods"].values():
        row["retention"] = {t: row["accuracy"][t] / alone[t] if alone[t] > 0 else None for t in TASKS}
        kept = [v for v in row["retention"].values() if v is not None]     # a task the adapter never gets right: n/a
        row["mean_retention"] = statistics.fmean(kept) if kept else None
    ours = {k: v for k, v in results["methods"].items() if v["system"] == "adapterkit"}
    single = {k: v for k, v in ours.items() if v["method"] != "reversible"}     # ONE merged adapter
    best = max(single, key=lambda k: single[k]["mean_retention"])
    peft_best = max((v["mean_retention"] for v in results["methods"].values() if v["system"] == "peft"), default=None)
    rev = results["methods"][rev_key]["mean_retention"]
    timing_ = results.get("timing_8x_rank16_all_sites", {})
    results["summary"] = {
        "best_ours": best, "best_ours_mean_retention": single[best]["mean_retention"],
        "reversible": rev_key, "reversible_mean_retention": rev,
        "reversible_all": {k: v["mean_retention"] for k, v in ours.items() if v["method"] == "reversible"},
        "best_peft_mean_retention": peft_best,
        "targets": {"best_ours_ge_0.90": single[best]["mean_retention"] >= 0.90,
                    "reversible_ge_0.95": rev >= 0.95,
                    "never_below_peft": peft_best is None or single[best]["mean_retention"] >= peft_best,
                    "ties_8x16_le_10s": timing_["ties"]["median_s"] <= 10.0 if "ties" in timing_ else None}}


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--k", type=int, nargs="+", default=[2, 3],
                   help="basis sizes of the reversible merge (the first is the headline, per site, and also runs "
                        "global)")
    p.add_argument("--only", choices=["reversible"], default=None,
                   help="re-measure only these rows (and alone, to check it); keep the rest of --out")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="training steps of missing adapters (default: the demo's)")
    p.add_argument("--store", type=Path, default=None, help="adapter store (default $ADAPTERKIT_HOME/store)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.n_test, a.reps = 40, 1
    out = a.out or RESULTS / ("merge_quick.json" if a.quick else "merge.json")
    torch.set_num_threads(a.threads)
    import peft
    import transformers

    from adapterkit.core.base import load_base
    from adapterkit.data import load_task
    from adapterkit.demo import DemoSettings
    from adapterkit.merge import merge_with_report
    from adapterkit.core.runtime import AdapterRuntime
    from adapterkit.store import AdapterStore

    settings = DemoSettings(head_lr=None, **({"steps": a.steps} if a.steps else {}))   # as measured (one lr)
    store = AdapterStore(a.store)
    base = load_base(a.base)
    log(f"base {base.name}, store {store.root}")
    adapters = task_adapters(base, store, TASKS, settings, progress=sys.stderr.isatty())
    tests = {t: load_task(t).test[: a.n_test] for t in TASKS}
    rt = AdapterRuntime.from_base(base)
    for ad in adapters.values():
        rt.add(ad)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rev_key = f"reversible k={a.k[0]} (per site)"
    if a.only:
        results = json.loads(out.read_text())
        alone = {t: accuracy(rt, adapters[t].name, adapters[t].head, tests[t], settings.max_length) for t in TASKS}
        if alone != results["alone"] or {t: len(v) for t, v in tests.items()} != results["n_test"]:
            sys.exit(f"alone accuracies {alone} differ from the ones in {out} ({results['alone']}): the adapters or "
                     "test rows changed, so the kept rows are stale; rerun the whole benchmark")
        log(f"alone: {alone} (as in {out})")
        rows = reversible_rows(rt, adapters, tests, a.k, settings.max_length)
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for row in rows.values():
            row["measured"] = {"date": when, "commit": commit, "threads": a.threads, "torch": torch.__version__}
        kept = list(results["methods"].items())
        ours = [(k, v) for k, v in kept if v["system"] == "adapterkit" and v["method"] != "reversible"]
        results["methods"] = {**dict(ours), **rows, **{k: v for k, v in kept if v["system"] != "adapterkit"}}
        finish(results, alone, rev_key)
        write(results, out)
        return
    results = {"benchmark": "merge", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "environment": {"threads": a.threads, "torch": torch.__version__,
                               "transformers": transformers.__version__, "peft": peft.__version__,
                               "commit": commit},
               "base": a.base, "tasks": list(TASKS), "n_test": {t: len(v) for t, v in tests.items()},
               "adapter_settings": settings.__dict__, "methods": {}}
    alone = {t: accuracy(rt, adapters[t].name, adapters[t].head, tests[t], settings.max_length) for t in TASKS}
    results["alone"] = alone
    log(f"alone: {alone}")
    inputs = [adapters[t] for t in TASKS]
    for label, method, params in OURS:
        merged, report = merge_with_report(inputs, method, name="bench-merged", **params)
        rt.add(merged)
        acc = {t: accuracy(rt, "bench-merged", adapters[t].head, tests[t], settings.max_length) for t in TASKS}
        rt.remove("bench-merged")
        results["methods"][label] = {"system": "adapterkit", "method": method, "params": params, "accuracy": acc,
                                     "merge_seconds": report.seconds, "refactor_error_total": report.total_error}
        log(f"{label}: {acc}")
    results["methods"].update(reversible_rows(rt, adapters, tests, a.k, settings.max_length))
    if not a.no_peft:
        for label, row in peft_accuracies(a.base, adapters, tests, settings.max_length, store).items():
            results["methods"][label] = {"system": "peft", **row}
    results["timing_8x_rank16_all_sites"] = timing(a.reps)
    finish(results, alone, rev_key)
    write(results, out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["methods"])
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4))
    width = 0.8 / len(results["tasks"])
    for j, task in enumerate(results["tasks"]):
        ax.bar([i + j * width for i in range(len(labels))],
               [results["methods"][m]["retention"][task] or 0.0 for m in labels], width, label=task)
    ax.plot([i + 0.4 - width / 2 for i in range(len(labels))], [results["methods"][m]["mean_retention"] or 0.0 for m in labels],
            "k_", markersize=18, label="mean")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("normalised retention (merged / alone)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
