#!/usr/bin/env python
"""Serving 10,000 low-bit adapters from one SmolLM2 process (issue 16; `lowbit.py --part serve` runs it).

  adapters  10,000 distinct rank-16 LoRAs on q_proj and v_proj (PEFT's default targets for Llama), 1-bit with
            a float16 scale per 64 values: 144 KB each. (On q,k,v,o a 1-bit rank-16 adapter is 288 KB: 10,000
            would need 2.9 GB, beyond the 2 GiB budget.) Each is written straight from random codes and
            scales drawn like a trained one's (the benchmark times serving, not quality); the fp32 store holds
            the SAME adapters dequantized (3.7 MB each), written for the adapters the stream names only (the
            others are never read; all 10,000 would take 37 GB of disk).
  warm      the RAM tier (<= 2 GiB) is filled in popularity order before the clock starts: every packed
            adapter fits; the fp32 store fits budget / 3.7 MB of them
  attach    cold attach from the RAM tier (no slot held it): cache.acquire p50 / p99 over 200 adapters, packed
            (unpack + attach) and fp32 (attach)
  stream    --requests requests, Zipf(s=1.0) over all 10,000 adapters, all queued at t=0 (saturation),
            --prompt / --output tokens (greedy, EOS ignored): output tokens/s, e2e p50/p99, RAM and slot
            hit rates and disk loads, per store, alternated over --rounds rounds (fresh engine each)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402
from mixed_batch import cpu_model, git_commit  # noqa: E402
from serve_systems import EngineSystem  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("q_proj", "v_proj")
RANK = 16


def template(base):
    """A trained-looking 1-bit adapter's packed form: its layout and per-group scales (from a nonzero-init
    LoRA quantized once); each benchmark adapter draws its own codes and jitters the scales."""
    from adapterkit import LoraConfig, LowBit, create_adapter, quantize

    cfg = LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS, init="nonzero")
    a = create_adapter("template", base.model, cfg, seed=0, fingerprint=base.fingerprint, base_name=base.name)
    return quantize(a, LowBit(1))


def write_adapters(base, root_packed: Path, n: int) -> list[str]:
    """n distinct 1-bit adapters under root_packed/a00000...; reused when already there."""
    from adapterkit.codecs import Packed

    names = [f"a{i:05d}" for i in range(n)]
    missing = [x for x in names if not (root_packed / x / "adapter.safetensors").is_file()]
    if not missing:
        return names
    tpl = template(base)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for k, name in enumerate(missing):
        codes = torch.randint(0, 256, tpl.packed.codes.shape, generator=gen, dtype=torch.uint8)
        jitter = 1 + 0.2 * (torch.rand(tpl.packed.scales.shape, generator=gen) - 0.5)
        scales = (tpl.packed.scales.float() * jitter).to(tpl.packed.scales.dtype)
        packed = Packed(tpl.packed.codec, tpl.packed.layout, codes, scales)
        a = tpl.dequantized()
        a.name, a.packed, a.tensors = name, packed, packed.unpack(copy=False)
        a.save(root_packed / name)
        if k % 1000 == 999:
            serve_bench.log(f"  wrote {k + 1} of {len(missing)} packed adapters ({time.perf_counter() - t0:.0f} s)")
    return names


def write_fp32(root_packed: Path, root_fp32: Path, names: list[str]) -> None:
    """The same adapters dequantized, in PEFT's fp32 format (what a float store would serve)."""
    from adapterkit import Adapter

    for name in names:
        if not (root_fp32 / name / "adapter_model.safetensors").is_file():
            a = Adapter.load(root_packed / name)
            a.dequantized().save(root_fp32 / name)


def stream_names(names: list[str], requests: int, seed: int, vocab: int) -> list[str]:
    """The adapters the stream names (the workload draws prompts between adapters: the same vocab)."""
    load = serve_bench.workload(requests, names, "zipf=1.0", float("inf"), seed, vocab)
    return sorted({a for _, a, _ in load})


def warm(system: EngineSystem, names: list[str]) -> dict:
    """Prefetch in popularity order (Zipf: index order) until the RAM tier is full."""
    cache = system.engine.cache
    t0 = time.perf_counter()
    for name in names:
        fut = cache.prefetch(name)
        if fut is not None:
            fut.result()
        s = cache.stats()
        if s["evictions_ram"] or s["ram_rejects"]:
            break                                       # full: the last one pushed the least popular out
    s = cache.stats()
    return {"seconds": round(time.perf_counter() - t0, 1), "ram_adapters": len(s["ram_adapters"]),
            "ram_bytes": s["ram_bytes"], "ram_budget_bytes": s["ram_budget_bytes"]}


def attach_times(system: EngineSystem, names: list[str]) -> dict:
    """cache.acquire of adapters held in RAM but in no slot: unpack (packed) and attach."""
    cache = system.engine.cache
    if not names:
        return {"adapters": 0, "p50_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}
    times = []
    for name in names:
        t0 = time.perf_counter()
        cache.acquire(name).release()
        times.append(time.perf_counter() - t0)
    times_ms = sorted(1e3 * t for t in times)
    return {"adapters": len(names), "p50_ms": statistics.median(times_ms),
            "p99_ms": times_ms[min(len(times_ms) - 1, round(0.99 * (len(times_ms) - 1)))],
            "min_ms": times_ms[0], "max_ms": times_ms[-1]}


def one_run(kind: str, root: Path, warm_names: list[str], names: list[str], a, budget_mb: float) -> dict:
    """warm_names: the adapters of this store in popularity order (RAM-tier warm-up); names: all 10,000 (the
    stream's Zipf ranks, the same for both stores)."""
    system = EngineSystem(a.base, root, max_batch=a.max_batch, max_loaded=a.slots, ram_cache_mb=budget_mb)
    warmed = warm(system, warm_names)
    in_ram = set(system.engine.cache.stats()["ram_adapters"])
    probe = [n for n in warm_names[a.slots:] if n in in_ram][: a.attach_probes]
    attach = attach_times(system, probe)
    load = serve_bench.workload(a.requests, names, "zipf=1.0", float("inf"), a.seed,
                                system.engine.runtime.model.config.vocab_size)
    before = system.engine.cache.stats()
    result = serve_bench.drive(system, load)
    stats = system.close()
    counts = {k: stats[k] - before.get(k, 0) for k in ("slot_hits", "slot_misses", "ram_hits", "ram_misses", "loads")}
    calls = counts["slot_hits"] + counts["slot_misses"]
    return {"store": kind, "warm": warmed, "attach_from_ram": attach, **result, **counts,
            "slot_hit_rate": counts["slot_hits"] / calls if calls else None,
            "ram_hit_rate_of_slot_misses": counts["ram_hits"] / counts["slot_misses"] if counts["slot_misses"] else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--ram-gib", type=float, default=2.0)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--attach-probes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "adapterkit" / "bench-lowbit-serve")
    ap.add_argument("--out", type=Path, default=RESULTS / "lowbit_serve.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    serve_bench.PROMPT, serve_bench.OUTPUT = a.prompt, a.output
    from adapterkit.core.base import load_base

    base = load_base(a.base)
    serve_bench.log(f"writing / reusing {a.adapters} 1-bit adapters in {a.dir / 'packed'}")
    names = write_adapters(base, a.dir / "packed", a.adapters)
    vocab = base.model.config.vocab_size
    del base
    touched = stream_names(names, a.requests, a.seed, vocab)
    budget_mb = a.ram_gib * 1024
    from adapterkit import Adapter
    write_fp32(a.dir / "packed", a.dir / "fp32", names[:1])
    per = {kind: Adapter.load(a.dir / kind / names[0]).stored_bytes() for kind in ("packed", "fp32")}
    warm_fp32 = int(budget_mb * 2 ** 20 // per["fp32"]) + a.slots + a.attach_probes
    fp32_names = set(touched) | set(names[:warm_fp32])
    serve_bench.log(f"writing / reusing {len(fp32_names)} fp32 copies (the stream names {len(touched)} adapters; "
                    f"the RAM tier's warm-up the {warm_fp32} most popular)")
    write_fp32(a.dir / "packed", a.dir / "fp32", sorted(fp32_names))
    out = {"environment": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "git_commit": git_commit(), "dtype": "float32",
                           "command": " ".join([Path(sys.executable).name, *sys.argv])},
           "adapters": a.adapters, "rank": RANK, "targets": list(TARGETS), "ram_budget_gib": a.ram_gib,
           "tensor_bytes_per_adapter": per, "fits_in_budget": {k: int(budget_mb * 2 ** 20 // v) for k, v in per.items()},
           "requests": a.requests, "prompt": a.prompt, "output": a.output, "zipf_s": 1.0,
           "stream_distinct_adapters": len(touched), "slots": a.slots, "runs": []}
    for rnd in range(a.rounds):
        for kind in ("packed", "fp32"):
            serve_bench.log(f"round {rnd}: {kind}")
            # the fp32 root holds only the adapters the stream names (+ the RAM-tier warm set), so both
            # warm in the same popularity order over the names that exist there
            pool = names if kind == "packed" else [n for n in names if n in fp32_names]
            r = one_run(kind, a.dir / kind, pool, names, a, budget_mb)
            r["round"] = rnd
            out["runs"].append(r)
            serve_bench.log(f"  {kind}: {r['output_tokens_per_s']:.1f} tok/s, RAM {r['warm']['ram_adapters']} "
                            f"adapters / {r['warm']['ram_bytes'] / 2**20:.0f} MiB, attach p50 "
                            f"{r['attach_from_ram']['p50_ms']} ms, disk loads {r['loads']}")
    for kind in ("packed", "fp32"):
        runs = [r for r in out["runs"] if r["store"] == kind]
        out[f"{kind}_median"] = {k: statistics.median(r[k] for r in runs)
                                 for k in ("output_tokens_per_s", "e2e_p50", "e2e_p99", "loads")}
        p50s = [r["attach_from_ram"]["p50_ms"] for r in runs if r["attach_from_ram"]["p50_ms"] is not None]
        out[f"{kind}_median"]["attach_p50_ms"] = statistics.median(p50s) if p50s else None
    out["throughput_ratio_packed_over_fp32"] = (out["packed_median"]["output_tokens_per_s"]
                                                / out["fp32_median"]["output_tokens_per_s"])
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    serve_bench.log(f"wrote {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
