#!/usr/bin/env python
"""Training defaults (issue 12 §1, DESIGN.md convention 11): what `adapterkit train` gives with ONLY
--base, --task and --name, side by side with the README's tuned command, through the CLI.

Per run, one after the other in one process tree (the same machine state):
  defaults   adapterkit train --base B --task T --name N
  tuned      adapterkit train --base B --task T --name N --steps S --batch-size 16 --lr 2e-3 --head-lr 2e-3
             --warmup S/10 --eval-every 0  (the settings of every README training number, benchmarks/train.py:
             one learning rate for adapter and head, no checks during training)
each followed by `adapterkit eval N --task T --split test --json`. The causal-LM and masked-LM runs
compare the defaults with the defaults before issue 12 (lr 2e-4, batch 8, 300 steps, no warm-up) on
their validation file: loss and greedy exact match (causal-LM), masked-token loss and accuracy (mlm). Wall time is the whole `train`
command (start-up, base load, tokenising, training, validation) as a user waits for it.

Targets: MiniLM reuters-r8 >= 0.95 and SmolLM2 election-tweets >= 0.93 test accuracy with the
defaults, each in no more wall time than the tuned command. The held-out tasks' defaults are
measured by benchmarks/route_heldout.py (it trains its adapters with the defaults).

    .venv/bin/python benchmarks/train_defaults.py [--runs minilm-reuters-r8,smollm2-election-tweets]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402

RUNS = {
    "minilm-reuters-r8": dict(base="minilm-l6", task="reuters-r8", tuned_steps=200, target=0.95),
    "smollm2-election-tweets": dict(base="smollm2-135m", task="election-tweets", tuned_steps=300, target=0.93),
    # causal-LM: tweet-sentiment as chat instructions (150 train, 60 validation rows; a causal-LM step of
    # SmolLM2 costs ~7 s here); the label is the answer, so greedy exact match is meaningful.
    "smollm2-instruct-tweet-sentiment": dict(base="smollm2-135m", task="tweet-sentiment", objective="causal-lm",
                                             n_train=150, n_eval=60, target=None),
    # masked-LM (a language adapter): the held-out chat-language lines (benchmarks/heldout_tasks.py) as text
    "minilm-mlm-chat-language": dict(base="minilm-l6", task="chat-language", objective="mlm", target=None),
}
OLD_DEFAULTS = ["--steps", "300", "--batch-size", "8", "--lr", "2e-4", "--warmup", "0", "--eval-every", "0"]
QUESTION = "What is the sentiment of this tweet? Answer with one word: positive, negative or neutral.\n\n"


def text_files(task: str, folder: Path) -> tuple[Path, Path]:
    """A held-out task's train / validation texts, one per line (masked-LM training reads .txt)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from heldout_tasks import load

    splits = load(task)
    paths = []
    for split in ("train", "validation"):
        path = folder / f"{task}.{split}.txt"
        path.write_text("".join(" ".join(r["text"].split()) + "\n" for r in splits[split]), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def instruction_files(task: str, n_train: int, n_eval: int, folder: Path) -> tuple[Path, Path]:
    """The task's train / validation rows as chat records whose assistant answer is the label."""
    sys.path.insert(0, str(ROOT / "src"))
    from adapterkit.data import load_task

    t = load_task(task)
    paths = []
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = [{"messages": [{"role": "user", "content": QUESTION + e.text}, {"role": "assistant", "content": e.label}]}
                for e in t.split(split)[:n]]
        path = folder / f"{task}-instruct.{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--no-baselines", action="store_true", help="causal-LM / masked-LM runs: skip the old defaults")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_defaults.json")
    a = p.parse_args()
    store = Path(tempfile.mkdtemp(prefix="train-defaults-")) / "store"
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results = {}
    for run in a.runs.split(","):
        spec = RUNS[run]
        name = {"defaults": f"{run}-defaults"}
        if spec.get("objective") in ("causal-lm", "mlm"):
            train_file, eval_file = (instruction_files(spec["task"], spec["n_train"], spec["n_eval"], store.parent)
                                     if spec["objective"] == "causal-lm" else text_files(spec["task"], store.parent))
            data = ["--objective", spec["objective"], "--train-file", str(train_file), "--eval-file", str(eval_file)]
            scoring = ["--file", str(eval_file)]
            commands = {"defaults": ["train", "--base", spec["base"], *data, "--name", f"{run}-defaults"]}
            if not a.no_baselines:
                commands["old_defaults"] = ["train", "--base", spec["base"], *data, "--name", f"{run}-old", *OLD_DEFAULTS]
        else:
            s = spec["tuned_steps"]
            scoring = ["--task", spec["task"], "--split", "test"]
            commands = {
                "defaults": ["train", "--base", spec["base"], "--task", spec["task"], "--name", f"{run}-defaults"],
                # as the README's runs were made: one lr for adapter and head, no validation checks
                "tuned": ["train", "--base", spec["base"], "--task", spec["task"], "--name", f"{run}-tuned", "--steps",
                          str(s), "--batch-size", "16", "--lr", "2e-3", "--head-lr", "2e-3", "--warmup", str(s // 10),
                          "--eval-every", "0"],
            }
        results[run] = {"target": spec["target"]}
        for kind, cmd in commands.items():
            log(f"{run} {kind}: adapterkit {' '.join(cmd)}")
            console, secs = cli(cmd + ["--store", str(store), "--no-progress"], env)
            name = cmd[cmd.index("--name") + 1]
            got = json.loads(cli(["eval", name, *scoring, "--json", "--no-progress", "--store", str(store)], env)[0])
            shown = json.loads(cli(["show", name, "--json", "--store", str(store)], env)[0])
            params = shown["lineage"][0]["params"]
            scores = {k: got[k] for k in ("accuracy", "macro_f1", "exact_match", "loss", "perplexity", "n") if k in got}
            results[run][kind] = {"command": "adapterkit " + " ".join(cmd), "wall_s": round(secs, 1),
                                  "scores": scores, "split": "test" if "--task" in scoring else "validation file",
                                  "validation": shown["metrics"], "console": console.strip().splitlines(),
                                  "params": {k: params.get(k) for k in ("steps", "batch_size", "lr", "head_lr",
                                                                         "warmup_steps", "eval_every", "best_step",
                                                                         "max_length", "truncated_examples")}}
            log(f"{run} {kind}: {scores}, {secs:.0f} s")
        if "tuned" in results[run]:
            d, t = results[run]["defaults"], results[run]["tuned"]
            results[run]["summary"] = {"meets_accuracy": d["scores"]["accuracy"] >= spec["target"],
                                       "wall_ratio_defaults_over_tuned": round(d["wall_s"] / t["wall_s"], 3),
                                       "meets_wall_time": d["wall_s"] <= t["wall_s"]}
    import torch

    out = {"benchmark": "train_defaults", "runs": results,
           "environment": {"torch": torch.__version__, "threads": int(env["OMP_NUM_THREADS"]),
                           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                    cwd=ROOT).stdout.strip(),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    if a.out.exists():                                   # keep the runs not measured this time
        old = json.loads(a.out.read_text())
        out["runs"] = {**old.get("runs", {}), **results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
