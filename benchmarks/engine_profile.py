#!/usr/bin/env python
"""Where an engine step goes, per KV layout (issue 19): the bare SmolLM2 base through the engine, 64 requests
of 128 random prompt tokens queued at once, 64 output tokens each (ignore EOS, greedy), steps driven in
process, the engine's methods timed by wrappers; then HF `generate` with one static batch of the same
prompts, for context. Side by side in one run; 2 threads.

    .venv/bin/python benchmarks/engine_profile.py      # ~2.5 min; writes results/engine_profile.json

Per layout: output tokens/s, the median step of the decode phase (all 64 decoding), and seconds spent in
attention (the per-sequence path, and the arena's batched calls), the whole forward and the rest.

    .venv/bin/python benchmarks/engine_profile.py --adapters 64 --rounds 2   # ~4 min; engine_profile_adapters.json

With adapters (serve.py's saturation workload: each request one of 64 rank-16 LoRAs on q, k, v, o, drawn
uniformly, seed 99, so some adapters serve several rows; adapters attached before the clock starts) and the
bare base through the same engine, alternated `--rounds` times: what the adapters cost, and the seconds in
each LoRA kernel, split by decode-only steps and steps that prefill.
"""

from __future__ import annotations

import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_batch import cpu_model, git_commit  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "engine_profile.json"
N, PROMPT, OUTPUT = 64, 128, 64


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, vocab - 100) for _ in range(PROMPT)] for _ in range(N)]


def timed_into(spent: collections.Counter, key, fn):
    """fn, wrapped to add its wall seconds to spent[key()] (key read after each call)."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key()] += time.perf_counter() - t0
    return wrapper


def engine_run(attention: str) -> dict:
    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.serve.requests import GenerationRequest, SamplingParams

    eng = Engine.build("smollm2-135m", config=EngineConfig(max_batch=N, max_queue=1000, max_prefill_tokens=1024,
                                                           kv_cache_mb=4096, attention=attention))
    spent: collections.Counter = collections.Counter()

    def timed(name, fn):
        return timed_into(spent, lambda: name, fn)
    d = eng.decoder
    d._attend, d._attend_group = timed("attention_per_sequence", d._attend), timed("attention_batched", d._attend_group)
    d.hidden = timed("forward", d.hidden)
    for p in prompts(d.model.config.vocab_size):
        eng.submit(GenerationRequest(p, None, SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)))
    steps = []
    t0 = time.perf_counter()
    while eng._running or eng._waiting:
        a, n = time.perf_counter(), len(eng._running)
        eng.step()
        steps.append((n, time.perf_counter() - a))
    wall = time.perf_counter() - t0
    decode = [t for n, t in steps if n == N][N // 8:]          # all 64 running, prompts done
    return {"output_tokens_per_s": N * OUTPUT / wall, "wall_s": wall, "steps": len(steps),
            "decode_step_median_s": statistics.median(decode), "seconds": dict(spent)}


def adapters_run(names: list[str] | None, root) -> dict:
    """The engine over `names` (per request; None: the bare base), LoRA kernels timed by wrappers."""
    from adapterkit.methods import lora_pool
    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.serve.requests import GenerationRequest, SamplingParams

    eng = Engine.build("smollm2-135m", adapter_dirs=[root],
                       config=EngineConfig(max_batch=N, max_queue=1000, max_prefill_tokens=1024, kv_cache_mb=4096),
                       max_loaded_adapters=N, ram_cache_mb=1024)
    for name in sorted(set(names or ())):
        eng.cache.acquire(name).release()
    spent: collections.Counter = collections.Counter()
    saved = {k: getattr(lora_pool, k) for k in ("span_kernel", "gather_kernel", "segment_kernel")}
    step_kind = ["decode"]

    def timed(name, fn):
        return timed_into(spent, lambda: f"{name} ({step_kind[0]} steps)", fn)
    try:
        for k, fn in saved.items():
            setattr(lora_pool, k, timed(k, fn))
        for i, p in enumerate(prompts(eng.decoder.model.config.vocab_size)):
            eng.submit(GenerationRequest(p, names[i] if names else None,
                                         SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)))
        steps = []
        t0 = time.perf_counter()
        while eng._running or eng._waiting:
            step_kind[0] = "decode" if not eng._waiting and all(not s.pending or len(s.pending) == 1
                                                                for s in eng._running) else "prefill"
            a = time.perf_counter()
            eng.step()
            steps.append((step_kind[0], time.perf_counter() - a))
        wall = time.perf_counter() - t0
    finally:
        for k, fn in saved.items():
            setattr(lora_pool, k, fn)
    eng.cache.close()
    by = {kind: [t for k, t in steps if k == kind] for kind in ("decode", "prefill")}
    return {"output_tokens_per_s": N * OUTPUT / wall, "wall_s": wall,
            "steps": {k: len(v) for k, v in by.items()},
            "step_seconds": {k: round(sum(v), 3) for k, v in by.items()},
            "decode_step_median_s": statistics.median(by["decode"][N // 8:]),
            "lora_kernel_seconds": {k: round(v, 3) for k, v in sorted(spent.items())}}


def adapters_main(n_adapters: int, rounds: int) -> None:
    from adapterkit.core.base import load_base
    from serve import workload
    from serve_systems import make_adapters

    root = Path.home() / ".cache" / "adapterkit" / "bench-serve" / "all"
    all_names = make_adapters(load_base("smollm2-135m"), root, n_adapters)
    vocab = load_base("smollm2-135m").model.config.vocab_size
    names = [a for _, a, _ in workload(N, all_names, "uniform", float("inf"), seed=99, vocab=vocab)]
    systems = {"adapters": names, "base": None}
    runs: dict = {k: [] for k in systems}
    for r in range(rounds):
        for k, ns in systems.items():
            runs[k].append(adapters_run(ns, root))
            print(k, f"round {r}", json.dumps(runs[k][-1]))
    med = {k: statistics.median(x["output_tokens_per_s"] for x in v) for k, v in runs.items()}
    out = {"environment": {"cpu_model": cpu_model(), "torch_threads": 2, "torch": torch.__version__,
                           "git_commit": git_commit(), "requests": N, "prompt_tokens": PROMPT,
                           "output_tokens": OUTPUT, "adapters_drawn": len(set(names)), "rank": 16,
                           "command": " ".join(sys.argv)},
           "runs": runs, "median_output_tokens_per_s": med,
           "ratio_adapters_vs_base_engine": [a["output_tokens_per_s"] / b["output_tokens_per_s"]
                                             for a, b in zip(runs["adapters"], runs["base"])]}
    dest = OUT.with_name("engine_profile_adapters.json")
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    print(f"wrote {dest}")


def hf_static() -> dict:
    from adapterkit.core.base import load_base

    b = load_base("smollm2-135m")
    ids = torch.tensor(prompts(b.model.config.vocab_size))
    t0 = time.perf_counter()
    b.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT,
                     min_new_tokens=OUTPUT, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t0
    return {"output_tokens_per_s": N * OUTPUT / wall, "wall_s": wall}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=0, help="profile the engine serving this many LoRAs instead")
    ap.add_argument("--rounds", type=int, default=2, help="with --adapters: alternated rounds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    if args.adapters:
        return adapters_main(args.adapters, args.rounds)
    res = {"environment": {"cpu_model": cpu_model(), "torch_threads": 2, "torch": torch.__version__,
                           "git_commit": git_commit(), "requests": N, "prompt_tokens": PROMPT, "output_tokens": OUTPUT},
           "engine_batched": engine_run("batched"), "engine_per_sequence": engine_run("per-sequence"),
           "hf_static": hf_static()}
    for k in ("engine_batched", "engine_per_sequence", "hf_static"):
        r = res[k]
        print(k, f"{r['output_tokens_per_s']:.1f} tok/s", {x: round(y, 3) if isinstance(y, float) else y
                                                           for x, y in r.items() if x != "output_tokens_per_s"})
    OUT.write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
