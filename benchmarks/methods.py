#!/usr/bin/env python
"""The LLM-Adapters comparison on this project's tasks (issue 13's benchmark): each adapter family
trained with the CLI's defaults (only --base, --task, --name and the family's --method flags), scored
on the task's test split.

  tasks     smollm2-135m on rt-sentiment, election-tweets, tweet-sentiment; minilm-l6 on reuters-r8
  families  lora (r=8), ia3, pfeiffer (bottleneck after the MLP), parallel (bottleneck beside the MLP),
            sparse (LT-SFT, 1 % of the attention and MLP weights: about LoRA r=8's parameter count)

    adapterkit train --base B --task T --name N --method M [--placement P]
    adapterkit eval N --task T --split test --json

Parts:
  accuracy  one run per (task, family); each finished run is appended to results/methods_runs.jsonl and
            skipped when the benchmark is started again (the SmolLM2 runs take 10-20 min each on two
            cores, so the table fills over several sittings; --redo runs them again)
  steps     train step time, side by side: every family of one base trains --timing-steps steps on the
            same task, alternated over --rounds rounds, on an otherwise idle machine (median of the
            step times of the train log, first two steps left out)
  table     results/methods.json, the README table (markdown on stdout) and results/methods.png from the
            runs present, with the mixed-family decode step of results/methods_decode.json
            (benchmarks/methods_decode.py)

Target: every family within 2 points of LoRA's test accuracy on at least 3 of the 4 tasks.

    .venv/bin/python benchmarks/methods.py --part accuracy [--tasks smollm2:rt-sentiment,...] [--families ...]
    .venv/bin/python benchmarks/methods.py --part steps
    .venv/bin/python benchmarks/methods.py --part table
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log, median_step_seconds, read_runs as read_jsonl_runs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = {"smollm2:rt-sentiment": ("smollm2-135m", "rt-sentiment"),
         "smollm2:election-tweets": ("smollm2-135m", "election-tweets"),
         "smollm2:tweet-sentiment": ("smollm2-135m", "tweet-sentiment"),
         "minilm:reuters-r8": ("minilm-l6", "reuters-r8")}
FAMILIES = {"lora": ["--method", "lora"], "ia3": ["--method", "ia3"],
            "pfeiffer": ["--method", "bottleneck", "--placement", "pfeiffer"],
            "parallel": ["--method", "bottleneck", "--placement", "parallel"],
            "sparse": ["--method", "sparse"]}
WITHIN = 0.02                     # points of accuracy (as a fraction) a family may trail LoRA by


def stored_bytes(folder: Path) -> int:
    """Bytes of an adapter's weights as stored (its safetensors files: adapter and head)."""
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors") if "checkpoint" not in f.parts)


def step_seconds(store: Path, name: str) -> float | None:
    """Median seconds of one optimizer step of a run (its train log, the first two steps left out)."""
    return median_step_seconds(store / "runs" / name / "train_log.jsonl")


def train_and_score(key: str, family: str, store: Path, env: dict, extra: list[str]) -> dict:
    base, task = TASKS[key]
    name = f"{key.replace(':', '-')}-{family}"
    cmd = ["train", "--base", base, "--task", task, "--name", name, *FAMILIES[family], *extra]
    log(f"adapterkit {' '.join(cmd)}")
    console, secs = cli(cmd + ["--store", str(store), "--no-progress", "--overwrite"], env)
    return score(key, family, name, cmd, store, env, console, secs)


def score_stored(key: str, family: str, store: Path, env: dict) -> dict:
    """The row of a run whose training finished but whose scoring did not (the process was stopped):
    its stored adapter scored on the test split; wall time and console come from its train log."""
    base, task = TASKS[key]
    name = f"{key.replace(':', '-')}-{family}"
    cmd = ["train", "--base", base, "--task", task, "--name", name, *FAMILIES[family]]
    lines = (store / "runs" / name / "train_log.jsonl").read_text().splitlines()
    secs = sum(json.loads(x).get("seconds") or 0.0 for x in lines if x.strip())
    note = (f"scored later from the stored adapter in {store} (training's console was lost; wall_s: the sum of "
            "its logged step times, validation checks and loading left out)")
    return score(key, family, name, cmd, store, env, note, secs)


def score(key: str, family: str, name: str, cmd: list[str], store: Path, env: dict, console: str,
          secs: float) -> dict:
    task = TASKS[key][1]
    got = json.loads(cli(["eval", name, "--task", task, "--split", "test", "--json", "--no-progress",
                          "--store", str(store)], env)[0])
    shown = json.loads(cli(["show", name, "--json", "--store", str(store)], env)[0])
    folder = Path(shown["path"])
    params = shown["lineage"][0]["params"]
    return {"task": key, "family": family, "command": "adapterkit " + " ".join(cmd), "wall_s": round(secs, 1),
            "test": {k: got[k] for k in ("accuracy", "macro_f1", "n")}, "summary": shown.get("summary"),
            "parameters": shown.get("parameters"), "stored_bytes": stored_bytes(folder),
            "step_s": step_seconds(store, name),
            "params": {k: params.get(k) for k in ("steps", "batch_size", "lr", "head_lr", "best_step", "dense_steps",
                                                  "sparse_params")},
            "console": console.strip().splitlines()[-6:],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def read_runs(path: Path) -> dict[tuple[str, str], dict]:
    return read_jsonl_runs(path, ("task", "family"))


def part_accuracy(a, env) -> None:
    done = read_runs(a.runs)
    store = a.score_store or Path(tempfile.mkdtemp(prefix="methods-")) / "store"
    for key in a.tasks:
        for family in a.families:
            if (key, family) in done and not a.redo:
                log(f"{key} {family}: done before ({done[key, family]['test']}); --redo runs it again")
                continue
            r = (score_stored(key, family, store, env) if a.score_store
                 else train_and_score(key, family, store, env, []))
            with a.runs.open("a") as f:
                f.write(json.dumps(r) + "\n")
            log(f"{key} {family}: {r['test']}, {r['parameters']} params, {r['wall_s']:.0f} s")


def part_steps(a, env) -> None:
    """Train step time of every family, alternated, per base (its first task in --tasks)."""
    store = Path(tempfile.mkdtemp(prefix="methods-steps-")) / "store"
    bases = {}
    for key in a.tasks:
        bases.setdefault(TASKS[key][0], key)
    path = RESULTS / "methods_steps.json"
    # --families re-times some families: their rows replace the file's, the others' rows stay (with their date)
    out = json.loads(path.read_text()) if path.is_file() else {"bases": {}}
    out.update({"timing_steps": a.timing_steps, "rounds": a.rounds})
    for base, key in bases.items():
        times: dict[str, list[float]] = {f: [] for f in a.families}
        for rnd in range(a.rounds):
            for family in a.families:
                name = f"steps-{key.replace(':', '-')}-{family}"
                cmd = ["train", "--base", base, "--task", TASKS[key][1], "--name", name, *FAMILIES[family],
                       "--steps", str(a.timing_steps), "--eval-every", "0", "--overwrite", "--no-progress",
                       "--store", str(store)]
                if family == "sparse":       # the sparse phase's steps (the dense phase is a LoRA-free full step)
                    cmd += ["--dense-steps", str(a.timing_steps)]
                cli(cmd, env)
                times[family].append(step_seconds(store, name))
                log(f"{base} round {rnd} {family}: {times[family][-1]:.3f} s/step")
        date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        kept = out["bases"].get(base, {})
        old_date = out.get("date")
        medians = {f: statistics.median(v) for f, v in times.items()}
        dates = {**{f: old_date for f in kept.get("step_s", {})}, **kept.get("dates", {}), **{f: date for f in times}}
        out["bases"][base] = {"task": key, "step_s": {**kept.get("step_s", {}), **medians},
                              "all": {**kept.get("all", {}), **times}, "dates": dates}
    out["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")


def part_table(a) -> None:
    runs = read_runs(a.runs)
    steps_file, decode_file = RESULTS / "methods_steps.json", RESULTS / "methods_decode.json"
    steps = json.loads(steps_file.read_text())["bases"] if steps_file.is_file() else {}
    decode = json.loads(decode_file.read_text()) if decode_file.is_file() else None
    rows, verdict = [], {}
    for key in TASKS:
        lora = runs.get((key, "lora"))
        for family in FAMILIES:
            r = runs.get((key, family))
            if r is None:
                continue
            gap = None if lora is None else r["test"]["accuracy"] - lora["test"]["accuracy"]
            step = steps.get(TASKS[key][0], {}).get("step_s", {}).get(family)
            rows.append({"task": key, "family": family, "accuracy": r["test"]["accuracy"],
                         "macro_f1": r["test"]["macro_f1"], "vs_lora": gap, "parameters": r["parameters"],
                         "stored_bytes": r["stored_bytes"], "step_s": step})
            if family != "lora" and gap is not None:
                verdict.setdefault(family, {})[key] = gap >= -WITHIN
    target = {f: {"tasks_within": sum(v.values()), "tasks_measured": len(v),
                  "met": sum(v.values()) >= 3 if len(v) == 4 else None} for f, v in verdict.items()}
    out = {"benchmark": "methods", "rows": rows, "target": {"within_points": 100 * WITHIN, "of_4_tasks": 3,
                                                            "families": target},
           "decode_mixed_over_base": None if decode is None else decode["ratios"]["mixed_over_base"],
           "decode_only_over_base": None if decode is None else {k[5:-10]: v for k, v in decode["ratios"].items()
                                                                 if k.startswith("only:")}}
    (RESULTS / "methods.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| task | family | test acc. | macro-F1 | vs LoRA | trainable params | stored | train step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = "" if r["vs_lora"] is None or r["family"] == "lora" else f"{100 * r['vs_lora']:+.1f}"
        step = "" if r["step_s"] is None else f"{r['step_s']:.2f} s"
        print(f"| {r['task']} | {r['family']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {vs} | "
              f"{r['parameters']:,} | {r['stored_bytes'] / 2**20:.1f} MiB | {step} |")
    if decode is not None:
        print(f"\nmixed-family decode step (B={decode['batch']}): {decode['ratios']['mixed_over_base']:.2f}x the bare "
              "base; " + ", ".join(f"{k}: {v:.2f}x" for k, v in out["decode_only_over_base"].items()))
    plot(rows)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    tasks = [k for k in TASKS if any(r["task"] == k for r in rows)]
    fams = list(FAMILIES)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(fams)
    for j, fam in enumerate(fams):
        acc = [next((r["accuracy"] for r in rows if r["task"] == k and r["family"] == fam), float("nan"))
               for k in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], acc, width, label=fam)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=8, ncol=5, loc="lower center")
    ax.set_title("adapter families with the CLI's defaults (benchmarks/methods.py)")
    fig.tight_layout()
    fig.savefig(RESULTS / "methods.png", dpi=110)
    log(f"wrote {RESULTS / 'methods.png'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("accuracy", "steps", "table"), default="accuracy")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--redo", action="store_true", help="accuracy: run pairs already in the runs file again")
    p.add_argument("--timing-steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=Path, default=RESULTS / "methods_runs.jsonl")
    p.add_argument("--score-store", type=Path, help="accuracy: score the adapters already trained in this store "
                   "(a run stopped after training) instead of training")
    a = p.parse_args()
    a.tasks, a.families = a.tasks.split(","), a.families.split(",")
    for k in a.tasks:
        if k not in TASKS:
            raise SystemExit(f"unknown task {k!r}; one of {', '.join(TASKS)}")
    for f in a.families:
        if f not in FAMILIES:
            raise SystemExit(f"unknown family {f!r}; one of {', '.join(FAMILIES)}")
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if a.part == "accuracy":
        part_accuracy(a, env)
    elif a.part == "steps":
        part_steps(a, env)
    else:
        part_table(a)


if __name__ == "__main__":
    main()
