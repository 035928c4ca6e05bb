#!/usr/bin/env python
"""Smaller adapters (issue 16's benchmark): low-bit adapters and CorDA, through the CLI as a user runs it.

  retention  the four example-task LoRA adapters of the method benchmark (benchmarks/methods.py: SmolLM2 on
             rt-sentiment, election-tweets, tweet-sentiment; MiniLM on reuters-r8; CLI defaults), each
             quantized after training (`adapter quantize --bits B`) and trained quantization-aware (`train
             --bits B`), B in 1, 2, 4, 8; test accuracy / the fp32 adapter's. Rows append to
             results/lowbit_runs.jsonl; finished ones are skipped (the SmolLM2 runs take 10-20 min each).
             --import-from STORE[,STORE] reuses the method benchmark's fp32 LoRA adapters (NAME-lora).
  bytes      a rank-16 LoRA on SmolLM2's q,k,v,o (and rank 8): weight-file bytes fp32 vs 1/2/4/8 bits
  serve      benchmarks/lowbit_serve.py: 10,000 rank-16 adapters, 1-bit in a <= 2 GiB RAM tier vs fp32
  corda-tune the lr of a CorDA start on a tuning task (election-tweets, 50 steps, validation split; neither
             CorDA task): results/lowbit_corda_tune.jsonl
  corda      CorDA IPM / KPM vs LoRA's default init on two tasks (SmolLM2) at 50 and 200 steps (test
             accuracy), and forgetting: the base's perplexity on held-out general text (the chatterbot
             corpus's English dialogue, never trained on) with each 200-step adapter attached
  spread     the run-to-run spread the retention cells sit in: the fp32 LoRA of --tasks trained again with
             other seeds (--seeds), test accuracy per seed in results/lowbit_spread.jsonl
  table      results/lowbit.json, README tables (markdown on stdout) and results/lowbit.png

Targets: 1-bit quantization-aware >= 98 % of fp32 accuracy on at least 3 of 4 tasks; 4-bit post-training
>= 99 %; 1-bit >= 20x smaller than fp32 at rank 16; (serve) every adapter in RAM <= 2 GiB, cold attach from
the packed tier p50 <= 5 ms.

    .venv/bin/python benchmarks/lowbit.py --part retention [--import-from STORE] [--tasks ...] [--bits 1,4] [--modes ptq]
    .venv/bin/python benchmarks/lowbit.py --part bytes
    .venv/bin/python benchmarks/lowbit.py --part corda-tune
    .venv/bin/python benchmarks/lowbit.py --part corda
    .venv/bin/python benchmarks/lowbit.py --part spread --tasks smollm2:rt-sentiment --seeds 1
    .venv/bin/python benchmarks/lowbit.py --part table
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import cli, log  # noqa: E402
from methods import TASKS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BITS = (1, 2, 4, 8)
CORDA_TASKS = ("rt-sentiment", "tweet-sentiment")
CORDA_INITS = ("default", "corda-ipm", "corda-kpm")
CORDA_STEPS = (50, 200)
QAT_MIN, PTQ4_MIN, BYTES_MIN = 0.98, 0.99, 20.0


def home() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit"))


def store_dir() -> Path:
    return home() / "bench" / "lowbit-store"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run(args: list[str], env: dict) -> tuple[str, float]:
    extra = ["--no-progress"] if args[0] in ("train", "eval") else []
    return cli([*args, *extra, "--store", str(store_dir())], env)


def scored(name: str, task: str, env: dict) -> dict:
    got = json.loads(run(["eval", name, "--task", task, "--split", "test", "--json"], env)[0])
    return {k: got[k] for k in ("accuracy", "macro_f1", "n")}


def shown(name: str, env: dict) -> dict:
    return json.loads(run(["show", name, "--json"], env)[0])


def read_rows(path: Path, key: tuple[str, ...]) -> dict[tuple, dict]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[tuple(r.get(k) for k in key)] = r              # the last row of a key counts
    return rows


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------- retention
RETRAINED: set[str] = set()       # fp32 adapters this run had to train (none stored, none to import)


def fp32_adapter(key: str, a, env: dict) -> str:
    """The task's fp32 LoRA in the bench store: imported from the method benchmark's store, else trained."""
    base, task = TASKS[key]
    name = f"{key.replace(':', '-')}-fp32"
    if name in {r["name"] for r in json.loads(run(["ls", "--json"], env)[0])}:
        return name
    wanted = f"{key.replace(':', '-')}-lora"
    for root in a.import_from:                        # the method benchmark's stores, searched in order
        from adapterkit.core.adapter import Adapter
        from adapterkit.store import AdapterStore

        src = AdapterStore(root)
        if wanted in src:
            got = src.get(wanted)
            AdapterStore(store_dir()).put(Adapter(name, got.config, got.tensors, got.meta, got.head))
            log(f"{name}: imported from {root}")
            return name
    run(["train", "--base", base, "--task", task, "--name", name, "--method", "lora"], env)
    RETRAINED.add(name)
    return name


def part_retention(a, env: dict) -> None:
    done = read_rows(a.runs, ("task", "mode", "bits"))
    for key in a.tasks:
        base, task = TASKS[key]
        if "ptq" not in a.modes and (key, "fp32", 32) in done and not a.redo:
            fp32 = f"{key.replace(':', '-')}-fp32"    # QAT trains from scratch: no fp32 adapter needed
        else:
            fp32 = fp32_adapter(key, a, env)
        if (key, "fp32", 32) in done and not a.redo and fp32 in RETRAINED:
            # the stored adapter is gone (a fresh machine) and was trained again: the rows already there
            # were measured against the first one, so the new one must score the same (seeded training)
            again, before = scored(fp32, task, env)["accuracy"], done[(key, "fp32", 32)]["test"]["accuracy"]
            if again != before:
                raise SystemExit(f"{key}: the retrained fp32 adapter scores {again:.4f}, the recorded one "
                                 f"{before:.4f}; the rows of this task no longer share one reference: --redo")
            log(f"{key} fp32: retrained, scores the recorded {before:.4f}")
        if (key, "fp32", 32) not in done or a.redo:
            append(a.runs, {"task": key, "mode": "fp32", "bits": 32, "name": fp32, "test": scored(fp32, task, env),
                            "bytes": shown(fp32, env)["bytes"], "date": now()})
            log(f"{key} fp32: {read_rows(a.runs, ('task', 'mode', 'bits'))[(key, 'fp32', 32)]['test']}")
        for bits in a.bits:
            for mode in a.modes:
                if (key, mode, bits) in done and not a.redo:
                    continue
                name = f"{fp32.removesuffix('-fp32')}-{mode}{bits}"
                if mode == "ptq":
                    _, secs = run(["adapter", "quantize", fp32, "--bits", str(bits), "--name", name, "--overwrite"],
                                  env)
                else:
                    _, secs = run(["train", "--base", base, "--task", task, "--name", name, "--method", "lora",
                                   "--bits", str(bits), "--overwrite"], env)
                row = {"task": key, "mode": mode, "bits": bits, "name": name, "test": scored(name, task, env),
                       "bytes": shown(name, env)["bytes"], "seconds": round(secs, 1), "date": now()}
                append(a.runs, row)
                log(f"{key} {mode} {bits}-bit: {row['test']} ({row['bytes']:,} bytes)")


def part_spread(a, env: dict) -> None:
    """fp32 LoRA of each task at CLI defaults but --seed S: how far a cell moves with nothing but the seed."""
    path = RESULTS / "lowbit_spread.jsonl"
    done = read_rows(path, ("task", "seed"))
    for key in a.tasks:
        base, task = TASKS[key]
        for seed in a.seeds:
            if (key, seed) in done and not a.redo:
                continue
            name = f"{key.replace(':', '-')}-fp32-seed{seed}"
            _, secs = run(["train", "--base", base, "--task", task, "--name", name, "--method", "lora",
                           "--seed", str(seed), "--overwrite"], env)
            row = {"task": key, "seed": seed, "name": name, "test": scored(name, task, env),
                   "seconds": round(secs, 1), "date": now()}
            append(path, row)
            log(f"{key} fp32 seed {seed}: {row['test']}")


# ---------------------------------------------------------------------- bytes
def part_bytes(a, env: dict) -> None:
    """Weight-file bytes of rank-8 and rank-16 LoRAs on SmolLM2's q,k,v,o at fp32 and each bit width."""
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-bytes-"))
    for r in (8, 16):
        folder = tmp / f"r{r}"
        cli(["adapter", "create", f"bytes-r{r}", "--out", str(folder), "--base", "smollm2-135m", "--r", str(r),
             "--alpha", str(2 * r), "--init", "nonzero"], env)
        fp32 = (folder / "adapter_model.safetensors").stat().st_size
        row = {"rank": r, "targets": "q,k,v,o", "fp32_bytes": fp32, "bits": {}}
        for bits in BITS:
            name = f"bytes-r{r}-{bits}b"
            run(["adapter", "quantize", str(folder), "--bits", str(bits), "--name", name, "--overwrite"], env)
            path = Path(shown(name, env)["path"])
            size = (path / "adapter.safetensors").stat().st_size
            row["bits"][str(bits)] = {"bytes": size, "smaller": round(fp32 / size, 2)}
        out.append(row)
        log(f"rank {r}: fp32 {fp32:,} bytes; " + ", ".join(f"{b}-bit {v['bytes']:,} ({v['smaller']}x)"
                                                            for b, v in row["bits"].items()))
    shutil.rmtree(tmp, ignore_errors=True)
    (RESULTS / "lowbit_bytes.json").write_text(json.dumps({"benchmark": "lowbit-bytes", "rows": out,
                                                           "date": now()}, indent=1) + "\n")


# ---------------------------------------------------------------------- CorDA
def perplexity(names: list[str | None], texts: list[str]) -> dict[str, float]:
    """Perplexity of SmolLM2 on `texts` with each stored adapter attached (None: the bare base)."""
    import torch

    from adapterkit.core.base import load_base
    from adapterkit.core.runtime import AdapterRuntime
    from adapterkit.store import AdapterStore

    base = load_base("smollm2-135m")
    rt = AdapterRuntime.from_base(base)
    tok = base.tokenizer
    store = AdapterStore(store_dir())
    out = {}
    for name in names:
        if name is not None:
            rt.add(store.get(name))
        nll, count = 0.0, 0
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True, max_length=128)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            with torch.no_grad(), rt.batch([name] * len(labels)):
                logits = base.model(**enc).logits[:, :-1]
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += float(loss)
            count += int((target != -100).sum())
        out[name or "base"] = math.exp(nll / count)
        if name is not None:
            rt.remove(name)
        log(f"perplexity {name or 'base'}: {out[name or 'base']:.3f}")
    return out


def general_texts(n: int = 400) -> list[str]:
    """Held-out general text: English dialogue of the chatterbot corpus (no CorDA run trains on it)."""
    from adapterkit.data.tasks import load_task

    rows = load_task("chat-topics").test
    return [e.text for e in rows][:n]


CORDA_LORA_LR = 2e-3       # LoRA's classification lr, the one every CorDA row before INIT_LR ran at


def corda_rows(path: Path) -> dict[tuple, dict]:
    """The CorDA rows by (task, init, steps, lr); the last row of a key counts."""
    return {k[:3] + (k[3] or CORDA_LORA_LR,): r for k, r in read_rows(path, ("task", "init", "steps", "lr")).items()}


def part_corda(a, env: dict) -> None:
    from adapterkit.train.defaults import resolve

    path = RESULTS / "lowbit_corda_runs.jsonl"
    # a row counts at the lr the CLI now picks for its init (rows before IPM's own factor, which carry no
    # "lr", ran at LoRA's 2e-3; an IPM row of those is rerun)
    done = {(r["task"], r["init"], r["steps"]) for r in corda_rows(path).values()
            if math.isclose(r.get("lr", CORDA_LORA_LR), resolve("classification", 1, True, method="lora",
                                                                 init=r["init"]).config.lr)}
    jobs = [(t, s, i) for t in a.corda_tasks for s in CORDA_STEPS for i in a.inits
            if (t, i, s) not in done or a.redo]
    ppl_path = RESULTS / "lowbit_corda_perplexity.json"
    ppl_done = {} if a.redo or not ppl_path.is_file() else json.loads(ppl_path.read_text())["perplexity"]
    top = max(CORDA_STEPS)
    # the perplexity needs a task's three 200-step adapters in the store; one whose row stands but whose store
    # was lost (a fresh machine) is trained again, after the missing rows (its new row replaces the old)
    stored = {r["name"] for r in json.loads(run(["ls", "--json"], env)[0])}
    jobs += [(t, top, i) for t in a.corda_tasks for i in a.inits if (t, top, i) not in jobs
             and f"corda-{t}-{i}-{top}" not in stored and f"corda-{t}-{i}-{top}" not in ppl_done]
    for task, steps, init in jobs:
        name = f"corda-{task}-{init}-{steps}"
        _, secs = run(["train", "--base", "smollm2-135m", "--task", task, "--name", name, "--method", "lora",
                       "--steps", str(steps), "--init", init, "--overwrite"], env)
        info = shown(name, env)
        row = {"task": task, "init": init, "steps": steps, "name": name, "test": scored(name, task, env),
               "lr": info["lineage"][0]["params"].get("lr"), "summary": info["summary"],
               "seconds": round(secs, 1), "date": now()}
        append(path, row)
        log(f"{task} {init} {steps} steps: {row['test']} ({secs:.0f} s)")
    # perplexity per task, once all three of its 200-step adapters are stored (two processes may split the
    # inits: the one that finishes last measures); results merge into one file, the bare base measured once
    stored = {r["name"] for r in json.loads(run(["ls", "--json"], env)[0])}
    names = [n for t in CORDA_TASKS
             if all(f"corda-{t}-{i}-{top}" in stored for i in CORDA_INITS)
             for n in (f"corda-{t}-{i}-{top}" for i in CORDA_INITS) if n not in ppl_done or a.redo]
    if not names:
        log("perplexity: no task with all three 200-step adapters stored and unmeasured")
        return
    texts = general_texts()
    ppl = {**ppl_done, **perplexity(([None] if "base" not in ppl_done else []) + names, texts)}
    tmp = ppl_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"texts": len(texts), "source": "chat-topics test split (chatterbot English)",
                               "perplexity": ppl, "date": now()}, indent=1) + "\n")
    tmp.replace(ppl_path)


CORDA_TUNE_TASK = "election-tweets"    # a tuning task, neither CorDA task: its lr is chosen here, judged there
CORDA_TUNE = (("default", None), ("corda-ipm", None), ("corda-ipm", 5e-4), ("corda-ipm", 1e-4))


def part_corda_tune(a, env: dict) -> None:
    """The learning rate of a CorDA start (None: the CLI default, LoRA's), 50 steps on the tuning task, scored
    on its validation split; rows append to results/lowbit_corda_tune.jsonl."""
    path = RESULTS / "lowbit_corda_tune.jsonl"
    done = read_rows(path, ("init", "lr"))
    steps = min(CORDA_STEPS)
    for init, lr in CORDA_TUNE:
        if (init, lr) in done and not a.redo:
            continue
        name = f"corda-tune-{init}-{lr or 'default'}"
        lr_flag = ["--lr", str(lr)] if lr else []
        _, secs = run(["train", "--base", "smollm2-135m", "--task", CORDA_TUNE_TASK, "--name", name, "--method", "lora",
                       "--steps", str(steps), "--init", init, *lr_flag, "--overwrite"], env)
        got = json.loads(run(["eval", name, "--task", CORDA_TUNE_TASK, "--split", "validation", "--json"], env)[0])
        row = {"task": CORDA_TUNE_TASK, "init": init, "lr": lr, "steps": steps, "name": name,
               "validation": {k: got[k] for k in ("accuracy", "macro_f1", "n")},
               "summary": shown(name, env)["summary"], "seconds": round(secs, 1), "date": now()}
        append(path, row)
        log(f"{init} lr {lr or 'default'}: {row['validation']} ({secs:.0f} s)")


# ---------------------------------------------------------------------- table
def part_table(a, env: dict) -> None:
    runs = read_rows(a.runs, ("task", "mode", "bits"))
    table = []
    for key in TASKS:
        fp32 = runs.get((key, "fp32", 32))
        if fp32 is None:
            continue
        base_acc = fp32["test"]["accuracy"]
        row = {"task": key, "fp32": base_acc, "fp32_bytes": fp32["bytes"]}
        for (k, mode, bits), r in runs.items():
            if k == key and mode != "fp32":
                row[f"{mode}{bits}"] = r["test"]["accuracy"]
                row[f"{mode}{bits}_retention"] = r["test"]["accuracy"] / base_acc
                row[f"{mode}{bits}_bytes"] = r["bytes"]
        table.append(row)
    qat1 = [r["qat1_retention"] for r in table if "qat1_retention" in r]
    ptq4 = [r["ptq4_retention"] for r in table if "ptq4_retention" in r]
    verdict = {"qat1_tasks_at_98": sum(v >= QAT_MIN for v in qat1), "qat1_tasks": len(qat1),
               "qat1_met": sum(v >= QAT_MIN for v in qat1) >= 3,
               "ptq4_min_retention": min(ptq4) if ptq4 else None,
               # a verdict over the four tasks: none is met while a task's runs are missing
               "ptq4_met": len(ptq4) == len(TASKS) and min(ptq4) >= PTQ4_MIN,
               "tasks_missing": [k for k in TASKS if not any(r["task"] == k for r in table)]}
    out = {"benchmark": "lowbit", "rows": table, "verdict": verdict}
    for part in ("lowbit_bytes.json", "lowbit_serve.json", "lowbit_corda_perplexity.json"):
        if (RESULTS / part).is_file():
            out[part.removesuffix(".json").removeprefix("lowbit_")] = json.loads((RESULTS / part).read_text())
    out["corda_runs"] = list(corda_rows(RESULTS / "lowbit_corda_runs.jsonl").values())
    (RESULTS / "lowbit.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| task | fp32 | " + " | ".join(f"PTQ {b}-bit | QAT {b}-bit" for b in BITS) + " |")
    print("|---|---|" + "---|---|" * len(BITS))
    for r in table:
        cells = []
        for b in BITS:
            for mode in ("ptq", "qat"):
                v = r.get(f"{mode}{b}")
                cells.append("" if v is None else f"{v:.3f} ({r[f'{mode}{b}_retention']:.1%})")
        print(f"| {r['task']} | {r['fp32']:.3f} | " + " | ".join(cells) + " |")
    print(f"\nverdict: {verdict}")
    if out["corda_runs"]:
        print("\n| task | init | lr | steps | test accuracy | macro-F1 |\n|---|---|---|---|---|---|")
        for r in sorted(out["corda_runs"], key=lambda r: (r["task"], r["steps"], r["init"], -r.get("lr", CORDA_LORA_LR))):
            print(f"| {r['task']} | {r['init']} | {r.get('lr', CORDA_LORA_LR):g} | {r['steps']} | "
                  f"{r['test']['accuracy']:.3f} | {r['test']['macro_f1']:.3f} |")
    plot(table)


def plot(table: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in table:
        for mode, style in (("ptq", "--"), ("qat", "-")):
            pts = [(b, r[f"{mode}{b}_retention"]) for b in BITS if f"{mode}{b}_retention" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                        label=f"{r['task']} {mode.upper()}")
    ax.axhline(QAT_MIN, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(BITS), [str(b) for b in BITS])
    ax.set_xlabel("bits per adapter value")
    ax.set_ylabel("test accuracy / fp32 adapter's")
    ax.set_title("low-bit LoRA adapters: post-training (--) vs quantization-aware (-)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "lowbit.png", dpi=110)
    log(f"wrote {RESULTS / 'lowbit.png'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("retention", "bytes", "serve", "corda", "corda-tune", "spread", "table"),
                   required=True)
    p.add_argument("--seeds", default="1,2", help="spread: the seeds to train (the retention rows used seed 0)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--bits", default=",".join(map(str, BITS)))
    p.add_argument("--modes", default="ptq,qat", help="retention: post-training (minutes) and/or quantization-"
                   "aware (a training run each)")
    p.add_argument("--import-from", default="", help="the method benchmark's stores, comma-separated (their "
                   "NAME-lora adapters become the fp32 adapters here; a task found in none is trained)")
    p.add_argument("--runs", type=Path, default=RESULTS / "lowbit_runs.jsonl")
    p.add_argument("--inits", default=",".join(CORDA_INITS), help="corda: only these inits' rows (two processes "
                   "can split the rows; a task's perplexity is measured once all three of its 200-step adapters "
                   "are stored)")
    p.add_argument("--corda-tasks", default=",".join(CORDA_TASKS), help="corda: only these tasks' rows")
    p.add_argument("--redo", action="store_true")
    a, rest = p.parse_known_args()
    a.tasks = a.tasks.split(",")
    a.bits = [int(b) for b in a.bits.split(",")]
    a.inits = a.inits.split(",")
    a.seeds = [int(x) for x in a.seeds.split(",")]
    a.modes = a.modes.split(",")
    if set(a.modes) - {"ptq", "qat"}:
        p.error(f"--modes: unknown {sorted(set(a.modes) - {'ptq', 'qat'})}; choose among ptq, qat")
    a.corda_tasks = a.corda_tasks.split(",")
    if set(a.corda_tasks) - set(CORDA_TASKS):
        p.error(f"--corda-tasks: unknown {sorted(set(a.corda_tasks) - set(CORDA_TASKS))}; choose among "
                f"{', '.join(CORDA_TASKS)}")
    if set(a.inits) - set(CORDA_INITS):
        p.error(f"--inits: unknown {sorted(set(a.inits) - set(CORDA_INITS))}; choose among {', '.join(CORDA_INITS)}")
    a.import_from = [Path(x) for x in a.import_from.split(",") if x]
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    if a.part == "serve":
        from lowbit_serve import main as serve_main
        serve_main(rest)
        return
    {"retention": part_retention, "bytes": part_bytes, "corda": part_corda, "corda-tune": part_corda_tune,
     "spread": part_spread, "table": part_table}[a.part](a, env)


if __name__ == "__main__":
    main()
