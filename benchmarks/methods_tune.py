#!/usr/bin/env python
"""Choose a family's default on a tuning task, never on the comparison's four (DESIGN.md convention 12):
train through the CLI with the family's flags plus the candidate's, score the tuning task's
validation split, append one row to results/methods_tune.jsonl.

    .venv/bin/python benchmarks/methods_tune.py --task 20newsgroups --family parallel --flags "--scaling 4"

The tuning task for a parallel bottleneck's scale and lr (SmolLM2 and MiniLM) and for LT-SFT's sparse-phase
lr (SmolLM2) is chat-topics (21 topics, validation 187 rows): none of the comparison's tasks
(benchmarks/methods.py) and not the methods' held-out task (debates-party). The rows made are in
results/methods_tune.jsonl (the choices: train/defaults.py PARALLEL_SCALING_BY_KIND, METHOD_LR_BY_KIND and
SPARSE_PHASE_LR_BY_KIND; LoRA's rows give the bar).
20newsgroups (1,126 validation rows) was tried first and stopped: its long posts make a SmolLM2 step
~11 s on one core (~45 min a run), too slow for a re-measurement in the same sitting.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402
from methods import FAMILIES, TASKS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
COMPARED = {task for _, task in TASKS.values()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--task", required=True)
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--flags", default="", help="the candidate's extra train flags, one shell-quoted string")
    ap.add_argument("--runs", type=Path, default=RESULTS / "methods_tune.jsonl")
    a = ap.parse_args()
    if a.task in COMPARED:
        raise SystemExit(f"{a.task} is one of the comparison's tasks; tune on another (convention 12)")
    env = dict(os.environ)
    store = Path(tempfile.mkdtemp(prefix="methods-tune-")) / "store"
    name = f"tune-{a.task}-{a.family}"
    extra = shlex.split(a.flags)
    cmd = ["train", "--base", a.base, "--task", a.task, "--name", name, *FAMILIES[a.family], *extra]
    log(f"adapterkit {' '.join(cmd)}")
    console, secs = cli(cmd + ["--store", str(store), "--no-progress", "--overwrite"], env)
    got = json.loads(cli(["eval", name, "--task", a.task, "--split", "validation", "--json", "--no-progress",
                          "--store", str(store)], env)[0])
    row = {"base": a.base, "task": a.task, "family": a.family, "flags": a.flags, "split": "validation",
           "command": "adapterkit " + " ".join(cmd), "wall_s": round(secs, 1),
           "validation": {k: got[k] for k in ("accuracy", "macro_f1", "n")},
           "console": console.strip().splitlines()[-4:],
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with a.runs.open("a") as f:
        f.write(json.dumps(row) + "\n")
    log(f"{a.base} {a.task} {a.family} {a.flags!r}: {row['validation']} in {secs:.0f} s")


if __name__ == "__main__":
    main()
