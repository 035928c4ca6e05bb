#!/usr/bin/env python
"""Learning from the adapters you have (issue 15's benchmark), on MiniLM (SmolLM2's runs take ~10x longer
on two cores): few-shot target tasks with the other example tasks' adapters as sources.

  sources   a LoRA adapter on the full training set of every task (CLI defaults), in a store kept under
            $ADAPTERKIT_HOME/bench/transfer-store; a target's own is its full-data ceiling (scored here)
  fewshot   per target, n in --sizes, seed in --seeds (--train-rows n --seed s):
              single            LoRA on the n rows
              scalearn-*        ScaLearn vector / uniform / shared over the other tasks' adapters and the
                                cell's single adapter (the target's own few-shot adapter is a source, as
                                in the paper)
              fusion            AdapterFusion over the same sources
              merge             linear and TIES merges of the other tasks' adapters, each with a fresh head
                                fitted on the n rows (a linear probe over the merged adapter); the one with
                                the better validation accuracy counts
            each cell scored on the target's test split; rows appended to results/transfer_runs.jsonl
            (done cells are skipped: the runs take hours, so the table fills over several sittings)
  stacking  MAD-X style, zero-shot, per seed: masked-LM domain adapters on rt-sentiment's and
            tweet-sentiment's texts; rt-sentiment's task adapter trained alone, and trained on top of the rt
            domain adapter; both scored on tweet-sentiment's positive and negative test rows (fresh =
            positive), the stacked one with the tweet domain adapter swapped in
  sweep     ScaLearn's and fusion's learning rates and steps on a tuning task (rt-sentiment, never a target;
            256 rows, validation split) beside the CLI default, and their start over seeds 0-2: the head random
            or the source's (--head-init source: the cell's own few-shot adapter's), and ScaLearn's ω at the
            paper's 2/N or at that source alone (--omega-init source): results/transfer_sweep.jsonl
  table     results/transfer.json, the README table (markdown) and results/transfer.png

Targets: ScaLearn within 1 point of AdapterFusion with <= 5% of its trainable parameters; ScaLearn above
the single few-shot adapter at 64 and 256 rows on both targets; stacking above the task adapter alone.

    .venv/bin/python benchmarks/transfer.py --part sources
    .venv/bin/python benchmarks/transfer.py --part sweep        # lr of ScaLearn / fusion on rt-sentiment
    .venv/bin/python benchmarks/transfer.py --part fewshot [--targets tweet-sentiment,election-tweets]
    .venv/bin/python benchmarks/transfer.py --part stacking
    .venv/bin/python benchmarks/transfer.py --part table
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RESULTS_SMOKE = Path(tempfile.gettempdir()) / "transfer-smoke-results"
BASE = "minilm-l6"
TASKS = ("rt-sentiment", "election-tweets", "tweet-sentiment", "reuters-r8", "chat-topics", "20newsgroups")
TARGETS = ("tweet-sentiment", "election-tweets")
SYSTEMS = {"single": [], "scalearn-vector": ["--method", "scalearn", "--variant", "vector"],
           "scalearn-uniform": ["--method", "scalearn", "--variant", "uniform"],
           "scalearn-shared": ["--method", "scalearn", "--variant", "shared"],
           "fusion": ["--method", "fusion"]}
MERGES = ("linear", "ties")
SMOKE: list[str] = []             # --smoke: every train run gets these flags (a few steps: checks the script)


def home() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit"))


def store_dir() -> Path:
    return home() / "bench" / ("transfer-smoke-store" if SMOKE else "transfer-store")


def results() -> Path:
    return RESULTS_SMOKE if SMOKE else RESULTS


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_cli(args: list[str], env: dict) -> tuple[str, float]:
    extra = (SMOKE if args[0] == "train" else []) + (["--no-progress"] if args[0] in ("train", "eval") else [])
    return cli([*args, *extra, "--store", str(store_dir())], env)


def scored(name: str, task: str, env: dict, extra: list[str] = ()) -> dict:
    got = json.loads(run_cli(["eval", name, "--task", task, "--split", "test", "--json", *extra], env)[0])
    return {k: got[k] for k in ("accuracy", "macro_f1", "n")}


def shown(name: str, env: dict) -> dict:
    return json.loads(run_cli(["show", name, "--json"], env)[0])


def part_sources(a, env) -> None:
    """Train the missing source adapters; score each target's own (the full-data ceiling) once."""
    from adapterkit.data.tasks import load_task
    from adapterkit.store import AdapterStore

    done = read_runs(a.runs)
    for task in TASKS:
        name = f"src-{task}"
        secs = None
        if name in AdapterStore(store_dir()):
            log(f"{name}: stored before")
        else:
            _, secs = run_cli(["train", "--base", BASE, "--task", task, "--name", name], env)
            log(f"{name}: trained in {secs:.0f} s")
        n = len(load_task(task).train)
        if task in a.targets and ((task, n, 0, "ceiling") not in done or a.redo):
            r = {"target": task, "n": n, "seed": 0, "system": "ceiling", "test": scored(name, task, env),
                 "parameters": shown(name, env).get("parameters"), "train_s": secs, "date": now()}
            with a.runs.open("a") as f:
                f.write(json.dumps(r) + "\n")
            log(f"ceiling {task}: {r['test']}")


def read_runs(path: Path) -> dict[tuple, dict]:
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[(r["target"], r["n"], r["seed"], r["system"])] = r
    return runs


def merge_with_probe(target: str, n: int, seed: int, sources: list[str]) -> dict:
    """The better (validation accuracy) of the sources' linear and TIES merges, each with a fresh head
    fitted on the cell's n rows over the merged adapter; scored on the test split (in process)."""
    import random

    from adapterkit import AdapterRuntime, load_base, merge
    from adapterkit.data.tasks import load_task
    from adapterkit.store import AdapterStore
    from adapterkit.train.probe import fit_probe
    from adapterkit.train.run import POOLING, evaluate

    store = AdapterStore(store_dir())
    base = load_base(BASE)
    task = load_task(target)
    rows = sorted(random.Random(seed).sample(range(len(task.train)), n))      # as train --train-rows does
    train = [task.train[i] for i in rows]
    best = None
    for method in MERGES:
        merged = merge([store.get(s) for s in sources], method=method, name=f"merge-{method}")
        rt = AdapterRuntime.from_base(base)
        rt.add(merged)
        rt.activate(merged.name)                     # the probe's features: base + the merged adapter
        merged.head = fit_probe(base, train, POOLING[base.kind], 128, seed=seed)
        rt.deactivate()
        val = evaluate(rt, merged, task.validation, 128)["accuracy"]
        if best is None or val > best[0]:
            best = (val, method, evaluate(rt, merged, task.test, 128))
    return {"test": {k: best[2][k] for k in ("accuracy", "macro_f1", "n")}, "merge": best[1],
            "validation_accuracy": best[0], "parameters": None}


def part_fewshot(a, env) -> None:
    from adapterkit.store import AdapterStore

    done = read_runs(a.runs)
    for target in a.targets:
        others = [f"src-{t}" for t in TASKS if t != target]
        for n in a.sizes:
            for seed in a.seeds:
                single = f"few-{target}-{n}-{seed}"
                for system, flags in SYSTEMS.items():
                    key = (target, n, seed, system)
                    if (key in done and not a.redo) or system not in a.systems:
                        continue
                    name = single if system == "single" else f"{system}-{target}-{n}-{seed}"
                    extra = [] if system == "single" else ["--sources", ",".join([*others, single])]
                    few = ["--base", BASE, "--task", target, "--train-rows", str(n), "--seed", str(seed), "--overwrite"]
                    if extra and single not in AdapterStore(store_dir()):     # its row is older than this store
                        run_cli(["train", "--name", single, *few], env)
                        log(f"{single}: retrained (a source of {name}; its row stays the first run's)")
                    _, secs = run_cli(["train", "--name", name, *few, *flags, *extra], env)
                    info = shown(name, env)
                    r = {"target": target, "n": n, "seed": seed, "system": system, "test": scored(name, target, env),
                         "parameters": info.get("parameters"), "train_s": round(secs, 1), "date": now()}
                    with a.runs.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    log(f"{key}: {r['test']} ({r['parameters']} params, {secs:.0f} s)")
                key = (target, n, seed, "merge")
                if (key not in done or a.redo) and "merge" in a.systems:
                    t0 = time.perf_counter()            # both merges, their probes and validation scores
                    got = merge_with_probe(target, n, seed, others)
                    r = {"target": target, "n": n, "seed": seed, "system": "merge", **got,
                         "train_s": round(time.perf_counter() - t0, 1), "date": now()}
                    with a.runs.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    log(f"{key}: {r['test']} ({r['merge']})")


SWEEP_TASK = "rt-sentiment"      # a tuning task, never a target: the defaults are chosen here, judged there
SWEEP_LR = {"scalearn-vector": (3e-3, 1e-2, 3e-2, 1e-1), "fusion": (1e-4, 5e-4, 2e-3, 5e-3)}
SWEEP_STEPS = {"single": (150, 400), "scalearn-vector": (50, 150, 400), "fusion": (50, 150)}   # 50: the default at 256
# rows, run explicitly so that the steps compare within one store of sources (the lr rows came from an earlier one)
SWEEP_HEADS = {"scalearn-vector": ("random", "source", "source+omega"), "fusion": ("random", "source")}  # seeds 0-2
HEAD_FLAGS = {"random": [], "source": ["--head-init", "source"],      # source+omega: ScaLearn starts as the own
              "source+omega": ["--head-init", "source", "--omega-init", "source"]}     # source alone, head and ω
SWEEP_SEEDS = (0, 1, 2)


def part_sweep(a, env) -> None:
    """Learning rates of ScaLearn and fusion, and the steps of the single adapter, ScaLearn and fusion (seed 0),
    and their head's start (--head-init random / source, seeds 0-2) on the tuning task (256 rows; the validation
    split), beside the CLI defaults (no --lr, no --steps); rows append to results/transfer_sweep.jsonl."""
    path = results() / "transfer_sweep.jsonl"
    # a row's key: system, lr, steps, --head-init (rows before it: random), seed (rows before it: 0)
    done = {(r["system"], r["lr"], r.get("steps"), r.get("head_init", "random"), r.get("seed", 0))
            for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))} if path.is_file() else set()
    n = 256
    from adapterkit.store import AdapterStore

    grid = [(system, lr, None, "random", 0) for system, lrs in SWEEP_LR.items() for lr in (None, *lrs)]
    grid += [(system, None, steps, "random", 0) for system, steps_list in SWEEP_STEPS.items()
             for steps in (None, *steps_list)]
    grid += [(system, None, None, head, seed) for seed in SWEEP_SEEDS for system, heads in SWEEP_HEADS.items()
             for head in heads]
    for system, lr, steps, head, seed in grid:
        if (system, lr, steps, head, seed) in done and not a.redo:
            continue
        single = f"few-{SWEEP_TASK}-{n}-{seed}"
        if single not in AdapterStore(store_dir()):
            run_cli(["train", "--base", BASE, "--task", SWEEP_TASK, "--name", single, "--train-rows", str(n),
                     "--seed", str(seed)], env)
        sources = [f"src-{t}" for t in TASKS if t != SWEEP_TASK] + [single]
        name = f"sweep-{system}-{lr or 'default'}" + (f"-{steps}steps" if steps else "") + \
            (f"-head-{head.replace('+', '-')}" if head != "random" else "") + (f"-seed{seed}" if seed else "")
        composed = ["--sources", ",".join(sources)] if SYSTEMS[system] else []
        _, secs = run_cli(["train", "--base", BASE, "--task", SWEEP_TASK, "--name", name, "--train-rows", str(n),
                           "--seed", str(seed), "--overwrite", *SYSTEMS[system], *composed,
                           *(["--lr", str(lr)] if lr else []), *(["--steps", str(steps)] if steps else []),
                           *HEAD_FLAGS[head]], env)
        got = json.loads(run_cli(["eval", name, "--task", SWEEP_TASK, "--split", "validation", "--json"], env)[0])
        r = {"system": system, "lr": lr, "steps": steps, "head_init": head, "seed": seed,
             "validation": {k: got[k] for k in ("accuracy", "macro_f1", "n")},
             "lineage_lr": shown(name, env)["lineage"][0]["params"].get("lr"), "train_s": round(secs, 1),
             "date": now()}
        with path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        log(f"sweep {system} lr {lr or 'default'} steps {steps or 'default'} head {head} seed {seed}: "
            f"{r['validation']}")


STACK_SYSTEMS = ("task_alone", "stacked_tweet_domain", "stacked_rt_domain")


def part_stacking(a, env) -> None:
    """Zero-shot rt-sentiment -> tweets per seed in --seeds: the task adapter alone vs trained on the rt domain
    adapter and run on the tweet domain adapter (MAD-X's swap). Every adapter of a seed trains with it (the
    domain adapters too); results/transfer_stacking.json keeps each seed's run and the mean (sd)."""
    from adapterkit.data.tasks import load_task

    path = results() / "transfer_stacking.json"
    runs = {} if a.redo or not path.is_file() else json.loads(path.read_text())["runs"]
    tmp = Path(tempfile.mkdtemp(prefix="transfer-"))
    tweets = tmp / "tweets-pos-neg.jsonl"           # rt's labels: fresh = positive, rotten = negative
    mapping = {"positive": "fresh", "negative": "rotten"}
    tweets.write_text("".join(json.dumps({"text": e.text, "label": mapping[e.label]}) + "\n"
                              for e in load_task("tweet-sentiment").test if e.label in mapping))
    for seed in a.seeds:
        if str(seed) in runs:
            continue
        tag = "" if seed == 0 else f"-s{seed}"      # seed 0 keeps the names of the first run
        train = ["--seed", str(seed), "--overwrite"]
        for task, name in (("rt-sentiment", "dom-rt"), ("tweet-sentiment", "dom-tweets")):
            text = tmp / f"{name}.txt"
            text.write_text("\n".join(e.text.replace("\n", " ") for e in load_task(task).train) + "\n")
            run_cli(["train", "--base", BASE, "--objective", "mlm", "--train-file", str(text), "--name",
                     name + tag, *train], env)
        run_cli(["train", "--base", BASE, "--task", "rt-sentiment", "--name", "task-rt" + tag, *train], env)
        run_cli(["train", "--base", BASE, "--task", "rt-sentiment", "--name", "task-rt-on-dom" + tag,
                 "--stack-on", "dom-rt" + tag, *train], env)

        def on_tweets(name: str, stack: str) -> dict:
            got = json.loads(run_cli(["eval", name, "--file", str(tweets), "--json", "--stack-on", stack], env)[0])
            return {k: got[k] for k in ("accuracy", "macro_f1", "n")}
        runs[str(seed)] = {"task_alone": on_tweets("task-rt" + tag, "none"),
                           "stacked_tweet_domain": on_tweets("task-rt-on-dom" + tag, "dom-tweets" + tag),
                           "stacked_rt_domain": on_tweets("task-rt-on-dom" + tag, "dom-rt" + tag), "date": now()}
        log(f"stacking seed {seed}: {runs[str(seed)]}")
        out = {"runs": runs}
        for system in STACK_SYSTEMS:
            acc = [r[system]["accuracy"] for r in runs.values()]
            out[system] = {"accuracy": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1
                           else 0.0, "macro_f1": statistics.mean(r[system]["macro_f1"] for r in runs.values()),
                           "seeds": len(acc)}
        tmp_out = path.with_suffix(".tmp")          # atomic: a killed run keeps the seeds before it
        tmp_out.write_text(json.dumps(out, indent=1) + "\n")
        tmp_out.replace(path)


def part_table(a, env) -> None:
    runs = read_runs(a.runs)
    cells: dict[tuple, list[dict]] = {}
    for (target, n, seed, system), r in runs.items():
        cells.setdefault((target, n, system), []).append(r)
    rows = []
    for (target, n, system), rs in sorted(cells.items()):
        acc = [r["test"]["accuracy"] for r in rs]
        f1 = [r["test"]["macro_f1"] for r in rs]
        rows.append({"target": target, "n": n, "system": system, "seeds": len(rs), "accuracy": statistics.mean(acc),
                     "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0, "macro_f1": statistics.mean(f1),
                     "parameters": rs[0].get("parameters"),
                     "train_s": statistics.mean(r.get("train_s") or 0 for r in rs)})
    (results() / "transfer.json").write_text(json.dumps({"benchmark": "transfer", "base": BASE, "rows": rows},
                                                      indent=1) + "\n")
    print("| target | n | system | seeds | accuracy (sd) | macro-F1 | trainable params | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = "" if r["parameters"] is None else f"{r['parameters']:,}"
        print(f"| {r['target']} | {r['n']} | {r['system']} | {r['seeds']} | {r['accuracy']:.3f} "
              f"({r['accuracy_sd']:.3f}) | {r['macro_f1']:.3f} | {params} | {r['train_s']:.0f} |")
    stacking = results() / "transfer_stacking.json"
    plot(rows, json.loads(stacking.read_text()) if stacking.exists() else None)


def plot(rows: list[dict], stacking: dict | None) -> None:
    """Accuracy against few-shot rows per target (mean over seeds, bars = sd; the ceiling dashed), and the
    stacking swap as bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4.2 * (len(targets) + 1), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        mine = [r for r in rows if r["target"] == target]
        for system in [*SYSTEMS, "merge"]:
            pts = sorted((r["n"], r["accuracy"], r["accuracy_sd"]) for r in mine if r["system"] == system)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=system)
        for r in mine:
            if r["system"] == "ceiling":
                ax.axhline(r["accuracy"], color="grey", ls="--", label=f"full data ({r['n']:,} rows)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training rows")
        ax.set_ylabel("test accuracy")
        ax.set_title(target, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    if stacking:
        bars = {"task alone": stacking["task_alone"], "on tweet domain": stacking["stacked_tweet_domain"],
                "on rt domain": stacking["stacked_rt_domain"]}
        ax.bar(list(bars), [b["accuracy"] for b in bars.values()], yerr=[b["accuracy_sd"] for b in bars.values()],
               capsize=3, color=["grey", "tab:green", "tab:blue"])
        ax.set_ylim(0.4, 1.0)
        ax.tick_params(axis="x", labelsize=8)
    ax.set_title("rt-sentiment task adapter, zero-shot on tweets", fontsize=10)
    fig.tight_layout()
    fig.savefig(results() / "transfer.png", dpi=110)
    log(f"wrote {results() / 'transfer.png'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("sources", "sweep", "fewshot", "stacking", "table"), required=True)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--sizes", default="64,256,1024")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", type=Path, default=RESULTS / "transfer_runs.jsonl")
    p.add_argument("--systems", default=",".join([*SYSTEMS, "merge"]), help="fewshot: only these systems (e.g. "
                   "single,merge first: the compositions' runs compose the cell's single adapter)")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--smoke", action="store_true", help="4 steps per run, one size (32) and seed, a separate store "
                   "and runs file under /tmp: checks the script end to end in minutes (numbers meaningless)")
    a = p.parse_args()
    if a.smoke:
        SMOKE.extend(["--steps", "4"])
        a.sizes, a.seeds, a.runs = "32", "0", Path(tempfile.gettempdir()) / "transfer_smoke_runs.jsonl"
        RESULTS_SMOKE.mkdir(exist_ok=True)
    a.targets = a.targets.split(",")
    a.sizes = [int(x) for x in a.sizes.split(",")]
    a.seeds = [int(x) for x in a.seeds.split(",")]
    a.systems = a.systems.split(",")
    unknown = set(a.systems) - {*SYSTEMS, "merge"}
    if unknown:
        p.error(f"--systems: unknown {sorted(unknown)}; choose among {', '.join([*SYSTEMS, 'merge'])}")
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    {"sources": part_sources, "sweep": part_sweep, "fewshot": part_fewshot, "stacking": part_stacking,
     "table": part_table}[a.part](a, env)


if __name__ == "__main__":
    main()
