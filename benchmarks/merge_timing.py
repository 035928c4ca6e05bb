"""Timing check (not a test): merge 8 random rank-16 adapters over every SmolLM2-135M site
(30 layers x q, k, v, o, gate, up, down; hidden 576, intermediate 1536, kv dim 192).

    .venv/bin/python benchmarks/merge_timing.py [--threads 2] [--method ties] [--svd randomized] [--repeat 3]

Prints the wall time of merge() (torch threads = --threads; merge() runs that many site workers)
and, for `--check` sites, the randomized SVD's relative error next
to the optimal (exact SVD) error of the same rank, so the speed-up's cost is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adapterkit.core.adapter import Adapter, AdapterMeta
from adapterkit.merge.api import merge_with_report
from adapterkit.merge.common import site_delta
from adapterkit.merge.ties import ties
from adapterkit.methods.lora import LoraConfig

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
          "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def smollm2_adapters(n: int = 8, r: int = 16, seed: int = 0) -> list[Adapter]:
    """n random LoRA adapters (A ~ U(±1/√d_in), B ~ N(0, 0.02)) with SmolLM2-135M site shapes."""
    gen = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=r, alpha=2.0 * r, target_modules=tuple(k.split(".")[1] for k in SHAPES))
    out = []
    for i in range(n):
        tensors = {}
        for layer in range(LAYERS):
            for key, (d_out, d_in) in SHAPES.items():
                a = (torch.rand(r, d_in, generator=gen) * 2 - 1) / d_in ** 0.5
                tensors[f"model.layers.{layer}.{key}"] = {"lora_A": a, "lora_B": torch.randn(d_out, r, generator=gen) * 0.02}
        out.append(Adapter(f"task{i}", config, tensors, AdapterMeta(base_fingerprint="sha256:smollm2-shapes")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--svd", default="randomized", choices=["randomized", "exact"])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--check", type=int, default=7, help="sites whose error is compared with the exact SVD")
    ap.add_argument("--repeat", type=int, default=1, help="merges timed (the median is reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = smollm2_adapters()
    params = {"density": args.density} if args.method in ("ties", "magnitude_prune") else {}
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        merged, report = merge_with_report(adapters, args.method, svd=args.svd, **params)
        times.append(round(time.perf_counter() - start, 2))
    result = {"method": args.method, "svd": args.svd, "threads": args.threads, "sites": len(report.site_errors),
              "seconds": statistics.median(times), "runs": times, "total_error": report.total_error,
              "max_error": report.max_error,
              "output_ranks": sorted(set(report.site_ranks.values()))}
    checks = []
    if args.method == "ties":                      # same-rank optimum by exact SVD, one site per kind
        for key in list(SHAPES)[: args.check]:
            site = f"model.layers.0.{key}"
            dense = ties(torch.stack([site_delta(a, site) for a in adapters]), torch.ones(len(adapters)),
                         density=args.density)
            s = torch.linalg.svdvals(dense.double())
            k = report.site_ranks[site]
            best = float((s[k:] ** 2).sum() / (s ** 2).sum()) ** 0.5
            checks.append({"site": site, "rank": k, "error": report.site_errors[site], "optimal_error": best})
    result["svd_check"] = checks
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
