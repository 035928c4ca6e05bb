#!/usr/bin/env python
"""Tasks that keep arriving (issue 17's continual-learning benchmark), on MiniLM: the example tasks arrive
one by one, and after each one every task seen so far is scored.

  sequential  one LoRA trained task after task (`train --continue-from PREVIOUS`): the forgetting baseline
  router      one LoRA per task in the store and a retrieval router over the adapters seen so far (`route
              fit`): no forgetting by construction, limited by routing; a row counts as right when it is
              routed to its task's adapter and that adapter's head gets its label
  mora        MoRA experts (`train --method mora`, then `--continue-from PREVIOUS`): earlier experts frozen
  oracle      each task's own adapter, the task known (the upper bound the router is measured against)
A task's rows are classified by the current body with that task's head (the head trained with it).
Metrics: the accuracy matrix (after task k, on task j <= k), average accuracy at the end, backward
transfer (BWT: mean over j < T of acc[T][j] - acc[j][j]) and trainable parameters added per task.

Targets: the router loses <= 1 point per old task and reaches >= 95 % of the oracle's average; MoRA
forgets less (BWT closer to 0) than sequential LoRA at the same parameter count.

    .venv/bin/python benchmarks/continual.py [--tasks rt-sentiment,reuters-r8,election-tweets,chat-topics]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = "minilm-l6"
TASKS = ("rt-sentiment", "reuters-r8", "election-tweets", "chat-topics")
METHODS = ("sequential", "router", "mora", "oracle")


SMOKE: list[str] = []             # --smoke: every train run gets these flags (checks the script, numbers meaningless)


def store_dir() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit")) / "bench" / (
        "continual-smoke-store" if SMOKE else "continual-store")


def run(args: list[str], env: dict) -> str:
    extra = ["--no-progress", *SMOKE] if args[0] == "train" else []
    return cli([*args, *extra, "--store", str(store_dir())], env)[0]


def train_all(tasks: list[str], a, env: dict) -> None:
    """Every adapter the benchmark scores (kept in the store: a rerun trains only the missing ones)."""
    from adapterkit.store import AdapterStore

    st = AdapterStore(store_dir())
    for k, task in enumerate(tasks):
        jobs = [(f"ind-{task}", ["--method", "lora", "--r", str(a.r)]),
                (f"seq-{k}", ["--method", "lora", "--r", str(a.r)] + (["--continue-from", f"seq-{k - 1}"] if k else [])),
                (f"mora-{k}", ["--method", "mora", "--r", str(a.r)] + (["--continue-from", f"mora-{k - 1}"] if k else []))]
        for name, flags in jobs:
            if name not in st:
                log(f"train {name} on {task}")
                run(["train", "--base", BASE, "--task", task, "--name", name, *flags], env)


def accuracy_matrix(tasks: list[str], a) -> dict:
    """acc[method][k][j]: after task k, on task j <= k (a seeded sample of --test-rows test rows)."""
    import random

    from adapterkit.core.base import load_base
    from adapterkit.core.runtime import AdapterRuntime
    from adapterkit.data.tasks import load_task
    from adapterkit.route.api import fit_router
    from adapterkit.store import AdapterStore
    from adapterkit.train.run import score

    st = AdapterStore(store_dir())
    base = load_base(BASE)
    tests = {}
    for t in tasks:
        rows = list(load_task(t).test)
        tests[t] = rows if len(rows) <= a.test_rows else random.Random(t).sample(rows, a.test_rows)

    def scored(body_name: str, head_name: str, task: str) -> list[bool]:
        body, head = st.get(body_name), st.get(head_name)
        body.head = head.head
        rt = AdapterRuntime.from_base(base)
        rt.add(body)
        s = score(rt, body, tests[task])
        return [p == g for p, g in zip(s.predicted, s.gold)]

    acc: dict = {m: [] for m in METHODS}
    params: dict = {m: [] for m in METHODS}
    for k, task in enumerate(tasks):
        seen = tasks[: k + 1]
        for method, prefix in (("sequential", "seq"), ("mora", "mora")):
            acc[method].append([statistics.mean(scored(f"{prefix}-{k}", f"{prefix}-{j}", t)) for j, t in enumerate(seen)])
            params[method].append(st.show(f"{prefix}-{k}")["parameters"])
        acc["oracle"].append([statistics.mean(scored(f"ind-{t}", f"ind-{t}", t)) for t in seen])
        params["oracle"].append(sum(st.show(f"ind-{t}")["parameters"] for t in seen))
        names = [f"ind-{t}" for t in seen]
        if len(names) == 1:
            acc["router"].append(list(acc["oracle"][-1]))
        else:
            router = fit_router(st, names, f"continual-{k}", kind="retrieval", overwrite=True)
            row = []
            for t in seen:
                decisions = router.route([e.text for e in tests[t]])
                right = scored(f"ind-{t}", f"ind-{t}", t)
                row.append(statistics.mean(ok and next(iter(d.adapters), None) == f"ind-{t}"
                                           for ok, d in zip(right, decisions)))
            acc["router"].append(row)
        params["router"].append(params["oracle"][-1])
        log(f"after {task}: " + "; ".join(f"{m} {[round(x, 3) for x in acc[m][-1]]}" for m in METHODS))
    return {"accuracy": acc, "parameters": params}


def summary(tasks: list[str], got: dict) -> dict:
    acc, out = got["accuracy"], {}
    last = len(tasks) - 1
    for m in METHODS:
        final = acc[m][last]
        bwt = statistics.mean(final[j] - acc[m][j][j] for j in range(last)) if last else 0.0
        out[m] = {"average": statistics.mean(final), "bwt": bwt,
                  "worst_old_task_drop": max((acc[m][j][j] - final[j] for j in range(last)), default=0.0),
                  "parameters_final": got["parameters"][m][-1]}
    out["router_over_oracle"] = out["router"]["average"] / out["oracle"]["average"]
    out["targets"] = {"router_drop_le_1pt": out["router"]["worst_old_task_drop"] <= 0.01,
                      "router_ge_95pct_oracle": out["router_over_oracle"] >= 0.95,
                      "mora_forgets_less": out["mora"]["bwt"] > out["sequential"]["bwt"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--r", type=int, default=8, help="LoRA rank / MoRA experts per task")
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--out", type=Path, default=RESULTS / "continual.json")
    p.add_argument("--smoke", action="store_true", help="2 steps per run, 20 test rows, a separate store and "
                   "/tmp output: checks the script end to end")
    a = p.parse_args()
    if a.smoke:
        SMOKE.extend(["--steps", "2"])
        a.test_rows, a.out = 20, Path("/tmp/continual_smoke.json")
    tasks = a.tasks.split(",")
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    train_all(tasks, a, env)
    got = accuracy_matrix(tasks, a)
    result = {"benchmark": "continual", "base": BASE, "tasks": tasks, "r": a.r, "test_rows": a.test_rows, **got,
              "summary": summary(tasks, got), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
