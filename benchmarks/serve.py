"""Serving benchmark (issue 5; method in ../shared/BENCHMARKS.md): open-loop Poisson load against
adapterkit's engine, a PEFT static-batch server and the bare base, on SmolLM2-135M fp32.

    .venv/bin/python benchmarks/serve.py            # full run, ~30 min on 2 cores
    .venv/bin/python benchmarks/serve.py --quick    # a smoke run of every part

Parts (results/serve.json, plot results/serve.png):
  saturation  N=64 adapters, uniform popularity, every request queued at t=0 (the server is never
              idle): adapterkit (warm cache), PEFT static batches (batch size tuned first), the bare
              base through the same engine, alternated A B C for --rounds rounds; the bare HF model
              with static batches once, for context. Output tokens/s, TTFT / TPOT / e2e p50, p99.
  sweep       Poisson arrivals at fractions of adapterkit's saturation rate: adapterkit vs PEFT
              (throughput and p99 latency vs offered rate: the plot).
  popularity  N in {8, 64, 512} x {uniform, Zipf s=1.0} for adapterkit at saturation from a COLD
              cache, with misses and loads (512 adapters: one process, 64 slots, 1 GiB RAM tier).
  cold_load   disk -> attached slot for one adapter with nothing cached: p50 / p99 over 50 adapters.
Requests: 128 random prompt tokens, 64 output tokens forced (ignore EOS), greedy, fixed seeds.
The engines are driven in-process (no HTTP): on 2 shared cores an HTTP client would take CPU from
the server under test; the HTTP layer is tested for correctness in tests/test_api.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_batch import cpu_model, git_commit  # noqa: E402
from serve_systems import EngineSystem, PeftStaticSystem, Ticket, make_adapters, subset_root  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPT, OUTPUT = 128, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def workload(n_requests: int, names: list[str] | None, popularity: str, rate: float, seed: int,
             vocab: int) -> list[tuple[float, str | None, list[int]]]:
    """(arrival second, adapter, prompt ids) per request; rate = inf: all at t=0."""
    rng = random.Random(seed)
    if names is None:
        weights = None
    elif popularity == "uniform":
        weights = [1.0] * len(names)
    else:
        s = float(popularity.split("=")[1])
        weights = [1.0 / (i + 1) ** s for i in range(len(names))]
    t, out = 0.0, []
    for _ in range(n_requests):
        adapter = rng.choices(names, weights)[0] if names else None
        prompt = [rng.randrange(100, vocab - 100) for _ in range(PROMPT)]
        out.append((t, adapter, prompt))
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return out


def drive(system: Any, load: list[tuple[float, str | None, list[int]]]) -> dict[str, Any]:
    """Open loop: submit each request at its arrival time whatever the server is doing."""
    tickets = [Ticket(a, p, OUTPUT) for _, a, p in load]
    start = time.monotonic()

    def feed() -> None:
        for (at, _, _), t in zip(load, tickets):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t.created = time.monotonic()
            system.submit(t)

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    for t in tickets:
        system.collect(t)
    end = max(t.finished_at for t in tickets)
    assert all(t.tokens == OUTPUT for t in tickets), [t.tokens for t in tickets if t.tokens != OUTPUT][:5]
    ttft = [t.first_token_at - t.created for t in tickets]
    tpot = [(t.finished_at - t.first_token_at) / (t.tokens - 1) for t in tickets]
    e2e = [t.finished_at - t.created for t in tickets]
    return {
        "requests": len(tickets), "seconds": end - start,
        "output_tokens_per_s": sum(t.tokens for t in tickets) / (end - start),
        "requests_per_s": len(tickets) / (end - start),
        "offered_rate": len(tickets) / max(load[-1][0], 1e-9) if load[-1][0] > 0 else None,
        **{f"{k}_p50": pct(v, 0.5) for k, v in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e))},
        **{f"{k}_p99": pct(v, 0.99) for k, v in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e))},
    }


def cache_summary(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("slot_hits", "slot_misses", "ram_hits", "ram_misses", "loads", "evictions_slot", "evictions_ram")
    out = {k: stats.get(k) for k in keys}
    ls = stats.get("load_seconds", {})
    out["load_seconds_mean"] = ls["sum"] / ls["count"] if ls.get("count") else None
    return out


def tune(make, sizes: list[int], n_requests: int, names: list[str], vocab: int, label: str) -> tuple[int, dict]:
    """Saturation throughput per batch size (one run of n_requests each); the best size is used."""
    found = {}
    for b in sizes:
        sysm = make(b)
        r = drive(sysm, workload(max(b, n_requests), names, "uniform", float("inf"), 99, vocab))
        sysm.close()
        found[b] = r["output_tokens_per_s"]
        log(f"  {label} batch {b}: {found[b]:.1f} tok/s")
    return max(found, key=found.get), found


def cold_loads(base: str, root: Path, names: list[str]) -> dict[str, Any]:
    from adapterkit.core.base import load_base
    from adapterkit.core.runtime import AdapterRuntime
    from adapterkit.serve.cache.adapter_cache import AdapterCache

    b = load_base(base)
    rt = AdapterRuntime.from_base(b, capacity=9)
    cache = AdapterCache(rt, adapter_dirs=[root], max_loaded=8, ram_cache_mb=0)
    times = []
    for name in names:
        t0 = time.perf_counter()
        h = cache.acquire(name)
        times.append(time.perf_counter() - t0)
        h.release()
    cache.close()
    return {"adapters": len(names), "p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * pct(times, 0.99),
            "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "what": "cache.acquire of an adapter in no tier: disk read, validation, conversion, attach to a slot"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64, help="requests per saturation run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32, help="engine batch when saturation (tuning) is not run")
    ap.add_argument("--peft-batches", default="16,32,64")
    ap.add_argument("--engine-batches", default="32,64")
    ap.add_argument("--sweep", default="0.4,0.7,1.0", help="offered rate as fractions of adapterkit's saturation")
    ap.add_argument("--sweep-requests", type=int, default=32)
    ap.add_argument("--sweep-rates", default=None, help="absolute offered rates (req/s) instead of --sweep's fractions")
    ap.add_argument("--sweep-systems", default="adapterkit,peft",
                    help="of adapterkit, adapterkit-per-sequence (the engine's reference KV layout), peft")
    ap.add_argument("--adapter-dir", type=Path, default=Path.home() / ".cache" / "adapterkit" / "bench-serve")
    ap.add_argument("--parts", default="saturation,sweep,popularity,cold_load")
    ap.add_argument("--quick", action="store_true", help="tiny counts: checks every part runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.sweep_requests, args.peft_batches, args.engine_batches = 8, 1, 6, "8", "8"
        args.sweep = "0.5"
        args.out = args.out.with_name("serve_quick.json")
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))

    from adapterkit.core.base import load_base

    b = load_base(args.base)
    vocab = b.model.config.vocab_size
    n_max = 512 if "popularity" in parts and not args.quick else 64
    log(f"adapters: making/reusing {n_max} rank-{16} LoRAs in {args.adapter_dir}")
    all_names = make_adapters(b, args.adapter_dir / "all", n_max)
    del b
    roots = {n: subset_root(args.adapter_dir / "all", all_names[:n], args.adapter_dir / f"n{n}")
             for n in (8, 64, 512) if n <= n_max}
    results: dict[str, Any] = {"environment": {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "dtype": "float32", "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "loadavg_start": list(os.getloadavg()),
        "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "rank": 16, "targets": "q,k,v,o",
        "engine_max_batch": args.max_batch}}
    names64 = all_names[:64]

    if "saturation" in parts:
        log("tuning the batch size of adapterkit's engine and of the PEFT baseline (best tokens/s of each)")
        ak_batch, ak_tuned = tune(lambda b: EngineSystem(args.base, roots[64], max_batch=b, max_loaded=64,
                                                         ram_cache_mb=1024, warm=tuple(names64)),
                                  [int(x) for x in args.engine_batches.split(",")], args.requests, names64, vocab,
                                  "adapterkit")
        best, tuned = tune(lambda b: PeftStaticSystem(args.base, roots[64], names64, batch=b),
                           [int(x) for x in args.peft_batches.split(",")], args.requests, names64, vocab, "peft")
        args.max_batch = ak_batch
        results["environment"]["engine_max_batch"] = ak_batch
        results["engine_batch_tuning_tokens_per_s"] = ak_tuned
        results["peft_batch_tuning_tokens_per_s"] = tuned
        results["peft_batch"] = best
        runs: dict[str, list[dict]] = {"adapterkit": [], "peft": [], "base_engine": [], "base_hf_static": []}
        for r in range(args.rounds):
            load = workload(args.requests, names64, "uniform", float("inf"), seed=r, vocab=vocab)
            # the HF static bare base is context, not a target: measured in the first round only
            for sys_name in [x for x in runs if r == 0 or x != "base_hf_static"]:
                if sys_name == "adapterkit":              # warm: PEFT holds all 64 in memory too
                    s = EngineSystem(args.base, roots[64], max_batch=args.max_batch, max_loaded=64, ram_cache_mb=1024,
                                     warm=tuple(names64))
                elif sys_name == "base_engine":
                    s = EngineSystem(args.base, None, max_batch=args.max_batch, max_loaded=1, ram_cache_mb=0,
                                     use_adapters=False)
                elif sys_name == "peft":
                    s = PeftStaticSystem(args.base, roots[64], names64, batch=best)
                else:
                    s = PeftStaticSystem(args.base, None, names64, batch=best)
                res = drive(s, load)
                stats = s.close()
                if stats:
                    res["cache"] = cache_summary(stats)
                runs[sys_name].append(res)
                log(f"  round {r} {sys_name}: {res['output_tokens_per_s']:.1f} tok/s, "
                    f"ttft p50 {res['ttft_p50']:.2f} s, tpot p50 {1e3 * res['tpot_p50']:.0f} ms")
        ak = [x["output_tokens_per_s"] for x in runs["adapterkit"]]
        ratio = lambda other: [a / x["output_tokens_per_s"] for a, x in zip(ak, runs[other])]  # noqa: E731
        results["saturation"] = {
            "n_adapters": 64, "popularity": "uniform", "runs": runs,
            "ratio_vs_peft": ratio("peft"), "ratio_vs_base_engine": ratio("base_engine"),
            "note": "popularity runs below are cold (empty cache); these are warm (adapters attached first, as "
                    "PEFT holds every adapter in memory)",
            "median": {k: statistics.median(x["output_tokens_per_s"] for x in v) for k, v in runs.items()}}
        log(f"saturation ratios: vs peft {results['saturation']['ratio_vs_peft']}, "
            f"vs base {results['saturation']['ratio_vs_base_engine']}")

    if "sweep" in parts:
        sat_rps = statistics.median(x["requests_per_s"] for x in results["saturation"]["runs"]["adapterkit"]) \
            if "saturation" in results else 0.5
        best = results.get("peft_batch", 16)
        sweep = []
        rates = ([float(x) for x in args.sweep_rates.split(",")] if args.sweep_rates
                 else [float(x) * sat_rps for x in args.sweep.split(",")])
        for rate in rates:
            frac = rate / sat_rps
            load = workload(args.sweep_requests, names64, "uniform", rate, seed=1000 + int(frac * 100), vocab=vocab)
            for sys_name in args.sweep_systems.split(","):
                s = (PeftStaticSystem(args.base, roots[64], names64, batch=best) if sys_name == "peft" else
                     EngineSystem(args.base, roots[64], max_batch=args.max_batch, max_loaded=64, ram_cache_mb=1024,
                                  warm=tuple(names64),
                                  attention="per-sequence" if sys_name == "adapterkit-per-sequence" else "batched"))
                res = drive(s, load)
                s.close()
                sweep.append({"system": sys_name, "fraction": frac, "rate": rate, **res})
                log(f"  sweep {frac:.2f} x sat ({rate:.2f} req/s) {sys_name}: {res['output_tokens_per_s']:.1f} tok/s, "
                    f"e2e p99 {res['e2e_p99']:.1f} s")
        results["sweep"] = sweep

    if "popularity" in parts:
        pop = []
        for n, root in roots.items():
            for popularity in ("uniform", "zipf=1.0"):
                load = workload(args.requests, all_names[:n], popularity, float("inf"), seed=7, vocab=vocab)
                s = EngineSystem(args.base, root, max_batch=args.max_batch, max_loaded=min(n, 64), ram_cache_mb=1024)
                res = drive(s, load)
                res["cache"] = cache_summary(s.close())
                res["distinct_adapters"] = len({a for _, a, _ in load})
                pop.append({"n_adapters": n, "popularity": popularity, **res})
                log(f"  N={n} {popularity}: {res['output_tokens_per_s']:.1f} tok/s, loads {res['cache']['loads']}")
        results["popularity"] = pop

    if "cold_load" in parts:
        sample = all_names[:50] if not args.quick else all_names[:5]
        results["cold_load"] = cold_loads(args.base, roots[64] if len(all_names) <= 64 else roots[512], sample)
        log(f"  cold load p50 {results['cold_load']['p50_ms']:.1f} ms")

    results["environment"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.out)
    log(f"wrote {args.out}")
    if "sweep" in results and not args.quick:
        plot(results, args.out.with_suffix(".png"))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for sys_name, style in (("adapterkit", "o-"), ("peft", "s--")):
        pts = [x for x in results["sweep"] if x["system"] == sys_name]
        a.plot([x["rate"] for x in pts], [x["output_tokens_per_s"] for x in pts], style, label=sys_name)
        b.plot([x["rate"] for x in pts], [x["e2e_p99"] for x in pts], style, label=sys_name)
    a.set_xlabel("offered load (requests/s)"), a.set_ylabel("output tokens/s"), a.legend()
    b.set_xlabel("offered load (requests/s)"), b.set_ylabel("end-to-end latency p99 (s)"), b.legend()
    fig.suptitle("SmolLM2-135M fp32, 64 rank-16 adapters, uniform; 128 prompt / 64 output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
