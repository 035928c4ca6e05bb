#!/usr/bin/env python
"""Where a decode step with every row on its own LoRA adapter spends its time (issue 19): the torch
profiler's self time per op, adapterkit vs the bare base (adapters switched off), same model and cache.

SmolLM2-135M fp32, B rows (default 64) each with its own rank-16 LoRA on q, k, v, o, one new token on a
128-token cache, `--steps` profiled steps each (after two warm-up steps), one thread by default (the
profile of one core; pass --threads 2 for the engine's setting). Writes
results/lora_decode_profile.json: per system the ops' self milliseconds per step, and the adapters'
bytes read per step (A and B of every adapter at every site, from the tensor sizes).

    .venv/bin/python benchmarks/lora_decode_profile.py
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "lora_decode_profile.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import adapterkit
    from torch.profiler import ProfilerActivity, profile

    b = adapterkit.load_base("smollm2-135m")
    rt = adapterkit.AdapterRuntime.from_base(b)
    cfg = adapterkit.LoraConfig(r=a.rank, alpha=2 * a.rank, target_modules=TARGETS, init="nonzero", init_std=0.02)
    adapters = [adapterkit.create_adapter(f"a{i}", b.model, cfg, seed=i, fingerprint=b.fingerprint,
                                          base_name=b.name) for i in range(a.rows)]
    for ad in adapters:
        rt.add(ad)
    adapter_bytes = sum(t.numel() * 4 for ad in adapters[:1] for site in ad.tensors.values()
                        for t in site.values()) * a.rows
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 1000, (a.rows, 128), generator=g)
    tok = torch.randint(0, 1000, (a.rows, 1), generator=g)
    with torch.no_grad():
        master = b.model(ctx, use_cache=True).past_key_values
    rows = [ad.name for ad in adapters]

    def step(adapted: bool):
        cache = copy.deepcopy(master)
        with torch.no_grad(), (rt.batch(rows) if adapted else rt.disabled()):
            return b.model(tok, past_key_values=cache, use_cache=True).logits

    out = {"rows": a.rows, "rank": a.rank, "targets": TARGETS, "threads": a.threads, "steps": a.steps,
           "adapter_bytes_per_step": adapter_bytes, "systems": {}}
    for _ in range(2):
        step(True), step(False)
    for name, adapted in (("adapterkit", True), ("base", False)):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(a.steps):
                step(adapted)
        ops = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        out["systems"][name] = {e.key: {"self_ms_per_step": round(e.self_cpu_time_total / 1e3 / a.steps, 2),
                                        "calls_per_step": e.count / a.steps} for e in ops}
        print(name, {k: v["self_ms_per_step"] for k, v in list(out["systems"][name].items())[:8]})
    out["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
