#!/usr/bin/env python
"""Routers on tasks they were not developed on (issue 12 §2, conventions 11-12), through the CLI only.

The four held-out tasks of benchmarks/heldout_tasks.py (fixed before tuning) are written as JSONL; a
MiniLM adapter is trained on each with `adapterkit train` and ONLY its required flags (so this also
measures the training defaults on held-out tasks); 400 train examples per adapter go to
`route fit --examples`; every router kind is fitted on them with its defaults and scored by
`route eval --file` on a shuffled mix of the tasks' test splits (up to --n-test per task): routing
accuracy, fallback rate, and end-to-end accuracy (each prompt through the routed adapter + head) as a
share of the oracle's (each prompt through its own task's adapter).

    .venv/bin/python benchmarks/route_heldout.py            # writes results/route_heldout.json

Adapters are reused from the benchmark's store (--work) when present; --retrain trains them again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402
from heldout_tasks import TASKS, write_jsonl  # noqa: E402

KINDS = ("retrieval", "linear")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "route_heldout")
    p.add_argument("--n-examples", type=int, default=400, help="route fit examples per adapter")
    p.add_argument("--n-test", type=int, default=150, help="test prompts per task")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--old-defaults", action="store_true", help="only train and score each task with the training "
                   "defaults from before issue 12 (lr 2e-4, batch 8, 300 steps, no warm-up, no checks) and add "
                   "them to the results file")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "route_heldout.json")
    a = p.parse_args()
    data, store = a.work / "data", a.work / "store"
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t_start = time.perf_counter()
    sizes = write_jsonl(data)
    log(f"held-out tasks written to {data}: {sizes}")
    if a.old_defaults:
        return old_defaults(a, data, store, env)
    adapters, training = [f"ho-{t}" for t in TASKS], {}
    listed = json.loads(cli(["ls", "--store", str(store), "--json"], env)[0]) if store.exists() else []
    have = {row["name"] for row in listed}
    for task, name in zip(TASKS, adapters):
        if name in have and not a.retrain:
            log(f"{name}: reused from {store}")
            continue
        log(f"training {name} with the defaults (only the required flags)")
        out, secs = cli(["train", "--base", "minilm-l6", "--name", name, "--train-file", str(data / f"{task}.train.jsonl"),
                        "--eval-file", str(data / f"{task}.validation.jsonl"), "--store", str(store), "--no-progress",
                        *(["--overwrite"] if name in have else [])], env)
        training[name] = {"seconds": round(secs, 1), "console": out.strip().splitlines()[-4:]}
    oracle = {}
    for task, name in zip(TASKS, adapters):
        got = json.loads(cli(["eval", name, "--file", str(data / f"{task}.test.jsonl"), "--store", str(store), "--json",
                             "--no-progress"], env)[0])
        oracle[name] = {"test_accuracy": got["accuracy"], "macro_f1": got["macro_f1"], "n": got["n"]}
        log(f"{name}: test accuracy {got['accuracy']:.3f} on all {got['n']} test rows")
    rng = random.Random(0)
    examples, test = [], []
    for task, name in zip(TASKS, adapters):
        train = [json.loads(x) for x in (data / f"{task}.train.jsonl").read_text().splitlines()]
        examples += [{"text": r["text"], "adapter": name} for r in train[: a.n_examples]]
        rows = [json.loads(x) for x in (data / f"{task}.test.jsonl").read_text().splitlines()]
        test += [{"text": r["text"], "adapter": name, "label": r["label"], "task": task} for r in rows[: a.n_test]]
    rng.shuffle(test)
    (a.work / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))
    (a.work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    routers = {}
    for kind in a.kinds.split(","):
        out, fit_s = cli(["route", "fit", "--adapters", ",".join(adapters), "--name", f"ho-{kind}", "--kind", kind,
                          "--examples", str(a.work / "examples.jsonl"), "--store", str(store), "--overwrite", "--json"],
                         env)
        meta = json.loads(out)
        got, eval_s = cli(["route", "eval", f"ho-{kind}", "--file", str(a.work / "test.jsonl"), "--store", str(store),
                          "--json"], env)
        rep = json.loads(got)
        routers[kind] = {"routing_accuracy": rep["routing_accuracy"], "fallback_rate": rep["fallback_rate"],
                         "end_to_end": rep["end_to_end"], "per_adapter_accuracy": rep["per_adapter_accuracy"],
                         "columns": rep["columns"], "confusion": rep["confusion"], "fit_s": round(fit_s, 1),
                         "eval_s": round(eval_s, 1), "calibration": meta["calibration"]}
        log(f"{kind}: routing {rep['routing_accuracy']:.3f}, fallback {rep['fallback_rate']:.3f}, end to end "
            f"{rep['end_to_end']['ratio']:.3f} of the oracle (fit {fit_s:.0f} s incl. start-up)")
    import torch

    result = {"benchmark": "route_heldout", "tasks": list(TASKS), "split_sizes": sizes, "n_examples": a.n_examples,
              "n_test_per_task": a.n_test, "n_test": len(test), "oracle": oracle, "training": training,
              "routers": routers, "seconds": round(time.perf_counter() - t_start, 1),
              "environment": {"torch": torch.__version__, "threads": int(env["OMP_NUM_THREADS"]),
                              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                       cwd=ROOT).stdout.strip(),
                              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {a.out}")


OLD = ["--steps", "300", "--batch-size", "8", "--lr", "2e-4", "--warmup", "0", "--eval-every", "0"]


def old_defaults(a, data: Path, store: Path, env: dict) -> None:
    """The held-out tasks trained with the pre-issue-12 defaults, scored on their test splits, added
    to the results file under "old_defaults" (the run with today's defaults is in "oracle")."""
    old = {}
    for task in TASKS:
        name = f"ho-{task}-old"
        _, secs = cli(["train", "--base", "minilm-l6", "--name", name, "--train-file", str(data / f"{task}.train.jsonl"),
                       "--eval-file", str(data / f"{task}.validation.jsonl"), "--store", str(store), "--no-progress",
                       "--overwrite", *OLD], env)
        got = json.loads(cli(["eval", name, "--file", str(data / f"{task}.test.jsonl"), "--store", str(store), "--json",
                              "--no-progress"], env)[0])
        old[f"ho-{task}"] = {"test_accuracy": got["accuracy"], "macro_f1": got["macro_f1"], "n": got["n"],
                             "train_wall_s": round(secs, 1), "flags": " ".join(OLD)}
        log(f"{name}: test accuracy {got['accuracy']:.3f}, macro-F1 {got['macro_f1']:.3f} ({secs:.0f} s)")
    result = json.loads(a.out.read_text()) if a.out.exists() else {}
    result["old_defaults"] = old
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"added old_defaults to {a.out}")


if __name__ == "__main__":
    main()
