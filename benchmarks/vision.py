#!/usr/bin/env python
"""Adapters on an image base (issue 18's benchmark): MobileNetV2 (ImageNet) on the two image example tasks.

  accuracy  per task (textile-defects, mnist-5k), each system scored on the test split:
              probe       a linear head on the frozen base's pooled features (train/probe.py)
              lora        `adapterkit train --base mobilenet-v2 --task T --name N` (the CLI's defaults: LoRA
                          r=8 on the 34 pointwise convolutions)
              ia3         ... --method ia3 (a scale per channel of the pointwise convolutions' outputs; the
                          projections' inputs)
              bottleneck  ... --method bottleneck (Pfeiffer after each of the 17 inverted-residual blocks)
              full        the whole network and a fresh head trained in plain torch (AdamW, the LoRA run's
                          steps, batch and head lr; lr 1e-4 for the network; BatchNorm statistics frozen as in
                          the adapter runs), in process
            rows append to results/vision_runs.jsonl; a (task, system) already there is skipped (--redo)
  mixed     the forward step of 32 images (224x224) over 8 distinct LoRA adapters (4 images each, the CLI's
            targets, r=8) against the bare base, alternated over --rounds rounds, median (target <= 1.3x)
  vqa       vision-language adapters on easy-vqa (benchmarks/vision_vqa.py): per-task adapters vs one shared
            adapter vs the projector alone, accuracy per question type; rows in results/vision_vqa_runs.jsonl
  vqa-losses  results/vision_vqa_losses.json: the training-loss curves still in the bench store, and what
            answering yes/no from the question's wording alone scores (accuracy, loss)
  sweep     an image base's training defaults, chosen on mnist-5k's VALIDATION split (textile-defects held
            out): `adapterkit train ... --lr X` per family and lr; rows in results/vision_sweep.jsonl
  table     results/vision.json, the README table (markdown) and results/vision.png

Targets: every adapter family >= the linear probe + 3 points on both image tasks and within 2 points of full
training; the mixed image batch <= 1.3x the bare base's step.

    .venv/bin/python benchmarks/vision.py --part accuracy [--tasks textile-defects,mnist-5k] [--systems ...]
    .venv/bin/python benchmarks/vision.py --part mixed
    .venv/bin/python benchmarks/vision.py --part vqa [--steps 150] [--test-rows 300]
    .venv/bin/python benchmarks/vision.py --part table
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
from cli_runs import cli, log, median_step_seconds, read_runs as read_jsonl_runs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = "mobilenet-v2"
TASKS = ("textile-defects", "mnist-5k")
FAMILIES = {"lora": [], "ia3": ["--method", "ia3"], "bottleneck": ["--method", "bottleneck"],
            # opt-in (--systems): the head starts as the linear probe (LP-FT, `--head-init probe`)
            "ia3-lpft": ["--method", "ia3", "--head-init", "probe"],
            "bottleneck-lpft": ["--method", "bottleneck", "--head-init", "probe"]}
SYSTEMS = ("probe", "lora", "ia3", "bottleneck", "full")
PROBE_POINTS, FULL_POINTS, MIXED_TARGET = 0.03, 0.02, 1.3
SMOKE: list[str] = []


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_runs(path: Path) -> dict[tuple[str, str], dict]:
    return read_jsonl_runs(path, ("task", "system"))


def family_run(task: str, family: str, store: Path, env: dict) -> dict:
    name = f"{task}-{family}"
    cmd = ["train", "--base", BASE, "--task", task, "--name", name, *FAMILIES[family], *SMOKE]
    log(f"adapterkit {' '.join(cmd)}")
    _, secs = cli(cmd + ["--store", str(store), "--no-progress", "--overwrite"], env)
    got = json.loads(cli(["eval", name, "--task", task, "--split", "test", "--json", "--no-progress",
                          "--store", str(store)], env)[0])
    shown = json.loads(cli(["show", name, "--json", "--store", str(store)], env)[0])
    params = shown["lineage"][0]["params"]
    return {"command": "adapterkit " + " ".join(cmd), "test": {k: got[k] for k in ("accuracy", "macro_f1", "n")},
            "parameters": shown.get("parameters"), "wall_s": round(secs, 1),
            "step_s": median_step_seconds(store / "runs" / name / "train_log.jsonl"),
            "params": {k: params.get(k) for k in ("steps", "batch_size", "lr", "head_lr", "best_step")}}


def probe_run(task_name: str, rows: int | None = None) -> dict:
    from adapterkit import AdapterRuntime, load_base
    from adapterkit.data.tasks import load_task
    from adapterkit.train.classification import classifier_collate, predict
    from adapterkit.train.run import classification_metrics
    from adapterkit.train.probe import fit_probe

    base, task = load_base(BASE), load_task(task_name)
    t0 = time.perf_counter()
    head = fit_probe(base, task.train[:rows], "mean", 0)
    secs = time.perf_counter() - t0
    rt = AdapterRuntime.from_base(base)
    got = predict(rt, None, head, task.test, classifier_collate(rt, head, 0))
    m = classification_metrics(got, [e.label for e in task.test], head.labels)
    return {"command": "train/probe.fit_probe (300 full-batch AdamW steps, lr 1e-2)", "test": m,
            "parameters": head.weight.numel() + head.bias.numel(), "wall_s": round(secs, 1), "step_s": None}


def full_run(task_name: str, steps: int, batch: int, head_lr: float, lr: float = 1e-4, seed: int = 0) -> dict:
    """The whole network trained (BatchNorm statistics frozen, as the adapter runs keep them), a fresh head."""
    import random

    import torch

    from adapterkit import load_base
    from adapterkit.core.heads import ClassificationHead
    from adapterkit.data.tasks import load_task
    from adapterkit.train.classification import image_collate_fn
    from adapterkit.train.run import classification_metrics
    from adapterkit.train.trainer import train_mode

    base, task = load_base(BASE), load_task(task_name)
    model = base.model.requires_grad_(True)
    head = ClassificationHead.create(sorted({e.label for e in task.train}), 1280, "mean", seed)
    w, b = head.weight.requires_grad_(True), head.bias.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": lr},
                             {"params": [w, b], "lr": head_lr}], weight_decay=0.0)
    collate = image_collate_fn(base.processor, head)
    rng = random.Random(seed)
    order: list = []
    times = []
    train_mode(model)
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(task.train)), len(task.train))
        rows, order = order[:batch], order[batch:]
        t0 = time.perf_counter()
        data = collate([task.train[i] for i in rows])
        loss = torch.nn.functional.cross_entropy(model.pooled(data["pixel_values"]) @ w.t() + b, data["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(task.test), 32):
            data = collate(task.test[start:start + 32])
            preds += [head.labels[i] for i in (model.pooled(data["pixel_values"]) @ w.t() + b).argmax(-1).tolist()]
    m = classification_metrics(preds, [e.label for e in task.test], head.labels)
    n = sum(p.numel() for p in model.parameters()) + w.numel() + b.numel()
    return {"command": f"plain torch: AdamW lr {lr:g} (head {head_lr:g}), {steps} steps of {batch}", "test": m,
            "parameters": n, "wall_s": round(sum(times), 1), "step_s": statistics.median(times[2:] or times)}


def part_sweep(a, env) -> None:
    """Per family and lr: validation metrics of `adapterkit train` on the tuning task (rows appended)."""
    out = a.results / "vision_sweep.jsonl"
    store = Path(tempfile.mkdtemp(prefix="vision-sweep-")) / "store"
    for family in a.families.split(","):
        for lr in a.lrs.split(","):
            name = f"sweep-{family}-{lr}"
            cmd = ["train", "--base", BASE, "--task", a.sweep_task, "--name", name, "--lr", lr, *FAMILIES[family],
                   *a.sweep_flags.split(), *SMOKE]
            log(f"adapterkit {' '.join(cmd)}")
            _, secs = cli(cmd + ["--store", str(store), "--no-progress", "--overwrite"], env)
            shown = json.loads(cli(["show", name, "--json", "--store", str(store)], env)[0])
            params = shown["lineage"][0]["params"]
            row = {"date": now(), "task": a.sweep_task, "split": "validation", "family": family, "lr": float(lr),
                   "validation": shown.get("metrics"), "wall_s": round(secs, 1),
                   "params": {k: params.get(k) for k in ("steps", "batch_size", "head_lr", "best_step")},
                   "command": "adapterkit " + " ".join(cmd)}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{family} lr {lr}: {row['validation']}")


def part_accuracy(a, env) -> None:
    done = read_runs(a.runs)
    store = Path(tempfile.mkdtemp(prefix="vision-")) / "store"
    for task in a.tasks:
        for system in a.systems:
            if (task, system) in done and not a.redo:
                log(f"{task} {system}: done before ({done[task, system]['test']}); --redo runs it again")
                continue
            if system == "probe":
                r = probe_run(task, 64 if SMOKE else None)
            elif system == "full":
                lora = read_runs(a.runs).get((task, "lora"))
                if lora is None:
                    log(f"{task} full: needs the lora run first (its steps, batch and head lr)")
                    continue
                p = lora["params"]
                r = full_run(task, 4 if SMOKE else p["steps"], p["batch_size"], p["head_lr"])
            else:
                r = family_run(task, system, store, env)
            r.update({"task": task, "system": system, "date": now()})
            with a.runs.open("a") as f:
                f.write(json.dumps(r) + "\n")
            log(f"{task} {system}: {r['test']}, {r['parameters']} params, {r['wall_s']:.0f} s")


def part_mixed(a) -> None:
    """One forward of 32 images: 8 LoRA adapters, 4 images each, vs the bare base (alternated, median)."""
    import torch

    from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
    from adapterkit.vision.mobilenet import POINTWISE

    torch.set_num_threads(a.threads)
    base = load_base(BASE)
    rt = AdapterRuntime.from_base(base, capacity=8)
    names = [f"a{i}" for i in range(8)]
    for i, n in enumerate(names):
        rt.add(create_adapter(n, base.model, LoraConfig(r=8, alpha=16, target_modules=POINTWISE, init="nonzero"),
                              seed=i, fingerprint=base.fingerprint))
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    macs = multiply_adds(base.model, POINTWISE, rank=8)
    rows = [names[i // 4] for i in range(32)]
    times: dict[str, list[float]] = {"base": [], "mixed": []}
    with torch.no_grad():
        for _ in range(2):                                        # warm-up
            base.model(x)
        for _ in range(a.rounds):
            for kind in ("base", "mixed"):
                t0 = time.perf_counter()
                if kind == "mixed":
                    with rt.batch(rows):
                        base.model(x)
                else:
                    base.model(x)
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    from mixed_batch import cpu_model, git_commit

    out = {"benchmark": "vision-mixed", "environment": {"cpu_model": cpu_model(), "torch": torch.__version__,
                                                        "git_commit": git_commit(), "dtype": "float32",
                                                        "command": " ".join(["python", *sys.argv])},
           "images": 32, "adapters": 8, "image_size": 224, "threads": a.threads, "multiply_adds_per_image": macs,
           "rounds": a.rounds, "median_s": med, "ratio": med["mixed"] / med["base"], "target": MIXED_TARGET,
           "all_s": times, "date": now()}
    (a.results / "vision_mixed.json").write_text(json.dumps(out, indent=1) + "\n")
    log(f"mixed 32 images / 8 adapters: {med['mixed'] * 1e3:.0f} ms vs base {med['base'] * 1e3:.0f} ms "
        f"= {out['ratio']:.2f}x (target <= {MIXED_TARGET}x)")


def multiply_adds(model, targets: str, rank: int) -> dict:
    """Multiply-adds per 224x224 image: the base's convolutions and classifier, and rank-r LoRA on the
    1x1 convs `targets` matches (r · (C_in + C_out) per output pixel): the floor of the mixed batch's cost."""
    import re

    import torch

    shapes: dict = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, (mod, o.shape)))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    base = sum(o[2] * o[3] * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
               for m, o in shapes.values()) + model.classifier[1].weight.numel()
    lora = sum(o[2] * o[3] * rank * (m.in_channels + m.out_channels) for n, (m, o) in shapes.items()
               if re.fullmatch(targets, n))
    return {"base": base, "lora": lora, "lora_over_base": lora / base}


def part_table(a) -> None:
    runs = read_runs(a.runs)
    mixed_file = a.results / "vision_mixed.json"
    mixed = json.loads(mixed_file.read_text()) if mixed_file.is_file() else None
    rows, verdict = [], {}
    for task in TASKS:
        probe, full = runs.get((task, "probe")), runs.get((task, "full"))
        for system in SYSTEMS:
            r = runs.get((task, system))
            if r is None:
                continue
            acc = r["test"]["accuracy"]
            rows.append({"task": task, "system": system, "accuracy": acc, "macro_f1": r["test"]["macro_f1"],
                         "parameters": r["parameters"], "step_s": r.get("step_s")})
            if system in FAMILIES and probe and full:
                verdict.setdefault(system, {})[task] = {
                    "over_probe": acc - probe["test"]["accuracy"], "vs_full": acc - full["test"]["accuracy"],
                    "met": acc - probe["test"]["accuracy"] >= PROBE_POINTS
                    and acc - full["test"]["accuracy"] >= -FULL_POINTS}
    import vision_vqa

    vqa = vision_vqa.summary(a.results)
    out = {"benchmark": "vision", "base": BASE, "rows": rows, "targets": verdict,
           "mixed_over_base": None if mixed is None else mixed["ratio"], "vqa": vqa}
    (a.results / "vision.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| task | system | test acc. | macro-F1 | trainable params | train step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        step = "" if r["step_s"] is None else f"{r['step_s']:.2f} s"
        print(f"| {r['task']} | {r['system']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['parameters']:,} "
              f"| {step} |")
    if mixed is not None:
        print(f"\nmixed batch, 32 images over 8 LoRA adapters: {mixed['ratio']:.2f}x the bare base "
              f"({mixed['median_s']['mixed'] * 1e3:.0f} vs {mixed['median_s']['base'] * 1e3:.0f} ms)")
    if vqa:
        print("\n| easy-vqa (SmolLM2 + MobileNetV2) | overall (test mix) | equal-type sample | colour | shape | yes/no "
              "| LM adapter params | projector params | steps |")
        print("|---|---|---|---|---|---|---|---|---|")
        for system in ("per-task", "per-task-aligned", "per-task-paired", "per-task-paired-aligned",
                       "per-task-paired-aligned-headlr1e-5", "shared",
                       "projector", "align"):
            r = vqa.get(system)
            if r is not None:
                cells = " | ".join(_cell(r, f"accuracy_{q}") for q in vision_vqa.QTYPES)
                print(f"| {system} | {_cell(r, 'accuracy_test_mix')} | {r['accuracy']:.3f} | {cells} | "
                      f"{r['lm_adapter_params']:,} | {r['projector_params']:,} | {r['steps']} |")
    plot(rows, a.results)


def _cell(row: dict, key: str) -> str:
    """A table cell: the value to 3 places, or a dash for a type the system was not scored on."""
    return f"{row[key]:.3f}" if key in row else "-"


def plot(rows: list[dict], results: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(SYSTEMS)
    for j, system in enumerate(SYSTEMS):
        acc = [next((r["accuracy"] for r in rows if r["task"] == t and r["system"] == system), float("nan"))
               for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], acc, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8, ncol=5, loc="lower center")
    ax.set_title("MobileNetV2 adapters vs probe and full training (benchmarks/vision.py)", fontsize=10)
    fig.tight_layout()
    fig.savefig(results / "vision.png", dpi=110)
    log(f"wrote {results / 'vision.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("accuracy", "mixed", "sweep", "vqa", "vqa-sweep", "vqa-losses", "table"),
                   required=True)
    p.add_argument("--families", default="ia3", help="sweep: families (of lora, ia3, bottleneck)")
    p.add_argument("--lrs", default="1e-2,5e-2,1e-1", help="sweep: adapter learning rates")
    p.add_argument("--sweep-task", default="mnist-5k", help="sweep: the tuning task (its validation split)")
    p.add_argument("--sweep-flags", default="", help="sweep: more train flags, e.g. '--head-init probe'")
    p.add_argument("--variant", default="1e-3,1e-2,raw", help="vqa-sweep: lr,head_lr,norm|raw")
    p.add_argument("--steps", type=int, default=None, help="vqa: steps per per-task adapter (default: the recipe's); "
                   "vqa-sweep: steps per variant (default 100)")
    p.add_argument("--vqa-systems", default=None, help="vqa: only these systems (comma-separated: per-task:colour, "
                   "per-task:shape, per-task:yesno, shared, projector, align, per-task-aligned:colour, ..., "
                   "per-task-paired:yesno, per-task-paired-aligned:yesno, per-task-paired-aligned-headlr1e-5:yesno)")
    p.add_argument("--test-rows", type=int, default=300, help="vqa: test questions per question type")
    p.add_argument("--val-rows", type=int, default=64, help="vqa: validation questions per type (best checkpoint)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--smoke", action="store_true", help="4 steps on 64 rows per run, results under /tmp (checks "
                   "the script; numbers meaningless)")
    a = p.parse_args()
    a.tasks, a.systems = a.tasks.split(","), a.systems.split(",")
    a.results = RESULTS
    if a.smoke:
        SMOKE.extend(["--steps", "4", "--eval-every", "0", "--train-rows", "64"])
        a.steps, a.test_rows, a.val_rows = 2, 8, 4
        a.results = Path(tempfile.gettempdir()) / "vision-smoke-results"
        a.results.mkdir(exist_ok=True)
        a.rounds = 1
    a.runs = a.results / "vision_runs.jsonl"
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu"}
    {"accuracy": lambda: part_accuracy(a, env), "mixed": lambda: part_mixed(a), "vqa": lambda: part_vqa(a),
     "vqa-sweep": lambda: part_vqa_sweep(a), "vqa-losses": lambda: part_vqa_losses(a),
     "sweep": lambda: part_sweep(a, env), "table": lambda: part_table(a)}[a.part]()


def part_vqa_losses(a) -> None:
    import vision_vqa

    vision_vqa.write_losses(a.results, log=log)


def part_vqa_sweep(a) -> None:
    import vision_vqa

    vision_vqa.sweep(a.results, variant=a.variant, steps=a.steps or 100, val_rows=a.val_rows, log=log)


def part_vqa(a) -> None:
    import vision_vqa

    vision_vqa.run(a.results, steps=a.steps, test_rows=a.test_rows, val_rows=a.val_rows, redo=a.redo,
                   smoke=a.smoke, log=log, only=a.vqa_systems.split(",") if a.vqa_systems else None)


if __name__ == "__main__":
    main()
