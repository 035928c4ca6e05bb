#!/usr/bin/env python
"""The decode step of a batch mixing adapter families (issue 13's benchmark, its timing part):
SmolLM2-135M, B rows (default 32), one new token per row on a KV cache of --ctx (128) tokens.

Systems (the same base weights, alternated in every repetition, median of --reps; each repetition times a
system's second step in a row, the steady step continuous batching repeats, and records its first step
too, which pays for rebuilding the pools' layouts of that set of adapters after the other systems'):
  base      the bare base
  lora      every row on its own LoRA adapter (r=8 on q,k,v,o; the adapters of benchmarks/mixed_batch.py)
  mixed     rows round-robin over five families, B/5 adapters of each: LoRA r=8, IA3 (PEFT's targets),
            bottleneck Pfeiffer and parallel (reduction factor 16), sparse (K = a LoRA r=8's parameter
            count, spread over every weight matrix of the layers)
  only:F    every row on one family F (its B/5 adapters round-robin): where the mixed step's time goes

A correctness gate first: each mixed row equals that row run alone (allclose 1e-4).
Target: mixed / base <= 1.3. Results: benchmarks/results/methods_decode.json.

    .venv/bin/python benchmarks/methods_decode.py [--batch 32] [--reps 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import log  # noqa: E402


def families(base, n_each: int):
    """n_each adapters of each family, nonzero so each moves the output."""
    from adapterkit import BottleneckConfig, Ia3Config, LoraConfig, SparseConfig, create_adapter

    lora_cfg = LoraConfig(r=8, alpha=16, init="nonzero", init_std=0.02)
    lora_params = None
    out = {}
    for fam in ("lora", "ia3", "pfeiffer", "parallel", "sparse"):
        for i in range(n_each):
            if fam == "lora":
                cfg = lora_cfg
            elif fam == "ia3":
                cfg = Ia3Config.for_model("llama", init="nonzero", init_std=0.1)
            elif fam in ("pfeiffer", "parallel"):
                cfg = BottleneckConfig.for_model("llama", fam, init="nonzero", init_std=0.02)
            else:
                total = sum(m.weight.numel() for n, m in base.model.named_modules()
                            if n.rsplit(".", 1)[-1] in SparseConfig().target_modules)
                cfg = SparseConfig(init="random", init_density=lora_params / total, init_std=0.01)
            a = create_adapter(f"{fam}{i}", base.model, cfg, seed=100 * i + len(fam), fingerprint=base.fingerprint)
            if fam == "lora" and lora_params is None:
                lora_params = a.num_parameters()
            out[a.name] = a
    return out, lora_params


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods_decode.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import adapterkit

    base = adapterkit.load_base("smollm2-135m", device="cpu")
    n_each = a.batch // 5 + (a.batch % 5 > 0)
    adapters, lora_params = families(base, n_each)
    rt = adapterkit.AdapterRuntime.from_base(base, capacity=len(adapters))
    for ad in adapters.values():
        rt.add(ad)
    names = list(adapters)
    by_family = [n for i in range(n_each) for n in names[i::n_each]]          # round-robin over families
    mixed_rows = by_family[:a.batch]
    lora_rows = [f"lora{i % n_each}" for i in range(a.batch)]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, base.model.config.vocab_size, (a.batch, a.ctx), generator=g)
    tok = torch.randint(3, base.model.config.vocab_size, (a.batch, 1), generator=g)
    import inspect

    # transformers 5.x renames past_key_values -> cache; use whichever this version takes
    kw = "cache" if "cache" in inspect.signature(base.model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = base.model(ctx, use_cache=True)
        master = getattr(out, kw, None) or out.past_key_values         # the bare base's cache, shared by all

    def step(rows):
        cache = copy.deepcopy(master)
        t0 = time.perf_counter()
        with torch.no_grad():
            if rows is None:
                with rt.disabled():
                    logits = base.model(tok, **{kw: cache}, use_cache=True).logits
            else:
                with rt.batch(rows):
                    logits = base.model(tok, **{kw: cache}, use_cache=True).logits
        return time.perf_counter() - t0, logits[:, -1]

    # correctness gate: each mixed row equals that row alone (its own cache row)
    _, mixed = step(mixed_rows)
    _, bare = step(None)
    moved = 0
    for i, name in enumerate(mixed_rows):
        with torch.no_grad(), rt.batch([name]):
            one = base.model(tok[i:i + 1], **{kw: _row_cache(master, i)}, use_cache=True).logits[0, -1]
        torch.testing.assert_close(mixed[i], one, atol=1e-4, rtol=1e-4)
        moved += int((mixed[i] - bare[i]).abs().max() > 1e-4)
    log(f"gate: every mixed row equals its row alone; {moved}/{len(mixed_rows)} rows moved by their adapter")
    systems = {"base": None, "lora": lora_rows, "mixed": mixed_rows}
    for fam in ("lora", "ia3", "pfeiffer", "parallel", "sparse"):
        systems[f"only:{fam}"] = [f"{fam}{i % n_each}" for i in range(a.batch)]
    times = {k: [] for k in systems}
    switch = {k: [] for k in systems}
    for _ in range(2):                                                   # warm-up
        for rows in systems.values():
            step(rows)
    for rep in range(a.reps):
        for system, rows in systems.items():
            # the first step after another system's pays for this set of adapters' stacked layouts (the pools
            # keep the last two sets); the second is the steady decode step continuous batching repeats
            switch[system].append(step(rows)[0])
            times[system].append(step(rows)[0])
        log(f"rep {rep}: " + ", ".join(f"{k} {1000 * v[-1]:.1f} ms" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_switch = {k: statistics.median(v) for k, v in switch.items()}
    breakdown = pool_breakdown(step, mixed_rows, a.reps)
    log("mixed step, ms per family's pools: " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))
    out = {"benchmark": "methods_decode", "batch": a.batch, "ctx": a.ctx, "reps": a.reps, "threads": a.threads,
           "adapters_per_family": n_each, "families": ["lora r=8", "ia3", "bottleneck pfeiffer rf16",
                                                       "bottleneck parallel rf16", f"sparse K={lora_params}"],
           "times_s": times, "median_s": med, "mixed_pool_ms": breakdown,
           "after_switch_times_s": switch, "after_switch_median_s": med_switch,
           "ratios": {"mixed_over_base": med["mixed"] / med["base"], "lora_over_base": med["lora"] / med["base"],
                      "mixed_over_lora": med["mixed"] / med["lora"],
                      **{f"{k}_over_base": med[k] / med["base"] for k in med if k.startswith("only:")}},
           "target": {"mixed_over_base_at_most": 1.3, "met": med["mixed"] / med["base"] <= 1.3},
           "environment": {"torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
               timespec="seconds")}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log("first step after a switch, medians: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med_switch.items()))
    log("medians: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items()) +
        f"; mixed/base {out['ratios']['mixed_over_base']:.2f}, lora/base {out['ratios']['lora_over_base']:.2f}")


def pool_breakdown(step, rows, reps: int) -> dict[str, float]:
    """Median ms one mixed step spends inside each family's pools (their apply, all sites), timed by
    wrapping each pool class's apply; the rest of the step over the base is the hooks' own dispatch."""
    from adapterkit.methods import bottleneck, ia3, lora_pool, sparse

    classes = {"lora": lora_pool.LoraPool, "ia3": ia3.Ia3Pool, "bottleneck": bottleneck.BottleneckPool,
               "sparse": sparse.SparsePool}
    spent = {k: 0.0 for k in classes}
    real = {k: c.apply for k, c in classes.items()}

    def timed(family):
        def apply(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real[family](self, *args, **kwargs)
            finally:
                spent[family] += time.perf_counter() - t0
        return apply

    samples = {k: [] for k in classes}
    try:
        for family, cls in classes.items():
            cls.apply = timed(family)
        for _ in range(reps):
            for k in spent:
                spent[k] = 0.0
            step(rows)
            for k in classes:
                samples[k].append(1000 * spent[k])
    finally:
        for family, cls in classes.items():
            cls.apply = real[family]
    return {k: statistics.median(v) for k, v in samples.items()}


def _row_cache(cache, i):
    """A copy of the cache holding row i only."""
    one = copy.deepcopy(cache)
    for layer in getattr(one, "layers", []):
        layer.keys, layer.values = layer.keys[i:i + 1], layer.values[i:i + 1]
    if not getattr(one, "layers", None):                               # older caches: key_cache / value_cache
        one.key_cache = [k[i:i + 1] for k in one.key_cache]
        one.value_cache = [v[i:i + 1] for v in one.value_cache]
    return one


if __name__ == "__main__":
    main()
