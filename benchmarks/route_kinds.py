#!/usr/bin/env python
"""Retrieval vs linear router on the four example tasks (issue 12 §2: "no loss on the four example
tasks"), routing only, with the data of benchmarks/route.py: a shuffled stream of the test sets of
rt-sentiment, election-tweets, tweet-sentiment (200 rows each) and chat-topics (187); both routers
fitted on up to 1024 train examples per task, calibrated on 64 validation examples per task
(coverage 0.99), MiniLM-L6 at 64 tokens, the lexical channel on. Out of distribution: 200 Reuters R8
and 200 20 Newsgroups test texts.

A router reads only the encoder and the example texts, never the adapters' weights, so untrained
stand-in adapters with the demo names are used (no SmolLM2 training); routing accuracy, fallback rate,
confusion and OOD rates are therefore exactly those of route.py's routers. End-to-end accuracy (which
needs the trained adapters) is route.py's job.

    .venv/bin/python benchmarks/route_kinds.py         # results/route_kinds.json, ~3 min
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import log  # noqa: E402

TASKS = ("rt-sentiment", "election-tweets", "tweet-sentiment", "chat-topics")
OOD_TASKS = ("reuters-r8", "20newsgroups")


def main() -> None:
    from adapterkit import LoraConfig, create_adapter, load_base
    from adapterkit.data import load_task
    from adapterkit.route import Encoder, fit_linear, fit_retrieval

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    base = load_base("smollm2-135m")
    tasks = {t: load_task(t) for t in TASKS}
    adapters = [create_adapter(f"demo-{t}", base.model, LoraConfig(r=8, target_modules=("q_proj", "v_proj")), seed=i,
                               fingerprint=base.fingerprint, base_name=base.name, task=t) for i, t in enumerate(TASKS)]
    names = [a.name for a in adapters]
    fit = {f"demo-{t}": [e.text for e in task.train[:1024]] for t, task in tasks.items()}
    held = {f"demo-{t}": [e.text for e in task.validation[:64]] for t, task in tasks.items()}
    items = [(e.text, f"demo-{t}") for t, task in tasks.items() for e in task.test[:200]]
    random.Random(0).shuffle(items)
    ood = {t: [e.text for e in load_task(t).test[:200]] for t in OOD_TASKS}
    enc = Encoder.load("minilm-l6", max_length=64)
    results = {}
    for kind, fitter in (("retrieval", fit_retrieval), ("linear", fit_linear)):
        t0 = time.perf_counter()
        router = fitter(kind, adapters, fit, enc, held_out=held, source="tasks: train[:1024], validation[:64]")
        fit_s = time.perf_counter() - t0
        decisions = router.route([t for t, _ in items])
        cols = names + ["(fallback)"]
        confusion = [[0] * len(cols) for _ in names]
        for (_, oracle), d in zip(items, decisions):
            confusion[names.index(oracle)][cols.index(d.top) if d.top else len(names)] += 1
        right = sum(d.top == oracle for (_, oracle), d in zip(items, decisions))
        results[kind] = {"routing_accuracy": right / len(items), "fallback_rate": sum(d.fallback for d in decisions)
                         / len(items), "columns": cols, "confusion": confusion, "fit_s": round(fit_s, 1),
                         "calibration": router.calibration,
                         "ood_to_fallback": {t: sum(d.fallback for d in router.route(x)) / len(x) for t, x in ood.items()}}
        log(f"{kind}: routing {results[kind]['routing_accuracy']:.4f}, fallback {results[kind]['fallback_rate']:.4f}, "
            f"OOD to fallback {results[kind]['ood_to_fallback']}, fit {fit_s:.1f} s")
    out = {"benchmark": "route_kinds", "tasks": list(TASKS), "n": len(items), "routers": results,
           "seconds": round(time.perf_counter() - t_start, 1), "torch": torch.__version__,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path = ROOT / "benchmarks" / "results" / "route_kinds.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
