#!/usr/bin/env python
"""Classification training: adapterkit's trainer side by side with PEFT's LoRA trained by a plain loop.

Both systems get the same hyper-parameters, data, batches and seeds: the same initial LoRA tensors
(adapterkit's seeded init, copied into PEFT's modules), the same head init, the same length-bucketed
batch order (adapterkit's BatchPlan), the same warm-up + cosine schedule, AdamW, clipping at 1.0 and
the same per-micro-batch RNG seed (dropout). So their loss curves should agree to float noise, and
any accuracy gap is a bug, not luck.

Phases (each system runs in its own subprocess: clean peak memory, no shared state):
  accuracy  train each run to the end with each system, score the task's full test split
  timing    alternate adapterkit / PEFT subprocesses (A B B A ...) for --timing-rounds rounds of
            --timing-steps timed steps after 2 warm-up steps; the ratio is the median of per-round
            medians (drift hits both systems)

Memory: a sampler thread reads the process's RSS every 5 ms while training; "train_peak_mib" is the
peak RSS during training, "train_extra_mib" that peak minus the RSS when training started.

    .venv/bin/python benchmarks/train.py --quick                 # smoke run, ~2 min
    .venv/bin/python benchmarks/train.py                         # all runs, ~90 min on 2 cores
    .venv/bin/python benchmarks/train.py --runs minilm-reuters-r8 --phases accuracy

Results: benchmarks/results/train.json (rewritten after every subprocess, so a cut run keeps what it
measured) and a loss-curve plot beside it (.png).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SYSTEMS = ("adapterkit", "peft")

# name -> the run's hyper-parameters; target = the test-accuracy floor (None: report only)
RUNS = {
    "minilm-reuters-r8": dict(base="minilm-l6", task="reuters-r8", steps=200, batch_size=16, lr=2e-3,
                              max_length=128, r=8, alpha=16, target=0.93),
    "smollm2-election-tweets": dict(base="smollm2-135m", task="election-tweets", steps=300, batch_size=16,
                                    lr=2e-3, max_length=64, r=8, alpha=16, target=0.88),
    "smollm2-rt-sentiment": dict(base="smollm2-135m", task="rt-sentiment", steps=200, batch_size=16, lr=2e-3,
                                 max_length=64, r=8, alpha=16, target=None),
    "smollm2-tweet-sentiment": dict(base="smollm2-135m", task="tweet-sentiment", steps=200, batch_size=16,
                                    lr=2e-3, max_length=64, r=8, alpha=16, target=None),
}
TIMING_RUNS = ("minilm-reuters-r8", "smollm2-election-tweets")
WARMUP_STEPS = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory sampler

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Peak resident memory while the block runs, sampled every 5 ms by a daemon thread."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


# --------------------------------------------------------------------------- one system, one run (worker)

def worker(spec: dict) -> dict:
    """Train one system on one run; spec: run, system, steps, test_limit, threads, measure ('accuracy'|'timing')."""
    from adapterkit.core.base import load_base
    from adapterkit.data import load_task

    torch.set_num_threads(spec["threads"])
    run = RUNS[spec["run"]]
    base = load_base(run["base"])
    task = load_task(run["task"])
    test = task.test[: spec["test_limit"]] if spec["test_limit"] else task.test
    fn = train_adapterkit if spec["system"] == "adapterkit" else train_peft
    return {"run": spec["run"], "system": spec["system"], "measure": spec["measure"],
            **fn(base, task.train, test, run, spec["steps"], spec["measure"] == "accuracy")}


def _config(run: dict, steps: int):
    from adapterkit.train.trainer import TrainConfig

    return TrainConfig(steps=steps, batch_size=run["batch_size"], lr=run["lr"], warmup_steps=steps // 10,
                       schedule="cosine", max_grad_norm=1.0, seed=0)


def train_adapterkit(base, train_ex, test_ex, run, steps, score) -> dict:
    """adapterkit's own entry point (what `adapterkit train` runs), step times from its JSONL log."""
    from adapterkit.core.runtime import AdapterRuntime
    from adapterkit.store import AdapterStore
    from adapterkit.train.run import evaluate, train_classifier

    with tempfile.TemporaryDirectory() as tmp:
        with PeakRss() as mem:
            adapter, _ = train_classifier(base, "bench", train_ex, [], task=run["task"], store=AdapterStore(Path(tmp) / "s"),
                                          config=_config(run, steps), r=run["r"], alpha=run["alpha"],
                                          max_length=run["max_length"], progress=False, log_path=str(Path(tmp) / "log.jsonl"))
        records = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
    out = {"losses": [r["loss"] for r in records], "step_s": [r["seconds"] for r in records],
           "train_peak_mib": mem.peak, "train_extra_mib": mem.peak - mem.start}
    if score:
        rt = AdapterRuntime.from_base(base)
        rt.add(adapter)
        out["test"] = evaluate(rt, adapter, test_ex, run["max_length"])
    return out


def train_peft(base, train_ex, test_ex, run, steps, score) -> dict:
    """PEFT LoRA + the same head, trained by a plain PyTorch loop over the same batches."""
    import peft

    from adapterkit.core.adapter import create_adapter
    from adapterkit.core.heads import ClassificationHead
    from adapterkit.methods.lora import LoraConfig
    from adapterkit.train.classification import collate_fn, token_lengths
    from adapterkit.train.fit import DEFAULT_TARGETS
    from adapterkit.train.run import POOLING, classification_metrics
    from adapterkit.train.schedule import lr_factor
    from adapterkit.train.trainer import BatchPlan

    cfg = _config(run, steps)
    targets = DEFAULT_TARGETS[base.kind]
    model = base.model
    # the same initial tensors adapterkit starts from (its seeded init), copied into PEFT's modules
    init = create_adapter("bench", model, LoraConfig(r=run["r"], alpha=run["alpha"], target_modules=targets),
                          seed=cfg.seed)
    labels = sorted({e.label for e in train_ex})
    head = ClassificationHead.create(labels, model.config.hidden_size, POOLING[base.kind], cfg.seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=run["r"], lora_alpha=run["alpha"], lora_dropout=0.0,
                                                    target_modules=list(targets)))
    with torch.no_grad():
        for site, parts in init.tensors.items():
            module = model.get_submodule(site)
            module.lora_A["default"].weight.copy_(parts["lora_A"])
            module.lora_B["default"].weight.copy_(parts["lora_B"])
    body = model.base_model                           # LlamaModel / BertModel, with PEFT's LoRA layers inside
    params = [p for p in pm.parameters() if p.requires_grad] + [head.weight.requires_grad_(True),
                                                                head.bias.requires_grad_(True)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    collate = collate_fn(base.tokenizer, head, run["max_length"])
    plan = BatchPlan(len(train_ex), cfg.batch_size, cfg.seed, token_lengths(base.tokenizer, [e.text for e in train_ex]))
    losses, step_s = [], []
    pm.train()
    with PeakRss() as mem:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule)
            torch.manual_seed((cfg.seed * 1_000_003 + step) * 64)     # the trainer's per-micro-batch seed
            batch = collate([train_ex[i] for i in plan.indices(step)])
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = torch.nn.functional.cross_entropy(head.logits(hidden, batch["attention_mask"]), batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step_s.append(time.perf_counter() - t0)
    out = {"losses": losses, "step_s": step_s, "train_peak_mib": mem.peak, "train_extra_mib": mem.peak - mem.start}
    if score:
        pm.eval()
        predicted = []
        with torch.no_grad():
            for start in range(0, len(test_ex), 32):
                batch = collate(list(test_ex[start:start + 32]))
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                predicted += [labels[i] for i in head.logits(hidden, batch["attention_mask"]).argmax(-1).tolist()]
        out["test"] = classification_metrics(predicted, [e.label for e in test_ex], labels)
    return out


# --------------------------------------------------------------------------- driver

def run_worker(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", f.name],
                       check=True, env=env)
        return json.load(open(f.name))


def environment(threads: int) -> dict:
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.lower().startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "dtype": "float32", "commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def summarize(results: dict) -> dict:
    """Per run: test accuracy of each system and the gap, step-time ratio, memory ratio, target checks."""
    table = {}
    for name in results["runs"]:
        acc = {r["system"]: r for r in results["accuracy"] if r["run"] == name}
        timing = [r for r in results["timing"] if r["run"] == name]
        row: dict = {}
        if set(acc) == set(SYSTEMS):
            a, p = acc["adapterkit"], acc["peft"]
            row.update({f"{s}_test_accuracy": acc[s]["test"]["accuracy"] for s in SYSTEMS})
            row.update({f"{s}_test_macro_f1": acc[s]["test"]["macro_f1"] for s in SYSTEMS})
            row["accuracy_gap_points"] = 100 * (a["test"]["accuracy"] - p["test"]["accuracy"])
            row["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a["losses"], p["losses"]))
            row["peak_mib"] = {s: acc[s]["train_peak_mib"] for s in SYSTEMS}
            row["extra_mib"] = {s: acc[s]["train_extra_mib"] for s in SYSTEMS}
            row["peak_ratio"] = a["train_peak_mib"] / p["train_peak_mib"]
            target = results["runs"][name]["target"]
            row["target"] = target
            row["meets_accuracy"] = (target is None or a["test"]["accuracy"] >= target)
            row["within_1_point"] = abs(row["accuracy_gap_points"]) <= 1.0
        if timing:
            med = {s: [statistics.median(r["step_s"][WARMUP_STEPS:]) for r in timing if r["system"] == s] for s in SYSTEMS}
            if all(med.values()):
                ratios = [a / p for a, p in zip(med["adapterkit"], med["peft"])]
                row["step_time_s"] = {s: statistics.median(v) for s, v in med.items()}
                row["step_time_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                          "rounds": len(ratios)}
        table[name] = row
    return table


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["runs"] if any(r["run"] == n for r in results["accuracy"])]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in (r for r in results["accuracy"] if r["run"] == name):
            window = 10
            y = r["losses"]
            smooth = [statistics.fmean(y[max(0, i - window + 1): i + 1]) for i in range(len(y))]
            ax.plot(smooth, label=r["system"], linestyle="-" if r["system"] == "adapterkit" else "--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (running mean of 10)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--phases", default="accuracy,timing", help="comma list of accuracy,timing")
    p.add_argument("--steps", type=int, default=None, help="override every run's step count")
    p.add_argument("--test-limit", type=int, default=0, help="score only the first N test examples (0: all)")
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--timing-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 64 test examples, 1 timing round")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        Path(a.worker_out).write_text(json.dumps(worker(json.loads(a.worker))))
        return
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if a.quick:
        a.steps, a.test_limit, a.timing_rounds, a.timing_steps = a.steps or 6, a.test_limit or 64, 1, 3
    out = a.out or RESULTS / ("train_quick.json" if a.quick else "train.json")
    prior = json.loads(out.read_text()) if out.exists() else {}
    results = {"benchmark": "train", "environment": environment(a.threads), "warmup_steps": WARMUP_STEPS,
               "runs": {n: {**RUNS[n], **({"steps": a.steps} if a.steps else {})} for n in names},
               "accuracy": [], "timing": []}
    # runs not re-measured this time keep their earlier results (one file for the README table)
    for n, spec in prior.get("runs", {}).items():
        if n not in results["runs"]:
            results["runs"][n] = spec
            results["accuracy"] += [r for r in prior["accuracy"] if r["run"] == n]
            results["timing"] += [r for r in prior["timing"] if r["run"] == n]
    for n in names:
        if "accuracy" not in phases:
            results["accuracy"] += [r for r in prior.get("accuracy", []) if r["run"] == n]
        if "timing" not in phases:
            results["timing"] += [r for r in prior.get("timing", []) if r["run"] == n]

    def save() -> None:
        results["summary"] = summarize(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)

    common = {"threads": a.threads, "test_limit": a.test_limit}
    if "accuracy" in phases:
        for n in names:
            steps = a.steps or RUNS[n]["steps"]
            for system in SYSTEMS:
                log(f"accuracy: {n} / {system}, {steps} steps")
                t0 = time.perf_counter()
                r = run_worker({**common, "run": n, "system": system, "steps": steps, "measure": "accuracy"})
                r["wall_s"] = time.perf_counter() - t0
                log(f"  test accuracy {r['test']['accuracy']:.4f}, median step {statistics.median(r['step_s']):.3f} s, "
                    f"peak {r['train_peak_mib']:.0f} MiB")
                results["accuracy"].append(r)
                save()
    if "timing" in phases:
        for n in (n for n in names if n in TIMING_RUNS or a.quick):
            for k in range(a.timing_rounds):
                for system in (SYSTEMS if k % 2 == 0 else SYSTEMS[::-1]):      # A B, B A, ...
                    r = run_worker({**common, "run": n, "system": system, "measure": "timing",
                                    "steps": WARMUP_STEPS + a.timing_steps})
                    log(f"timing {n} round {k} {system}: median {statistics.median(r['step_s'][WARMUP_STEPS:]):.3f} s")
                    results["timing"].append(r)
                    save()
    save()
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
