#!/usr/bin/env python
"""Out-of-distribution test of the retrieval router, two rules side by side (issue 6).

The router of benchmarks/route.py (MiniLM-L6 + lexical, 1024 train examples per task of the four
demo tasks, 64 validation examples per task for calibration) judges a prompt out of distribution
when its typicality (mean cosine of the UNcentered embedding to its 10 nearest fit examples) is
below the 1 % quantile of the calibration examples' typicality. The former rule compared the top
adapter score (centered, mixed with the lexical score) with its own 1 % quantile. Both are applied
here to the same prompts: the four tasks' test texts (in-task: share passing) and the test texts
of Reuters R8 and 20 Newsgroups, which no adapter was trained on (share sent to the fallback).
No adapter forward is run: only the router.

    .venv/bin/python benchmarks/route_ood.py          # ~2 min -> benchmarks/results/route_ood.json
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rt-sentiment", "election-tweets", "tweet-sentiment", "chat-topics")
OOD_TASKS = ("reuters-r8", "20newsgroups")


def main() -> None:
    from adapterkit.data import load_task
    from adapterkit.route import AdapterRecord, Encoder
    from adapterkit.route import retrieval

    t0 = time.perf_counter()
    tasks = {t: load_task(t) for t in TASKS}
    names = [f"demo-{t}" for t in TASKS]
    fit = {f"demo-{t}": [e.text for e in k.train[:1024]] for t, k in tasks.items()}
    held = {f"demo-{t}": [e.text for e in k.validation[:64]] for t, k in tasks.items()}
    enc = Encoder.load("minilm-l6", max_length=64)

    class Named:                      # the router only reads names here (no adapter is run)
        def __init__(self, name: str) -> None:
            self.name = name

    records = [AdapterRecord(n, "sha256:none", None, None, t) for n, t in zip(names, TASKS)]
    check = retrieval.check_adapters
    retrieval.check_adapters = lambda adapters: records
    try:
        router = retrieval.fit_retrieval("ood", [Named(n) for n in names], fit, enc, held_out=held)
    finally:
        retrieval.check_adapters = check

    def scores(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = enc.embed(texts)
        return router.typicality(emb), router.similarities(emb, texts).max(1).values

    cal_typ, cal_max = scores([t for n in names for t in held[n]])
    rules = {"typicality (uncentered kNN)": (0, torch.quantile(cal_typ, 0.01, interpolation="lower")),
             "top adapter score (former)": (1, torch.quantile(cal_max, 0.01, interpolation="lower"))}
    sets = {**{t: [e.text for e in k.test[:200]] for t, k in tasks.items()},
            **{t: [e.text for e in load_task(t).test[:200]] for t in OOD_TASKS}}
    got = {t: scores(texts) for t, texts in sets.items()}
    results = {"rules": {}}
    for rule, (i, thr) in rules.items():
        row = {"threshold": float(thr)}
        row["in_task_pass"] = {t: float((got[t][i] >= thr).float().mean()) for t in TASKS}
        row["in_task_pass_all"] = float(torch.cat([got[t][i] for t in TASKS]).ge(thr).float().mean())
        row["ood_to_fallback"] = {t: float((got[t][i] < thr).float().mean()) for t in OOD_TASKS}
        results["rules"][rule] = row
        print(f"{rule:30} in-task pass {row['in_task_pass_all']:.3f}  OOD to fallback "
              + "  ".join(f"{t} {v:.3f}" for t, v in row["ood_to_fallback"].items()))
    results.update({"router": {"encoder": "minilm-l6", "lexical_weight": router.lexical_weight,
                               "neighbors": router.neighbors, "coverage": 0.99},
                    "n_per_set": 200, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": time.perf_counter() - t0})
    out = ROOT / "benchmarks" / "results" / "route_ood.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
