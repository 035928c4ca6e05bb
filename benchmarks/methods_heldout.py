#!/usr/bin/env python
"""Each family's training defaults on a held-out task (DESIGN.md conventions 11-12: the per-method lr
factors were chosen on reuters-r8; these tasks were fixed before and never tuned on). Through the CLI,
with only the required flags and --method:

    adapterkit train --base minilm-l6 --train-file T.train.jsonl --eval-file T.validation.jsonl --name N --method M
    adapterkit eval N --file T.test.jsonl --json

    .venv/bin/python benchmarks/methods_heldout.py [--task debates-party] [--methods lora,ia3,bottleneck]

Results: benchmarks/results/methods_heldout.json (per run: test accuracy / macro-F1, wall time, params).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402
from heldout_tasks import write_jsonl  # noqa: E402


FLAGS = {"parallel": ["--method", "bottleneck", "--placement", "parallel"]}     # a family that is a placement


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="debates-party")
    p.add_argument("--methods", default="lora,ia3,bottleneck,parallel")
    p.add_argument("--base", default="minilm-l6")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods_heldout.json")
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="methods-heldout-"))
    write_jsonl(folder, (a.task,))
    store = folder / "store"
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    # a re-run of some methods keeps the others' rows (the file's date is the latest run's)
    results = json.loads(a.out.read_text())["runs"] if a.out.is_file() else {}
    for method in a.methods.split(","):
        name = f"{a.task}-{method}"
        flags = FLAGS.get(method, ["--method", method])
        cmd = ["train", "--base", a.base, "--train-file", str(folder / f"{a.task}.train.jsonl"), "--eval-file",
               str(folder / f"{a.task}.validation.jsonl"), "--name", name, *flags]
        log(f"adapterkit {' '.join(cmd)}")
        console, secs = cli(cmd + ["--store", str(store), "--no-progress"], env)
        got = json.loads(cli(["eval", name, "--file", str(folder / f"{a.task}.test.jsonl"), "--json", "--no-progress",
                              "--store", str(store)], env)[0])
        shown = json.loads(cli(["show", name, "--json", "--store", str(store)], env)[0])
        results[method] = {"command": "adapterkit " + " ".join(cmd), "wall_s": round(secs, 1),
                           "test": {k: got[k] for k in ("accuracy", "macro_f1", "n")},
                           "summary": shown.get("summary"), "parameters": shown.get("parameters"),
                           "lr": shown["lineage"][0]["params"].get("lr"), "console": console.strip().splitlines()}
        log(f"{method}: {results[method]['test']}, {secs:.0f} s")
    out = {"benchmark": "methods_heldout", "task": a.task, "base": a.base, "runs": results,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
