#!/usr/bin/env python
"""Training's sparse product (methods/sparse.py sparse_apply): the per-entry gathers against a dense ΔW
and one matmul, forward + backward, by density, at SmolLM2-135M's matrix shapes. Chooses DENSE_FROM.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_train_kernel.py

Each (shape, density) times both paths alternated, --reps rounds of --inner calls each, median per call;
writes results/sparse_train_kernel.json. Run on an idle machine (one thread: what a lane gets).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
from pathlib import Path

import torch

import adapterkit.methods.sparse as sp

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))     # q/o, k/v, gate/up, down (d_out, d_in)
DENSITIES = (0.001, 0.003, 0.005, 0.01, 0.03)


def one_call(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, d_out: int) -> None:
    y = sp.sparse_apply(x, rows, cols, values, d_out)
    y.sum().backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=640, help="rows of x: batch 16 x ~40 tokens (rt-sentiment)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "sparse_train_kernel.json")
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for d_out, d_in in SHAPES:
        for density in DENSITIES:
            k = int(density * d_out * d_in)
            idx = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values
            rows, cols = idx // d_in, idx % d_in
            values = torch.randn(k, generator=gen, requires_grad=True)
            x = torch.randn(a.tokens, d_in, generator=gen, requires_grad=True)
            times: dict[str, list[float]] = {"gathers": [], "dense": []}
            for _ in range(a.reps):
                for path, threshold in (("gathers", float("inf")), ("dense", 0.0)):
                    sp.DENSE_FROM = threshold
                    t = time.perf_counter()
                    for _ in range(a.inner):
                        one_call(x, rows, cols, values, d_out)
                    times[path].append((time.perf_counter() - t) / a.inner)
            med = {k2: statistics.median(v) for k2, v in times.items()}
            row = {"d_out": d_out, "d_in": d_in, "density": density, "k": k,
                   "ms": {k2: v * 1e3 for k2, v in med.items()}, "gathers_over_dense": med["gathers"] / med["dense"]}
            rows_out.append(row)
            print(f"{d_out}x{d_in} density {density:.3f}: gathers {row['ms']['gathers']:.1f} ms, dense "
                  f"{row['ms']['dense']:.1f} ms, ratio {row['gathers_over_dense']:.2f}", flush=True)
    out = {"benchmark": "sparse_train_kernel", "tokens": a.tokens, "threads": torch.get_num_threads(),
           "reps": a.reps, "inner": a.inner, "rows": rows_out,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
