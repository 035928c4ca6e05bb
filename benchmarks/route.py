#!/usr/bin/env python
"""Routing benchmark (issue 6): a shuffled mixed stream of the test sets of four example tasks.

Four SmolLM2 classification adapters (LoRA + head; the demo's `demo-<task>` adapters, trained when
missing) are routed by the retrieval router with two encoders: the adapters' own base (mean-pooled
SmolLM2 states) and MiniLM-L6, scoring each adapter by the mean cosine to its 10 nearest examples
(up to 1024 train examples per task, --n-fit); calibration: 64 validation examples per task
(coverage target 0.99). Each encoder runs twice, side by side: with the lexical channel (character
n-gram TF-IDF, weight chosen on the calibration examples: the default) and dense only (`-dense`).
Optionally a learned per-token gate (--gate-steps), trained as the issue asks: the task loss (each
example under its own adapter's head) plus the gate cross-entropy on its known task.

Through the server (--server-reps): the same engine and OpenAI API as `adapterkit serve` over a
temporary store holding the four adapters and the MiniLM router as default; one request at a time,
median latency of POST /v1/completions (32 tokens, greedy, ignore_eos) with model="auto" vs with
the prompt's own adapter named, alternated on the same prompts.

Out-of-distribution prompts: the test texts of two tasks no adapter was trained on (Reuters R8 news,
20 Newsgroups posts); reported is the share each retrieval router sends to the fallback.

Reported per router: routing accuracy, confusion matrix (table + PNG), fallback rate, end-to-end
accuracy with `auto` (the routed adapter and its head) vs the oracle adapter (the task's own) vs the
best single merged adapter of the merge benchmark (task arithmetic λ=0.5, one body shared by all
tasks, each task with its own head, so the merge even gets the task's head for free), and the added
latency: median time to route one prompt vs the median single request (one prompt, batch 1: a
classification forward, and a greedy 32-token generation).

    .venv/bin/python benchmarks/route.py             # 200 test rows per task
    .venv/bin/python benchmarks/route.py --quick     # 40 rows per task, 10 latency reps

Results: benchmarks/results/route.json (route_quick.json), route_confusion_<router>.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("rt-sentiment", "election-tweets", "tweet-sentiment", "chat-topics")
OOD_TASKS = ("reuters-r8", "20newsgroups")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def merged_accuracy(rt, merged_name, heads, items, max_length, batch_size=32) -> float:
    from adapterkit.train.classification import encode_texts, hidden_states

    right = 0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            batch = encode_texts(rt.tokenizer, [it.text for it in chunk], max_length)
            with rt.batch([merged_name] * len(chunk)):
                hidden = hidden_states(rt.model, batch)
            for i, it in enumerate(chunk):
                head = heads[it.oracle]
                pred = head.labels[int(head.logits(hidden[i:i + 1], batch["attention_mask"][i:i + 1]).argmax(-1))]
                right += pred == it.label
    return right / len(items)


def latency(rt, routers, items, reps, max_length) -> dict:
    """Median seconds: route one prompt (per router), one classification forward, one 32-token generation."""
    from adapterkit.core.generate import generate
    from adapterkit.train.classification import encode_texts, hidden_states

    sample = random.Random(1).sample(items, reps)
    times = {"classify": [], "generate32": [], **{f"route:{n}": [] for n in routers}}
    with torch.no_grad():
        for it in sample:
            for name, router in routers.items():            # alternated with the requests, same prompt
                t0 = time.perf_counter()
                if router.kind == "gate":
                    router.route(rt, [it.text], max_length)
                else:
                    router.route([it.text])
                times[f"route:{name}"].append(time.perf_counter() - t0)
            batch = encode_texts(rt.tokenizer, [it.text], max_length)
            t0 = time.perf_counter()
            with rt.batch([it.oracle]):
                hidden_states(rt.model, batch)
            times["classify"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            generate(rt, rt.tokenizer, [it.text], [it.oracle], max_new_tokens=32)
            times["generate32"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"reps": reps, "median_s": med}
    for name in routers:
        r = med[f"route:{name}"]
        out[name] = {"added_vs_classify": r / med["classify"], "added_vs_generate32": r / med["generate32"]}
    return out


def server_latency(adapters, router, items, reps: int, tmp: Path) -> dict:
    """Median seconds per request through the HTTP API: model="auto" vs the oracle adapter named."""
    import asyncio

    import httpx

    from adapterkit.serve.api import create_app
    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.store import AdapterStore

    store = AdapterStore(tmp / "store")
    for a in adapters:
        store.put(a)
    router.save(store, overwrite=True)
    from adapterkit.route import set_default_router

    set_default_router(store, router.name)
    engine = Engine.build("smollm2-135m", store=store, config=EngineConfig(max_batch=8)).start()
    app = create_app(engine)
    sample = random.Random(2).sample(items, reps)
    times: dict[str, list[float]] = {"auto": [], "named": []}

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://bench", timeout=120) as c:
            for i, it in enumerate([items[0]] + sample):          # the first request warms up, not timed
                for model in (("auto", it.oracle) if i % 2 else (it.oracle, "auto")):
                    t0 = time.perf_counter()
                    r = await c.post("/v1/completions", json={"model": model, "prompt": it.text, "max_tokens": 32,
                                                              "temperature": 0, "ignore_eos": True})
                    dt = time.perf_counter() - t0
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["completion_tokens"] == 32
                    if i:
                        times["auto" if model == "auto" else "named"].append(dt)
    try:
        asyncio.run(run())
    finally:
        engine.stop(drain=False)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"reps": reps, "router": router.name, "median_s": med, "added": med["auto"] / med["named"] - 1.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-fit", type=int, default=1024)
    p.add_argument("--n-held", type=int, default=64)
    p.add_argument("--encoders", default="base,minilm-l6")
    p.add_argument("--kinds", default="retrieval,linear", help="per-prompt routers fitted for each encoder")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-only retrieval variants")
    p.add_argument("--gate-steps", type=int, default=0, help="also train and score a per-token gate (0: skip)")
    p.add_argument("--gate-top-k", type=int, default=1, help="adapters per token of the gate (with 1 the task "
                   "loss gives the gate no gradient: the one chosen adapter's softmax weight is always 1)")
    p.add_argument("--reps", type=int, default=30, help="latency repetitions")
    p.add_argument("--server-reps", type=int, default=20, help="requests per model through the HTTP API (0: skip)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="results file (default results/route.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_test, args.reps, args.server_reps = 40, 10, min(args.server_reps, 4)

    from adapterkit import AdapterRuntime, load_base, merge
    from adapterkit.data import load_task
    from adapterkit.demo import DemoSettings, task_adapter
    from adapterkit.route import Encoder, GateRouter, fit_linear, fit_retrieval, train_gate
    from adapterkit.route.api import head_loss
    from adapterkit.route.evaluate import Item, evaluate_router, plot_confusion
    from adapterkit.route.gate import token_labels
    from adapterkit.store import AdapterStore
    from adapterkit.train.classification import encode_texts

    t_start = time.perf_counter()
    base = load_base("smollm2-135m")
    store = AdapterStore()
    settings = DemoSettings(head_lr=None)      # the adapters the committed results were measured with (one lr)
    tasks = {t: load_task(t) for t in TASKS}
    adapters = {}
    for t, task in tasks.items():
        adapters[t], how = task_adapter(base, store, task, settings, progress=False)
        log(f"demo-{t}: {how}")
    rt = AdapterRuntime.from_base(base)
    for a in adapters.values():
        rt.add(a)
    heads = {a.name: a.head for a in adapters.values()}
    items = [Item(e.text, adapters[t].name, e.label, t) for t, task in tasks.items() for e in task.test[:args.n_test]]
    random.Random(0).shuffle(items)
    fit = {adapters[t].name: [e.text for e in task.train[:args.n_fit]] for t, task in tasks.items()}
    held = {adapters[t].name: [e.text for e in task.validation[:args.n_held]] for t, task in tasks.items()}
    ood = {t: [e.text for e in load_task(t).test[:args.n_test]] for t in OOD_TASKS}

    routers, results = {}, {"routers": {}}
    for enc_name in [e for e in args.encoders.split(",") if e]:
        enc = (Encoder.from_base(base, max_length=args.max_length, runtime=rt) if enc_name == "base"
               else Encoder.load(enc_name, max_length=args.max_length))
        t0 = time.perf_counter()
        source = f"tasks: train[:{args.n_fit}], validation[:{args.n_held}]"
        variants = [(f"retrieval-{enc_name}", fit_retrieval, True), (f"retrieval-{enc_name}-dense", fit_retrieval, False),
                    (f"linear-{enc_name}", fit_linear, True)]
        for router_name, fitter, lexical in variants:
            kind = router_name.split("-")[0]
            if kind not in args.kinds.split(",") or (not lexical and args.no_dense):
                continue
            t0 = time.perf_counter()
            router = fitter(router_name, list(adapters.values()), fit, enc, held_out=held, lexical=lexical,
                            source=source)
            fit_s = time.perf_counter() - t0
            routers[router.name] = router
            log(f"{router.name}: fitted in {fit_s:.1f} s, calibration {router.calibration}")
    if args.gate_steps:
        gate = GateRouter.create("gate", rt, list(adapters.values()), top_k=args.gate_top_k)
        names = [a.name for a in adapters.values()]
        head_list = [heads[n] for n in names]
        rows = [(e.text, i, head_list[i].labels.index(e.label)) for i, t in enumerate(TASKS)
                for e in tasks[t].train[:args.n_fit]]
        random.Random(0).shuffle(rows)
        batches = []
        for s in range(0, len(rows), 8):
            chunk = rows[s:s + 8]
            enc = encode_texts(base.tokenizer, [r[0] for r in chunk], args.max_length)
            batches.append({**enc, "gate_labels": token_labels(enc["attention_mask"], [r[1] for r in chunk]),
                            "tasks": torch.tensor([r[1] for r in chunk]), "labels": torch.tensor([r[2] for r in chunk])})
        t0 = time.perf_counter()
        # the objective: the task loss (each row under its adapter's head) + the gate cross-entropy
        hist = train_gate(gate, rt, batches, steps=args.gate_steps, lr=1e-2, task_loss=head_loss(head_list))
        log(f"gate: {args.gate_steps} steps in {time.perf_counter() - t0:.0f} s, final {hist[-1]}")
        routers["gate"] = gate

    for name, router in routers.items():
        t0 = time.perf_counter()
        report = evaluate_router(router, rt, items, max_length=args.max_length)
        png = plot_confusion(report, RESULTS / f"route_confusion_{name}{'_quick' if args.quick else ''}.png")
        results["routers"][name] = {**report.to_dict(), "plot": str(png.relative_to(ROOT)),
                                    "eval_s": time.perf_counter() - t0, "meta": _meta(router)}
        if router.kind in ("retrieval", "linear"):
            results["routers"][name]["ood_to_fallback"] = {
                t: sum(d.fallback for d in router.route(texts)) / len(texts) for t, texts in ood.items()}
        log(f"{name}: routing {report.routing_accuracy:.4f}, e2e {report.end_to_end}, "
            f"OOD to fallback {results['routers'][name].get('ood_to_fallback')}")

    merged = merge(list(adapters.values()), "task_arithmetic", name="bench-merged", lam=0.5)
    rt.add(merged)
    results["merged_task_arithmetic_0.5"] = merged_accuracy(rt, "bench-merged", heads, items, args.max_length)
    rt.remove("bench-merged")
    log(f"merged: {results['merged_task_arithmetic_0.5']:.4f}")
    results["latency"] = latency(rt, routers, items, args.reps, args.max_length)
    log(f"latency: {results['latency']}")
    if args.server_reps and "retrieval-minilm-l6" in routers:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["server_latency"] = server_latency(list(adapters.values()), routers["retrieval-minilm-l6"],
                                                       items, args.server_reps, Path(tmp))
        log(f"server latency: {results['server_latency']}")
    results.update({"tasks": list(TASKS), "n_per_task": args.n_test, "n": len(items), "base": base.name,
                    "base_fingerprint": base.fingerprint, "torch_threads": torch.get_num_threads(),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": time.perf_counter() - t_start, "args": {k: str(v) for k, v in vars(args).items()}})
    out = args.out or RESULTS / f"route{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _print(results)
    log(f"wrote {out}")


def _meta(router):
    meta = router.to_meta()
    meta.pop("adapters", None)
    return meta


def _print(results: dict) -> None:
    lat = results["latency"]
    print(f"{'router':26} {'routing':>8} {'fallback':>8} {'auto':>7} {'oracle':>7} {'auto/oracle':>11} "
          f"{'+% classify':>11} {'+% gen32':>9} {'OOD->fallback':>14}")
    for name, r in results["routers"].items():
        e = r["end_to_end"]
        ood = r.get("ood_to_fallback")
        print(f"{name:26} {r['routing_accuracy']:8.4f} {r['fallback_rate']:8.4f} {e['auto']:7.4f} {e['oracle']:7.4f} "
              f"{e['ratio']:11.4f} {100 * lat[name]['added_vs_classify']:10.1f}% {100 * lat[name]['added_vs_generate32']:8.1f}% "
              f"{' '.join(f'{v:.2f}' for v in ood.values()) if ood else '-':>14}")
    print(f"best merged adapter (task arithmetic λ=0.5, oracle head): {results['merged_task_arithmetic_0.5']:.4f}")
    if "server_latency" in results:
        sl = results["server_latency"]
        print(f"through the server ({sl['router']}, 32 tokens): auto {sl['median_s']['auto']:.3f} s vs named "
              f"{sl['median_s']['named']:.3f} s median: {100 * sl['added']:+.1f}%")


if __name__ == "__main__":
    main()
