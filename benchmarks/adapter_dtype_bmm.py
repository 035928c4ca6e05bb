#!/usr/bin/env python
"""Would half-precision adapter stacks make a decode step's LoRA work cheaper on this CPU? (issue 19)

A decode step with every row on its own adapter reads each adapter's A and B at every site once (the span
kernel's two bmm per site). This times exactly that work for SmolLM2-135M's 120 sites (30 layers x q, k, v,
o: 576 -> 576 / 192), 64 rows, rank 16, each site with its own stacks (so, as in the engine, the stacks come
from memory, not cache: 472 MB fp32 per step), in three forms, alternated `--rounds` times:

  fp32            the stacks as the engine keeps them;
  bf16 bmm        bf16 stacks and inputs, bmm in bf16 (half the bytes);
  bf16 -> fp32    bf16 stacks converted per site to fp32, bmm in fp32 (half the bytes read from memory).

    .venv/bin/python benchmarks/adapter_dtype_bmm.py        # ~30 s; writes results/adapter_dtype_bmm.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_batch import cpu_model, git_commit  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "adapter_dtype_bmm.json"
ROWS, RANK, LAYERS = 64, 16, 30
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576)] * LAYERS     # q, k, v, o: (d_in, d_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="the engine's setting")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per form and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    a32 = [torch.randn(ROWS, d_in, RANK, generator=g) for d_in, _ in SHAPES]
    b32 = [torch.randn(ROWS, RANK, d_out, generator=g) for _, d_out in SHAPES]
    a16, b16 = [a.bfloat16() for a in a32], [b.bfloat16() for b in b32]
    x32 = torch.randn(ROWS, 1, 576, generator=g)
    x16 = x32.bfloat16()

    def fp32() -> None:
        for a, b in zip(a32, b32):
            torch.bmm(torch.bmm(x32, a), b)

    def bf16_bmm() -> None:
        for a, b in zip(a16, b16):
            torch.bmm(torch.bmm(x16, a), b)

    def bf16_to_fp32() -> None:
        for a, b in zip(a16, b16):
            torch.bmm(torch.bmm(x32, a.float()), b.float())

    forms = {"fp32": fp32, "bf16 bmm": bf16_bmm, "bf16 -> fp32": bf16_to_fp32}
    # the answers agree (so the forms time the same product): bf16 within its rounding of fp32's
    want = torch.bmm(torch.bmm(x32, a32[0]), b32[0])
    for got in (torch.bmm(torch.bmm(x16, a16[0]), b16[0]).float(),
                torch.bmm(torch.bmm(x32, a16[0].float()), b16[0].float())):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    ms: dict[str, list[float]] = {k: [] for k in forms}
    for fn in forms.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    out = {"environment": {"cpu_model": cpu_model(), "torch_threads": args.threads, "torch": torch.__version__,
                           "git_commit": git_commit(), "rows": ROWS, "rank": RANK, "sites": len(SHAPES),
                           "fp32_bytes_per_step": sum(a.numel() + b.numel() for a, b in zip(a32, b32)) * 4,
                           "command": " ".join(sys.argv),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
           "ms_per_step": ms, "median_ms_per_step": med,
           "ratio_vs_fp32": {k: v / med["fp32"] for k, v in med.items()}}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("median_ms_per_step", "ratio_vs_fp32")}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
