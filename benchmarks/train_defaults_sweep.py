#!/usr/bin/env python
"""The sweep the training defaults' step caps and head lr were chosen from (issue 12 §1), on the two
tuning tasks only: one train_classifier run per call, no validation checks, test accuracy.

    .venv/bin/python benchmarks/train_defaults_sweep.py BASE TASK STEPS BATCH LR HEAD_LR WARMUP_FRACTION [MAX_LENGTH [N_TEST [METHOD]]]

One JSON line per run on stdout; the lines of the runs made are in results/train_defaults_sweep.jsonl
(MiniLM reuters-r8: head lr 1e-2 at 200 and 120 steps; SmolLM2 election-tweets: head lr 1e-2 at 200
and 150 steps; lr 2e-3, batch 16, 10 % warm-up; train_s was measured while other work shared the cores;
METHOD ia3: the IA3 lr factor of train/defaults.py METHOD_LR, MiniLM reuters-r8 at 150 steps; METHOD
bottleneck on SmolLM2 election-tweets at 150 steps, 300 test rows: its causal-LM factor, METHOD_LR_BY_KIND).
"""
import sys, time, json, tempfile, torch
torch.set_num_threads(2)
from adapterkit.core.base import load_base
from adapterkit.data import load_task
from adapterkit.store import AdapterStore
from adapterkit.core.runtime import AdapterRuntime
from adapterkit.train.run import train_classifier, evaluate
from adapterkit.train.trainer import TrainConfig
base_name, task_name, steps, batch, lr, head_lr, warm = sys.argv[1:8]
max_length = int(sys.argv[8]) if len(sys.argv) > 8 else 128
n_test = int(sys.argv[9]) if len(sys.argv) > 9 else 0
method = sys.argv[10] if len(sys.argv) > 10 else "lora"
steps, batch, lr, head_lr, warm = int(steps), int(batch), float(lr), float(head_lr), float(warm)
base = load_base(base_name, device="cpu")
task = load_task(task_name)
store = AdapterStore(tempfile.mkdtemp())
cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, head_lr=head_lr, warmup_steps=int(steps * warm))
t0 = time.perf_counter()
ad, _ = train_classifier(base, "x", task.train, [], task=task_name, store=store, config=cfg, max_length=max_length, progress=False, method=method)
t1 = time.perf_counter()
rt = AdapterRuntime.from_base(base); rt.add(ad)
test = task.test[:n_test] if n_test else task.test
m = evaluate(rt, ad, test, max_length)
print(json.dumps({"base": base_name, "task": task_name, "method": method, "steps": steps, "batch": batch, "lr": lr, "head_lr": head_lr,
  "warm": warm, "max_length": max_length, "train_s": round(t1 - t0, 1), **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}}), flush=True)
