#!/usr/bin/env python
"""Adapter updates (issue 17's benchmark): negative flips of a naive update vs a compatible one (MUSCLE),
through the CLI as a user runs it, on MiniLM (SmolLM2's runs take ~10x longer on two cores).

Per task and seed: v1 trained on a seeded 30 % of the training rows (`--train-rows`), v2 on all of them
(naive), v3 on all of them with `--compatible-with NAME@v1` (compatible; --compat-weight); both updates
compared with v1 on the test split (`adapterkit compare NAME@v1 NAME@vK --task T`): accuracy gain,
negative flip rate (v1 right, update wrong), positive flip rate. Rows append to results/update_runs.jsonl
(finished (task, seed, weight) rows are skipped). `--weight 0.3,1,3` trains one compatible update per
weight on the same v1 and naive v2 (a sweep on a tuning task costs one v1 and one v2, not one per weight).
`--start warm` starts the updates from v1 (`--continue-from v1 --head-init previous`; the naive v2 stays
fresh). `--runs F` keeps rows elsewhere (a tuning task's sweep: results/update_tune.jsonl); `--table` writes
the runs file's summary beside it (update_runs.jsonl -> update.json), one row per task, start and weight.
Each (task, seed) starts a fresh history (`adapterkit rm NAME` first).

Targets: the compatible update cuts the negative flip rate by >= 30 % relative to the naive one while
losing <= 0.5 points of its accuracy gain (means over >= 3 seeds).

    .venv/bin/python benchmarks/update.py [--tasks rt-sentiment,tweet-sentiment,reuters-r8] [--seeds 0,1,2]
    .venv/bin/python benchmarks/update.py --table
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
TASKS = ("rt-sentiment", "tweet-sentiment", "reuters-r8")
SHARE = 0.3
NFR_CUT, GAIN_LOSS = 0.30, 0.005


def store_dir() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit")) / "bench" / "update-store"


def run(args: list[str], env: dict) -> str:
    extra = ["--no-progress"] if args[0] in ("train", "compare") else []
    return cli([*args, *extra, "--store", str(store_dir())], env)[0]


def train_rows(task: str, env: dict) -> int:
    return json.loads(cli(["data", "show", task, "--json"], env)[0])["sizes"]["train"]


def compared(name: str, version: int, task: str, env: dict) -> dict:
    got = json.loads(run(["compare", f"{name}@v1", f"{name}@v{version}", "--task", task, "--json"], env))
    got.pop("negative_flip_rows", None)
    return got


def one(task: str, seed: int, weights: list[float], start: str, env: dict) -> list[dict]:
    """One row per compatibility weight: v1, the naive v2 (fresh adapter and head), then one compatible
    update per weight. start "warm": the updates start from v1 (`--continue-from v1 --head-init previous`),
    and a warm update without the compatibility term is trained first ("warm_naive"); "naive" stays the fresh
    v2, the baseline every row's cut is measured against."""
    name = f"upd-{task}-s{seed}"
    common = ["train", "--base", BASE, "--task", task, "--name", name, "--seed", str(seed)]
    n = max(1, round(SHARE * train_rows(task, env)))
    run(["rm", name, "--missing-ok"], env)          # a fresh history: `train --overwrite` would replace only
    run([*common, "--train-rows", str(n)], env)     # the promoted v1 and keep an earlier run's v2, v3, ...
    run(common, env)                                                            # v2: naive
    naive, version, extra = compared(name, 2, task, env), 2, {}
    update = common
    if start == "warm":
        update = [*common, "--continue-from", f"{name}@v1", "--head-init", "previous"]
        run(update, env)
        version += 1
        extra["warm_naive"] = compared(name, version, task, env)
    rows = []
    for w in weights:
        run([*update, "--compatible-with", f"{name}@v1", "--compat-weight", str(w)], env)
        version += 1
        rows.append({"task": task, "seed": seed, "v1_rows": n, "compat_weight": w, "start": start, "naive": naive,
                     **extra, "compatible": compared(name, version, task, env),
                     "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return rows


def table(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    # a warm row's update without the distillation term is the warm start alone: weight 0 (once per seed)
    rows += list({(r["task"], r["seed"]): {**r, "compat_weight": 0.0, "compatible": r["warm_naive"]}
                  for r in rows if "warm_naive" in r}.values())
    out = []
    def key(r: dict) -> tuple:
        return r["task"], r.get("start", "fresh"), r.get("compat_weight", 1.0)
    for task, start, weight in sorted(set(map(key, rows))):
        mine = [r for r in rows if key(r) == (task, start, weight)]
        cell = {"task": task, "start": start, "compat_weight": weight, "seeds": len(mine)}
        for kind in ("naive", "compatible"):
            for k in ("gain", "negative_flip_rate", "positive_flip_rate"):
                vals = [r[kind][k] for r in mine]
                cell[f"{kind}_{k}"] = statistics.mean(vals)
                cell[f"{kind}_{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cell["nfr_cut"] = 1 - cell["compatible_negative_flip_rate"] / max(cell["naive_negative_flip_rate"], 1e-12)
        cell["gain_lost"] = cell["naive_gain"] - cell["compatible_gain"]
        cell["met"] = cell["nfr_cut"] >= NFR_CUT and cell["gain_lost"] <= GAIN_LOSS
        out.append(cell)
    summary = path.with_name(path.stem.removesuffix("_runs") + ".json")
    summary.write_text(json.dumps({"benchmark": "update", "base": BASE, "runs": path.name, "rows": out}, indent=1)
                       + "\n")
    print("| task | start | weight | seeds | naive gain | naive NFR | compatible gain | compatible NFR | NFR cut | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in out:
        print(f"| {c['task']} | {c['start']} | {c['compat_weight']:g} | {c['seeds']} | {c['naive_gain']:+.3f} | "
              f"{c['naive_negative_flip_rate']:.3f} "
              f"({c['naive_negative_flip_rate_sd']:.3f}) | {c['compatible_gain']:+.3f} | "
              f"{c['compatible_negative_flip_rate']:.3f} ({c['compatible_negative_flip_rate_sd']:.3f}) | "
              f"{c['nfr_cut']:.0%} | {'yes' if c['met'] else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--weight", default="1", help="--compat-weight of the compatible update; a comma list "
                   "trains one per weight on the same v1 and naive v2")
    p.add_argument("--start", choices=("fresh", "warm"), default="fresh",
                   help="warm: the updates start from v1's tensors and head (--continue-from v1 --head-init previous)")
    p.add_argument("--runs", type=Path, default=RESULTS / "update_runs.jsonl")
    p.add_argument("--table", action="store_true")
    a = p.parse_args()
    if a.table:
        table(a.runs)
        return
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    done = set()
    if a.runs.is_file():
        done = {(r["task"], r["seed"], r.get("compat_weight", 1.0), r.get("start", "fresh"))
                for r in map(json.loads, filter(str.strip, a.runs.read_text().splitlines()))}
    weights = [float(w) for w in a.weight.split(",")]
    for task in a.tasks.split(","):
        for seed in map(int, a.seeds.split(",")):
            todo = [w for w in weights if (task, seed, w, a.start) not in done]
            if not todo:
                continue
            for r in one(task, seed, todo, a.start, env):
                with a.runs.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                log(f"{task} seed {seed} {a.start} weight {r['compat_weight']:g}: naive NFR "
                    f"{r['naive']['negative_flip_rate']:.3f} gain {r['naive']['gain']:+.3f}; compatible NFR "
                    f"{r['compatible']['negative_flip_rate']:.3f} gain {r['compatible']['gain']:+.3f}")
    table(a.runs)


if __name__ == "__main__":
    main()
